"""The commit pipeline: decide under a lock, queue the writes, answer only once they are durable.

Why (issue 6: throughput without weakening durability): a request is *decided* under the lock
against in-memory state (the allocator's occupancy hints, plus views of the writes that are
queued but not yet durable) and queues its store writes (a `Plan`: its result and its `Write`).
Outside the lock it waits until a group commit (group_commit.py) has made them durable; only then
does the caller get its answer. A plan never fails after queueing.

When a batch fails, every request in it fails, the views are dropped and the user's in-memory
state is dropped too (`reset`), to be rebuilt from the store, which holds exactly the durable
writes: no effect of an undone write survives. Requests decided after it (queued, never written)
decide again. A refusal by the store (StoreConflict: the hints were stale) undoes the batch the
same way, and its requests decide again. Decisions that need the complete picture (a pool
definition change, GC) run *quiesced*: new decisions wait, queued writes are flushed first.

The pipeline knows the `Store` protocol and `Entry`, never the allocation policy: a store with
other guarantees (etcd: compare-and-swap writes, one transaction per batch) plugs in below it,
and its refusals arrive here as StoreConflict like SQLite's.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Generic, NamedTuple, TypeVar

from ipamd.errors import CommitFailed, StoreConflict, StoreUnavailable
from ipamd.group_commit import GroupCommit, Write
from ipamd.model import Entry
from ipamd.store import Store

log = logging.getLogger("ipamd.pipeline")

STORE_RETRIES = 8  # a request decides again at most this often (its batch was undone)

T = TypeVar("T")
Owner = tuple[str, str, str]  # (network, container id, ifname)


class Plan(NamedTuple, Generic[T]):
    """What a decision returns: its result, the write to wait for, and whether that write is the
    request's own (its failure fails the request) or one it depends on (its failure: decide again)."""

    result: T
    write: Write | None = None
    own: bool = True


class Prefetch(NamedTuple):
    gen: int
    key: Owner
    entries: list[Entry]


class NeedsQuiesce(Exception):
    """A decision needs the complete picture (no queued writes): run it quiesced."""


class Pipeline:
    """One per store. `lock` guards the pipeline's views and its user's in-memory state: plans
    run under it, and so does `reset` and every write's `after` hook."""

    def __init__(self, store: Store, reset: Callable[[set[str] | None], None],
                 observe: Callable[[BaseException | None], None] | None = None) -> None:
        self.store = store
        self._reset = reset
        # Told every batch's outcome: None when durable, the store's error when it failed (a
        # StoreConflict is not a failure: its requests decide again). Readiness listens here.
        self.observe = observe
        self.lock = threading.RLock()
        self._cv = threading.Condition(self.lock)
        self._gate = 0  # > 0: a quiesced operation is waiting or running; new decisions wait
        self._exclusive = threading.Lock()  # one quiesced operation at a time
        # What the store will say once the queued writes are durable, for the keys they touch:
        # (network, container id, ifname) -> its ACTIVE entries; (network, ip) -> its entry.
        self._owner_view: dict[Owner, tuple[Write, tuple[Entry, ...]]] = {}
        self._ip_view: dict[tuple[str, str], tuple[Write, Entry]] = {}
        self._settled = 0  # batches settled (under the lock): dates a prefetched read
        self.commits = GroupCommit(store, self._settle, getattr(store, "max_batch", 0))

    # ---- deciding, committing, waiting -------------------------------------------------------

    def execute(self, plan: Callable[[bool], Plan[T]], *, quiesce: bool = False) -> T:
        """Decide under the lock (plan(quiesced)), then wait outside it until the write is
        settled. Decide again when the write was undone without being ours to fail."""
        for _ in range(STORE_RETRIES):
            if quiesce:
                with self.quiesced():
                    p = plan(True)
                    if p.write is not None:
                        self.commits.wait(p.write)  # nothing else is queued: this thread commits
            else:
                try:
                    with self.lock:
                        while self._gate:
                            self._cv.wait()
                        p = plan(False)
                except NeedsQuiesce:
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
    def quiesced(self) -> Iterator[None]:
        """Hold the lock with no write queued or in flight: the store is the whole truth."""
        with self._exclusive:
            with self.lock:
                self._gate += 1
            try:
                tail = self.commits.tail()
                if tail is not None:
                    self.commits.wait(tail)
                with self.lock:
                    yield
            finally:
                with self.lock:
                    self._gate -= 1
                    self._cv.notify_all()

    def submit(self, w: Write, owners: dict[Owner, tuple[Entry, ...]], ips: Iterable[Entry]) -> Write:
        """Queue a decided write and record what it will make true (caller holds the lock)."""
        ips = list(ips)
        for key, held in owners.items():
            self._owner_view[key] = (w, held)
        for e in ips:
            self._ip_view[(e.network, str(e.ip))] = (w, e)
        if w.networks is not None:
            w.networks = w.networks | {k[0] for k in owners} | {e.network for e in ips}
        return self.commits.submit(w)

    def _settle(self, batch: Sequence[Write], error: BaseException | None) -> None:
        """Called by the committer once a batch is durable or rolled back."""
        # Neither a conflict (decide again) nor "this change needs etcd" during an etcd outage (the
        # node still serves what it can: readiness follows Cluster.serving for that) is a store
        # that cannot make writes durable.
        if self.observe is not None and not isinstance(error, StoreConflict | StoreUnavailable):
            try:
                self.observe(error)
            except Exception:  # an observer must never break the commit path
                log.exception("msg=%s", "commit observer failed")
        with self.lock:
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
            aborted = self.commits.abort_queued()
            again = len(aborted)
            self._owner_view.clear()
            self._ip_view.clear()
            # Only the networks the undone writes touched are rebuilt (all when one is unknown).
            nets: set[str] | None = set()
            for w in (*batch, *aborted):
                if w.networks is None or nets is None:
                    nets = None
                else:
                    nets |= w.networks
            self._reset(nets)
        if isinstance(error, StoreConflict):
            log.warning("error=%s requests=%d msg=%s", error, len(batch) + again,
                        "store refused a batch (occupancy hint was stale): rebuilding from the store, "
                        "deciding again")
        else:
            log.error("error=%s failed=%d decide_again=%d msg=%s", error, len(batch), again,
                      "store commit failed: the batch's requests fail; in-memory state rebuilt from "
                      "the store")

    # ---- reads that see the queued writes ----------------------------------------------------

    def prefetch(self, network: str, container_id: str, ifname: str) -> Prefetch:
        """Read the attachment's durable entries BEFORE taking the lock (a store read inside it
        lets every other request thread pile up on the lock while it waits for the GIL)."""
        gen = self._settled  # before the read
        held = self.store.get_by_owner(network, container_id, ifname)
        return Prefetch(gen, (network, container_id, ifname), held)

    def held(self, network: str, container_id: str, ifname: str,
             pre: Prefetch | None = None) -> tuple[list[Entry], Write | None]:
        """The attachment's ACTIVE entries including queued writes, and the queued write they
        depend on (None when they are durable). A prefetched read is used only when no batch
        settled since it began: then any write of the attachment committed since is still in the
        view, which wins. Caller holds the lock."""
        key = (network, container_id, ifname)
        v = self._owner_view.get(key)
        if v is not None:
            return list(v[1]), v[0]
        if pre is not None and pre.gen == self._settled and pre.key == key:
            return list(pre.entries), None
        return self.store.get_by_owner(network, container_id, ifname), None

    def entry_at(self, network: str, ip: str) -> Entry | None:
        """The entry at (network, ip) including queued writes. Caller holds the lock."""
        v = self._ip_view.get((network, ip))
        return v[1] if v is not None else self.store.get_entry(network, ip)
