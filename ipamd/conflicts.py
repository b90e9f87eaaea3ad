"""Probe orchestration: probe each freshly granted address on the wire (unless it was a fresh
pre-probed candidate), quarantine the ones someone answers for, and replace them (bounded).

Why on its own: probing is slow (it waits on the wire for an ARP/NDP answer) and must run outside
the allocator's lock, after the reservation is durable, so that no other request waits for it.
It is also the one place where the answer from the network changes the lease: a quarantine and a
replacement are new decisions, made (and made durable) by the allocator through `Reservations`.
The wire side is a `Detect` function chosen per request by the allocator: from ipamd's probe
port on the attachment's L2 segment (segments.py) when the request names one, else from the pod's
interface inside its netns (probe.py, a `ConflictProber`); a fake in unit tests.

Rules: a candidate that someone answers for is quarantined with the answering MAC; a dynamic
address is replaced by the next candidate, at most CONFLICT_TRIES candidates per subnet entry; a
requested (static) address is never replaced. Giving up releases the whole attachment and fails
with 104 (AddressConflict), so nothing is left behind. When the interface is not in the netns yet,
probing is skipped and the grant stands (conflict_probed=False).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
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


# detect(address, wait_ms): the outcome, or None when nothing could probe (the interface is not
# there yet, no probe port): probing is then skipped and the grant says so.
Detect = Callable[[IPAddress, int], "ConflictOutcome | None"]


class Reservations(Protocol):
    """The allocator's operations that probing needs; each is durable when it returns."""

    def quarantine(self, network: str, entry: Entry, mac: str) -> None: ...

    def reserve_another(self, req: Request, subnet_index: int) -> tuple[Entry, bool]:
        """Another address for one subnet entry; True when it is a fresh pre-probed candidate."""
        ...

    def release(self, network: str | None, container_id: str, ifname: str) -> list[Entry]: ...


def probe_grant(req: Request, grant: Grant, static: Mapping[int, IPAddress], detect: Detect,
                leases: Reservations, where: str = "") -> Grant:
    """Probe every entry of `grant` that was not a fresh pre-probed candidate; the grant as it
    stands after quarantines and replacements (conflict_probed False when, at some point, nothing
    could probe: the entries from there on are unprobed). `where` names the probe's origin for the
    logs."""
    pool = grant.pool
    quarantined: list[str] = []
    out: list[Entry] = []
    pre = set(grant.pre_probed)
    origin = f" from {where}" if where else ""
    for i, e in enumerate(grant.entries):
        cur, fresh = e, e.subnet_index in pre
        for attempt in range(1, CONFLICT_TRIES + 1):
            if fresh:
                break
            res = detect(cur.ip, req.conflict_check_wait_ms)
            if res is None:
                log.info("network=%s container_id=%s ifname=%s netns=%s msg=%s", req.network,
                         req.container_id, req.ifname, req.netns,
                         f"nothing to probe{origin}: conflict probing skipped")
                # The grant as the store now holds it: an address already quarantined here was
                # replaced in the lease, so its replacement (unprobed) is what the pod gets.
                return replace(grant, entries=(*out, cur, *grant.entries[i + 1:]), conflict_probed=False,
                               quarantined=tuple(quarantined), pre_probed=frozenset(pre))
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
                    f"wire (MAC {res.mac or 'unknown'} answered the ARP/DAD probe{origin}); "
                    f"tried {tried}")
            cur, fresh = leases.reserve_another(req, cur.subnet_index)
            if fresh:
                pre.add(cur.subnet_index)
        out.append(cur)
    return replace(grant, entries=tuple(out), conflict_probed=True, quarantined=tuple(quarantined),
                   pre_probed=frozenset(pre))
