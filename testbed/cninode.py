"""ovs-underlay running on a node of the node bed: ipamd, the warm server and the plugin, all
inside one `nodebed.Node` (its netns and its private Open vSwitch).

Why a private node: ipamd's reconciler judges every OVS port of ours and every host veth with our
alias that it can see. On the system OVS and in the root netns it would see other test runs'
objects (an ADD in flight has a portless veth for a moment); inside a node it sees only this
node's, as on a real machine. It also lets a test restart that node's OVS or fill its state dir.

What runs where: ipamd (`--ovsdb` = the node's OVSDB) and the warm server run inside the node's
netns; every plugin call is `nsenter --net=<node netns> <plugin>` (nsenter execs the plugin in
place: the Popen's pid is the plugin's, so a test can kill it). Pod netns are ordinary named
netns (/run/netns/...). Oracles talk to the node through `ip -n` and its own `ovs-vsctl`,
never through the code under test.

Used by tests/integration/test_reconcile.py, tests/integration/test_soak.py and bench/soak.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed import netbed, nodebed

ROOT = Path(__file__).resolve().parent.parent
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else sys.executable
DIST = ROOT / "dist" / "ovs-underlay"
CNI_PATH = "/usr/lib/cni"
ALIAS_PREFIX = "ovs-underlay "  # restated, not imported: the oracle does not use the code under test
PROBE_OWNER = "ovs-underlay-ipamd"  # the owner of ipamd's probe ports (restated too)


@dataclass
class Call:
    """One finished plugin call."""

    command: str
    rc: int
    stdout: str
    stderr: str
    ms: float
    killed: bool = False  # by the caller (a fault), not by the plugin

    def json(self) -> Any:
        try:
            return json.loads(self.stdout) if self.stdout.strip() else None
        except ValueError:
            return None

    def error_json(self) -> bool:
        """A failed call answered as the CNI spec says: an error document on stdout."""
        doc = self.json()
        return isinstance(doc, dict) and isinstance(doc.get("code"), int) and isinstance(doc.get("msg"), str)


@dataclass
class CniNode:
    node: nodebed.Node
    work: Path
    bridge: str
    ipamd: netbed.Ipamd
    plugin: list[str]  # argv of the plugin (python -m cni, or the frozen native client)
    warm: netbed.WarmServer | None = None
    log_file: str = ""
    env: dict[str, str] = field(default_factory=dict)

    @property
    def ns(self) -> str:
        return self.node.ns

    def nsenter(self) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.node.ns}"]

    # -- configs and calls ---------------------------------------------------------------------

    def conf(self, name: str, subnet: str, *, vlan: int = 100, **ipam: Any) -> dict[str, Any]:
        """A network on this node's bridge with ipamd IPAM; probes off (no gateway on the bed)."""
        section = {"type": "ovs-underlay-ipam", "subnets": [{"subnet": subnet}],
                   "daemonSocket": self.ipamd.socket, "gatewayCheck": False, "conflictCheck": False, **ipam}
        return {"cniVersion": "1.1.0", "name": name, "type": "ovs-underlay", "bridge": self.bridge,
                "vlan": vlan, "ovsdbSocket": self.node.ovsdb, "ipam": section}

    def call_env(self, command: str, container_id: str, netns: str, ifname: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CNI_", "OVS_UNDERLAY_"))}
        env.update({"CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_IFNAME": ifname,
                    "CNI_PATH": CNI_PATH, "OVS_UNDERLAY_LOG_FILE": self.log_file, **self.env})
        if netns:
            env["CNI_NETNS"] = netns
        return env

    def spawn(self, command: str, conf: Mapping[str, Any], container_id: str, netns: str,
              ifname: str = "eth0") -> tuple[subprocess.Popen[bytes], bytes]:
        """Start a plugin call (stdout/stderr piped); returns the process and its stdin bytes."""
        proc = subprocess.Popen([*self.nsenter(), *self.plugin], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/",
                                env=self.call_env(command, container_id, netns, ifname))
        return proc, json.dumps(conf).encode()

    def call(self, command: str, conf: Mapping[str, Any], container_id: str, netns: str,
             ifname: str = "eth0", timeout: float = 90) -> Call:
        t0 = time.monotonic()
        proc, data = self.spawn(command, conf, container_id, netns, ifname)
        try:
            out, err = proc.communicate(data, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        return Call(command, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"),
                    (time.monotonic() - t0) * 1000)

    def reconcile(self, *args: str) -> dict[str, Any]:
        """`ovs-underlay-ipamd reconcile -o json ARGS` against this node's ipamd."""
        res = self.ipamd.cli("reconcile", "-o", "json", *args, check=False)
        if res.returncode not in (0, 1) or not res.stdout.strip():
            raise RuntimeError(f"reconcile failed ({res.returncode}): {res.stderr.strip()}")
        return dict(json.loads(res.stdout))

    # -- oracles (ip and ovs-vsctl, never our code) ---------------------------------------------

    def our_ports(self) -> list[dict[str, Any]]:
        return self.node.ovs_rows("Interface", "name", "external_ids",
                                  where=["external_ids:owner=ovs-underlay"])

    def bridge_ports(self) -> list[str]:
        """The bridge's ports but ipamd's probe port (it lives as long as ipamd, not a pod's)."""
        res = self.node.vsctl("list-ports", self.bridge, check=False)
        probe = {r["name"] for r in self.node.ovs_rows("Interface", "name", "external_ids",
                                                       where=[f"external_ids:owner={PROBE_OWNER}"])}
        return [p for p in res.stdout.split() if p not in probe] if res.returncode == 0 else []

    def our_veths(self) -> list[dict[str, Any]]:
        return [ln for ln in self.node.ip_json("-d", "link", "show")
                if str(ln.get("ifalias", "")).startswith(ALIAS_PREFIX)]

    def active_leases(self) -> list[dict[str, Any]]:
        return [r for r in self.ipamd.leases() if r.get("state") == "active"]

    def nsfs_fds(self, pid: int) -> int:
        """Network namespace handles a daemon holds open (a leak keeps pods' netns alive)."""
        n = 0
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("net:["):
                        n += 1
        return n

    # -- teardown ----------------------------------------------------------------------------------

    def destroy(self) -> None:
        if self.warm is not None:
            with contextlib.suppress(Exception):
                self.warm.stop()
        with contextlib.suppress(Exception):
            self.ipamd.stop()
        self.node.destroy()


def make_cni_node(name: str, work: Path, *, frozen: bool = False, warm: bool = False,
                  ipamd_args: Sequence[str] = (), state_dir: Path | None = None) -> CniNode:
    """A node with a netdev bridge, ipamd (python or frozen) and optionally the warm server.
    `state_dir`: ipamd's state dir (a small tmpfs for the soak); default under `work`."""
    work.mkdir(parents=True, exist_ok=True)
    node = nodebed.make_node(name)
    started: list[netbed.Ipamd | netbed.WarmServer] = []  # stopped again if the node cannot be made
    try:
        bridge = "br-pods"
        node.vsctl("add-br", bridge, "--", "set", "Bridge", bridge, "datapath_type=netdev")
        sock, state = str(work / "ipamd.sock"), str(state_dir or work / "state")
        os.makedirs(state, exist_ok=True)
        ipamd_exe = [str(DIST / "ovs-underlay-ipamd")] if frozen else [PYTHON, "-m", "ipamd"]
        args = ["nsenter", f"--net=/run/netns/{node.ns}", *ipamd_exe, "serve", "--socket", sock,
                "--state-dir", state, "--ovsdb", node.ovsdb, "--probe-netns", netbed.uniq("probe", limit=40),
                *ipamd_args]
        d = netbed.Ipamd(sock, state, None, str(work / "ipamd.log"), args)
        started.append(d)
        d.start()
        plugin = [str(DIST / "ovs-underlay")] if frozen else [PYTHON, "-m", "cni"]
        cn = CniNode(node, work, bridge, d, plugin, log_file=str(work / "plugin.log"))
        if warm:
            argv = [*cn.nsenter(), str(DIST / "ovs-underlay-py") if frozen else PYTHON,
                    *(() if frozen else ("-m", "cni"))]
            cn.warm = netbed.WarmServer(argv, str(work / "warm" / "cni-warm.sock"), work / "warm.log")
            started.append(cn.warm)
            cn.warm.start()
            cn.env["OVS_UNDERLAY_WARM_SOCKET"] = cn.warm.path
        else:
            cn.env["OVS_UNDERLAY_WARM"] = "0"
        return cn
    except BaseException:
        for proc in reversed(started):
            with contextlib.suppress(Exception):
                proc.stop()
        node.destroy()
        raise
