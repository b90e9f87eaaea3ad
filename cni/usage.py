"""What a person sees when running a plugin binary by hand.

CNI runtimes never pass arguments and always set CNI_COMMAND, so argv is free for humans:
`--help` and `--version` print to stdout and exit 0. With CNI_COMMAND unset, the plugin
prints its "about" line and the CNI versions it speaks to stderr and exits 0, as the Go
reference plugins' skel does. stdlib only: imported on every exec.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import IO

from cni.skel import Verbs

PRODUCT_VERSION = "0.1.0"

HELP = """\
usage: {prog} [--help | --version{extra_usage}]

{about}

{prog} is a CNI plugin: a container runtime (kubelet via CRI, Multus, podman, cnitool) runs
it with the network config on stdin and these environment variables:
  CNI_COMMAND      ADD, DEL, CHECK, VERSION, STATUS or GC
  CNI_CONTAINERID  container id ([a-zA-Z0-9][a-zA-Z0-9_.-]*, at most 128 characters)
  CNI_NETNS        path of the pod's network namespace (optional for DEL)
  CNI_IFNAME       interface name in the pod (at most 15 bytes)
  CNI_ARGS         K=V;... (IgnoreUnknown, K8S_POD_NAMESPACE, K8S_POD_NAME, K8S_POD_UID, IP, MAC{ovn_args})
  CNI_PATH         where delegated plugins are found{ovn}
It writes one result or error JSON to stdout; logs go to stderr and its log file, which the
host chooses (never the network config): OVS_UNDERLAY_LOG_FILE, a file name or a path inside
/var/log/ovs-underlay ("-": stderr only), and OVS_UNDERLAY_LOG_LEVEL (debug, info, warning, error).
CNI versions: {versions}.{extra_help}
Configuration keys, error codes and examples: README.md and conf-examples/ of ovs-underlay.
"""

OVN_HELP = """
  OVS_UNDERLAY_OVN_CONFIG  the node's OVN settings (default /etc/ovs-underlay/ovn.json)"""
WARM_USAGE = " | --warm-server [--socket PATH] [--max-workers N]"
WARM_HELP = """

  --warm-server    serve calls of both plugins (ovs-underlay, ovs-underlay-ipam) from a fork
                   server with the verb code already imported (the warm path); plugin execs
                   hand their call to it over a root-only socket (default
                   /run/ovs-underlay/cni-warm.sock, env OVS_UNDERLAY_WARM_SOCKET) and run
                   in-process whenever it is absent. Workers enter the caller's mount
                   namespace. OVS_UNDERLAY_WARM=0 disables it."""


def handle(verbs: Verbs, prog: str, argv: Sequence[str], env: Mapping[str, str],
           stdout: IO[str] = sys.stdout, stderr: IO[str] = sys.stderr, warm: bool = False) -> int | None:
    """Return an exit code when the call is for a human, None when it is a CNI call."""
    if argv and argv[0] in ("-h", "--help"):
        stdout.write(HELP.format(prog=prog, about=verbs.about, versions=", ".join(verbs.supported_versions),
                                 extra_usage=WARM_USAGE if warm else "", extra_help=WARM_HELP if warm else "",
                                 ovn=OVN_HELP if warm else "",
                                 ovn_args=", OvnPort (only with allowPodOvnPort)" if warm else ""))
        return 0
    if argv and argv[0] == "--version":
        stdout.write(f"{prog} {PRODUCT_VERSION} (CNI {', '.join(verbs.supported_versions)})\n")
        return 0
    if warm and argv and argv[0] == "--warm-server":
        return None  # server mode: cni.warm_server parses its own flags; no CNI_COMMAND there
    if argv and argv[0] == "--warm-recover":
        return None  # the native client's recovery hand-over (cni.warm.read_recovery checks it)
    if argv:
        stderr.write(f"{prog}: unknown argument {argv[0]!r} (see --help)\n")
        return 2
    if not env.get("CNI_COMMAND"):
        versions = ", ".join(verbs.supported_versions)
        stderr.write(f"{verbs.about}\nCNI protocol versions supported: {versions}\n")
        return 0
    return None
