"""The shared IPAM parser: every neighbour spelling maps to one canonical pool; bad input is
refused with a message naming the key and value."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from netaddr import IPAddress, IPNetwork, IPRange

from core import wire
from core.spec import ConfigError, mac_from_ipv4, parse_ipam, parse_requested_ips


def R(a: str, b: str) -> IPRange:
    return IPRange(a, b)


def test_ours_full_section() -> None:
    conf = parse_ipam({
        "type": "ovs-underlay-ipam",
        "subnets": [
            {"subnet": "192.168.1.0/24", "gateway": "192.168.1.1", "rangeStart": "192.168.1.10",
             "rangeEnd": "192.168.1.200", "exclude": ["192.168.1.50-192.168.1.59", "192.168.1.100"]},
            {"subnet": "fd00:1::/64", "gateway": "fd00:1::1"},
        ],
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "10.0.0.0/8", "gw": "192.168.1.254"}],
        "dns": {"nameservers": ["192.168.1.53"], "search": ["corp"]},
        "daemonSocket": "/run/x.sock", "gatewayCheck": False, "gatewayCheckTimeoutMs": 300,
        "conflictCheck": False, "conflictCheckWaitMs": 50, "macFromIP": True,
    })
    v4, v6 = conf.pool.subnets
    assert v4.subnet == IPNetwork("192.168.1.0/24") and v4.gateway == IPAddress("192.168.1.1")
    assert (v4.range_start, v4.range_end) == (IPAddress("192.168.1.10"), IPAddress("192.168.1.200"))
    assert v4.exclude == (R("192.168.1.50", "192.168.1.59"), R("192.168.1.100", "192.168.1.100"))
    assert v6.gateway == IPAddress("fd00:1::1") and v6.range_start == IPAddress("fd00:1::1")
    assert conf.daemon_socket == "/run/x.sock" and not conf.gateway_check and not conf.conflict_check
    assert conf.gateway_check_timeout_ms == 300 and conf.conflict_check_wait_ms == 50
    assert conf.pool.mac_from_ip and conf.pool.dns.nameservers == ("192.168.1.53",)
    assert conf.pool.routes[0].gw is None  # resolved by ipamd via the subnet's gateway


def test_defaults() -> None:
    conf = parse_ipam({"subnets": [{"subnet": "10.1.0.0/24", "gateway": "10.1.0.1"}]})
    assert conf.gateway_check and conf.conflict_check and conf.conflict_check_wait_ms == 100
    assert not conf.pool.mac_from_ip and conf.daemon_socket == "/run/ovs-underlay/ipamd.sock"
    # no gateway at all -> gateway check defaults to off
    assert not parse_ipam({"subnets": ["10.1.0.0/24"]}).gateway_check


def test_ovn_kubernetes_top_level() -> None:
    conf = parse_ipam(None, {"name": "x", "subnets": "10.22.0.0/16,fd00::/64",
                             "excludeSubnets": "10.22.200.0/24,10.22.0.5/32"})
    v4, v6 = conf.pool.subnets
    assert v4.subnet == IPNetwork("10.22.0.0/16") and v6.subnet == IPNetwork("fd00::/64")
    assert v4.exclude == (R("10.22.0.5", "10.22.0.5"), R("10.22.200.0", "10.22.200.255"))
    assert v6.exclude == ()


def test_kube_ovn_spellings() -> None:
    conf = parse_ipam({"cidrBlock": "192.168.1.0/24", "gateway": "192.168.1.254",
                       "excludeIps": ["192.168.1.1..192.168.1.100"], "disableGatewayCheck": True})
    (s,) = conf.pool.subnets
    # Kube-OVN's excludeIps means *reserved*: never picked automatically, granted on request
    assert s.gateway == IPAddress("192.168.1.254") and s.reserved_ranges == (R("192.168.1.1", "192.168.1.100"),)
    assert s.exclude == () and not s.allocatable(IPAddress("192.168.1.50"))
    assert s.grantable(IPAddress("192.168.1.50"))
    assert not conf.gateway_check


def test_spiderpool_ips_become_complement_exclusions() -> None:
    conf = parse_ipam({"subnets": [{"subnet": "172.18.30.0/24", "gateway": "172.18.30.1",
                                    "ips": ["172.18.30.131-172.18.30.140"]}],
                       "excludeIPs": ["172.18.30.135"]})
    (s,) = conf.pool.subnets
    allocatable = [str(IPAddress(i)) for i in range(s.range_start.value, s.range_end.value + 1)
                   if s.allocatable(IPAddress(i))]
    assert allocatable == [f"172.18.30.{i}" for i in range(131, 141) if i != 135]


def test_host_local_ranges_default_gateway() -> None:
    conf = parse_ipam({"type": "host-local", "ranges": [[{"subnet": "10.10.0.0/24", "rangeStart": "10.10.0.20"}],
                                                        [{"subnet": "fd10::/64"}]]})
    v4, v6 = conf.pool.subnets
    assert v4.gateway == IPAddress("10.10.0.1") and v4.range_start == IPAddress("10.10.0.20")
    assert v6.gateway == IPAddress("fd10::1")


def test_host_local_legacy_subnet() -> None:
    (s,) = parse_ipam({"subnet": "10.3.0.0/16", "rangeEnd": "10.3.0.100"}).pool.subnets
    assert s.gateway == IPAddress("10.3.0.1") and s.range_end == IPAddress("10.3.0.100")


def test_whereabouts_range_forms() -> None:
    (s,) = parse_ipam({"range": "10.0.0.10-10.0.0.20/24", "exclude": ["10.0.0.16/30"]}).pool.subnets
    assert s.subnet == IPNetwork("10.0.0.0/24") and s.gateway is None
    assert (str(s.range_start), str(s.range_end)) == ("10.0.0.10", "10.0.0.20")
    assert s.exclude == (R("10.0.0.16", "10.0.0.19"),)
    conf = parse_ipam({"ipRanges": [{"range": "10.5.0.0/24", "range_start": "10.5.0.5"},
                                    {"range": "fd05::/120", "exclude": ["fd05::10/124"]}]})
    v4, v6 = conf.pool.subnets
    assert str(v4.range_start) == "10.5.0.5" and v6.exclude == (R("fd05::10", "fd05::1f"),)


def test_case_insensitive_aliases_merge_exclusions() -> None:
    (s,) = parse_ipam({"subnets": ["10.0.0.0/24"], "exclude_ips": ["10.0.0.5"],
                       "EXCLUDE": ["10.0.0.9"]}).pool.subnets
    assert s.exclude == (R("10.0.0.5", "10.0.0.5"), R("10.0.0.9", "10.0.0.9"))


@pytest.mark.parametrize(("ipam", "fragment"), [
    ({"subnets": [{"subnet": "10.0.0.0/33"}]}, "invalid CIDR '10.0.0.0/33'"),
    ({"subnets": [{"subnet": "10.0.0.0"}]}, "expected a CIDR"),
    ({"subnets": [{"subnet": "banana/24"}]}, "invalid CIDR 'banana/24'"),
    ({"subnets": [{"subnet": "10.0.0.0/24", "exclude": ["10.0.0.5..10.0.0.1"]}]}, "ends before it starts"),
    ({"subnets": [{"subnet": "10.0.0.0/24", "exclude": ["10.0.0.1/24"]}]}, "host bits set"),
    ({"subnets": [{"subnet": "10.0.0.0/24", "exclude": ["10.0.1.1"]}]}, "outside subnet 10.0.0.0/24"),
    ({"subnets": [{"subnet": "10.0.0.0/24", "exclude": ["10.0.0.1-fd00::1"]}]}, "mixes IPv4 and IPv6"),
    ({"subnets": [{"subnet": "10.0.0.0/24", "exclude": ["10.0.0.x"]}]}, "invalid IP address '10.0.0.x'"),
    ({"subnets": [{"subnet": "10.0.0.0/24", "gateway": "10.0.1.1"}]}, "outside subnet"),
    ({"subnets": [{"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.50", "rangeEnd": "10.0.0.10"}]}, "is after rangeEnd"),
    ({"subnets": ["10.0.0.0/24", "10.0.0.128/25"]}, "overlap"),
    ({"subnets": []}, "no subnets defined"),
    ({"subnets": ["10.0.0.0/24"], "bogus": 1}, "unknown key 'bogus'"),
    ({"subnets": ["10.0.0.0/24"], "routes": [{"dst": "0.0.0.0/0"}]}, "no IPv4 subnet has a gateway"),
    ({"subnets": ["10.0.0.0/24"], "routes": [{"dst": "0.0.0.0/0", "gw": "fd00::1"}]}, "different IP families"),
    ({"subnets": ["10.0.0.0/24"], "exclude": ["10.9.0.1"]}, "not inside any subnet"),
    ({"subnets": ["10.0.0.0/24"], "ranges": [[{"subnet": "10.1.0.0/24"}]]}, "give the subnets once"),
    ({"subnets": ["10.0.0.0/24"], "conflictCheckWaitMs": -1}, "conflictCheckWaitMs"),
    ({"subnets": ["10.0.0.0/24"], "macFromIP": "yes"}, "macFromIP"),
    ({"subnets": ["10.0.0.0/24"], "daemonSocket": "relative.sock"}, "absolute path"),
])
def test_bad_inputs_name_key_and_value(ipam: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        parse_ipam(ipam)
    assert fragment in str(info.value)


def test_reserved_and_small_subnets() -> None:
    (s,) = parse_ipam({"subnets": [{"subnet": "10.0.0.0/30", "gateway": "10.0.0.1"}]}).pool.subnets
    assert [str(IPAddress(i)) for i in range(s.subnet.first, s.subnet.last + 1)
            if s.allocatable(IPAddress(i))] == ["10.0.0.2"]
    (p2p,) = parse_ipam({"subnets": ["10.0.0.0/31"]}).pool.subnets
    assert p2p.allocatable(IPAddress("10.0.0.0")) and p2p.allocatable(IPAddress("10.0.0.1"))
    (host,) = parse_ipam({"subnets": ["10.0.0.7/32"]}).pool.subnets
    assert host.allocatable(IPAddress("10.0.0.7"))


def test_requested_ips_and_mac() -> None:
    assert parse_requested_ips(["10.0.0.5/24", "fd00::5"], "ips") == (IPAddress("10.0.0.5"), IPAddress("fd00::5"))
    with pytest.raises(ConfigError, match="invalid IP address"):
        parse_requested_ips(["10.0.0.500"], "runtimeConfig.ips")
    assert mac_from_ipv4(IPAddress("192.168.1.2")) == "0a:58:c0:a8:01:02"


# ---- properties ---------------------------------------------------------------------------------

v4_subnets = st.builds(lambda net, plen: str(IPNetwork(f"{IPAddress(net, 4)}/{plen}").cidr),
                       st.integers(0, 2**32 - 1), st.integers(16, 30))


@st.composite
def pools(draw: st.DrawFn) -> dict[str, object]:
    net = IPNetwork(draw(v4_subnets))
    lo, hi = net.first + 1, net.last - 1
    start = draw(st.integers(lo, hi))
    end = draw(st.integers(start, hi))
    excl = []
    for _ in range(draw(st.integers(0, 3))):
        a = draw(st.integers(net.first, net.last))
        b = draw(st.integers(a, min(net.last, a + 20)))
        excl.append(f"{IPAddress(a, 4)}-{IPAddress(b, 4)}" if a != b else str(IPAddress(a, 4)))
    gw = draw(st.one_of(st.none(), st.integers(lo, hi)))
    entry: dict[str, object] = {"subnet": str(net), "rangeStart": str(IPAddress(start, 4)),
                                "rangeEnd": str(IPAddress(end, 4)), "exclude": excl}
    if gw is not None:
        entry["gateway"] = str(IPAddress(gw, 4))
    return {"subnets": [entry, {"subnet": "fd00::/64", "gateway": "fd00::1"}]}


@settings(max_examples=150, deadline=None)
@given(pools())
def test_canonical_form_round_trips(ipam: dict[str, object]) -> None:
    """What the plugin sends (canonical) parses back to the very same pool, over JSON and proto."""
    pool = parse_ipam(ipam).pool
    assert wire.pool_from_json(wire.pool_to_json(pool)) == pool
    assert wire.pool_from_pb(wire.pool_to_pb(pool)) == pool


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                        st.sampled_from(["subnet", "subnets", "gateway", "exclude", "range", "rangeStart",
                                         "ranges", "ips", "routes", "dns", "cidr", "excludeIps"]),
                        inner, max_size=4), max_leaves=10))
def test_garbage_only_ever_raises_config_error(raw: object) -> None:
    with contextlib.suppress(ConfigError):
        parse_ipam(raw if isinstance(raw, dict) else {"subnets": raw})  # type: ignore[arg-type]


def test_exclusion_classes_follow_the_spelling() -> None:
    """Which spelling means what (issue 10 item 8): excluded = never granted; reserved = only on
    request. Both classes merge across spellings; excluded wins where they overlap."""
    conf = parse_ipam(None, {"subnets": "10.22.0.0/24", "excludeSubnets": "10.22.0.5/32",
                             "reservedSubnets": "10.22.0.8/30"})
    (s,) = conf.pool.subnets
    assert s.exclude == (R("10.22.0.5", "10.22.0.5"),) and s.reserved_ranges == (R("10.22.0.8", "10.22.0.11"),)
    ip = IPAddress
    assert not s.grantable(ip("10.22.0.5")) and s.grantable(ip("10.22.0.9")) and not s.allocatable(ip("10.22.0.9"))
    (s,) = parse_ipam({"subnets": ["10.0.0.0/24"], "excludeIPs": ["10.0.0.5"], "exclude": ["10.0.0.6"],
                       "reserved": ["10.0.0.5-10.0.0.7"], "excludeIps": ["10.0.0.20"]}).pool.subnets
    assert s.exclude == (R("10.0.0.5", "10.0.0.6"),)  # Spiderpool + ours
    assert s.reserved_ranges == (R("10.0.0.5", "10.0.0.7"), R("10.0.0.20", "10.0.0.20"))
    assert not s.grantable(ip("10.0.0.5")) and s.grantable(ip("10.0.0.7")) and not s.allocatable(ip("10.0.0.7"))
    (s,) = parse_ipam({"range": "10.0.0.0/24", "exclude": ["10.0.0.16/30"]}).pool.subnets  # whereabouts
    assert not s.grantable(ip("10.0.0.17"))
    with pytest.raises(ConfigError, match="ambiguous"):  # excludeips: Kube-OVN's or Spiderpool's?
        parse_ipam({"subnets": ["10.0.0.0/24"], "excludeips": ["10.0.0.5"]})
    with pytest.raises(ConfigError, match=r"reserved range 10\.1\.0\.1-10\.1\.0\.1 is not inside any subnet"):
        parse_ipam({"subnets": ["10.0.0.0/24"], "reserved": ["10.1.0.1"]})


def test_reserved_survives_the_wire_and_storage() -> None:
    from core import wire

    pool = parse_ipam({"subnets": [{"subnet": "10.0.0.0/24", "reserved": ["10.0.0.2..10.0.0.9"]}]}).pool
    assert wire.pool_from_pb(wire.pool_to_pb(pool)) == pool
    assert wire.pool_from_json(wire.pool_to_json(pool)) == pool
    plain = parse_ipam({"subnets": ["10.0.0.0/24"]}).pool
    assert "reserved" not in wire.pool_to_json(plain)  # definitions stored before it compare equal
