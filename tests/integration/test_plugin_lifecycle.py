"""DEL / CHECK / GC / STATUS and failure handling of the plugin process, on real OVS + netns.

Every failing ADD is followed by an independent search for leftovers (host veth, OVS port,
OVS interface by container id, host-local lease files).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import time
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


def _hl_net(bridge: str, tmp: Path, name: str | None = None, **extra: object) -> dict:
    ipam = ph.host_local("10.66.0.0/16", str(tmp / "hl"), routes=[{"dst": "0.0.0.0/0"}])
    return ph.network(bridge, name=name, vlan=100, ipam=ipam, **extra)


def _leases(tmp: Path, name: str) -> list[str]:
    d = tmp / "hl" / name
    if not d.exists():
        return []
    return [f for f in os.listdir(d) if f[0].isdigit()]


# ---------------------------------------------------------------------------------------------
# DEL


def test_del_twice_and_after_netns_deleted(ovs_bridge: str, netns_factory: Callable[[str], netbed.Netns],
                                           attacher: ph.Attacher, tmp_path: Path) -> None:
    conf = _hl_net(ovs_bridge, tmp_path)
    ns = netns_factory("pod")
    a = attacher.new(conf, ns.path)
    a.add()
    assert netbed.link(a.host) is not None and a.host in netbed.bridge_ports(ovs_bridge)
    assert len(_leases(tmp_path, conf["name"])) == 1
    ns.delete()  # the runtime tore the sandbox down first
    for _ in range(2):
        rc, out, err = a.delete()
        assert rc == 0 and out is None, (out, err)
    assert ph.no_trace(a, ovs_bridge) == []
    assert _leases(tmp_path, conf["name"]) == []
    # DEL without CNI_NETNS at all
    rc, out, err = ph.run_plugin("DEL", conf, container_id=a.container_id, ifname="eth0")
    assert rc == 0, (out, err)


def test_del_never_touches_a_port_we_do_not_own(ovs_bridge: str, pod_netns: netbed.Netns,
                                                attacher: ph.Attacher, tmp_path: Path) -> None:
    conf = ph.network(ovs_bridge)
    a = attacher.new(conf, pod_netns.path)
    foreign = netbed.uniq("fp")
    netbed.sh("ip", "link", "add", foreign, "type", "veth", "peer", "name", foreign + "x")
    try:
        netbed.vsctl("add-port", ovs_bridge, foreign, "--", "set", "Interface", foreign,
                     f"external_ids:container_id={a.container_id}", "external_ids:ifname=eth0")
        rc, out, err = a.delete()
        assert rc == 0, (out, err)
        assert foreign in netbed.bridge_ports(ovs_bridge)  # no owner=ovs-underlay: left alone
    finally:
        netbed.vsctl("--if-exists", "del-port", foreign, check=False)
        netbed.delete_link(foreign)


# ---------------------------------------------------------------------------------------------
# ADD failing part-way leaves nothing


def test_add_fails_when_ipam_plugin_missing(ovs_bridge: str, pod_netns: netbed.Netns, attacher: ph.Attacher) -> None:
    conf = ph.network(ovs_bridge, vlan=100, ipam={"type": "no-such-ipam"})
    a = attacher.new(conf, pod_netns.path)
    rc, out, _ = a.run("ADD")
    assert rc != 0 and out["code"] == 7 and "no-such-ipam" in out["msg"] and "CNI_PATH" in out["msg"]
    assert ph.no_trace(a, ovs_bridge) == []
    assert netbed.link("eth0", ns=pod_netns.name) is None
    rc, out, err = a.delete()  # DEL after a failed ADD succeeds
    assert rc == 0, (out, err)


def test_add_fails_when_ifname_exists(ovs_bridge: str, pod_netns: netbed.Netns, attacher: ph.Attacher,
                                      tmp_path: Path) -> None:
    pod_netns.exec("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "other0")
    conf = _hl_net(ovs_bridge, tmp_path)
    a = attacher.new(conf, pod_netns.path)
    rc, out, _ = a.run("ADD")
    assert rc != 0 and out["code"] == 4 and "eth0 already exists" in out["msg"]
    assert ph.no_trace(a, ovs_bridge) == []
    assert _leases(tmp_path, conf["name"]) == []
    assert netbed.link("eth0", ns=pod_netns.name) is not None  # theirs, untouched


def test_add_fails_on_missing_bridge_and_wrong_datapath(pod_netns: netbed.Netns, ovs_bridge: str,
                                                        attacher: ph.Attacher) -> None:
    a = attacher.new(ph.network(f"nobr{netbed.TOKEN}"), pod_netns.path)
    rc, out, _ = a.run("ADD")
    assert rc != 0 and out["code"] == 7 and "does not exist" in out["msg"]
    assert ph.no_trace(a) == []
    b = attacher.new(ph.network(ovs_bridge, datapathType="system"), pod_netns.path)
    rc, out, _ = b.run("ADD")
    assert rc != 0 and out["code"] == 7 and "datapath_type 'netdev'" in out["msg"]
    assert ph.no_trace(b, ovs_bridge) == []
    # Set and right, it is only an assertion: ADD goes through.
    c = attacher.new(ph.network(ovs_bridge, datapathType="netdev"), pod_netns.path)
    rc, out, _ = c.run("ADD")
    assert rc == 0, out
    rc, out, _ = ph.run_plugin("STATUS", ph.network(f"nobr{netbed.TOKEN}"))
    assert rc != 0 and out["code"] == 50


def test_add_fails_after_ipam_rolls_back_lease(ovs_bridge: str, pod_netns: netbed.Netns,
                                               attacher: ph.Attacher, tmp_path: Path) -> None:
    # a route host-local returns but the kernel refuses (gateway unreachable on link): fails in
    # the address/route step, after veth + port + lease were made
    conf = _hl_net(ovs_bridge, tmp_path)
    conf["ipam"]["routes"] = [{"dst": "10.99.0.0/16", "gw": "172.31.255.1"}]
    a = attacher.new(conf, pod_netns.path)
    rc, out, err = a.run("ADD")
    assert rc != 0 and "route" in out["msg"], (out, err)
    assert ph.no_trace(a, ovs_bridge) == []
    assert _leases(tmp_path, conf["name"]) == []
    assert netbed.link("eth0", ns=pod_netns.name) is None


# ---------------------------------------------------------------------------------------------
# Bad input table: each gives its code and leaves no trace


BAD: list[tuple[str, Callable[[dict], object], dict, int, str]] = [
    ("malformed-json", lambda c: b"{not json", {}, 6, "cannot decode"),
    ("missing-name", lambda c: {k: v for k, v in c.items() if k != "name"}, {}, 7, "name"),
    ("missing-type", lambda c: {k: v for k, v in c.items() if k != "type"}, {}, 7, "type"),
    ("vlan-4095", lambda c: {**c, "vlan": 4095}, {}, 7, "4095"),
    ("trunk-min-gt-max", lambda c: {**c, "trunk": [{"minID": 20, "maxID": 10}]}, {}, 7, "minID 20"),
    ("ifname-16", lambda c: c, {"ifname": "a234567890123456"}, 4, "longer than 15"),
    ("ifname-slash", lambda c: c, {"ifname": "et/h0"}, 4, "CNI_IFNAME"),
    ("netns-relative", lambda c: c, {"netns": "run/netns/x"}, 4, "not an absolute path"),
    ("netns-not-netns", lambda c: c, {"netns": "/etc/hostname"}, 8, "not a network namespace"),
    ("netns-own", lambda c: c, {"netns": "/proc/self/ns/net"}, 8, "own network namespace"),
    ("bad-container-id", lambda c: c, {"container_id": "-bad id"}, 4, "CNI_CONTAINERID"),
    ("unknown-version", lambda c: {**c, "cniVersion": "0.9.9"}, {}, 1, "incompatible"),
    ("no-version", lambda c: {k: v for k, v in c.items() if k != "cniVersion"}, {}, 1, "incompatible"),
    ("ipam-not-in-path", lambda c: {**c, "ipam": {"type": "nope-ipam"}}, {}, 7, "not found in CNI_PATH"),
    ("bad-mac", lambda c: {**c, "args": {"cni": {"mac": "01:00:5e:00:00:01"}}}, {}, 7, "multicast"),
    ("bad-cni-args", lambda c: c, {"cni_args": "IP"}, 4, "CNI_ARGS"),
]


@pytest.mark.parametrize(("case", "mutate", "env", "code", "text"), BAD, ids=[b[0] for b in BAD])
def test_bad_input(case: str, mutate: Callable[[dict], object], env: dict, code: int, text: str,
                   ovs_bridge: str, pod_netns: netbed.Netns) -> None:
    conf = mutate(ph.network(ovs_bridge, vlan=100))
    cid = env.get("container_id", netbed.container_id("bad"))
    ifname = env.get("ifname", "eth0")
    # The documented naming contract (README): "ovu" + 12 hex of sha256("<cid>/<ifname>").
    host = "ovu" + hashlib.sha256(f"{cid}/{ifname}".encode()).hexdigest()[:12]
    rc, out, err = ph.run_plugin("ADD", conf, container_id=cid, netns=env.get("netns", pod_netns.path),
                                 ifname=env.get("ifname", "eth0"), cni_args=env.get("cni_args", ""))
    assert rc != 0
    assert out["code"] == code, (out, err)
    assert text in out["msg"] + out.get("details", ""), out
    assert set(out) <= {"cniVersion", "code", "msg", "details"}
    assert "Traceback" not in str(out)
    # Nothing of this attachment on the host (checked precisely, so concurrent runs can't
    # disturb it): no veth by name, none whose alias names the container.
    assert netbed.link(host) is None
    assert [ln["ifname"] for ln in netbed.links() if cid in (ln.get("ifalias") or "")] == []
    assert netbed.bridge_ports(ovs_bridge) == []
    assert [ln["ifname"] for ln in netbed.links(ns=pod_netns.name)] == ["lo"]


def test_status_gc_below_1_1_and_check_below_0_4_fail_with_code_1(ovs_bridge: str) -> None:
    for cmd, version in (("STATUS", "1.0.0"), ("GC", "0.4.0"), ("CHECK", "0.3.1")):
        rc, out, _ = ph.run_plugin(cmd, ph.network(ovs_bridge, version=version),
                                   container_id=netbed.container_id(), netns="/run/netns/x")
        assert rc != 0 and out["code"] == 1, (cmd, out)


# ---------------------------------------------------------------------------------------------
# CHECK


def test_check_detects_changed_tag_removed_address_missing_lease(
        ovs_bridge: str, pod_netns: netbed.Netns, attacher: ph.Attacher, tmp_path: Path) -> None:
    conf = _hl_net(ovs_bridge, tmp_path)
    a = attacher.new(conf, pod_netns.path)
    res = a.add()
    chk = {**conf, "prevResult": res}
    rc, out, err = a.run("CHECK", chk)
    assert rc == 0 and out is None, (out, err)
    netbed.vsctl("set", "Port", a.host, "tag=101")
    rc, out, _ = a.run("CHECK", chk)
    assert rc != 0 and "tag 101, expected 100" in out["msg"]
    netbed.vsctl("set", "Port", a.host, "tag=100")
    addr = res["ips"][0]["address"]
    pod_netns.exec("ip", "addr", "del", addr, "dev", "eth0")
    rc, out, _ = a.run("CHECK", chk)
    assert rc != 0 and f"address {addr} missing" in out["msg"]
    # A neighbour in the same subnet is not the same address (netaddr's IPNetwork equality
    # would say it is: it compares networks).
    ip, plen = addr.split("/")
    octets = ip.split(".")
    neighbour = ".".join([*octets[:3], str(int(octets[3]) % 250 + 2)]) + "/" + plen
    pod_netns.exec("ip", "addr", "add", neighbour, "dev", "eth0")
    rc, out, _ = a.run("CHECK", chk)
    assert rc != 0 and f"address {addr} missing" in out["msg"], out
    pod_netns.exec("ip", "addr", "del", neighbour, "dev", "eth0")
    pod_netns.exec("ip", "addr", "add", addr, "dev", "eth0")
    pod_netns.exec("ip", "route", "replace", "default", "via", res["ips"][0]["gateway"])
    assert a.run("CHECK", chk)[0] == 0
    for f in _leases(tmp_path, conf["name"]):  # host-local CHECK: lease must be on disk
        os.unlink(tmp_path / "hl" / conf["name"] / f)
    rc, out, _ = a.run("CHECK", chk)
    assert rc != 0 and "host-local" in out["msg"], out
    # CHECK changed nothing
    assert netbed.port(a.host)["tag"] == 100


# ---------------------------------------------------------------------------------------------
# GC


def test_gc_removes_exactly_the_stale_attachments(ovs_bridge: str, netns_factory: Callable[[str], netbed.Netns],
                                                  attacher: ph.Attacher, tmp_path: Path) -> None:
    conf = ph.network(ovs_bridge, vlan=100)
    other_net = ph.network(ovs_bridge, name=f"other{netbed.TOKEN}", vlan=200)
    keep = [attacher.new(conf, netns_factory("k").path) for _ in range(2)]
    stale = [attacher.new(conf, netns_factory("s").path) for _ in range(2)]
    other = attacher.new(other_net, netns_factory("o").path)
    for a in [*keep, *stale, other]:
        a.add()
    gc_conf = {**conf, "cni.dev/valid-attachments": [{"containerID": a.container_id, "ifname": "eth0"} for a in keep]}
    rc, out, err = ph.run_plugin("GC", gc_conf)
    assert rc == 0, (out, err)
    for a in stale:
        assert ph.no_trace(a, ovs_bridge) == []
    for a in [*keep, other]:
        assert a.host in netbed.bridge_ports(ovs_bridge) and netbed.link(a.host) is not None
    # no list at all is refused (it must not read as "nothing is valid") and removes nothing
    rc, out, _ = ph.run_plugin("GC", conf)
    assert rc == 1 and out["code"] == 7 and "valid-attachments" in out["msg"], out
    assert all(a.host in netbed.bridge_ports(ovs_bridge) for a in keep)
    # the older key alone is accepted too
    rc, out, err = ph.run_plugin("GC", {**conf, "cni.dev/attachments": []})
    assert rc == 0, (out, err)
    assert all(ph.no_trace(a, ovs_bridge) == [] for a in keep)
    assert other.host in netbed.bridge_ports(ovs_bridge)


def test_gc_removes_the_veths_of_this_network_whose_port_is_gone(
        ovs_bridge: str, netns_factory: Callable[[str], netbed.Netns], attacher: ph.Attacher) -> None:
    """Issue 11 item 11: a veth carrying our alias but no OVS port (here: the ports were removed
    behind our back) was never collected. Its alias names its network now; GC of that network
    removes it unless valid, and leaves other networks' veths alone."""
    conf = ph.network(ovs_bridge, vlan=100)
    other_net = ph.network(ovs_bridge, name=f"other{netbed.TOKEN}", vlan=200)
    keep, stale = attacher.new(conf, netns_factory("k").path), attacher.new(conf, netns_factory("s").path)
    other = attacher.new(other_net, netns_factory("o").path)
    for a in (keep, stale, other):
        a.add()
        assert (netbed.link(a.host) or {}).get("ifalias", "").endswith(f" eth0 {a.conf['name']}")
        netbed.vsctl("del-port", a.host)
    rc, out, err = ph.run_plugin("GC", {**conf, "cni.dev/valid-attachments": [
        {"containerID": keep.container_id, "ifname": "eth0"}]})
    assert rc == 0, (out, err)
    assert netbed.link(stale.host) is None
    assert netbed.link(keep.host) is not None and netbed.link(other.host) is not None


def test_status_ok_with_bridge_and_host_local(ovs_bridge: str, tmp_path: Path) -> None:
    rc, out, err = ph.run_plugin("STATUS", _hl_net(ovs_bridge, tmp_path))
    assert rc == 0 and out is None, (out, err)


# ---------------------------------------------------------------------------------------------
# Concurrency


def test_50_concurrent_adds_then_dels(ovs_bridge: str, netns_factory: Callable[[str], netbed.Netns],
                                      attacher: ph.Attacher, tmp_path: Path) -> None:
    conf = _hl_net(ovs_bridge, tmp_path)
    atts = [attacher.new(conf, netns_factory("cc").path) for _ in range(50)]
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        adds = list(pool.map(lambda a: a.run("ADD"), atts))
    t_add = time.monotonic() - t0
    bad = [(rc, out, err[-500:]) for rc, out, err in adds if rc != 0]
    assert not bad, bad[:3]
    ips = {out["ips"][0]["address"] for _, out, _ in adds}
    assert len(ips) == 50
    assert len(netbed.bridge_ports(ovs_bridge)) == 50
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        dels = list(pool.map(lambda a: a.delete(), atts))
    t_del = time.monotonic() - t0
    assert all(rc == 0 for rc, _, _ in dels), [d for d in dels if d[0] != 0][:3]
    assert netbed.bridge_ports(ovs_bridge) == []
    assert _leases(tmp_path, conf["name"]) == []
    assert not any(ln.get("ifalias", "").startswith("ovs-underlay test") and netbed.TOKEN in ln.get("ifalias", "")
                   and any(a.container_id in ln["ifalias"] for a in atts) for ln in netbed.links())
    print(f"50 ADDs {t_add:.1f}s, 50 DELs {t_del:.1f}s")
    # ~15 s on an idle 2-core box; the bound is loose because other suites share the cores.
    assert t_add + t_del < 120
