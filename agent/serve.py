"""`serve`: keep this node's provider networks applied.

It applies every network at start, then watches, level-triggered (no event is ever "missed"):
- every `interval` seconds a cheap check per network (one OVSDB read, two netlink reads): the
  bridge exists and is marked ready, the NIC is its port, its link is up and holds the node's
  addresses. Anything off (OVS restarted with an empty database, its internal port re-created
  without addresses, someone removed the port, the host re-configured the NIC at boot) makes it
  apply again, which repairs from the journal;
- every `full_every` seconds the full plan (routes and rules too);
- the file: when its contents change (or on SIGHUP) it is re-read; an invalid file is reported
  and the last good one kept. A network that leaves the file is reported, never removed behind
  the operator's back (`remove` does that).
An apply that fails (and was rolled back) is retried with exponential backoff (10 s .. 5 min), so
a dead gateway does not flap the node's uplink every few seconds; a changed file retries at once.
OVSDB being unreachable is waited out (logged once per outage). SIGTERM/SIGINT stop the loop
between two networks, never in the middle of an apply.
"""

from __future__ import annotations

import hashlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from agent import config as C
from agent import engine as E
from agent import plan as P
from agent.drivers import Drivers
from agent.journal import JournalError, StateDir
from core import bridges as B
from core import netstate
from core.errors import CoreError, Unavailable

_log = logging.getLogger("ovs-underlay.agent.serve")
BACKOFF_MIN_S, BACKOFF_MAX_S = 10.0, 300.0


@dataclass
class _Retry:
    at: float = 0.0
    delay: float = 0.0


class Server:
    def __init__(
        self,
        config_path: Path,
        node: str,
        drivers: Callable[[], Drivers],
        store: StateDir,
        opts: E.Options,
        interval_s: float = 2.0,
        full_every_s: float = 60.0,
    ) -> None:
        self.config_path = config_path
        self.node = node
        self.make_drivers = drivers
        self.store = store
        self.opts = opts
        self.interval_s = interval_s
        self.full_every_s = full_every_s
        self.stop = threading.Event()
        self.reload = threading.Event()
        self.config: C.AgentConfig | None = None
        self._digest = ""
        self._retry: dict[str, _Retry] = {}
        self._full_at = 0.0
        self._ovs_down = False
        self._reported: set[str] = set()

    # -- signals ---------------------------------------------------------------------------

    def install_signals(self) -> None:
        def stop(signum: int, frame: FrameType | None) -> None:
            _log.info("signal %d: stopping after the current network", signum)
            self.stop.set()

        def hup(signum: int, frame: FrameType | None) -> None:
            self.reload.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, hup)

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> int:
        _log.info("serving node %s from %s (state in %s)", self.node, self.config_path, self.store.path)
        d = self.make_drivers()
        try:
            while not self.stop.is_set():
                self._load()
                if self.config is not None:
                    full = time.monotonic() >= self._full_at
                    self.tick(d, full)
                    if full:
                        self._full_at = time.monotonic() + self.full_every_s
                self.stop.wait(self.interval_s)
        finally:
            d.close()
        _log.info("stopped")
        return 0

    def _load(self) -> None:
        try:
            data = self.config_path.read_bytes()
        except OSError as exc:
            self._once(
                "read",
                f"cannot read {self.config_path}: {exc.strerror or exc}; keeping the last good configuration",
            )
            return
        digest = hashlib.sha256(data).hexdigest()
        if digest == self._digest and not self.reload.is_set():
            return
        self.reload.clear()
        self._digest = digest
        try:
            cfg = C.parse_text(data.decode(), str(self.config_path))
            cfg.for_node(self.node)
        except (C.ConfigError, UnicodeDecodeError) as exc:
            _log.error("%s; keeping the last good configuration", exc)
            return
        _log.info("configuration loaded: %s", ", ".join(n.name for n in cfg.networks) or "no networks")
        self.config = cfg
        self._retry.clear()  # a new file deserves an immediate try
        self._full_at = 0.0

    def tick(self, d: Drivers, full: bool) -> None:
        assert self.config is not None
        nets, excluded = self.config.for_node(self.node)
        try:
            with self.store.locked():
                for nn in nets:
                    if self.stop.is_set():
                        return
                    self._one(nn, d, full)
                known = {n.name for n in nets} | set(excluded)
                for name in self.store.names():
                    if name not in known:
                        self._once(
                            f"orphan-{name}",
                            f"{name} is applied on this node but no longer in the file "
                            f"for node {self.node}: run `ovs-underlay-node remove {name}` to give its NIC "
                            "back",
                        )
        except JournalError as exc:
            _log.error("%s", exc)

    def _one(self, nn: C.NodeNetwork, d: Drivers, full: bool) -> None:
        r = self._retry.get(nn.name)
        if r is not None and time.monotonic() < r.at:
            return
        try:
            if not full and self._looks_applied(nn, d):
                if self._ovs_down:
                    _log.info("OVSDB is reachable again")
                    self._ovs_down = False
                return
            out = E.apply_network(nn, d, self.store, self.opts)
            if out.changed:
                _log.info("%s: applied (was: %s) in %.2f s", nn.name, out.state, out.seconds)
            self._retry.pop(nn.name, None)
            self._reported.discard(f"refused-{nn.name}")
            self._ovs_down = False
        except P.Refused as exc:
            self._once(f"refused-{nn.name}", f"{nn.name}: not applied: {exc}")
            self._backoff(nn.name)
        except E.ApplyFailed as exc:
            _log.error("%s", exc)
            self._backoff(nn.name)
        except Unavailable as exc:  # OVSDB unreachable: wait it out (logged once)
            if not self._ovs_down:
                _log.warning("%s: %s; waiting for it", nn.name, exc.msg)
            self._ovs_down = True
        except CoreError as exc:  # anything else (netlink, ownership): this network's own failure
            _log.error("%s: %s", nn.name, exc.msg)
            self._backoff(nn.name)

    def _looks_applied(self, nn: C.NodeNetwork, d: Drivers) -> bool:
        """The cheap check (see module docstring); False means "apply to find out"."""
        j = self.store.read(nn.name)
        if j is None or j.phase != "applied" or j.nic_snapshot is None:
            return False
        b = d.ovs.bridge(nn.bridge, [nn.nic])
        if b is None or not b.ready or not b.has_port(nn.nic) or b.external_ids.get(B.INTERFACE) != nn.nic:
            return False
        link = d.net.link(nn.bridge)
        if link is None or not link.up:
            return False
        have = {a.key() for a in d.net.addresses(nn.bridge)}
        want = {a.key() for a in netstate.movable(j.nic_snapshot).addresses}
        if not want <= have:
            return False
        return not any(netstate.movable_address(a) for a in d.net.addresses(nn.nic))

    def _backoff(self, name: str) -> None:
        r = self._retry.setdefault(name, _Retry())
        r.delay = min(BACKOFF_MAX_S, max(BACKOFF_MIN_S, r.delay * 2))
        r.at = time.monotonic() + r.delay
        _log.info("%s: next attempt in %.0f s", name, r.delay)

    def _once(self, key: str, msg: str) -> None:
        if key not in self._reported:
            self._reported.add(key)
            _log.error("%s", msg)
