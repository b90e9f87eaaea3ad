"""Address blocks: how a subnet entry's automatically allocatable addresses are cut into per-node
blocks, and what a cluster store lets this node pick (`Placement`).

Why blocks (issue 10, Calico's design): a node that allocates from blocks it claimed competes with
no other node, so the hot path needs no cluster-wide lock and no read, only the one write of the
lease itself. Blocks are an *affinity*, never the proof of uniqueness: every grant is still a
compare-and-swap on the address's own key in the store, so a stale block view costs a retry,
never a duplicate.

Geometry: the addresses that may be picked automatically (the range minus the gateway,
network/broadcast, excluded and reserved addresses) are numbered 0, 1, 2, ... in address order;
block n holds numbers [n*size, (n+1)*size). Pure: no I/O, no store.
"""

from __future__ import annotations

import bisect
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from netaddr import IPAddress

from core.spec import SubnetSpec

DEFAULT_BLOCK_SIZE = 16


def blocked_spans(spec: SubnetSpec) -> list[tuple[int, int]]:
    """Merged offset ranges (from range_start) never picked automatically: the gateway,
    network/broadcast, excluded and reserved addresses."""
    base = int(spec.range_start)
    size = int(spec.range_end) - base + 1
    spans = [(r.first - base, r.last - base) for r in (*spec.exclude, *spec.reserved_ranges)]
    spans += [(int(ip) - base,) * 2 for ip in spec.reserved()]
    spans = [(max(a, 0), min(b, size - 1)) for a, b in spans if b >= 0 and a < size]
    merged: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


class Blocks:
    """Block geometry of one subnet entry. Offsets are from the entry's range_start."""

    def __init__(self, spec: SubnetSpec, size: int = DEFAULT_BLOCK_SIZE) -> None:
        self.spec = spec
        self.size = size
        self.base = int(spec.range_start)
        total = int(spec.range_end) - self.base + 1
        # The free segments between blocked spans: (first offset, length, number of its first address)
        self._seg_start: list[int] = []
        self._seg_len: list[int] = []
        self._seg_num: list[int] = []
        cursor = num = 0
        for a, b in [*blocked_spans(spec), (total, total)]:
            if a > cursor:
                self._seg_start.append(cursor)
                self._seg_len.append(a - cursor)
                self._seg_num.append(num)
                num += a - cursor
            cursor = b + 1
        self.addresses = num  # automatically allocatable addresses
        self.count = (num + size - 1) // size

    def number(self, off: int) -> int | None:
        """The address number of offset `off`; None when it is never picked automatically."""
        i = bisect.bisect_right(self._seg_start, off) - 1
        if i < 0 or off >= self._seg_start[i] + self._seg_len[i]:
            return None
        return self._seg_num[i] + off - self._seg_start[i]

    def offset(self, number: int) -> int:
        i = bisect.bisect_right(self._seg_num, number) - 1
        return self._seg_start[i] + number - self._seg_num[i]

    def of(self, ip: IPAddress) -> int | None:
        """The block holding `ip`; None when `ip` is never picked automatically."""
        if ip.version != self.spec.version:
            return None
        n = self.number(int(ip) - self.base)
        return None if n is None else n // self.size

    def span(self, block: int) -> tuple[int, int]:
        """First and last offset of the block (blocked offsets inside it are skipped by callers)."""
        first = block * self.size
        last = min(first + self.size, self.addresses) - 1
        return self.offset(first), self.offset(last)

    def first_last(self, block: int) -> tuple[IPAddress, IPAddress]:
        a, b = self.span(block)
        return IPAddress(self.base + a, self.spec.version), IPAddress(self.base + b, self.spec.version)

    def start_for(self, node: str) -> int:
        """Where `node` starts looking for a free block: spread, so that nodes rarely race."""
        return zlib.crc32(node.encode()) % self.count if self.count else 0


@dataclass(frozen=True)
class Placement:
    """What a cluster store lets this node pick in one subnet entry, as data for the policy.

    Online: its own blocks first, then a block nobody claimed (the store claims it in the same
    transaction as the lease), then a free address in another node's block (borrowed), then its
    own outage reserve. Offline (no etcd member answers): only `outage`, the addresses that the
    store records as this node's own (its reserve, and its own leases released since the outage
    began), which no other node can take.
    """

    node: str
    blocks: Blocks
    claimed: Mapping[int, str] = field(default_factory=dict)  # block -> node (a snapshot)
    own: tuple[int, ...] = ()  # this node's blocks, sorted
    offline: bool = False
    outage: tuple[IPAddress, ...] = ()  # offline: the addresses this node may hand out
    reserve: tuple[IPAddress, ...] = ()  # its outage reserve (online: the last resort)
