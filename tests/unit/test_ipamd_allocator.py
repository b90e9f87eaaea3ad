"""Allocator properties over the in-memory store, a fake clock and a fake prober."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from netaddr import IPAddress, IPNetwork

from core.spec import PoolDef, parse_ipam
from ipamd import policy
from ipamd.allocator import Allocator, Request
from ipamd.conflicts import ConflictOutcome
from ipamd.errors import (
    AddressConflict,
    AddressOutOfPool,
    AddressTaken,
    InvalidRequest,
    PoolDefinitionConflict,
    PoolExhausted,
)
from ipamd.model import ACTIVE, QUARANTINED, Entry
from ipamd.store import MemoryStore


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def pool(**ipam: object) -> PoolDef:
    return parse_ipam(ipam).pool


def alloc(a: Allocator, p: PoolDef, cid: str, net: str = "n1", **kw: object) -> list[str]:
    g = a.allocate(Request(network=net, pool=p, container_id=cid, ifname="eth0", **kw))  # type: ignore[arg-type]
    return [str(e.ip) for e in g.entries]


def make(cooldown: int = 30, prober: object = None) -> tuple[Allocator, MemoryStore, Clock]:
    store, clock = MemoryStore(), Clock()
    return Allocator(store, default_cooldown_s=cooldown, prober=prober, clock=clock), store, clock  # type: ignore[arg-type]


def check_invariants(store: MemoryStore, p: PoolDef, net: str = "n1") -> None:
    live = store.list_entries(net)
    ips = [str(e.ip) for e in live]
    assert len(ips) == len(set(ips)), f"duplicate: {ips}"
    per_owner: dict[tuple[str, str], list[Entry]] = {}
    for e in live:
        assert p.subnets[e.subnet_index].allocatable(e.ip), f"{e.ip} is not allocatable"
        per_owner.setdefault(e.owner, []).append(e)
    for owner, es in per_owner.items():
        assert sorted(e.subnet_index for e in es) == list(range(len(p.subnets))), owner


# ---- properties ----------------------------------------------------------------------------------


@st.composite
def small_pools(draw: st.DrawFn) -> PoolDef:
    plen = draw(st.integers(26, 30))
    net = IPNetwork(f"10.{draw(st.integers(0, 255))}.{draw(st.integers(0, 255))}.0/{plen}").cidr
    gw = draw(st.sampled_from([None, str(IPAddress(net.first + 1, 4)), str(IPAddress(net.last - 1, 4))]))
    excl = []
    for _ in range(draw(st.integers(0, 2))):
        a = draw(st.integers(net.first, net.last))
        excl.append(f"{IPAddress(a, 4)}-{IPAddress(min(net.last, a + draw(st.integers(0, 3))), 4)}")
    entry: dict[str, object] = {"subnet": str(net), "exclude": excl}
    if gw:
        entry["gateway"] = gw
    subnets: list[object] = [entry]
    if draw(st.booleans()):
        subnets.append({"subnet": "fd00:1::/125", "gateway": "fd00:1::1"})
    return pool(subnets=subnets, cooldownSeconds=draw(st.sampled_from([0, 1, 30])))


ops = st.lists(st.tuples(st.sampled_from(["alloc", "alloc", "release", "tick", "static"]),
                         st.integers(0, 12), st.integers(0, 70)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(small_pools(), ops)
def test_random_operations_keep_invariants(p: PoolDef, script: list[tuple[str, int, int]]) -> None:
    a, store, clock = make()
    held: dict[str, list[str]] = {}
    for op, who, n in script:
        cid = f"c{who}"
        if op == "tick":
            clock.t += n
        elif op == "release":
            a.release("n1", cid, "eth0")
            held.pop(cid, None)
        elif op == "alloc":
            try:
                got = alloc(a, p, cid)
            except PoolExhausted as exc:
                assert "exhausted" in str(exc) and "n1" in str(exc)
                continue
            if cid in held:
                assert got == held[cid], "allocation must be idempotent"
            held[cid] = got
        else:  # static request of a random address of the v4 subnet
            s = p.subnets[0]
            ip = IPAddress(s.subnet.first + n % s.subnet.size, 4)
            owner = store.get_entry("n1", str(ip))
            try:
                got = alloc(a, p, cid, requested_ips=(ip,))
            except AddressOutOfPool:
                assert not s.allocatable(ip)
                continue
            except AddressTaken:
                assert (owner is not None and owner.state in (ACTIVE, QUARANTINED)) or cid in held
                continue
            except PoolExhausted:
                assert len(p.subnets) == 2  # the other family ran out
                continue
            if cid in held:
                assert got == held[cid]
            else:
                assert got[0] == str(ip), "a static request is honoured exactly or refused"
            held[cid] = got
        check_invariants(store, p)
    for cid, ips in held.items():
        assert [str(e.ip) for e in store.get_by_owner("n1", cid, "eth0")] == ips


@settings(max_examples=100, deadline=None)
@given(small_pools())
def test_fill_the_pool_exactly(p: PoolDef) -> None:
    """Every allocatable address is handed out once; gateway and exclusions never."""
    a, store, _ = make()
    s = p.subnets[0]
    expected = {str(IPAddress(i, 4)) for i in range(s.subnet.first, s.subnet.last + 1) if s.allocatable(IPAddress(i, 4))}
    v6 = len(p.subnets) > 1
    cap = len(expected) if not v6 else min(len(expected), 6)  # fd00:1::/125: 2..7 = 6 addresses
    got = set()
    for i in range(cap):
        got.add(alloc(a, p, f"c{i}")[0])
    with pytest.raises(PoolExhausted, match=r"exhausted: \d+ of \d+ addresses in use"):
        alloc(a, p, "one-more")
    if not v6 or len(expected) <= 6:
        assert got == expected
    check_invariants(store, p)


def test_dual_stack_one_address_per_entry() -> None:
    a, _, _ = make()
    p = pool(subnets=[{"subnet": "10.0.0.0/24", "gateway": "10.0.0.1"}, {"subnet": "fd00::/64", "gateway": "fd00::1"}],
             macFromIP=True)
    g = a.allocate(Request(network="n1", pool=p, container_id="c", ifname="eth0"))
    assert [str(e.address) for e in g.entries] == ["10.0.0.2/24", "fd00::2/64"]
    assert g.entries[0].mac == "0a:58:0a:00:00:02"


def test_dual_stack_exhaustion_leaves_nothing_behind() -> None:
    a, store, _ = make()
    p = pool(subnets=["10.0.0.0/24", {"subnet": "fd00::/126", "gateway": "fd00::1"}])
    alloc(a, p, "a")
    alloc(a, p, "b")  # fd00::2, fd00::3 used
    with pytest.raises(PoolExhausted, match="subnet fd00::/126 exhausted"):
        alloc(a, p, "c")
    assert store.get_by_owner("n1", "c", "eth0") == [] and len(store.list_entries("n1")) == 4


def test_round_robin_and_cooldown() -> None:
    a, _, clock = make(cooldown=30)
    p = pool(subnets=[{"subnet": "10.0.0.0/29", "gateway": "10.0.0.1"}])  # .2-.6
    assert alloc(a, p, "a") == ["10.0.0.2"]
    a.release("n1", "a", "eth0")
    assert alloc(a, p, "b") == ["10.0.0.3"]  # not the just-released .2
    assert alloc(a, p, "c") == ["10.0.0.4"]
    assert alloc(a, p, "d") == ["10.0.0.5"]
    assert alloc(a, p, "e") == ["10.0.0.6"]
    assert alloc(a, p, "f") == ["10.0.0.2"]  # only a cooling address left: the oldest is used
    for cid in "bcd":
        a.release("n1", cid, "eth0")
        clock.t += 1
    # .3, .4, .5 all cooling: the one released first is used rather than failing
    assert alloc(a, p, "g") == ["10.0.0.3"]
    assert alloc(a, p, "h") == ["10.0.0.4"]


def test_only_cooling_left_uses_oldest() -> None:
    a, _, clock = make(cooldown=30)
    p = pool(subnets=[{"subnet": "10.0.0.0/30", "gateway": "10.0.0.1"}])  # only .2
    alloc(a, p, "a")
    a.release("n1", "a", "eth0")
    assert alloc(a, p, "b") == ["10.0.0.2"]
    a.release("n1", "b", "eth0")
    clock.t += 31
    assert alloc(a, p, "c") == ["10.0.0.2"]


def test_cooldown_expiry_frees_for_round_robin() -> None:
    a, _, clock = make(cooldown=5)
    p = pool(subnets=[{"subnet": "10.0.0.0/29", "gateway": "10.0.0.1"}])
    for cid in "abcde":
        alloc(a, p, cid)
    a.release("n1", "c", "eth0")  # .4
    a.release("n1", "a", "eth0")  # .2 (cursor is at .6: next lap starts at .2)
    clock.t += 6
    assert alloc(a, p, "f") == ["10.0.0.2"]
    assert alloc(a, p, "g") == ["10.0.0.4"]


def test_static_errors_name_network_subnet_address() -> None:
    a, _, _ = make()
    p = pool(subnets=[{"subnet": "10.0.0.0/24", "gateway": "10.0.0.1", "rangeEnd": "10.0.0.100",
                       "exclude": ["10.0.0.50-10.0.0.59"]}])
    cases = {
        "10.0.0.1": (AddressOutOfPool, "subnet 10.0.0.0/24: requested address 10.0.0.1 is the subnet's gateway"),
        "10.0.0.0": (AddressOutOfPool, "network or broadcast"),
        "10.0.0.55": (AddressOutOfPool, "is excluded (10.0.0.50-10.0.0.59)"),
        "10.0.0.150": (AddressOutOfPool, "outside the range 10.0.0.1-10.0.0.100"),
        "10.9.9.9": (AddressOutOfPool, "network n1: requested address 10.9.9.9 is outside every subnet"),
    }
    for ip, (exc, msg) in cases.items():
        with pytest.raises(exc) as info:
            alloc(a, p, "x", requested_ips=(IPAddress(ip),))
        assert msg in str(info.value) and "network n1" in str(info.value)
    assert alloc(a, p, "x", requested_ips=(IPAddress("10.0.0.42"),)) == ["10.0.0.42"]
    with pytest.raises(AddressTaken, match=re.escape("10.0.0.42 is in use by container x ifname eth0")):
        alloc(a, p, "y", requested_ips=(IPAddress("10.0.0.42"),))
    with pytest.raises(AddressTaken, match=re.escape("already holds 10.0.0.42")):
        alloc(a, p, "x", requested_ips=(IPAddress("10.0.0.43"),))
    with pytest.raises(InvalidRequest, match="two requested addresses"):
        alloc(a, p, "z", requested_ips=(IPAddress("10.0.0.44"), IPAddress("10.0.0.45")))
    with pytest.raises(InvalidRequest, match="MAC"):
        alloc(a, p, "z", requested_mac="nope")


def test_pool_definition_changes() -> None:
    a, store, _ = make()
    base = {"subnet": "10.0.0.0/24", "gateway": "10.0.0.1"}
    p1 = pool(subnets=[base])
    assert alloc(a, p1, "a") == ["10.0.0.2"]
    # safe: more exclusions that don't cover the live lease, new routes
    p2 = pool(subnets=[{**base, "exclude": ["10.0.0.100-10.0.0.200"]}], routes=[{"dst": "0.0.0.0/0"}])
    alloc(a, p2, "b")
    assert store.get_pool("n1") == p2
    # unsafe: exclusion covering a live lease
    with pytest.raises(PoolDefinitionConflict, match=r"10.0.0.2 \(a/eth0\)"):
        alloc(a, pool(subnets=[{**base, "exclude": ["10.0.0.2", "10.0.0.100-10.0.0.200"]}]), "c")
    # unsafe (issue 11 item 8): a second config with fewer exclusions must not hand out what the
    # stored one excludes, not even on request
    with pytest.raises(PoolDefinitionConflict, match=r"10.0.0.100 \(held back by the stored definition\)"):
        alloc(a, p1, "c", requested_ips=(IPAddress("10.0.0.150"),))
    with pytest.raises(PoolDefinitionConflict, match="fewer addresses"):
        alloc(a, pool(subnets=[{**base, "exclude": ["10.0.0.100-10.0.0.199"]}]), "c")
    # a wider range is the same as narrower exclusions
    narrow = pool(subnets=[{**base, "rangeEnd": "10.0.0.99"}]).subnets[0]
    assert "10.0.0.100" in policy.widened(narrow, p1.subnets[0]) and not policy.widened(p1.subnets[0], narrow)
    # excluded -> reserved (Kube-OVN's excludeIps spelling) is a change too, and says so
    excl = pool(subnets=[{**base, "exclude": ["10.0.0.5"]}]).subnets[0]
    res = pool(subnets=[{**base, "reserved": ["10.0.0.5"]}]).subnets[0]
    assert "only reserves it" in policy.widened(excl, res) and not policy.widened(res, excl)
    assert store.get_entry("n1", "10.0.0.150") is None
    # unsafe: another subnet or gateway
    with pytest.raises(PoolDefinitionConflict, match="subnets and gateways"):
        alloc(a, pool(subnets=[{"subnet": "10.0.0.0/24", "gateway": "10.0.0.254"}]), "c")
    assert store.get_pool("n1") == p2  # refused changes are not stored
    # once nothing is live, any change is safe (nothing can be re-numbered)
    a.release("n1", "a", "eth0")
    a.release("n1", "b", "eth0")
    assert alloc(a, pool(subnets=["10.5.0.0/24"]), "c") == ["10.5.0.1"]


def test_gc_releases_everything_not_valid() -> None:
    a, store, _ = make()
    p = pool(subnets=["10.0.0.0/24"])
    for cid in "abc":
        alloc(a, p, cid)
    alloc(a, p, "a", net="n2")
    released = a.gc("n1", [("b", "eth0")])
    assert sorted(e.container_id for e in released) == ["a", "c"]
    assert [e.container_id for e in store.list_entries("n1")] == ["b"]
    assert [e.container_id for e in store.list_entries("n2")] == ["a"]


# ---- conflict probing ----------------------------------------------------------------------------


@dataclass
class FakeProber:
    busy: dict[str, str] = field(default_factory=dict)  # ip -> answering MAC
    missing: bool = False
    calls: list[str] = field(default_factory=list)

    def detect(self, netns: str, ifname: str, address: IPAddress, wait_ms: int) -> ConflictOutcome | None:
        self.calls.append(str(address))
        if self.missing:
            return None
        mac = self.busy.get(str(address))
        return ConflictOutcome(mac is not None, mac or "")


def probing(**kw: object) -> Request:
    base = dict(network="n1", pool=pool(subnets=[{"subnet": "10.0.0.0/24", "gateway": "10.0.0.1"}]),
                container_id="c", ifname="eth0", netns="/run/netns/p", conflict_check=True)
    base.update(kw)
    return Request(**base)  # type: ignore[arg-type]


def test_conflict_quarantines_and_offers_next() -> None:
    prober = FakeProber(busy={"10.0.0.2": "aa:aa:aa:aa:aa:02"})
    a, store, _ = make(prober=prober)
    g = a.allocate(probing())
    assert [str(e.ip) for e in g.entries] == ["10.0.0.3"] and g.conflict_probed
    assert g.quarantined == ("10.0.0.2",)
    q = store.get_entry("n1", "10.0.0.2")
    assert q is not None and q.state == QUARANTINED and q.conflict_mac == "aa:aa:aa:aa:aa:02"
    assert a.usage("n1")[0].quarantined == 1
    assert alloc(a, probing().pool, "d") == ["10.0.0.4"]  # quarantined address is not reused


def test_conflict_gives_up_after_three_and_leaves_nothing() -> None:
    prober = FakeProber(busy={f"10.0.0.{i}": "aa:aa:aa:aa:aa:aa" for i in range(2, 10)})
    a, store, _ = make(prober=prober)
    with pytest.raises(AddressConflict, match=re.escape("network n1: subnet 10.0.0.0/24: address 10.0.0.4 is in use")):
        a.allocate(probing())
    assert store.get_by_owner("n1", "c", "eth0") == []
    assert len(store.list_entries("n1", (QUARANTINED,))) == 3


def test_static_conflict_is_104() -> None:
    prober = FakeProber(busy={"10.0.0.7": "aa:aa:aa:aa:aa:07"})
    a, store, _ = make(prober=prober)
    with pytest.raises(AddressConflict, match=re.escape("10.0.0.7")):
        a.allocate(probing(requested_ips=(IPAddress("10.0.0.7"),)))
    assert store.get_by_owner("n1", "c", "eth0") == []


def test_missing_interface_skips_probing() -> None:
    prober = FakeProber(missing=True)
    a, _, _ = make(prober=prober)
    g = a.allocate(probing())
    assert not g.conflict_probed and [str(e.ip) for e in g.entries] == ["10.0.0.2"]


# ---- cost does not grow with pool size -----------------------------------------------------------


def _mean_alloc_ms(prefix: int, preload: int) -> float:
    a, store, _ = make(cooldown=0)
    p = pool(subnets=[{"subnet": f"10.0.0.0/{prefix}", "gateway": "10.0.0.1"}])
    a.ensure_pool("n1", p)
    s = p.subnets[0]
    batch = [Entry(network="n1", address=IPNetwork(f"{IPAddress(s.subnet.first + 2 + i, 4)}/{prefix}"),
                   subnet_index=0, container_id=f"pre{i}", ifname="eth0") for i in range(preload)]
    store.reserve(batch)
    alloc(a, p, "warm")  # builds the occupancy index once
    t0 = time.perf_counter()
    for i in range(300):
        alloc(a, p, f"c{i}")
        a.release("n1", f"c{i}", "eth0")
    return (time.perf_counter() - t0) / 300 * 1000


def test_slash16_with_60k_leases_allocates_like_a_slash24() -> None:
    small = _mean_alloc_ms(24, 100)
    big = _mean_alloc_ms(16, 60_000)
    assert big < small * 3 + 0.5, f"/16 with 60k leases: {big:.3f} ms vs /24: {small:.3f} ms"


def test_reserved_class_is_granted_on_request_only() -> None:
    """Kube-OVN excludeIps / ovn-kubernetes reservedSubnets: never picked automatically, a static
    request is granted; excluded addresses (excludeSubnets, excludeIPs, exclude) never are."""
    a, _, _ = make()
    p = pool(subnets=[{"subnet": "10.0.0.0/29", "gateway": "10.0.0.1", "reserved": ["10.0.0.2-10.0.0.3"],
                       "exclude": ["10.0.0.6"]}])
    assert sorted(alloc(a, p, c)[0] for c in "ab") == ["10.0.0.4", "10.0.0.5"]
    with pytest.raises(PoolExhausted):
        alloc(a, p, "c")
    assert alloc(a, p, "c", requested_ips=(IPAddress("10.0.0.3"),)) == ["10.0.0.3"]
    with pytest.raises(AddressOutOfPool, match="is excluded"):
        alloc(a, p, "d", requested_ips=(IPAddress("10.0.0.6"),))
    assert [u.used for u in a.usage("n1")] == [3]
    a.release("n1", "c", "eth0")
    assert [u.used for u in a.usage("n1")] == [2]
    with pytest.raises(PoolExhausted):  # a released reserved address is not picked automatically
        alloc(a, p, "e")
    # reserved may not shrink either while leases live
    with pytest.raises(PoolDefinitionConflict, match="picked automatically"):
        alloc(a, pool(subnets=[{"subnet": "10.0.0.0/29", "gateway": "10.0.0.1", "reserved": ["10.0.0.2"],
                                "exclude": ["10.0.0.6"]}]), "e")


@dataclass
class VanishingProber(FakeProber):
    """Answers for the first address, then the pod's interface is gone (nothing to probe)."""

    def detect(self, netns: str, ifname: str, address: IPAddress, wait_ms: int) -> ConflictOutcome | None:
        if self.calls:
            self.calls.append(str(address))
            return None
        return super().detect(netns, ifname, address, wait_ms)


def test_interface_gone_after_a_replacement_returns_the_replacement_not_the_quarantined_address() -> None:
    """The grant returned must be the lease as stored: the answered address is quarantined and the
    lease moved to its replacement, so the plugin must configure the replacement (unprobed)."""
    prober = VanishingProber(busy={"10.0.0.2": "aa:aa:aa:aa:aa:02"})
    a, store, _ = make(prober=prober)
    g = a.allocate(probing())
    assert prober.calls == ["10.0.0.2", "10.0.0.3"]
    assert [str(e.ip) for e in g.entries] == ["10.0.0.3"] and not g.conflict_probed
    assert g.quarantined == ("10.0.0.2",)
    assert [str(e.ip) for e in store.get_by_owner("n1", "c", "eth0")] == ["10.0.0.3"]
