"""Pre-probed addresses, the gateway cache and the passive conflict watch, per L2 segment (issue 14).

Why: RFC 5227 wants a conflict probe before an address is used, and the probe's wait (100 ms by
default) used to be paid by every ADD. Here ipamd probes ahead of time, from its own probe port
on the attachment's segment (probe_port.py): for each network and subnet entry it keeps the
next `probeCandidates` addresses that the policy would hand out conflict-probed, and an ADD takes
a fresh one with no wait. The same port keeps the gateways' answers (so the gateway check needs
no probe either) and hears what the segment's hosts announce.

Correctness rules:
- a candidate is a hint to the allocator, never a reservation: `Joined.take` runs under the
  allocator's pipeline lock, offers only an address the occupancy says is free, and the address is
  reserved by the same store write as any other, so the store still refuses a duplicate whatever
  the candidates say;
- fresh means: probed (no answer within the network's conflictCheckWaitMs or longer) less than
  `probeFreshSeconds` ago, counted from the start of the probe, and nothing claimed it since. A
  candidate is probed again once half of that has passed; past it, it is never handed out
  without a new probe (then the ADD probes inline, from the same port: the "cold" case);
- what the port hears: an ARP packet or neighbour advertisement/solicitation from a foreign MAC
  that uses an address (sender address, NA target) is a claim. A claimed candidate is dropped and
  the address quarantined (durably: `Pools.quarantine_free`); a claimed leased address whose lease
  records another MAC is put in conflict (quarantined; CHECK of that pod says so; metric
  ipamd_conflicts_total{source="watch"}); someone else's probe for a candidate (DAD, ARP probe)
  only makes it stale.

What the probe port sends, all from its own MAC and never with an IP address of its own:
- an RFC 5227 ARP probe (sender IP 0.0.0.0) or, for IPv6, a DAD-style neighbour solicitation
  (source ::) for each candidate: 1 to 3 frames spread over the network's wait (2 at the default
  100 ms), once per candidate every probeFreshSeconds/2 (defaults: 8 candidates, 10 s: 1.6 probes
  and ~3 frames per second per subnet entry), plus one per address an ADD takes; during a burst
  of ADDs the window widens by the takes of the last BURST_S (up to 4 x probeCandidates), so a
  burst probes up to that many addresses ahead, once each;
- the same probe for each gateway of the segment's pools every gatewayCacheSeconds/2 (the router
  answers to the port's MAC; routers answer RFC 5227 probes for their own address).
Nothing else: the port has no address and IPv6 is off on it, so its kernel sends nothing.

Threads: one I/O thread for all segments (select over the ports' packet sockets: receive,
dispatch, send the probes' frames, refill the candidates), one worker for store writes (so a
quarantine never stalls the I/O), one maintenance thread (ports still there; rebuild if not).
Lock order: the allocator's pipeline lock, then this module's; the I/O thread never calls the
allocator while it holds this module's lock.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import json
import logging
import os
import queue
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from netaddr import IPAddress, IPNetwork

from core import frames
from core.netns import PACKET_OUTGOING, close_later, packet_socket
from core.spec import GatewaySeen, PoolDef, Segment
from ipamd.conflicts import ConflictOutcome
from ipamd.metrics import Metrics
from ipamd.model import ACTIVE, Entry
from ipamd.occupancy import SubnetOccupancy
from ipamd.policy import Request
from ipamd.probe import send_times
from ipamd.probe_port import PortHandle, ProbePorts

log = logging.getLogger("ipamd.segments")

ETH_P_ALL = 0x0003
SO_ATTACH_FILTER = 26
# tcpdump -dd 'arp or (ip6 and ip6[6] == 58 and (ip6[40] == 135 or ip6[40] == 136))': ARP and
# ICMPv6 neighbour solicitations/advertisements only reach us; the rest of the segment's
# broadcast and multicast never wakes the I/O thread.
_BPF = ((0x28, 0, 0, 12), (0x15, 6, 0, 0x0806), (0x15, 0, 6, 0x86DD), (0x30, 0, 0, 20),
        (0x15, 0, 4, 58), (0x30, 0, 0, 54), (0x15, 1, 0, 135), (0x15, 0, 1, 136),
        (0x6, 0, 0, 0x40000), (0x6, 0, 0, 0))
TICK_S = 1.0  # every candidate window checked this often (a taken candidate: its network at once)
MAX_STARTS = 32  # new background probes per segment per pass: a start with many networks is spread
BURST_S = 5.0  # a window widens by the candidates taken from it within this long ...
GROW = 4  # ... up to this many times probeCandidates (a burst of ADDs finds its pool probed)
HEALTH_S = 5.0  # probe ports checked (and rebuilt) this often
RETRY_S = 30.0  # a segment whose port could not be made is tried again after this
GATEWAY_WAIT_MS = 500
OK_CACHE_S = 60.0  # a lease seen with its own MAC is not read again for this long
# An address with no lease to compare (free, cooling, a lease without a MAC) is not read again
# for this long: a chatty host costs one store read per address per this, and a lease granted
# meanwhile is judged within it.
NO_LEASE_CACHE_S = 5.0
STATE_FILE = "probe-segments.json"


class Pools(Protocol):
    """What the engine needs of the allocator (ipamd.allocator.Allocator)."""

    def window(self, network: str, subnet_index: int, n: int) -> list[IPAddress]: ...
    def pool(self, network: str) -> PoolDef | None: ...
    def durable_entry(self, network: str, ip: IPAddress) -> Entry | None: ...
    def quarantine(self, network: str, e: Entry, mac: str) -> None: ...
    def quarantine_free(self, network: str, ip: IPAddress, mac: str) -> bool: ...


@dataclass
class _Fresh:
    started: float  # monotonic: when the probe that found the address free began
    wait_ms: int


@dataclass
class _Probe:
    address: IPAddress
    conflict: bool  # a conflict probe (a simultaneous probe by someone else counts as an answer)
    sends: list[float]
    deadline: float
    started: float
    on_done: Callable[[_Probe], None] | None = None
    answer: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Net:
    name: str
    pool: PoolDef
    candidates: bool  # keep candidates: the network asks for conflict checks
    wait_ms: int


@dataclass
class _Seg:
    segment: Segment
    handle: PortHandle | None = None
    sock: socket.socket | None = None
    own: bytes = b""
    networks: dict[str, _Net] = field(default_factory=dict)
    cands: dict[tuple[str, int], dict[int, _Fresh]] = field(default_factory=dict)
    inflight: dict[int, list[_Probe]] = field(default_factory=dict)
    gateways: dict[IPAddress, tuple[str, float]] = field(default_factory=dict)
    gateway_due: float = 0.0
    failed_until: float = 0.0
    ok: dict[tuple[str, int], tuple[str, float]] = field(default_factory=dict)


class Joined:
    """A request's segment with its probe port ready: what the allocator uses for it."""

    def __init__(self, engine: SegmentProbes, seg: _Seg, network: str) -> None:
        self._engine = engine
        self._seg = seg
        self.network = network
        self.segment = seg.segment
        self.port = seg.handle.name if seg.handle else "?"

    def size(self, subnet_index: int) -> int:
        """How many candidates are kept for a subnet entry now (the window take looks at)."""
        return self._engine.size(self.network, subnet_index)

    def take(self, subnet_index: int, occ: SubnetOccupancy, wait_ms: int, order: list[int]) -> int | None:
        """The first offset of `order` (policy.window: what pick would hand out next, in that
        order) that is a fresh candidate, or None. The caller holds the pipeline lock."""
        return self._engine.take(self._seg, self.network, subnet_index, occ, wait_ms, order)

    def detect(self, address: IPAddress, wait_ms: int) -> ConflictOutcome | None:
        """Probe `address` from the port now; None when the port is not usable."""
        return self._engine.detect(self._seg, address, wait_ms)


class SegmentProbes:
    def __init__(self, ports: ProbePorts, pools: Pools, metrics: Metrics | None = None, *,
                 candidates: int = 8, fresh_s: float = 10.0, gateway_s: float = 10.0,
                 state_dir: str | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.ports = ports
        self.pools = pools
        self.metrics = metrics
        self.n = candidates
        self.fresh_s = fresh_s
        self.gateway_s = gateway_s
        self.state_path = os.path.join(state_dir, STATE_FILE) if state_dir else None
        self.clock = clock
        self._lock = threading.Lock()
        self._segs: dict[str, _Seg] = {}
        self._opening: dict[str, threading.Lock] = {}
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._work: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._dirty: set[str] = set()  # networks whose window moved (a candidate was taken)
        self._taken: dict[tuple[str, int], collections.deque[float]] = {}  # when, the last BURST_S
        self._told: set[str] = set()  # segments already logged as on another OVSDB

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        for name, target in (("probe-io", self._io_loop), ("probe-work", self._work_loop),
                             ("probe-ports", self._maintain)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, remove_ports: bool = True) -> None:
        self._stop.set()
        self._wake()
        self._work.put(None)
        for t in self._threads:
            t.join(5)
        with self._lock:
            for s in self._segs.values():
                if s.sock is not None:
                    s.sock.close()
                    s.sock = None
        if remove_ports:
            try:
                self.ports.remove_all()
            except Exception as exc:  # shutdown goes on; the next start prunes what is left
                log.warning("msg=%s error=%s", "could not remove the probe ports", exc)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    # ---- joining a segment (from Allocate) ---------------------------------------------------

    def join(self, req: Request) -> Joined | None:
        """The request's segment with its probe port, made on first use (once per segment;
        later requests find it ready). None when the request's OVSDB is not ipamd's or the
        port cannot be made now (the allocator then probes from the pod's interface)."""
        seg = req.segment
        if seg is None:
            return None
        if seg.ovsdb and _remote(seg.ovsdb) != _remote(self.ports.remote):
            if seg.key not in self._told:
                self._told.add(seg.key)
                log.info("segment=%s ovsdb=%s msg=%s", seg.key, seg.ovsdb,
                         f"not ipamd's OVSDB ({self.ports.remote}): no probe port, probes go from the pods")
            return None
        s = self._ready(seg)
        if s is None:
            return None
        self._register(s, req.network, req.pool, req.conflict_check, req.conflict_check_wait_ms)
        return Joined(self, s, req.network)

    def _ready(self, seg: Segment) -> _Seg | None:
        with self._lock:
            s = self._segs.get(seg.key)
            if s is not None and s.handle is not None:
                return s
            gate = self._opening.setdefault(seg.key, threading.Lock())
        with gate:  # one request makes the port; the others wait for it
            with self._lock:
                s = self._segs.setdefault(seg.key, _Seg(seg))
                if s.handle is not None:
                    return s
                if s.failed_until > self.clock():
                    return None
            return s if self._open(s) else None

    def _open(self, s: _Seg) -> bool:
        try:
            h = self.ports.ensure(s.segment)
            sock = _watch_socket(h)
        except Exception as exc:
            log.error("segment=%s msg=%s error=%s", s.segment.key,
                      "cannot make the probe port: probing from the pods' interfaces instead", exc)
            with self._lock:
                s.failed_until = self.clock() + RETRY_S
            self._count("ipamd_probe_port_failures_total", segment=s.segment.key)
            return False
        with self._lock:
            old, s.sock, s.handle, s.own = s.sock, sock, h, frames.mac_bytes(h.mac)
            s.failed_until = 0.0
            s.gateway_due = 0.0
        if old is not None:
            close_later(old)
        self._wake()
        return True

    def _register(self, s: _Seg, network: str, pool: PoolDef, candidates: bool, wait_ms: int) -> None:
        with self._lock:
            net = s.networks.get(network)
            changed = net is None or net.candidates != candidates or net.wait_ms != wait_ms
            if net is not None and not changed:
                net.pool = pool
                return
            for other in self._segs.values():  # a network lives on one segment (the latest)
                if other is not s and other.networks.pop(network, None) is not None:
                    for key in [k for k in other.cands if k[0] == network]:
                        del other.cands[key]
            s.networks[network] = _Net(network, pool, candidates, wait_ms)
            self._dirty.add(network)
        self._save()
        self._wake()

    # ---- the allocator's side ----------------------------------------------------------------

    def size(self, network: str, k: int) -> int:
        """The window of a subnet entry: probeCandidates, widened by the takes of the last
        BURST_S (at most GROW times): a burst of ADDs (a node's pods after a restart, a
        scale-up) otherwise empties a window of 8 faster than its probes (conflictCheckWaitMs
        each) refill it, and the rest wait for an inline probe. Back to probeCandidates once
        the burst is over (the candidates beyond are dropped unused)."""
        with self._lock:
            q = self._taken.get((network, k))
            if not q:
                return self.n
            cut = self.clock() - BURST_S
            while q and q[0] < cut:
                q.popleft()
            return min(self.n * GROW, self.n + len(q))

    def take(self, s: _Seg, network: str, k: int, occ: SubnetOccupancy, wait_ms: int,
             order: list[int]) -> int | None:
        now = self.clock()
        best = None
        with self._lock:
            self._taken.setdefault((network, k), collections.deque(maxlen=self.n * GROW)).append(now)
            table = s.cands.get((network, k), {})
            for off in order:
                ipi = int(occ.address(off))
                f = table.get(ipi)
                if f is not None and f.started + self.fresh_s > now and f.wait_ms >= wait_ms:
                    best = off
                    del table[ipi]
                    self._dirty.add(network)
                    break
        self._count("ipamd_preprobed_total", network=network, result="fresh" if best is not None else "cold")
        if best is not None:
            self._wake()
        return best

    def detect(self, s: _Seg, address: IPAddress, wait_ms: int) -> ConflictOutcome | None:
        p = self._start(s, address, conflict=True, wait_ms=wait_ms)
        if p is None:
            return None
        p.done.wait(wait_ms / 1000 + 2.0)
        elapsed = (self.clock() - p.started) * 1000
        self._observe(elapsed, "conflict" if p.answer else "free")
        return ConflictOutcome(p.answer is not None, p.answer or "", elapsed)

    def gateways_seen(self, req: Request) -> list[GatewaySeen]:
        """The request's gateways that its segment's port saw answer within gatewayCacheSeconds."""
        if req.segment is None:
            return []
        now = self.clock()
        out = []
        with self._lock:
            s = self._segs.get(req.segment.key)
            if s is None or s.handle is None:
                return []
            for gw in (spec.gateway for spec in req.pool.subnets):
                hit = s.gateways.get(gw) if gw is not None else None
                if gw is not None and hit is not None and now - hit[1] < self.gateway_s:
                    out.append(GatewaySeen(gw, hit[0], int((now - hit[1]) * 1000)))
        return out

    # ---- probes in flight --------------------------------------------------------------------

    def _start(self, s: _Seg, address: IPAddress, *, conflict: bool, wait_ms: int,
               on_done: Callable[[_Probe], None] | None = None) -> _Probe | None:
        now = self.clock()
        p = _Probe(address, conflict, send_times(now, wait_ms),
                   now + wait_ms / 1000, now, on_done)
        with self._lock:
            if s.sock is None:
                return None
            s.inflight.setdefault(int(address), []).append(p)
        self._wake()
        return p

    def _finish(self, s: _Seg, p: _Probe) -> None:
        """Caller holds the lock."""
        probes = s.inflight.get(int(p.address), [])
        if p in probes:
            probes.remove(p)
            if not probes:
                del s.inflight[int(p.address)]
        p.done.set()
        if p.on_done is not None:
            p.on_done(p)

    def _send_due(self, now: float) -> float:
        """Send the frames that are due and finish the probes whose wait is over. Returns when
        the next one is due (monotonic)."""
        nxt = now + TICK_S
        with self._lock:
            for s in self._segs.values():
                for probes in list(s.inflight.values()):
                    for p in list(probes):
                        while p.sends and p.sends[0] <= now:
                            p.sends.pop(0)
                            self._send(s, p.address)
                        if p.deadline <= now:
                            self._finish(s, p)
                            continue
                        nxt = min(nxt, p.deadline, *p.sends[:1])
        return nxt

    def _send(self, s: _Seg, address: IPAddress) -> None:
        if s.sock is None:
            return
        frame = (frames.arp_request(s.own, None, address) if address.version == 4
                 else frames.neighbor_solicitation(s.own, None, address))
        try:
            s.sock.send(frame)
        except OSError as exc:  # the port went away: the maintenance thread rebuilds it
            log.info("segment=%s msg=%s error=%s", s.segment.key, "probe frame not sent", exc)
        self._count("ipamd_probe_frames_total", segment=s.segment.key)

    # ---- what the port hears -----------------------------------------------------------------

    def _drain(self, s: _Seg) -> None:
        sock = s.sock
        if sock is None:
            return
        while True:
            try:
                data, addr = sock.recvfrom(2048, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if addr[2] == PACKET_OUTGOING:
                continue
            self._frame(s, data)

    def _frame(self, s: _Seg, data: bytes) -> None:
        arp = frames.parse_arp(data)
        if arp is not None:
            if arp.sha == s.own:
                return
            if int(arp.spa):
                self._claim(s, arp.spa, frames.mac_text(arp.sha))
            elif arp.op == 1:
                self._collision(s, arp.tpa, frames.mac_text(arp.sha))
            return
        nd = frames.parse_nd(data)
        if nd is None or nd.src_mac == s.own:
            return
        if nd.type == frames.ICMPV6_NA:
            self._claim(s, nd.target, frames.mac_text(nd.lladdr or nd.src_mac))
        elif int(nd.src_ip) == 0:
            self._collision(s, nd.target, frames.mac_text(nd.src_mac))
        elif not nd.src_ip.is_link_local():
            self._claim(s, nd.src_ip, frames.mac_text(nd.src_mac))

    def _claim(self, s: _Seg, ip: IPAddress, mac: str) -> None:
        """A host with `mac` uses `ip` (it sent from it, or advertised it)."""
        now = self.clock()
        work: list[Callable[[], None]] = []
        with self._lock:
            for p in list(s.inflight.get(int(ip), ())):
                p.answer = mac
                self._finish(s, p)
            if ip in s.gateways or any(ip == g.gateway for n in s.networks.values() for g in n.pool.subnets):
                s.gateways[ip] = (mac, now)
                return  # a gateway holds no lease: nothing to judge (it answers our probes often)
            for net in s.networks.values():
                k = _subnet_of(net.pool, ip)
                if k is None:
                    continue
                table = s.cands.get((net.name, k))
                if table is not None and table.pop(int(ip), None) is not None:
                    work.append(functools.partial(self._quarantine_free, net.name, ip, mac, "watch"))
                    continue
                seen = s.ok.get((net.name, int(ip)))
                if seen is not None and seen[0] == mac and seen[1] > now:
                    continue
                work.append(functools.partial(self._judge, s, net.name, ip, mac))
        for w in work:
            self._work.put(w)

    def _collision(self, s: _Seg, ip: IPAddress, mac: str) -> None:
        """Someone else probes `ip` (DAD / ARP probe): our conflict probes for it count it as an
        answer (RFC 5227 2.1.1); a candidate is no longer trusted (probed again later)."""
        with self._lock:
            for p in list(s.inflight.get(int(ip), ())):
                if p.conflict:
                    p.answer = mac
                    self._finish(s, p)
            for table in s.cands.values():
                table.pop(int(ip), None)

    # ---- store work (the worker thread) ------------------------------------------------------

    def _judge(self, s: _Seg, network: str, ip: IPAddress, mac: str) -> None:
        e = self.pools.durable_entry(network, ip)
        # free (its probe will tell), already quarantined/cooling, or a lease whose interface MAC
        # ipamd was never told: nothing to compare, for a while
        nothing = e is None or e.state != ACTIVE or not e.mac
        if nothing or e.mac.lower() == mac.lower():  # type: ignore[union-attr]
            with self._lock:
                s.ok[(network, int(ip))] = (mac, self.clock() + (NO_LEASE_CACHE_S if nothing else OK_CACHE_S))
                if len(s.ok) > 65536:
                    s.ok.clear()
            return
        assert e is not None
        self.pools.quarantine(network, e, mac)
        self._count("ipamd_conflicts_total", network=network, source="watch", kind="lease")
        log.warning("network=%s ip=%s container_id=%s ifname=%s lease_mac=%s conflict_mac=%s segment=%s "
                    "msg=%s", network, ip, e.container_id, e.ifname, e.mac, mac, s.segment.key,
                    "another host answered for or announced a leased address: in conflict, quarantined")

    def _quarantine_free(self, network: str, ip: IPAddress, mac: str, source: str) -> None:
        if self.pools.quarantine_free(network, ip, mac):
            self._count("ipamd_conflicts_total", network=network, source=source, kind="candidate")

    def _work_loop(self) -> None:
        while True:
            job = self._work.get()
            if job is None:
                return
            try:
                job()
            except Exception:
                log.exception("msg=%s", "probe store work failed")

    # ---- the I/O thread ----------------------------------------------------------------------

    def _io_loop(self) -> None:
        next_tick = 0.0
        while not self._stop.is_set():
            with self._lock:
                socks = {s.sock.fileno(): s for s in self._segs.values() if s.sock is not None}
            now = self.clock()
            due = self._send_due(now)
            timeout = max(0.0, min(due, next_tick) - self.clock())
            try:
                ready, _, _ = select.select([self._wake_r, *socks], [], [], timeout)
            except (OSError, ValueError):  # a socket closed under us: list them again
                continue
            for fd in ready:
                if fd == self._wake_r:
                    with contextlib.suppress(OSError):
                        while os.read(self._wake_r, 256):
                            pass
                elif fd in socks:
                    self._drain(socks[fd])
            now = self.clock()
            with self._lock:
                dirty, self._dirty = self._dirty, set()
            if now >= next_tick or dirty:
                everything = now >= next_tick
                if everything:
                    next_tick = now + TICK_S
                try:
                    self._refill(now, None if everything else dirty)
                except Exception:
                    log.exception("msg=%s", "refilling the candidates failed")

    def _refill(self, now: float, only: set[str] | None = None) -> None:
        """Keep each network's window of candidates fresh (`only` those networks, when given),
        and the gateways answered."""
        with self._lock:
            plan = [(s, n.name, n.pool, n.wait_ms) for s in self._segs.values() if s.sock is not None
                    for n in s.networks.values() if n.candidates and (only is None or n.name in only)]
            gw = [s for s in self._segs.values() if s.sock is not None and s.gateway_due <= now]
        budget: dict[str, int] = {}
        for s, name, pool, wait_ms in plan:
            for k in range(len(pool.subnets)):
                window = self.pools.window(name, k, self.size(name, k))  # the pipeline lock, not ours
                left = budget.setdefault(s.segment.key, MAX_STARTS)
                budget[s.segment.key] = left - self._arm(s, name, k, window, wait_ms, now, left)
        for s in gw:
            with self._lock:
                s.gateway_due = now + self.gateway_s / 2
                ips = {spec.gateway for n in s.networks.values() for spec in n.pool.subnets
                       if spec.gateway is not None}
            for ip in ips:
                self._start(s, ip, conflict=False, wait_ms=GATEWAY_WAIT_MS)

    def _arm(self, s: _Seg, network: str, k: int, window: Iterable[IPAddress], wait_ms: int,
             now: float, budget: int = MAX_STARTS) -> int:
        """Start a probe for each candidate of the window that is not fresh (at most `budget`);
        returns how many were started."""
        todo: list[IPAddress] = []
        with self._lock:
            table = s.cands.setdefault((network, k), {})
            keep = {int(ip) for ip in window}
            for ipi in [i for i in table if i not in keep]:
                del table[ipi]
            for ip in window:
                f = table.get(int(ip))
                stale = f is None or f.started + self.fresh_s / 2 <= now or f.wait_ms < wait_ms
                busy = any(p.conflict for p in s.inflight.get(int(ip), ()))
                if stale and not busy and len(todo) < budget:
                    todo.append(ip)
        for ip in todo:
            self._start(s, ip, conflict=True, wait_ms=wait_ms,
                        on_done=functools.partial(self._probed, s, network, k, wait_ms))
        return len(todo)

    def _probed(self, s: _Seg, network: str, k: int, wait_ms: int, p: _Probe) -> None:
        """A candidate's probe is over (I/O thread, lock held)."""
        table = s.cands.setdefault((network, k), {})
        if p.answer is not None:
            table.pop(int(p.address), None)
            ip, mac = p.address, p.answer
            self._work.put(lambda: self._quarantine_free(network, ip, mac, "probe"))
            return
        table[int(p.address)] = _Fresh(p.started, wait_ms)
        self._observe((self.clock() - p.started) * 1000, "free", background=True)

    # ---- port maintenance --------------------------------------------------------------------

    def _maintain(self) -> None:
        self._restore()
        while not self._stop.wait(HEALTH_S):
            with self._lock:
                segs = [s for s in self._segs.values() if s.handle is not None or s.networks]
            for s in segs:
                h = s.handle
                if h is not None and self.ports.alive(h):
                    continue
                if s.failed_until > self.clock():
                    continue
                log.warning("segment=%s msg=%s", s.segment.key, "probe port gone or down: re-making it")
                with self._lock:
                    s.handle = None
                self._open(s)

    # ---- state that survives a restart -------------------------------------------------------

    def _save(self) -> None:
        if self.state_path is None:
            return
        with self._lock:
            doc = {"networks": {n.name: {"bridge": s.segment.bridge, "vlan": s.segment.vlan,
                                         "trunks": list(s.segment.trunks), "ovsdb": s.segment.ovsdb,
                                         "candidates": n.candidates, "waitMs": n.wait_ms}
                                for s in self._segs.values() for n in s.networks.values()}}
        tmp = self.state_path + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(doc, fh, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.state_path)
        except OSError as exc:
            log.warning("file=%s msg=%s error=%s", self.state_path, "cannot save the probe segments", exc)

    def _restore(self) -> None:
        """At start: the segments the networks used before, their ports made (or reused) and
        their candidates armed; this ipamd's ports of other segments removed."""
        doc: dict[str, dict[str, object]] = {}
        if self.state_path is not None:
            try:
                with open(self.state_path, encoding="utf-8") as fh:
                    doc = dict(json.load(fh).get("networks", {}))
            except FileNotFoundError:
                pass
            except (OSError, ValueError, AttributeError) as exc:
                log.warning("file=%s msg=%s error=%s", self.state_path, "ignoring an unreadable state file",
                            exc)
        wanted: dict[str, tuple[Segment, list[tuple[str, bool, int]]]] = {}
        for name, d in doc.items():
            seg, flags = _saved(name, d)
            if seg is not None and flags is not None:
                wanted.setdefault(seg.key, (seg, []))[1].append(flags)
        try:
            self.ports.prune(set(wanted))
        except Exception as exc:
            log.warning("msg=%s error=%s", "could not prune old probe ports", exc)
        for seg, nets in wanted.values():
            if self._stop.is_set():
                return
            s = self._ready(seg)
            if s is None:
                continue
            for name, cands, wait_ms in nets:
                pool = self.pools.pool(name)
                if pool is not None:
                    self._register(s, name, pool, cands, wait_ms)

    # ---- metrics -----------------------------------------------------------------------------

    def _count(self, name: str, **labels: str) -> None:
        if self.metrics is not None:
            self.metrics.inc(name, 1, **labels)

    def _observe(self, ms: float, result: str, background: bool = False) -> None:
        if self.metrics is not None:
            self.metrics.observe("ipamd_probe_duration_ms", ms, kind="preprobe" if background else "conflict",
                                 result=result)

    def gauges(self) -> list[tuple[str, tuple[tuple[str, str], ...], float]]:
        now = self.clock()
        out: list[tuple[str, tuple[tuple[str, str], ...], float]] = []
        with self._lock:
            for s in self._segs.values():
                labels = (("segment", s.segment.key),)
                out.append(("ipamd_probe_port_up", labels, 1.0 if s.sock is not None else 0.0))
                fresh = sum(1 for t in s.cands.values() for f in t.values() if f.started + self.fresh_s > now)
                out.append(("ipamd_preprobed_fresh", labels, float(fresh)))
        return out


def _saved(name: str, d: object) -> tuple[Segment | None, tuple[str, bool, int] | None]:
    """One network's entry of the state file, checked (an entry that does not parse is skipped)."""
    if not isinstance(d, dict):
        return None, None
    bridge, vlan, trunks, ovsdb = d.get("bridge"), d.get("vlan"), d.get("trunks", []), d.get("ovsdb", "")
    cands, wait_ms = d.get("candidates", True), d.get("waitMs", 100)
    if not (isinstance(bridge, str) and bridge and isinstance(vlan, int) and isinstance(trunks, list)
            and all(isinstance(t, int) for t in trunks) and isinstance(ovsdb, str)
            and isinstance(cands, bool) and isinstance(wait_ms, int)):
        return None, None
    return Segment(bridge, vlan, tuple(trunks), ovsdb), (name, cands, wait_ms)


def _subnet_of(pool: PoolDef, ip: IPAddress) -> int | None:
    return next((i for i, sp in enumerate(pool.subnets)
                 if ip.version == sp.version and ip in sp.subnet), None)


def _remote(r: str) -> str:
    return r[len("unix:"):].rstrip("/") if r.startswith("unix:") else r


def _watch_socket(h: PortHandle) -> socket.socket:
    """A packet socket on the probe port receiving ARP and ND only (BPF), all multicast too."""
    sock, _ = packet_socket(h.netns_path, h.name, ETH_P_ALL, allmulti=True)
    try:
        prog = b"".join(struct.pack("HBBI", *ins) for ins in _BPF)
        buf = ctypes.create_string_buffer(prog)
        fprog = struct.pack("HL", len(_BPF), ctypes.addressof(buf))
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        sock.setblocking(False)
        _drain_all(sock)  # what arrived before the filter was attached
    except BaseException:
        sock.close()
        raise
    return sock


def _drain_all(sock: socket.socket) -> None:
    with contextlib.suppress(BlockingIOError, InterruptedError):
        while True:
            sock.recv(2048, socket.MSG_DONTWAIT)


__all__ = ["IPNetwork", "Joined", "SegmentProbes"]
