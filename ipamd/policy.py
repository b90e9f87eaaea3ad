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
- the gateway, network/broadcast and excluded addresses are never handed out; a quarantined
  address is refused until its quarantine ends;
- a pool's stored definition only changes when the change strands no live lease;
- the lease MAC is the requested one, else macFromIP on the IPv4 entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from netaddr import IPAddress, IPNetwork

from core.names import MAC_RE
from core.spec import PodRef, PoolDef, SubnetSpec, mac_from_ipv4
from ipamd.errors import AddressOutOfPool, AddressTaken, InvalidRequest, PoolDefinitionConflict, PoolExhausted
from ipamd.model import ACTIVE, QUARANTINED, RELEASED, Entry
from ipamd.occupancy import SubnetOccupancy


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


# ---- the request ---------------------------------------------------------------------------------


def check_mac(network: str, mac: str) -> None:
    if mac and not MAC_RE.match(mac):
        raise InvalidRequest(f"network {network}: requested MAC {mac!r} is not a MAC address "
                             "(aa:bb:cc:dd:ee:ff)")


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


def pick(network: str, spec: SubnetSpec, occ: SubnetOccupancy, want: IPAddress | None) -> int:
    """The offset in `occ` to hand out: the requested address (already checked), else the next
    free one after the round-robin cursor, else the one that has cooled longest."""
    if want is not None:
        off = occ.offset(want)
        assert off is not None  # static_by_subnet checked it is allocatable
        return off
    off = occ.next_free()
    if off is None:
        off = occ.oldest_cooling()
    if off is None:
        raise PoolExhausted(
            f"network {network}: subnet {spec.subnet} exhausted: "
            f"{occ.active + occ.quarantined} of {occ.total} addresses in use"
            + (f" ({occ.quarantined} quarantined after conflicts)" if occ.quarantined else ""))
    return off


def lease_mac(requested_mac: str, pool: PoolDef, ip: IPAddress) -> str:
    """The lease MAC: requested, else macFromIP on the IPv4 entry (0a:58:<ipv4 bytes>)."""
    return requested_mac or (mac_from_ipv4(ip) if pool.mac_from_ip and ip.version == 4 else "")


def build_entry(req: Request, k: int, ip: IPAddress, now_ms: int) -> Entry:
    """The ACTIVE entry for address `ip` of subnet entry `k` of the request's pool."""
    spec = req.pool.subnets[k]
    return Entry(
        network=req.network, address=IPNetwork((int(ip), spec.subnet.prefixlen), ip.version),
        subnet_index=k, container_id=req.container_id, ifname=req.ifname, state=ACTIVE,
        gateway=spec.gateway, pod=req.pod, mac=lease_mac(req.requested_mac, req.pool, ip),
        netns=req.netns, created_ms=now_ms, changed_ms=now_ms)


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
        if e.state == ACTIVE:
            occ[k].mark_active(off, advance=False)
        elif e.state == RELEASED:
            occ[k].load_cooling(off, e.changed_ms + cooldown_ms, now_ms)
        else:
            occ[k].load_quarantined(off, e.changed_ms + quarantine_ms, now_ms)
    for o, cursor in zip(occ, cursors, strict=True):
        o.finish_load()
        off = o.offset(IPAddress(cursor)) if cursor else None
        if off is not None:
            o.cursor = off
    return occ


# ---- pool definition changes ---------------------------------------------------------------------


def check_change(network: str, old: PoolDef, new: PoolDef, live: Sequence[Entry]) -> None:
    """A changed definition of a network with `live` (ACTIVE) leases is accepted only when it
    neither re-numbers nor strands one of them."""
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
