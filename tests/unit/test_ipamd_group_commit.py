"""Group commit in the allocator: batching, durability before the answer, failed commits, stale hints.

A `GatedStore` wraps a real store and lets a test hold a batch open (a slow fsync) or fail it, so
that the interleavings that matter are produced deterministically rather than by luck.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from netaddr import IPNetwork

from core.spec import PoolDef, parse_ipam
from ipamd.allocator import Allocator, Request
from ipamd.errors import CommitFailed, wire_status
from ipamd.model import ACTIVE, Entry
from ipamd.store import Store

POOL = parse_ipam({"subnets": [{"subnet": "10.0.0.0/24", "gateway": "10.0.0.1"}]}).pool
DUAL = parse_ipam({"subnets": [{"subnet": "10.1.0.0/16", "gateway": "10.1.0.1"},
                               {"subnet": "fd01::/64", "gateway": "fd01::1"}]}).pool


class GatedStore:
    """Delegates to `inner`; `batch()` can be held open (`hold`) or made to fail (`fail`)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.in_batch = threading.Event()  # set while a committer holds a batch
        self.gate = threading.Event()  # a held batch waits for this before committing
        self.gate.set()
        self.fail_next = False
        self.fsync_s = 0.0  # simulated fsync time of every commit
        self.batch_sizes: list[int] = []
        self._writes = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name in ("reserve", "release_by_owner", "put_pool", "quarantine"):
            def counted(*a: Any, **kw: Any) -> Any:
                self._writes += 1
                return attr(*a, **kw)
            return counted
        return attr

    def hold(self) -> None:
        self.gate.clear()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        # The committer has taken its batch: held here, before the store is touched, so that
        # other requests can decide and queue meanwhile (MemoryStore blocks readers in a batch).
        self.in_batch.set()
        self.gate.wait(10)
        time.sleep(self.fsync_s)
        self.in_batch.clear()
        with self.inner.batch():
            self._writes = 0
            yield
            self.batch_sizes.append(self._writes)
            if self.fail_next:
                self.fail_next = False
                raise OSError(5, "Input/output error (injected at COMMIT)")


def req(cid: str, pool: PoolDef = POOL, net: str = "n1") -> Request:
    return Request(network=net, pool=pool, container_id=cid, ifname="eth0")


def ips(entries: Any) -> list[str]:
    return [str(e.ip) for e in entries]


@pytest.fixture
def inner(store: Store) -> Store:
    """The real store under the gate: every store in conftest.STORES."""
    return store


def run_threads(fns: list[Callable[[], None]]) -> list[BaseException]:
    errors: list[BaseException] = []

    def wrap(fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as exc:  # reported to the test
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(fn,)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return errors


def wait_until(cond: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def queued(a: Allocator) -> int:
    return len(a.commits._queue)


def test_16_threads_share_batches_answer_only_when_durable_never_duplicate(inner: Store) -> None:
    store = GatedStore(inner)
    store.fsync_s = 0.002
    a = Allocator(store)  # type: ignore[arg-type]
    granted: dict[str, list[str]] = {}
    lock = threading.Lock()

    def worker(w: int) -> Callable[[], None]:
        def run() -> None:
            for i in range(30):
                cid = f"w{w}i{i}"
                g = a.allocate(req(cid, DUAL))
                # the answer comes only once the lease is committed: any reader sees it now
                assert ips(inner.get_by_owner("n1", cid, "eth0")) == ips(g.entries)
                with lock:
                    granted[cid] = ips(g.entries)
                if i % 3 == 0:
                    assert len(a.release("n1", cid, "eth0")) == 2
                    assert inner.get_by_owner("n1", cid, "eth0") == []
                    with lock:
                        del granted[cid]
        return run

    assert run_threads([worker(w) for w in range(16)]) == []
    live = inner.list_entries("n1")
    assert len({str(e.ip) for e in live}) == len(live) == 2 * len(granted)
    assert {e.container_id: None for e in live}.keys() == granted.keys()
    assert a.commits.batches < a.commits.writes  # requests were grouped
    assert max(store.batch_sizes) > 1


def test_failed_commit_fails_the_batch_and_rolls_back_memory(inner: Store) -> None:
    store = GatedStore(inner)
    a = Allocator(store)  # type: ignore[arg-type]
    assert ips(a.allocate(req("a")).entries) == ["10.0.0.2"]
    store.fail_next = True
    with pytest.raises(CommitFailed) as info:
        a.allocate(req("b"))
    assert wire_status(info.value) == ("UNAVAILABLE", "COMMIT_FAILED") and "nothing was granted" in info.value.msg
    assert inner.get_by_owner("n1", "b", "eth0") == [] and inner.get_entry("n1", "10.0.0.3") is None
    # the address "b" was given in memory (and the round-robin cursor) went back with the batch
    assert ips(a.allocate(req("c")).entries) == ["10.0.0.3"]
    assert a.usage("n1")[0].used == 2
    store.fail_next = True
    with pytest.raises(CommitFailed):
        a.release("n1", "a", "eth0")
    assert ips(inner.get_by_owner("n1", "a", "eth0")) == ["10.0.0.2"]  # still held, durably
    g = a.allocate(req("a"))
    assert g.existing and ips(g.entries) == ["10.0.0.2"]
    assert a.usage("n1")[0].used == 2


def test_requests_queued_behind_a_failed_batch_decide_again(inner: Store) -> None:
    store = GatedStore(inner)
    a = Allocator(store)  # type: ignore[arg-type]
    a.allocate(req("warm"))  # 10.0.0.2
    store.hold()
    store.fail_next = True
    results: dict[str, list[str]] = {}
    failed: list[str] = []

    def alloc(cid: str) -> Callable[[], None]:
        def run() -> None:
            try:
                results[cid] = ips(a.allocate(req(cid)).entries)
            except CommitFailed:
                failed.append(cid)
        return run

    first = threading.Thread(target=alloc("first"))
    first.start()
    assert store.in_batch.wait(10)  # "first" (10.0.0.3) is being committed, alone
    later = [threading.Thread(target=alloc(f"later{i}")) for i in range(4)]
    for t in later:
        t.start()
    wait_until(lambda: queued(a) == 4)  # decided on top of "first", queued for the next batch
    store.gate.set()  # the held batch now fails
    for t in [first, *later]:
        t.join(10)
    assert failed == ["first"]
    assert sorted(results) == [f"later{i}" for i in range(4)]
    got = sorted(ip for v in results.values() for ip in v)
    assert got == ["10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]  # .3 was free again
    live = inner.list_entries("n1")
    assert sorted(e.container_id for e in live) == sorted(["warm", *results])
    assert len({str(e.ip) for e in live}) == len(live)


def test_idempotent_allocate_and_release_wait_for_the_queued_write(inner: Store) -> None:
    store = GatedStore(inner)
    a = Allocator(store)  # type: ignore[arg-type]
    a.allocate(req("warm"))
    store.hold()
    got: dict[str, Any] = {}
    t1 = threading.Thread(target=lambda: got.setdefault("first", a.allocate(req("c"))))
    t1.start()
    assert store.in_batch.wait(10)
    t2 = threading.Thread(target=lambda: got.setdefault("again", a.allocate(req("c"))))
    t3 = threading.Thread(target=lambda: got.setdefault("release", a.release("n1", "c", "eth0")))
    t2.start()
    wait_until(lambda: len(a.commits._sleepers) == 1)  # the retry waits for the in-flight lease
    t3.start()
    wait_until(lambda: queued(a) == 1)  # the release is decided on top of it, queued
    assert "again" not in got
    store.gate.set()
    for t in (t1, t2, t3):
        t.join(10)
    assert got["again"].existing and ips(got["again"].entries) == ips(got["first"].entries) == ["10.0.0.3"]
    assert ips(got["release"]) == ["10.0.0.3"]
    assert inner.get_by_owner("n1", "c", "eth0") == []


def test_stale_hint_refused_by_the_store_is_learnt(inner: Store) -> None:
    a = Allocator(inner)
    assert ips(a.allocate(req("a")).entries) == ["10.0.0.2"]
    # someone writes behind the allocator's back (never in the daemon: one writer per database)
    inner.reserve([Entry("n1", IPNetwork("10.0.0.3/24"), 0, "intruder", "eth0")])
    assert ips(a.allocate(req("b")).entries) == ["10.0.0.4"]
    assert inner.get_entry("n1", "10.0.0.3").container_id == "intruder"  # type: ignore[union-attr]
    assert {e.state for e in inner.list_entries("n1")} == {ACTIVE}


def test_gc_and_definition_change_run_quiesced_in_one_batch(inner: Store) -> None:
    store = GatedStore(inner)
    a = Allocator(store)  # type: ignore[arg-type]
    for cid in "abcd":
        a.allocate(req(cid))
    before = a.commits.batches
    released = a.gc("n1", [("b", "eth0")])
    assert sorted(e.container_id for e in released) == ["a", "c", "d"]
    assert a.commits.batches == before + 1 and store.batch_sizes[-1] == 3
    # a safe definition change (a new exclusion) is checked against every live lease
    wider = parse_ipam({"subnets": [{"subnet": "10.0.0.0/24", "gateway": "10.0.0.1",
                                     "exclude": ["10.0.0.100-10.0.0.120"]}]}).pool
    assert a.allocate(req("e", wider)).entries
    assert inner.get_pool("n1") == wider
