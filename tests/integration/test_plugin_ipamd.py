"""The plugin with ipamd IPAM (`ipam.type: ovs-underlay-ipam` and ovn-k top-level subnets) against a
real ipamd process: allocation, gateway check, rollback, DEL with ipamd down, CHECK, GC, STATUS.
Oracles: ipamd's CLI (`leases -o json`), ping, ip -j, ovs-vsctl json.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import plugin_helpers as ph
import pytest

from testbed import netbed


@pytest.fixture
def attacher() -> Iterator[ph.Attacher]:
    a = ph.Attacher()
    yield a
    a.cleanup()


def _net(u: netbed.Underlay, d: netbed.Ipamd, vlan: int = 100, **ipam_extra: object) -> dict:
    ipam = {"type": "ovs-underlay-ipam", "daemonSocket": d.socket,
            "subnets": [{"subnet": "192.168.100.0/24", "gateway": "192.168.100.1",
                         "rangeStart": "192.168.100.20", "rangeEnd": "192.168.100.60"}],
            "routes": [{"dst": "0.0.0.0/0"}], "gatewayCheckTimeoutMs": 1500, **ipam_extra}
    return ph.network(u.bridge, name=f"ipd{vlan}{netbed.TOKEN}", vlan=vlan, ipam=ipam)


def _leases(d: netbed.Ipamd, net: str) -> list[tuple[str, str]]:
    return sorted({(entry["containerID"], entry["ifname"]) for entry in d.leases(net)})


def test_two_pods_with_ipamd_gateway_check_and_ping(underlay: netbed.Underlay, ipamd: netbed.Ipamd,
                                                    netns_factory: Callable[[str], netbed.Netns],
                                                    attacher: ph.Attacher) -> None:
    conf = _net(underlay, ipamd)
    a1 = attacher.new(conf, netns_factory("i1").path, cni_args="K8S_POD_NAMESPACE=n;K8S_POD_NAME=p1;K8S_POD_UID=u1")
    a2 = attacher.new(conf, netns_factory("i2").path)
    r1, r2 = a1.add(), a2.add()
    ip1, ip2 = (r["ips"][0]["address"] for r in (r1, r2))
    assert ip1 != ip2 and ip1.startswith("192.168.100.")
    assert r1["routes"] == [{"dst": "0.0.0.0/0", "gw": "192.168.100.1"}]
    assert _leases(ipamd, conf["name"]) == sorted([(a1.container_id, "eth0"), (a2.container_id, "eth0")])
    assert netbed.ping_retry(netbed.Netns(a1.netns.rsplit("/", 1)[1]).name, ip2.split("/")[0])
    assert netbed.interface(a1.host)["external_ids"]["ip_addresses"] == ip1
    a1.delete()
    assert _leases(ipamd, conf["name"]) == [(a2.container_id, "eth0")]


def test_gateway_unreachable_fails_103_and_leaves_nothing(underlay: netbed.Underlay, ipamd: netbed.Ipamd,
                                                          pod_netns: netbed.Netns, attacher: ph.Attacher) -> None:
    underlay.remove_router(100)
    conf = _net(underlay, ipamd)
    a = attacher.new(conf, pod_netns.path)
    rc, out, err = a.run("ADD")
    assert rc != 0 and out["code"] == 103, (out, err[-1500:])
    for part in ("192.168.100.1", "VLAN 100", underlay.bridge, "eth0"):
        assert part in out["msg"], (part, out["msg"])
    assert ph.no_trace(a, underlay.bridge) == []
    assert _leases(ipamd, conf["name"]) == []
    assert [ln["ifname"] for ln in netbed.links(ns=pod_netns.name)] == ["lo"]
    # switched off per network: ADD succeeds without a gateway
    conf_off = _net(underlay, ipamd, gatewayCheck=False)
    b = attacher.new(conf_off, pod_netns.path)
    b.add()


def test_ovnk_top_level_subnets_static_ip_and_mac_from_ip(underlay: netbed.Underlay, ipamd: netbed.Ipamd,
                                                          pod_netns: netbed.Netns, attacher: ph.Attacher) -> None:
    conf = ph.network(underlay.bridge, name=f"ovnk{netbed.TOKEN}", vlan=100,
                      subnets="192.168.100.0/24", excludeSubnets="192.168.100.0/27")
    conf["ipam"] = None
    del conf["ipam"]
    # top-level subnets talk to ipamd on its default socket; point it at the test daemon
    conf_ipam = {**conf}
    conf_ipam["ipam"] = {"type": "ovs-underlay-ipam", "daemonSocket": ipamd.socket, "macFromIP": True,
                         "gatewayCheck": False, "subnets": [{"subnet": "192.168.100.0/24"}],
                         "exclude": ["192.168.100.0/27"]}
    del conf_ipam["subnets"], conf_ipam["excludeSubnets"]
    a = attacher.new(conf_ipam, pod_netns.path, cni_args="IP=192.168.100.99")
    res = a.add()
    assert res["ips"][0]["address"] == "192.168.100.99/24"
    assert netbed.link("eth0", ns=pod_netns.name)["address"] == "0a:58:c0:a8:64:63"
    # requested address taken -> 102, nothing left
    b = attacher.new(conf_ipam, netbed.make_netns("dup").path, cni_args="IP=192.168.100.99")
    try:
        rc, out, _ = b.run("ADD")
        assert rc != 0 and out["code"] == 102, out
        assert ph.no_trace(b, underlay.bridge) == []
    finally:
        netbed.sh("ip", "netns", "del", b.netns.rsplit("/", 1)[1], check=False)


def test_del_with_ipamd_down_is_11_then_lease_left_for_gc(underlay: netbed.Underlay,
                                                            ipamd: netbed.Ipamd, pod_netns: netbed.Netns,
                                                            attacher: ph.Attacher) -> None:
    conf = _net(underlay, ipamd, gatewayCheck=False)
    a = attacher.new(conf, pod_netns.path)
    a.add()
    ipamd.stop()
    rc, out, _ = a.run("DEL")
    assert rc != 0 and out["code"] == 11, out
    assert netbed.link(a.host) is None and netbed.port(a.host) is None  # removed best-effort
    rc, out, _ = ph.run_plugin("STATUS", conf)
    assert rc != 0 and out["code"] == 50
    ipamd.start()
    assert _leases(ipamd, conf["name"]) == [(a.container_id, "eth0")]
    rc, out, err = ph.run_plugin("GC", {**conf, "cni.dev/valid-attachments": []})
    assert rc == 0, (out, err)
    assert _leases(ipamd, conf["name"]) == []
    assert a.delete()[0] == 0
    assert ph.run_plugin("STATUS", conf)[0] == 0


def test_check_detects_missing_lease(underlay: netbed.Underlay, ipamd: netbed.Ipamd, pod_netns: netbed.Netns,
                                     attacher: ph.Attacher) -> None:
    conf = _net(underlay, ipamd)
    a = attacher.new(conf, pod_netns.path)
    res = a.add()
    chk = {**conf, "prevResult": res}
    rc, out, err = a.run("CHECK", chk)
    assert rc == 0, (out, err)
    ipamd.cli("release", "--network", conf["name"], "--container", a.container_id, "--ifname", "eth0")
    rc, out, _ = a.run("CHECK", chk)
    assert rc != 0 and "no ipamd lease" in out["msg"], out


def test_del_cleans_up_by_identity_whatever_the_config_now_says(underlay: netbed.Underlay,
                                                               ipamd: netbed.Ipamd, netns_factory: Callable[[str], netbed.Netns],
                                                               attacher: ph.Attacher) -> None:
    """Issue 11 item 5, on the real kernel, OVS and ipamd: an ADD with a valid config, then DEL
    with a config that no longer validates (and bad CNI_ARGS, and a socket that no longer
    exists in the config). DEL finds the network and ipamd's socket on the OVS Interface and
    removes lease, port and veth; it used to fail with 7 or 4 and remove nothing."""
    conf = _net(underlay, ipamd, gatewayCheck=False, conflictCheck=False)
    broken = [
        {**conf, "vlan": 5000},
        {**conf, "ipam": {**conf["ipam"], "excludeIpz": ["192.168.100.30"], "daemonSocket": "/nonexistent.sock"}},
        {**conf, "prevResult": {"cniVersion": "1.1.0", "ips": [{"address": "not-an-ip"}]}},
    ]
    for bad in broken:
        a = attacher.new(conf, netns_factory("pod").path)
        a.add()
        iface = netbed.interface(a.host)
        assert iface is not None and iface["external_ids"]["ipamd_socket"] == ipamd.socket
        assert iface["external_ids"]["ipam"] == "ovs-underlay-ipam"
        rc, out, err = ph.run_plugin("DEL", bad, container_id=a.container_id, netns=a.netns,
                                     cni_args="not-a-pair;IP=nope")
        assert rc == 0 and out is None, (bad, out, err[-2000:])
        a.deleted = True
        assert ph.no_trace(a, underlay.bridge) == []
        assert _leases(ipamd, conf["name"]) == []
