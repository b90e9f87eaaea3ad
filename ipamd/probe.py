"""Gateway and conflict probes sent from the pod's interface, inside the pod's netns.

Why here and like this: the daemon is multi-threaded, so it never switches its own netns; the
AF_PACKET socket is created inside the pod's netns by `core.netns.packet_socket` and used from
a normal thread. No arping. Probes for one pod (one netns) run one at a time: a gateway ARP and a
conflict probe in parallel poison neighbour caches (Spiderpool #4475). Positive gateway answers
are cached per (cache_key, gateway) for a short time so a burst of pods on one VLAN does not
flood the wire.
- gateway: ARP request (sender = the pod's address) / NS with the source link-layer option;
  bounded retries spread over a total timeout.
- conflict: RFC 5227 ARP probe (sender 0.0.0.0) / DAD-style NS (source ::) for the candidate.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator

from netaddr import IPAddress

from core import frames
from core.netns import PACKET_OUTGOING, NetnsError, check_netns, close_later, own_netns_inode, packet_socket
from core.spec import ProbeResult
from ipamd.conflicts import ConflictOutcome
from ipamd.errors import InvalidNetns
from ipamd.metrics import Metrics

log = logging.getLogger("ipamd.probe")

MAX_TRIES = 3
MIN_SPACING_MS = 50


def send_times(start: float, wait_ms: int) -> list[float]:
    """When a probe sends its frames: up to MAX_TRIES, at least MIN_SPACING_MS apart, spread
    over its wait (RFC 5227's PROBE_NUM, in the time the config gives)."""
    tries = max(1, min(MAX_TRIES, wait_ms // MIN_SPACING_MS))
    return [start + i * (wait_ms / 1000) / tries for i in range(tries)]

# match(frame, own_mac) -> the answering MAC when the frame is the answer we wait for.
Matcher = Callable[[bytes, bytes], bytes | None]


class _Unusable(Exception):
    """The interface is missing or down in the netns: the probe is skipped, not failed."""


class _KeyedLocks:
    """One lock per key (netns path), forgotten when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, list[int]]] = {}

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._lock:
            lock, users = self._locks.setdefault(key, (threading.Lock(), [0]))
            users[0] += 1
        try:
            with lock:
                yield
        finally:
            with self._lock:
                users[0] -= 1
                if users[0] == 0:
                    del self._locks[key]


class Prober:
    def __init__(self, metrics: Metrics | None = None, cache_ttl_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics
        self.cache_ttl_s = cache_ttl_s
        self.clock = clock
        self._cache: dict[tuple[str, str], tuple[str, float]] = {}
        self._cache_lock = threading.Lock()
        self._pods = _KeyedLocks()

    # ---- public ------------------------------------------------------------------------------

    def gateway(self, netns: str, ifname: str, gateway: IPAddress, sender_ip: IPAddress | None,
                timeout_ms: int, cache_key: str) -> ProbeResult:
        key = (cache_key, str(gateway))
        if cache_key:
            with self._cache_lock:
                hit = self._cache.get(key)
            if hit is not None and hit[1] > self.clock():
                return ProbeResult(answered=True, mac=hit[0], elapsed_ms=0.0, cached=True)
        if gateway.version == 4:
            eth, frame_of = frames.ETH_P_ARP, _arp_builder(sender_ip, gateway)
        else:
            eth, frame_of = frames.ETH_P_IPV6, _ns_builder(sender_ip, gateway)
        match = _gateway_answer(gateway)
        start = time.monotonic()
        try:
            with self._pods.hold(netns):
                mac = self._exchange(netns, ifname, eth, frame_of, match, timeout_ms)
        except _Unusable as exc:
            log.info("netns=%s ifname=%s gateway=%s msg=%s", netns, ifname, gateway,
                     f"gateway probe skipped: {exc}")
            return ProbeResult(answered=False, mac=None, elapsed_ms=0.0, skipped=True)
        elapsed = (time.monotonic() - start) * 1000
        self._observe("gateway", "reachable" if mac else "unreachable", elapsed)
        if mac and cache_key:
            with self._cache_lock:
                self._cache[key] = (mac, self.clock() + self.cache_ttl_s)
        return ProbeResult(answered=mac is not None, mac=mac, elapsed_ms=elapsed)

    def conflict(self, netns: str, ifname: str, address: IPAddress, wait_ms: int) -> ProbeResult:
        """answered=True: another host answered for `address`. skipped: interface unusable."""
        if address.version == 4:
            eth, frame_of, match = frames.ETH_P_ARP, _arp_builder(None, address), _arp_conflict(address)
        else:
            eth, frame_of, match = frames.ETH_P_IPV6, _ns_builder(None, address), _dad_conflict(address)
        start = time.monotonic()
        try:
            with self._pods.hold(netns):
                mac = self._exchange(netns, ifname, eth, frame_of, match, wait_ms)
        except _Unusable as exc:
            log.info("netns=%s ifname=%s address=%s msg=%s", netns, ifname, address,
                     f"conflict probe skipped: {exc}")
            return ProbeResult(answered=False, mac=None, elapsed_ms=0.0, skipped=True)
        elapsed = (time.monotonic() - start) * 1000
        self._observe("conflict", "conflict" if mac else "free", elapsed)
        return ProbeResult(answered=mac is not None, mac=mac, elapsed_ms=elapsed)

    def detect(self, netns: str, ifname: str, address: IPAddress, wait_ms: int) -> ConflictOutcome | None:
        """The allocator's ConflictProber: None (skip) when the interface or the netns is unusable."""
        try:
            res = self.conflict(netns, ifname, address, wait_ms)
        except InvalidNetns as exc:
            log.info("netns=%s ifname=%s msg=%s", netns, ifname, f"conflict probe skipped: {exc.msg}")
            return None
        if res.skipped:
            return None
        return ConflictOutcome(res.answered, res.mac or "", res.elapsed_ms)

    # ---- the exchange ------------------------------------------------------------------------

    def _exchange(self, netns: str, ifname: str, ethertype: int, frame_of: Callable[[bytes], bytes],
                  match: Matcher, total_ms: int) -> str | None:
        """Send up to MAX_TRIES frames spread over total_ms; return the MAC of the first
        matching answer, or None when the time is up."""
        sock = _open(netns, ifname, ethertype)
        try:
            own = bytes(sock.getsockname()[4])[:6]
            frame = frame_of(own)
            start = time.monotonic()
            deadline = start + total_ms / 1000
            sends = send_times(start, total_ms)
            while True:
                now = time.monotonic()
                while sends and sends[0] <= now:
                    sends.pop(0)
                    try:
                        sock.send(frame)
                    except OSError as exc:
                        if exc.errno in (errno.ENETDOWN, errno.ENXIO, errno.ENODEV):
                            raise _Unusable(f"{ifname} is down or gone ({exc.strerror})") from exc
                        raise
                if now >= deadline:
                    return None
                wait = min([deadline, *sends[:1]]) - now
                ready, _, _ = select.select([sock], [], [], max(wait, 0))
                if not ready:
                    continue
                found = _drain(sock, own, match)
                if found is not None:
                    return frames.mac_text(found)
        finally:
            close_later(sock)

    def _observe(self, kind: str, result: str, elapsed_ms: float) -> None:
        if self.metrics is not None:
            self.metrics.observe("ipamd_probe_duration_ms", elapsed_ms, kind=kind, result=result)


def _open(netns: str, ifname: str, ethertype: int) -> socket.socket:
    try:
        ino = check_netns(netns)
    except NetnsError as exc:
        raise InvalidNetns(f"netns {netns}: {exc.strerror}") from exc
    if ino == own_netns_inode():
        raise InvalidNetns(f"netns {netns} is ipamd's own network namespace; refusing to probe from it")
    try:  # all multicast: all-nodes / solicited-node groups whatever the pod's IPv6 state
        sock, _ = packet_socket(netns, ifname, ethertype, allmulti=True)
    except OSError as exc:
        if exc.errno in (errno.ENODEV, errno.ENXIO):
            raise _Unusable(f"no interface {ifname} in {netns}") from exc
        raise
    return sock


def _drain(sock: socket.socket, own: bytes, match: Matcher) -> bytes | None:
    while True:
        try:
            data, addr = sock.recvfrom(2048, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        if addr[2] == PACKET_OUTGOING:
            continue
        found = match(data, own)
        if found is not None:
            return found


# ---- frame builders and matchers --------------------------------------------------------------


def _arp_builder(sender: IPAddress | None, target: IPAddress) -> Callable[[bytes], bytes]:
    sender4 = sender if sender is not None and sender.version == 4 else None
    return lambda own: frames.arp_request(own, sender4, target)


def _ns_builder(sender: IPAddress | None, target: IPAddress) -> Callable[[bytes], bytes]:
    sender6 = sender if sender is not None and sender.version == 6 else None
    return lambda own: frames.neighbor_solicitation(own, sender6, target)


def _gateway_answer(gateway: IPAddress) -> Matcher:
    return lambda data, own: frames.gateway_answer(data, gateway, own)


def _arp_conflict(address: IPAddress) -> Matcher:
    def match(data: bytes, own: bytes) -> bytes | None:
        pkt = frames.parse_arp(data)
        if pkt is None:
            return None
        if frames.arp_answers_for(pkt, address, own) or frames.arp_probe_collision(pkt, address, own):
            return pkt.sha
        return None
    return match


def _dad_conflict(address: IPAddress) -> Matcher:
    def match(data: bytes, own: bytes) -> bytes | None:
        nd = frames.parse_nd(data)
        if nd is None or nd.target != address or nd.src_mac == own:
            return None
        if nd.type == frames.ICMPV6_NA or (nd.type == frames.ICMPV6_NS and int(nd.src_ip) == 0):
            return nd.lladdr or nd.src_mac  # an owner's NA, or someone else's DAD for it
        return None
    return match
