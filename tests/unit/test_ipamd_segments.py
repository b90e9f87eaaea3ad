"""Pre-probed candidates and the passive watch (ipamd/segments.py) without a wire: the allocator
over the in-memory store, a fake clock, frames built by core.frames fed to the engine as the
probe port would hear them. The port itself and real frames: tests/integration/test_ipamd_probe_port.py.
"""

from __future__ import annotations

import queue
from typing import Any

import pytest
from netaddr import IPAddress, IPNetwork

from core import frames
from core.spec import Segment, parse_ipam
from ipamd.allocator import Allocator, Request
from ipamd.conflicts import ConflictOutcome
from ipamd.model import ACTIVE, QUARANTINED
from ipamd.probe_port import PortHandle
from ipamd.segments import SegmentProbes, _Fresh, _Seg
from ipamd.store import MemoryStore

SEG = Segment("br0", 100)
POOL = parse_ipam({"subnets": [{"subnet": "10.0.0.0/24", "gateway": "10.0.0.1", "rangeStart": "10.0.0.10",
                                "rangeEnd": "10.0.0.20"}]}).pool
OWN = bytes.fromhex("020000000001")  # the probe port's MAC


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Ports:
    """ProbePorts stand-in: never touched (the segment is marked ready by hand)."""

    remote = "unix:/run/openvswitch/db.sock"


class Wire:
    """What the engine asked to probe inline; the answer to give."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.answer: str | None = None


def engine(clock: Clock, n: int = 4) -> tuple[SegmentProbes, Allocator, MemoryStore, _Seg, Wire]:
    store = MemoryStore()
    alloc = Allocator(store, clock=lambda: clock.t)
    eng = SegmentProbes(Ports(), alloc, candidates=n, fresh_s=10.0, gateway_s=10.0, clock=clock)  # type: ignore[arg-type]
    s = _Seg(SEG)
    s.handle = PortHandle(SEG, "ovp000000000000", "/run/netns/probe", frames.mac_text(OWN), 2)  # "ready"
    s.own = OWN
    eng._segs[SEG.key] = s
    alloc.segments = eng
    wire = Wire()

    def detect(seg: _Seg, address: IPAddress, wait_ms: int) -> ConflictOutcome:
        wire.asked.append(str(address))
        return ConflictOutcome(wire.answer is not None, wire.answer or "", float(wait_ms))

    eng.detect = detect  # type: ignore[method-assign,assignment]
    return eng, alloc, store, s, wire


def req(cid: str, **kw: Any) -> Request:
    return Request(network="n1", pool=POOL, container_id=cid, ifname="eth0", netns="/run/netns/x",
                   conflict_check=True, segment=SEG, interface_mac="02:aa:00:00:00:01", **kw)


def fresh(s: _Seg, clock: Clock, *ips: str, age: float = 0.0, wait_ms: int = 100) -> None:
    table = s.cands.setdefault(("n1", 0), {})
    for ip in ips:
        table[int(IPAddress(ip))] = _Fresh(clock.t - age, wait_ms)


def run_work(eng: SegmentProbes) -> None:
    """Run what the I/O thread queued for the store worker."""
    while True:
        try:
            job = eng._work.get_nowait()
        except queue.Empty:
            return
        assert job is not None
        job()


def test_a_fresh_candidate_is_taken_without_a_probe_in_round_robin_order() -> None:
    clock = Clock()
    _eng, alloc, store, s, wire = engine(clock)
    alloc.ensure_pool("n1", POOL)
    fresh(s, clock, "10.0.0.12", "10.0.0.11")
    g = alloc.allocate(req("c1"))
    assert [str(e.ip) for e in g.entries] == ["10.0.0.11"] and g.pre_probed == frozenset({0})
    assert g.conflict_probed and wire.asked == []  # nothing probed inline
    g2 = alloc.allocate(req("c2"))
    assert [str(e.ip) for e in g2.entries] == ["10.0.0.12"] and wire.asked == []
    g3 = alloc.allocate(req("c3"))  # none left: the policy's pick, probed inline from the port
    assert g3.pre_probed == frozenset() and wire.asked == [str(g3.entries[0].ip)]
    assert [e.ip for e in store.list_entries("n1")] == [IPAddress(x) for x in ("10.0.0.11", "10.0.0.12", "10.0.0.13")]


@pytest.mark.parametrize(("age", "wait_ms", "why"), [(10.0, 100, "past its TTL"), (9.0, 50, "probed with a shorter wait")])
def test_a_stale_candidate_is_never_trusted(age: float, wait_ms: int, why: str) -> None:
    clock = Clock()
    _eng, alloc, _store, s, wire = engine(clock)
    fresh(s, clock, "10.0.0.10", age=age, wait_ms=wait_ms)
    g = alloc.allocate(req("c1"))
    assert g.pre_probed == frozenset(), why
    assert wire.asked == ["10.0.0.10"]  # probed inline


def test_the_store_not_the_cache_decides_a_candidate_held_meanwhile_is_skipped() -> None:
    clock = Clock()
    _eng, alloc, store, s, _wire = engine(clock)
    alloc.allocate(Request(network="n1", pool=POOL, container_id="static", ifname="eth0",
                           requested_ips=(IPAddress("10.0.0.15"),)))
    fresh(s, clock, "10.0.0.15")  # the cache says .15 is fresh: it is leased
    g = alloc.allocate(req("c1"))
    assert [str(e.ip) for e in g.entries] == ["10.0.0.16"] and g.pre_probed == frozenset()  # after the cursor
    ips = [str(e.ip) for e in store.list_entries("n1", (ACTIVE,))]
    assert sorted(ips) == ["10.0.0.15", "10.0.0.16"]


def test_a_conflict_found_inline_is_replaced_by_a_fresh_candidate() -> None:
    clock = Clock()
    eng, alloc, store, s, wire = engine(clock)
    wire.answer = "0a:bb:00:00:00:09"
    inline = eng.detect

    def detect(seg: _Seg, address: IPAddress, wait_ms: int) -> ConflictOutcome:
        fresh(s, clock, "10.0.0.12")  # meanwhile the background probe found .12 free
        return inline(seg, address, wait_ms)

    eng.detect = detect  # type: ignore[method-assign]
    g = alloc.allocate(req("c1"))  # .10 is probed inline: answered; .12 (fresh, in the window) replaces it
    assert wire.asked == ["10.0.0.10"]
    assert [(str(e.ip), e.conflict_mac) for e in store.list_entries("n1", (QUARANTINED,))] == [
        ("10.0.0.10", "0a:bb:00:00:00:09")]
    assert [str(e.ip) for e in g.entries] == ["10.0.0.12"] and g.pre_probed == frozenset({0})
    assert g.quarantined == ("10.0.0.10",) and g.conflict_probed


def test_a_burst_widens_the_window_and_it_narrows_once_the_burst_is_over() -> None:
    clock = Clock()
    eng, alloc, _store, s, _wire = engine(clock, n=2)
    alloc.ensure_pool("n1", POOL)
    assert eng.size("n1", 0) == 2
    for i in range(7):  # no candidate fresh: each ADD probes inline, and still counts as demand
        alloc.allocate(req(f"c{i}"))
    assert eng.size("n1", 0) == 8  # 2 + 7 takes, at most 4 x 2
    clock.t += 0.5
    fresh(s, clock, "10.0.0.19")  # third in line: in the widened window (.17-.20), not in one of 2
    g = alloc.allocate(req("c7"))
    assert [str(e.ip) for e in g.entries] == ["10.0.0.19"] and g.pre_probed == frozenset({0})
    clock.t += 5.01  # the burst is over
    assert eng.size("n1", 0) == 2


def test_window_is_the_next_free_addresses_after_the_cursor() -> None:
    clock = Clock()
    _eng, alloc, _store, _s, _wire = engine(clock)
    alloc.ensure_pool("n1", POOL)
    assert [str(ip) for ip in alloc.window("n1", 0, 3)] == ["10.0.0.10", "10.0.0.11", "10.0.0.12"]
    alloc.allocate(Request(network="n1", pool=POOL, container_id="a", ifname="eth0"))
    assert [str(ip) for ip in alloc.window("n1", 0, 3)] == ["10.0.0.11", "10.0.0.12", "10.0.0.13"]
    assert len(alloc.window("n1", 0, 100)) == 10  # .11-.20: every free one once


# ---- what the port hears -------------------------------------------------------------------------


def arp_from(ip: str, mac: str) -> bytes:
    return frames.arp_announcement(mac, IPAddress(ip))


def test_a_foreign_claim_of_a_candidate_drops_it_and_quarantines_it_durably() -> None:
    clock = Clock()
    eng, alloc, store, s, _wire = engine(clock)
    alloc.ensure_pool("n1", POOL)
    eng._register(s, "n1", POOL, True, 100)
    fresh(s, clock, "10.0.0.10", "10.0.0.11")
    eng._frame(s, arp_from("10.0.0.10", "0a:bb:00:00:00:07"))
    assert int(IPAddress("10.0.0.10")) not in s.cands[("n1", 0)]
    run_work(eng)
    (q,) = store.list_entries("n1", (QUARANTINED,))
    assert (str(q.ip), q.conflict_mac, q.container_id) == ("10.0.0.10", "0a:bb:00:00:00:07", "")
    g = alloc.allocate(req("c1"))
    assert [str(e.ip) for e in g.entries] == ["10.0.0.11"]  # never the claimed one


def test_someone_elses_probe_makes_a_candidate_stale_but_is_no_conflict() -> None:
    clock = Clock()
    eng, _alloc, store, s, _wire = engine(clock)
    eng._register(s, "n1", POOL, True, 100)
    fresh(s, clock, "10.0.0.10")
    probe = frames.arp_request(bytes.fromhex("0abb00000008"), None, IPAddress("10.0.0.10"))
    eng._frame(s, probe)
    run_work(eng)
    assert s.cands[("n1", 0)] == {} and store.list_entries("n1", (QUARANTINED,)) == []


def test_the_watch_judges_a_leased_address_by_its_lease_mac() -> None:
    clock = Clock()
    eng, alloc, store, s, _wire = engine(clock)
    eng._register(s, "n1", POOL, True, 100)
    fresh(s, clock, "10.0.0.10")
    g = alloc.allocate(req("c1"))
    ip = str(g.entries[0].ip)
    eng._frame(s, arp_from(ip, "02:aa:00:00:00:01"))  # the pod itself
    run_work(eng)
    assert [str(e.ip) for e in store.list_entries("n1", (ACTIVE,))] == [ip]
    assert ("n1", int(IPAddress(ip))) in s.ok
    eng._frame(s, arp_from(ip, "02:aa:00:00:00:01"))  # cached: no store read queued
    assert eng._work.empty()
    eng._frame(s, arp_from(ip, "0a:cc:00:00:00:05"))  # another host announces it
    run_work(eng)
    (q,) = store.list_entries("n1", (QUARANTINED,))
    assert (str(q.ip), q.conflict_mac, q.owner) == (ip, "0a:cc:00:00:00:05", ("c1", "eth0"))
    assert [(str(e.ip), e.conflict_mac) for e in alloc.conflicts_of("n1", "c1", "eth0")] == [(ip, "0a:cc:00:00:00:05")]
    assert store.get_by_owner("n1", "c1", "eth0") == []


def test_own_frames_and_other_subnets_are_ignored_and_gateways_are_remembered() -> None:
    clock = Clock()
    eng, _alloc, _store, s, _wire = engine(clock)
    eng._register(s, "n1", POOL, True, 100)
    fresh(s, clock, "10.0.0.10")
    eng._frame(s, frames.arp_announcement(frames.mac_text(OWN), IPAddress("10.0.0.10")))
    eng._frame(s, arp_from("10.9.9.9", "0a:cc:00:00:00:05"))
    assert eng._work.empty() and int(IPAddress("10.0.0.10")) in s.cands[("n1", 0)]
    eng._frame(s, arp_from("10.0.0.1", "0a:00:00:00:00:fe"))  # the gateway speaks
    assert eng._work.empty()  # a gateway holds no lease: no store read for its frames
    seen = eng.gateways_seen(req("c9"))
    assert [(str(g.gateway), g.mac, g.age_ms) for g in seen] == [("10.0.0.1", "0a:00:00:00:00:fe", 0)]
    clock.t += 10.5
    assert eng.gateways_seen(req("c9")) == []  # older than gatewayCacheSeconds


def test_a_candidate_probe_answered_quarantines_and_one_unanswered_becomes_fresh() -> None:
    clock = Clock()
    eng, alloc, store, s, _wire = engine(clock)
    alloc.ensure_pool("n1", POOL)
    eng._register(s, "n1", POOL, True, 100)
    s.sock = object()  # type: ignore[assignment]
    sent: list[str] = []
    eng._send = lambda seg, address: sent.append(str(address))  # type: ignore[method-assign]
    eng._refill(clock.t)
    want = [f"10.0.0.{i}" for i in (10, 11, 12, 13)]
    assert sorted(str(IPAddress(i)) for i in s.inflight) == ["10.0.0.1", *want]  # the gateway too
    eng._send_due(clock.t)
    assert sorted(sent) == ["10.0.0.1", *want]  # the first frame of each probe
    eng._frame(s, frames.arp_announcement("0a:dd:00:00:00:01", IPAddress("10.0.0.11")))  # .11 answers
    clock.t += 0.2
    eng._send_due(clock.t)
    run_work(eng)
    table = s.cands[("n1", 0)]
    assert sorted(str(IPAddress(i)) for i in table) == ["10.0.0.10", "10.0.0.12", "10.0.0.13"]
    assert [str(IPAddress(i)) for i in s.inflight] == ["10.0.0.1"]  # the gateway probe waits 500 ms
    assert [str(e.ip) for e in store.list_entries("n1", (QUARANTINED,))] == ["10.0.0.11"]
    assert all(f.started == pytest.approx(clock.t - 0.2) for f in table.values())



def test_probe_held_probes_what_the_attachment_holds_from_its_interface() -> None:
    """An Allocate that could not probe (no probe port) is followed, once the pod's port exists,
    by one with probe_held: the held address is probed from the pod and replaced on conflict."""
    clock = Clock()
    asked: list[tuple[str, str]] = []

    class PodProber:
        def detect(self, netns: str, ifname: str, address: IPAddress, wait_ms: int) -> ConflictOutcome:
            asked.append((netns, str(address)))
            return ConflictOutcome(str(address) == "10.0.0.10", "0a:ee:00:00:00:01", 1.0)

    store = MemoryStore()
    alloc = Allocator(store, prober=PodProber(), clock=lambda: clock.t)  # type: ignore[arg-type]
    first = alloc.allocate(Request(network="n1", pool=POOL, container_id="c1", ifname="eth0", netns="",
                                   conflict_check=True))
    assert not first.conflict_probed and asked == []  # nothing could probe yet
    again = alloc.allocate(Request(network="n1", pool=POOL, container_id="c1", ifname="eth0",
                                   netns="/run/netns/p", conflict_check=True, probe_held=True))
    assert asked == [("/run/netns/p", "10.0.0.10"), ("/run/netns/p", "10.0.0.11")]
    assert [str(e.ip) for e in again.entries] == ["10.0.0.11"] and again.conflict_probed
    assert [str(e.ip) for e in store.get_by_owner("n1", "c1", "eth0")] == ["10.0.0.11"]


@pytest.mark.parametrize("prefix", ["10.1.0.0/24", "fd00:1::/64"])
def test_window_is_what_pick_hands_out_next_and_changes_nothing(prefix: str) -> None:
    import copy

    from ipamd import policy
    from ipamd.occupancy import SubnetOccupancy

    spec = parse_ipam({"subnets": [{"subnet": prefix, "exclude": [str(IPAddress(IPNetwork(prefix).first + 5))]}]}).pool.subnets[0]
    occ = SubnetOccupancy(spec)
    for i in (1, 2, 4, 7, 8):
        occ.mark_active(i, advance=False)
    occ.cursor = 3
    before = copy.deepcopy(occ.__dict__)
    order = policy.window("n", spec, occ, 5)
    assert occ.__dict__ == before  # held for a moment, then put back exactly
    sim = copy.deepcopy(occ)
    picks = []
    for _ in range(5):
        off = policy.pick("n", spec, sim, None)
        sim.mark_active(off, advance=True)
        picks.append(off)
    assert order == picks


def test_a_chatty_host_on_an_address_without_a_lease_costs_one_store_read_per_while() -> None:
    clock = Clock()
    eng, _alloc, _store, s, _wire = engine(clock)
    eng._register(s, "n1", POOL, True, 100)
    eng._frame(s, arp_from("10.0.0.200", "0a:cc:00:00:00:05"))  # no lease there
    run_work(eng)
    eng._frame(s, arp_from("10.0.0.200", "0a:cc:00:00:00:05"))
    assert eng._work.empty()  # judged a moment ago: not read again
    clock.t += 6
    eng._frame(s, arp_from("10.0.0.200", "0a:cc:00:00:00:05"))
    assert not eng._work.empty()  # a lease granted meanwhile would be judged now
