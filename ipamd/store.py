"""The `Store` interface the allocator works against, an in-memory implementation, and the group
commit that batches the allocator's writes.

Why small: the allocator is pure logic over this Protocol, so SQLite (store_sqlite.py) today and
a cluster-wide store (etcd, later) plug in without touching it. Every store must pass the one
contract suite (tests/unit/test_ipamd_store_contract.py). The store is the truth about
uniqueness: `reserve` refuses to make an address ACTIVE twice in a network, whatever the
allocator's in-memory hints say.

Why group commit (`GroupCommit`): a lease must be durable before its RPC returns, and on SQLite
durability is one fsync per transaction. Concurrent requests queue their writes; the first waiter
that finds no commit in progress becomes the committer (leader/follower: a lone request commits
its own write, with no hand-off to another thread), writes everything queued in ONE transaction
(`Store.batch`), fsyncs once, and then releases every waiter of that batch. While it commits,
the next requests are decided in memory and queue up for the next batch.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from core.spec import PoolDef
from ipamd.errors import StoreConflict
from ipamd.model import ACTIVE, QUARANTINED, RELEASED, Entry

log = logging.getLogger("ipamd.store")


class Store(Protocol):
    def get_pool(self, network: str) -> PoolDef | None: ...

    def put_pool(self, network: str, pool: PoolDef) -> None: ...

    def networks(self) -> list[str]: ...

    def batch(self) -> contextlib.AbstractContextManager[None]:
        """Group the writes made inside the block (by the calling thread) into one transaction:
        durable when the block exits, all or nothing. A write that raises inside the block
        changes nothing by itself (as outside a batch); an exception leaving the block undoes
        every write made in it. Reads from other threads see the batch only once it is durable."""
        ...

    def reserve(self, entries: Sequence[Entry], *, advance_cursor: bool = True) -> None:
        """Atomically make every entry ACTIVE (replacing released/quarantined rows of the same
        address). Raise StoreConflict, changing nothing, if any address is already ACTIVE.
        With advance_cursor, the subnet's round-robin cursor moves to each entry's address in
        the same transaction. Durable when it returns (outside a batch)."""
        ...

    def quarantine(self, network: str, ip: str, *, conflict_mac: str, now_ms: int) -> Entry | None:
        """Mark an address QUARANTINED (whatever its state), keeping the row's other fields.
        Returns the new entry, or None when the address has no row."""
        ...

    def release_by_owner(self, network: str | None, container_id: str, ifname: str,
                         now_ms: int) -> list[Entry]:
        """ACTIVE -> RELEASED for the attachment (in every network when network is None).
        Returns the released entries; [] when there were none."""
        ...

    def get_by_owner(self, network: str, container_id: str, ifname: str) -> list[Entry]:
        """The attachment's ACTIVE entries, ordered by subnet index."""
        ...

    def get_entry(self, network: str, ip: str) -> Entry | None: ...

    def list_entries(self, network: str | None = None, states: Iterable[str] = (ACTIVE,)) -> list[Entry]: ...

    def get_cursor(self, network: str, subnet_index: int) -> str | None: ...

    def close(self) -> None: ...


_MISSING: Any = object()


class MemoryStore:
    """Reference implementation; also the fake for unit tests. Thread-safe; a batch holds the
    store's lock for its whole block and undoes its writes from a journal when it fails."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._pools: dict[str, PoolDef] = {}
        self._entries: dict[tuple[str, str], Entry] = {}
        self._cursors: dict[tuple[str, int], str] = {}
        # (network, container id, ifname) -> keys of its ACTIVE entries: no scans per call
        self._owners: dict[tuple[str, str, str], frozenset[tuple[str, str]]] = {}
        self._journal: list[tuple[dict[Any, Any], Any, Any]] | None = None  # (dict, key, old value)

    def _put(self, d: dict[Any, Any], key: Any, value: Any) -> None:
        """Every mutation goes through here (value _MISSING deletes), so a batch can undo it."""
        if self._journal is not None:
            self._journal.append((d, key, d.get(key, _MISSING)))
        if value is _MISSING:
            d.pop(key, None)
        else:
            d[key] = value

    def _index(self, e: Entry, key: tuple[str, str], add: bool) -> None:
        owner = (e.network, e.container_id, e.ifname)
        keys = self._owners.get(owner, frozenset())
        keys = keys | {key} if add else keys - {key}
        self._put(self._owners, owner, keys if keys else _MISSING)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        with self._lock:
            if self._journal is not None:  # nested: part of the outer batch
                yield
                return
            self._journal = []
            try:
                yield
            except BaseException:
                for d, key, old in reversed(self._journal):
                    if old is _MISSING:
                        d.pop(key, None)
                    else:
                        d[key] = old
                raise
            finally:
                self._journal = None

    def get_pool(self, network: str) -> PoolDef | None:
        with self._lock:
            return self._pools.get(network)

    def put_pool(self, network: str, pool: PoolDef) -> None:
        with self._lock:
            self._put(self._pools, network, pool)

    def networks(self) -> list[str]:
        with self._lock:
            return sorted(self._pools)

    def reserve(self, entries: Sequence[Entry], *, advance_cursor: bool = True) -> None:
        with self._lock:
            keys = [(e.network, str(e.ip)) for e in entries]
            if len(set(keys)) != len(keys):
                raise StoreConflict(keys[0][0], "duplicate address in one reservation")
            for (net, ip) in keys:
                old = self._entries.get((net, ip))
                if old is not None and old.state == ACTIVE:
                    raise StoreConflict(net, ip)
            for key, e in zip(keys, entries, strict=True):
                old = self._entries.get(key)
                if old is not None:
                    self._index(old, key, add=False)
                self._put(self._entries, key, replace(e, state=ACTIVE))
                self._index(e, key, add=True)
                if advance_cursor:
                    self._put(self._cursors, (e.network, e.subnet_index), key[1])

    def quarantine(self, network: str, ip: str, *, conflict_mac: str, now_ms: int) -> Entry | None:
        with self._lock:
            old = self._entries.get((network, ip))
            if old is None:
                return None
            new = replace(old, state=QUARANTINED, conflict_mac=conflict_mac, changed_ms=now_ms)
            self._put(self._entries, (network, ip), new)
            self._index(old, (network, ip), add=False)
            return new

    def release_by_owner(self, network: str | None, container_id: str, ifname: str,
                         now_ms: int) -> list[Entry]:
        with self._lock:
            if network is None:
                owners = [o for o in self._owners if o[1:] == (container_id, ifname)]
            else:
                owners = [(network, container_id, ifname)]
            out = []
            for owner in owners:
                keys = self._owners.get(owner, frozenset())
                self._put(self._owners, owner, _MISSING)
                for key in sorted(keys):
                    e = replace(self._entries[key], state=RELEASED, changed_ms=now_ms)
                    self._put(self._entries, key, e)
                    out.append(e)
            return sorted(out, key=lambda e: (e.network, e.subnet_index))

    def get_by_owner(self, network: str, container_id: str, ifname: str) -> list[Entry]:
        with self._lock:
            keys = self._owners.get((network, container_id, ifname), ())
            return sorted((self._entries[k] for k in keys), key=lambda e: e.subnet_index)

    def get_entry(self, network: str, ip: str) -> Entry | None:
        with self._lock:
            return self._entries.get((network, ip))

    def list_entries(self, network: str | None = None, states: Iterable[str] = (ACTIVE,)) -> list[Entry]:
        wanted = set(states)
        with self._lock:
            return sorted((e for e in self._entries.values()
                           if e.state in wanted and (network is None or e.network == network)),
                          key=lambda e: (e.network, e.subnet_index, int(e.ip)))

    def get_cursor(self, network: str, subnet_index: int) -> str | None:
        with self._lock:
            return self._cursors.get((network, subnet_index))

    def close(self) -> None:
        pass


# ---- group commit ----------------------------------------------------------------------------


@dataclass(eq=False)
class Write:
    """One request's store writes, applied inside the batch that makes them durable."""

    apply: Callable[[Store], Any]
    after: Callable[[Any], None] | None = None  # given apply's result once durable (in settle)
    result: Any = None  # what apply returned
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

    `submit` must be called in the order the writes were decided (the allocator calls it under
    its lock). `wait` returns once the write is settled. A waiter that finds no commit in progress
    commits everything queued; otherwise it sleeps on its own lock until the committer settles its
    write (exactly one wake-up) or hands it the next batch. After `settle` ran for a failed batch,
    the writes still queued behind it were decided on top of it: `abort_queued` (called from
    `settle`) settles them as aborted, so that their requests decide again."""

    def __init__(self, store: Store, settle: Settle) -> None:
        self._store = store
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

    def abort_queued(self) -> int:
        with self._mu:
            queued, self._queue = self._queue, []
            for w in queued:
                w.settled = w.aborted = True
            return len(queued)

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
