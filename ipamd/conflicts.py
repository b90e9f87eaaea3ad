"""Probe orchestration: probe each freshly granted address on the wire, quarantine the ones someone
answers for, and replace them (bounded).

Why on its own: probing is slow (it waits on the wire for an ARP/NDP answer) and must run outside
the allocator's lock, after the reservation is durable, so that no other request waits for it.
It is also the one place where the answer from the network changes the lease: a quarantine and a
replacement are new decisions, made (and made durable) by the allocator through `Reservations`.
The wire side (ARP/NDP from inside the pod netns) is a `ConflictProber`, injected (probe.py in
the daemon, a fake in unit tests).

Rules: a candidate that someone answers for is quarantined with the answering MAC; a dynamic
address is replaced by the next candidate, at most CONFLICT_TRIES candidates per subnet entry; a
requested (static) address is never replaced. Giving up releases the whole attachment and fails
with 104 (AddressConflict), so nothing is left behind. When the interface is not in the netns yet,
probing is skipped and the grant stands (conflict_probed=False).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from netaddr import IPAddress

from ipamd.errors import AddressConflict
from ipamd.model import Entry
from ipamd.policy import Grant, Request

log = logging.getLogger("ipamd.conflicts")

CONFLICT_TRIES = 3  # candidates probed per subnet entry before giving up with 104


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


class Reservations(Protocol):
    """The allocator's operations that probing needs; each is durable when it returns."""

    def quarantine(self, network: str, entry: Entry, mac: str) -> None: ...

    def reserve_another(self, req: Request, subnet_index: int) -> Entry: ...

    def release(self, network: str | None, container_id: str, ifname: str) -> list[Entry]: ...


def probe_grant(req: Request, grant: Grant, static: Mapping[int, IPAddress], prober: ConflictProber,
                leases: Reservations) -> Grant:
    """Probe every entry of a new `grant`; the grant as it stands after quarantines and
    replacements (or the original grant, unprobed, when the interface is not there yet)."""
    pool = grant.pool
    quarantined: list[str] = []
    out: list[Entry] = []
    for e in grant.entries:
        cur = e
        for attempt in range(1, CONFLICT_TRIES + 1):
            res = prober.detect(req.netns, req.ifname, cur.ip, req.conflict_check_wait_ms)
            if res is None:
                log.info("network=%s container_id=%s ifname=%s netns=%s msg=%s", req.network,
                         req.container_id, req.ifname, req.netns,
                         "interface not in netns yet: conflict probing skipped")
                return Grant(grant.entries, pool, conflict_probed=False)
            if not res.conflict:
                break
            leases.quarantine(req.network, cur, res.mac)
            quarantined.append(str(cur.ip))
            spec = pool.subnets[cur.subnet_index]
            if cur.subnet_index in static or attempt == CONFLICT_TRIES:
                leases.release(req.network, req.container_id, req.ifname)
                tried = ", ".join(quarantined[-attempt:])
                raise AddressConflict(
                    f"network {req.network}: subnet {spec.subnet}: address {cur.ip} is in use on the "
                    f"wire (MAC {res.mac or 'unknown'} answered the ARP/DAD probe); tried {tried}")
            cur = leases.reserve_another(req, cur.subnet_index)
        out.append(cur)
    return Grant(tuple(out), pool, conflict_probed=True, quarantined=tuple(quarantined))
