"""ipamd/reconcile.py over fakes: the real Allocator on the in-memory store with a fake clock, a
fake OVSDB (ports by name, with row uuids), a fake host netns (links by name, with ifindexes) and a
table of netns states. What each rule frees, what it never frees, the re-checks that close the
races, dry runs, the plug-in step list, logs and metrics. The kernel and OVS side is in
tests/integration/test_reconcile.py."""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from netaddr import IPNetwork

from core.errors import CoreError, Unavailable
from core.names import host_alias, host_ifname
from core.netlink import HostLink
from core.netns import NetnsState
from core.spec import PoolDef, parse_ipam
from core.vswitch import PortInfo
from ipamd.allocator import Allocator, Request
from ipamd.cli import _parser
from ipamd.config import DaemonConfigError, load
from ipamd.errors import ReconcileFailed
from ipamd.metrics import Metrics
from ipamd.model import Entry
from ipamd.reconcile import (
    DEFERRED,
    DONE,
    FAILED,
    KEPT,
    SKIPPED,
    WOULD,
    Action,
    Links,
    Pass,
    Ports,
    Reconciler,
    default_steps,
)
from ipamd.store import MemoryStore

ROOT = Path(__file__).resolve().parents[2]
SOCK = "/run/ovs-underlay/ipamd.sock"
POOL: PoolDef = parse_ipam({"subnets": [{"subnet": "10.9.0.0/24"}]}).pool
_uuids = itertools.count(1)
_indexes = itertools.count(100)


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


@dataclass
class FakeOvs:
    ports: dict[str, PortInfo] = field(default_factory=dict)
    fail_list: bool = False
    fail_delete: bool = False
    deleted: list[str] = field(default_factory=list)

    def find_ports(self, want: Mapping[str, str]) -> list[PortInfo]:
        if self.fail_list:
            raise Unavailable("OVSDB at unix:/nowhere is unreachable")
        return [p for p in self.ports.values() if all(p.iface_ids.get(k) == v for k, v in want.items())]

    def get_port(self, name: str) -> PortInfo | None:
        return self.ports.get(name)

    def delete_port_if(self, name: str, port_uuid: str) -> bool:
        if self.fail_delete:
            raise CoreError("OVSDB transaction failed")
        p = self.ports.get(name)
        if p is None or p.uuid != port_uuid:
            return False
        del self.ports[name]
        self.deleted.append(name)
        return True

    def close(self) -> None:
        pass


@dataclass
class FakeHost:
    links: dict[str, HostLink] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)

    def host_links(self, alias_prefix: str) -> list[HostLink]:
        return [ln for ln in self.links.values() if ln.alias.startswith(alias_prefix)]

    def host_link_alias(self, name: str) -> str | None:
        ln = self.links.get(name)
        return None if ln is None else ln.alias

    def delete_host_link(self, name: str, alias: str, index: int | None = None) -> bool:
        ln = self.links.get(name)
        if ln is None or ln.alias != alias or (index is not None and ln.index != index):
            return False
        del self.links[name]
        self.deleted.append(name)
        return True

    def close(self) -> None:
        pass


@dataclass
class Node:
    """A node as the reconciler sees it, plus helpers that play ADD, DEL and crashes."""

    clock: Clock = field(default_factory=Clock)
    store: MemoryStore = field(default_factory=MemoryStore)
    ovs: FakeOvs = field(default_factory=FakeOvs)
    host: FakeHost = field(default_factory=FakeHost)
    netns: dict[str, NetnsState] = field(default_factory=dict)
    metrics: Metrics = field(default_factory=Metrics)
    grace_s: float = 300
    alloc: Allocator = field(init=False)
    rec: Reconciler = field(init=False)

    def __post_init__(self) -> None:
        self.alloc = Allocator(self.store, clock=self.clock)
        self.rec = Reconciler(self.alloc, self.metrics, grace_s=self.grace_s, ipamd_socket=SOCK,
                              tools=lambda: (self.ovs, self.host), state_of=self.state,
                              clock=self.clock)

    def state(self, path: str) -> NetnsState:
        return self.netns.get(path, NetnsState.GONE)

    # -- what ADD makes, step by step -------------------------------------------------------------

    def make_netns(self, cid: str) -> str:
        path = f"/run/netns/{cid}"
        self.netns[path] = NetnsState.PRESENT
        return path

    def make_veth(self, cid: str, ifname: str = "eth0") -> HostLink:
        ln = HostLink(host_ifname(cid, ifname), next(_indexes), host_alias(cid, ifname), "veth")
        self.host.links[ln.name] = ln
        return ln

    def make_port(self, cid: str, netns: str, ifname: str = "eth0", **ids: str) -> PortInfo:
        owner = {"owner": "ovs-underlay", "container_id": cid, "ifname": ifname}
        p = PortInfo(host_ifname(cid, ifname), "br0", 100, (), "access", owner,
                     {**owner, "netns": netns, "network": "n1", **ids}, 7, uuid=f"uuid-{next(_uuids)}")
        self.ovs.ports[p.name] = p
        return p

    def lease(self, cid: str, netns: str, ifname: str = "eth0", network: str = "n1") -> list[str]:
        g = self.alloc.allocate(Request(network=network, pool=POOL, container_id=cid, ifname=ifname, netns=netns))
        return [str(e.ip) for e in g.entries]

    def add(self, cid: str, ifname: str = "eth0") -> str:
        """A whole ADD of the main plugin: netns, veth, port, lease."""
        ns = self.make_netns(cid)
        self.make_veth(cid, ifname)
        self.make_port(cid, ns, ifname)
        self.lease(cid, ns, ifname)
        return ns

    def pod_gone(self, cid: str, ifname: str = "eth0") -> None:
        """The runtime removed the netns; the kernel took the veth pair with it. No DEL came."""
        self.netns[f"/run/netns/{cid}"] = NetnsState.GONE
        self.host.links.pop(host_ifname(cid, ifname), None)

    def live(self) -> set[str]:
        return {e.container_id for e in self.store.list_entries()}

    def later(self, seconds: float) -> None:
        self.clock.t += seconds


def outcomes(report: object, step: str | None = None) -> list[tuple[str, str, str]]:
    return [(a.step, a.outcome, a.container_id) for a in report.actions  # type: ignore[attr-defined]
            if step is None or a.step == step]


# ---- leases --------------------------------------------------------------------------------------


def test_a_gone_pod_loses_its_port_then_its_lease_in_one_pass_after_the_grace() -> None:
    n = Node()
    n.add("alive")
    n.add("dead")
    n.pod_gone("dead")
    r = n.rec.run()
    # the port goes at once (netns and veth gone); the lease waits for the grace period
    assert outcomes(r) == [("port", DONE, "dead"), ("lease", DEFERRED, "dead")]
    assert n.ovs.deleted == [host_ifname("dead", "eth0")] and n.live() == {"alive", "dead"}
    n.later(301)
    r = n.rec.run()
    assert outcomes(r) == [("lease", DONE, "dead")]
    assert n.live() == {"alive"}
    assert "netns /run/netns/dead is gone" in r.actions[0].reason


def test_grace_zero_on_demand_frees_everything_at_once_and_the_next_pass_has_nothing_to_do() -> None:
    n = Node()
    n.add("dead")
    n.pod_gone("dead")
    r = n.rec.run(grace_s=0)
    assert outcomes(r) == [("port", DONE, "dead"), ("lease", DONE, "dead")]
    assert n.live() == set() and n.ovs.ports == {}
    assert n.rec.run(grace_s=0).actions == ()


def test_a_lease_of_a_delegating_main_plugin_is_judged_by_its_netns_alone() -> None:
    n = Node()
    ns = n.make_netns("bridged")  # ovs-underlay-ipam under bridge: no port, no veth of ours
    n.lease("bridged", ns, "net1")
    assert n.rec.run(grace_s=0).actions == ()  # netns present: alive, not even reported
    n.netns[ns] = NetnsState.GONE
    assert outcomes(n.rec.run(grace_s=0)) == [("lease", DONE, "bridged")]


@pytest.mark.parametrize(("netns", "state"), [("/run/netns/x", NetnsState.UNKNOWN), ("", None)])
def test_a_lease_whose_netns_cannot_be_judged_is_kept_and_said_so(netns: str, state: NetnsState | None) -> None:
    n = Node()
    if state is not None:
        n.netns[netns] = state
    n.lease("c1", netns)
    r = n.rec.run(grace_s=0)
    assert outcomes(r) == [("lease", KEPT, "c1")] and n.live() == {"c1"}
    assert ("not a network namespace" in r.actions[0].reason if netns else "no netns recorded" in r.actions[0].reason)


def test_a_lease_with_its_port_or_its_veth_is_alive_whatever_its_netns_path_says() -> None:
    n = Node()
    n.add("portonly")
    n.host.links.pop(host_ifname("portonly", "eth0"))  # port left, veth gone, netns present
    n.add("held")
    n.netns["/run/netns/held"] = NetnsState.GONE  # path removed, but the veth lives: netns held
    assert n.rec.run(grace_s=0).actions == ()
    assert n.live() == {"portonly", "held"}


def test_dry_run_reports_what_would_be_done_and_changes_nothing() -> None:
    n = Node()
    n.add("dead")
    n.pod_gone("dead")
    r = n.rec.run(dry_run=True, grace_s=0)
    assert r.dry_run and outcomes(r) == [("port", WOULD, "dead"), ("lease", WOULD, "dead")]
    assert n.live() == {"dead"} and host_ifname("dead", "eth0") in n.ovs.ports


def test_another_nodes_lease_is_never_touched() -> None:
    """With a cluster store (etcd) the store lists every node's leases; the reconciler sees only
    this node's (Allocator.node_leases, as GC)."""

    class Cluster:  # only what the allocator touches when it is built and when it lists leases
        node = "n1"

        def subscribe(self, listener: object) -> None:
            pass

    n = Node()
    n.alloc = Allocator(n.store, clock=n.clock, node="n1", cluster=Cluster())  # type: ignore[arg-type]
    n.rec.allocator = n.alloc
    for cid, node, ip in (("theirs", "n2", "10.9.0.20"), ("mine", "n1", "10.9.0.21")):
        n.store.reserve([Entry(network="n1", address=IPNetwork(f"{ip}/24"), subnet_index=0, container_id=cid,
                               ifname="eth0", netns=f"/run/netns/{cid}", created_ms=1, node=node)])
    assert outcomes(n.rec.run(grace_s=0)) == [("lease", DONE, "mine")]
    assert n.live() == {"theirs"}


# ---- the races -----------------------------------------------------------------------------------


def test_a_lease_granted_after_the_snapshot_is_never_released() -> None:
    """A pass judged the old lease; before it acts, DEL released it and a new ADD of the same
    attachment (same container id and ifname, e.g. a retried sandbox) got a new one."""
    n = Node()
    ns = n.make_netns("c1")
    n.lease("c1", ns)
    n.netns[ns] = NetnsState.GONE
    n.later(400)

    class Interleave:
        name = "interleave"

        def run(self, p: Pass) -> None:  # runs after the snapshot, before the lease step acts
            n.alloc.release("n1", "c1", "eth0")
            n.later(1)
            n.lease("c1", ns)

    n.rec.steps = [Interleave(), *default_steps(n.rec._ours)]
    r = n.rec.run(grace_s=300)
    assert outcomes(r, "lease") == [("lease", SKIPPED, "c1")]
    assert n.live() == {"c1"}


def test_the_last_check_under_the_allocators_lock_sees_an_add_in_flight() -> None:
    """The re-check outside the lock passed; by the time the release is decided the ADD of a
    new pod with the same attachment has made its veth: refused."""
    n = Node()
    ns = n.make_netns("c1")
    n.lease("c1", ns)
    n.netns[ns] = NetnsState.GONE
    real = n.alloc.release_stale

    def racing(network: str, cid: str, ifname: str, *, created_before_ms: int,
               still_gone: Callable[[], bool]) -> list[Entry]:
        n.netns[ns] = NetnsState.PRESENT
        n.make_veth("c1")
        return real(network, cid, ifname, created_before_ms=created_before_ms, still_gone=still_gone)

    n.alloc.release_stale = racing  # type: ignore[method-assign]
    assert outcomes(n.rec.run(grace_s=0)) == [("lease", SKIPPED, "c1")]
    assert n.live() == {"c1"}


def test_a_port_replaced_since_the_snapshot_is_not_deleted() -> None:
    n = Node()
    n.add("c1")
    n.pod_gone("c1")

    class Replace:
        name = "replace"

        def run(self, p: Pass) -> None:  # a new ADD of the same attachment replaced the row
            n.make_port("c1", "/run/netns/c1")

    n.rec.steps = [Replace(), *default_steps(n.rec._ours)]
    r = n.rec.run(grace_s=0)
    assert outcomes(r, "port") == [("port", SKIPPED, "c1")]
    assert host_ifname("c1", "eth0") in n.ovs.ports


# ---- veths ---------------------------------------------------------------------------------------


def test_a_portless_veth_goes_only_after_the_grace_and_a_recreated_one_starts_over() -> None:
    n = Node()
    n.make_netns("crashed")
    first = n.make_veth("crashed")  # ADD killed between the veth and the port
    r = n.rec.run()
    assert outcomes(r) == [("veth", DEFERRED, "crashed")]
    assert "no OVS port for 0s of a grace of 300s" in r.actions[0].reason
    n.later(250)
    # a new ADD of the same attachment re-created it (same name and alias, new ifindex)
    del n.host.links[first.name]
    second = n.make_veth("crashed")
    n.later(100)
    r = n.rec.run()  # 350 s after the first sighting, but this link was first seen now
    assert outcomes(r) == [("veth", DEFERRED, "crashed")]
    n.later(299)
    assert outcomes(n.rec.run()) == [("veth", DEFERRED, "crashed")]
    n.later(1)
    assert outcomes(n.rec.run()) == [("veth", DONE, "crashed")]
    assert n.host.deleted == [second.name] and n.host.links == {}


def test_a_portless_veth_whose_attachment_holds_a_lease_is_a_live_pod_and_is_kept() -> None:
    n = Node()
    n.add("c1")
    n.ovs.ports.clear()  # the OVS database was reset: every port is gone
    r = n.rec.run(grace_s=0)
    assert outcomes(r) == [("veth", KEPT, "c1")]
    assert "lost its port" in r.actions[0].reason
    assert n.host.deleted == [] and n.live() == {"c1"}


def test_a_veth_recreated_between_judgment_and_delete_is_left_alone() -> None:
    n = Node()
    ln = n.make_veth("c1")

    class Recreate:
        name = "recreate"

        def run(self, p: Pass) -> None:
            del n.host.links[ln.name]
            n.make_veth("c1")

    n.rec.steps = [Recreate(), *default_steps(n.rec._ours)]
    assert outcomes(n.rec.run(grace_s=0), "veth") == [("veth", SKIPPED, "c1")]
    assert ln.name in n.host.links


# ---- scope, failures, plug-ins, logs and metrics --------------------------------------------------


def test_ports_of_another_ipamd_are_left_to_it() -> None:
    n = Node()
    n.make_port("c1", "/run/netns/c1", ipamd_socket="/run/other/ipamd.sock")
    n.make_port("c2", "/run/netns/c2", ipamd_socket=SOCK)
    assert outcomes(n.rec.run(grace_s=0)) == [("port", DONE, "c2")]
    assert list(n.ovs.ports) == [host_ifname("c1", "eth0")]


def test_a_failed_action_is_reported_and_the_pass_goes_on() -> None:
    n = Node()
    n.add("c1")
    n.pod_gone("c1")
    n.ovs.fail_delete = True
    r = n.rec.run(grace_s=0)
    assert outcomes(r) == [("port", FAILED, "c1")]  # the port is still there: the lease stays
    assert r.actions[0].detail == "OVSDB transaction failed"
    n.ovs.fail_delete = False
    assert outcomes(n.rec.run(grace_s=0)) == [("port", DONE, "c1"), ("lease", DONE, "c1")]


def test_a_pass_that_cannot_list_ovs_acts_on_nothing() -> None:
    n = Node()
    n.add("c1")
    n.pod_gone("c1")
    n.ovs.fail_list = True
    with pytest.raises(ReconcileFailed, match="unreachable"):
        n.rec.run(grace_s=0)
    assert n.live() == {"c1"}
    assert 'ipamd_reconcile_runs_total{result="failed",trigger="request"} 1' in n.metrics.render()


def test_a_plugged_step_runs_after_the_others_and_sees_what_they_removed() -> None:
    n = Node()
    n.add("alive")
    n.add("dead")
    n.pod_gone("dead")
    lsps = {"alive", "dead"}

    class Lsp:
        name = "lsp"

        def run(self, p: Pass) -> None:
            for cid in sorted(lsps):
                if p.present(cid, "eth0") or p.leased(cid, "eth0"):
                    continue
                p.act(Action(self.name, f"lsp-{cid}", cid, "eth0", "attachment gone"),
                      lambda cid=cid: lsps.discard(cid) is None)

    n.rec.steps.append(Lsp())
    r = n.rec.run(grace_s=0)
    assert outcomes(r) == [("port", DONE, "dead"), ("lease", DONE, "dead"), ("lsp", DONE, "dead")]
    assert lsps == {"alive"}


def test_every_action_gets_a_log_line_and_a_metric(caplog: pytest.LogCaptureFixture) -> None:
    n = Node()
    n.add("dead")
    n.pod_gone("dead")
    with caplog.at_level(logging.INFO, logger="ipamd.reconcile"):
        n.rec.run(grace_s=0, trigger="periodic")
    lines = [r.getMessage() for r in caplog.records]
    assert any("step=port outcome=done" in m and "container_id=dead" in m for m in lines)
    assert any("step=lease outcome=done" in m and "container_id=dead" in m for m in lines)
    text = n.metrics.render()
    assert 'ipamd_reconcile_actions_total{outcome="done",step="port"} 1' in text
    assert 'ipamd_reconcile_actions_total{outcome="done",step="lease"} 1' in text
    assert 'ipamd_reconcile_runs_total{result="ok",trigger="periodic"} 1' in text
    assert "ipamd_reconcile_last_success_timestamp_seconds 1e+06" in text


def test_the_fakes_satisfy_the_protocols() -> None:
    ports: Ports = FakeOvs()
    links: Links = FakeHost()
    assert ports.find_ports({}) == [] and links.host_links("x") == []


# ---- config and command line -------------------------------------------------------------------------


def test_config_keys_flags_and_the_example(tmp_path: Path) -> None:
    cfg = load(str(ROOT / "conf-examples" / "ipamd.json"), {})
    assert (cfg.reconcile_interval_seconds, cfg.reconcile_grace_seconds, cfg.ovsdb_socket) == (
        60, 300, "unix:/run/openvswitch/db.sock")
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"reconcileIntervalSeconds": 0, "reconcileGraceSeconds": 0, "ovsdbSocket": "unix:/x"}))
    cfg = load(str(p), {"reconcile_grace_seconds": 7})
    assert (cfg.reconcile_interval_seconds, cfg.reconcile_grace_seconds, cfg.ovsdb_socket) == (0, 7, "unix:/x")
    for bad in ({"reconcileGraceSeconds": -1}, {"reconcileIntervalSeconds": "1m"}, {"ovsdbSocket": "/run/db.sock"}):
        p.write_text(json.dumps(bad))
        with pytest.raises(DaemonConfigError):
            load(str(p), {})
    with pytest.raises(DaemonConfigError, match="reconcileGraceSeconds"):
        load(None, {"reconcile_grace_seconds": -5})
    args = _parser().parse_args(["serve", "--reconcile-interval", "0", "--reconcile-grace", "0",
                                 "--ovsdb", "unix:/y"])
    assert (args.reconcile_interval, args.reconcile_grace, args.ovsdb) == (0, 0, "unix:/y")
    args = _parser().parse_args(["reconcile", "--dry-run", "--grace-seconds", "0", "-o", "json"])
    assert (args.dry_run, args.grace_seconds, args.output, args.timeout_ms) == (True, 0, "json", 60_000)
    args = _parser().parse_args(["reconcile"])
    assert (args.dry_run, args.grace_seconds) == (False, None)
