"""Probes against real namespaces on the emulated underlay (VLAN 100: 192.168.100.1/24 and
fd00:100::1/64). Oracles: `ip -j link` for MACs, the CLI's `leases --all`, wall-clock time."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from netaddr import IPAddress

from core.ipamd_client import IpamClient
from core.spec import parse_ipam
from testbed import netbed

VLAN100 = parse_ipam({"subnets": [{"subnet": "192.168.100.0/24", "gateway": "192.168.100.1"}]}).pool


@pytest.fixture
def hand_pod(underlay: netbed.Underlay, netns_factory: Callable[[str], netbed.Netns]) -> Iterator[Callable[..., netbed.Netns]]:
    made: list[str] = []

    def plug(vlan: int, *cidrs: str) -> netbed.Netns:
        ns = netns_factory("pp")
        host = netbed.uniq("pv")
        netbed.sh("ip", "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns.name)
        made.append(host)
        netbed.sh("ip", "link", "set", host, "up")
        netbed.vsctl("add-port", underlay.bridge, host, f"tag={vlan}")
        for cidr in cidrs:
            ns.exec("ip", "addr", "add", cidr, "dev", "eth0", *(["nodad"] if ":" in cidr else []))
        ns.exec("ip", "link", "set", "eth0", "up")
        return ns

    yield plug
    for host in made:
        netbed.delete_link(host)


def mac_of(ifname: str, ns: str) -> str:
    ln = netbed.link(ifname, ns=ns)
    assert ln is not None
    return str(ln["address"])


def test_gateway_answers_with_router_mac_then_cache(underlay: netbed.Underlay, hand_pod: Callable[..., netbed.Netns],
                                                    ipamd: netbed.Ipamd) -> None:
    pod = hand_pod(100, "192.168.100.50/24")
    router = underlay.routers[100]
    key = f"{underlay.bridge}/100"
    with IpamClient(ipamd.socket) as c:
        res = c.probe_gateway(netns=pod.path, ifname="eth0", gateway=IPAddress("192.168.100.1"),
                              sender_ip=IPAddress("192.168.100.50"), timeout_ms=3000, cache_key=key)
        assert res.answered and not res.cached and not res.skipped
        assert res.mac == mac_of(router.ifname, router.netns.name)
        again = c.probe_gateway(netns=pod.path, ifname="eth0", gateway=IPAddress("192.168.100.1"),
                                sender_ip=IPAddress("192.168.100.50"), timeout_ms=3000, cache_key=key)
        assert again.answered and again.cached and again.mac == res.mac


def test_ipv6_gateway_neighbour_solicitation(underlay: netbed.Underlay, hand_pod: Callable[..., netbed.Netns],
                                             ipamd: netbed.Ipamd) -> None:
    pod = hand_pod(100, "fd00:100::50/64")
    router = underlay.routers[100]
    with IpamClient(ipamd.socket) as c:
        res = c.probe_gateway(netns=pod.path, ifname="eth0", gateway=IPAddress("fd00:100::1"),
                              sender_ip=IPAddress("fd00:100::50"), timeout_ms=3000, cache_key="")
    assert res.answered and res.mac == mac_of(router.ifname, router.netns.name)


def test_missing_gateway_times_out_within_budget(hand_pod: Callable[..., netbed.Netns], ipamd: netbed.Ipamd) -> None:
    pod = hand_pod(100, "192.168.100.51/24")
    with IpamClient(ipamd.socket) as c:
        t0 = time.monotonic()
        res = c.probe_gateway(netns=pod.path, ifname="eth0", gateway=IPAddress("192.168.100.99"),
                              sender_ip=IPAddress("192.168.100.51"), timeout_ms=400, cache_key="k")
        wall_ms = (time.monotonic() - t0) * 1000
    assert not res.answered and res.mac is None
    assert 380 <= res.elapsed_ms <= 600 and wall_ms < 400 + 1000, (res.elapsed_ms, wall_ms)


def test_conflict_detected_quarantined_next_granted(hand_pod: Callable[..., netbed.Netns], ipamd: netbed.Ipamd) -> None:
    squatter = hand_pod(100, "192.168.100.2/24")  # a server already using the first candidate
    pod = hand_pod(100)  # the new pod: eth0 up, no address yet
    cid = netbed.container_id("cf")
    with IpamClient(ipamd.socket) as c:
        a = c.allocate(network="probe100", pool=VLAN100, container_id=cid, ifname="eth0", netns=pod.path,
                       conflict_check=True, conflict_check_wait_ms=300)
        assert a.conflict_probed and [str(i.address) for i in a.ips] == ["192.168.100.3/24"]
    rows = ipamd.leases("probe100", all=True)
    q = [r for r in rows if r["state"] == "quarantined"]
    assert [(r["ip"], r["conflictMAC"]) for r in q] == [("192.168.100.2", mac_of("eth0", squatter.name))]
    assert [(r["ip"], r["containerID"]) for r in rows if r["state"] == "active"] == [("192.168.100.3", cid)]
    assert [p["quarantined"] for p in ipamd.pools() if p["network"] == "probe100"] == [1]


def test_missing_interface_skips_probes(hand_pod: Callable[..., netbed.Netns], ipamd: netbed.Ipamd) -> None:
    pod = hand_pod(100, "192.168.100.52/24")
    with IpamClient(ipamd.socket) as c:
        a = c.allocate(network="probe-skip", pool=VLAN100, container_id=netbed.container_id("sk"),
                       ifname="net7", netns=pod.path, conflict_check=True)
        assert not a.conflict_probed and [str(i.address) for i in a.ips] == ["192.168.100.2/24"]
        g = c.probe_gateway(netns=pod.path, ifname="net7", gateway=IPAddress("192.168.100.1"),
                            sender_ip=None, timeout_ms=200, cache_key="")
        assert g.skipped and not g.answered
    assert "conflict probing skipped" in ipamd.log() or "conflict probe skipped" in ipamd.log()
