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
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from netaddr import IPAddress, IPNetwork

from ipamd.errors import (
    AddressConflict,
    AddressOutOfPool,
    AddressTaken,
    InvalidRequest,
    PoolDefinitionConflict,
    PoolExhausted,
    StoreConflict,
)
from ipamd.model import ACTIVE, QUARANTINED, RELEASED, Entry
from ipamd.occupancy import SubnetOccupancy
from ipamd.spec import PodRef, PoolDef, SubnetSpec, mac_from_ipv4
from ipamd.store import Store

log = logging.getLogger("ipamd.allocator")

MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
CONFLICT_TRIES = 3  # candidates probed per subnet entry before giving up with 104
STORE_RETRIES = 8  # hint said free, store said taken: re-mark and retry


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


class Allocator:
    def __init__(self, store: Store, *, default_cooldown_s: int = 30, quarantine_s: int = 600,
                 prober: ConflictProber | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.default_cooldown_s = default_cooldown_s
        self.quarantine_s = quarantine_s
        self.prober = prober
        self.clock = clock
        self._lock = threading.RLock()
        self._pools: dict[str, PoolDef] = {}
        self._occ: dict[str, list[SubnetOccupancy]] = {}
        self._pending: dict[str, PoolDef] = {}  # staged definitions not yet written

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

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
        """Built once per network from the store (at first use after start or a definition
        change), then kept up to date by every state change."""
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

    def ensure_pool(self, network: str, pool: PoolDef) -> None:
        """Store the definition on first use; accept a changed one only when it is safe."""
        with self._lock:
            if self._stage_pool(network, pool):
                self._commit_pool(network)

    def _stage_pool(self, network: str, pool: PoolDef) -> bool:
        """Use `pool` in memory; True when it still has to be written to the store. A request
        that then fails (exhausted, bad static address) must leave the store unchanged, so the
        write happens only once addresses are about to be reserved (_commit_pool)."""
        old = self._pool(network)
        if old == pool:
            return False
        if old is not None:
            self._check_change(network, old, pool)
            log.warning("network=%s msg=%s", network, "pool definition changed (safe change accepted)")
        self._pools[network] = pool
        self._occ.pop(network, None)
        self._pending[network] = pool
        return True

    def _commit_pool(self, network: str) -> None:
        pool = self._pending.pop(network, None)
        if pool is not None:
            self.store.put_pool(network, pool)

    def _unstage_pool(self, network: str) -> None:
        if self._pending.pop(network, None) is not None:
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
        pool = req.pool
        static = self._static_by_subnet(req)
        with self._lock:
            self._stage_pool(req.network, pool)
            try:
                held = self.store.get_by_owner(req.network, req.container_id, req.ifname)
                if held:
                    self._commit_pool(req.network)
                    return self._existing(req, pool, held, static)
                entries = self._reserve(req, pool, range(len(pool.subnets)), static)
            finally:
                self._unstage_pool(req.network)  # no-op once committed
        if not (req.conflict_check and req.netns and self.prober is not None):
            return Grant(tuple(entries), pool)
        return self._probe_all(req, pool, entries, static)

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
                 static: dict[int, IPAddress]) -> list[Entry]:
        """Pick one address per subnet entry and reserve them all in ONE store call, so a
        dual-stack request never leaves half a lease behind (caller holds the lock)."""
        occs = self._occupancy(req.network)
        now = self._now_ms()
        for k in subnets:
            occs[k].expire(now)
        for _ in range(STORE_RETRIES):
            picked = [(k, self._pick(req, pool, k, static.get(k))) for k in subnets]
            entries = [self._entry(req, pool, k, occs[k].address(off), now) for k, off in picked]
            self._commit_pool(req.network)
            try:
                self.store.reserve(entries)
            except StoreConflict as exc:
                hit = next((k for k, e in zip(subnets, entries, strict=True) if str(e.ip) == exc.ip), None)
                if hit is None or hit in static:
                    spec = pool.subnets[hit] if hit is not None else pool.subnets[0]
                    raise AddressTaken(f"network {req.network}: subnet {spec.subnet}: requested address "
                                       f"{exc.ip} is already in use") from None
                stale = occs[hit].offset(IPAddress(exc.ip))
                if stale is not None:  # the hint was stale: learn and pick again
                    occs[hit].mark_active(stale, advance=True)
                log.warning("network=%s ip=%s msg=%s", req.network, exc.ip, "occupancy hint was stale")
                continue
            for k, off in picked:
                occs[k].mark_active(off, advance=True)
            return entries
        raise PoolExhausted(f"network {req.network}: no free address found after {STORE_RETRIES} attempts")

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
            network=req.network, address=IPNetwork(f"{ip}/{spec.subnet.prefixlen}"), subnet_index=k,
            container_id=req.container_id, ifname=req.ifname, state=ACTIVE, gateway=spec.gateway,
            pod=req.pod, mac=mac, netns=req.netns, created_ms=now, changed_ms=now)

    def _check_static_free(self, req: Request, spec: SubnetSpec, ip: IPAddress) -> None:
        cur = self.store.get_entry(req.network, str(ip))
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
                with self._lock:
                    cur = self._reserve(req, pool, [cur.subnet_index], {})[0]
            out.append(cur)
        return Grant(tuple(out), pool, conflict_probed=True,
                     quarantined=tuple(quarantined))

    def _quarantine(self, network: str, e: Entry, mac: str) -> None:
        with self._lock:
            now = self._now_ms()
            self.store.quarantine(network, str(e.ip), conflict_mac=mac, now_ms=now)
            occ = self._occupancy(network)[e.subnet_index]
            off = occ.offset(e.ip)
            if off is not None:
                occ.mark_quarantined(off, now + self.quarantine_s * 1000, was_active=True)
        log.warning("network=%s ip=%s conflict_mac=%s msg=%s", network, e.ip, mac,
                    "address answered on the wire: quarantined")

    # ---- release, gc, queries ----------------------------------------------------------------

    def release(self, network: str | None, container_id: str, ifname: str) -> list[Entry]:
        with self._lock:
            now = self._now_ms()
            out = self.store.release_by_owner(network, container_id, ifname, now)
            for e in out:
                self._forget(e, now)
            return out

    def _forget(self, e: Entry, now: int) -> None:
        occ_list = self._occ.get(e.network)
        pool = self._pool(e.network)
        if occ_list is None or pool is None:
            return  # not built yet: it will be built from the store
        k = _subnet_of(pool, e.ip, e.subnet_index)
        off = occ_list[k].offset(e.ip) if k is not None else None
        if k is not None and off is not None:
            occ_list[k].mark_released(off, now + self._cooldown_ms(pool), now)

    def gc(self, network: str | None, valid: Iterable[tuple[str, str]]) -> list[Entry]:
        keep = set(valid)
        out: list[Entry] = []
        with self._lock:
            owners = {(e.network, e.container_id, e.ifname)
                      for e in self.store.list_entries(network, (ACTIVE,))}
            for net, cid, ifname in sorted(owners):
                if (cid, ifname) not in keep:
                    out += self.release(net, cid, ifname)
        return out

    def get(self, network: str, container_id: str, ifname: str) -> tuple[list[Entry], PoolDef | None]:
        with self._lock:
            return self.store.get_by_owner(network, container_id, ifname), self._pool(network)

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
