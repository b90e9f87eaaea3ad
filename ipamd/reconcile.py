"""The node reconciler: frees what gone pods left on this node: leases, OVS ports, host veths.

Why (PRIOR_ART 5, rows 1 and 4): DEL is missed after a node crash or a forced delete, Multus
gives up a DEL whose cache is gone and never sends CNI GC to secondary networks, so without a
reconciler every such pod leaks its address, its OVS port and sometimes its veth, forever. ipamd
runs it periodically (`--reconcile-interval`, first pass at start) and on demand
(`ovs-underlay-ipamd reconcile [--dry-run] [--grace-seconds N]`, the Reconcile RPC).

A pass lists, in this order: this node's live leases, our OVS ports (every bridge), our host
veths (core.orphans.scan; what is "ours" is defined there). Then its steps judge and act, each
through `Pass.act`, which re-checks, acts (or only reports, in a dry run), logs one line and
counts `ipamd_reconcile_actions_total{step,outcome}`:
- port: our port whose netns (recorded at ADD) is not there any more AND whose veth is gone
  (core.orphans.dead_ports). Removed. While its veth exists the pod's netns is alive (a veth
  pair dies with its netns), so a port is never removed under a live pod.
- veth: our host veth without a port (core.orphans.portless_veths) that stayed so for the grace
  period (a veth has no birth time: the reconciler remembers when it first saw it portless) and
  whose attachment holds no lease. Removed, by ifindex. A portless veth whose attachment holds a
  lease is a live pod that lost its port (an OVS database reset): kept, and said so.
- lease: the attachment has no OVS port and no veth of ours on this node, its netns is GONE
  (core.netns.netns_state: a missing path whose place we can see) and it was granted longer ago
  than the grace period. Released. "Gone" is judged from the netns alone for leases of delegating
  main plugins (ovs-underlay-ipam under bridge or macvlan has no port or veth of ours), so a
  netns we cannot judge (a path that exists but is not a netns, e.g. /run/netns mounted into
  our container without propagation; no netns recorded) is never taken as gone: kept, and said so.
- plugged steps (`Reconciler(steps=[*default_steps(), ...])`): more kinds of leftovers, e.g.
  OVN logical switch ports of this node's gone attachments (core.ovn.gc_logical_ports with
  keep = `Pass.present` or `Pass.leased`). A step is an object with a `name` and `run(p: Pass)`
  that calls `p.act(Action(...), do)` for each candidate, `do` re-checking and acting and
  returning whether it acted; `p.note` reports a candidate left alone. The steps run in list
  order, so a plugged step after "lease" sees this pass's removals in `Pass.present`.

What it never touches: another node's leases (with the etcd store every lease records its node
and only this node's are listed: Allocator.node_leases, as for GC), OVS rows without
owner=ovs-underlay, links without our alias and name, and ports that record another ipamd's
socket (`_ours`): on a node with two ipamds each reconciles its own.

Race safety: it must never free anything that an ADD in flight or a live pod needs. The
argument rests on ADD's order (core.orphans, fact 2): the runtime makes the netns, then ADD
makes the veth inside it, then the OVS port, then the lease (DEL and rollback undo them in
reverse), and on fact 1: a veth pair dies with its netns.
1. Snapshot and age (PRIOR_ART 5 row 2: only release entries older than the snapshot): a lease
   is a candidate only if it was granted at least `grace` before the pass began (`cutoff_ms`).
   Leases are listed BEFORE ports and veths, so a listed lease of a live main-plugin attachment
   has its port and veth in the later listings.
2. Re-check right before acting, against fresh state, not the snapshot: the port is looked up
   again in OVSDB, the veth and the netns again in the kernel.
3. The release itself is decided under the allocator's pipeline lock, where every Allocate is
   decided (Allocator.release_stale): it refuses when the attachment holds an address granted
   after the cutoff, and it checks the netns and the veth once more there. An Allocate of that
   attachment decided before it ran after its ADD had made the veth (or, with a delegating
   main plugin, while the netns existed), so the last check sees them; one decided after it
   sees the release queued and allocates a new lease. So no release ever races a grant.
4. Ports are deleted in one OVSDB transaction guarded by the Port row's uuid as judged: a port
   re-created by a new ADD of the same attachment is a new row, and the delete aborts.
5. Veths are deleted only if their ifindex is the one judged: a veth re-created by a new ADD
   (same name, same alias) has a new index and is left alone.
A grace of 0 is allowed (the on-demand `reconcile --grace-seconds 0` after a node crash):
rule 3 still holds, but a veth of an ADD that is between its first two steps right now can be
removed; that ADD then fails cleanly (OVS cannot open the device; the ADD rolls back) and the
runtime retries it. Never a leak, never a duplicate.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from core.attachment import IPAMD_SOCKET_KEY
from core.errors import CoreError
from core.names import host_ifname
from core.netlink import HostLink
from core.netns import NetnsState, netns_state
from core.orphans import NodeObjects, OurVeth, dead_ports, portless_veths, scan
from core.vswitch import PortInfo
from ipamd.errors import IpamError, ReconcileFailed
from ipamd.metrics import Metrics
from ipamd.model import ACTIVE, Entry

log = logging.getLogger("ipamd.reconcile")

# Outcomes of an action (the `outcome` label of ipamd_reconcile_actions_total)
DONE = "done"  # acted
WOULD = "would"  # dry run: would have acted
DEFERRED = "deferred"  # a candidate, not due yet (grace period)
KEPT = "kept"  # looks left over but is deliberately left alone; the reason says why
SKIPPED = "skipped"  # the re-check before acting found it in use again, or gone already
FAILED = "failed"  # acting raised; the detail says what
OUTCOMES = (DONE, WOULD, DEFERRED, KEPT, SKIPPED, FAILED)



@dataclass(frozen=True)
class Action:
    step: str  # "port", "veth", "lease", or a plugged step's name
    target: str  # the port or link name; for a lease "<network> <ip>[,<ip>]"
    container_id: str
    ifname: str
    reason: str
    outcome: str = ""
    network: str = ""
    netns: str = ""
    detail: str = ""  # the error of a failed action


@dataclass(frozen=True)
class Report:
    started_ms: int
    duration_ms: int
    dry_run: bool
    grace_s: float
    actions: tuple[Action, ...]

    def count(self, outcome: str, step: str | None = None) -> int:
        return sum(a.outcome == outcome and (step is None or a.step == step) for a in self.actions)


# ---- what a pass talks to (core.vswitch.Vswitch and core.netlink.Netlink satisfy these) -------


class Ports(Protocol):
    def find_ports(self, want: Mapping[str, str]) -> list[PortInfo]: ...
    def get_port(self, name: str) -> PortInfo | None: ...
    def delete_port_if(self, name: str, port_uuid: str) -> bool: ...
    def close(self) -> None: ...


class Links(Protocol):
    def host_links(self, alias_prefix: str) -> list[HostLink]: ...
    def host_link_alias(self, name: str) -> str | None: ...
    def delete_host_link(self, name: str, alias: str, index: int | None = None) -> bool: ...
    def close(self) -> None: ...


class Leases(Protocol):
    """The allocator, as the reconciler uses it."""

    def node_leases(self) -> list[Entry]: ...
    def release_stale(self, network: str, container_id: str, ifname: str, *, created_before_ms: int,
                      still_gone: Callable[[], bool]) -> list[Entry]: ...


class Step(Protocol):
    name: str

    def run(self, p: Pass) -> None: ...


# ---- one pass ------------------------------------------------------------------------------------


class Pass:
    """What one pass listed at its start, and the way steps act (see the module docstring)."""

    def __init__(self, *, now_ms: int, grace_ms: int, dry_run: bool, leases: Sequence[Entry],
                 objs: NodeObjects, ports: Ports, links: Links, allocator: Leases,
                 state_of: Callable[[str], NetnsState], record: Callable[[Action], None]) -> None:
        self.now_ms = now_ms
        self.grace_ms = grace_ms
        self.cutoff_ms = now_ms - grace_ms  # leases granted after this are never released
        self.dry_run = dry_run
        self.leases = list(leases)
        self.objs = objs
        self.ports = ports
        self.links = links
        self.allocator = allocator
        self.state_of = state_of  # fresh: re-checks call it directly
        self._record = record
        self._netns: dict[str, NetnsState] = {}
        self._leased = {(e.container_id, e.ifname) for e in self.leases}
        self.removed_ports: set[str] = set()
        self.removed_veths: set[str] = set()
        self.released: set[tuple[str, str]] = set()  # attachments whose lease this pass released

    def netns(self, path: str) -> NetnsState:
        """The netns state as of this pass (looked at once per path)."""
        st = self._netns.get(path)
        if st is None:
            st = self._netns[path] = self.state_of(path)
        return st

    def present(self, container_id: str, ifname: str) -> bool:
        """The attachment has a port or a veth of ours that this pass did not remove."""
        return (any(p.name not in self.removed_ports for p in self.objs.ports_of(container_id, ifname))
                or any(v.name not in self.removed_veths for v in self.objs.veths_of(container_id, ifname)))

    def leased(self, container_id: str, ifname: str) -> bool:
        """This node held a live lease for the attachment when the pass began, and this pass
        did not release it."""
        return (container_id, ifname) in self._leased and (container_id, ifname) not in self.released

    def act(self, action: Action, do: Callable[[], bool]) -> str:
        """Re-check and act through `do` (True: acted; False: the re-check said no), or only
        report in a dry run. Logs, counts and returns the outcome; never raises for a failed
        action (the next pass tries again)."""
        if self.dry_run:
            outcome, detail = WOULD, ""
        else:
            try:
                outcome, detail = (DONE if do() else SKIPPED), ""
            except (CoreError, IpamError, OSError) as exc:
                outcome, detail = FAILED, getattr(exc, "msg", "") or str(exc)
            except Exception as exc:  # e.g. a netlink errno we do not name: the pass goes on
                log.exception("step=%s target=%s msg=%s", action.step, action.target,
                              "reconcile action crashed")
                outcome, detail = FAILED, f"{type(exc).__name__}: {exc}"
        self._record(replace(action, outcome=outcome, detail=detail))
        return outcome

    def note(self, action: Action, outcome: str) -> None:
        """Report a candidate that is left alone (DEFERRED or KEPT)."""
        self._record(replace(action, outcome=outcome))


def _secs(ms: int) -> str:
    return f"{ms / 1000:.0f}s"


# ---- the steps -----------------------------------------------------------------------------------


class PortStep:
    name = "port"

    def __init__(self, ours: Callable[[PortInfo], bool]) -> None:
        self._ours = ours

    def run(self, p: Pass) -> None:
        for dead in dead_ports(p.objs, p.netns):
            port = dead.port
            if not self._ours(port):
                continue
            cid, ifname = dead.attachment
            what = "is gone" if dead.netns_state is NetnsState.GONE else "is not a network namespace"
            a = Action(self.name, port.name, cid, ifname,
                       f"netns {dead.netns} {what} and the port's veth is gone",
                       network=port.iface_ids.get("network", ""), netns=dead.netns)
            if p.act(a, functools.partial(self._remove, p, port, dead.netns)) in (DONE, WOULD):
                p.removed_ports.add(port.name)

    @staticmethod
    def _remove(p: Pass, port: PortInfo, netns: str) -> bool:
        if p.state_of(netns) is NetnsState.PRESENT or p.links.host_link_alias(port.name) is not None:
            return False
        return p.ports.delete_port_if(port.name, port.uuid)


class VethStep:
    name = "veth"

    def __init__(self) -> None:
        self._since: dict[tuple[str, int], int] = {}  # (name, ifindex) -> first seen portless (ms)

    def run(self, p: Pass) -> None:
        seen: dict[tuple[str, int], int] = {}
        for v in portless_veths(p.objs):
            key = (v.name, v.link.index)
            since = seen[key] = self._since.get(key, p.now_ms)
            a = Action(self.name, v.name, v.container_id, v.ifname, "")
            if p.leased(v.container_id, v.ifname):
                p.note(replace(a, reason="host veth without an OVS port whose attachment holds a lease: "
                                         "a live pod lost its port (OVS database reset?); not removed"), KEPT)
                continue
            age = p.now_ms - since
            if age < p.grace_ms:
                p.note(replace(a, reason=f"no OVS port for {_secs(age)} of a grace of {_secs(p.grace_ms)}"),
                       DEFERRED)
                continue
            a = replace(a, reason=f"no OVS port and no lease for {_secs(age)}")
            if p.act(a, functools.partial(self._remove, p, v)) in (DONE, WOULD):
                p.removed_veths.add(v.name)
        self._since = seen

    @staticmethod
    def _remove(p: Pass, v: OurVeth) -> bool:
        if p.ports.get_port(v.name) is not None:
            return False
        if p.ports.find_ports({"container_id": v.container_id, "ifname": v.ifname}):
            return False
        if any(e.owner == (v.container_id, v.ifname) for e in p.allocator.node_leases()):
            return False
        return p.links.delete_host_link(v.name, v.link.alias, index=v.link.index)


class LeaseStep:
    name = "lease"

    def run(self, p: Pass) -> None:
        groups: dict[tuple[str, str, str], list[Entry]] = {}
        for e in p.leases:
            groups.setdefault((e.network, e.container_id, e.ifname), []).append(e)
        for (network, cid, ifname), entries in sorted(groups.items()):
            if p.present(cid, ifname):
                continue  # its port or veth is here: alive
            netns = entries[0].netns
            a = Action(self.name, f"{network} {','.join(str(e.ip) for e in entries)}", cid, ifname, "",
                       network=network, netns=netns)
            if not netns:
                p.note(replace(a, reason="no netns recorded with the lease: cannot tell whether the pod is "
                                         "gone (release it with `ovs-underlay-ipamd release`)"), KEPT)
                continue
            st = p.netns(netns)
            if st is NetnsState.PRESENT:
                continue  # alive: e.g. the IPAM plugin under another main plugin
            if st is NetnsState.UNKNOWN:
                p.note(replace(a, reason=f"netns {netns} exists but is not a network namespace, or its "
                                         "directory is not visible here: cannot tell whether the pod is "
                                         "gone"), KEPT)
                continue
            newest = max(e.created_ms for e in entries)
            if newest > p.cutoff_ms:
                p.note(replace(a, reason=f"netns is gone; granted {_secs(p.now_ms - newest)} ago, grace "
                                         f"{_secs(p.grace_ms)}"), DEFERRED)
                continue
            a = replace(a, reason=f"no OVS port or veth of ours and netns {netns} is gone")
            if p.act(a, functools.partial(self._release, p, network, cid, ifname, netns)) in (DONE, WOULD):
                p.released.add((cid, ifname))

    @staticmethod
    def _release(p: Pass, network: str, cid: str, ifname: str, netns: str) -> bool:
        if p.ports.find_ports({"container_id": cid, "ifname": ifname}):
            return False
        host = host_ifname(cid, ifname)

        def still_gone() -> bool:  # under the allocator's lock: kernel only, no OVSDB
            return p.state_of(netns) is NetnsState.GONE and p.links.host_link_alias(host) is None

        return bool(p.allocator.release_stale(network, cid, ifname, created_before_ms=p.cutoff_ms,
                                              still_gone=still_gone))


# ---- the reconciler ------------------------------------------------------------------------------


class Reconciler:
    """One per daemon. `run` makes one pass; passes never overlap (a lock)."""

    def __init__(self, allocator: Leases, metrics: Metrics, *, grace_s: float, ipamd_socket: str,
                 tools: Callable[[], tuple[Ports, Links]],
                 steps: Sequence[Step] | None = None,
                 state_of: Callable[[str], NetnsState] = netns_state,
                 clock: Callable[[], float] = time.time) -> None:
        self.allocator = allocator
        self.metrics = metrics
        self.grace_s = grace_s
        self.ipamd_socket = ipamd_socket
        self._tools = tools
        self.steps: list[Step] = list(steps) if steps is not None else default_steps(self._ours)
        self._state_of = state_of
        self._clock = clock
        self._lock = threading.Lock()
        self.last_success_s = 0.0
        metrics.describe("ipamd_reconcile_runs_total", "counter", "Reconcile passes by trigger and result")
        metrics.describe("ipamd_reconcile_actions_total", "counter",
                         "Reconcile actions by step (lease, port, veth, ...) and outcome")
        metrics.describe("ipamd_reconcile_duration_ms", "histogram", "Duration of a reconcile pass")
        metrics.add_gauges(
            lambda: [("ipamd_reconcile_last_success_timestamp_seconds", (), self.last_success_s)])
        metrics.describe("ipamd_reconcile_last_success_timestamp_seconds", "gauge",
                         "When the last reconcile pass completed (0: never)")

    def _ours(self, port: PortInfo) -> bool:
        """Ports that recorded another ipamd's socket are that ipamd's to reconcile."""
        sock = port.iface_ids.get(IPAMD_SOCKET_KEY, "")
        return not sock or sock == self.ipamd_socket

    def run(self, *, dry_run: bool = False, grace_s: float | None = None, trigger: str = "request") -> Report:
        grace = self.grace_s if grace_s is None else grace_s
        with self._lock:
            t0 = time.monotonic()
            actions: list[Action] = []
            try:
                now_ms = int(self._clock() * 1000)
                self._pass(now_ms, int(grace * 1000), dry_run, trigger, actions.append)
            except (CoreError, OSError) as exc:
                self.metrics.inc("ipamd_reconcile_runs_total", trigger=trigger, result="failed")
                msg = getattr(exc, "msg", "") or str(exc)
                log.warning("trigger=%s msg=%s error=%s", trigger, "reconcile pass failed", msg)
                raise ReconcileFailed(f"reconcile pass failed: {msg}") from exc
            ms = int((time.monotonic() - t0) * 1000)
            self.metrics.inc("ipamd_reconcile_runs_total", trigger=trigger, result="ok")
            self.metrics.observe("ipamd_reconcile_duration_ms", ms)
            if not dry_run:
                self.last_success_s = self._clock()
            report = Report(now_ms, ms, dry_run, grace, tuple(actions))
            log.log(logging.INFO if report.count(DONE) or report.count(FAILED) else logging.DEBUG,
                    "trigger=%s dry_run=%s grace_s=%g duration_ms=%d done=%d failed=%d deferred=%d kept=%d "
                    "msg=%s", trigger, dry_run, grace, ms, report.count(DONE), report.count(FAILED),
                    report.count(DEFERRED), report.count(KEPT), "reconcile pass")
            return report

    def _pass(self, now_ms: int, grace_ms: int, dry_run: bool, trigger: str,
              out: Callable[[Action], None]) -> None:
        # Leases first (see "Race safety" 1), then ports and veths.
        leases = [e for e in self.allocator.node_leases() if e.state == ACTIVE]
        ports, links = self._tools()
        try:
            objs = scan(ports, links)

            def record(a: Action) -> None:
                out(a)
                self.metrics.inc("ipamd_reconcile_actions_total", step=a.step, outcome=a.outcome)
                level = logging.INFO if a.outcome in (DONE, WOULD) else (
                    logging.WARNING if a.outcome == FAILED else logging.DEBUG)
                log.log(level, "trigger=%s step=%s outcome=%s target=%s container_id=%s ifname=%s netns=%s "
                        "msg=%s%s", trigger, a.step, a.outcome, a.target, a.container_id, a.ifname,
                        a.netns or "-", a.reason, f" error={a.detail}" if a.detail else "")

            p = Pass(now_ms=now_ms, grace_ms=grace_ms, dry_run=dry_run, leases=leases, objs=objs, ports=ports,
                     links=links, allocator=self.allocator, state_of=self._state_of, record=record)
            for step in self.steps:
                step.run(p)
        finally:
            for tool in (ports, links):
                try:
                    tool.close()
                except Exception as exc:  # closing must not hide the pass's outcome
                    log.debug("msg=%s error=%s", "closing a reconcile tool failed", exc)


def default_steps(ours: Callable[[PortInfo], bool]) -> list[Step]:
    """Ports, then veths, then leases: a lease whose port or veth this pass removed is judged
    on what is left (Pass.present)."""
    return [PortStep(ours), VethStep(), LeaseStep()]


@dataclass
class Periodic:
    """Runs `reconciler.run` now and then every `interval_s` until `stop` is set."""

    reconciler: Reconciler
    interval_s: float
    stop: threading.Event = field(default_factory=threading.Event)

    def loop(self) -> None:
        while not self.stop.is_set():
            try:
                self.reconciler.run(trigger="periodic")
            except ReconcileFailed:
                pass  # logged and counted; the next pass tries again
            except Exception:  # a bug must not end the periodic pass silently
                log.exception("msg=%s", "reconcile pass crashed")
            if self.stop.wait(self.interval_s):
                return
