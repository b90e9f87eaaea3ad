"""The SQLite store's files are root's only (issue 11 item 15).

The database holds every lease with its pod, netns path and MAC. SQLite creates the -wal and
-shm files of WAL mode with the database file's mode, and the database file under the process
umask (0644 by default): all three were world-readable. No root needed (modes of our own files).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from netaddr import IPAddress, IPNetwork

from core.spec import PodRef
from ipamd.model import Entry
from ipamd.store_sqlite import SqliteStore


@pytest.fixture
def loose_umask() -> Iterator[None]:
    old = os.umask(0o022)  # what a daemon started by hand or by a unit without UMask= gets
    yield
    os.umask(old)


def _modes(db: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in db.parent.iterdir() if p.name.startswith(db.name)}


def _write(store: SqliteStore) -> None:
    store.reserve([Entry(network="n", address=IPNetwork("10.0.0.5/24"), subnet_index=0, container_id="c",
                         ifname="eth0", state="active", gateway=IPAddress("10.0.0.1"), pod=PodRef())])


def test_database_wal_and_shm_are_0600(tmp_path: Path, loose_umask: None) -> None:
    db = tmp_path / "ipam.db"
    store = SqliteStore(str(db))
    try:
        _write(store)
        modes = _modes(db)
        assert {"ipam.db", "ipam.db-wal", "ipam.db-shm"} <= set(modes)
        assert all(m == 0o600 for m in modes.values()), {k: oct(v) for k, v in modes.items()}
        assert os.umask(0o022) == 0o022  # the store put the process umask back
    finally:
        store.close()


def test_existing_files_with_loose_modes_are_tightened(tmp_path: Path, loose_umask: None) -> None:
    db = tmp_path / "ipam.db"
    SqliteStore(str(db)).close()
    for suffix in ("", "-wal", "-shm"):
        p = Path(f"{db}{suffix}")
        p.touch()
        p.chmod(0o644)
    store = SqliteStore(str(db))
    try:
        _write(store)
        assert all(m == 0o600 for m in _modes(db).values()), {k: oct(v) for k, v in _modes(db).items()}
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------
# issue 11 item 16: one stored definition that no longer parses quarantines that network only


def test_a_definition_that_no_longer_parses_quarantines_only_its_network(tmp_path: Path) -> None:
    """It used to stop ipamd from starting for every network (warm() raised). Now warm() goes
    on, the broken network's allocations are refused with NetworkQuarantined naming the cause,
    its leases can still be released, and every other network is served."""
    import sqlite3

    from core.spec import parse_ipam
    from ipamd.allocator import Allocator, Request
    from ipamd.errors import NetworkQuarantined

    db = str(tmp_path / "ipam.db")
    good, bad = (parse_ipam({"subnets": [{"subnet": s, "gateway": g}]}).pool
                 for s, g in (("10.1.0.0/24", "10.1.0.1"), ("10.2.0.0/24", "10.2.0.1")))
    store = SqliteStore(db)
    a = Allocator(store)
    for net, p in (("good", good), ("bad", bad)):
        a.allocate(Request(network=net, pool=p, container_id="c1", ifname="eth0"))
    store.close()
    with sqlite3.connect(db) as raw:  # an older or damaged version wrote something we cannot read
        raw.execute("UPDATE pools SET definition = ? WHERE network = 'bad'", ('{"subnets": [{"subnet": "10.2.0.0/99"}]}',))
    store = SqliteStore(db)
    try:
        a = Allocator(store)
        assert a.warm() == 2
        assert list(a.quarantined()) == ["bad"] and "10.2.0.0/99" in a.quarantined()["bad"]
        assert [str(e.ip) for e in a.allocate(Request(network="good", pool=good, container_id="c2",
                                                      ifname="eth0")).entries] == ["10.1.0.3"]
        with pytest.raises(NetworkQuarantined) as e:
            a.allocate(Request(network="bad", pool=bad, container_id="c3", ifname="eth0"))
        assert "network bad is quarantined" in e.value.msg and "10.2.0.0/99" in e.value.msg
        assert [u.network for u in a.usage()] == ["good"]
        assert [str(x.ip) for x in a.release("bad", "c1", "eth0")] == ["10.2.0.2"]  # DEL still works
        assert a.gc("bad", []) == [] and a.quarantined() == {"bad": a.quarantined()["bad"]}
    finally:
        store.close()


def test_the_etcd_stores_journal_files_are_0600_too(tmp_path: Path, loose_umask: None) -> None:
    """The etcd store keeps this node's leases in a local SQLite journal: the same rule."""
    from ipamd.etcd_journal import Journal

    db = tmp_path / "etcd-journal.db"
    j = Journal(str(db))
    try:
        j.write(own=[("/ovs-underlay/ips/n/10.0.0.5", "{}", 1)])
        modes = _modes(db)
        assert {"etcd-journal.db", "etcd-journal.db-wal", "etcd-journal.db-shm"} <= set(modes)
        assert all(m == 0o600 for m in modes.values()), {k: oct(v) for k, v in modes.items()}
    finally:
        j.close()
