"""The `ovs-underlay-ipam` verbs through the real skel, with a fake ipamd client.

Every case runs `skel.main` with a dict env and BytesIO (the production edge), so exit code and
the JSON on stdout are what a runtime would see. The client is a recording fake whose answers
and faults each test sets; the "daemon unreachable" cases use the real IpamClient on a socket
that does not exist.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from netaddr import IPAddress, IPNetwork

from cni import ipam_main, ipam_plugin, skel
from cni.errors import Code
from cni.types import CmdArgs, Result
from core.errors import CoreError, IpamdRefused, Unavailable
from core.spec import Allocation, DnsSpec, IpAssignment, PodRef, PoolDef, ProbeResult, RouteSpec
from core.wire import Reason

ROOT = Path(__file__).resolve().parents[2]
SOCK = "/run/ovs-underlay-test/does-not-matter.sock"


def alloc(*addrs: tuple[str, str | None], probed: bool = True, routes: Sequence[RouteSpec] | None = None,
          dns: DnsSpec | None = None) -> Allocation:
    ips = tuple(IpAssignment(IPNetwork(a), IPAddress(g) if g else None) for a, g in addrs)
    if routes is None:
        routes = (RouteSpec(IPNetwork("0.0.0.0/0"), IPAddress("10.1.0.1")),)
    return Allocation("net1", "cid", "eth0", ips, tuple(routes),
                      dns or DnsSpec(nameservers=("10.1.0.53",), search=("corp",)), None, probed)


@dataclass
class Pool:
    network: str
    subnet: str
    used: int
    total: int
    quarantined: int = 0


@dataclass(frozen=True)
class Lease:
    container_id: str
    ifname: str
    ips: tuple[str, ...]


@dataclass
class FakeClient:
    allocation: Allocation = field(default_factory=lambda: alloc(("10.1.0.10/24", "10.1.0.1")))
    probe: ProbeResult = field(default_factory=lambda: ProbeResult(True, "02:00:00:00:00:01", 1.5))
    lease: Allocation | None = None
    healthy: bool = True
    pools: list[Pool] = field(default_factory=list)
    fail: dict[str, Exception] = field(default_factory=dict)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    released: int = 0
    closed: bool = False
    socket: str = ""
    timeout_ms: int = 0

    def _call(self, name: str, kw: dict[str, Any]) -> None:
        self.calls.append((name, kw))
        if name in self.fail:
            raise self.fail[name]

    def names(self) -> list[str]:
        return [n for n, _ in self.calls]

    def kwargs(self, name: str) -> dict[str, Any]:
        return next(kw for n, kw in self.calls if n == name)

    def close(self) -> None:
        self.closed = True

    def allocate(self, *, network: str, pool: PoolDef, container_id: str, ifname: str,
                 pod: PodRef | None = None, requested_ips: Sequence[IPAddress] = (),
                 requested_mac: str | None = None, netns: str | None = None,
                 conflict_check: bool = False, conflict_check_wait_ms: int = 100) -> Allocation:
        self._call("allocate", dict(network=network, pool=pool, container_id=container_id, ifname=ifname,
                                    pod=pod, requested_ips=tuple(requested_ips), netns=netns,
                                    conflict_check=conflict_check, wait=conflict_check_wait_ms))
        return self.allocation

    def release(self, *, network: str, container_id: str, ifname: str) -> list[Lease]:
        self._call("release", dict(network=network, container_id=container_id, ifname=ifname))
        return [Lease(container_id, ifname, ("10.1.0.10/24",))] * self.released

    def get_lease(self, *, network: str, container_id: str, ifname: str) -> Allocation | None:
        self._call("get_lease", dict(network=network, container_id=container_id, ifname=ifname))
        return self.lease

    def gc(self, *, network: str, valid: Sequence[tuple[str, str]]) -> list[Lease]:
        self._call("gc", dict(network=network, valid=list(valid)))
        return [Lease("stale", "eth0", ())]

    def probe_gateway(self, *, netns: str, ifname: str, gateway: IPAddress, sender_ip: IPAddress | None,
                      timeout_ms: int, cache_key: str) -> ProbeResult:
        self._call("probe_gateway", dict(netns=netns, ifname=ifname, gateway=gateway, sender_ip=sender_ip,
                                         timeout_ms=timeout_ms, cache_key=cache_key))
        return self.probe

    def health(self) -> bool:
        self._call("health", {})
        return self.healthy

    def list_pools(self, *, network: str = "") -> list[Pool]:
        self._call("list_pools", dict(network=network))
        return self.pools


@dataclass
class FakeLinks:
    """Pod interface state: 'missing', 'down' or 'up'."""

    state: str = "up"
    calls: list[str] = field(default_factory=list)
    fail_down: bool = False

    def raise_if_down(self, netns: str, ifname: str) -> bool:
        self.calls.append(f"raise {ifname}")
        if self.state == "down":
            self.state = "up"
            return True
        return False

    def set_down(self, netns: str, ifname: str) -> None:
        self.calls.append(f"down {ifname}")
        if self.fail_down:
            raise CoreError("netlink says no")
        self.state = "down"


@pytest.fixture(autouse=True)
def _log_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plugin logs only inside cni.log.LOG_DIR: here, each test's tmp_path."""
    monkeypatch.setattr("cni.log.LOG_DIR", str(tmp_path))


def conf(version: str = "1.1.0", **ipam_extra: Any) -> dict[str, Any]:
    ipam: dict[str, Any] = {"type": "ovs-underlay-ipam", "daemonSocket": SOCK,
                            "subnets": [{"subnet": "10.1.0.0/24", "gateway": "10.1.0.1"}],
                            "routes": [{"dst": "0.0.0.0/0"}], "dns": {"nameservers": ["10.1.0.53"]}}
    ipam.update(ipam_extra)
    # A foreign main plugin's keys (bridge's isGateway, macvlan's master) are not ours to judge.
    return {"cniVersion": version, "name": "net1", "type": "bridge", "bridge": "cni0", "isGateway": False,
            "master": "eth9", "mtu": 0, "ipam": ipam}


def run(command: str, config: dict[str, Any] | None, client: Any, tmp_path: Path, *,
        cni_args: str = "", ifname: str = "eth0", verbs: skel.Verbs | None = None,
        links: FakeLinks | None = None) -> tuple[int, Any]:
    links = links or FakeLinks()

    def factory(sock: str, timeout_ms: int) -> Any:
        client.socket, client.timeout_ms = sock, timeout_ms
        return client

    def bind(verb: Any) -> Any:
        return lambda args: ipam_plugin._run(args, verb, factory, links)

    verbs = verbs or skel.Verbs(add=bind(ipam_plugin.cmd_add), delete=lambda args: ipam_plugin.delete(args, factory),
                                check=bind(ipam_plugin.cmd_check), status=bind(ipam_plugin.cmd_status),
                                gc=bind(ipam_plugin.cmd_gc))
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "cid", "CNI_IFNAME": ifname,
           "CNI_NETNS": "/proc/self/ns/net", "CNI_NETNS_OVERRIDE": "1", "CNI_PATH": "/usr/lib/cni",
           "CNI_ARGS": cni_args, "OVS_UNDERLAY_LOG_FILE": str(tmp_path / "plugin.log")}
    out, err = io.StringIO(), io.StringIO()
    stdin = io.BytesIO(json.dumps(config).encode() if config is not None else b"")
    rc = skel.main(verbs, env=env, stdin=stdin, stdout=out, stderr=err)
    assert "Traceback" not in out.getvalue()
    text = out.getvalue().strip()
    return rc, (json.loads(text) if text else None)


# ---------------------------------------------------------------------------------------------
# ADD


def test_add_result_is_an_ipam_result_in_1_1(tmp_path: Path) -> None:
    c = FakeClient()
    rc, out = run("ADD", conf(), c, tmp_path,
                  cni_args="IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=p1;K8S_POD_UID=u-1")
    assert rc == 0, out
    assert out == {"cniVersion": "1.1.0", "ips": [{"address": "10.1.0.10/24", "gateway": "10.1.0.1"}],
                   "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}],
                   "dns": {"nameservers": ["10.1.0.53"], "search": ["corp"]}}
    kw = c.kwargs("allocate")
    assert kw["network"] == "net1" and kw["container_id"] == "cid" and kw["ifname"] == "eth0"
    assert kw["netns"] == "/proc/self/ns/net" and kw["conflict_check"] is True and kw["wait"] == 100
    assert kw["pod"] == PodRef("ns1", "p1", "u-1")
    assert kw["pool"].subnets[0].subnet == IPNetwork("10.1.0.0/24")
    assert (c.socket, c.timeout_ms) == (SOCK, 10_000) and c.closed
    # gateway probed with the allocated address as sender
    p = c.kwargs("probe_gateway")
    assert p["gateway"] == IPAddress("10.1.0.1") and p["sender_ip"] == IPAddress("10.1.0.10")
    assert p["ifname"] == "eth0" and p["timeout_ms"] == 1000 and "net1" in p["cache_key"]
    assert "release" not in c.names()


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0"])
def test_add_down_converts_for_old_versions(tmp_path: Path, version: str) -> None:
    c = FakeClient(allocation=alloc(("10.1.0.10/24", "10.1.0.1"), ("fd00:1::a/64", "fd00:1::1")))
    rc, out = run("ADD", conf(version), c, tmp_path)
    assert rc == 0, out
    assert out["cniVersion"] == version and "interfaces" not in out
    assert out["ips"] == [{"version": "4", "address": "10.1.0.10/24", "gateway": "10.1.0.1"},
                          {"version": "6", "address": "fd00:1::a/64", "gateway": "fd00:1::1"}]
    assert c.names().count("probe_gateway") == 2


def test_add_1_0_has_no_interface_index(tmp_path: Path) -> None:
    rc, out = run("ADD", conf("1.0.0"), FakeClient(), tmp_path)
    assert rc == 0 and out["cniVersion"] == "1.0.0"
    assert all("interface" not in ip and "version" not in ip for ip in out["ips"])


@pytest.mark.parametrize(("extra", "cni_args", "want"), [
    ({"runtimeConfig": {"ips": ["10.1.0.7/24"]}, "args": {"cni": {"ips": ["10.1.0.8"]}}}, "IP=10.1.0.9",
     ["10.1.0.7"]),
    ({"args": {"cni": {"ips": ["10.1.0.8"]}}}, "IP=10.1.0.9", ["10.1.0.8"]),
    ({}, "IP=10.1.0.9,10.1.0.11", ["10.1.0.9", "10.1.0.11"]),
    ({}, "", []),
])
def test_add_requested_ips_precedence(tmp_path: Path, extra: dict[str, Any], cni_args: str,
                                      want: list[str]) -> None:
    c = FakeClient()
    rc, out = run("ADD", {**conf(), **extra}, c, tmp_path, cni_args=cni_args)
    assert rc == 0, out
    assert [str(ip) for ip in c.kwargs("allocate")["requested_ips"]] == want


def test_add_skips_probes_when_the_interface_is_not_there(tmp_path: Path) -> None:
    """ptp runs IPAM before creating the veth: ipamd reports both probes skipped; ADD succeeds."""
    c = FakeClient(allocation=alloc(("10.1.0.10/24", "10.1.0.1"), probed=False),
                   probe=ProbeResult(False, None, 0.0, skipped=True))
    rc, out = run("ADD", conf(), c, tmp_path)
    assert rc == 0, out
    assert out["ips"][0]["address"] == "10.1.0.10/24"
    assert "release" not in c.names()
    log = (tmp_path / "plugin.log").read_text()
    assert "conflict probe skipped" in log and "gateway probe skipped" in log


def test_add_raises_a_down_interface_for_the_probes_and_restores_it(tmp_path: Path) -> None:
    """bridge/macvlan/ipvlan leave the pod link down until they configure our result."""
    c, links = FakeClient(), FakeLinks("down")
    rc, out = run("ADD", conf(), c, tmp_path, links=links)
    assert rc == 0, out
    assert links.calls == ["raise eth0", "down eth0"] and links.state == "down"
    # restored on failure too, after the lease was released
    c, links = FakeClient(probe=ProbeResult(False, None, 1000.0)), FakeLinks("down")
    rc, out = run("ADD", conf(), c, tmp_path, links=links)
    assert rc == 1 and out["code"] == 103 and links.state == "down"
    # a failing restore is logged, never fails ADD
    c, links = FakeClient(), FakeLinks("down", fail_down=True)
    rc, out = run("ADD", conf(), c, tmp_path, links=links)
    assert rc == 0, out
    assert "could not set eth0 down again" in (tmp_path / "plugin.log").read_text()


@pytest.mark.parametrize("state", ["up", "missing"])
def test_add_leaves_an_up_or_missing_interface_alone(tmp_path: Path, state: str) -> None:
    links = FakeLinks(state)
    rc, out = run("ADD", conf(), FakeClient(), tmp_path, links=links)
    assert rc == 0, out
    assert links.calls == ["raise eth0"] and links.state == state


def test_add_without_probes_does_not_touch_the_link(tmp_path: Path) -> None:
    links = FakeLinks("down")
    rc, out = run("ADD", conf(gatewayCheck=False, conflictCheck=False), FakeClient(), tmp_path, links=links)
    assert rc == 0, out
    assert links.calls == [] and links.state == "down"


def test_add_gateway_unreachable_releases_and_fails_103(tmp_path: Path) -> None:
    c = FakeClient(probe=ProbeResult(False, None, 1000.0))
    rc, out = run("ADD", conf(gatewayCheckTimeoutMs=250), c, tmp_path, ifname="net3")
    assert rc == 1
    assert out["code"] == Code.GATEWAY_UNREACHABLE == 103
    assert "10.1.0.1" in out["msg"] and "net3" in out["msg"] and "250 ms" in out["msg"]
    assert c.names() == ["allocate", "probe_gateway", "release"]
    assert c.kwargs("release") == {"network": "net1", "container_id": "cid", "ifname": "net3"}


def test_add_probe_error_releases_and_keeps_the_error(tmp_path: Path) -> None:
    c = FakeClient(fail={"probe_gateway": Unavailable("ipamd at /x is unreachable")})
    rc, out = run("ADD", conf(), c, tmp_path)
    assert rc == 1 and out["code"] == 11
    assert c.names()[-1] == "release"


def test_add_release_failure_during_rollback_does_not_hide_103(tmp_path: Path) -> None:
    c = FakeClient(probe=ProbeResult(False, None, 1000.0),
                   fail={"release": Unavailable("gone")})
    rc, out = run("ADD", conf(), c, tmp_path)
    assert rc == 1 and out["code"] == 103


def test_add_without_gateway_check_does_not_probe(tmp_path: Path) -> None:
    c = FakeClient(probe=ProbeResult(False, None, 1000.0))
    rc, out = run("ADD", conf(gatewayCheck=False, conflictCheck=False), c, tmp_path)
    assert rc == 0, out
    assert "probe_gateway" not in c.names() and c.kwargs("allocate")["conflict_check"] is False


def test_add_allocation_errors_pass_through(tmp_path: Path) -> None:
    for reason, code in ((Reason.POOL_EXHAUSTED, Code.POOL_EXHAUSTED), (Reason.ADDRESS_TAKEN, Code.ADDRESS_UNAVAILABLE),
                         (Reason.ADDRESS_OUT_OF_POOL, Code.ADDRESS_UNAVAILABLE),
                         (Reason.ADDRESS_CONFLICT, Code.ADDRESS_CONFLICT), (Reason.POOL_CHANGED, 7),
                         ("SOMETHING_NEWER", Code.INTERNAL)):
        c = FakeClient(fail={"allocate": IpamdRefused(reason, f"boom {reason}")})
        rc, out = run("ADD", conf(), c, tmp_path)
        assert rc == 1 and out["code"] == code and out["msg"] == f"boom {reason}"
        assert c.names() == ["allocate"]


def test_add_bad_config_is_code_7_before_any_call(tmp_path: Path) -> None:
    c = FakeClient()
    rc, out = run("ADD", {k: v for k, v in conf().items() if k != "ipam"}, c, tmp_path)
    assert rc == 1 and out["code"] == 7 and "ipam" in out["msg"]
    rc, out = run("ADD", conf(subnets=[{"subnet": "10.1.0.0/24", "gateway": "10.2.0.1"}]), c, tmp_path)
    assert rc == 1 and out["code"] == 7 and "10.2.0.1" in out["msg"]
    rc, out = run("ADD", conf(), c, tmp_path, cni_args="IP=10.1.0.300")
    assert rc == 1 and out["code"] == 7
    assert c.calls == []


# ---------------------------------------------------------------------------------------------
# daemon unreachable: the real client on a socket nobody listens on


def test_daemon_unreachable_add_and_del_fail_11_naming_the_socket(tmp_path: Path) -> None:
    sock = str(tmp_path / "nobody.sock")
    # no probes: the real link driver must never touch this process's own netns
    cfg = conf(daemonSocket=sock, timeoutMs=2000, conflictCheck=False, gatewayCheck=False)
    for command in ("ADD", "DEL"):
        out_io = io.StringIO()
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "cid", "CNI_IFNAME": "ouzz0",
               "CNI_NETNS": "/proc/self/ns/net", "CNI_NETNS_OVERRIDE": "1", "CNI_PATH": "/x",
               "OVS_UNDERLAY_LOG_FILE": str(tmp_path / "plugin.log")}
        rc = skel.main(ipam_main.VERBS, env=env, stdin=io.BytesIO(json.dumps(cfg).encode()), stdout=out_io,
                       stderr=io.StringIO())
        out = json.loads(out_io.getvalue())
        assert rc == 1 and out["code"] == Code.TRY_AGAIN_LATER, out
        assert sock in out["msg"]


def test_status_daemon_unreachable_is_50(tmp_path: Path) -> None:
    sock = str(tmp_path / "nobody.sock")
    out_io = io.StringIO()
    env = {"CNI_COMMAND": "STATUS", "CNI_PATH": "/x", "OVS_UNDERLAY_LOG_FILE": str(tmp_path / "p.log")}
    rc = skel.main(ipam_main.VERBS, env=env, stdin=io.BytesIO(json.dumps(conf(daemonSocket=sock)).encode()),
                   stdout=out_io, stderr=io.StringIO())
    out = json.loads(out_io.getvalue())
    assert rc == 1 and out["code"] == Code.NOT_AVAILABLE and sock in out["msg"]


# ---------------------------------------------------------------------------------------------
# DEL / CHECK / GC / STATUS


def test_del_releases_and_is_idempotent(tmp_path: Path) -> None:
    c = FakeClient(released=0)
    rc, out = run("DEL", conf(), c, tmp_path, ifname="net1")
    assert rc == 0 and out is None
    assert c.calls == [("release", {"network": "net1", "container_id": "cid", "ifname": "net1"})]


def test_del_with_a_config_that_no_longer_validates_still_releases(tmp_path: Path) -> None:
    c = FakeClient()
    rc, out = run("DEL", conf(subnets="not-a-cidr"), c, tmp_path)
    assert rc == 0, out
    assert c.names() == ["release"] and c.socket == SOCK


@pytest.mark.parametrize(("why", "cfg", "cni_args"), [
    ("unknown ipam key", conf(excludeIpz=["10.1.0.5"]), ""),
    ("bad prevResult", {**conf(), "prevResult": {"ips": "not-a-list"}}, ""),
    ("bad CNI_ARGS", conf(), "garbage-without-equals"),
    ("bad static IP", conf(), "IP=10.9.9.9.9"),
    ("bad runtimeConfig", {**conf(), "runtimeConfig": "nope"}, ""),
    ("bad timeoutMs", conf(timeoutMs="fast"), ""),
])
def test_del_releases_by_identity_whatever_else_is_wrong(tmp_path: Path, why: str, cfg: dict[str, Any],
                                                         cni_args: str) -> None:
    """Issue 11 item 5: DEL used to parse the whole config, so any of these made it fail (7, 4
    or 6) and release nothing, and kubelet retried it forever. It reads only the name and the
    socket now."""
    c = FakeClient()
    rc, out = run("DEL", cfg, c, tmp_path, cni_args=cni_args)
    assert rc == 0, (why, out)
    assert c.calls == [("release", {"network": "net1", "container_id": "cid", "ifname": "eth0"})]
    assert c.socket == SOCK and c.timeout_ms == 10_000


def test_del_without_a_usable_name_releases_in_every_network(tmp_path: Path) -> None:
    c = FakeClient()
    rc, out = run("DEL", {**conf(), "name": "bad name/with slash"}, c, tmp_path)
    assert rc == 0, out
    assert c.calls == [("release", {"network": "", "container_id": "cid", "ifname": "eth0"})]


def test_del_with_a_bad_socket_falls_back_to_the_default(tmp_path: Path) -> None:
    c = FakeClient()
    rc, out = run("DEL", conf(daemonSocket="relative.sock"), c, tmp_path)
    assert rc == 0, out
    assert c.names() == ["release"] and c.socket == "/run/ovs-underlay/ipamd.sock"


def test_check_ok_missing_and_mismatch(tmp_path: Path) -> None:
    prev = {"cniVersion": "1.1.0", "interfaces": [{"name": "eth0", "sandbox": "/x"}],
            "ips": [{"address": "10.1.0.10/24", "gateway": "10.1.0.1", "interface": 0}]}
    c = FakeClient(lease=alloc(("10.1.0.10/24", "10.1.0.1")))
    rc, out = run("CHECK", {**conf(), "prevResult": prev}, c, tmp_path)
    assert rc == 0, out
    rc, out = run("CHECK", conf(), c, tmp_path)  # no prevResult: the lease must exist
    assert rc == 0, out

    # 10.1.0.6/24 == 10.1.0.10/24 for netaddr (same network): must still be a mismatch
    c = FakeClient(lease=alloc(("10.1.0.6/24", "10.1.0.1")))
    rc, out = run("CHECK", {**conf(), "prevResult": prev}, c, tmp_path)
    assert rc == 1 and out["code"] == Code.INTERNAL
    assert "10.1.0.10/24 is in prevResult but not leased" in out["msg"]
    assert "10.1.0.6/24 is leased but not in prevResult" in out["msg"]

    c = FakeClient(lease=None)
    rc, out = run("CHECK", {**conf(), "prevResult": prev}, c, tmp_path)
    assert rc == 1 and out["code"] == Code.INTERNAL and "no ipamd lease" in out["msg"]
    assert c.names() == ["get_lease"]


def test_check_needs_0_4_0(tmp_path: Path) -> None:
    rc, out = run("CHECK", conf("0.3.1"), FakeClient(), tmp_path)
    assert rc == 1 and out["code"] == Code.INCOMPATIBLE_VERSION


def test_gc_accepts_both_keys(tmp_path: Path) -> None:
    c = FakeClient()
    cfg = {**conf(), "cni.dev/valid-attachments": [{"containerID": "a", "ifname": "eth0"}],
           "cni.dev/attachments": [{"containerID": "a", "ifname": "eth0"}, {"containerID": "b", "ifname": "n1"}]}
    rc, out = run("GC", cfg, c, tmp_path)
    assert rc == 0, out
    assert c.calls == [("gc", {"network": "net1", "valid": [("a", "eth0"), ("b", "n1")]})]


def test_gc_without_attachment_list_refuses(tmp_path: Path) -> None:
    c = FakeClient()
    rc, out = run("GC", conf(), c, tmp_path)
    assert rc == 1 and out["code"] == Code.INVALID_NETWORK_CONFIG and "valid-attachments" in out["msg"]
    assert c.calls == []
    rc, out = run("GC", {**conf(), "cni.dev/valid-attachments": []}, c, tmp_path)
    assert rc == 0 and c.calls == [("gc", {"network": "net1", "valid": []})]


def test_status(tmp_path: Path) -> None:
    c = FakeClient(pools=[Pool("net1", "10.1.0.0/24", 10, 253, 1)])
    assert run("STATUS", conf(), c, tmp_path) == (0, None)
    assert c.kwargs("list_pools") == {"network": "net1"}

    rc, out = run("STATUS", conf(), FakeClient(healthy=False), tmp_path)
    assert rc == 1 and out["code"] == 50 and SOCK in out["msg"]

    c = FakeClient(fail={"health": Unavailable(f"ipamd at {SOCK} is unreachable")})
    rc, out = run("STATUS", conf(), c, tmp_path)
    assert rc == 1 and out["code"] == 50 and SOCK in out["msg"]

    c = FakeClient(pools=[Pool("net1", "10.1.0.0/24", 250, 253, 3), Pool("net1", "fd00::/64", 1, 2**16)])
    rc, out = run("STATUS", conf(), c, tmp_path)
    assert rc == 1 and out["code"] == 50 and "10.1.0.0/24" in out["msg"] and "fd00" not in out["msg"]


def test_status_and_gc_need_1_1_0(tmp_path: Path) -> None:
    for command in ("STATUS", "GC"):
        rc, out = run(command, conf("1.0.0"), FakeClient(), tmp_path)
        assert rc == 1 and out["code"] == Code.INCOMPATIBLE_VERSION


# ---------------------------------------------------------------------------------------------
# entry point


def test_version_and_lean_import() -> None:
    out_io = io.StringIO()
    rc = skel.main(ipam_main.VERBS, env={"CNI_COMMAND": "VERSION"}, stdin=io.BytesIO(b""), stdout=out_io)
    assert rc == 0
    assert json.loads(out_io.getvalue())["supportedVersions"] == ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
    code = ("import sys, cni.ipam_main; heavy = [m for m in ('grpc', 'netaddr', 'pyroute2', 'core.ipamd_client', "
            "'cni.ipam_plugin') if m in sys.modules]; print(heavy)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert res.stdout.strip() == "[]"


def test_result_model_shape_directly() -> None:
    r = ipam_plugin.to_result("1.1.0", alloc(("10.1.0.10/24", None), routes=(), dns=DnsSpec()))
    assert isinstance(r, Result) and r.interfaces == ()
    assert r.to_json() == {"cniVersion": "1.1.0", "ips": [{"address": "10.1.0.10/24"}], "dns": {}}


def test_parse_conf_reuses_netconf_channels() -> None:
    cfg = {**conf(), "runtimeConfig": {"ips": ["10.1.0.7"]}}
    args = CmdArgs("ADD", "cid", "/x", "eth0", "K8S_POD_NAME=p;K8S_POD_NAMESPACE=n", (), b"", cfg, "1.1.0")
    pc = ipam_plugin.parse_conf(args)
    assert pc.network == "net1" and pc.pod == PodRef("n", "p", "")
    assert pc.requested_ips == (IPAddress("10.1.0.7"),) and pc.ipam.daemon_socket == SOCK
    assert pc.cache_key == "net1|bridge|cni0|0"
