"""The bad-input corpus (issue 11 item 24): malformed environments, configs, CNI_ARGS, prevResults
and gRPC requests against the FROZEN binaries, as a runtime and a direct client would send them.

Every plugin case must answer with a CNI error JSON carrying the expected code on stdout (one
document, nothing else), a non-zero exit, no traceback on stderr, and leave nothing behind: no
veth, OVS port or lease of the case's container, nothing in the pod netns, no new netns. The
DEL cases first ADD with a valid config and then DEL with a bad one: DEL must succeed and remove
everything (issue 11 item 5). Every gRPC case must get its status and reason and leave ipamd's
store (read from its SQLite file) unchanged.

Cost: one bed (an OVS bridge, a pod netns, a FIFO), one frozen ipamd, cases from a table; the
frozen plugin runs in-process (no warm server), ~0.3 s per call. Oracles: `ip -j`, ovs-vsctl,
the SQLite file, never our own code.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import e2e_helpers as e2e
import grpc
import pytest

from core import wire
from core._proto import ipam_pb2 as pb
from core._proto import ipam_pb2_grpc
from core.names import PROBE_OWNER
from core.spec import parse_ipam
from testbed import netbed

pytestmark = pytest.mark.timeout(900)  # the first test of a session may build the bundle

SUBNET = "10.77.0.0/24"


@dataclass
class Bed:
    bundle: Path
    bridge: str
    pod: netbed.Netns
    ipamd: netbed.Ipamd
    fifo: str
    netns_before: set[str]
    log: Path

    @property
    def db(self) -> Path:
        return Path(self.ipamd.state_dir) / "ipam.db"


@pytest.fixture(scope="module")
def bed(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    work = tmp_path_factory.mktemp("corpus")
    br = netbed.make_bridge("bic")
    pod = netbed.make_netns("bicpod")
    d: netbed.Ipamd | None = None
    try:
        d = e2e.start_frozen_ipamd(work / "ipamd")
        fifo = work / "fifo"
        os.mkfifo(fifo)
        yield Bed(bundle, br, pod, d, str(fifo), set(os.listdir("/run/netns")), netbed.plugin_log("corpus"))
    finally:
        if d is not None:
            d.stop()
        pod.delete()
        netbed.delete_bridge(br)


def base(bed: Bed, **extra: Any) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "cniVersion": "1.1.0", "name": f"cor{netbed.TOKEN}", "type": "ovs-underlay", "bridge": bed.bridge,
        "vlan": 100,
        "ipam": {"type": "ovs-underlay-ipam", "daemonSocket": bed.ipamd.socket,
                 "subnets": [{"subnet": SUBNET, "gateway": "10.77.0.1"}], "gatewayCheck": False,
                 "conflictCheck": False}}
    conf.update(extra)
    return conf


def ipam(bed: Bed, **extra: Any) -> dict[str, Any]:
    """`base` with keys of its ipam section replaced (None deletes one)."""
    conf = base(bed)
    for k, v in extra.items():
        if v is None:
            conf["ipam"].pop(k, None)
        else:
            conf["ipam"][k] = v
    return conf


PREV = {"cniVersion": "1.1.0", "interfaces": [{"name": "eth0", "sandbox": "/x"}],
        "ips": [{"address": "10.77.0.5/24", "interface": 0}]}
Conf = Callable[[Bed], "dict[str, Any] | bytes"]


HELP = -1  # the expected "code" of a call without CNI_COMMAND: the about text, exit 0


@dataclass(frozen=True)
class Case:
    id: str
    code: int  # the expected CNI code; 0: must succeed (the DEL cases); HELP
    conf: Conf = base
    env: dict[str, str | None] = field(default_factory=dict)  # None unsets
    command: str = "ADD"
    prog: str = "ovs-underlay"
    add_first: bool = False  # ADD with the valid config first (a DEL case)


def c(id: str, code: int, conf: Conf = base, command: str = "ADD", **env: str | None) -> Case:
    return Case(id, code, conf, env, command)


def conf_with(**extra: Any) -> Conf:
    return lambda bed: base(bed, **extra)


def conf_without(*keys: str) -> Conf:
    return lambda bed: {k: v for k, v in base(bed).items() if k not in keys}


def ipam_with(**extra: Any) -> Conf:
    return lambda bed: ipam(bed, **extra)


def raw(data: bytes) -> Conf:
    return lambda bed: data


def fifo_env(bed: Bed) -> dict[str, str]:
    return {"CNI_NETNS": bed.fifo}


CASES: list[Case] = [
    # --- environment --------------------------------------------------------------------------
    # No CNI_COMMAND at all is a human, not a runtime: like the reference plugins (Go skel), the
    # plugin describes itself on stderr and exits 0, writing nothing on stdout (HELP).
    c("command-missing", HELP, CNI_COMMAND=None),
    c("command-empty", HELP, CNI_COMMAND=""),
    c("command-lowercase", 4, CNI_COMMAND="add"),
    c("command-unknown", 4, CNI_COMMAND="FROB"),
    c("cid-missing", 4, CNI_CONTAINERID=None),
    c("cid-empty", 4, CNI_CONTAINERID=""),
    c("cid-leading-dash", 4, CNI_CONTAINERID="-abc"),
    c("cid-leading-dot", 4, CNI_CONTAINERID=".abc"),
    c("cid-space", 4, CNI_CONTAINERID="a b"),
    c("cid-slash", 4, CNI_CONTAINERID="a/b"),
    c("cid-newline", 4, CNI_CONTAINERID="abc\ndef"),
    c("cid-trailing-newline", 4, CNI_CONTAINERID="abc\n"),
    c("cid-129", 4, CNI_CONTAINERID="a" * 129),
    c("cid-250", 4, CNI_CONTAINERID="a" * 250),
    c("cid-unicode", 4, CNI_CONTAINERID="café"),
    c("cid-semicolon", 4, CNI_CONTAINERID="abc;rm"),
    c("cid-del-invalid", 4, command="DEL", CNI_CONTAINERID="-x"),
    c("ifname-missing", 4, CNI_IFNAME=None),
    c("ifname-empty", 4, CNI_IFNAME=""),
    c("ifname-16", 4, CNI_IFNAME="a234567890123456"),
    c("ifname-16-bytes-8-chars", 4, CNI_IFNAME="é" * 8),
    c("ifname-dot", 4, CNI_IFNAME="."),
    c("ifname-dotdot", 4, CNI_IFNAME=".."),
    c("ifname-slash", 4, CNI_IFNAME="eth/0"),
    c("ifname-colon", 4, CNI_IFNAME="eth:0"),
    c("ifname-space", 4, CNI_IFNAME="eth 0"),
    c("ifname-tab", 4, CNI_IFNAME="eth\t0"),
    c("ifname-all", 4, CNI_IFNAME="all"),
    c("ifname-default", 4, CNI_IFNAME="default"),
    c("ifname-template", 4, CNI_IFNAME="net%d"),
    c("ifname-escape", 4, CNI_IFNAME="eth0\x1b"),
    c("ifname-exists-lo", 4, CNI_IFNAME="lo"),
    c("ifname-del-all", 4, command="DEL", CNI_IFNAME="all"),
    c("netns-missing", 4, CNI_NETNS=None),
    c("netns-empty", 4, CNI_NETNS=""),
    c("netns-relative", 4, CNI_NETNS="run/netns/x"),
    c("netns-nonexistent", 8, CNI_NETNS="/nonexistent/netns"),
    c("netns-regular-file", 8, CNI_NETNS="/etc/hostname"),
    c("netns-own", 8, CNI_NETNS="/proc/self/ns/net"),
    c("netns-host", 8, CNI_NETNS="/proc/1/ns/net"),
    c("netns-mount-ns", 8, CNI_NETNS="/proc/self/ns/mnt"),
    c("netns-dev-null", 8, CNI_NETNS="/dev/null"),
    c("netns-root-dir", 8, CNI_NETNS="/"),
    c("netns-dir", 8, CNI_NETNS="/tmp"),
    Case("netns-fifo", 8, env={"CNI_NETNS": "<fifo>"}),
    Case("netns-fifo-check", 8, lambda bed: base(bed, prevResult=PREV), env={"CNI_NETNS": "<fifo>"},
         command="CHECK"),
    c("check-netns-missing", 4, lambda bed: base(bed, prevResult=PREV), command="CHECK", CNI_NETNS=None),
    # --- CNI_ARGS -----------------------------------------------------------------------------
    c("args-no-equals", 4, CNI_ARGS="garbage"),
    c("args-empty-key", 4, CNI_ARGS="=x"),
    c("args-trailing-key", 4, CNI_ARGS="IgnoreUnknown=1;;;IP"),
    c("args-newline-key", 4, CNI_ARGS="K8S_POD_NAME=a\nb;IP"),
    c("args-10k", 4, CNI_ARGS="x" * 10_000),
    c("args-ip-invalid", 7, CNI_ARGS="IP=10.77.0.300"),
    c("args-ip-outside", 102, CNI_ARGS="IP=192.168.1.5"),
    c("args-ip-gateway", 102, CNI_ARGS="IP=10.77.0.1"),
    c("args-ip-network", 102, CNI_ARGS="IP=10.77.0.0"),
    c("args-ip-broadcast", 102, CNI_ARGS="IP=10.77.0.255"),
    c("args-ip-v6-no-subnet", 102, CNI_ARGS="IP=fd00::5"),
    c("args-ip-two-in-one-subnet", 7, CNI_ARGS="IP=10.77.0.5,10.77.0.6"),
    c("args-mac-invalid", 7, CNI_ARGS="MAC=zz"),
    c("args-mac-multicast", 7, CNI_ARGS="MAC=01:00:5e:00:00:01"),
    c("args-mac-zero", 7, CNI_ARGS="MAC=00:00:00:00:00:00"),
    c("args-ovnport-opted-in-invalid", 7, conf_with(allowPodOvnPort=True), CNI_ARGS="OvnPort=a b"),
    # --- stdin --------------------------------------------------------------------------------
    c("stdin-empty", 6, raw(b"")),
    c("stdin-not-json", 6, raw(b"not json")),
    c("stdin-array", 6, raw(b"[1, 2]")),
    c("stdin-string", 6, raw(b'"str"')),
    c("stdin-null", 6, raw(b"null")),
    c("stdin-number", 6, raw(b"123")),
    c("stdin-deep-arrays", 6, raw(b"[" * 100_000)),
    c("stdin-deep-objects", 6, raw(b'{"a":' * 100_000)),
    c("stdin-5000-digit-int", 6, raw(b'{"cniVersion": "1.1.0", "mtu": ' + b"1" * 5000 + b"}")),
    c("stdin-invalid-utf8", 6, raw(b'{"name": "\xff\xfe"}')),
    c("stdin-trailing-garbage", 6, raw(b'{"cniVersion": "1.1.0"} x')),
    # --- versions -----------------------------------------------------------------------------
    c("version-missing", 1, conf_without("cniVersion")),
    c("version-0.1.0", 1, conf_with(cniVersion="0.1.0")),
    c("version-2.0.0", 1, conf_with(cniVersion="2.0.0")),
    c("version-number", 1, conf_with(cniVersion=1.1)),
    c("version-trailing-space", 1, conf_with(cniVersion="1.1.0 ")),
    c("version-null", 1, conf_with(cniVersion=None)),
    c("gc-below-1.1", 1, conf_with(cniVersion="1.0.0"), command="GC"),
    c("status-below-1.1", 1, conf_with(cniVersion="0.4.0"), command="STATUS"),
    c("check-below-0.4", 1, conf_with(cniVersion="0.3.1", prevResult=PREV), command="CHECK"),
    # --- the plugin's own keys ----------------------------------------------------------------
    c("name-missing", 7, conf_without("name")),
    c("name-empty", 7, conf_with(name="")),
    c("name-number", 7, conf_with(name=5)),
    c("name-space", 7, conf_with(name="bad name")),
    c("name-slash", 7, conf_with(name="a/b")),
    c("name-254", 7, conf_with(name="n" * 254)),
    c("name-newline", 7, conf_with(name="net\n")),
    c("type-missing", 7, conf_without("type")),
    c("type-empty", 7, conf_with(type="")),
    c("bridge-missing-on-node", 7, conf_with(bridge=f"nobr{netbed.TOKEN}")),
    c("bridge-empty", 7, conf_with(bridge="")),
    c("bridge-number", 7, conf_with(bridge=5)),
    c("bridge-16", 7, conf_with(bridge="b" * 16)),
    c("bridge-slash", 7, conf_with(bridge="br/0")),
    c("vlan-4095", 7, conf_with(vlan=4095)),
    c("vlan-5000", 7, conf_with(vlan=5000)),
    c("vlan-negative", 7, conf_with(vlan=-1)),
    c("vlan-string", 7, conf_with(vlan="100")),
    c("vlan-bool", 7, conf_with(vlan=True)),
    c("vlan-float", 7, conf_with(vlan=1.5)),
    c("trunk-string", 7, conf_with(trunk="all")),
    c("trunk-id-5000", 7, conf_with(trunk=[{"id": 5000}])),
    c("trunk-min-gt-max", 7, conf_with(trunk=[{"minID": 20, "maxID": 10}])),
    c("trunk-both-forms", 7, conf_with(trunk=[{"id": 1, "minID": 2, "maxID": 3}])),
    c("trunk-number-item", 7, conf_with(trunk=[5])),
    c("trunk-empty-item", 7, conf_with(trunk=[{}])),
    c("mtu-10", 7, conf_with(mtu=10)),
    c("mtu-70000", 7, conf_with(mtu=70000)),
    c("mtu-string", 7, conf_with(mtu="1500")),
    c("ovsdb-not-a-remote", 7, conf_with(ovsdbSocket="foo")),
    c("ovsdb-number", 7, conf_with(ovsdbSocket=5)),
    c("ovsdb-two-spellings", 7, conf_with(ovsdbSocket="unix:/a", socket_file="unix:/b")),
    c("ofport-0", 7, conf_with(ofportRequest=0)),
    c("ofport-70000", 7, conf_with(ofportRequest=70000)),
    c("datapath-mismatch", 7, conf_with(datapathType="system")),
    c("datapath-number", 7, conf_with(datapathType=5)),
    c("ovnport-number", 7, conf_with(ovnPort=5)),
    c("ovnport-space", 7, conf_with(ovnPort="a b")),
    c("allow-pod-ovnport-string", 7, conf_with(allowPodOvnPort="yes")),
    c("runtimeconfig-string", 7, conf_with(runtimeConfig="x")),
    c("runtimeconfig-mac", 7, conf_with(runtimeConfig={"mac": "zz"})),
    c("runtimeconfig-ips-invalid", 7, conf_with(runtimeConfig={"ips": ["nope"]})),
    c("runtimeconfig-ips-outside", 102, conf_with(runtimeConfig={"ips": ["10.77.1.5/24"]})),
    c("args-not-object", 7, conf_with(args="x")),
    c("args-cni-not-object", 7, conf_with(args={"cni": "x"})),
    c("args-cni-mac-number", 7, conf_with(args={"cni": {"mac": 5}})),
    c("args-cni-ips-number", 7, conf_with(args={"cni": {"ips": 5}})),
    c("static-ip-without-ipam", 7, lambda bed: {**conf_without("ipam")(bed),  # type: ignore[dict-item]
                                                "runtimeConfig": {"ips": ["10.77.0.5"]}}),
    # --- the ipam section ---------------------------------------------------------------------
    c("ipam-string", 7, conf_with(ipam="host-local")),
    c("ipam-type-number", 7, conf_with(ipam={"type": 5})),
    c("ipam-type-traversal", 7, conf_with(ipam={"type": "../../bin/sh"})),
    c("ipam-type-absolute", 7, conf_with(ipam={"type": "/bin/sh"})),
    c("ipam-type-not-in-path", 7, conf_with(ipam={"type": "nope-ipam"})),
    c("ipam-unknown-key", 7, ipam_with(excludeIpz=["10.77.0.9"])),
    c("ipam-subnets-garbage", 7, ipam_with(subnets="not-a-cidr")),
    c("ipam-subnets-empty", 7, ipam_with(subnets=[])),
    c("ipam-subnet-33", 7, ipam_with(subnets=[{"subnet": "10.77.0.0/33"}])),
    c("ipam-gateway-outside", 7, ipam_with(subnets=[{"subnet": SUBNET, "gateway": "10.78.0.1"}])),
    c("ipam-range-reversed", 7, ipam_with(subnets=[{"subnet": SUBNET, "rangeStart": "10.77.0.50",
                                                     "rangeEnd": "10.77.0.10"}])),
    c("ipam-exclude-reversed", 7, ipam_with(exclude=["10.77.0.9..10.77.0.2"])),
    c("ipam-exclude-outside", 7, ipam_with(exclude=["10.99.0.1"])),
    c("ipam-subnets-overlap", 7, ipam_with(subnets=[SUBNET, "10.77.0.128/25"])),
    c("ipam-routes-string", 7, ipam_with(routes="x")),
    c("ipam-route-without-dst", 7, ipam_with(routes=[{"gw": "10.77.0.1"}])),
    c("ipam-dns-search-number", 7, ipam_with(dns={"search": 5})),
    c("ipam-dns-search-string", 7, ipam_with(dns={"search": "a.b"})),
    c("ipam-dns-nameserver-invalid", 7, ipam_with(dns={"nameservers": ["x"]})),
    c("ipam-dns-domain-list", 7, ipam_with(dns={"domain": ["a"]})),
    c("ipam-dns-search-newline", 7, ipam_with(dns={"search": ["x\nnameserver 6.6.6.6"]})),
    c("ipam-dns-unknown-key", 7, ipam_with(dns={"nameserver": ["10.0.0.53"]})),
    c("ipam-socket-relative", 7, ipam_with(daemonSocket="relative.sock")),
    c("ipam-socket-too-long", 7, ipam_with(daemonSocket="/" + "x" * 200)),
    c("ipam-socket-nobody", 11, ipam_with(daemonSocket=f"/tmp/nobody-{netbed.TOKEN}.sock")),
    c("ipam-timeout-5", 7, ipam_with(timeoutMs=5)),
    c("ipam-gw-timeout-0", 7, ipam_with(gatewayCheckTimeoutMs=0)),
    c("ipam-conflict-check-maybe", 7, ipam_with(conflictCheck="maybe")),
    c("ipam-cooldown-negative", 7, ipam_with(cooldownSeconds=-1)),
    c("ipam-mac-from-ip-yes", 7, ipam_with(macFromIP="yes")),
    c("ipam-gateway-unreachable", 103, ipam_with(gatewayCheck=True, gatewayCheckTimeoutMs=100)),
    c("ipam-and-top-level-subnets", 7, conf_with(subnets="10.78.0.0/24")),
    c("top-level-subnets-invalid", 7, lambda bed: {**conf_without("ipam")(bed),  # type: ignore[dict-item]
                                                   "subnets": "10.78.0.0/99"}),
    # --- GC, CHECK, prevResult -----------------------------------------------------------------
    c("gc-without-attachments", 7, command="GC"),
    c("gc-attachments-string", 7, conf_with(**{"cni.dev/valid-attachments": "x"}), command="GC"),
    c("gc-attachment-number", 7, conf_with(**{"cni.dev/valid-attachments": [{"containerID": 1}]}), command="GC"),
    c("check-without-prevresult", 7, command="CHECK"),
    c("prev-string", 6, conf_with(prevResult="x"), command="CHECK"),
    c("prev-ips-string", 6, conf_with(prevResult={"ips": "x"}), command="CHECK"),
    c("prev-ip-no-prefix", 6, conf_with(prevResult={"ips": [{"address": "10.77.0.5"}]}), command="CHECK"),
    c("prev-ip-invalid", 6, conf_with(prevResult={"ips": [{"address": "nope/24"}]}), command="CHECK"),
    c("prev-ip-number", 6, conf_with(prevResult={"ips": [{"address": 167772161}]}), command="CHECK"),
    c("prev-interface-no-name", 6, conf_with(prevResult={"interfaces": [{"mac": "x"}]}), command="CHECK"),
    c("prev-version", 1, conf_with(prevResult={"cniVersion": "9.9.9"}), command="CHECK"),
    c("prev-route-gw-invalid", 6, conf_with(prevResult={"routes": [{"dst": "0.0.0.0/0", "gw": "x"}]}),
      command="CHECK"),
    c("prev-route-gw-list", 6, conf_with(prevResult={"routes": [{"dst": "0.0.0.0/0", "gw": [None]}]}),
      command="CHECK"),
    c("prev-dns-string", 6, conf_with(prevResult={"dns": "x"}), command="CHECK"),
    c("prev-dns-search-number", 6, conf_with(prevResult={"dns": {"search": 5}}), command="CHECK"),
    c("prev-interface-index-string", 6,
      conf_with(prevResult={"ips": [{"address": "10.77.0.5/24", "interface": "x"}]}), command="CHECK"),
    # --- DEL with bad input after a good ADD: must succeed and clean up (item 5) --------------
    Case("del-vlan-5000", 0, conf_with(vlan=5000), command="DEL", add_first=True),
    Case("del-unknown-ipam-key", 0, ipam_with(excludeIpz=["x"], daemonSocket="/nonexistent.sock"),
         command="DEL", add_first=True),
    Case("del-bad-prevresult", 0, conf_with(prevResult={"ips": "x"}), command="DEL", add_first=True),
    Case("del-bad-cni-args", 0, env={"CNI_ARGS": "garbage;IP=nope"}, command="DEL", add_first=True),
    Case("del-relative-netns", 0, env={"CNI_NETNS": "relative"}, command="DEL", add_first=True),
    Case("del-ipam-string", 0, conf_with(ipam="x"), command="DEL", add_first=True),
    Case("del-name-missing", 0, conf_without("name"), command="DEL", add_first=True),
    Case("del-everything-wrong", 0, conf_with(vlan="x", trunk=5, mtu=-1, bridge="", ipam=[], name=None,
                                              ovsdbSocket="unix:/run/openvswitch/db.sock"),
         env={"CNI_ARGS": "x", "CNI_NETNS": None}, command="DEL", add_first=True),
]

# ovs-underlay-ipam, as bridge/macvlan/ptp exec it (its config is theirs, with our ipam section)
IPAM_CASES: list[Case] = [
    Case("ipam-plugin-no-ipam", 7, lambda bed: {"cniVersion": "1.1.0", "name": "n", "type": "bridge"},
         prog="ovs-underlay-ipam"),
    Case("ipam-plugin-bad-subnets", 7, ipam_with(subnets="x"), prog="ovs-underlay-ipam"),
    Case("ipam-plugin-bad-name", 7, conf_with(name="bad name"), prog="ovs-underlay-ipam"),
    Case("ipam-plugin-ip-outside", 102, env={"CNI_ARGS": "IP=10.99.0.5"}, prog="ovs-underlay-ipam"),
    Case("ipam-plugin-socket-nobody", 11, ipam_with(daemonSocket=f"/tmp/nobody-{netbed.TOKEN}.sock"),
         prog="ovs-underlay-ipam"),
    Case("ipam-plugin-status-socket-nobody", 50, ipam_with(daemonSocket=f"/tmp/nobody-{netbed.TOKEN}.sock"),
         command="STATUS", prog="ovs-underlay-ipam"),
    Case("ipam-plugin-gc-without-attachments", 7, command="GC", prog="ovs-underlay-ipam"),
    Case("ipam-plugin-stdin-garbage", 6, raw(b"{nope"), prog="ovs-underlay-ipam"),
    Case("ipam-plugin-check-bad-prev", 6, conf_with(prevResult={"ips": [{"address": "x"}]}), command="CHECK",
         prog="ovs-underlay-ipam"),
    Case("ipam-plugin-fifo-netns", 8, env={"CNI_NETNS": "<fifo>"}, prog="ovs-underlay-ipam"),
    Case("ipam-plugin-del-bad-everything", 0, conf_with(prevResult="x", vlan=5000), env={"CNI_ARGS": "x"},
         command="DEL", prog="ovs-underlay-ipam", add_first=True),
]


# ---------------------------------------------------------------------------------------------
# Running a case and looking for what it left


def run(bed: Bed, prog: str, command: str, conf: dict[str, Any] | bytes, cid: str,
        env: dict[str, str | None]) -> subprocess.CompletedProcess[bytes]:
    e: dict[str, str | None] = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command, "CNI_CONTAINERID": cid,
        "CNI_NETNS": bed.pod.path, "CNI_IFNAME": "eth0", "CNI_PATH": f"{bed.bundle}:{e2e.REFERENCE_PLUGINS}",
        "OVS_UNDERLAY_LOG_FILE": str(bed.log), "OVS_UNDERLAY_WARM": "0"}
    e.update({k: (bed.fifo if v == "<fifo>" else v) for k, v in env.items()})
    data = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
    return subprocess.run([str(bed.bundle / prog)], input=data, capture_output=True, timeout=60,
                          env={k: v for k, v in e.items() if v is not None})


def leftovers(bed: Bed, cid: str) -> list[str]:
    left = [f"link {ln['ifname']} ({ln.get('ifalias')})" for ln in netbed.links()
            if cid in (ln.get("ifalias") or "")]
    left += [f"pod link {ln['ifname']}" for ln in netbed.links(ns=bed.pod.name) if ln["ifname"] != "lo"]
    left += [f"OVS interface {r['name']}" for r in netbed.ovs_rows("Interface", "name", "external_ids")
             if (r.get("external_ids") or {}).get("container_id") == cid]
    # ipamd's probe port for the bed's segment lives as long as ipamd (it is not a pod's).
    probe_ports = {r["name"] for r in netbed.ovs_rows("Port", "name", "external_ids")
                   if (r.get("external_ids") or {}).get("owner") == PROBE_OWNER}
    left += [f"bridge port {p}" for p in netbed.bridge_ports(bed.bridge) if p not in probe_ports]
    with sqlite3.connect(f"file:{bed.db}?mode=ro", uri=True) as db:
        left += [f"lease {ip} ({net})" for net, ip in db.execute(
            "SELECT network, ip FROM entries WHERE state = 'active' AND container_id = ?", (cid,))]
    new_ns = set(os.listdir("/run/netns")) - bed.netns_before - {bed.ipamd.probe_netns}
    left += [f"netns {n}" for n in new_ns if netbed.TOKEN in n]
    return left


def check_case(bed: Bed, case: Case) -> None:
    cid = netbed.container_id("bi")
    conf = case.conf(bed)
    if case.add_first:
        good = base(bed) if case.prog == "ovs-underlay" else ipam(bed)
        added = run(bed, case.prog, "ADD", good, cid, {})
        assert added.returncode == 0, (case.id, added.stdout, added.stderr[-1500:])
    try:
        res = run(bed, case.prog, case.command, conf, cid, case.env)
        out, err = res.stdout.decode(errors="replace"), res.stderr.decode(errors="replace")
        assert "Traceback" not in err and "Traceback" not in out, (case.id, err[-3000:])
        if case.code == HELP:
            assert res.returncode == 0 and out == "" and "CNI" in err, (case.id, out, err[-1500:])
        elif case.code == 0:
            assert res.returncode == 0 and out == "", (case.id, out, err[-1500:])
        else:
            assert res.returncode != 0, (case.id, out)
            assert out.endswith("\n") and out.count("\n") == 1, (case.id, out)
            doc = json.loads(out)
            assert doc.get("code") == case.code, (case.id, doc, err[-1500:])
            assert set(doc) <= {"cniVersion", "code", "msg", "details"} and doc["msg"], (case.id, doc)
        assert leftovers(bed, cid) == [], case.id
    finally:
        if leftovers(bed, cid):  # never let one case disturb the next
            run(bed, case.prog, "DEL", base(bed), cid, {})


ALL = CASES + IPAM_CASES


def test_the_corpus_is_big_enough() -> None:
    assert len(ALL) + len(GRPC_CASES) >= 150
    assert len({x.id for x in ALL}) == len(ALL)


@pytest.mark.parametrize("case", ALL, ids=[x.id for x in ALL])
def test_plugin_bad_input(bed: Bed, case: Case) -> None:
    check_case(bed, case)


# ---------------------------------------------------------------------------------------------
# gRPC requests to the frozen ipamd


POOL = wire.pool_to_pb(parse_ipam({"subnets": [{"subnet": "10.79.0.0/30", "gateway": "10.79.0.1"}]}).pool)


def _alloc(**kw: Any) -> pb.AllocateRequest:
    req: dict[str, Any] = {"network": f"grpc{netbed.TOKEN}", "pool": POOL, "container_id": "cbad", "ifname": "eth0"}
    req.update(kw)
    return pb.AllocateRequest(**req)


def _pool(**subnet: Any) -> pb.PoolSpec:
    return pb.PoolSpec(subnets=[pb.SubnetSpec(**{"subnet": "10.79.0.0/30", **subnet})])


GRPC_CASES: list[tuple[str, str, Any, str, str]] = [  # id, method, request, status, reason
    ("alloc-no-network", "Allocate", _alloc(network=""), "INVALID_ARGUMENT", "INVALID_REQUEST"),
    ("alloc-no-container", "Allocate", _alloc(container_id=""), "INVALID_ARGUMENT", "INVALID_REQUEST"),
    ("alloc-no-ifname", "Allocate", _alloc(ifname=""), "INVALID_ARGUMENT", "INVALID_REQUEST"),
    ("alloc-network-space", "Allocate", _alloc(network="bad name"), "INVALID_ARGUMENT", "INVALID_REQUEST"),
    ("alloc-network-newline", "Allocate", _alloc(network="n\nx"), "INVALID_ARGUMENT", "INVALID_REQUEST"),
    ("alloc-container-invalid", "Allocate", _alloc(container_id="-x"), "INVALID_ARGUMENT", "INVALID_REQUEST"),
    ("alloc-container-long", "Allocate", _alloc(container_id="a" * 300), "INVALID_ARGUMENT", "INVALID_REQUEST"),
    ("alloc-ifname-all", "Allocate", _alloc(ifname="all"), "INVALID_ARGUMENT", "INVALID_REQUEST"),
    ("alloc-ifname-long", "Allocate", _alloc(ifname="a" * 16), "INVALID_ARGUMENT", "INVALID_REQUEST"),
    ("alloc-pool-empty", "Allocate", _alloc(pool=pb.PoolSpec()), "INVALID_ARGUMENT", "INVALID_POOL"),
    ("alloc-pool-cidr", "Allocate", _alloc(pool=_pool(subnet="10.79.0.0/99")), "INVALID_ARGUMENT", "INVALID_POOL"),
    ("alloc-pool-gateway", "Allocate", _alloc(pool=_pool(gateway="10.80.0.1")), "INVALID_ARGUMENT",
     "INVALID_POOL"),
    ("alloc-pool-exclude", "Allocate", _alloc(pool=_pool(exclude=["10.79.0.2..10.79.0.1"])), "INVALID_ARGUMENT",
     "INVALID_POOL"),
    ("alloc-pool-range", "Allocate", _alloc(pool=_pool(range_start="x")), "INVALID_ARGUMENT", "INVALID_POOL"),
    ("alloc-requested-ip-invalid", "Allocate", _alloc(requested_ips=["nope"]), "INVALID_ARGUMENT",
     "INVALID_REQUEST"),
    ("alloc-requested-ip-outside", "Allocate", _alloc(requested_ips=["10.80.0.2"]), "OUT_OF_RANGE",
     "ADDRESS_OUT_OF_POOL"),
    ("alloc-requested-gateway", "Allocate", _alloc(requested_ips=["10.79.0.1"]), "OUT_OF_RANGE",
     "ADDRESS_OUT_OF_POOL"),
    ("alloc-mac-invalid", "Allocate", _alloc(requested_mac="zz"), "INVALID_ARGUMENT", "INVALID_REQUEST"),
    ("alloc-mac-multicast", "Allocate", _alloc(requested_mac="01:00:5e:00:00:01"), "INVALID_ARGUMENT",
     "INVALID_REQUEST"),
    ("alloc-netns-relative", "Allocate", _alloc(netns="relative", conflict_check=True), "INVALID_ARGUMENT",
     "INVALID_REQUEST"),
    ("alloc-pool-changed", "Allocate", _alloc(container_id="c2", pool=_pool(subnet="10.79.1.0/30")),
     "FAILED_PRECONDITION", "POOL_CHANGED"),
    ("alloc-exhausted", "Allocate", _alloc(container_id="c3"), "RESOURCE_EXHAUSTED", "POOL_EXHAUSTED"),
    ("release-no-container", "Release", pb.ReleaseRequest(network="x", ifname="eth0"), "INVALID_ARGUMENT",
     "INVALID_REQUEST"),
    ("release-no-ifname", "Release", pb.ReleaseRequest(network="x", container_id="c"), "INVALID_ARGUMENT",
     "INVALID_REQUEST"),
    ("getlease-unknown", "GetLease", pb.GetLeaseRequest(network="nosuch", container_id="c", ifname="eth0"),
     "NOT_FOUND", "LEASE_NOT_FOUND"),
    ("getlease-no-network", "GetLease", pb.GetLeaseRequest(container_id="c", ifname="eth0"), "INVALID_ARGUMENT",
     "INVALID_REQUEST"),
    ("gc-empty-network", "GarbageCollect", pb.GcRequest(network=""), "INVALID_ARGUMENT", "INVALID_REQUEST"),
    ("probe-no-netns", "ProbeGateway", pb.ProbeGatewayRequest(ifname="eth0", gateway="10.0.0.1"),
     "INVALID_ARGUMENT", "INVALID_REQUEST"),
    ("probe-gateway-invalid", "ProbeGateway", pb.ProbeGatewayRequest(netns="/run/netns/x", ifname="eth0",
                                                                      gateway="x"), "INVALID_ARGUMENT",
     "INVALID_REQUEST"),
    ("probe-ifname-invalid", "ProbeGateway", pb.ProbeGatewayRequest(netns="/run/netns/x", ifname="a/b",
                                                                     gateway="10.0.0.1"), "INVALID_ARGUMENT",
     "INVALID_REQUEST"),
    ("probe-netns-relative", "ProbeGateway", pb.ProbeGatewayRequest(netns="x", ifname="eth0", gateway="10.0.0.1"),
     "INVALID_ARGUMENT", "INVALID_REQUEST"),
    ("probe-netns-own", "ProbeGateway", pb.ProbeGatewayRequest(netns="/proc/self/ns/net", ifname="eth0",
                                                                gateway="10.0.0.1"), "FAILED_PRECONDITION",
     "INVALID_NETNS"),
    ("probe-netns-missing", "ProbeGateway", pb.ProbeGatewayRequest(netns="/nonexistent", ifname="eth0",
                                                                    gateway="10.0.0.1"), "FAILED_PRECONDITION",
     "INVALID_NETNS"),
    ("probe-netns-fifo", "ProbeGateway", pb.ProbeGatewayRequest(netns="<fifo>", ifname="eth0", gateway="10.0.0.1"),
     "FAILED_PRECONDITION", "INVALID_NETNS"),
    ("probe-netns-dev-null", "ProbeGateway", pb.ProbeGatewayRequest(netns="/dev/null", ifname="eth0",
                                                                     gateway="10.0.0.1"), "FAILED_PRECONDITION",
     "INVALID_NETNS"),
]


def _store(bed: Bed) -> tuple[list[Any], list[Any]]:
    with sqlite3.connect(f"file:{bed.db}?mode=ro", uri=True) as db:
        return (db.execute("SELECT * FROM pools ORDER BY network").fetchall(),
                db.execute("SELECT * FROM entries ORDER BY network, ip").fetchall())


def test_grpc_bad_requests(bed: Bed) -> None:
    """One test over the table (the cases share a channel and build on one network: a /30 with
    one address, taken first, so 'exhausted' and 'pool changed' are reachable)."""
    with grpc.insecure_channel(f"unix://{bed.ipamd.socket}") as ch:
        stub = ipam_pb2_grpc.IpamStub(ch)
        stub.Allocate(_alloc(container_id="cgrpc"), timeout=10)  # the /30's one address: now exhausted
        failures = []
        for cid, method, req, status, reason in GRPC_CASES:
            if getattr(req, "netns", "") == "<fifo>":
                req.netns = bed.fifo
            before = _store(bed)
            try:
                getattr(stub, method)(req, timeout=10)
                got: tuple[str, str] = ("OK", "")
            except grpc.RpcError as err:
                got = (err.code().name, dict(err.trailing_metadata() or ()).get(  # type: ignore[attr-defined]
                    "ovs-underlay-reason", ""))
            if got != (status, reason):
                failures.append(f"{cid}: got {got}, expected {(status, reason)}")
            if _store(bed) != before:
                failures.append(f"{cid}: the store changed")
        stub.Release(pb.ReleaseRequest(network=f"grpc{netbed.TOKEN}", container_id="cgrpc", ifname="eth0"),
                     timeout=10)
    assert failures == []
