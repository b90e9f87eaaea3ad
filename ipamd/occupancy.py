"""Which addresses of one subnet entry are free: the allocator's in-memory hint.

Why: allocation must not cost more in a /16 with 60,000 leases than in a /24. A range of up to
DENSE_MAX addresses gets a bytearray with one byte per address (0 free, 1 held: active, cooling
or quarantined, 2 never allocatable), and the next free address after the round-robin cursor is
found with `bytearray.find` at C speed. Larger ranges (IPv6) are sparse: the held offsets live in
a set whose size is the number of leases, and candidates after the cursor are probed one by one,
jumping over exclusions. Built once from the store, then updated incrementally. The store stays
the truth: a wrong hint only costs a retry, never a duplicate.
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque

from netaddr import IPAddress

from core.spec import SubnetSpec
from ipamd.blocks import blocked_spans

DENSE_MAX = 1 << 22  # 4 MiB of bitmap at most per subnet entry
FREE, HELD, BLOCKED = 0, 1, 2


class SubnetOccupancy:
    def __init__(self, spec: SubnetSpec) -> None:
        self.spec = spec
        self.base = int(spec.range_start)
        self.size = int(spec.range_end) - self.base + 1
        self.dense = self.size <= DENSE_MAX
        self.cursor = -1  # offset of the last address handed out
        self.active = 0
        self.quarantined = 0
        # (until_ms, offset) in time order; the dicts say which entries are still current.
        self._cooling: deque[tuple[int, int]] = deque()
        self._cooling_until: dict[int, int] = {}
        self._quarantine: deque[tuple[int, int]] = deque()
        self._quarantine_until: dict[int, int] = {}
        self._held_before: list[int] = []  # what hold() replaced, for unhold()
        self._reserved: set[int] = set()  # a cluster store's outage reserve (held, not active)
        self._blocked_active: set[int] = set()  # reserved-class addresses granted on request
        blocked = blocked_spans(spec)
        self._blocked_starts = [a for a, _ in blocked]
        self._blocked = blocked
        self.total = self.size - sum(b - a + 1 for a, b in blocked)
        if self.dense:
            self._bitmap = bytearray(self.size)
            for a, b in blocked:
                self._bitmap[a:b + 1] = bytes([BLOCKED]) * (b - a + 1)
        else:
            self._held: set[int] = set()

    # ---- offsets <-> addresses -----------------------------------------------------------------

    def offset(self, ip: IPAddress) -> int | None:
        off = int(ip) - self.base
        return off if 0 <= off < self.size else None

    def address(self, offset: int) -> IPAddress:
        return IPAddress(self.base + offset, self.spec.version)

    # ---- state changes (the allocator calls these after the store agreed) --------------------

    def _set(self, off: int, held: bool) -> None:
        if self.dense:
            if self._bitmap[off] != BLOCKED:
                self._bitmap[off] = HELD if held else FREE
        elif held:
            self._held.add(off)
        else:
            self._held.discard(off)

    def is_held(self, off: int) -> bool:
        return self._bitmap[off] != FREE if self.dense else off in self._held

    def is_blocked(self, off: int) -> bool:
        """Never picked automatically (gateway, excluded, reserved class)."""
        if self.dense:
            return self._bitmap[off] == BLOCKED
        k = bisect.bisect_right(self._blocked_starts, off) - 1
        return k >= 0 and off <= self._blocked[k][1]

    def is_free(self, off: int) -> bool:
        return not self.is_held(off) and not self.is_blocked(off)

    def is_reserved(self, off: int) -> bool:
        return off in self._reserved

    def is_active(self, off: int) -> bool:
        """Held by a live lease (not cooling down, not quarantined, not an outage reserve)."""
        if off in self._blocked_active:
            return True
        return (self.is_held(off) and off not in self._cooling_until and off not in self._quarantine_until
                and off not in self._reserved and not self.is_blocked(off))

    def is_quarantined(self, off: int) -> bool:
        return off in self._quarantine_until

    def mark_active(self, off: int, *, advance: bool = True) -> None:
        self._cooling_until.pop(off, None)
        self._reserved.discard(off)
        if self._quarantine_until.pop(off, None) is not None:
            self.quarantined -= 1
        if self.is_blocked(off):  # a reserved-class address granted on request
            if off not in self._blocked_active:
                self._blocked_active.add(off)
                self.active += 1
            return
        if not self.is_active(off):
            self.active += 1
        self._set(off, True)
        if advance:
            self.cursor = off

    def mark_reserved(self, off: int) -> None:
        """Held as a cluster store's outage reserve (see blocks.Placement)."""
        self.clear(off)
        if not self.is_blocked(off):
            self._reserved.add(off)
            self._set(off, True)

    def clear(self, off: int) -> None:
        """Forget whatever holds `off` (it becomes free unless blocked)."""
        if off in self._blocked_active:
            self._blocked_active.discard(off)
            self.active -= 1
            return
        if self.is_active(off):
            self.active -= 1
        self._cooling_until.pop(off, None)
        self._reserved.discard(off)
        if self._quarantine_until.pop(off, None) is not None:
            self.quarantined -= 1
        self._set(off, False)

    def mark_released(self, off: int, until_ms: int, now_ms: int) -> None:
        if off in self._blocked_active:  # never picked automatically: no cool-down needed
            self._blocked_active.discard(off)
            self.active -= 1
            return
        self.active -= 1
        if until_ms <= now_ms:
            self._set(off, False)
            return
        self._cooling_until[off] = until_ms
        self._cooling.append((until_ms, off))

    def mark_quarantined(self, off: int, until_ms: int, *, was_active: bool) -> None:
        if off in self._blocked_active:
            self._blocked_active.discard(off)
            self.active -= 1
            return
        if was_active:
            self.active -= 1
        self._cooling_until.pop(off, None)
        self._reserved.discard(off)
        if off not in self._quarantine_until:
            self.quarantined += 1
        self._set(off, True)
        self._quarantine_until[off] = until_ms
        self._quarantine.append((until_ms, off))

    def load_cooling(self, off: int, until_ms: int, now_ms: int) -> None:
        """At build time: a released entry still inside its cool-down."""
        if until_ms > now_ms:
            self._set(off, True)
            self._cooling_until[off] = until_ms
            self._cooling.append((until_ms, off))

    def load_quarantined(self, off: int, until_ms: int, now_ms: int) -> None:
        """At build time: a quarantined entry (held until its quarantine ends)."""
        if until_ms > now_ms:
            self.mark_quarantined(off, until_ms, was_active=False)

    def finish_load(self) -> None:
        """Entries were loaded in store order; put the expiry queues in time order."""
        self._cooling = deque(sorted(self._cooling))
        self._quarantine = deque(sorted(self._quarantine))

    def expire(self, now_ms: int) -> None:
        """Free cooled-down and no-longer-quarantined addresses."""
        while self._cooling and self._cooling[0][0] <= now_ms:
            until, off = self._cooling.popleft()
            if self._cooling_until.get(off) == until:
                del self._cooling_until[off]
                self._set(off, False)
        while self._quarantine and self._quarantine[0][0] <= now_ms:
            until, off = self._quarantine.popleft()
            if self._quarantine_until.get(off) == until:
                del self._quarantine_until[off]
                self.quarantined -= 1
                self._set(off, False)

    # ---- search ------------------------------------------------------------------------------

    def next_free(self) -> int | None:
        """The first free offset after the cursor (wrapping); None when none is free."""
        start = self.cursor + 1
        if self.dense:
            i = self._bitmap.find(FREE, start)
            if i < 0:
                i = self._bitmap.find(FREE, 0, start)
            return i if i >= 0 else None
        # Sparse: every step hits a held offset or jumps a blocked range, so this ends within
        # len(held) + len(blocked) + 1 steps.
        off = start % self.size
        for _ in range(len(self._held) + len(self._blocked) + 2):
            k = bisect.bisect_right(self._blocked_starts, off) - 1
            if k >= 0 and off <= self._blocked[k][1]:
                off = (self._blocked[k][1] + 1) % self.size
                continue
            if off not in self._held:
                return off
            off = (off + 1) % self.size
        return None

    def find_free(self, lo: int, hi: int, after: int = -1) -> int | None:
        """The first free offset in [lo, hi] after `after` (wrapping inside the span)."""
        start = min(max(lo, after + 1), hi + 1)
        if self.dense:
            i = self._bitmap.find(FREE, start, hi + 1)
            if i < 0:
                i = self._bitmap.find(FREE, lo, start)
            return i if i >= 0 else None
        for off in itertools.chain(range(start, hi + 1), range(lo, start)):  # a block: a few offsets
            if self.is_free(off):
                return off
        return None

    def hold(self, off: int) -> None:
        """Hold `off` for a moment (policy.window: what pick would hand out after it); `unhold`
        puts back exactly what was there."""
        if self.dense:
            self._held_before.append(self._bitmap[off])
            self._bitmap[off] = HELD
        else:
            self._held_before.append(int(off in self._held))
            self._held.add(off)

    def unhold(self, off: int) -> None:
        """Undo the last `hold` (of `off`): holds are undone in reverse order."""
        before = self._held_before.pop()
        if self.dense:
            self._bitmap[off] = before
        elif not before:
            self._held.discard(off)

    def oldest_cooling(self) -> int | None:
        """When nothing is free: the address that has cooled longest (better than failing)."""
        while self._cooling:
            until, off = self._cooling[0]
            if self._cooling_until.get(off) == until:
                return off
            self._cooling.popleft()
        return None

    def held_count(self) -> int:
        return self.active + self.quarantined + len(self._cooling_until) + len(self._reserved)

    @property
    def reserved(self) -> int:
        return len(self._reserved)
