"""The allocation policy as plain functions over plain data: no store, no lock, no thread."""

from __future__ import annotations

import re

import pytest
from netaddr import IPAddress, IPNetwork

from core.spec import PodRef, PoolDef, parse_ipam
from ipamd import policy
from ipamd.errors import AddressOutOfPool, AddressTaken, InvalidRequest, PoolDefinitionConflict, PoolExhausted
from ipamd.model import ACTIVE, QUARANTINED, RELEASED, Entry
from ipamd.occupancy import SubnetOccupancy
from ipamd.policy import Request

V4 = {"subnet": "10.0.0.0/24", "gateway": "10.0.0.1", "rangeEnd": "10.0.0.100",
      "exclude": ["10.0.0.50-10.0.0.59"]}
V6 = {"subnet": "fd00::/64", "gateway": "fd00::1"}


def pool(*subnets: object, **ipam: object) -> PoolDef:
    return parse_ipam({"subnets": list(subnets), **ipam}).pool


def entry(ip: str, state: str = ACTIVE, cid: str = "c1", k: int = 0, changed_ms: int = 0,
          conflict_mac: str = "") -> Entry:
    return Entry(network="n1", address=IPNetwork(ip), subnet_index=k, container_id=cid, ifname="eth0",
                 state=state, changed_ms=changed_ms, conflict_mac=conflict_mac)


def req(p: PoolDef, **kw: object) -> Request:
    return Request(network="n1", pool=p, container_id="c1", ifname="eth0", **kw)  # type: ignore[arg-type]


# ---- the request ---------------------------------------------------------------------------------


def test_check_mac() -> None:
    policy.check_mac("n1", "")
    policy.check_mac("n1", "0A:58:0a:00:00:05")
    for bad in ("nope", "0a:58:0a:00:00", "0a-58-0a-00-00-05", "0a:58:0a:00:00:05:06"):
        with pytest.raises(InvalidRequest, match=re.escape(f"network n1: requested MAC {bad!r}")):
            policy.check_mac("n1", bad)


def test_static_by_subnet_maps_each_address_to_its_entry() -> None:
    p = pool(V4, V6)
    got = policy.static_by_subnet("n1", p, [IPAddress("fd00::9"), IPAddress("10.0.0.9")])
    assert got == {0: IPAddress("10.0.0.9"), 1: IPAddress("fd00::9")}
    assert policy.static_by_subnet("n1", p, []) == {}


@pytest.mark.parametrize(("ips", "exc", "msg"), [
    (["10.9.9.9"], AddressOutOfPool,
     "network n1: requested address 10.9.9.9 is outside every subnet (10.0.0.0/24, fd00::/64)"),
    (["10.0.0.5", "10.0.0.6"], InvalidRequest,
     "network n1: subnet 10.0.0.0/24: two requested addresses (10.0.0.5, 10.0.0.6)"),
    (["10.0.0.1"], AddressOutOfPool, "subnet 10.0.0.0/24: requested address 10.0.0.1 is the subnet's gateway"),
    (["10.0.0.255"], AddressOutOfPool, "is the subnet's network or broadcast address"),
    (["10.0.0.55"], AddressOutOfPool, "is excluded (10.0.0.50-10.0.0.59)"),
    (["10.0.0.150"], AddressOutOfPool, "is outside the range 10.0.0.1-10.0.0.100"),
])
def test_static_by_subnet_refuses(ips: list[str], exc: type[Exception], msg: str) -> None:
    with pytest.raises(exc) as info:
        policy.static_by_subnet("n1", pool(V4, V6), [IPAddress(i) for i in ips])
    assert msg in str(info.value)


def test_why_not_allocatable() -> None:
    spec = pool(V4).subnets[0]
    assert policy.why_not_allocatable(spec, IPAddress("10.0.0.42")) == ""
    assert policy.why_not_allocatable(spec, IPAddress("10.0.0.1")) == "is the subnet's gateway"
    assert policy.why_not_allocatable(spec, IPAddress("10.0.0.0")) == "is the subnet's network or broadcast address"
    assert policy.why_not_allocatable(spec, IPAddress("10.0.0.59")) == "is excluded (10.0.0.50-10.0.0.59)"
    assert policy.why_not_allocatable(spec, IPAddress("10.0.0.101")) == "is outside the range 10.0.0.1-10.0.0.100"


def test_check_existing() -> None:
    p = pool(V4, V6)
    held = [entry("10.0.0.7/24"), entry("fd00::7/64", k=1)]
    policy.check_existing(req(p), held, {})
    policy.check_existing(req(p), held, {0: IPAddress("10.0.0.7")})
    policy.check_existing(req(p), held[:1], {1: IPAddress("fd00::9")})  # nothing held there: not judged
    with pytest.raises(AddressTaken, match=re.escape(
            "network n1: attachment c1/eth0 already holds fd00::7 in subnet fd00::/64, not the requested fd00::9")):
        policy.check_existing(req(p), held, {1: IPAddress("fd00::9")})


def test_check_static_free() -> None:
    spec = pool(V4).subnets[0]
    ip = IPAddress("10.0.0.7")

    def check(cur: Entry | None, now_ms: int = 10_000) -> None:
        policy.check_static_free("n1", spec, ip, cur, now_ms=now_ms, quarantine_ms=5_000)

    check(None)
    check(entry("10.0.0.7/24", RELEASED, changed_ms=9_999))  # cooling: may be asked for explicitly
    with pytest.raises(AddressTaken, match=re.escape("requested address 10.0.0.7 is in use by container c9 ifname eth0")):
        check(entry("10.0.0.7/24", ACTIVE, cid="c9"))
    q = entry("10.0.0.7/24", QUARANTINED, changed_ms=6_000, conflict_mac="aa:bb:cc:dd:ee:ff")
    with pytest.raises(AddressTaken, match=re.escape("is quarantined: aa:bb:cc:dd:ee:ff answered for it")):
        check(q)
    check(q, now_ms=11_000)  # its quarantine has ended


# ---- picking -------------------------------------------------------------------------------------


def test_pick_round_robin_static_cooling_and_exhaustion() -> None:
    spec = pool({"subnet": "10.0.0.0/29", "gateway": "10.0.0.1"}).subnets[0]  # .2-.6 allocatable
    occ = SubnetOccupancy(spec)
    assert occ.address(policy.pick("n1", spec, occ, None)) == IPAddress("10.0.0.2")
    occ.mark_active(occ.offset(IPAddress("10.0.0.2")) or 0)
    assert occ.address(policy.pick("n1", spec, occ, None)) == IPAddress("10.0.0.3")
    # a requested address is taken as is (its checks are static_by_subnet's and check_static_free's)
    assert occ.address(policy.pick("n1", spec, occ, IPAddress("10.0.0.5"))) == IPAddress("10.0.0.5")
    for last in (3, 4, 5, 6):
        occ.mark_active(occ.offset(IPAddress(f"10.0.0.{last}")) or 0)
    with pytest.raises(PoolExhausted, match=re.escape("network n1: subnet 10.0.0.0/29 exhausted: 5 of 5 addresses in use")):
        policy.pick("n1", spec, occ, None)
    occ.mark_released(occ.offset(IPAddress("10.0.0.4")) or 0, until_ms=2_000, now_ms=1_000)
    occ.mark_released(occ.offset(IPAddress("10.0.0.3")) or 0, until_ms=3_000, now_ms=1_000)
    assert occ.address(policy.pick("n1", spec, occ, None)) == IPAddress("10.0.0.4")  # cooled longest
    occ.mark_quarantined(occ.offset(IPAddress("10.0.0.4")) or 0, until_ms=9_000, was_active=False)
    occ.mark_quarantined(occ.offset(IPAddress("10.0.0.3")) or 0, until_ms=9_000, was_active=False)
    with pytest.raises(PoolExhausted, match=re.escape("(2 quarantined after conflicts)")):
        policy.pick("n1", spec, occ, None)


def test_build_entry_and_lease_mac() -> None:
    p = pool(V4, V6, macFromIP=True)
    pod = PodRef("ns", "pod", "uid")
    r = req(p, pod=pod, netns="/run/netns/x")
    e4 = policy.build_entry(r, 0, IPAddress("10.0.0.5"), 1234)
    assert (str(e4.address), e4.subnet_index, e4.state, e4.gateway, e4.mac) == (
        "10.0.0.5/24", 0, ACTIVE, IPAddress("10.0.0.1"), "0a:58:0a:00:00:05")
    assert (e4.pod, e4.netns, e4.created_ms, e4.changed_ms, e4.owner) == (pod, "/run/netns/x", 1234, 1234,
                                                                            ("c1", "eth0"))
    e6 = policy.build_entry(r, 1, IPAddress("fd00::5"), 1234)
    assert (str(e6.address), e6.mac) == ("fd00::5/64", "")  # macFromIP is IPv4 only
    assert policy.build_entry(req(p, requested_mac="02:00:00:00:00:01"), 1, IPAddress("fd00::5"), 0).mac == \
        "02:00:00:00:00:01"
    assert policy.lease_mac("", pool(V4), IPAddress("10.0.0.5")) == ""  # macFromIP off


# ---- occupancy -----------------------------------------------------------------------------------


def test_subnet_of_and_cooldown() -> None:
    p = pool(V4, V6, cooldownSeconds=7)
    assert policy.subnet_of(p, IPAddress("fd00::5"), 1) == 1
    assert policy.subnet_of(p, IPAddress("fd00::5"), 0) == 1  # a stale index is looked up
    assert policy.subnet_of(p, IPAddress("10.9.9.9"), 0) is None
    assert policy.cooldown_ms(p, 30) == 7_000 and policy.cooldown_ms(pool(V4), 30) == 30_000


def test_build_occupancy_from_stored_entries() -> None:
    p = pool(V4, V6)
    entries = [
        entry("10.0.0.2/24"),
        entry("10.0.0.3/24", RELEASED, changed_ms=9_000),  # cooling until 14_000: held
        entry("10.0.0.4/24", RELEASED, changed_ms=1_000),  # cooled down: free
        entry("10.0.0.5/24", QUARANTINED, changed_ms=9_000),  # quarantined until 19_000
        entry("10.7.0.5/24"),  # not in any subnet entry (an old definition): ignored
        entry("fd00::2/64", k=1),
    ]
    occ = policy.build_occupancy(p, entries, ["10.0.0.2", None], now_ms=10_000, cooldown_ms=5_000,
                                 quarantine_ms=10_000)
    v4, v6 = occ
    assert (v4.active, v4.quarantined, v6.active) == (1, 1, 1)
    held = {str(v4.address(o)) for o in range(v4.size) if v4.is_held(o)}
    assert {"10.0.0.2", "10.0.0.3", "10.0.0.5"} <= held and "10.0.0.4" not in held
    assert v4.address(v4.cursor) == IPAddress("10.0.0.2") and v6.cursor == -1
    assert v4.address(v4.next_free() or 0) == IPAddress("10.0.0.4")
    assert v6.address(v6.next_free() or 0) == IPAddress("fd00::3")


# ---- pool definition changes ---------------------------------------------------------------------


def test_check_change() -> None:
    old = pool({"subnet": "10.0.0.0/24", "gateway": "10.0.0.1"})
    live = [entry("10.0.0.2/24", cid="a")]
    policy.check_change("n1", old, pool({"subnet": "10.5.0.0/24"}), [])  # nothing live: anything goes
    policy.check_change("n1", old, pool({"subnet": "10.0.0.0/24", "gateway": "10.0.0.1",
                                         "exclude": ["10.0.0.100-10.0.0.200"]}), live)
    with pytest.raises(PoolDefinitionConflict, match="subnets and gateways of a network in use cannot change"):
        policy.check_change("n1", old, pool({"subnet": "10.0.0.0/24", "gateway": "10.0.0.254"}), live)
    with pytest.raises(PoolDefinitionConflict, match=re.escape(
            "network n1: the new definition of subnet 10.0.0.0/24 excludes or leaves out addresses in "
            "use: 10.0.0.2 (a/eth0)")):
        policy.check_change("n1", old, pool({"subnet": "10.0.0.0/24", "gateway": "10.0.0.1",
                                             "exclude": ["10.0.0.2"]}), live)
