"""The plugin as a process on a real OVS underlay: connectivity, VLAN isolation, tags on the
uplink, trunk ports, MTU/MAC/static IP, result shapes per CNI version.

Oracles: ping, tcpdump -e on the uplink, `ip -j`, `ovs-vsctl --format=json` (testbed/netbed.py).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import plugin_helpers as ph
import pytest

from testbed import netbed


@pytest.fixture
def attacher() -> Iterator[ph.Attacher]:
    a = ph.Attacher()
    yield a
    a.cleanup()


def _vlan_net(u: netbed.Underlay, vlan: int, tmp: Path, subnet: str = "192.168.100.0/24", **extra: object) -> dict:
    ipam = ph.host_local(subnet, str(tmp / f"hl{vlan}"), range={"rangeStart": subnet.replace("0/24", "10"),
                                                              "gateway": subnet.replace("0/24", "1")},
                         routes=[{"dst": "0.0.0.0/0"}])
    return ph.network(u.bridge, name=f"v{vlan}{netbed.TOKEN}", vlan=vlan, ipam=ipam, **extra)


def _addr(result: dict) -> str:
    return result["ips"][0]["address"].split("/")[0]


def test_two_pods_same_vlan_reach_each_other_and_gateway_other_vlan_isolated(
        underlay: netbed.Underlay, netns_factory: Callable[[str], netbed.Netns], attacher: ph.Attacher,
        tmp_path: Path) -> None:
    ns1, ns2, ns3 = netns_factory("p1"), netns_factory("p2"), netns_factory("p3")
    net100 = _vlan_net(underlay, 100, tmp_path)
    a1 = attacher.new(net100, ns1.path)
    a2 = attacher.new(net100, ns2.path)
    r1, r2 = a1.add(), a2.add()
    ip1, ip2 = _addr(r1), _addr(r2)
    assert ip1 != ip2
    # oracle: the kernel has the address and default route in the pod
    assert f"{ip1}/24" in netbed.addrs("eth0", ns=ns1.name)
    assert any(r.get("dst") == "default" and r.get("gateway") == "192.168.100.1"
               for r in netbed.routes(ns=ns1.name))
    with netbed.capture(underlay.uplink, "vlan 100 and icmp") as lines:
        assert netbed.ping_retry(ns1.name, "192.168.100.1")
    assert any("vlan 100" in ln and "ICMP echo request" in ln for ln in lines), lines
    assert netbed.ping_retry(ns1.name, ip2)
    assert netbed.ping_retry(ns2.name, ip1)
    # same IP plan on VLAN 200: only the tag separates it
    net200 = _vlan_net(underlay, 200, tmp_path, subnet="192.168.100.0/24")
    net200["ipam"]["ranges"][0][0]["rangeStart"] = "192.168.100.200"
    a3 = attacher.new(net200, ns3.path)
    a3.add()
    assert netbed.port(a3.host)["tag"] == 200
    assert not netbed.ping(ns3.name, ip1, count=2)
    assert not netbed.ping(ns3.name, "192.168.100.1", count=1)


def _send_tagged(ns: str, vlan: int, count: int = 3) -> None:
    """Send 802.1Q-tagged broadcast frames (ethertype 0x88b5, local experimental) from eth0."""
    code = f"""
import socket, struct
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
mac = s.getsockname()[4]
frame = b"\\xff"*6 + mac + struct.pack("!HH", 0x8100, {vlan}) + struct.pack("!H", 0x88b5) + b"ovs-underlay-trunk-test".ljust(46, b"x")
for _ in range({count}):
    s.send(frame)
"""
    netbed.sh("python3", "-c", code, ns=ns)


def test_trunk_port_carries_allowed_tags_only(underlay: netbed.Underlay, pod_netns: netbed.Netns,
                                              attacher: ph.Attacher) -> None:
    conf = ph.network(underlay.bridge, trunk=[{"id": 300}, {"minID": 310, "maxID": 312}])
    a = attacher.new(conf, pod_netns.path)
    res = a.add()
    assert "ips" not in res  # L2-only
    p = netbed.port(a.host)
    assert sorted(p["trunks"]) == [300, 310, 311, 312]
    assert p["vlan_mode"] == "trunk" and netbed.set_empty(p["tag"]) is None
    with netbed.capture(underlay.uplink, "ether proto 0x8100") as lines:
        _send_tagged(pod_netns.name, 311)
        _send_tagged(pod_netns.name, 400)
    assert any("vlan 311" in ln for ln in lines), lines
    assert not any("vlan 400" in ln for ln in lines), lines


def test_trunk_with_native_vlan(underlay: netbed.Underlay, pod_netns: netbed.Netns, attacher: ph.Attacher,
                                tmp_path: Path) -> None:
    conf = _vlan_net(underlay, 100, tmp_path, trunk=[{"id": 300}])
    a = attacher.new(conf, pod_netns.path)
    a.add()
    p = netbed.port(a.host)
    assert p["tag"] == 100 and p["trunks"] in (300, [300])
    assert p["vlan_mode"] == "native-untagged"
    # untagged traffic from the pod goes out on VLAN 100 and reaches the gateway
    with netbed.capture(underlay.uplink, "vlan 100 and icmp") as lines:
        assert netbed.ping_retry(pod_netns.name, "192.168.100.1")
    assert any("vlan 100" in ln for ln in lines), lines


def test_mtu_mac_static_ip_and_external_ids(underlay: netbed.Underlay, pod_netns: netbed.Netns,
                                            attacher: ph.Attacher, tmp_path: Path) -> None:
    conf = _vlan_net(underlay, 100, tmp_path, mtu=1400,
                     capabilities={"mac": True}, runtimeConfig={"mac": "0a:58:c0:a8:64:2a"})
    a = attacher.new(conf, pod_netns.path,
                     cni_args="IgnoreUnknown=1;IP=192.168.100.42;mac=0a:00:00:00:00:99;K8S_POD_NAMESPACE=ns1;"
                              "K8S_POD_NAME=web-0;K8S_POD_UID=uid-1;FOO=bar")
    res = a.add()
    pod = netbed.link("eth0", ns=pod_netns.name)
    assert pod["mtu"] == 1400
    assert pod["address"] == "0a:58:c0:a8:64:2a"  # runtimeConfig wins over CNI_ARGS MAC
    assert netbed.link(a.host)["mtu"] == 1400
    assert netbed.link(a.host)["ifalias"] == f"ovs-underlay {a.container_id} eth0 {conf['name']}"
    assert netbed.addrs("eth0", ns=pod_netns.name) == ["192.168.100.42/24"]
    assert res["ips"][0]["address"] == "192.168.100.42/24"
    assert res["interfaces"][1] == {"name": "eth0", "mac": "0a:58:c0:a8:64:2a", "mtu": 1400,
                                    "sandbox": pod_netns.path}
    ids = netbed.interface(a.host)["external_ids"]
    assert ids == {"owner": "ovs-underlay", "container_id": a.container_id, "ifname": "eth0",
                   "netns": pod_netns.path, "network": conf["name"], "ipam": "host-local", "pod_namespace": "ns1",
                   "pod_name": "web-0", "pod_uid": "uid-1", "attached_mac": "0a:58:c0:a8:64:2a",
                   "ip_addresses": "192.168.100.42/24"}
    port_ids = netbed.port(a.host)["external_ids"]
    assert port_ids == {"owner": "ovs-underlay", "container_id": a.container_id, "ifname": "eth0"}
    assert netbed.ping_retry(pod_netns.name, "192.168.100.1")


def test_gratuitous_arp_seen_on_uplink(underlay: netbed.Underlay, pod_netns: netbed.Netns,
                                       attacher: ph.Attacher, tmp_path: Path) -> None:
    conf = _vlan_net(underlay, 100, tmp_path)
    a = attacher.new(conf, pod_netns.path, cni_args="IP=192.168.100.77")
    with netbed.capture(underlay.uplink, "vlan 100 and arp") as lines:
        a.add()
    assert any("Request who-has 192.168.100.77 tell 192.168.100.77" in ln or
               "Announcement 192.168.100.77" in ln for ln in lines), lines


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_result_shape_per_version(version: str, underlay: netbed.Underlay, pod_netns: netbed.Netns,
                                  attacher: ph.Attacher, tmp_path: Path) -> None:
    conf = _vlan_net(underlay, 100, tmp_path, mtu=1450)
    conf["cniVersion"] = version
    a = attacher.new(conf, pod_netns.path)
    res = a.add()
    assert res["cniVersion"] == version
    legacy = version in ("0.3.0", "0.3.1", "0.4.0")
    ip = res["ips"][0]
    assert ip["address"].startswith("192.168.100.") and ip["gateway"] == "192.168.100.1"
    assert ip["interface"] == 1
    assert ("version" in ip) == legacy and (not legacy or ip["version"] == "4")
    host_if, pod_if = res["interfaces"]
    assert host_if["name"] == a.host and set(host_if) == {"name", "mac"}
    assert pod_if["sandbox"] == pod_netns.path
    assert ("mtu" in pod_if) == (version == "1.1.0")  # a 1.1.0 field
    assert res["routes"] == [{"dst": "0.0.0.0/0", "gw": "192.168.100.1"}]
    rc, out, err = a.delete()
    assert rc == 0, (out, err)


def test_dual_stack_static_routes_via_host_local(underlay: netbed.Underlay, pod_netns: netbed.Netns,
                                                  attacher: ph.Attacher, tmp_path: Path) -> None:
    ipam = {"type": "host-local", "dataDir": str(tmp_path / "ds"),
            "ranges": [[{"subnet": "192.168.100.0/24", "rangeStart": "192.168.100.150", "gateway": "192.168.100.1"}],
                       [{"subnet": "fd00:100::/64", "rangeStart": "fd00:100::150", "gateway": "fd00:100::1"}]],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]}
    conf = ph.network(underlay.bridge, vlan=100, ipam=ipam)
    a = attacher.new(conf, pod_netns.path)
    res = a.add()
    assert len(res["ips"]) == 2
    assert any(r.get("dst") == "default" and r.get("gateway") == "fd00:100::1"
               for r in netbed.routes(ns=pod_netns.name, family="-6"))
    assert netbed.ping_retry(pod_netns.name, "fd00:100::1")


def test_version_imports_nothing_heavy() -> None:
    proc = subprocess.run([ph.PYTHON, "-X", "importtime", "-m", "cni"], env={"CNI_COMMAND": "VERSION"},
                          capture_output=True, text=True, cwd=ph.ROOT, check=False)
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["supportedVersions"] == ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    for heavy in ("pyroute2", "ovs", "grpc", "netaddr"):
        assert heavy not in imported, heavy
