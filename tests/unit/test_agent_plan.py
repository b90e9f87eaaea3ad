"""The agent's pure parts: records, what moves, plans from observed states, the journal.

No root: states are built by hand as `core.netstate` records; the integration tests run the same
plans on the kernel and OVS.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from agent import actions as A
from agent import netmgr
from agent import plan as P
from agent.config import NodeNetwork, ProviderNetwork, Verify
from agent.journal import Journal, JournalError, StateDir, VlanPort
from core import bridges as B
from core import netstate as N
from core.bridges import BridgeInfo, BridgePort
from core.names import OWNER

MAC = "52:54:00:12:34:56"


def nic_state(index: int = 3, name: str = "eth1", with_config: bool = True) -> N.IfaceState:
    link = N.Link(name, index, MAC, 1500, True)
    if not with_config:
        return N.IfaceState(link, (N.Address("fe80::5054:ff:fe12:3456/64", flags=0x80, scope=253),))
    addrs = (N.Address("172.31.0.11/24", flags=0x80, label=name, broadcast="172.31.0.255"),
             N.Address("172.31.0.111/24", flags=0x81, label=f"{name}:1", broadcast="172.31.0.255"),
             N.Address("fd00:31::b/64", flags=0x82),
             N.Address("2001:db8::5054:ff:fe12:3456/64", flags=0x100, proto=2, valid_lft=3600, preferred_lft=1800),
             N.Address("fe80::5054:ff:fe12:3456/64", flags=0x80, scope=253))
    routes = (N.Route("0.0.0.0/0", oif=index, gateway="172.31.0.1"),
              N.Route("172.31.0.0/24", oif=index, prefsrc="172.31.0.11", proto=2, scope=253),
              N.Route("10.99.0.0/16", table=100, oif=index, gateway="172.31.0.1", metric=7, proto=4),
              N.Route("::/0", oif=index, gateway="fd00:31::1", metric=1024, pref=0),
              N.Route("fd00:31::/64", oif=index, metric=256, proto=2),
              N.Route("2001:db8::/64", oif=index, metric=256, proto=9, expires=3000),
              N.Route("fe80::/64", oif=index, metric=256, proto=2),
              N.Route("172.31.0.11/32", table=255, oif=index, proto=2, scope=254, type=2))
    rules = (N.Rule(2, 1, 101, (("FRA_TABLE", 100), ("FRA_IIFNAME", name))),)
    return N.IfaceState(link, addrs, routes, rules)


def nn(**kw: object) -> NodeNetwork:
    return NodeNetwork(ProviderNetwork("net1", "eth1", datapath_type="netdev", **kw), "eth1")  # type: ignore[arg-type]


def fresh(nic: N.IfaceState | None = None) -> P.Observed:
    return P.Observed(nic=nic or nic_state(), nic_bridge=None, bridge=None, bridge_state=None)


def ops(plan: P.Plan, step: str) -> list[str]:
    return [a.text() for s in plan.steps if s.name == step for a in s.actions]


# ---------------------------------------------------------------------------------------------
# netstate


def test_what_moves_and_what_the_kernel_recreates() -> None:
    m = N.movable(nic_state())
    assert [a.address for a in m.addresses] == ["172.31.0.11/24", "172.31.0.111/24", "fd00:31::b/64"]
    assert sorted(r.dst for r in m.routes) == ["0.0.0.0/0", "10.99.0.0/16", "::/0"]


def test_a_noprefixroute_address_carries_its_prefix_route() -> None:
    st = nic_state()
    addrs = (dataclasses.replace(st.addresses[0], flags=0x80 | N.IFA_F_NOPREFIXROUTE, metric=100),)
    routes = (N.Route("172.31.0.0/24", oif=3, prefsrc="172.31.0.11", proto=2, scope=253, metric=100),)
    m = N.movable(N.IfaceState(st.link, addrs, routes))
    assert [r.dst for r in m.routes] == ["172.31.0.0/24"]


def test_records_round_trip_through_json() -> None:
    st = dataclasses.replace(nic_state(), routes=(*nic_state().routes, N.Route(
        "192.168.9.0/24", hops=(N.Hop(3, "172.31.0.2", 2, dev="eth1"), N.Hop(5, "10.0.1.2", dev="eth2")),
        metrics=(("RTAX_MTU", 1400),))))
    again = N.from_json(json.loads(json.dumps(N.to_json(st))))
    assert again == st
    assert N.differences(st, again) == []


def test_differences_name_what_changed() -> None:
    want = nic_state()
    have = dataclasses.replace(want, link=dataclasses.replace(want.link, index=9, mtu=9000),
                               addresses=want.addresses[1:],
                               routes=tuple(r.moved(3, 9) for r in want.routes if r.table != 100))
    diffs = N.differences(want, have)
    assert any("MTU 9000, was 1500" in d for d in diffs)
    assert any("address 172.31.0.11/24" in d and "missing" in d for d in diffs)
    assert any("10.99.0.0/16" in d and "missing" in d for d in diffs)
    assert len(diffs) == 3, diffs  # the index changed (a reboot): not a difference


def test_renders_like_ip() -> None:
    st = nic_state()
    names = st.names()
    assert st.routes[2].render(names) == "10.99.0.0/16 via 172.31.0.1 dev eth1 table 100 proto static metric 7"
    assert st.addresses[1].render("eth1") == "172.31.0.111/24 brd 172.31.0.255 dev eth1 label eth1:1"
    assert st.rules[0].render() == "priority 101 iif eth1 lookup 100"
    moved = st.addresses[1].on("eth1", "br-net1")
    assert moved.label == "br-net1:1" and not moved.flags & N.IFA_F_SECONDARY


# ---------------------------------------------------------------------------------------------
# plans


def test_first_apply_plan_in_order() -> None:
    plan = P.plan_apply(nn(), fresh(), None)
    assert plan.state == "not applied" and plan.work
    assert [s.name for s in plan.steps if s.actions] == [
        "create-bridge", "copy-addresses", "attach-nic", "move-routes", "move-rules", "clear-nic", "verify",
        "mark-ready"]
    (create, up) = [a for s in plan.steps if s.name == "create-bridge" for a in s.actions]
    assert isinstance(create, A.EnsureBridge) and create.create
    assert up == A.SetLink("br-net1", up=True)
    assert create.spec.hwaddr == MAC and create.spec.mtu == 1500 and create.spec.datapath_type == "netdev"
    assert create.spec.external_ids == {"owner": OWNER, B.NETWORK: "net1", B.INTERFACE: "eth1", B.MTU: "1500",
                                        B.READY: "false"}
    assert ops(plan, "copy-addresses") == [
        "ip addr add 172.31.0.11/24 brd 172.31.0.255 dev br-net1",
        "ip addr add 172.31.0.111/24 brd 172.31.0.255 dev br-net1 label br-net1:1",
        "ip addr add fd00:31::b/64 dev br-net1 nodad"]
    assert sorted(ops(plan, "move-routes")) == [
        "ip route replace 10.99.0.0/16 via 172.31.0.1 dev br-net1 table 100 proto static metric 7",
        "ip route replace default via 172.31.0.1 dev br-net1",
        "ip route replace default via fd00:31::1 dev br-net1 metric 1024"]
    assert ops(plan, "move-rules") == ["ip rule add priority 101 iif br-net1 lookup 100",
                                       "ip rule del priority 101 iif eth1 lookup 100"]
    assert ops(plan, "clear-nic") == ["ip addr del 172.31.0.11/24 dev eth1", "ip addr del 172.31.0.111/24 dev eth1",
                                      "ip addr del fd00:31::b/64 dev eth1"]
    (verify,) = [a for s in plan.steps if s.name == "verify" for a in s.actions]
    assert isinstance(verify, A.VerifyGateways)
    assert [(str(g), str(s)) for g, s in verify.gateways] == [("172.31.0.1", "172.31.0.11"),
                                                              ("fd00:31::1", "fd00:31::b")]


def applied_obs(nic: N.IfaceState | None = None, ready: bool = True) -> P.Observed:
    """What the kernel and OVS look like after a complete apply of `nic_state()`."""
    st = nic or nic_state()
    br_link = N.Link("br-net1", 7, MAC, 1500, True, kind="tun")
    br_addrs = tuple(a.on("eth1", "br-net1") for a in N.movable(st).addresses)
    br_routes = tuple(r.moved(3, 7) for r in N.movable(st).routes)
    br_rules = tuple(r.renamed("eth1", "br-net1") for r in st.rules)
    ids = {"owner": OWNER, B.NETWORK: "net1", B.INTERFACE: "eth1", B.MTU: "1500", B.READY: str(ready).lower()}
    bridge = BridgeInfo("br-net1", "u1", "netdev", MAC, ids, 2,
                        {"br-net1": BridgePort("br-net1", True),
                         "eth1": BridgePort("eth1", True, port_ids={"owner": OWNER})})
    bare = N.IfaceState(st.link, tuple(a for a in st.addresses if not N.movable_address(a)))
    return P.Observed(nic=bare, nic_bridge="br-net1", bridge=bridge,
                      bridge_state=N.IfaceState(br_link, br_addrs, br_routes, br_rules))


def journal(phase: str = "applied", **kw: object) -> Journal:
    return Journal("net1", "br-net1", "eth1", phase, nic_snapshot=nic_state(), bridge_created=True, **kw)  # type: ignore[arg-type]


def test_applied_is_nothing_to_do() -> None:
    plan = P.plan_apply(nn(), applied_obs(), journal())
    assert plan.state == "applied" and not plan.work


def test_not_marked_ready_verifies_and_marks_only() -> None:
    plan = P.plan_apply(nn(), applied_obs(ready=False), journal())
    assert [s.name for s in plan.steps if s.actions] == ["verify", "mark-ready"]


def test_reboot_case_moves_the_addresses_again() -> None:
    """The host config put the addresses back on the NIC; the bridge (persistent OVS DB) lost
    them: the plan moves them again from the journal's snapshot (no new snapshot). The bridge
    stays marked ready meanwhile: the pods' layer-2 path (NIC in the bridge) is intact."""
    obs = applied_obs()
    obs = dataclasses.replace(obs, nic=nic_state(), bridge_state=N.IfaceState(obs.bridge_state.link))  # type: ignore[union-attr]
    plan = P.plan_apply(nn(), obs, journal())
    assert "left behind" in plan.state
    assert [s.name for s in plan.steps if s.actions] == [
        "copy-addresses", "move-routes", "move-rules", "clear-nic", "verify", "mark-ready"]
    assert plan.snapshot == nic_state()


def test_interrupted_apply_resumes_from_the_journal_snapshot() -> None:
    """Killed after clear-nic: the NIC has nothing any more, so the snapshot must come from the
    journal, and only verify and mark-ready remain."""
    plan = P.plan_apply(nn(), applied_obs(ready=False), journal("applying", step="verify"))
    assert plan.snapshot == nic_state()
    assert [s.name for s in plan.steps if s.actions] == ["verify", "mark-ready"]


def test_restore_plan_mirrors_apply_and_ends_with_the_check() -> None:
    plan = P.plan_restore(nn(), applied_obs(), journal(), "remove")
    assert [s.name for s in plan.steps if s.actions] == [
        "restore-addresses", "restore-routes", "restore-rules", "detach-nic", "release-bridge", "check"]
    assert ops(plan, "release-bridge") == ["ovs-vsctl --if-exists del-br br-net1"]
    assert ops(plan, "restore-addresses")[1] == "ip addr add 172.31.0.111/24 brd 172.31.0.255 dev eth1 label eth1:1"


def test_restore_keeps_a_bridge_with_pods_or_not_ours() -> None:
    obs = applied_obs()
    busy = dataclasses.replace(obs, bridge=dataclasses.replace(obs.bridge, port_count=5))  # type: ignore[type-var]
    plan = P.plan_restore(nn(), busy, journal(), "remove")
    assert "ovs-vsctl --if-exists del-br br-net1" not in ops(plan, "release-bridge")
    assert any("3 other port(s)" in w for w in plan.warnings)
    plan = P.plan_restore(nn(), obs, dataclasses.replace(journal(), bridge_created=False), "remove")
    assert "ovs-vsctl --if-exists del-br br-net1" not in ops(plan, "release-bridge")
    assert any("did not create it" in w for w in plan.warnings)


@pytest.mark.parametrize(("obs", "net", "words"), [
    (P.Observed(None, None, None, None), nn(), "interface eth1 does not exist"),
    (dataclasses.replace(fresh(), nic_bridge="br-ex"), nn(), "port of OVS bridge br-ex"),
    (dataclasses.replace(fresh(), managed={"eth1": [netmgr.Management(netmgr.NM, "x: managed=true")]}), nn(),
     "managed by NetworkManager"),
    (dataclasses.replace(fresh(), bridge=BridgeInfo("br-net1", "u", "system", "", {}, 1, {})), nn(),
     "datapath_type system"),
    (dataclasses.replace(fresh(), vlans={"eth9.100": N.IfaceState(N.Link("eth9.100", 9, MAC, 1500, True, "vlan",
                                                                         vlan_id=100, vlan_link=8))}),
     nn(vlan_interfaces=("eth9.100",)), "not on eth1"),
])
def test_refusals(obs: P.Observed, net: NodeNetwork, words: str) -> None:
    with pytest.raises(P.Refused, match=words):
        P.plan_apply(net, obs, None)


def test_manage_true_takes_over_with_a_warning() -> None:
    obs = dataclasses.replace(fresh(), managed={"eth1": [netmgr.Management(netmgr.NETWORKD, "links/3")]})
    plan = P.plan_apply(nn(manage=True), obs, None)
    assert plan.work and any("taking it over" in w for w in plan.warnings)


def test_vlan_interface_plan() -> None:
    vlan = N.IfaceState(N.Link("eth1.100", 8, "52:54:00:00:01:00", 1500, True, "vlan", vlan_id=100, vlan_link=3),
                        (N.Address("192.168.100.11/24", flags=0x80, label="eth1.100"),),
                        (N.Route("10.100.0.0/16", oif=8, gateway="192.168.100.1"),))
    obs = dataclasses.replace(fresh(), vlans={"eth1.100": vlan})
    plan = P.plan_apply(nn(vlan_interfaces=("eth1.100",)), obs, None)
    assert plan.vlan_ports == (VlanPort("eth1.100", "br-net1.100", 100),)
    assert ops(plan, "vlan-eth1.100") == [
        "ovs-vsctl add-port br-net1 br-net1.100 tag=100 -- set Interface br-net1.100 type=internal "
        "mac=52:54:00:00:01:00 mtu_request=1500",
        "ip link set dev br-net1.100 up",
        "ip addr add 192.168.100.11/24 dev br-net1.100",
        "ip route replace 10.100.0.0/16 via 192.168.100.1 dev br-net1.100",
        "ip addr del 192.168.100.11/24 dev eth1.100",
        "ip link set dev eth1.100 down"]
    with pytest.raises(P.Refused, match="longer than 15"):
        P.vlan_port_name("br-longname12", 4000)


def test_verify_off_or_without_gateway_warns() -> None:
    plan = P.plan_apply(nn(verify=Verify(enabled=False)), fresh(), None)
    assert not ops(plan, "verify") and any("verify is off" in w for w in plan.warnings)
    bare = nic_state()
    bare = dataclasses.replace(bare, routes=tuple(r for r in bare.routes if N.IPNetwork(r.dst).prefixlen))
    plan = P.plan_apply(nn(), fresh(bare), None)
    assert not ops(plan, "verify") and any("nothing to verify" in w for w in plan.warnings)


def test_render_shows_snapshot_steps_and_warnings() -> None:
    text = P.render(P.plan_apply(nn(manage=True), dataclasses.replace(
        fresh(), managed={"eth1": [netmgr.Management(netmgr.NM, "d")]}), None))
    assert "snapshot of eth1: MAC 52:54:00:12:34:56, MTU 1500, up" in text
    assert "(kernel-made: not moved)" in text and "1. create-bridge" in text and "warning:" in text


def test_persistent_configs() -> None:
    st = nic_state()
    nm = netmgr.nm_keyfiles("br-net1", "eth1", st, 1500, "netdev")
    iface = nm["/etc/NetworkManager/system-connections/br-net1-if.nmconnection"]
    assert "cloned-mac-address=52:54:00:12:34:56" in iface and "address1=172.31.0.11/24,172.31.0.1" in iface
    assert "route1=10.99.0.0/16,172.31.0.1,7\nroute1_options=table=100" in iface
    assert "datapath-type=netdev" in nm["/etc/NetworkManager/system-connections/br-net1.nmconnection"]
    nd = netmgr.networkd_files("br-net1", "eth1", st, 1500)
    br = nd["/etc/systemd/network/10-br-net1.network"]
    assert "Address=172.31.0.11/24" in br and "Gateway=fd00:31::1" in br and "Table=100" in br
    assert "2001:db8::" not in br  # SLAAC: the kernel makes it again
    assert "LinkLocalAddressing=no" in nd["/etc/systemd/network/10-eth1.network"]


def test_manager_detection(tmp_path: Path) -> None:
    (tmp_path / "NetworkManager" / "devices").mkdir(parents=True)
    (tmp_path / "NetworkManager" / "devices" / "3").write_text("[device]\nmanaged=true\n")
    (tmp_path / "NetworkManager" / "devices" / "4").write_text("[device]\nmanaged=false\n")
    (tmp_path / "systemd" / "netif" / "links").mkdir(parents=True)
    (tmp_path / "systemd" / "netif" / "links" / "4").write_text("ADMIN_STATE=unmanaged\n")
    (tmp_path / "systemd" / "netif" / "links" / "5").write_text("ADMIN_STATE=configured\nNETWORK_FILE=/x.network\n")
    assert [m.manager for m in netmgr.detect(3, tmp_path)] == [netmgr.NM]
    assert netmgr.detect(4, tmp_path) == []
    assert [m.manager for m in netmgr.detect(5, tmp_path)] == [netmgr.NETWORKD]
    assert "/x.network" in netmgr.detect(5, tmp_path)[0].detail


# ---------------------------------------------------------------------------------------------
# journal


def test_journal_round_trip_atomic_and_private(tmp_path: Path) -> None:
    store = StateDir(tmp_path / "state")
    j = journal("applying", step="move-routes", vlan_ports=(VlanPort("eth1.100", "br-net1.100", 100),))
    store.write(j)
    assert store.read("net1") == j
    assert store.names() == ["net1"]
    assert oct(os.stat(store.path).st_mode & 0o777) == "0o700"
    assert oct(os.stat(store.file("net1")).st_mode & 0o777) == "0o600"
    assert not list(store.path.glob(".*.tmp"))
    assert j.interrupted and not j.at("applied").interrupted
    store.delete("net1")
    assert store.read("net1") is None


def test_a_corrupt_journal_is_moved_aside_and_reported(tmp_path: Path) -> None:
    store = StateDir(tmp_path)
    store.file("net1").write_text('{"version": 1, "phase": "app')
    with pytest.raises(JournalError, match="unreadable"):
        store.read("net1")
    assert store.read("net1") is None
    assert list(tmp_path.glob("net1.json.corrupt-*"))


def test_the_lock_serialises_agents(tmp_path: Path) -> None:
    a, b = StateDir(tmp_path), StateDir(tmp_path)
    with a.locked(), pytest.raises(JournalError, match="another agent"), b.locked(timeout_s=0.2):
        pass
    with b.locked(timeout_s=0.2):
        pass


# ---------------------------------------------------------------------------------------------
# OVSDB builders


def test_bridge_builders() -> None:
    spec = B.BridgeSpec("br-net1", "netdev", MAC, 9000, {"owner": OWNER})
    steps = B.create_bridge_steps(spec)
    ops_ = [s.op for s in steps]
    assert [o["op"] for o in ops_] == ["comment", "insert", "insert", "insert", "mutate"]
    assert ops_[1]["row"] == {"name": "br-net1", "type": "internal", "mtu_request": ["set", [9000]]}
    assert ops_[3]["row"]["other_config"] == ["map", [["hwaddr", MAC]]]
    assert ops_[4]["table"] == "Open_vSwitch" and steps[4].count == 1
    info = BridgeInfo("br-net1", "u1", "netdev", "aa:bb:cc:dd:ee:ff", {"owner": OWNER}, 2, {})
    upd = [s.op for s in B.update_bridge_steps(spec, info)]
    assert upd[0]["mutations"][1] == ["other_config", "insert", ["map", [["hwaddr", MAC]]]]
    theirs = dataclasses.replace(info, external_ids={})
    assert all("other_config" not in json.dumps(s.op) for s in B.update_bridge_steps(spec, theirs))
    with pytest.raises(B.NotOwned):
        B.delete_bridge_steps(theirs, [])
    guard = B.delete_bridge_steps(info, ["p1", "p2"])[1].op
    assert guard["op"] == "wait" and guard["rows"] == [{"ports": ["set", [["uuid", "p1"], ["uuid", "p2"]]]}]
