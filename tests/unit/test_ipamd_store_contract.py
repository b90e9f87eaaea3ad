"""One contract, every store: each test runs over every store in conftest.STORES (MemoryStore,
SqliteStore and the etcd store against a real etcd)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from netaddr import IPNetwork

from core.spec import PodRef, parse_ipam
from ipamd.errors import StoreConflict
from ipamd.model import ACTIVE, QUARANTINED, RELEASED, Entry
from ipamd.store import Store
from ipamd.store_sqlite import SchemaError, SqliteStore
from tests.unit.conftest import NODE

POOL = parse_ipam({"subnets": [{"subnet": "10.0.0.0/24", "gateway": "10.0.0.1"}, "fd00::/64"],
                   "routes": [{"dst": "0.0.0.0/0"}], "dns": {"nameservers": ["10.0.0.53"]}}).pool


def entry(ip: str, cid: str = "c1", ifname: str = "eth0", net: str = "n1", k: int = 0) -> Entry:
    return Entry(network=net, address=IPNetwork(ip), subnet_index=k, container_id=cid, ifname=ifname,
                 pod=PodRef("ns", "pod", "uid-1"), mac="0a:58:0a:00:00:05", netns="/run/netns/x",
                 created_ms=1000, changed_ms=1000, node=NODE)


def test_pool_round_trip(store: Store) -> None:
    assert store.get_pool("n1") is None and store.networks() == []
    store.put_pool("n1", POOL)
    assert store.get_pool("n1") == POOL and store.networks() == ["n1"]
    changed = replace(POOL, mac_from_ip=True)
    store.put_pool("n1", changed)
    assert store.get_pool("n1") == changed


def test_reserve_get_release(store: Store) -> None:
    e4, e6 = entry("10.0.0.5/24"), entry("fd00::5/64", k=1)
    store.reserve([e4, e6])
    got = store.get_by_owner("n1", "c1", "eth0")
    assert got == [e4, e6]
    assert store.get_entry("n1", "10.0.0.5") == e4
    released = store.release_by_owner("n1", "c1", "eth0", now_ms=5000)
    assert [(str(e.ip), e.state, e.changed_ms) for e in released] == [
        ("10.0.0.5", RELEASED, 5000), ("fd00::5", RELEASED, 5000)]
    assert store.get_by_owner("n1", "c1", "eth0") == []
    assert store.release_by_owner("n1", "c1", "eth0", now_ms=6000) == []  # idempotent
    assert {e.state for e in store.list_entries("n1", (RELEASED,))} == {RELEASED}


def test_store_refuses_duplicate_active_and_is_atomic(store: Store) -> None:
    store.reserve([entry("10.0.0.5/24")])
    with pytest.raises(StoreConflict):
        store.reserve([entry("10.0.0.6/24", cid="c2"), entry("10.0.0.5/24", cid="c2")])
    # nothing of the failed reservation stayed
    assert store.get_entry("n1", "10.0.0.6") is None
    assert store.get_by_owner("n1", "c2", "eth0") == []
    # the same address in another network is fine
    store.reserve([entry("10.0.0.5/24", net="n2")])


def test_released_and_quarantined_rows_are_replaced(store: Store) -> None:
    store.reserve([entry("10.0.0.5/24")])
    store.release_by_owner(None, "c1", "eth0", now_ms=2000)
    store.reserve([entry("10.0.0.5/24", cid="c2")])
    assert store.get_entry("n1", "10.0.0.5").container_id == "c2"  # type: ignore[union-attr]
    q = store.quarantine("n1", "10.0.0.5", conflict_mac="aa:bb:cc:dd:ee:ff", now_ms=3000)
    assert q is not None and q.state == QUARANTINED and q.conflict_mac == "aa:bb:cc:dd:ee:ff"
    assert store.get_by_owner("n1", "c2", "eth0") == []
    assert store.quarantine("n1", "10.0.0.99", conflict_mac="x", now_ms=1) is None
    store.reserve([entry("10.0.0.5/24", cid="c3")])
    e = store.get_entry("n1", "10.0.0.5")
    assert e is not None and e.state == ACTIVE and e.conflict_mac == ""


def test_release_scoped_by_network(store: Store) -> None:
    store.reserve([entry("10.0.0.5/24", net="n1")])
    store.reserve([entry("10.0.0.5/24", net="n2")])
    assert len(store.release_by_owner("n2", "c1", "eth0", now_ms=1)) == 1
    assert len(store.get_by_owner("n1", "c1", "eth0")) == 1
    assert len(store.release_by_owner(None, "c1", "eth0", now_ms=1)) == 1


def test_list_and_cursor(store: Store) -> None:
    assert store.get_cursor("n1", 0) is None
    store.reserve([entry("10.0.0.9/24", cid="a"), entry("fd00::9/64", cid="a", k=1)])
    store.reserve([entry("10.0.0.7/24", cid="b")], advance_cursor=False)
    assert store.get_cursor("n1", 0) == "10.0.0.9" and store.get_cursor("n1", 1) == "fd00::9"
    assert [str(e.ip) for e in store.list_entries("n1")] == ["10.0.0.7", "10.0.0.9", "fd00::9"]
    assert store.list_entries("n2") == []
    assert store.list_entries(None, ()) == []


def test_durable_across_reopen(make_durable_store: Callable[[], Store]) -> None:
    s = make_durable_store()
    s.put_pool("n1", POOL)
    s.reserve([entry("10.0.0.5/24")])
    with s.batch():
        s.reserve([entry("10.0.0.6/24", cid="c2")])
        s.release_by_owner("n1", "c1", "eth0", now_ms=5000)
    s.close()
    s2 = make_durable_store()
    assert s2.get_pool("n1") == POOL and s2.networks() == ["n1"]
    assert [str(e.ip) for e in s2.get_by_owner("n1", "c2", "eth0")] == ["10.0.0.6"]
    assert s2.get_by_owner("n1", "c1", "eth0") == []
    assert [(str(e.ip), e.state) for e in s2.list_entries("n1", (RELEASED,))] == [("10.0.0.5", RELEASED)]
    assert s2.get_cursor("n1", 0) == "10.0.0.6"


def test_sqlite_file_is_root_only(tmp_path: Path) -> None:
    s = SqliteStore(str(tmp_path / "x.db"))
    s.close()
    assert (tmp_path / "x.db").stat().st_mode & 0o777 == 0o600


def test_sqlite_refuses_newer_schema(tmp_path: Path) -> None:
    s = SqliteStore(str(tmp_path / "x.db"))
    s._db.execute("UPDATE schema_version SET version = 99")
    s.close()
    with pytest.raises(SchemaError, match="newer"):
        SqliteStore(str(tmp_path / "x.db"))


def test_concurrent_reservations_never_duplicate(store: Store) -> None:
    wins: list[str] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        for n in range(20):
            try:
                store.reserve([entry(f"10.0.0.{10 + n}/24", cid=f"c{i}")])
            except StoreConflict:
                continue
            with lock:
                wins.append(f"10.0.0.{10 + n}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == sorted(f"10.0.0.{10 + n}" for n in range(20))
    assert len(store.list_entries("n1")) == 20


# ---- batches (group commit) ------------------------------------------------------------------


def test_batch_is_all_or_nothing(store: Store) -> None:
    store.reserve([entry("10.0.0.5/24", cid="old")])
    with store.batch():
        store.put_pool("n1", POOL)
        store.reserve([entry("10.0.0.9/24", cid="a"), entry("fd00::9/64", cid="a", k=1)])
        store.release_by_owner("n1", "old", "eth0", now_ms=7)
    assert store.get_pool("n1") == POOL
    assert [str(e.ip) for e in store.get_by_owner("n1", "a", "eth0")] == ["10.0.0.9", "fd00::9"]
    assert store.get_cursor("n1", 0) == "10.0.0.9" and store.get_by_owner("n1", "old", "eth0") == []

    with pytest.raises(RuntimeError), store.batch():
        store.put_pool("n2", POOL)
        store.reserve([entry("10.0.0.10/24", cid="b")])
        store.release_by_owner("n1", "a", "eth0", now_ms=8)
        store.quarantine("n1", "10.0.0.5", conflict_mac="aa:aa:aa:aa:aa:aa", now_ms=8)
        raise RuntimeError("commit failed")
    # nothing of the failed batch is visible; what came before is intact
    assert store.get_pool("n2") is None and store.get_entry("n1", "10.0.0.10") is None
    assert store.get_cursor("n1", 0) == "10.0.0.9"
    assert [str(e.ip) for e in store.get_by_owner("n1", "a", "eth0")] == ["10.0.0.9", "fd00::9"]
    old = store.get_entry("n1", "10.0.0.5")
    assert old is not None and old.state == RELEASED and old.changed_ms == 7


def test_refusal_inside_a_batch_undoes_the_batch(store: Store) -> None:
    store.reserve([entry("10.0.0.5/24")])
    with pytest.raises(StoreConflict), store.batch():
        store.reserve([entry("10.0.0.6/24", cid="c2")])
        store.reserve([entry("10.0.0.5/24", cid="c3")])
    assert store.get_entry("n1", "10.0.0.6") is None
    assert store.get_entry("n1", "10.0.0.5").container_id == "c1"  # type: ignore[union-attr]


def test_sqlite_batch_readers_see_only_committed_state_and_full_sync(tmp_path: Path) -> None:
    s = SqliteStore(str(tmp_path / "x.db"))
    # durability is not traded for speed: both connections wait for the WAL fsync at COMMIT
    assert [db.execute("PRAGMA synchronous").fetchone()[0] for db in (s._db, s._rdb)] == [2, 2]
    assert s._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    seen: list[list[Entry]] = []
    with s.batch():
        s.reserve([entry("10.0.0.5/24")])
        t = threading.Thread(target=lambda: seen.append(s.get_by_owner("n1", "c1", "eth0")))
        t.start()
        t.join(5)  # a reader is not blocked by the open batch ...
    assert seen == [[]]  # ... and does not see it before COMMIT
    assert [str(e.ip) for e in s.get_by_owner("n1", "c1", "eth0")] == ["10.0.0.5"]
    s.close()
    s2 = SqliteStore(str(tmp_path / "x.db"))
    assert s2.get_cursor("n1", 0) == "10.0.0.5"  # written once, at the batch's end
    s2.close()


def test_sqlite_migrates_a_version_1_database(tmp_path: Path) -> None:
    """A database written before leases recorded their node (schema 1) is migrated in place: its
    rows become this node's, and nothing else changes."""
    import sqlite3

    path = tmp_path / "v1.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE schema_version (version INTEGER NOT NULL);
        INSERT INTO schema_version VALUES (1);
        CREATE TABLE pools (network TEXT PRIMARY KEY, definition TEXT NOT NULL);
        CREATE TABLE entries (
            network TEXT NOT NULL, ip TEXT NOT NULL, prefixlen INTEGER NOT NULL, subnet_index INTEGER NOT NULL,
            gateway TEXT NOT NULL DEFAULT '', container_id TEXT NOT NULL, ifname TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('active', 'released', 'quarantined')),
            pod_namespace TEXT NOT NULL DEFAULT '', pod_name TEXT NOT NULL DEFAULT '', pod_uid TEXT NOT NULL DEFAULT '',
            mac TEXT NOT NULL DEFAULT '', netns TEXT NOT NULL DEFAULT '', created_ms INTEGER NOT NULL DEFAULT 0,
            changed_ms INTEGER NOT NULL DEFAULT 0, conflict_mac TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (network, ip));
        CREATE INDEX entries_owner ON entries (container_id, ifname) WHERE state = 'active';
        CREATE TABLE cursors (network TEXT NOT NULL, subnet_index INTEGER NOT NULL, ip TEXT NOT NULL,
                              PRIMARY KEY (network, subnet_index));
        INSERT INTO entries (network, ip, prefixlen, subnet_index, container_id, ifname, state, created_ms)
            VALUES ('n1', '10.0.0.5', 24, 0, 'old', 'eth0', 'active', 7);
        INSERT INTO cursors VALUES ('n1', 0, '10.0.0.5');
    """)
    db.commit()
    db.close()
    s = SqliteStore(str(path), node="node-x")
    try:
        (e,) = s.get_by_owner("n1", "old", "eth0")
        assert e.node == "node-x" and e.created_ms == 7 and str(e.address) == "10.0.0.5/24"
        assert s.get_cursor("n1", 0) == "10.0.0.5"
        s.reserve([entry("10.0.0.6/24", cid="new")])
        assert [x.node for x in s.list_entries("n1", node=NODE)] == [NODE]
        assert s._db.execute("SELECT version FROM schema_version").fetchone()[0] == 2
    finally:
        s.close()
    s2 = SqliteStore(str(path), node="node-y")  # migrated once: a reopen changes nothing
    try:
        assert s2.get_entry("n1", "10.0.0.5").node == "node-x"  # type: ignore[union-attr]
    finally:
        s2.close()
def test_probe_write_is_durable_and_changes_nothing_visible(store: Store) -> None:
    """The heartbeat readiness writes while commits fail (ipamd/readiness.py)."""
    store.put_pool("n1", POOL)
    store.reserve([entry("10.0.0.5/24")])
    before = (store.networks(), store.list_entries(None, (ACTIVE, RELEASED, QUARANTINED)),
              store.get_cursor("n1", 0))
    store.probe_write()
    with store.batch():
        store.probe_write()
    assert (store.networks(), store.list_entries(None, (ACTIVE, RELEASED, QUARANTINED)),
            store.get_cursor("n1", 0)) == before
