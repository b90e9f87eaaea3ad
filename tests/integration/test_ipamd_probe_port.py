"""ipamd's probe ports (issue 14) on the emulated underlay (VLAN 100: 192.168.100.1/24 and
fd00:100::1/64): the port's marks and lifecycle (crash, restart, shutdown), pre-probed candidates,
a squatter found by the background probe and by the passive watch, the gateway cache, and the
port's VLAN on access, native-VLAN and trunk networks.

Oracles: `ip -j` in the probe netns, `ovs-vsctl --format=json`, ipamd's CLI (`leases --all`,
`pools`), the Prometheus endpoint, and the plugin's CHECK as a process.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import plugin_helpers as ph
import pytest
from netaddr import IPAddress

from core.ipamd_client import IpamClient
from core.names import probe_port_name
from core.spec import Segment, parse_ipam
from testbed import netbed, pki

POOL = parse_ipam({"subnets": [{"subnet": "192.168.100.0/24", "gateway": "192.168.100.1",
                                "rangeStart": "192.168.100.10", "rangeEnd": "192.168.100.60"}]}).pool


@pytest.fixture
def hand_pod(underlay: netbed.Underlay, netns_factory: Callable[[str], netbed.Netns]) -> Iterator[Callable[..., netbed.Netns]]:
    """A host on the bridge that is not ours: `plug(vlan or None (trunk), *cidrs)`."""
    made: list[str] = []

    def plug(vlan: int | None, *cidrs: str) -> netbed.Netns:
        ns = netns_factory("hp")
        host = netbed.uniq("hv")
        netbed.sh("ip", "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns.name)
        made.append(host)
        netbed.sh("ip", "link", "set", host, "up")
        netbed.vsctl("add-port", underlay.bridge, host, *([f"tag={vlan}"] if vlan is not None else []))
        for cidr in cidrs:
            ns.exec("ip", "addr", "add", cidr, "dev", "eth0", *(["nodad"] if ":" in cidr else []))
        ns.exec("ip", "link", "set", "eth0", "up")
        return ns

    yield plug
    for host in made:
        netbed.delete_link(host)


def _garp(ns: netbed.Netns, ip: str, count: int = 2) -> None:
    """An ARP announcement of `ip` from the host's eth0 (what a host sends when it takes an address)."""
    code = f"""
import socket, struct
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
mac = s.getsockname()[4]
ip = socket.inet_aton("{ip}")
f = b"\\xff" * 6 + mac + b"\\x08\\x06" + struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, ip, b"\\0" * 6, ip)
for _ in range({count}):
    s.send(f)
"""
    netbed.sh("python3", "-c", code, ns=ns.name)


def _allocate(c: IpamClient, net: str, seg: Segment, cid: str | None = None, wait_ms: int = 100) -> object:
    return c.allocate(network=net, pool=POOL, container_id=cid or netbed.container_id("pp"), ifname="eth0",
                      netns="/run/netns/none", conflict_check=True, conflict_check_wait_ms=wait_ms, segment=seg,
                      interface_mac="02:00:00:00:00:01")


def _until(pred: Callable[[], object], timeout: float = 20.0) -> object:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def _port_row(name: str) -> dict | None:
    rows = netbed.ovs_rows("Interface", "_uuid", "name", "ofport", "type", "external_ids", where=[f"name={name}"])
    return rows[0] if rows else None


def test_port_marks_addresses_and_lifecycle_across_crash_and_shutdown(underlay: netbed.Underlay,
                                                                      ipamd: netbed.Ipamd) -> None:
    seg = Segment(underlay.bridge, 100)
    with IpamClient(ipamd.socket) as c:
        a = _allocate(c, f"pl{netbed.TOKEN}", seg)
    assert a.conflict_probed  # type: ignore[attr-defined]
    name = probe_port_name(ipamd.probe_netns, seg.key)
    row = _port_row(name)
    assert row is not None and row["type"] == "internal" and row["ofport"] > 0
    assert row["external_ids"] == {"owner": "ovs-underlay-ipamd", "probe_netns": ipamd.probe_netns,
                                   "segment": seg.key}
    assert netbed.port(name)["tag"] == 100
    (link,) = [x for x in netbed.ip_json("-d", "addr", ns=ipamd.probe_netns) if x["ifname"] == name]
    assert link["addr_info"] == [] and "UP" in link["flags"]  # no address at all, IPv6 off
    assert netbed.sh("cat", f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", ns=ipamd.probe_netns).stdout.strip() == "1"
    assert netbed.link(name) is None  # not in the host netns

    ipamd.stop(signal.SIGKILL)  # a crash: nothing cleaned up
    assert _port_row(name) is not None
    ipamd.start()  # restored from the state file: the same port, found and reused
    assert _until(lambda: "probe port ready (found and reused)" in Path(ipamd.log_path).read_text())
    again = _port_row(name)
    assert again is not None and again["_uuid"] == row["_uuid"]
    (link2,) = [x for x in netbed.ip_json("link", ns=ipamd.probe_netns) if x["ifname"] == name]
    assert link2["ifindex"] == link["ifindex"]

    ipamd.stop()  # clean shutdown: port and netns removed
    assert _port_row(name) is None
    assert ipamd.probe_netns not in netbed.sh("ip", "netns", "list").stdout


def test_candidates_are_pre_probed_and_a_squatter_is_quarantined_without_an_add(
        underlay: netbed.Underlay, ipamd: netbed.Ipamd, hand_pod: Callable[..., netbed.Netns]) -> None:
    squatter = hand_pod(100, "192.168.100.12/24")  # a server on the 3rd address, silent so far
    net, seg = f"pc{netbed.TOKEN}", Segment(underlay.bridge, 100)
    with IpamClient(ipamd.socket) as c:
        first = _allocate(c, net, seg)  # cold: probed inline from the port
        assert [str(i.address) for i in first.ips] == ["192.168.100.10/24"]  # type: ignore[attr-defined]
        # the next candidates (.11, .12, ...) are probed in the background: .12 answers
        rows = _until(lambda: [r for r in ipamd.leases(net, all=True) if r["state"] == "quarantined"])
        assert [(r["ip"], r["conflictMAC"], r["containerID"]) for r in rows] == [  # type: ignore[union-attr]
            ("192.168.100.12", netbed.link("eth0", ns=squatter.name)["address"], "")]
        time.sleep(0.3)
        # A fresh candidate: handed out with no probe wait (pre_probed says the address was not
        # probed inline; how long that takes is make bench's "ADD warm defaults" row, not a
        # timed assertion on a shared machine).
        second = _allocate(c, net, seg, wait_ms=100)
        assert second.pre_probed == 1 and second.conflict_probed  # type: ignore[attr-defined]
        assert [str(i.address) for i in second.ips] == ["192.168.100.11/24"]  # type: ignore[attr-defined]
        third = _allocate(c, net, seg)
        assert [str(i.address) for i in third.ips] == ["192.168.100.13/24"]  # type: ignore[attr-defined]
        assert third.pre_probed == 1  # type: ignore[attr-defined]
    assert [p["quarantined"] for p in ipamd.pools() if p["network"] == net] == [1]


def test_the_watch_puts_a_leased_address_in_conflict_and_check_says_so(
        underlay: netbed.Underlay, ipamd_factory: Callable[..., netbed.Ipamd],
        hand_pod: Callable[..., netbed.Netns], netns_factory: Callable[[str], netbed.Netns],
        tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tls = pki.make(tmp_path)
    d = ipamd_factory("--metrics-port", str(port), *pki.ipamd_args(tls), name="watch")
    ipam = {"type": "ovs-underlay-ipam", "daemonSocket": d.socket,
            "subnets": [{"subnet": "192.168.100.0/24", "gateway": "192.168.100.1", "rangeStart": "192.168.100.70",
                         "rangeEnd": "192.168.100.90"}], "gatewayCheckTimeoutMs": 1500}
    conf = ph.network(underlay.bridge, name=f"pw{netbed.TOKEN}", vlan=100, ipam=ipam)
    att = ph.Attacher()
    try:
        a = att.new(conf, netns_factory("pw").path)
        res = a.add()
        ip = res["ips"][0]["address"].split("/")[0]
        check = {**conf, "prevResult": res}
        rc, out, err = a.run("CHECK", check)
        assert rc == 0, (out, err[-800:])
        intruder = hand_pod(100)
        _garp(intruder, ip)  # another host announces the pod's address
        intruder_mac = netbed.link("eth0", ns=intruder.name)["address"]
        rows = _until(lambda: [r for r in d.leases(conf["name"], all=True) if r["state"] == "quarantined"])
        assert [(r["ip"], r["conflictMAC"], r["containerID"]) for r in rows] == [  # type: ignore[union-attr]
            (ip, intruder_mac, a.container_id)]
        rc, out, err = a.run("CHECK", check)
        assert rc != 0 and "in conflict" in out["msg"] and intruder_mac in out["msg"] and ip in out["msg"], out
        body = pki.scrape(f"https://127.0.0.1:{port}/metrics", tls)
        assert f'ipamd_conflicts_total{{kind="lease",network="{conf["name"]}",source="watch"}} 1' in body, body
        a.delete()
    finally:
        att.cleanup()


def test_gateway_from_the_cache_then_inline_when_it_is_gone(underlay: netbed.Underlay,
                                                            ipamd_factory: Callable[..., netbed.Ipamd],
                                                            tmp_path: Path) -> None:
    d = ipamd_factory("--config", _config(tmp_path, gatewayCacheSeconds=1), name="gw")
    net, seg = f"pg{netbed.TOKEN}", Segment(underlay.bridge, 100)
    router = underlay.routers[100]
    with IpamClient(d.socket) as c:
        a = _allocate(c, net, seg)
        seen = _until(lambda: _allocate(c, net, seg).gateways)  # type: ignore[attr-defined]
        assert [(str(g.gateway), g.mac) for g in seen] == [  # type: ignore[union-attr]
            ("192.168.100.1", netbed.link(router.ifname, ns=router.netns.name)["address"])]
        assert [str(i.address) for i in a.ips] == ["192.168.100.10/24"]  # type: ignore[attr-defined]
        underlay.remove_router(100)
        time.sleep(1.5)  # past gatewayCacheSeconds: no answer refreshed it
        assert _allocate(c, net, seg).gateways == ()  # type: ignore[attr-defined]


def _config(d: Path, **keys: object) -> str:
    path = d / "ipamd.json"
    path.write_text(json.dumps(keys))
    return str(path)


@pytest.mark.parametrize(("vlan", "trunks", "tag"), [(100, (300,), 100), (0, (300, 301), 0)],
                         ids=["native-vlan", "trunk"])
def test_port_vlan_on_native_and_trunk_networks(underlay: netbed.Underlay, ipamd: netbed.Ipamd,
                                                hand_pod: Callable[..., netbed.Netns], vlan: int,
                                                trunks: tuple[int, ...], tag: int) -> None:
    """The port is an access port in the VLAN the pods' untagged frames are in: the native VLAN,
    or VLAN 0 (untagged) on a trunk without one. It hears a host there, not elsewhere."""
    net, seg = f"pv{vlan}{netbed.TOKEN}", Segment(underlay.bridge, vlan, trunks)
    with IpamClient(ipamd.socket) as c:
        a = _allocate(c, net, seg, cid=netbed.container_id("pv"))
    name = probe_port_name(ipamd.probe_netns, seg.key)
    assert netbed.port(name)["tag"] == tag and netbed.set_empty(netbed.port(name)["trunks"]) is None
    ip = str(a.ips[0].address.ip)  # type: ignore[attr-defined]
    elsewhere = hand_pod(200)  # another VLAN: never heard
    _garp(elsewhere, ip)
    time.sleep(0.5)
    assert not [r for r in ipamd.leases(net, all=True) if r["state"] == "quarantined"]
    same = hand_pod(None if vlan == 0 else vlan)  # untagged on a trunk port, or the native VLAN
    _garp(same, ip)
    assert _until(lambda: [r for r in ipamd.leases(net, all=True) if r["state"] == "quarantined"])


def test_no_probe_ports_probes_from_the_pod(underlay: netbed.Underlay,
                                           ipamd_factory: Callable[..., netbed.Ipamd]) -> None:
    d = ipamd_factory("--no-probe-ports", name="nopp")
    with IpamClient(d.socket) as c:
        a = _allocate(c, f"pn{netbed.TOKEN}", Segment(underlay.bridge, 100))
    assert not a.conflict_probed  # type: ignore[attr-defined]  # the plugin then probes the held address
    assert not netbed.ovs_rows("Interface", "name", where=[f"external_ids:probe_netns={d.probe_netns}"])
    assert d.probe_netns not in netbed.sh("ip", "netns", "list").stdout
    assert IPAddress(str(a.ips[0].address.ip)) in POOL.subnets[0].subnet  # type: ignore[attr-defined]
