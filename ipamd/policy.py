"""The allocation policy: which address a request gets, and whether a request or a pool change is
allowed. Plain functions over data.

Why on its own: these are the IPAM rules (issue 3), and the one part every store shares. They take
what they judge as arguments (a subnet's occupancy, the entry at an address, the live leases of a
network) and return an answer or raise a domain error; they take no lock, write no store and start
no thread. So they are tested with plain values, and a cluster store (etcd) changes how decisions
are made durable (pipeline.py, the `Store`), never these rules.

Rules:
- one address per subnet entry; a requested (static) address is honoured or refused (102), never
  silently replaced; an attachment that already holds a lease keeps it;
- round-robin after the last handed-out address; released addresses cool down and are used
  oldest-first only when nothing else is free;
- the gateway, network/broadcast and excluded addresses are never handed out; reserved-class
  addresses (Kube-OVN excludeIps) only on request; a quarantined address is refused until its
  quarantine ends;
- with a cluster store, a node picks from its own blocks, then a block nobody claimed, then a free
  address in another node's block, then its outage reserve; while the store is unreachable only
  from the addresses the store records as its own (blocks.Placement), and a static request waits;
- a pool's stored definition only changes when the change strands no live lease and lets no
  address be handed out that the stored one held back (narrower exclusions are unsafe);
- the lease MAC is the requested one, else macFromIP on the IPv4 entry, else the interface's
  own MAC when the plugin says which it is (what the passive conflict watch compares with).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

from netaddr import IPAddress, IPNetwork

from core.names import MAC_RE
from core.spec import PodRef, PoolDef, Segment, SubnetSpec, mac_from_ipv4
from ipamd.blocks import Placement
from ipamd.errors import (
    AddressOutOfPool,
    AddressTaken,
    InvalidRequest,
    PoolDefinitionConflict,
    PoolExhausted,
    StoreUnavailable,
)
from ipamd.model import ACTIVE, QUARANTINED, RELEASED, RESERVED, Entry
from ipamd.occupancy import SubnetOccupancy

FREE_BLOCK_SCAN = 4096  # blocks looked at for an unclaimed one (an IPv6 /64 has 2^60 blocks)


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
    segment: Segment | None = None  # the L2 segment of the attachment's port (the main plugin)
    interface_mac: str = ""  # the interface's MAC: the lease MAC unless requested/macFromIP
    probe_held: bool = False  # probe what the attachment already holds (from its interface)


@dataclass(frozen=True)
class Grant:
    entries: tuple[Entry, ...]
    pool: PoolDef
    conflict_probed: bool = False
    quarantined: tuple[str, ...] = ()
    existing: bool = False  # idempotent answer: the attachment already held these
    pre_probed: frozenset[int] = frozenset()  # subnet entries given a fresh pre-probed candidate


# ---- the request ---------------------------------------------------------------------------------


def check_mac(network: str, mac: str, what: str = "requested MAC") -> None:
    """A MAC (the requested one, or the interface's) must be a unicast, non-zero MAC address (the
    plugins' rule, cni.netconf)."""
    if not mac:
        return
    if not MAC_RE.match(mac):
        raise InvalidRequest(f"network {network}: {what} {mac!r} is not a MAC address "
                             "(aa:bb:cc:dd:ee:ff)")
    if int(mac[:2], 16) & 1:
        raise InvalidRequest(f"network {network}: {what} {mac} is a multicast address")
    if mac.replace(":", "") == "0" * 12:
        raise InvalidRequest(f"network {network}: {what} {mac} is the all-zero address")


def static_by_subnet(network: str, pool: PoolDef, requested: Sequence[IPAddress]) -> dict[int, IPAddress]:
    """The requested addresses by subnet entry index; refuses an address outside every subnet,
    two in one subnet entry, or one that is never allocatable (102)."""
    out: dict[int, IPAddress] = {}
    for ip in requested:
        k = next((i for i, s in enumerate(pool.subnets) if ip in s.subnet), None)
        if k is None:
            raise AddressOutOfPool(
                f"network {network}: requested address {ip} is outside every subnet "
                f"({', '.join(str(s.subnet) for s in pool.subnets)})")
        spec = pool.subnets[k]
        if k in out:
            raise InvalidRequest(f"network {network}: subnet {spec.subnet}: two requested "
                                 f"addresses ({out[k]}, {ip}); one address per subnet entry")
        why = why_not_allocatable(spec, ip)
        if why:
            raise AddressOutOfPool(f"network {network}: subnet {spec.subnet}: requested address "
                                   f"{ip} {why}")
        out[k] = ip
    return out


def why_not_allocatable(spec: SubnetSpec, ip: IPAddress) -> str:
    """'' when `ip` may be handed out on request, else why not (for the 102 message)."""
    if spec.grantable(ip):
        return ""
    if spec.gateway is not None and ip == spec.gateway:
        return "is the subnet's gateway"
    if ip in spec.reserved():
        return "is the subnet's network or broadcast address"
    if not spec.range_start <= ip <= spec.range_end:
        return f"is outside the range {spec.range_start}-{spec.range_end}"
    rng = next((r for r in spec.exclude if ip in r), None)
    return f"is excluded ({rng[0]}-{rng[-1]})" if rng is not None else "is not allocatable"


def check_existing(req: Request, held: Sequence[Entry], static: dict[int, IPAddress]) -> None:
    """An attachment that holds a lease gets it again; a static request must match it."""
    for k, ip in static.items():
        mine = next((e for e in held if e.subnet_index == k), None)
        if mine is not None and mine.ip != ip:
            raise AddressTaken(
                f"network {req.network}: attachment {req.container_id}/{req.ifname} already holds "
                f"{mine.ip} in subnet {req.pool.subnets[k].subnet}, not the requested {ip}")


def check_static_free(network: str, spec: SubnetSpec, ip: IPAddress, cur: Entry | None, *,
                      now_ms: int, quarantine_ms: int) -> None:
    """May the requested `ip` be handed out, given the entry `cur` the network has at it?"""
    if cur is None or cur.state == RELEASED:
        return  # a cooling address may be requested explicitly
    if cur.state == ACTIVE:
        raise AddressTaken(f"network {network}: subnet {spec.subnet}: requested address {ip} is in "
                           f"use by container {cur.container_id} ifname {cur.ifname}")
    if cur.state == QUARANTINED and cur.changed_ms + quarantine_ms > now_ms:
        raise AddressTaken(f"network {network}: subnet {spec.subnet}: requested address {ip} is "
                           f"quarantined: {cur.conflict_mac or 'another host'} answered for it "
                           "on the wire")


# ---- picking -------------------------------------------------------------------------------------


def pick(network: str, spec: SubnetSpec, occ: SubnetOccupancy, want: IPAddress | None,
         place: Placement | None = None) -> int:
    """The offset in `occ` to hand out: the requested address (already checked), else the next
    free one after the round-robin cursor (with a cluster store: by `place`, see pick_placed),
    else the one that has cooled longest."""
    if want is not None:
        if place is not None and place.offline:
            raise StoreUnavailable(
                f"network {network}: requested address {want}: a static address is reserved cluster-wide "
                "and the cluster store is unreachable; try again later")
        off = occ.offset(want)
        assert off is not None  # static_by_subnet checked it is allocatable
        return off
    off = occ.next_free() if place is None else pick_placed(network, spec, occ, place)
    if off is None:
        off = occ.oldest_cooling()
    if off is None:
        raise PoolExhausted(
            f"network {network}: subnet {spec.subnet} exhausted: "
            f"{occ.active + occ.quarantined} of {occ.total} addresses in use"
            + (f" ({occ.quarantined} quarantined after conflicts)" if occ.quarantined else ""))
    return off


def pick_placed(network: str, spec: SubnetSpec, occ: SubnetOccupancy, place: Placement) -> int | None:
    """A dynamic pick with a cluster store (see blocks.Placement for the order); None when no
    address is free anywhere."""
    offsets = [o for o in (occ.offset(ip) for ip in (place.outage if place.offline else place.reserve))
               if o is not None]
    if place.offline:
        off = next((o for o in offsets if occ.is_free(o) or occ.is_reserved(o)), None)
        if off is None:
            raise StoreUnavailable(
                f"network {network}: subnet {spec.subnet}: the cluster store is unreachable and this "
                f"node's outage reserve is used up ({len(place.outage)} address(es) of its own); try "
                "again later")
        return off
    blocks = place.blocks
    own = list(place.own)
    if own:  # round robin through the node's own blocks, from the block of the cursor
        cur = blocks.number(occ.cursor) if occ.cursor >= 0 else None
        at = bisect.bisect_left(own, cur // blocks.size) if cur is not None else 0
        for b in own[at:] + own[:at]:
            lo, hi = blocks.span(b)
            off = occ.find_free(lo, hi, occ.cursor)
            if off is not None:
                return off
    start = blocks.start_for(place.node)
    for i in range(min(blocks.count, FREE_BLOCK_SCAN)):
        b = (start + i) % blocks.count
        if b not in place.claimed:
            lo, hi = blocks.span(b)
            off = occ.find_free(lo, hi)
            if off is not None:
                return off  # the store claims the block in the lease's transaction
    off = occ.next_free()  # borrowed from another node's block
    if off is None:
        off = next((o for o in offsets if occ.is_reserved(o)), None)  # the node's own reserve
    return off


def window(network: str, spec: SubnetSpec, occ: SubnetOccupancy, n: int,
           place: Placement | None = None) -> list[int]:
    """The next `n` offsets that `pick` would hand out one after the other, in that order (fewer
    when fewer are free): what a segment keeps pre-probed, and the order a fresh candidate is
    taken in. Changes nothing (the caller holds the pipeline lock)."""
    out: list[int] = []
    try:
        while len(out) < n:
            try:
                off = occ.next_free() if place is None else pick_placed(network, spec, occ, place)
            except StoreUnavailable:
                off = None
            if off is None or off in out:
                break
            out.append(off)
            occ.hold(off)
    finally:
        for off in reversed(out):
            occ.unhold(off)
    return out


def lease_mac(requested_mac: str, pool: PoolDef, ip: IPAddress, interface_mac: str = "") -> str:
    """The lease MAC: requested, else macFromIP on the IPv4 entry (0a:58:<ipv4 bytes>), else
    the interface's own."""
    if requested_mac:
        return requested_mac
    if pool.mac_from_ip and ip.version == 4:
        return mac_from_ipv4(ip)
    return interface_mac.lower()


def build_entry(req: Request, k: int, ip: IPAddress, now_ms: int, node: str = "") -> Entry:
    """The ACTIVE entry for address `ip` of subnet entry `k` of the request's pool."""
    spec = req.pool.subnets[k]
    return Entry(
        network=req.network, address=IPNetwork((int(ip), spec.subnet.prefixlen), ip.version),
        subnet_index=k, container_id=req.container_id, ifname=req.ifname, state=ACTIVE,
        gateway=spec.gateway, pod=req.pod,
        mac=lease_mac(req.requested_mac, req.pool, ip, req.interface_mac),
        netns=req.netns, created_ms=now_ms, changed_ms=now_ms, node=node)


def reserve_entry(network: str, pool: PoolDef, k: int, ip: IPAddress, now_ms: int, node: str) -> Entry:
    """An outage-reserve entry: the address held for `node` (a cluster store only)."""
    spec = pool.subnets[k]
    return Entry(network=network, address=IPNetwork((int(ip), spec.subnet.prefixlen), ip.version),
                 subnet_index=k, container_id="", ifname="", state=RESERVED, gateway=spec.gateway,
                 created_ms=now_ms, changed_ms=now_ms, node=node)


# ---- occupancy -----------------------------------------------------------------------------------


def cooldown_ms(pool: PoolDef, default_s: int) -> int:
    return (pool.cooldown_s or default_s) * 1000


def subnet_of(pool: PoolDef, ip: IPAddress, hint: int) -> int | None:
    """The index of the subnet entry holding `ip` (`hint`, the stored index, when it still does)."""
    if 0 <= hint < len(pool.subnets) and ip in pool.subnets[hint].subnet:
        return hint
    return next((i for i, s in enumerate(pool.subnets) if ip in s.subnet), None)


def build_occupancy(pool: PoolDef, entries: Sequence[Entry], cursors: Sequence[str | None], *,
                    now_ms: int, cooldown_ms: int, quarantine_ms: int) -> list[SubnetOccupancy]:
    """Which addresses of each subnet entry are free, from a network's stored entries (any state)
    and its stored round-robin cursors (one per subnet entry)."""
    occ = [SubnetOccupancy(s) for s in pool.subnets]
    for e in entries:
        k = subnet_of(pool, e.ip, e.subnet_index)
        off = occ[k].offset(e.ip) if k is not None else None
        if k is None or off is None:
            continue
        load_entry(occ[k], off, e, now_ms=now_ms, cooldown_ms=cooldown_ms, quarantine_ms=quarantine_ms)
    for o, cursor in zip(occ, cursors, strict=True):
        o.finish_load()
        off = o.offset(IPAddress(cursor)) if cursor else None
        if off is not None:
            o.cursor = off
    return occ


def load_entry(occ: SubnetOccupancy, off: int, e: Entry | None, *, now_ms: int, cooldown_ms: int,
               quarantine_ms: int) -> None:
    """Set the occupancy of `off` from the entry the store has there (None: no entry)."""
    if e is None:
        occ.clear(off)
    elif e.state == ACTIVE:
        occ.mark_active(off, advance=False)
    elif e.state == RESERVED:
        occ.mark_reserved(off)
    elif e.state == RELEASED:
        occ.clear(off)
        occ.load_cooling(off, e.changed_ms + cooldown_ms, now_ms)
    else:
        occ.clear(off)
        occ.load_quarantined(off, e.changed_ms + quarantine_ms, now_ms)


# ---- pool definition changes ---------------------------------------------------------------------


def widened(old: SubnetSpec, new: SubnetSpec) -> str:
    """'' when `new` hands out (automatically or on request) nothing that `old` held back; else
    the first address it would, and how."""
    for lo, hi in _spans(new, statics=True):  # every address new grants on request ...
        bad = _first_outside(lo, hi, _spans(old, statics=True), new.version)
        if bad is not None:
            hint = ""
            if any(bad in r for r in new.reserved_ranges) and any(bad in r for r in old.exclude):
                hint = (" (the stored definition excludes it, this one only reserves it: Kube-OVN's "
                        "excludeIps and ovn-kubernetes' reservedSubnets mean reserved; write exclude or "
                        "excludeSubnets to keep it excluded)")
            return f"{bad} (held back by the stored definition) could be requested{hint}"
    for lo, hi in _spans(new, statics=False):  # ... or picks automatically
        bad = _first_outside(lo, hi, _spans(old, statics=False), new.version)
        if bad is not None:
            return f"{bad} (reserved by the stored definition) could be picked automatically"
    return ""


def _spans(spec: SubnetSpec, *, statics: bool) -> list[tuple[int, int]]:
    """Integer spans of the addresses `spec` grants on request (statics) or picks automatically."""
    held = [(r.first, r.last) for r in (spec.exclude if statics else (*spec.exclude, *spec.reserved_ranges))]
    held += [(int(ip), int(ip)) for ip in spec.reserved()]
    out, cur = [], int(spec.range_start)
    for a, b in sorted(held):
        if a > cur:
            out.append((cur, min(a - 1, int(spec.range_end))))
        cur = max(cur, b + 1)
    if cur <= int(spec.range_end):
        out.append((cur, int(spec.range_end)))
    return [(a, b) for a, b in out if a <= b]


def _first_outside(lo: int, hi: int, allowed: Sequence[tuple[int, int]], version: int) -> IPAddress | None:
    """The first address of [lo, hi] outside every span of `allowed` (sorted, disjoint)."""
    cur = lo
    for a, b in allowed:
        if b < cur:
            continue
        if a > cur:
            return IPAddress(cur, version)
        cur = b + 1
        if cur > hi:
            return None
    return IPAddress(cur, version) if cur <= hi else None


def check_change(network: str, old: PoolDef, new: PoolDef, live: Sequence[Entry]) -> None:
    """A changed definition of a network with `live` (ACTIVE) leases is accepted only when it
    neither re-numbers nor strands one of them, nor hands out an address that the stored one held
    back (narrower exclusions or a wider range: a second, older config of the same network must
    not undo what the first one excluded)."""
    if not live:
        return  # nothing can be re-numbered or stranded
    if [(s.subnet, s.gateway) for s in old.subnets] != [(s.subnet, s.gateway) for s in new.subnets]:
        def show(p: PoolDef) -> str:
            return ", ".join(f"{s.subnet} gw {s.gateway or 'none'}" for s in p.subnets)
        raise PoolDefinitionConflict(
            f"network {network}: definition changed from [{show(old)}] to [{show(new)}] while "
            f"{len(live)} address(es) are in use; subnets and gateways of a network in use cannot "
            f"change (release its leases first or use another network name)")
    for o, n in zip(old.subnets, new.subnets, strict=True):
        why = widened(o, n)
        if why:
            raise PoolDefinitionConflict(
                f"network {network}: subnet {n.subnet}: the new definition holds back fewer addresses "
                f"than the stored one: {why}; while {len(live)} address(es) are in use a network's "
                "exclusions can only grow (release its leases first or use another network name)")
    stranded = [e for e in live if not new.subnets[e.subnet_index].grantable(e.ip)]
    if stranded:
        shown = ", ".join(f"{e.ip} ({e.container_id}/{e.ifname})" for e in stranded[:5])
        raise PoolDefinitionConflict(
            f"network {network}: the new definition of subnet "
            f"{new.subnets[stranded[0].subnet_index].subnet} excludes or leaves out addresses in "
            f"use: {shown}{' ...' if len(stranded) > 5 else ''}")
