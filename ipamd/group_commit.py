"""Group commit: many requests' store writes made durable in one transaction.

Why: a lease must be durable before its RPC returns, and durability costs one fsync per
transaction (SQLite) or one consensus round (etcd). Concurrent requests queue their writes; the
first waiter that finds no commit in progress becomes the committer (leader/follower: a lone
request commits its own write, with no hand-off to another thread), writes everything queued in
ONE transaction (`Store.batch`), and then releases every waiter of that batch. While it commits,
the next requests are decided in memory and queue up for the next batch.

This module knows only the `Store` protocol and opaque `Write`s; what the writes mean, and what
to do when a batch fails, belongs to its user (pipeline.py, through `settle`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ipamd.errors import StoreConflict
from ipamd.store import Store


@dataclass(eq=False)
class Write:
    """One request's store writes, applied inside the batch that makes them durable."""

    apply: Callable[[Store], Any]
    after: Callable[[Any], None] | None = None  # given apply's result once durable (in settle)
    result: Any = None  # what apply returned
    networks: frozenset[str] | None = frozenset()  # what it touches (None: unknown, any network)
    settled: bool = False  # durable, failed, or aborted
    error: BaseException | None = None  # the batch failed (nothing of it is in the store)
    aborted: bool = False  # undone without being the cause: decide again

    @property
    def durable(self) -> bool:
        return self.settled and self.error is None and not self.aborted


# settle(batch, error): called by the committer after the batch was written (error None) or
# rolled back (error set), before any waiter of the batch is released.
Settle = Callable[[Sequence[Write], BaseException | None], None]


@dataclass(eq=False)
class _Sleeper:
    write: Write
    wake: threading.Lock  # held until the committer releases it
    lead: bool = False  # woken to commit the next batch (its write is still queued)


class GroupCommit:
    """Leader/follower group commit of `Write`s over one store (see the module docstring).

    `submit` must be called in the order the writes were decided (the pipeline calls it under
    its lock). `wait` returns once the write is settled. A waiter that finds no commit in progress
    commits everything queued; otherwise it sleeps on its own lock until the committer settles its
    write (exactly one wake-up) or hands it the next batch. After `settle` ran for a failed batch,
    the writes still queued behind it were decided on top of it: `abort_queued` (called from
    `settle`) settles them as aborted, so that their requests decide again."""

    def __init__(self, store: Store, settle: Settle, max_batch: int = 0) -> None:
        self._store = store
        self._max = max_batch  # writes per transaction at most (0: everything queued)
        self._settle = settle
        self._mu = threading.Lock()
        self._queue: list[Write] = []
        self._last: Write | None = None
        self._leading = False
        self._sleepers: list[_Sleeper] = []
        self.batches = 0  # committed or failed, for tests and metrics
        self.writes = 0

    def submit(self, w: Write) -> Write:
        with self._mu:
            self._queue.append(w)
            self._last = w
        return w

    def tail(self) -> Write | None:
        """The last write submitted (it may be settled already)."""
        with self._mu:
            return self._last

    def abort_queued(self) -> list[Write]:
        with self._mu:
            queued, self._queue = self._queue, []
            for w in queued:
                w.settled = w.aborted = True
            return queued

    def wait(self, w: Write) -> None:
        with self._mu:
            if w.settled:
                return
            if self._leading:
                me = _Sleeper(w, threading.Lock())
                me.wake.acquire()
                self._sleepers.append(me)
            else:
                self._leading = True
                me = None
        if me is not None:
            me.wake.acquire()  # until our write is settled, or we are handed the next batch
            if not me.lead:
                return
        self._commit_queued()

    def _commit_queued(self) -> None:
        """Commit everything queued (this thread leads), settle it, pass the lead on."""
        with self._mu:
            if self._max and len(self._queue) > self._max:
                batch, self._queue = self._queue[:self._max], self._queue[self._max:]
            else:
                batch, self._queue = self._queue, []
        error: BaseException | None = None
        try:
            with self._store.batch():
                for x in batch:
                    x.result = x.apply(self._store)
        except BaseException as exc:  # settled below: every waiter of the batch sees it
            error = exc
        try:
            self._settle(batch, error)
            if error is not None and not isinstance(error, Exception):
                raise error  # KeyboardInterrupt and the like: after the waiters are released
        finally:
            with self._mu:
                conflict = isinstance(error, StoreConflict)
                for x in batch:
                    x.settled = True
                    x.aborted = conflict  # the hints were stale: decide again on the truth
                    x.error = None if conflict else error
                self.batches += 1
                self.writes += len(batch)
                waiting: list[_Sleeper] = []
                for sl in self._sleepers:
                    if sl.write.settled:
                        sl.wake.release()
                    else:
                        waiting.append(sl)
                self._sleepers = waiting
                if waiting:  # hand the next batch to a thread that waits for it
                    nxt = waiting.pop(0)
                    nxt.lead = True
                    nxt.wake.release()
                else:
                    self._leading = False  # the next waiter to arrive leads
