"""The test bed itself: the emulated physical network behaves like one.

If these fail, every other integration result is meaningless, so they check the bed through
the same oracles the other tests use: a hand-plugged pod (ovs-vsctl + ip, no product code)
reaches its VLAN's gateway, not the other VLAN's, and the uplink carries the tag.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from testbed import netbed


@pytest.fixture
def hand_pod(underlay: netbed.Underlay, netns_factory: Callable[[str], netbed.Netns]) -> Iterator[Callable[..., netbed.Netns]]:
    made: list[str] = []

    def plug(vlan: int, cidr: str) -> netbed.Netns:
        ns = netns_factory("hp")
        host = netbed.uniq("hv")
        netbed.sh("ip", "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns.name)
        made.append(host)
        netbed.sh("ip", "link", "set", host, "up")
        netbed.vsctl("add-port", underlay.bridge, host, f"tag={vlan}")
        ns.exec("ip", "addr", "add", cidr, "dev", "eth0")
        ns.exec("ip", "link", "set", "eth0", "up")
        return ns

    yield plug
    for host in made:
        netbed.delete_link(host)


def test_pod_reaches_its_vlan_gateway_with_tag_on_uplink(underlay: netbed.Underlay, hand_pod: Callable[..., netbed.Netns]) -> None:
    pod = hand_pod(100, "192.168.100.50/24")
    with netbed.capture(underlay.uplink, "vlan 100 and icmp") as lines:
        assert netbed.ping_retry(pod.name, "192.168.100.1")
    assert any("vlan 100" in line and "ICMP echo request" in line for line in lines), lines


def test_vlans_are_isolated(underlay: netbed.Underlay, hand_pod: Callable[..., netbed.Netns]) -> None:
    # Same IP plan on both sides of the VLAN boundary: only the tag separates them.
    pod = hand_pod(200, "192.168.100.60/24")
    assert not netbed.ping(pod.name, "192.168.100.1", count=2)
    assert netbed.ping_retry(hand_pod(100, "192.168.100.61/24").name, "192.168.100.1")


def test_router_can_be_removed(underlay: netbed.Underlay, hand_pod: Callable[..., netbed.Netns]) -> None:
    pod = hand_pod(100, "192.168.100.70/24")
    assert netbed.ping_retry(pod.name, "192.168.100.1")
    underlay.remove_router(100)
    assert not netbed.ping(pod.name, "192.168.100.1", count=2)


def test_ovs_oracle_reads_tags(underlay: netbed.Underlay, hand_pod: Callable[..., netbed.Netns]) -> None:
    hand_pod(200, "192.168.200.9/24")
    ports = [netbed.port(p) for p in netbed.bridge_ports(underlay.bridge)]
    assert sorted(p["tag"] for p in ports if p and p["tag"] != []) == [200]
