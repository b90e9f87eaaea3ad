"""The IPAM core: pure logic over a `Store`, an occupancy hint per subnet, and an injected prober.

Why pure: the same allocator runs over the in-memory store in unit tests, SQLite in the daemon and
etcd later. It decides *which* address; the store guarantees that no address is ever ACTIVE twice.

Rules (issue 3):
- one address per subnet entry; idempotent per (network, container id, ifname);
- requested static addresses are honoured or refused (102), never silently replaced;
- round-robin after the last handed-out address; released addresses cool down (pool cooldown_s,
  else the daemon default) and are used oldest-first only when nothing else is free;
- the gateway, network/broadcast and excluded addresses are never handed out;
- a pool's stored definition only changes when the change strands no live lease;
- with a conflict prober, each candidate is probed (outside the lock, after it is reserved); an
  answer quarantines it with the answering MAC and the next candidate is tried (bounded).

How a request runs (issue 6: throughput without weakening durability): under the lock it is
*decided* against the in-memory state (occupancy hints, plus a view of the writes that are queued
but not yet durable) and its store writes are queued (`_plan_*`, which never fail after queueing).
Outside the lock it waits until a group commit (store.GroupCommit) made them durable; only then
does the caller get its answer. A release is decided by the store itself (one UPDATE in the
batch) and its addresses start cooling down in memory once it is durable. When a batch fails,
every request in it fails, and the in-memory state is dropped and rebuilt from the store (which
holds exactly the durable writes), so no effect of an undone write survives; requests decided
after it (queued, never written) decide again. A refusal by the store (StoreConflict: the hints
were stale) undoes the batch the same way and its requests decide again. The two operations that
need the complete picture (a pool definition change, GC) run *quiesced*: new requests wait,
queued writes are flushed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from netaddr import IPAddress, IPNetwork

from core.spec import PodRef, PoolDef, SubnetSpec, mac_from_ipv4
from ipamd.errors import (
    AddressConflict,
    AddressOutOfPool,
    AddressTaken,
    CommitFailed,
    InvalidRequest,
    PoolDefinitionConflict,
    PoolExhausted,
    StoreConflict,
)
from ipamd.model import ACTIVE, QUARANTINED, RELEASED, Entry
from ipamd.occupancy import SubnetOccupancy
from ipamd.store import GroupCommit, Store, Write

log = logging.getLogger("ipamd.allocator")

MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
CONFLICT_TRIES = 3  # candidates probed per subnet entry before giving up with 104
STORE_RETRIES = 8  # a request decides again at most this often (its batch was undone)


@dataclass(frozen=True)
class ConflictOutcome:
    conflict: bool
    mac: str = ""
    elapsed_ms: float = 0.0


class ConflictProber(Protocol):
    def detect(self, netns: str, ifname: str, address: IPAddress, wait_ms: int) -> ConflictOutcome | None:
        """Probe `address` from `ifname` in `netns`; None when the interface does not exist
        (probing is then skipped)."""
        ...


@dataclass(frozen=True)
class Request:
    network: str
    pool: PoolDef
    container_id: str
    ifname: str
    pod: PodRef = field(default_factory=PodRef)
    requested_ips: tuple[IPAddress, ...] = ()
    requested_mac: str = ""
    netns: str = ""
    conflict_check: bool = False
    conflict_check_wait_ms: int = 100


@dataclass(frozen=True)
class Grant:
    entries: tuple[Entry, ...]
    pool: PoolDef
    conflict_probed: bool = False
    quarantined: tuple[str, ...] = ()
    existing: bool = False  # idempotent answer: the attachment already held these


@dataclass(frozen=True)
class PoolUsage:
    network: str
    subnet: IPNetwork
    gateway: IPAddress | None
    used: int
    total: int
    quarantined: int


T = TypeVar("T")


class _Plan(NamedTuple, Generic[T]):
    """What a decision returns: its result, the write to wait for, and whether that write is the
    request's own (its failure fails the request) or one it depends on (its failure: decide again)."""

    result: T
    write: Write | None = None
    own: bool = True


class _Prefetch(NamedTuple):
    gen: int
    key: tuple[str, str, str]
    entries: list[Entry]


class _NeedsQuiesce(Exception):
    """A decision needs the complete picture (no queued writes): run it quiesced."""


class Allocator:
    def __init__(self, store: Store, *, default_cooldown_s: int = 30, quarantine_s: int = 600,
                 prober: ConflictProber | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.default_cooldown_s = default_cooldown_s
        self.quarantine_s = quarantine_s
        self.prober = prober
        self.clock = clock
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        self._gate = 0  # > 0: a quiesced operation is waiting or running; new decisions wait
        self._exclusive = threading.Lock()  # one quiesced operation at a time
        self._pools: dict[str, PoolDef] = {}
        self._occ: dict[str, list[SubnetOccupancy]] = {}
        self._staged: dict[str, PoolDef] = {}  # definitions in use but not yet queued for writing
        # What the store will say once the queued writes are durable, for the keys they touch:
        # (network, container id, ifname) -> its ACTIVE entries; (network, ip) -> its entry.
        self._owner_view: dict[tuple[str, str, str], tuple[Write, tuple[Entry, ...]]] = {}
        self._ip_view: dict[tuple[str, str], tuple[Write, Entry]] = {}
        self._settled = 0  # batches settled (under the lock): dates a prefetched read
        self.commits = GroupCommit(store, self._settle)

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    # ---- deciding, committing, waiting -------------------------------------------------------

    def _execute(self, plan: Callable[[bool], _Plan[T]], *, quiesce: bool = False) -> T:
        """Decide under the lock (plan(quiesced)), then wait outside it until the write is
        settled. Decide again when the write was undone without being ours to fail."""
        for _ in range(STORE_RETRIES):
            if quiesce:
                with self._quiesced():
                    p = plan(True)
                    if p.write is not None:
                        self.commits.wait(p.write)  # nothing else is queued: this thread commits
            else:
                try:
                    with self._lock:
                        while self._gate:
                            self._cv.wait()
                        p = plan(False)
                except _NeedsQuiesce:
                    quiesce = True
                    continue
                if p.write is not None:
                    self.commits.wait(p.write)
            w = p.write
            if w is None or w.durable:
                return p.result
            if w.error is not None and p.own:
                raise CommitFailed(f"ipamd could not make the change durable (store: {w.error}); "
                                   "nothing was granted or released") from w.error
        raise CommitFailed(f"the store refused the change {STORE_RETRIES} times; nothing was granted "
                           "or released")

    @contextlib.contextmanager
    def _quiesced(self) -> Iterator[None]:
        """Hold the lock with no write queued or in flight: the store is the whole truth."""
        with self._exclusive:
            with self._lock:
                self._gate += 1
            try:
                tail = self.commits.tail()
                if tail is not None:
                    self.commits.wait(tail)
                with self._lock:
                    yield
            finally:
                with self._lock:
                    self._gate -= 1
                    self._cv.notify_all()

    def _submit(self, w: Write, owners: dict[tuple[str, str, str], tuple[Entry, ...]],
                ips: Iterable[Entry]) -> Write:
        """Queue a decided write and record what it will make true (caller holds the lock)."""
        for key, held in owners.items():
            self._owner_view[key] = (w, held)
        for e in ips:
            self._ip_view[(e.network, str(e.ip))] = (w, e)
        return self.commits.submit(w)

    def _settle(self, batch: Sequence[Write], error: BaseException | None) -> None:
        """Called by the committer once a batch is durable or rolled back."""
        with self._lock:
            self._settled += 1
            if error is None:
                for w in batch:
                    if w.after is not None:
                        w.after(w.result)
                done = {id(w) for w in batch}
                for k in [k for k, (w, _) in self._owner_view.items() if id(w) in done]:
                    del self._owner_view[k]
                for i in [i for i, (w, _) in self._ip_view.items() if id(w) in done]:
                    del self._ip_view[i]
                return
            again = self.commits.abort_queued()
            self._owner_view.clear()
            self._ip_view.clear()
            self._occ.clear()
            self._pools.clear()
            self._staged.clear()
        if isinstance(error, StoreConflict):
            log.warning("error=%s requests=%d msg=%s", error, len(batch) + again,
                        "store refused a batch (occupancy hint was stale): rebuilding from the store, "
                        "deciding again")
        else:
            log.error("error=%s failed=%d decide_again=%d msg=%s", error, len(batch), again,
                      "store commit failed: the batch's requests fail; in-memory state rebuilt from "
                      "the store")

    def _prefetch(self, network: str, container_id: str, ifname: str) -> _Prefetch:
        """Read the attachment's durable entries BEFORE taking the lock (a store read inside it
        lets every other request thread pile up on the lock while it waits for the GIL)."""
        gen = self._settled  # before the read
        held = self.store.get_by_owner(network, container_id, ifname)
        return _Prefetch(gen, (network, container_id, ifname), held)

    def _held(self, network: str, container_id: str, ifname: str,
              pre: _Prefetch | None = None) -> tuple[list[Entry], Write | None]:
        """The attachment's ACTIVE entries including queued writes, and the queued write they
        depend on (None when they are durable). A prefetched read is used only when no batch
        settled since it began: then any write of the attachment committed since is still in the
        view, which wins."""
        key = (network, container_id, ifname)
        v = self._owner_view.get(key)
        if v is not None:
            return list(v[1]), v[0]
        if pre is not None and pre.gen == self._settled and pre.key == key:
            return list(pre.entries), None
        return self.store.get_by_owner(network, container_id, ifname), None

    def _entry_at(self, network: str, ip: str) -> Entry | None:
        v = self._ip_view.get((network, ip))
        return v[1] if v is not None else self.store.get_entry(network, ip)

    # ---- pools and occupancy -----------------------------------------------------------------

    def _pool(self, network: str) -> PoolDef | None:
        if network not in self._pools:
            pool = self.store.get_pool(network)
            if pool is None:
                return None
            self._pools[network] = pool
        return self._pools[network]

    def _cooldown_ms(self, pool: PoolDef) -> int:
        return (pool.cooldown_s or self.default_cooldown_s) * 1000

    def _occupancy(self, network: str) -> list[SubnetOccupancy]:
        """Built once per network from the store (at start, or first use after a definition
        change or a failed commit, when no write of the network is queued), then kept up to date
        by every decision."""
        occ = self._occ.get(network)
        if occ is not None:
            return occ
        pool = self._pool(network)
        assert pool is not None
        occ = [SubnetOccupancy(s) for s in pool.subnets]
        now, cool = self._now_ms(), self._cooldown_ms(pool)
        for e in self.store.list_entries(network, (ACTIVE, RELEASED, QUARANTINED)):
            k = _subnet_of(pool, e.ip, e.subnet_index)
            off = occ[k].offset(e.ip) if k is not None else None
            if k is None or off is None:
                continue
            if e.state == ACTIVE:
                occ[k].mark_active(off, advance=False)
            elif e.state == RELEASED:
                occ[k].load_cooling(off, e.changed_ms + cool, now)
            else:
                occ[k].load_quarantined(off, e.changed_ms + self.quarantine_s * 1000, now)
        for k, o in enumerate(occ):
            o.finish_load()
            cursor = self.store.get_cursor(network, k)
            off = o.offset(IPAddress(cursor)) if cursor else None
            if off is not None:
                o.cursor = off
        self._occ[network] = occ
        return occ

    def warm(self) -> int:
        """Build every stored network's occupancy now (the daemon does this before serving, so
        that no request pays for it). Returns the number of networks."""
        with self._lock:
            nets = self.store.networks()
            for net in nets:
                self._occupancy(net)
            return len(nets)

    def ensure_pool(self, network: str, pool: PoolDef) -> None:
        """Store the definition on first use; accept a changed one only when it is safe."""

        def plan(quiesced: bool) -> _Plan[None]:
            self._need_quiesce(network, pool, quiesced)
            if not self._stage_pool(network, pool):
                return _Plan(None)
            staged = self._staged.pop(network)
            return _Plan(None, self._submit(Write(lambda s: s.put_pool(network, staged)), {}, ()))

        self._execute(plan)

    def _need_quiesce(self, network: str, pool: PoolDef, quiesced: bool) -> None:
        """A changed definition of a known network is checked against every live lease: only
        with nothing queued."""
        old = self._pool(network)
        if not quiesced and old is not None and old is not pool and old != pool:
            raise _NeedsQuiesce

    def _stage_pool(self, network: str, pool: PoolDef) -> bool:
        """Use `pool` in memory; True when it still has to be written to the store. A request
        that then fails (exhausted, bad static address) must leave the store unchanged, so the
        write is queued only with the request's reservation (_reserve)."""
        old = self._pool(network)
        if old is pool:
            return False
        if old == pool:
            self._pools[network] = pool  # the same definition: next time, identity says so
            return False
        if old is not None:
            self._check_change(network, old, pool)
            log.warning("network=%s msg=%s", network, "pool definition changed (safe change accepted)")
        self._pools[network] = pool
        self._occ.pop(network, None)
        self._staged[network] = pool
        return True

    def _unstage_pool(self, network: str) -> None:
        if self._staged.pop(network, None) is not None:
            self._pools.pop(network, None)  # reload the stored definition (if any) next time
            self._occ.pop(network, None)

    def _check_change(self, network: str, old: PoolDef, new: PoolDef) -> None:
        live = self.store.list_entries(network, (ACTIVE,))
        if not live:
            return  # nothing can be re-numbered or stranded
        if [(s.subnet, s.gateway) for s in old.subnets] != [(s.subnet, s.gateway) for s in new.subnets]:
            def show(p: PoolDef) -> str:
                return ", ".join(f"{s.subnet} gw {s.gateway or 'none'}" for s in p.subnets)
            raise PoolDefinitionConflict(
                f"network {network}: definition changed from [{show(old)}] to [{show(new)}] while "
                f"{len(live)} address(es) are in use; subnets and gateways of a network in use cannot "
                f"change (release its leases first or use another network name)")
        stranded = [e for e in live if not new.subnets[e.subnet_index].allocatable(e.ip)]
        if stranded:
            shown = ", ".join(f"{e.ip} ({e.container_id}/{e.ifname})" for e in stranded[:5])
            raise PoolDefinitionConflict(
                f"network {network}: the new definition of subnet "
                f"{new.subnets[stranded[0].subnet_index].subnet} excludes or leaves out addresses in "
                f"use: {shown}{' ...' if len(stranded) > 5 else ''}")

    # ---- allocate ----------------------------------------------------------------------------

    def allocate(self, req: Request) -> Grant:
        if req.requested_mac and not MAC_RE.match(req.requested_mac):
            raise InvalidRequest(f"network {req.network}: requested MAC {req.requested_mac!r} is not "
                                 "a MAC address (aa:bb:cc:dd:ee:ff)")
        static = self._static_by_subnet(req)
        pre = self._prefetch(req.network, req.container_id, req.ifname)
        grant = self._execute(lambda quiesced: self._plan_allocate(req, static, pre, quiesced))
        if grant.existing or not (req.conflict_check and req.netns and self.prober is not None):
            return grant
        return self._probe_all(req, grant.pool, list(grant.entries), static)

    def _plan_allocate(self, req: Request, static: dict[int, IPAddress], pre: _Prefetch | None,
                       quiesced: bool) -> _Plan[Grant]:
        pool = req.pool
        self._need_quiesce(req.network, pool, quiesced)
        self._stage_pool(req.network, pool)
        try:
            held, pending = self._held(req.network, req.container_id, req.ifname, pre)
            if held:
                grant = self._existing(req, pool, held, static)
                staged = self._staged.pop(req.network, None)
                if staged is not None:  # a safe definition change with a lease already held
                    w = Write(lambda s: s.put_pool(req.network, staged))
                    return _Plan(grant, self._submit(w, {}, ()))
                return _Plan(grant, pending, own=False)
            entries, w = self._reserve(req, pool, range(len(pool.subnets)), static, [])
            return _Plan(Grant(tuple(entries), pool), w)
        finally:
            self._unstage_pool(req.network)  # no-op once queued

    def _static_by_subnet(self, req: Request) -> dict[int, IPAddress]:
        out: dict[int, IPAddress] = {}
        pool = req.pool
        for ip in req.requested_ips:
            k = next((i for i, s in enumerate(pool.subnets) if ip in s.subnet), None)
            if k is None:
                raise AddressOutOfPool(
                    f"network {req.network}: requested address {ip} is outside every subnet "
                    f"({', '.join(str(s.subnet) for s in pool.subnets)})")
            spec = pool.subnets[k]
            if k in out:
                raise InvalidRequest(f"network {req.network}: subnet {spec.subnet}: two requested "
                                     f"addresses ({out[k]}, {ip}); one address per subnet entry")
            why = _why_not_allocatable(spec, ip)
            if why:
                raise AddressOutOfPool(f"network {req.network}: subnet {spec.subnet}: requested address "
                                       f"{ip} {why}")
            out[k] = ip
        return out

    def _existing(self, req: Request, pool: PoolDef, held: list[Entry],
                  static: dict[int, IPAddress]) -> Grant:
        for k, ip in static.items():
            mine = next((e for e in held if e.subnet_index == k), None)
            if mine is not None and mine.ip != ip:
                raise AddressTaken(
                    f"network {req.network}: attachment {req.container_id}/{req.ifname} already holds "
                    f"{mine.ip} in subnet {pool.subnets[k].subnet}, not the requested {ip}")
        return Grant(tuple(held), pool, existing=True)

    def _reserve(self, req: Request, pool: PoolDef, subnets: Sequence[int],
                 static: dict[int, IPAddress], held: list[Entry]) -> tuple[list[Entry], Write]:
        """Pick one address per subnet entry and queue them as ONE reservation, so a dual-stack
        request never leaves half a lease behind (caller holds the lock). `held`: the
        attachment's other live entries (when one address of it is replaced after a conflict)."""
        occs = self._occupancy(req.network)
        now = self._now_ms()
        for k in subnets:
            occs[k].expire(now)
        picked = [(k, self._pick(req, pool, k, static.get(k))) for k in subnets]
        entries = [self._entry(req, pool, k, occs[k].address(off), now) for k, off in picked]
        for k, off in picked:
            occs[k].mark_active(off, advance=True)
        staged = self._staged.pop(req.network, None)
        network = req.network

        def apply(s: Store) -> None:
            if staged is not None:
                s.put_pool(network, staged)
            s.reserve(entries)

        owner = (req.network, req.container_id, req.ifname)
        mine = tuple(sorted(held + entries, key=lambda e: e.subnet_index))
        return entries, self._submit(Write(apply), {owner: mine}, entries)

    def _pick(self, req: Request, pool: PoolDef, k: int, want: IPAddress | None) -> int:
        occ, spec = self._occupancy(req.network)[k], pool.subnets[k]
        if want is not None:
            self._check_static_free(req, spec, want)
            off = occ.offset(want)
            assert off is not None  # _static_by_subnet checked it is allocatable
            return off
        off = occ.next_free()
        if off is None:
            off = occ.oldest_cooling()
        if off is None:
            raise PoolExhausted(
                f"network {req.network}: subnet {spec.subnet} exhausted: "
                f"{occ.active + occ.quarantined} of {occ.total} addresses in use"
                + (f" ({occ.quarantined} quarantined after conflicts)" if occ.quarantined else ""))
        return off

    def _entry(self, req: Request, pool: PoolDef, k: int, ip: IPAddress, now: int) -> Entry:
        spec = pool.subnets[k]
        # The lease MAC: requested, else macFromIP on the IPv4 entry (0a:58:<ipv4 bytes>).
        mac = req.requested_mac or (mac_from_ipv4(ip) if pool.mac_from_ip and ip.version == 4 else "")
        return Entry(
            network=req.network, address=IPNetwork((int(ip), spec.subnet.prefixlen), ip.version),
            subnet_index=k, container_id=req.container_id, ifname=req.ifname, state=ACTIVE,
            gateway=spec.gateway, pod=req.pod, mac=mac, netns=req.netns, created_ms=now, changed_ms=now)

    def _check_static_free(self, req: Request, spec: SubnetSpec, ip: IPAddress) -> None:
        cur = self._entry_at(req.network, str(ip))
        if cur is None or cur.state == RELEASED:
            return  # a cooling address may be requested explicitly
        if cur.state == ACTIVE:
            raise AddressTaken(f"network {req.network}: subnet {spec.subnet}: requested address {ip} is in "
                               f"use by container {cur.container_id} ifname {cur.ifname}")
        if cur.state == QUARANTINED and cur.changed_ms + self.quarantine_s * 1000 > self._now_ms():
            raise AddressTaken(f"network {req.network}: subnet {spec.subnet}: requested address {ip} is "
                               f"quarantined: {cur.conflict_mac or 'another host'} answered for it "
                               "on the wire")

    # ---- conflict probing --------------------------------------------------------------------

    def _probe_all(self, req: Request, pool: PoolDef, entries: list[Entry],
                   static: dict[int, IPAddress]) -> Grant:
        assert self.prober is not None
        quarantined: list[str] = []
        out: list[Entry] = []
        for e in entries:
            cur = e
            for attempt in range(1, CONFLICT_TRIES + 1):
                res = self.prober.detect(req.netns, req.ifname, cur.ip, req.conflict_check_wait_ms)
                if res is None:
                    log.info("network=%s container_id=%s ifname=%s netns=%s msg=%s", req.network,
                             req.container_id, req.ifname, req.netns,
                             "interface not in netns yet: conflict probing skipped")
                    return Grant(tuple(entries), pool, conflict_probed=False)
                if not res.conflict:
                    break
                self._quarantine(req.network, cur, res.mac)
                quarantined.append(str(cur.ip))
                spec = pool.subnets[cur.subnet_index]
                if cur.subnet_index in static or attempt == CONFLICT_TRIES:
                    self.release(req.network, req.container_id, req.ifname)
                    tried = ", ".join(quarantined[-attempt:])
                    raise AddressConflict(
                        f"network {req.network}: subnet {spec.subnet}: address {cur.ip} is in use on the "
                        f"wire (MAC {res.mac or 'unknown'} answered the ARP/DAD probe); tried {tried}")
                cur = self._execute(functools.partial(self._plan_replace, req, pool, cur.subnet_index))
            out.append(cur)
        return Grant(tuple(out), pool, conflict_probed=True,
                     quarantined=tuple(quarantined))

    def _plan_replace(self, req: Request, pool: PoolDef, k: int, quiesced: bool) -> _Plan[Entry]:
        """Another address for subnet entry k of an attachment that keeps its other entries."""
        held, _ = self._held(req.network, req.container_id, req.ifname)
        entries, w = self._reserve(req, pool, [k], {}, held)
        return _Plan(entries[0], w)

    def _quarantine(self, network: str, e: Entry, mac: str) -> None:
        def plan(quiesced: bool) -> _Plan[None]:
            now = self._now_ms()
            occ = self._occupancy(network)[e.subnet_index]
            off = occ.offset(e.ip)
            if off is not None:
                occ.mark_quarantined(off, now + self.quarantine_s * 1000, was_active=True)
            held, _ = self._held(network, e.container_id, e.ifname)
            q = replace(e, state=QUARANTINED, conflict_mac=mac, changed_ms=now)
            w = Write(lambda s: s.quarantine(network, str(e.ip), conflict_mac=mac, now_ms=now))
            owner = (network, e.container_id, e.ifname)
            return _Plan(None, self._submit(w, {owner: tuple(x for x in held if x.ip != e.ip)}, [q]))

        self._execute(plan)
        log.warning("network=%s ip=%s conflict_mac=%s msg=%s", network, e.ip, mac,
                    "address answered on the wire: quarantined")

    # ---- release, gc, queries ----------------------------------------------------------------

    def release(self, network: str | None, container_id: str, ifname: str) -> list[Entry]:
        """Release the attachment (in every network when network is None); returns what was
        released once that is durable. The store decides what the attachment held (one UPDATE
        in the batch, nothing read before), and its addresses start cooling down in memory only
        once the release is durable, so a release never costs a read and never frees an address
        early."""
        w = self._execute(lambda quiesced: self._plan_release(network, container_id, ifname))
        return list(w.result)

    def _plan_release(self, network: str | None, container_id: str, ifname: str) -> _Plan[Write]:
        now = self._now_ms()
        w = Write(lambda s: s.release_by_owner(network, container_id, ifname, now), after=self._released)
        # The attachment holds nothing once this is durable (for one network: in every network
        # the view cannot be keyed; a concurrent Allocate then answers from the durable state).
        self._submit(w, {(network, container_id, ifname): ()} if network is not None else {}, ())
        return _Plan(w, w)

    def _released(self, entries: Any) -> None:
        """A release is durable (called by _settle, under the lock): its addresses cool down."""
        now = self._now_ms()
        for e in entries:
            pool = self._pool(e.network)
            occ_list = self._occ.get(e.network)
            if pool is None or occ_list is None:
                continue  # not built: it will be built from the store, which has the release
            k = _subnet_of(pool, e.ip, e.subnet_index)
            off = occ_list[k].offset(e.ip) if k is not None else None
            if k is not None and off is not None and occ_list[k].is_active(off):
                occ_list[k].mark_released(off, e.changed_ms + self._cooldown_ms(pool), now)

    def gc(self, network: str | None, valid: Iterable[tuple[str, str]]) -> list[Entry]:
        """Release every live attachment not in `valid`: quiesced (the store lists them all),
        one batch (one fsync)."""
        keep = set(valid)

        def plan(quiesced: bool) -> _Plan[list[Write]]:
            owners = {(e.network, e.container_id, e.ifname)
                      for e in self.store.list_entries(network, (ACTIVE,))}
            writes = [self._plan_release(net, cid, ifname).result
                      for net, cid, ifname in sorted(owners) if (cid, ifname) not in keep]
            return _Plan(writes, writes[-1] if writes else None)  # one batch: all settle together

        return [e for w in self._execute(plan, quiesce=True) for e in w.result]

    def get(self, network: str, container_id: str, ifname: str) -> tuple[list[Entry], PoolDef | None]:
        """The attachment's durable lease (a lease still being granted is not shown yet)."""
        with self._lock:
            pool = self._pool(network)
        return self.store.get_by_owner(network, container_id, ifname), pool

    def usage(self, network: str | None = None) -> list[PoolUsage]:
        out = []
        with self._lock:
            nets = [network] if network else self.store.networks()
            for net in nets:
                pool = self._pool(net)
                if pool is None:
                    continue
                occ = self._occupancy(net)
                occ_now = self._now_ms()
                for s, o in zip(pool.subnets, occ, strict=True):
                    o.expire(occ_now)
                    out.append(PoolUsage(net, s.subnet, s.gateway, o.active, o.total, o.quarantined))
        return out

    def leases(self, network: str | None = None, all_states: bool = False) -> list[Entry]:
        states: Sequence[str] = (ACTIVE, RELEASED, QUARANTINED) if all_states else (ACTIVE,)
        return self.store.list_entries(network, states)


def _subnet_of(pool: PoolDef, ip: IPAddress, hint: int) -> int | None:
    if 0 <= hint < len(pool.subnets) and ip in pool.subnets[hint].subnet:
        return hint
    return next((i for i, s in enumerate(pool.subnets) if ip in s.subnet), None)


def _why_not_allocatable(spec: SubnetSpec, ip: IPAddress) -> str:
    """'' when `ip` may be handed out, else why not (for the 102 message)."""
    if spec.allocatable(ip):
        return ""
    if spec.gateway is not None and ip == spec.gateway:
        return "is the subnet's gateway"
    if ip in spec.reserved():
        return "is the subnet's network or broadcast address"
    if not spec.range_start <= ip <= spec.range_end:
        return f"is outside the range {spec.range_start}-{spec.range_end}"
    rng = next((r for r in spec.exclude if ip in r), None)
    return f"is excluded ({rng[0]}-{rng[-1]})" if rng is not None else "is not allocatable"
