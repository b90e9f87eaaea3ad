"""Readiness: is ipamd able to grant and release addresses right now?

Why this shape (issue 11 item 17): health used to read the store every few seconds and said
SERVING while every write failed on a full disk, because reads still worked. What a client needs
to know is whether its ADD will be made durable, and the one honest witness is the last write:
- every batch the commit pipeline settles reports here (`commit_result`): a failed commit flips
  readiness to NOT_SERVING at once, the next durable one flips it back;
- the periodic check (`check`) reads the store as before, and only while writes are failing does
  it also make one probe write (`probe`: the store's heartbeat, Store.probe_write, a write that
  nothing reads and as large as a request's commit, through the commit pipeline), so that a
  daemon nobody writes to (the runtime stops sending ADDs to a network that is not ready) still
  notices that the disk has room again. A healthy daemon never writes for its health.
A store conflict (another writer won, the hints were stale) is not a failure: those requests are
decided again. Nothing here knows which store it is (SQLite today, etcd next): it sees outcomes
and calls two callables.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("ipamd.readiness")


class Readiness:
    """Thread-safe. `on_change(serving, why)` is called on every transition (and once at start)."""

    def __init__(self, on_change: Callable[[bool, str], None], *, read: Callable[[], object],
                 probe: Callable[[], None]) -> None:
        self._on_change = on_change
        self._read = read
        self._probe = probe
        self._lock = threading.Lock()
        self._write_error: str | None = None  # the last commit failed: why
        self._read_error: str | None = None
        self._serving: bool | None = None

    @property
    def serving(self) -> bool:
        with self._lock:
            return self._write_error is None and self._read_error is None

    @property
    def writes_failing(self) -> bool:
        with self._lock:
            return self._write_error is not None

    def start(self) -> None:
        self._publish()

    def commit_result(self, error: BaseException | None) -> None:
        """A batch settled: durable (None) or failed (the store's error). Called by the pipeline."""
        with self._lock:
            before = self._write_error
            self._write_error = None if error is None else f"{type(error).__name__}: {error}"
        if (before is None) != (error is None):
            if error is None:
                log.warning("msg=%s", "a write is durable again: writes succeed")
            else:
                log.error("error=%s msg=%s", error, "a write failed: NOT_SERVING until one succeeds")
            self._publish()

    def check(self) -> None:
        """The periodic check: read the store; while writes fail, try one probe write."""
        try:
            self._read()
            read_error = None
        except Exception as exc:  # any failure to read is "not ready", with the reason logged
            read_error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            changed = read_error != self._read_error and (read_error is None or self._read_error is None)
            self._read_error = read_error
        if changed:
            if read_error is None:
                log.warning("msg=%s", "the store answers again")
            else:
                log.error("error=%s msg=%s", read_error, "store check failed: NOT_SERVING")
            self._publish()
        if read_error is None and self.writes_failing:
            try:
                self._probe()  # its outcome arrives through commit_result
            except Exception as exc:  # a failed probe is the expected case while the disk is full
                log.info("error=%s msg=%s", exc, "probe write failed: still NOT_SERVING")

    def _publish(self) -> None:
        with self._lock:  # held across on_change: two transitions never publish out of order
            serving = self._write_error is None and self._read_error is None
            if serving != self._serving:
                self._serving = serving
                self._on_change(serving, self._write_error or self._read_error or "")
