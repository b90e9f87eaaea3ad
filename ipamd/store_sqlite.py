"""The default `Store`: one SQLite file (WAL, synchronous=FULL), schema versioned.

Why these settings: a lease must be on disk before the RPC that granted it returns, so that a
`kill -9` of the daemon at any moment loses no granted lease (synchronous=FULL makes COMMIT wait
for the WAL fsync). The table's primary key (network, ip) is what forbids duplicates: a
reservation is an UPSERT that only replaces a non-active row, so two writers can never both
make an address active, whatever the allocator's hints say.

Two connections: one writer behind a lock (SQLite has a single writer; `batch` holds it for a
whole group commit: BEGIN IMMEDIATE, the writes, one COMMIT = one WAL fsync) and one reader, so
that the allocator's reads never wait for a commit's fsync (WAL: readers see the last committed
state and do not block the writer); a read uses the writer connection when that is idle.

Few statements per write (each one hands the GIL to other threads): inside a batch a write joins
the batch's transaction, the round-robin cursors are written once per batch, and a release or a
quarantine is one UPDATE ... RETURNING. PRAGMAs keep durability: synchronous=FULL on both
connections; the WAL is checkpointed automatically every WAL_AUTOCHECKPOINT_PAGES. Measured and
left out: mmap (a read after another connection's commit costs 2x with it) and a bigger WAL or
page cache (no gain on commit latency).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from netaddr import IPAddress, IPNetwork

from core import wire
from core.spec import PodRef, PoolDef
from ipamd.errors import StoreConflict
from ipamd.model import ACTIVE, QUARANTINED, RELEASED, Entry

log = logging.getLogger("ipamd.store")
SCHEMA_VERSION = 2  # 2: entries.node (issue 10: every lease records its node)
HEARTBEAT_BYTES = 64 * 1024  # 16 pages: more than one commit of a few requests' writes
WAL_AUTOCHECKPOINT_PAGES = 1000  # SQLite's default; measured best here (a larger WAL slows commits)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS pools (
    network TEXT PRIMARY KEY,
    definition TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS entries (
    network TEXT NOT NULL,
    ip TEXT NOT NULL,
    prefixlen INTEGER NOT NULL,
    subnet_index INTEGER NOT NULL,
    gateway TEXT NOT NULL DEFAULT '',
    container_id TEXT NOT NULL,
    ifname TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('{ACTIVE}', '{RELEASED}', '{QUARANTINED}')),
    pod_namespace TEXT NOT NULL DEFAULT '',
    pod_name TEXT NOT NULL DEFAULT '',
    pod_uid TEXT NOT NULL DEFAULT '',
    mac TEXT NOT NULL DEFAULT '',
    netns TEXT NOT NULL DEFAULT '',
    created_ms INTEGER NOT NULL DEFAULT 0,
    changed_ms INTEGER NOT NULL DEFAULT 0,
    conflict_mac TEXT NOT NULL DEFAULT '',
    node TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (network, ip)
);
CREATE INDEX IF NOT EXISTS entries_owner ON entries (container_id, ifname) WHERE state = '{ACTIVE}';
CREATE TABLE IF NOT EXISTS heartbeat (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    written_ms INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS cursors (
    network TEXT NOT NULL,
    subnet_index INTEGER NOT NULL,
    ip TEXT NOT NULL,
    PRIMARY KEY (network, subnet_index)
);
"""

_COLS = ("network, ip, prefixlen, subnet_index, gateway, container_id, ifname, state, pod_namespace, "
         "pod_name, pod_uid, mac, netns, created_ms, changed_ms, conflict_mac, node")

_UPSERT = f"""
INSERT INTO entries ({_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, '{ACTIVE}', ?, ?, ?, ?, ?, ?, ?, '', ?)
ON CONFLICT (network, ip) DO UPDATE SET
    prefixlen = excluded.prefixlen, subnet_index = excluded.subnet_index, gateway = excluded.gateway,
    container_id = excluded.container_id, ifname = excluded.ifname, state = '{ACTIVE}',
    pod_namespace = excluded.pod_namespace, pod_name = excluded.pod_name, pod_uid = excluded.pod_uid,
    mac = excluded.mac, netns = excluded.netns, created_ms = excluded.created_ms,
    changed_ms = excluded.changed_ms, conflict_mac = '', node = excluded.node
WHERE entries.state != '{ACTIVE}'
"""

# Migrations from the version in the key to the next one, run in the opening transaction.
# `node` is this node's name: rows written before leases recorded their node were all its own.
_MIGRATIONS: dict[int, list[str]] = {
    1: ["ALTER TABLE entries ADD COLUMN node TEXT NOT NULL DEFAULT ''",
        "UPDATE entries SET node = :node"],
}


_CURSOR_UPSERT = ("INSERT INTO cursors (network, subnet_index, ip) VALUES (?, ?, ?) "
                  "ON CONFLICT (network, subnet_index) DO UPDATE SET ip = excluded.ip")


class SchemaError(RuntimeError):
    """The database was written by a newer ipamd (or is not ours)."""


FILE_MODE = 0o600  # the database, its -wal and -shm: leases, pods and netns paths are root's business
_SIDE_FILES = ("", "-wal", "-shm", "-journal")


def private_files(path: str) -> None:
    """Create the database file 0600 if missing and take every existing file of it (-wal, -shm,
    -journal) to 0600: this store's database and the etcd store's journal. SQLite creates the
    -wal and -shm with the database file's mode, but the file itself under the process umask
    (0644 by default), so they were world-readable."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    os.close(fd)
    for suffix in _SIDE_FILES:
        try:
            st = os.lstat(path + suffix)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            raise SchemaError(f"{path + suffix} is not a regular file: refusing to use it")
        if stat.S_IMODE(st.st_mode) != FILE_MODE:
            log.warning("file=%s mode=%o msg=%s", path + suffix, stat.S_IMODE(st.st_mode),
                        "tightened to 0600")
            os.chmod(path + suffix, FILE_MODE)


class SqliteStore:
    max_batch = 0

    def __init__(self, path: str, node: str = "") -> None:
        self.path = path
        self.node = node
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        self._lock = threading.Lock()  # the writer connection
        self._batch_owner: int | None = None  # thread running a batch (holds _lock)
        self._batch_cursors: dict[tuple[str, int], str] = {}  # written at the batch's end
        # Every file SQLite creates while opening (the -wal and -shm of WAL mode) under umask
        # 077 too, whatever the database file's mode; the daemon serves nothing yet, so the
        # process-wide umask changes nothing else.
        old_umask = os.umask(0o077)
        try:
            private_files(path)
            self._open(path)
        finally:
            os.umask(old_umask)

    def _open(self, path: str) -> None:
        self._db = self._connect(path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._tx() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = cur.execute("SELECT version FROM schema_version").fetchone()
            if row is not None and row[0] > SCHEMA_VERSION:
                raise SchemaError(f"{path}: schema version {row[0]} is newer than this ipamd "
                                  f"({SCHEMA_VERSION}); refusing to touch it")
            version = row[0] if row is not None else None
            while version is not None and version < SCHEMA_VERSION:  # an older database: migrate
                for stmt in _MIGRATIONS[version]:
                    cur.execute(stmt, {"node": self.node} if ":node" in stmt else {})
                version += 1
                cur.execute("UPDATE schema_version SET version = ?", (version,))
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    cur.execute(stmt)
            if row is None:
                cur.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        self._rlock = threading.Lock()  # the reader connection
        self._rdb = self._connect(path)
        self._rdb.execute("PRAGMA query_only=ON")
        private_files(path)  # the -wal and -shm exist now: make sure of their mode

    @staticmethod
    def _connect(path: str) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        db.execute("PRAGMA synchronous=FULL")  # per connection: COMMIT waits for the WAL fsync
        return db

    # A transaction as a context manager: BEGIN IMMEDIATE takes the write lock up front. Inside
    # this thread's batch, the batch's transaction (its COMMIT makes the write durable; an
    # exception leaving the batch rolls it all back).
    class _Tx:
        def __init__(self, store: SqliteStore) -> None:
            self.store = store
            self.nested = store._batch_owner == threading.get_ident()

        def __enter__(self) -> sqlite3.Cursor:
            if self.nested:
                self.cur = self.store._db.cursor()
                return self.cur
            self.store._lock.acquire()
            try:
                cur = self.store._db.cursor()
                cur.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.store._lock.release()
                raise
            self.cur = cur
            return cur

        def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
            if self.nested:
                return
            try:
                self.cur.execute("COMMIT" if et is None else "ROLLBACK")
            finally:
                self.store._lock.release()

    def _tx(self) -> SqliteStore._Tx:
        return SqliteStore._Tx(self)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        if self._batch_owner == threading.get_ident():  # nested: part of the outer batch
            yield
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._batch_owner = threading.get_ident()
            try:
                yield
                if self._batch_cursors:
                    self._db.executemany(_CURSOR_UPSERT,
                                         [(n, k, ip) for (n, k), ip in self._batch_cursors.items()])
                self._db.execute("COMMIT")  # the one fsync of the batch
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            finally:
                self._batch_owner = None
                self._batch_cursors.clear()

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        """Committed state. On the writer connection when it is idle (its page cache is warm);
        on the reader while a batch holds the writer, instead of waiting for its fsync (a reader
        drops its page cache after every commit of the other connection, so it costs more)."""
        if self._lock.acquire(blocking=False):
            try:
                return self._db.execute(sql, args).fetchall()
            finally:
                self._lock.release()
        with self._rlock:
            return self._rdb.execute(sql, args).fetchall()

    # ---- pools -------------------------------------------------------------------------------

    def get_pool(self, network: str) -> PoolDef | None:
        rows = self._read("SELECT definition FROM pools WHERE network = ?", (network,))
        return wire.pool_from_json(rows[0][0]) if rows else None

    def put_pool(self, network: str, pool: PoolDef) -> None:
        with self._tx() as cur:
            cur.execute("INSERT INTO pools (network, definition) VALUES (?, ?) "
                        "ON CONFLICT (network) DO UPDATE SET definition = excluded.definition",
                        (network, wire.pool_to_json(pool)))

    def networks(self) -> list[str]:
        return [r[0] for r in self._read("SELECT network FROM pools ORDER BY network")]

    # ---- entries -----------------------------------------------------------------------------

    def reserve(self, entries: Sequence[Entry], *, advance_cursor: bool = True) -> None:
        tx = self._tx()
        with tx as cur:
            for e in entries:
                cur.execute(_UPSERT, (
                    e.network, str(e.ip), e.address.prefixlen, e.subnet_index,
                    str(e.gateway) if e.gateway is not None else "", e.container_id, e.ifname,
                    e.pod.namespace, e.pod.name, e.pod.uid, e.mac, e.netns, e.created_ms, e.changed_ms,
                    e.node or self.node))
                if cur.rowcount != 1:
                    raise StoreConflict(e.network, str(e.ip))  # rolls the whole reservation back
                if advance_cursor and tx.nested:
                    self._batch_cursors[(e.network, e.subnet_index)] = str(e.ip)
                elif advance_cursor:
                    cur.execute(_CURSOR_UPSERT, (e.network, e.subnet_index, str(e.ip)))

    def quarantine(self, network: str, ip: str, *, conflict_mac: str, now_ms: int) -> Entry | None:
        with self._tx() as cur:
            rows = cur.execute(f"UPDATE entries SET state = '{QUARANTINED}', conflict_mac = ?, "
                               f"changed_ms = ? WHERE network = ? AND ip = ? RETURNING {_COLS}",
                               (conflict_mac, now_ms, network, ip)).fetchall()
        return _entry(rows[0]) if rows else None

    def release_by_owner(self, network: str | None, container_id: str, ifname: str,
                         now_ms: int) -> list[Entry]:
        where = f"state = '{ACTIVE}' AND container_id = ? AND ifname = ?"
        args: list[Any] = [container_id, ifname]
        if network is not None:
            where += " AND network = ?"
            args.append(network)
        with self._tx() as cur:
            rows = cur.execute(f"UPDATE entries SET state = '{RELEASED}', changed_ms = ? WHERE {where} "
                               f"RETURNING {_COLS}", [now_ms, *args]).fetchall()
        return sorted((_entry(r) for r in rows), key=lambda e: (e.network, e.subnet_index))

    def get_by_owner(self, network: str, container_id: str, ifname: str) -> list[Entry]:
        rows = self._read(f"SELECT {_COLS} FROM entries WHERE state = '{ACTIVE}' AND container_id = ? "
                          "AND ifname = ? AND network = ? ORDER BY subnet_index",
                          (container_id, ifname, network))
        return [_entry(r) for r in rows]

    def get_entry(self, network: str, ip: str) -> Entry | None:
        rows = self._read(f"SELECT {_COLS} FROM entries WHERE network = ? AND ip = ?", (network, ip))
        return _entry(rows[0]) if rows else None

    def list_entries(self, network: str | None = None, states: Iterable[str] = (ACTIVE,),
                     node: str | None = None) -> list[Entry]:
        wanted = list(states)
        if not wanted:
            return []
        sql = f"SELECT {_COLS} FROM entries WHERE state IN ({','.join('?' * len(wanted))})"
        args: list[Any] = list(wanted)
        if network is not None:
            sql += " AND network = ?"
            args.append(network)
        if node is not None:
            sql += " AND node = ?"
            args.append(node)
        out = [_entry(r) for r in self._read(sql, args)]
        out.sort(key=lambda e: (e.network, e.subnet_index, int(e.ip)))
        return out

    def get_cursor(self, network: str, subnet_index: int) -> str | None:
        rows = self._read("SELECT ip FROM cursors WHERE network = ? AND subnet_index = ?",
                          (network, subnet_index))
        return str(rows[0][0]) if rows else None

    def probe_write(self) -> None:
        """One row of HEARTBEAT_BYTES in its own table: a full disk makes it fail as it makes an
        allocation fail. Its size matters: a commit that failed for want of space leaves the
        pages it did write at the end of the WAL, and a write of a page or two would fit there
        and pass while every allocation (several pages) still fails."""
        with self._tx() as cur:
            cur.execute("INSERT INTO heartbeat (id, written_ms, payload) VALUES (1, ?, zeroblob(?)) "
                        "ON CONFLICT (id) DO UPDATE SET written_ms = excluded.written_ms, "
                        "payload = excluded.payload",
                        (int(time.time() * 1000), HEARTBEAT_BYTES))

    def close(self) -> None:
        with self._lock, self._rlock:
            self._rdb.close()
            self._db.close()


def _entry(r: Sequence[Any]) -> Entry:
    (network, ip, prefixlen, subnet_index, gateway, cid, ifname, state, pns, pname, puid, mac, netns,
     created_ms, changed_ms, conflict_mac, node) = r
    addr = IPAddress(ip)
    return Entry(
        network=network, address=IPNetwork((int(addr), prefixlen), addr.version), subnet_index=subnet_index,
        container_id=cid, ifname=ifname, state=state,
        gateway=IPAddress(gateway) if gateway else None, pod=PodRef(pns, pname, puid), mac=mac,
        netns=netns, created_ms=created_ms, changed_ms=changed_ms, conflict_mac=conflict_mac, node=node,
    )
