"""Readiness follows the writes (issue 11 item 17), over any store: a failed commit flips it to
NOT_SERVING at once; while writes fail, the periodic check makes one probe write; the next
durable write (a client's or the probe) flips it back. A healthy daemon never writes for its
health. The store here is the in-memory one with a switch that makes every commit fail like a
full disk; the daemon on a real full disk is in tests/integration/test_ipamd_daemon.py."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator

import pytest

from core.spec import parse_ipam
from ipamd.allocator import Allocator, Request
from ipamd.errors import CommitFailed
from ipamd.readiness import Readiness
from ipamd.store import MemoryStore

POOL = parse_ipam({"subnets": [{"subnet": "10.0.0.0/24", "gateway": "10.0.0.1"}]}).pool


class FullDisk(MemoryStore):
    """Commits fail (and are undone) while `full` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.full = False

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        with super().batch():
            yield
            if self.full:
                raise sqlite3.OperationalError("database or disk is full")


def setup() -> tuple[FullDisk, Allocator, Readiness, list[tuple[bool, str]]]:
    store = FullDisk()
    a = Allocator(store)
    events: list[tuple[bool, str]] = []
    r = Readiness(lambda serving, why: events.append((serving, why)), read=store.networks, probe=a.probe_write)
    a.observe_commits(r.commit_result)
    r.start()
    return store, a, r, events


def alloc(a: Allocator, cid: str) -> None:
    a.allocate(Request(network="n", pool=POOL, container_id=cid, ifname="eth0"))


def test_a_failed_commit_flips_readiness_and_a_probe_write_brings_it_back() -> None:
    store, a, r, events = setup()
    alloc(a, "c1")
    assert events == [(True, "")]
    store.full = True
    with pytest.raises(CommitFailed):
        alloc(a, "c2")
    assert events[-1][0] is False and "disk is full" in events[-1][1]  # at once, not at the next check
    r.check()  # the probe write fails too: still not serving
    assert not r.serving and len(events) == 2
    store.full = False
    r.check()  # nobody else writes: the probe notices that the disk has room again
    assert r.serving and events[-1] == (True, "")
    assert [str(e.ip) for e in store.list_entries("n")] == ["10.0.0.2"]  # the probe changed nothing
    assert store.heartbeats >= 2


def test_a_client_write_that_succeeds_flips_it_back_too() -> None:
    store, a, r, events = setup()
    alloc(a, "c1")
    store.full = True
    with pytest.raises(CommitFailed):
        alloc(a, "c2")
    store.full = False
    alloc(a, "c3")
    assert r.serving and [e[0] for e in events] == [True, False, True]


def test_a_healthy_daemon_never_writes_for_its_health() -> None:
    _store, a, r, events = setup()
    alloc(a, "c1")
    batches = a.commits.batches
    for _ in range(5):
        r.check()
    assert a.commits.batches == batches and events == [(True, "")]


def test_the_first_write_of_the_node_failing_recovers_too() -> None:
    """The probe is the store's own heartbeat: it needs no stored network."""
    store, a, r, _events = setup()
    store.full = True
    with pytest.raises(CommitFailed):
        alloc(a, "c1")
    r.check()
    assert not r.serving
    store.full = False
    r.check()
    assert r.serving and store.list_entries("n") == [] and store.networks() == []


def test_an_unreadable_store_is_not_ready() -> None:
    store, _a, r, events = setup()

    def broken() -> list[str]:
        raise sqlite3.OperationalError("disk I/O error")

    r._read = broken
    r.check()
    assert not r.serving and "disk I/O error" in events[-1][1]
    r._read = store.networks
    r.check()
    assert r.serving
