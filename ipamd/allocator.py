"""The allocator the service calls: the allocation policy, run through the commit pipeline, with
conflict probing on top (and, on a request's L2 segment, pre-probed candidates: segments.py).

Why a thin composition: the rules live in policy.py (plain functions), durability and
concurrency in pipeline.py (decide under a lock, group commit, answer once durable), the
in-memory picture in pool_state.py and the wire probing in conflicts.py. This module only says,
per operation, what to read, which rule to apply and which store writes to queue (the `_plan_*`
functions: they run under the pipeline's lock and never fail after queueing). It runs the same
over every `Store`: the in-memory one in unit tests, SQLite on one node, etcd across a cluster.
With a cluster store (`store.Cluster`) it also asks the store where this node may pick
(blocks.Placement), keeps its outage reserve (`maintain_reserve`), and applies other nodes' writes
to its occupancy as the store reports them.

The store, not this module, guarantees that no address is ever ACTIVE twice; a stale hint costs a
retry, never a duplicate. A pre-probed candidate is such a hint too: `_reserve` asks the segment
for one next to `policy.pick` (a fresh candidate that the occupancy says is free), and it is
reserved through the same pipeline and store write as any picked address.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from netaddr import IPAddress, IPNetwork

from core.spec import PoolDef
from ipamd import policy
from ipamd.conflicts import ConflictProber, Detect, probe_grant
from ipamd.errors import InvalidRequest, NetworkQuarantined
from ipamd.group_commit import Write
from ipamd.model import ACTIVE, QUARANTINED, RELEASED, Entry
from ipamd.pipeline import NeedsQuiesce, Pipeline, Plan, Prefetch
from ipamd.policy import Grant, Request
from ipamd.pool_state import PoolState
from ipamd.store import Cluster, Store

if TYPE_CHECKING:
    from ipamd.segments import Joined, SegmentProbes

__all__ = ["Allocator", "Grant", "PoolUsage", "Request"]

log = logging.getLogger("ipamd.allocator")


@dataclass(frozen=True)
class PoolUsage:
    network: str
    subnet: IPNetwork
    gateway: IPAddress | None
    used: int
    total: int
    quarantined: int


class Allocator:
    def __init__(self, store: Store, *, default_cooldown_s: int = 30, quarantine_s: int = 600,
                 prober: ConflictProber | None = None, clock: Callable[[], float] = time.time,
                 node: str = "", cluster: Cluster | None = None) -> None:
        self.store = store
        self.node = node  # recorded on every lease; GC and release touch only this node's
        self.cluster = cluster
        self.default_cooldown_s = default_cooldown_s
        self.quarantine_s = quarantine_s
        self.prober = prober
        self.segments: SegmentProbes | None = None  # set by the daemon when probe ports are on
        self.clock = clock
        self._state = PoolState(store, default_cooldown_s=default_cooldown_s, quarantine_s=quarantine_s,
                                now_ms=self._now_ms)
        self._pipeline = Pipeline(store, reset=self._state.clear)
        self.commits = self._pipeline.commits
        if cluster is not None:
            cluster.subscribe(self._external)

    def observe_commits(self, observe: Callable[[BaseException | None], None]) -> None:
        """Be told every commit's outcome (None: durable; else the store's error)."""
        self._pipeline.observe = observe

    def probe_write(self) -> None:
        """The store's heartbeat write (Store.probe_write), through the pipeline like any write,
        so its outcome reaches the commit observer. For readiness while writes fail. Raises
        CommitFailed when the store still cannot make it durable."""
        self._pipeline.execute(lambda quiesced: Plan(None, self._pipeline.submit(Write(
            lambda s: s.probe_write()), {}, ())))

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def warm(self) -> int:
        """Build every stored network's occupancy now (the daemon does this before serving, so
        that no request pays for it). A network whose stored definition does not parse is
        quarantined (pool_state) and the others are served. Returns the number of networks."""
        with self._pipeline.lock:
            nets = self.store.networks()
            for net in nets:
                try:
                    self._state.occupancy(net)
                except NetworkQuarantined:
                    continue  # logged by pool_state; the daemon serves every other network
            return len(nets)

    def quarantined(self) -> dict[str, str]:
        """Networks whose stored definition does not parse -> why (refused until repaired)."""
        with self._pipeline.lock:
            return self._state.quarantined()

    # ---- pool definitions --------------------------------------------------------------------

    def ensure_pool(self, network: str, pool: PoolDef) -> None:
        """Store the definition on first use; accept a changed one only when it is safe."""

        def plan(quiesced: bool) -> Plan[None]:
            self._need_quiesce(network, pool, quiesced)
            if not self._state.stage(network, pool):
                return Plan(None)
            staged = self._state.take_staged(network)
            assert staged is not None
            w = Write(lambda s: s.put_pool(network, staged), networks=frozenset({network}))
            return Plan(None, self._pipeline.submit(w, {}, ()))

        self._pipeline.execute(plan)

    def _need_quiesce(self, network: str, pool: PoolDef, quiesced: bool) -> None:
        """A changed definition of a known network is checked against every live lease: only
        with nothing queued."""
        old = self._state.pool(network)
        if not quiesced and old is not None and old is not pool and old != pool:
            raise NeedsQuiesce

    # ---- allocate ----------------------------------------------------------------------------

    def allocate(self, req: Request) -> Grant:
        policy.check_mac(req.network, req.requested_mac)
        policy.check_mac(req.network, req.interface_mac, "interface MAC")
        static = policy.static_by_subnet(req.network, req.pool, req.requested_ips)
        seg = self._joined(req)
        pre = self._pipeline.prefetch(req.network, req.container_id, req.ifname)
        grant = self._pipeline.execute(lambda quiesced: self._plan_allocate(req, static, pre, seg, quiesced))
        if not req.conflict_check or (grant.existing and not req.probe_held):
            return grant
        detect, where = self._detector(req, seg)
        if detect is None:
            return grant
        return probe_grant(req, grant, static, detect, self, where)

    def _joined(self, req: Request) -> Joined | None:
        """The request's segment, with its probe port ready (None: no segment, probe ports off,
        or the port cannot be made now). A held-address probe goes from the pod's interface."""
        if self.segments is None or req.segment is None or req.probe_held:
            return None
        return self.segments.join(req)

    def _detector(self, req: Request, seg: Joined | None) -> tuple[Detect | None, str]:
        if seg is not None:
            return seg.detect, f"probe port {seg.port} on {seg.segment.key}"
        prober = self.prober
        if prober is None or not req.netns:
            return None, ""
        where = f"{req.ifname} in {req.netns}"
        return (lambda ip, wait_ms: prober.detect(req.netns, req.ifname, ip, wait_ms)), where

    def _plan_allocate(self, req: Request, static: dict[int, IPAddress], pre: Prefetch | None,
                       seg: Joined | None, quiesced: bool) -> Plan[Grant]:
        pool = req.pool
        self._need_quiesce(req.network, pool, quiesced)
        self._state.stage(req.network, pool)
        try:
            held, pending = self._pipeline.held(req.network, req.container_id, req.ifname, pre)
            if held:
                policy.check_existing(req, held, static)
                grant = Grant(tuple(held), pool, existing=True)
                staged = self._state.take_staged(req.network)
                if staged is not None:  # a safe definition change with a lease already held
                    w = Write(lambda s: s.put_pool(req.network, staged), networks=frozenset({req.network}))
                    return Plan(grant, self._pipeline.submit(w, {}, ()))
                return Plan(grant, pending, own=False)
            entries, w, fresh = self._reserve(req, range(len(pool.subnets)), static, [], seg)
            return Plan(Grant(tuple(entries), pool, pre_probed=fresh), w)
        finally:
            self._state.unstage(req.network)  # no-op once queued

    def _reserve(self, req: Request, subnets: Sequence[int], static: dict[int, IPAddress],
                 held: list[Entry], seg: Joined | None = None) -> tuple[list[Entry], Write, frozenset[int]]:
        """Pick one address per subnet entry and queue them as ONE reservation, so a dual-stack
        request never leaves half a lease behind (caller holds the lock). `held`: the
        attachment's other live entries (when one address of it is replaced after a conflict).
        A dynamic address is a fresh pre-probed candidate of the segment when there is one
        (returned in the set of such subnet entries), else what the policy picks."""
        pool, network = req.pool, req.network
        occs = self._state.occupancy(network)
        now = self._now_ms()
        for k in subnets:
            occs[k].expire(now)
        picked, fresh = [], set()
        for k in subnets:
            spec, want = pool.subnets[k], static.get(k)
            if want is not None:
                policy.check_static_free(network, spec, want, self._pipeline.entry_at(network, str(want)),
                                         now_ms=now, quarantine_ms=self._state.quarantine_ms)
            place = self.cluster.placement(network, k) if self.cluster is not None else None
            off = None
            if want is None and seg is not None and req.conflict_check:
                order = policy.window(network, spec, occs[k], seg.size(k), place)
                off = seg.take(k, occs[k], req.conflict_check_wait_ms, order)
                if off is not None:
                    fresh.add(k)
            picked.append((k, off if off is not None else policy.pick(network, spec, occs[k], want, place)))
        entries = [policy.build_entry(req, k, occs[k].address(off), now, self.node) for k, off in picked]
        for k, off in picked:
            occs[k].mark_active(off, advance=True)
        staged = self._state.take_staged(network)

        def apply(s: Store) -> None:
            if staged is not None:
                s.put_pool(network, staged)
            s.reserve(entries)

        owner = (network, req.container_id, req.ifname)
        mine = tuple(sorted(held + entries, key=lambda e: e.subnet_index))
        return entries, self._pipeline.submit(Write(apply), {owner: mine}, entries), frozenset(fresh)

    # ---- what conflict probing asks for (conflicts.Reservations) -----------------------------

    def reserve_another(self, req: Request, subnet_index: int) -> tuple[Entry, bool]:
        """Another address for one subnet entry of an attachment that keeps its other entries;
        True when it is a fresh pre-probed candidate (no probe needed)."""
        seg = self._joined(req)

        def plan(quiesced: bool) -> Plan[tuple[Entry, bool]]:
            held, _ = self._pipeline.held(req.network, req.container_id, req.ifname)
            entries, w, fresh = self._reserve(req, [subnet_index], {}, held, seg)
            return Plan((entries[0], subnet_index in fresh), w)

        return self._pipeline.execute(plan)

    def quarantine(self, network: str, e: Entry, mac: str) -> None:
        """Take the attachment's address `e` out of use: someone (`mac`) answered for it."""

        def plan(quiesced: bool) -> Plan[None]:
            now = self._now_ms()
            occ = self._state.occupancy(network)[e.subnet_index]
            off = occ.offset(e.ip)
            if off is not None:
                occ.mark_quarantined(off, now + self._state.quarantine_ms, was_active=True)
            held, _ = self._pipeline.held(network, e.container_id, e.ifname)
            q = replace(e, state=QUARANTINED, conflict_mac=mac, changed_ms=now)
            w = Write(lambda s: s.quarantine(network, str(e.ip), conflict_mac=mac, now_ms=now))
            owner = (network, e.container_id, e.ifname)
            return Plan(None, self._pipeline.submit(w, {owner: tuple(x for x in held if x.ip != e.ip)}, [q]))

        self._pipeline.execute(plan)
        log.warning("network=%s ip=%s conflict_mac=%s msg=%s", network, e.ip, mac,
                    "address answered on the wire: quarantined")

    def quarantine_free(self, network: str, ip: IPAddress, mac: str) -> bool:
        """Someone (`mac`) answered for or announced `ip`, which no attachment holds: quarantine
        it, durably (a restart must not hand it out either). False when it is held or already
        quarantined, or not an address of the network's pool (the caller judges a lease itself)."""

        def plan(quiesced: bool) -> Plan[bool]:
            pool = self._state.pool(network)
            k = policy.subnet_of(pool, ip, -1) if pool is not None else None
            if pool is None or k is None or not pool.subnets[k].allocatable(ip):
                return Plan(False)
            occ = self._state.occupancy(network)[k]
            off = occ.offset(ip)
            now = self._now_ms()
            occ.expire(now)
            if off is None or occ.is_active(off) or occ.is_quarantined(off):
                return Plan(False)
            spec = pool.subnets[k]
            e = Entry(network=network, address=IPNetwork((int(ip), spec.subnet.prefixlen), ip.version),
                      subnet_index=k, container_id="", ifname="", state=ACTIVE, gateway=spec.gateway,
                      created_ms=now, changed_ms=now, node=self.node)
            occ.mark_quarantined(off, now + self._state.quarantine_ms, was_active=False)

            def apply(s: Store) -> None:
                s.reserve([e], advance_cursor=False)
                s.quarantine(network, str(ip), conflict_mac=mac, now_ms=now)

            q = replace(e, state=QUARANTINED, conflict_mac=mac)
            return Plan(True, self._pipeline.submit(Write(apply), {}, [q]))

        done = self._pipeline.execute(plan)
        if done:
            log.warning("network=%s ip=%s conflict_mac=%s msg=%s", network, ip, mac,
                        "a free address answered or was announced on the wire: quarantined")
        return done

    # ---- what the segments' pre-probing asks for (segments.Pools) ----------------------------

    def window(self, network: str, subnet_index: int, n: int) -> list[IPAddress]:
        """The next `n` addresses the policy would hand out in one subnet entry, in that order
        (policy.window; with a cluster store, where this node may pick): what the segment keeps
        pre-probed."""
        with self._pipeline.lock:
            pool = self._state.pool(network)
            if pool is None or subnet_index >= len(pool.subnets):
                return []
            occ = self._state.occupancy(network)[subnet_index]
            occ.expire(self._now_ms())
            place = self.cluster.placement(network, subnet_index) if self.cluster is not None else None
            order = policy.window(network, pool.subnets[subnet_index], occ, n, place)
            return [occ.address(off) for off in order]

    def pool(self, network: str) -> PoolDef | None:
        with self._pipeline.lock:
            return self._state.pool(network)

    def durable_entry(self, network: str, ip: IPAddress) -> Entry | None:
        """The store's entry at (network, ip), read without the pipeline lock (the passive
        watch: a grant still in flight is not seen yet, its next frame is)."""
        return self.store.get_entry(network, str(ip))

    # ---- release, gc, queries ----------------------------------------------------------------

    def release(self, network: str | None, container_id: str, ifname: str) -> list[Entry]:
        """Release the attachment (in every network when network is None); returns what was
        released once that is durable. The store decides what the attachment held (one UPDATE
        in the batch, nothing read before), and its addresses start cooling down in memory only
        once the release is durable, so a release never costs a read and never frees an address
        early."""
        w = self._pipeline.execute(lambda quiesced: self._plan_release(network, container_id, ifname))
        return list(w.result)

    def _plan_release(self, network: str | None, container_id: str, ifname: str) -> Plan[Write]:
        now = self._now_ms()
        w = Write(lambda s: s.release_by_owner(network, container_id, ifname, now), after=self._released,
                  networks=frozenset({network}) if network is not None else None)
        # The attachment holds nothing once this is durable (for one network: in every network
        # the view cannot be keyed; a concurrent Allocate then answers from the durable state).
        self._pipeline.submit(w, {(network, container_id, ifname): ()} if network is not None else {}, ())
        return Plan(w, w)

    def release_stale(self, network: str, container_id: str, ifname: str, *, created_before_ms: int,
                      still_gone: Callable[[], bool]) -> list[Entry]:
        """The reconciler's release: release the attachment only if every address it holds
        (queued writes included) was granted at or before `created_before_ms`, and only if
        `still_gone()` says so. Both are decided under the pipeline's lock, where every
        Allocate is decided too: an Allocate of this attachment decided before this either
        left a newer lease (refused here) or ran after its ADD had made the veth or the netns
        that `still_gone` looks for; one decided after sees the release queued and allocates
        anew. `still_gone` must be cheap (it holds up every allocation): a stat and a netlink
        get, not an OVSDB round trip. Returns the released entries ([] when refused)."""

        def plan(quiesced: bool) -> Plan[Write | None]:
            held, _ = self._pipeline.held(network, container_id, ifname)
            if not held or any(e.created_ms > created_before_ms for e in held) or not still_gone():
                return Plan(None)
            p = self._plan_release(network, container_id, ifname)
            return Plan(p.result, p.write)

        w = self._pipeline.execute(plan)
        return list(w.result) if w is not None else []

    def _released(self, entries: Any) -> None:
        """A release is durable (called by the pipeline, under its lock): its addresses cool down."""
        self._state.released(entries)

    def gc(self, network: str, valid: Iterable[tuple[str, str]]) -> list[Entry]:
        """Release every live attachment of this node in `network` not in `valid` (never another
        node's lease: with a cluster store the network spans nodes): quiesced (the store lists
        them all), one batch (one fsync). Always one network: there is no "every network"."""
        if not network:
            raise InvalidRequest("garbage collection needs a network name")
        keep = set(valid)

        def plan(quiesced: bool) -> Plan[list[Write]]:
            owners = {(e.network, e.container_id, e.ifname)
                      for e in self.store.list_entries(network, (ACTIVE,), node=self._mine())}
            writes = [self._plan_release(net, cid, ifname).result
                      for net, cid, ifname in sorted(owners) if (cid, ifname) not in keep]
            return Plan(writes, writes[-1] if writes else None)  # one batch: all settle together

        return [e for w in self._pipeline.execute(plan, quiesce=True) for e in w.result]

    # ---- a cluster store: other nodes' writes, the outage reserve ---------------------------

    def _external(self, network: str, changes: list[tuple[IPAddress, Entry | None]] | None) -> None:
        """Other nodes' writes, reported by the cluster store: keep the occupancy current."""
        with self._pipeline.lock:
            if changes is None:
                self._state.clear([network])
            else:
                self._state.apply_external(network, changes)

    def maintain_reserve(self) -> int:
        """Top up (or give back) this node's outage reserve in every network, as the cluster store
        wants it (store.Cluster.reserve_target). Returns the number of addresses changed."""
        if self.cluster is None:
            return 0
        changed = 0
        for net in self.store.networks():
            changed += self._pipeline.execute(functools.partial(self._plan_reserve, net))
        return changed

    def _plan_reserve(self, network: str, quiesced: bool = False) -> Plan[int]:
        cluster = self.cluster
        pool = self._state.usable_pool(network)  # a quarantined network keeps no reserve
        if cluster is None or pool is None:
            return Plan(0)
        occs = self._state.occupancy(network)
        now = self._now_ms()
        hold: list[Entry] = []
        back: list[Entry] = []
        for k, (spec, occ) in enumerate(zip(pool.subnets, occs, strict=True)):
            occ.expire(now)
            have = cluster.reserved_by_me(network, k)
            want = cluster.reserve_target(network, k, occ.total - occ.held_count(), occ.total)
            if want < len(have):
                back += have[want:]
                continue
            place = cluster.placement(network, k)
            if place is None or place.offline:
                continue
            place = replace(place, reserve=())  # never "top up" from the reserve itself
            for _ in range(want - len(have)):
                off = policy.pick_placed(network, spec, occ, place)
                if off is None:
                    break
                occ.mark_reserved(off)
                hold.append(policy.reserve_entry(network, pool, k, occ.address(off), now, self.node))
        if not hold and not back:
            return Plan(0)

        def apply(s: Store) -> None:
            if hold:
                cluster.hold(hold)
            if back:
                cluster.give_back(network, [str(e.ip) for e in back])

        def after(_: Any) -> None:  # given back: free once durable
            occs_now = self._state.occupancy(network)
            for e in back:
                off = occs_now[e.subnet_index].offset(e.ip)
                if off is not None and occs_now[e.subnet_index].is_reserved(off):
                    occs_now[e.subnet_index].clear(off)

        w = Write(apply, after=after, networks=frozenset({network}))
        return Plan(len(hold) + len(back), self._pipeline.submit(w, {}, ()))

    # ---- queries -----------------------------------------------------------------------------

    def get(self, network: str, container_id: str, ifname: str) -> tuple[list[Entry], PoolDef | None]:
        """The attachment's durable lease (a lease still being granted is not shown yet)."""
        with self._pipeline.lock:
            pool = self._state.pool(network)
        return self.store.get_by_owner(network, container_id, ifname), pool

    def conflicts_of(self, network: str, container_id: str, ifname: str) -> list[Entry]:
        """The attachment's addresses that were quarantined while it held them (a foreign MAC
        answered for or announced them): what CHECK reports."""
        return [e for e in self.store.list_entries(network, (QUARANTINED,))
                if e.owner == (container_id, ifname)]

    def usage(self, network: str | None = None) -> list[PoolUsage]:
        out = []
        with self._pipeline.lock:
            nets = [network] if network else self.store.networks()
            for net in nets:
                pool = self._state.usable_pool(net)  # a quarantined network has no usage to show
                if pool is None:
                    continue
                occ = self._state.occupancy(net)
                occ_now = self._now_ms()
                for s, o in zip(pool.subnets, occ, strict=True):
                    o.expire(occ_now)
                    out.append(PoolUsage(net, s.subnet, s.gateway, o.active, o.total, o.quarantined))
        return out

    def _mine(self) -> str | None:
        """The node whose leases this node may free: itself with a cluster store; with a
        node-local store every lease is this node's (None: no filter)."""
        return self.node if self.cluster is not None else None

    def node_leases(self) -> list[Entry]:
        """This node's live leases (the reconciler's; never another node's with a cluster store)."""
        return self.store.list_entries(None, (ACTIVE,), node=self._mine())

    def leases(self, network: str | None = None, all_states: bool = False) -> list[Entry]:
        states: Sequence[str] = (ACTIVE, RELEASED, QUARANTINED) if all_states else (ACTIVE,)
        return self.store.list_entries(network, states)
