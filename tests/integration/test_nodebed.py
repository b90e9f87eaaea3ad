"""The node bed itself: nodes made of namespaces behave like machines on one switch.

Checked through independent oracles only (`ip`, `ovs-vsctl`, ping): each node's OVS is its own
(a bridge made in one is invisible to the system OVS and to the other node), a node reaches its
gateway and the other node over its NIC, pods on a node bridge reach their VLAN's gateway through
the ToR, and an OVS restart (with or without losing the database) gives a working OVS back.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest

from testbed import netbed, nodebed


def test_two_nodes_on_one_tor(tor: nodebed.Tor, node_factory: Callable[[str], nodebed.Node]) -> None:
    a, b = node_factory("a"), node_factory("b")
    nic_a, nic_b = tor.plug(a), tor.plug(b)
    assert a.addrs("eth1") == nic_a.addresses == ["172.31.0.11/24", "fd00:31::b/64"]
    default = [r for r in a.ip_json("-4", "route") if r["dst"] == "default"]
    assert default and default[0]["gateway"] == "172.31.0.1" and default[0]["dev"] == "eth1"
    assert a.ping_retry("172.31.0.1")
    assert a.ping_retry("fd00:31::1")
    assert a.ping_retry(nic_b.addresses[0].split("/")[0])
    assert b.ping_retry(nic_a.addresses[1].split("/")[0])
    # Untagged on the NIC = the ToR's native VLAN; the node cannot reach VLAN 100 untagged.
    a.exec("ip", "addr", "add", "192.168.100.77/24", "dev", "eth1")
    assert not a.ping("192.168.100.1", count=2)


def test_private_ovs_is_isolated(tor: nodebed.Tor, node_factory: Callable[[str], nodebed.Node]) -> None:
    a, b = node_factory("a"), node_factory("b")
    a.vsctl("add-br", "br-x", "--", "set", "Bridge", "br-x", "datapath_type=netdev")
    assert "br-x" in a.vsctl("list-br").stdout.split()
    assert "br-x" not in b.vsctl("list-br").stdout.split()
    assert "br-x" not in netbed.vsctl("list-br").stdout.split()
    assert a.link("br-x") is not None and netbed.link("br-x") is None
    # Plain ovs-vsctl / ovs-appctl inside the node find the node's daemons.
    assert a.exec("ovs-appctl", "-t", "ovs-vswitchd", "version").stdout.startswith("ovs-vswitchd")


def test_pod_on_node_bridge_reaches_vlan_gateway(tor: nodebed.Tor, node_factory: Callable[[str], nodebed.Node]) -> None:
    a = node_factory("a")
    tor.plug(a, addresses=[], gateways=[])  # a bare trunk NIC, given to the bridge
    a.vsctl("add-br", "br-p", "--", "set", "Bridge", "br-p", "datapath_type=netdev", "--",
            "add-port", "br-p", "eth1")
    pod = a.plug_pod("br-p", ["192.168.100.20/24"], vlan=100, gateway="192.168.100.1")
    with netbed.capture(tor.nics[0].tor_port, "vlan 100 and icmp") as lines:
        assert netbed.ping_retry(pod.ns, "192.168.100.1")
    assert any("vlan 100" in ln for ln in lines), lines


@pytest.mark.parametrize("fresh_db", [False, True])
def test_ovs_restart(tor: nodebed.Tor, node_factory: Callable[[str], nodebed.Node], fresh_db: bool) -> None:
    a = node_factory("a")
    a.vsctl("add-br", "br-x", "--", "set", "Bridge", "br-x", "datapath_type=netdev")
    old_pid = a.vswitchd.pid if a.vswitchd else 0
    a.restart_ovs(fresh_db=fresh_db, sig=signal.SIGKILL)
    assert a.ovs_running() and a.vswitchd is not None and a.vswitchd.pid != old_pid
    assert ("br-x" in a.vsctl("list-br").stdout.split()) is not fresh_db
    a.vsctl("add-br", "br-y", "--", "set", "Bridge", "br-y", "datapath_type=netdev")
    assert a.link("br-y") is not None


def test_destroy_leaves_nothing(tor: nodebed.Tor) -> None:
    a = nodebed.make_node("z")
    try:
        tor.plug(a)
        pids = [p.pid for p in (a.ovsdb_server, a.vswitchd) if p]
        assert len(pids) == 2
        work, ns = a.workdir, a.ns
    finally:
        a.destroy()
    a.destroy()  # idempotent
    assert not work.exists()
    assert ns not in netbed.sh("ip", "netns", "list").stdout
    for pid in pids:
        assert netbed.sh("kill", "-0", str(pid), check=False).returncode != 0
