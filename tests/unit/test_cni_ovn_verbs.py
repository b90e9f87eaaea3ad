"""The verbs' OVN steps over fake drivers: step order per mode (bind, managed, localnet without
OVN), a fault at every step rolls back everything (the LSP included), DEL/GC/STATUS/CHECK."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import pytest
from test_cni_rollback import IPAMD, FakeDelegate, FakeIpam, FakeNetlink, FakeOvsdb, World

from cni import plugin
from cni.drivers import Drivers
from cni.errors import CniError
from cni.netconf import DelConf, NetConf, parse_del, parse_netconf
from cni.types import CmdArgs
from core.errors import CoreError
from core.ovn import Chassis, Lsp, LspSpec, NodeView
from core.ovnsettings import Northbound

NB = Northbound("unix:/nb.sock")


class OvnWorld(World):
    def __init__(self, fail_at: str = "") -> None:
        super().__init__(fail_at)
        self.lsps: dict[str, LspSpec] = {}
        self.chassis = Chassis("chassis-a", "br-int", {"physnet1": "br0"}, "tcp:1.2.3.4:6642", "physnet1:br0")
        self.bridges = {"br-int": "netdev", "br0": "netdev"}
        self.nb_up = True
        self.probe_asked: list[bool] = []


class FakeNode:
    def __init__(self, w: OvnWorld) -> None:
        self.w = w

    def inspect(self) -> NodeView:
        self.w.step("inspect")
        return NodeView(self.w.chassis, self.w.bridges)

    def wait_installed(self, iface: str, logical_port: str, timeout_ms: int, chassis: Chassis) -> float:
        self.w.step("wait_installed")
        return 1.0


class FakeNb:
    def __init__(self, w: OvnWorld) -> None:
        self.w = w

    def _up(self) -> None:
        if not self.w.nb_up:
            raise CniError(11, "OVN northbound DB at unix:/nb.sock is unreachable")

    def add_lsp(self, spec: LspSpec) -> None:
        self._up()
        self.w.step("add_lsp")
        self.w.lsps[spec.name] = spec

    def find_lsps(self, want: Mapping[str, str]) -> list[Lsp]:
        self._up()
        return [Lsp(n, n, {**s.ids, "owner": "ovs-underlay"}) for n, s in self.w.lsps.items()
                if all(s.ids.get(k) == v for k, v in want.items())]

    def delete_lsps(self, lsps: Sequence[Lsp]) -> None:
        self._up()
        self.w.journal.append("undo:lsp")
        for x in lsps:
            self.w.lsps.pop(x.name, None)

    def delete_attachment(self, want: Mapping[str, str]) -> list[str]:
        found = self.find_lsps(want)
        self.delete_lsps(found)
        return [x.name for x in found]

    def ping(self) -> None:
        self._up()

    def close(self) -> None:
        pass


class RecordingIpam(FakeIpam):
    def allocate(self, *, network: str, container_id: str, ifname: str, **kw: Any) -> Any:
        assert isinstance(self.w, OvnWorld)
        self.w.probe_asked.append(kw["conflict_check"])
        return super().allocate(network=network, container_id=container_id, ifname=ifname, **kw)


def drivers(w: OvnWorld) -> Drivers:
    return Drivers(FakeNetlink(w), FakeOvsdb(w), lambda sock, t: RecordingIpam(w), FakeDelegate(w),
                   node=FakeNode(w), northbound=lambda nb: FakeNb(w))


def mk(conf: dict[str, Any], cid: str = "c1", command: str = "ADD") -> tuple[CmdArgs, NetConf]:
    full = {"cniVersion": "1.1.0", "name": "n1", "type": "ovs-underlay", **conf}
    a = CmdArgs(command, cid, "/run/netns/p", "eth0", "", ("/usr/lib/cni",), b"", full, "1.1.0")
    return a, parse_netconf(a, node_nb=lambda: None)


def dl(a: CmdArgs) -> tuple[CmdArgs, DelConf]:
    """The DEL of the attachment ADDed with `a` (DEL reads its config leniently: parse_del)."""
    d = replace(a, command="DEL")
    return d, parse_del(d, lambda: None)


LOCALNET = {"topology": "localnet", "physicalNetworkName": "physnet1", "vlanID": 100}
CONFS = {
    "bind": {"ovnPort": "vm-1", "ipam": IPAMD},
    "managed": {"logicalSwitch": "blue", "ovnNorthbound": NB.remote, "ipam": IPAMD},
    "managed-localnet": {**LOCALNET, "ovnNorthbound": NB.remote, "ipam": IPAMD},
    "localnet-direct": LOCALNET,
}
STEPS = {  # OVN: the port before IPAM, MAC and addresses recorded in a second write (cni.plugin)
    "bind": ["inspect", "create_veth", "add_port", "wait_installed", "allocate", "set_pod_mac", "set_iface_ids",
             "configure", "probe_gateway", "announce"],
    "managed": ["inspect", "create_veth", "add_port", "allocate", "set_pod_mac", "add_lsp", "wait_installed",
                "set_iface_ids", "configure", "probe_gateway", "announce"],
    "managed-localnet": ["inspect", "create_veth", "add_port", "allocate", "set_pod_mac", "add_lsp",
                         "wait_installed", "set_iface_ids", "configure", "probe_gateway", "announce"],
    # a plain port on the mapped bridge without IPAM: written once
    "localnet-direct": ["inspect", "create_veth", "add_port", "configure", "announce"],
}


@pytest.mark.parametrize("mode", list(STEPS))
def test_add_order_and_where_the_port_goes(mode: str) -> None:
    w = OvnWorld()
    a, c = mk(CONFS[mode])
    plugin.cmd_add(a, c, drivers(w))
    assert w.journal == STEPS[mode]
    (port,) = w.ports.values()
    if mode == "localnet-direct":
        assert (port.bridge, port.tag, port.trunks) == ("br0", 100, ()) and "iface-id" not in port.iface_ids
        return
    assert (port.bridge, port.tag, port.trunks) == ("br-int", None, ())
    expected = "vm-1" if mode == "bind" else "c1_eth0"
    assert port.iface_ids["iface-id"] == expected
    if mode.startswith("managed"):
        spec = w.lsps["c1_eth0"]
        assert spec.mac == "0a:58:0a:00:00:05" and spec.ips == ("10.0.0.5",) and spec.chassis == "chassis-a"
        assert spec.ids["node"] == "chassis-a" and spec.ids["container_id"] == "c1"
        assert (spec.localnet is not None) == (mode == "managed-localnet")
        assert w.probe_asked == [False]  # the port passes no traffic before its LSP exists
    else:
        assert w.probe_asked == [True]


@pytest.mark.parametrize(("mode", "step"), [(m, s) for m, steps in STEPS.items() for s in steps])
def test_add_failure_at_each_step_rolls_back_everything(mode: str, step: str) -> None:
    w = OvnWorld(fail_at=step)
    a, c = mk(CONFS[mode])
    with pytest.raises(CoreError) as e:
        plugin.cmd_add(a, c, drivers(w))
    assert "injected fault" in e.value.msg  # the original error, never a cleanup error
    assert w.links == {} and w.ports == {} and w.leases == set() and w.lsps == {}
    done = STEPS[mode][: STEPS[mode].index(step)]
    expected = [u for s, u in (("add_lsp", "undo:lsp"), ("allocate", "undo:lease"), ("add_port", "undo:port"),
                               ("create_veth", "undo:veth")) if s in done]
    assert [j for j in w.journal if j.startswith("undo")] == expected


@pytest.mark.parametrize(("change", "text"), [
    ({"chassis": Chassis(None)}, "not an OVN chassis"),
    ({"bridges": {"br0": "netdev"}}, "'br-int' does not exist"),
    ({"chassis": Chassis("ch", "br-int", {}, None, "")}, "not in this node's ovn-bridge-mappings (unset)"),
])
def test_node_that_cannot_take_the_port_is_7_before_any_side_effect(change: dict[str, Any], text: str) -> None:
    for mode in ("managed-localnet", "localnet-direct") if "mappings" in text else ("bind", "managed"):
        w = OvnWorld()
        w.__dict__.update(change)
        a, c = mk(CONFS[mode])
        with pytest.raises(CniError) as e:
            plugin.cmd_add(a, c, drivers(w))
        assert e.value.code == 7 and text in e.value.msg and w.journal == ["inspect"], (mode, e.value.msg)
        with pytest.raises(CniError) as e:
            plugin.cmd_status(a, c, drivers(w))
        assert e.value.code == 50


def test_ovn_port_on_a_bridge_ovn_does_not_watch_is_7() -> None:
    w = OvnWorld()
    a, c = mk({"ovnPort": "vm-1", "bridge": "br0"})
    with pytest.raises(CniError) as e:
        plugin.cmd_add(a, c, drivers(w))
    assert e.value.code == 7 and "not OVN's integration bridge" in e.value.msg


def test_status_reports_an_unreachable_northbound() -> None:
    w = OvnWorld()
    w.nb_up = False
    a, c = mk(CONFS["managed"], command="STATUS")
    with pytest.raises(CniError) as e:
        plugin.cmd_status(a, c, drivers(w))
    assert e.value.code == 50 and "unreachable" in e.value.msg


def test_del_removes_the_lsp_idempotently_and_survives_a_down_northbound() -> None:
    w = OvnWorld()
    a, c = mk(CONFS["managed"])
    plugin.cmd_add(a, c, drivers(w))
    plugin.cmd_del(*dl(a), drivers(w))
    assert w.lsps == {} and w.ports == {} and w.links == {} and w.leases == set()
    plugin.cmd_del(*dl(a), drivers(w))
    plugin.cmd_add(a, c, drivers(w))
    w.nb_up = False
    with pytest.raises(CniError) as e:
        plugin.cmd_del(*dl(a), drivers(w))
    assert e.value.code == 11 and "northbound" in e.value.msg
    assert w.ports == {} and w.links == {} and w.leases == set()  # the rest was removed anyway
    assert list(w.lsps) == ["c1_eth0"]  # left for GC


def test_gc_removes_stale_lsps_of_this_node_and_network() -> None:
    w = OvnWorld()
    d = drivers(w)
    for cid in ("keep", "stale"):
        a, c = mk(CONFS["managed"], cid=cid)
        plugin.cmd_add(a, c, d)
    w.lsps["far_eth0"] = LspSpec("far_eth0", "blue", "0a:00:00:00:00:01",
                                 ids={"container_id": "far", "ifname": "eth0", "node": "chassis-b", "network": "n1"})
    a, c = mk({**CONFS["managed"], "cni.dev/valid-attachments": [{"containerID": "keep", "ifname": "eth0"}]},
              command="GC")
    plugin.cmd_gc(a, c, d)
    assert sorted(w.lsps) == ["far_eth0", "keep_eth0"]


def test_check_reports_a_missing_lsp_and_an_uninstalled_port() -> None:
    w = OvnWorld()
    a, c = mk(CONFS["managed"])
    res = plugin.cmd_add(a, c, drivers(w))
    w.lsps.clear()
    prev = {**CONFS["managed"], "prevResult": res.to_json("1.1.0")}
    a, c = mk(prev, command="CHECK")
    with pytest.raises(CniError) as e:
        plugin.cmd_check(a, c, drivers(w))
    assert "logical switch port c1_eth0 is missing" in e.value.msg
    assert "not installed by ovn-controller" in e.value.msg  # the fake OVS never set ovn-installed


def test_the_port_follows_the_nodes_integration_bridge() -> None:
    w = OvnWorld()
    w.chassis = Chassis("chassis-a", "br-ovn", {}, None, "")
    w.bridges = {"br-ovn": "netdev"}
    for conf in (CONFS["bind"], CONFS["managed"]):
        a, c = mk(conf)
        plugin.cmd_add(a, c, drivers(w))
        assert [p.bridge for p in w.ports.values()] == ["br-ovn"]
        plugin.cmd_del(*dl(a), drivers(w))
