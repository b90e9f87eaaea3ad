"""The etcd store's local journal: one SQLite file in the node's state directory.

Why: etcd is the truth while it answers, but a node must keep serving through an etcd outage and
must never forget, across a restart or a `kill -9`, what it granted meanwhile. The journal keeps:
- `own`: this node's keys as etcd last confirmed them (its leases, its outage reserve, its block
  claims) and the pool definitions it has seen, so that ipamd can start while etcd is down;
- `outbox`: every write made while etcd was unreachable, coalesced per key: the revision it was
  based on, whether etcd recorded the key as this node's at that revision, and the value to
  write; replayed (compare-and-swap) when etcd returns, before the node goes back online;
- `uncertain`: writes whose transaction may or may not have reached etcd (the reply was lost)
  and whose requests were failed: undone on recovery if they did land, so nothing leaks;
- `cursors`: the node's round-robin cursors (node-local by nature).
Each `write` is one transaction, durable (synchronous=FULL) before it returns.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable
from typing import NamedTuple

from ipamd.store_sqlite import private_files

_SCHEMA = """
CREATE TABLE IF NOT EXISTS own (key TEXT PRIMARY KEY, value TEXT NOT NULL, mod INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (key TEXT PRIMARY KEY, base_mod INTEGER NOT NULL,
                                   base_mine INTEGER NOT NULL, value TEXT);
CREATE TABLE IF NOT EXISTS uncertain (key TEXT PRIMARY KEY, base_mod INTEGER NOT NULL, old TEXT, new TEXT);
CREATE TABLE IF NOT EXISTS cursors (network TEXT NOT NULL, subnet_index INTEGER NOT NULL, ip TEXT NOT NULL,
                                    PRIMARY KEY (network, subnet_index));
CREATE TABLE IF NOT EXISTS heartbeat (id INTEGER PRIMARY KEY CHECK (id = 1), payload BLOB NOT NULL);
"""
HEARTBEAT_BYTES = 64 * 1024  # as the SQLite store's (store_sqlite.HEARTBEAT_BYTES): see there why


class Pending(NamedTuple):
    """An outbox row: write `value` (None: delete) where etcd had revision `base_mod`."""

    key: str
    base_mod: int
    base_mine: bool  # etcd recorded the key as this node's (active or reserved) at base_mod
    value: str | None


class Uncertain(NamedTuple):
    key: str
    base_mod: int
    old: str | None
    new: str | None


class Journal:
    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        # Root's only, the -wal and -shm included (the same rule as the SQLite store: issue 11
        # item 15): the journal holds this node's leases.
        old_umask = os.umask(0o077)
        try:
            private_files(path)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        self._db.execute(stmt)
                self._db.execute("COMMIT")
        finally:
            os.umask(old_umask)
        private_files(path)

    def write(self, *, own: Iterable[tuple[str, str, int]] = (), drop_own: Iterable[str] = (),
              outbox: Iterable[Pending] = (), drop_outbox: Iterable[str] = (),
              uncertain: Iterable[Uncertain] = (), drop_uncertain: Iterable[str] = (),
              cursors: Iterable[tuple[str, int, str]] = ()) -> None:
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("DELETE FROM own WHERE key = ?", [(k,) for k in drop_own])
                db.executemany("INSERT INTO own (key, value, mod) VALUES (?, ?, ?) ON CONFLICT (key) "
                               "DO UPDATE SET value = excluded.value, mod = excluded.mod", list(own))
                db.executemany("DELETE FROM outbox WHERE key = ?", [(k,) for k in drop_outbox])
                # coalesced: a key keeps the base of its first offline write
                db.executemany("INSERT INTO outbox (key, base_mod, base_mine, value) VALUES (?, ?, ?, ?) "
                               "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                               [(p.key, p.base_mod, int(p.base_mine), p.value) for p in outbox])
                db.executemany("DELETE FROM uncertain WHERE key = ?", [(k,) for k in drop_uncertain])
                db.executemany("INSERT INTO uncertain (key, base_mod, old, new) VALUES (?, ?, ?, ?) "
                               "ON CONFLICT (key) DO NOTHING", list(uncertain))
                db.executemany("INSERT INTO cursors (network, subnet_index, ip) VALUES (?, ?, ?) "
                               "ON CONFLICT (network, subnet_index) DO UPDATE SET ip = excluded.ip",
                               list(cursors))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def replace_own(self, rows: Iterable[tuple[str, str, int]]) -> None:
        """Adopt etcd's view of this node's keys (at start-up and after a recovery)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM own")
                self._db.executemany("INSERT INTO own (key, value, mod) VALUES (?, ?, ?)", list(rows))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def own(self) -> list[tuple[str, str, int]]:
        with self._lock:
            return [(str(k), str(v), int(m)) for k, v, m in
                    self._db.execute("SELECT key, value, mod FROM own").fetchall()]

    def outbox(self) -> list[Pending]:
        with self._lock:
            return [Pending(str(k), int(b), bool(m), v) for k, b, m, v in
                    self._db.execute("SELECT key, base_mod, base_mine, value FROM outbox").fetchall()]

    def uncertain(self) -> list[Uncertain]:
        with self._lock:
            return [Uncertain(str(k), int(b), o, n) for k, b, o, n in
                    self._db.execute("SELECT key, base_mod, old, new FROM uncertain").fetchall()]

    def cursor(self, network: str, subnet_index: int) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT ip FROM cursors WHERE network = ? AND subnet_index = ?",
                                   (network, subnet_index)).fetchone()
        return str(row[0]) if row else None

    def probe_write(self) -> None:
        """A durable write nothing reads, for readiness while writes fail (Store.probe_write)."""
        with self._lock:
            self._db.execute("INSERT INTO heartbeat (id, payload) VALUES (1, zeroblob(?)) "
                             "ON CONFLICT (id) DO UPDATE SET payload = excluded.payload", (HEARTBEAT_BYTES,))

    def close(self) -> None:
        with self._lock:
            self._db.close()
