"""Verbs over fake Drivers: each ADD step failing rolls back every earlier step; DEL is
idempotent and runs every step; the gateway check message; OVSDB row builders."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pytest
from netaddr import IPAddress, IPNetwork

from cni import plugin
from cni.drivers import Drivers
from cni.errors import CniError
from cni.netconf import DelConf, NetConf, parse_del, parse_netconf
from cni.types import CmdArgs, Result
from core.errors import CoreError, Unavailable
from core.names import host_alias, host_ifname, parse_alias, same_attachment
from core.netlink import HostLink, PodLink
from core.spec import Allocation, GatewaySeen, IpAssignment, ProbeResult, RouteSpec
from core.vswitch import BridgeView, PortInfo, PortSpec, iface_columns, port_columns


class Fault(Exception):
    pass


class World:
    """Shared fake state + journal; `fail_at` names the call that raises."""

    def __init__(self, fail_at: str = "") -> None:
        self.fail_at = fail_at
        self.journal: list[str] = []
        self.calls: list[str] = []  # ipamd clients made and releases, for DEL's choices
        self.links: dict[str, str] = {}  # host name -> alias
        self.ports: dict[str, PortSpec] = {}
        self.leases: set[tuple[str, str]] = set()
        self.bridges: dict[str, dict[str, str]] = {"br0": {}}  # name -> external_ids
        self.gateway_ok = True
        self.gateway_skipped = False
        self.ipamd_up = True
        self.ipamd_probes = True  # ipamd probed from its probe port (else: the held-address probe)
        self.seen: tuple[GatewaySeen, ...] = ()  # gateways ipamd's probe port saw
        self.allocated: list[dict[str, Any]] = []

    def step(self, name: str) -> None:
        self.journal.append(name)
        if name == self.fail_at:
            raise CoreError(f"injected fault at {name}")


class FakeNetlink:
    def __init__(self, w: World) -> None:
        self.w = w

    def create_veth(self, *, host: str, netns: str, ifname: str, alias: str, mtu: int | None,
                    mac: str | None) -> PodLink:
        self.w.step("create_veth")
        self.w.links[host] = alias
        return PodLink(ifname, 2, mac or "0a:00:00:00:00:aa", mtu or 1500, True, "0a:00:00:00:00:bb")

    def set_pod_mac(self, *, netns: str, ifname: str, mac: str) -> None:
        self.w.step("set_pod_mac")

    def delete_host_link(self, name: str, alias: str, index: int | None = None) -> bool:
        self.w.journal.append("undo:veth")
        if same_attachment(self.w.links.get(name), alias):
            del self.w.links[name]
            return True
        return False

    def host_link_alias(self, name: str) -> str | None:
        return self.w.links.get(name)

    def host_links(self, alias_prefix: str) -> list[HostLink]:
        return [HostLink(n, i, alias, "veth") for i, (n, alias) in enumerate(self.w.links.items(), 1)
                if alias.startswith(alias_prefix)]

    def configure(self, *, netns: str, ifname: str, addresses: Sequence[Any], routes: Sequence[Any]) -> None:
        self.w.step("configure")

    def pod_state(self, netns: str, ifname: str) -> Any:
        return None

    def announce(self, *, netns: str, ifname: str, addresses: Sequence[Any], mac: str) -> None:
        self.w.step("announce")


class FakeOvsdb:
    def __init__(self, w: World) -> None:
        self.w = w

    def bridge_view(self, bridge: str) -> BridgeView | None:
        self.w.step("preflight")
        ids = self.w.bridges.get(bridge)
        return BridgeView("netdev", ids) if ids is not None else None

    def add_port(self, spec: PortSpec) -> None:
        self.w.step("add_port")
        self.w.ports[spec.name] = spec

    def set_iface_ids(self, name: str, ids: Mapping[str, str]) -> None:
        self.w.step("set_iface_ids")

    def get_port(self, name: str) -> PortInfo | None:
        s = self.w.ports.get(name)
        return None if s is None else PortInfo(s.name, s.bridge, s.tag, s.trunks, None, s.port_ids, s.iface_ids, 1)

    def find_ports(self, want: Mapping[str, str]) -> list[PortInfo]:
        self.w.journal.append("find_ports")
        out = []
        for s in self.w.ports.values():
            if all(s.iface_ids.get(k) == v for k, v in {"owner": "ovs-underlay", **want}.items()):
                out.append(PortInfo(s.name, s.bridge, s.tag, s.trunks, None, s.port_ids, s.iface_ids, 1))
        return out

    def delete_ports(self, names: Sequence[str]) -> None:
        self.w.journal.append("undo:port")
        for n in names:
            self.w.ports.pop(n, None)

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class Lease:
    container_id: str
    ifname: str
    ips: tuple[str, ...]


class FakePending:
    def __init__(self, alloc: Allocation) -> None:
        self.alloc = alloc

    def result(self) -> Allocation:
        return self.alloc

    def settle(self) -> None:
        pass


class FakeIpam:
    def __init__(self, w: World) -> None:
        self.w = w

    def close(self) -> None:
        pass

    def _up(self) -> None:
        if not self.w.ipamd_up:
            raise Unavailable("ipamd at /x.sock is unreachable")

    def allocate(self, *, network: str, container_id: str, ifname: str, probe_held: bool = False,
                 **kw: Any) -> Allocation:
        self._up()
        self.w.step("allocate_held" if probe_held else "allocate")
        self.w.leases.add((container_id, ifname))
        self.w.allocated.append(kw)
        return Allocation(network, container_id, ifname,
                          (IpAssignment(IPNetwork("10.0.0.5/24"), IPAddress("10.0.0.1")),),
                          (RouteSpec(IPNetwork("0.0.0.0/0"), IPAddress("10.0.0.1")),), mac="0a:58:0a:00:00:05",
                          conflict_probed=self.w.ipamd_probes or probe_held, gateways=self.w.seen)

    def start_allocate(self, **kw: Any) -> FakePending:
        return FakePending(self.allocate(**kw))

    def release(self, *, network: str, container_id: str, ifname: str) -> list[Lease]:
        self._up()
        self.w.journal.append("undo:lease")
        self.w.calls.append(f"release:{network}")
        had = (container_id, ifname) in self.w.leases
        self.w.leases.discard((container_id, ifname))
        return [Lease(container_id, ifname, ("10.0.0.5/24",))] if had else []

    def get_lease(self, **kw: Any) -> Allocation | None:
        return None

    def gc(self, *, network: str, valid: Sequence[tuple[str, str]]) -> list[Lease]:
        gone = [k for k in self.w.leases if k not in set(valid)]
        self.w.leases -= set(gone)
        return [Lease(c, i, ()) for c, i in gone]

    def probe_gateway(self, **kw: Any) -> ProbeResult:
        self.w.step("probe_gateway")
        if self.w.gateway_skipped:
            return ProbeResult(False, None, 0.0, skipped=True)
        return ProbeResult(self.w.gateway_ok, "0a:00:00:00:00:01" if self.w.gateway_ok else None, 3.0)

    def health(self) -> bool:
        return self.w.ipamd_up


class FakeDelegate:
    def __init__(self, w: World) -> None:
        self.w = w

    def run(self, plugin_name: str, command: str, args: CmdArgs) -> Result | None:
        if command == "ADD":
            self.w.step("delegate_add")
            self.w.leases.add((args.container_id, args.ifname))
            return Result.from_json({"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.7/16", "gateway": "10.1.0.1"}],
                                     "routes": [{"dst": "0.0.0.0/0"}]}, "1.0.0")
        if command == "DEL":
            self.w.journal.append("undo:lease")
            self.w.leases.discard((args.container_id, args.ifname))
        return None


def drivers(w: World) -> Drivers:
    def ipam(sock: str, timeout_ms: int) -> FakeIpam:
        w.calls.append(f"ipamd:{sock}")
        return FakeIpam(w)

    return Drivers(FakeNetlink(w), FakeOvsdb(w), ipam, FakeDelegate(w))


IPAMD = {"type": "ovs-underlay-ipam", "daemonSocket": "/x.sock",
         "subnets": [{"subnet": "10.0.0.0/24", "gateway": "10.0.0.1"}]}


def mk(conf: dict[str, Any], cid: str = "c1") -> tuple[CmdArgs, NetConf]:
    full = {"cniVersion": "1.1.0", "name": "n1", "type": "ovs-underlay", "bridge": "br0",
            "datapathType": "netdev", "vlan": 100, **conf}
    full = {k: v for k, v in full.items() if v is not None}  # None in `conf`: leave the key out
    a = CmdArgs("ADD", cid, "/run/netns/p", "eth0", "", ("/usr/lib/cni",), b"", full, "1.1.0")
    return a, parse_netconf(a)


def dl(a: CmdArgs, config: dict[str, Any] | None = None, cni_args: str = "") -> tuple[CmdArgs, DelConf]:
    """The DEL of the attachment ADDed with `a`, with the same config unless one is given."""
    d = replace(a, command="DEL", config=config if config is not None else a.config, args=cni_args)
    return d, parse_del(d)


STEPS = {
    # ipamd: the Allocate goes out before the veth; the port is written once, after the answer.
    "ipamd": ["preflight", "allocate", "create_veth", "set_pod_mac", "add_port", "configure", "probe_gateway",
              "announce"],
    # a delegated IPAM plugin runs with the port on the bridge; the addresses are a second write.
    "delegate": ["preflight", "create_veth", "add_port", "delegate_add", "set_iface_ids", "configure", "announce"],
    "none": ["preflight", "create_veth", "add_port", "configure", "announce"],
}
CONFS = {"ipamd": {"ipam": IPAMD}, "delegate": {"ipam": {"type": "host-local"}}, "none": {}}


@pytest.mark.parametrize("mode", list(STEPS))
def test_add_happy_path_order(mode: str) -> None:
    w = World()
    a, c = mk(CONFS[mode])
    res = plugin.cmd_add(a, c, drivers(w))
    assert [j for j in w.journal if not j.startswith("undo")] == STEPS[mode]
    assert not any(j.startswith("undo") for j in w.journal)
    host = host_ifname("c1", "eth0")
    assert list(w.links) == [host] and list(w.ports) == [host]
    assert res.interfaces[0].name == host and res.interfaces[1].sandbox == "/run/netns/p"
    if mode != "none":
        assert res.ips[0].interface == 1 and res.routes[0].gw is not None  # gw resolved for delegate too


@pytest.mark.parametrize(("mode", "step"), [(m, s) for m, steps in STEPS.items() for s in steps])
def test_add_failure_at_each_step_rolls_back_everything(mode: str, step: str) -> None:
    w = World(fail_at=step)
    a, c = mk(CONFS[mode])
    with pytest.raises(CoreError) as e:  # the drivers' neutral error; skel maps it (cni.errors)
        plugin.cmd_add(a, c, drivers(w))
    assert "injected fault" in e.value.msg  # the original error, never a cleanup error
    assert w.links == {} and w.ports == {} and w.leases == set()
    done = STEPS[mode][: STEPS[mode].index(step)]
    undos = [j for j in w.journal if j.startswith("undo")]
    creates = {"allocate": "undo:lease", "delegate_add": "undo:lease", "add_port": "undo:port",
               "create_veth": "undo:veth"}
    expected = [creates[x] for x in reversed(done) if x in creates]
    assert undos == expected  # reverse order of creation


def test_cleanup_failure_does_not_mask_original_error() -> None:
    w = World(fail_at="configure")
    d = drivers(w)

    def broken_delete(names: Sequence[str]) -> None:
        raise Unavailable("OVSDB gone")

    d.ovsdb.delete_ports = broken_delete  # type: ignore[method-assign]
    a, c = mk({})
    with pytest.raises(CoreError) as e:
        plugin.cmd_add(a, c, d)
    assert "injected fault at configure" in e.value.msg
    assert w.links == {}  # later undos still ran


def test_gateway_unreachable_is_103_naming_gateway_vlan_bridge_iface() -> None:
    w = World()
    w.gateway_ok = False
    a, c = mk({"ipam": IPAMD})
    with pytest.raises(CniError) as e:
        plugin.cmd_add(a, c, drivers(w))
    assert e.value.code == 103
    for part in ("10.0.0.1", "VLAN 100", "br0", "eth0"):
        assert part in e.value.msg
    assert w.links == {} and w.ports == {} and w.leases == set()


def test_skipped_gateway_probe_is_not_103() -> None:
    """ipamd reports a probe as skipped when it sent nothing (the interface is not in the netns,
    or down). Both plugins now share one gateway check (cni.ipam): skipped is logged and ADD
    goes on. The main plugin used to read it as 'unreachable' and fail with 103."""
    w = World()
    w.gateway_skipped = True
    a, c = mk({"ipam": IPAMD})
    res = plugin.cmd_add(a, c, drivers(w))
    assert "probe_gateway" in w.journal and [str(ip.address) for ip in res.ips] == ["10.0.0.5/24"]
    assert w.leases == {("c1", "eth0")}


def test_gateway_check_switched_off() -> None:
    w = World()
    w.gateway_ok = False
    a, c = mk({"ipam": {**IPAMD, "gatewayCheck": False}})
    plugin.cmd_add(a, c, drivers(w))
    assert "probe_gateway" not in w.journal


def test_missing_bridge_is_code_7_before_any_side_effect() -> None:
    w = World()
    a, c = mk({"bridge": "nope"})
    with pytest.raises(CniError) as e:
        plugin.cmd_add(a, c, drivers(w))
    assert e.value.code == 7 and w.journal == ["preflight"]
    with pytest.raises(CniError) as e:
        plugin.cmd_status(a, c, drivers(w))
    assert e.value.code == 50


def test_del_idempotent_and_after_failed_add() -> None:
    w = World()
    a, c = mk({"ipam": IPAMD})
    plugin.cmd_add(a, c, drivers(w))
    plugin.cmd_del(*dl(a), drivers(w))
    assert w.links == {} and w.ports == {} and w.leases == set()
    plugin.cmd_del(*dl(a), drivers(w))  # twice
    w2 = World(fail_at="configure")
    with pytest.raises(CoreError):
        plugin.cmd_add(a, c, drivers(w2))
    plugin.cmd_del(*dl(a), drivers(w2))


BROKEN = {  # configs that no longer validate at DEL time (the ADD used the valid one)
    "vlan out of range": {"vlan": 5000},
    "unknown ipam key": {"ipam": {**IPAMD, "excludeIpz": ["10.0.0.9"]}},
    "bad prevResult": {"prevResult": {"cniVersion": "1.1.0", "ips": [{"address": "nope"}]}},
    "bad trunk": {"trunk": "all"},
    "ipam section not an object": {"ipam": "ovs-underlay-ipam"},
    "no name": {"name": None},
    "duplicate spellings": {"ovsdbSocket": "unix:/x", "socket_file": "unix:/y"},
}


@pytest.mark.parametrize("why", list(BROKEN))
def test_del_cleans_up_by_identity_when_the_config_no_longer_validates(why: str) -> None:
    """Issue 11 item 5: DEL parsed the whole config first, so any of these made DEL remove
    nothing (and kubelet retry forever). Now the OVS port's record (core.attachment) says which
    network and which ipamd hold the lease; the config is not needed."""
    w = World()
    a, c = mk({"ipam": {**IPAMD, "daemonSocket": "/run/ipamd-a.sock"}})
    plugin.cmd_add(a, c, drivers(w))
    host = host_ifname("c1", "eth0")
    assert w.ports[host].iface_ids["ipam"] == "ovs-underlay-ipam"
    assert w.ports[host].iface_ids["ipamd_socket"] == "/run/ipamd-a.sock"
    w.calls.clear()
    broken = {**a.config, **BROKEN[why]}
    plugin.cmd_del(*dl(a, {k: v for k, v in broken.items() if v is not None}, "not-a-pair"), drivers(w))
    assert w.links == {} and w.ports == {} and w.leases == set()
    assert w.calls == ["ipamd:/run/ipamd-a.sock", "release:n1"]


def test_del_uses_the_recorded_backend_over_the_config() -> None:
    """The record is what ADD did: a config whose ipam now names a delegate (or another socket)
    does not send DEL elsewhere."""
    w = World()
    a, c = mk({"ipam": IPAMD})
    plugin.cmd_add(a, c, drivers(w))
    w.calls.clear()
    plugin.cmd_del(*dl(a, {**a.config, "ipam": {"type": "host-local"}}), drivers(w))
    assert w.leases == set() and w.calls == ["ipamd:/x.sock", "release:n1"]


def test_del_without_a_record_uses_what_the_config_still_says() -> None:
    """No port (OVS lost it, or ADD failed before it): the lenient config read decides; a
    network nobody names is released in every network."""
    w = World()
    a, c = mk({"ipam": IPAMD})
    plugin.cmd_add(a, c, drivers(w))
    w.ports.clear()
    w.calls.clear()
    plugin.cmd_del(*dl(a, {**a.config, "vlan": 9999, "name": "has space"}), drivers(w))
    assert w.leases == set() and w.links == {}
    assert w.calls == ["ipamd:/x.sock", "release:"]


def test_del_ignores_a_hand_edited_record() -> None:
    """Values read back are validated: a record pointing at a relative socket or an invalid
    network reads as absent, and the config decides."""
    w = World()
    a, c = mk({"ipam": IPAMD})
    plugin.cmd_add(a, c, drivers(w))
    spec = w.ports[host_ifname("c1", "eth0")]
    w.ports[spec.name] = replace(spec, iface_ids={**spec.iface_ids, "ipamd_socket": "relative/x.sock",
                                                  "network": "../etc"})
    w.calls.clear()
    plugin.cmd_del(*dl(a), drivers(w))
    assert w.calls == ["ipamd:/x.sock", "release:n1"] and w.leases == set()


@pytest.mark.parametrize(("ids", "expect"), [
    ({}, None),
    ({"owner": "someone-else", "container_id": "c", "ifname": "eth0"}, None),
    ({"owner": "ovs-underlay", "container_id": "-bad", "ifname": "eth0"}, None),
    ({"owner": "ovs-underlay", "container_id": "c", "ifname": "a/b"}, None),
    ({"owner": "ovs-underlay", "container_id": "c", "ifname": "eth0"}, ("c", None, None, None)),
    ({"owner": "ovs-underlay", "container_id": "c", "ifname": "eth0", "network": "n",
      "ipam": "ovs-underlay-ipam", "ipamd_socket": "/run/s.sock"}, ("c", "n", "ovs-underlay-ipam", "/run/s.sock")),
    ({"owner": "ovs-underlay", "container_id": "c", "ifname": "eth0", "network": "n",
      "ipam": "ovs-underlay-ipam"}, ("c", "n", None, None)),  # which ipamd is unknown
    ({"owner": "ovs-underlay", "container_id": "c", "ifname": "eth0", "ipam": "host-local"},
     ("c", None, "host-local", None)),
    ({"owner": "ovs-underlay", "container_id": "c", "ifname": "eth0", "ipam": "../../bin/sh"}, ("c", None, None, None)),
    ({"owner": "ovs-underlay", "container_id": "c", "ifname": "eth0", "ipam": "ovs-underlay-ipam",
      "ipamd_socket": "/" + "x" * 200}, ("c", None, None, None)),
])
def test_read_record_validates_what_it_reads(ids: dict[str, str], expect: Any) -> None:
    from core.attachment import read_record

    r = read_record(ids)
    got = None if r is None else (r.container_id, r.network, r.ipam, r.ipamd_socket)
    assert got == expect


def test_del_with_ipamd_down_is_11_but_port_and_veth_removed() -> None:
    w = World()
    a, c = mk({"ipam": IPAMD})
    plugin.cmd_add(a, c, drivers(w))
    w.ipamd_up = False
    with pytest.raises(CniError) as e:
        plugin.cmd_del(*dl(a), drivers(w))
    assert e.value.code == 11
    assert w.links == {} and w.ports == {}
    assert w.leases == {("c1", "eth0")}  # left for GC


def test_gc_removes_only_stale_of_this_network() -> None:
    w = World()
    d = drivers(w)
    for cid in ("keep", "stale"):
        a, c = mk({"ipam": IPAMD}, cid=cid)
        plugin.cmd_add(a, c, d)
    a, c = mk({"ipam": IPAMD, "name": "other"}, cid="other")
    plugin.cmd_add(a, c, d)
    gc_a, gc_c = mk({"ipam": IPAMD, "cni.dev/valid-attachments": [{"containerID": "keep", "ifname": "eth0"}]})
    plugin.cmd_gc(gc_a, gc_c, d)
    assert sorted(w.ports) == sorted(host_ifname(x, "eth0") for x in ("keep", "other"))
    assert sorted(w.links) == sorted(w.ports)
    assert ("stale", "eth0") not in w.leases and ("keep", "eth0") in w.leases


def test_gc_removes_veths_of_this_network_that_lost_their_port() -> None:
    """Issue 11 item 11: GC looked only at OVS ports, so a veth of ours whose port was gone (OVS
    lost it, or an ADD died between the two) stayed forever. The alias now names the network,
    and GC removes such veths of its own network that are not valid."""
    w = World()
    d = drivers(w)
    for cid in ("keep", "stale", "stale2"):
        plugin.cmd_add(*mk({"ipam": IPAMD}, cid=cid), d)
    plugin.cmd_add(*mk({"ipam": IPAMD, "name": "other"}, cid="other"), d)
    w.links["ovuold"] = host_alias("old", "eth0")  # an older ADD: no network in the alias
    w.links["eth9"] = "someone else's"
    w.ports.clear()  # OVS lost every port
    gc_a, gc_c = mk({"ipam": IPAMD, "cni.dev/valid-attachments": [{"containerID": "keep", "ifname": "eth0"}]})
    plugin.cmd_gc(gc_a, gc_c, d)
    assert sorted(w.links) == sorted([host_ifname("keep", "eth0"), host_ifname("other", "eth0"), "ovuold", "eth9"])
    assert w.links[host_ifname("keep", "eth0")] == "ovs-underlay keep eth0 n1"


@pytest.mark.parametrize(("network", "key"), [("n1", "n1"), ("x" * 64, "x" * 64), ("x" * 65, None)])
def test_alias_names_the_network_and_stays_within_the_kernel_limit(network: str, key: str | None) -> None:
    alias = host_alias("c" * 128, "eth0123456789ab", network)
    a = parse_alias(alias)
    assert a is not None and a.container_id == "c" * 128 and a.ifname == "eth0123456789ab"
    assert a.network_key == key if key else a.network_key is not None and a.network_key.startswith("#")
    assert len(alias.encode()) <= 255
    assert same_attachment(alias, host_alias("c" * 128, "eth0123456789ab"))
    assert not same_attachment(alias, host_alias("c" * 128, "eth1"))
    assert parse_alias("ovs-underlay a b c d") is None and parse_alias("not ours") is None


def test_host_name_is_deterministic_and_short() -> None:
    n = host_ifname("abc", "eth0")
    assert n == host_ifname("abc", "eth0") != host_ifname("abc", "net1")
    assert len(n) == 15 and n.startswith("ovu")


def test_port_row_builders() -> None:
    access = port_columns(PortSpec("p", "br", tag=100))
    assert access["tag"] == [100] and access["trunks"] == [] and access["vlan_mode"] == ["access"]
    trunk = port_columns(PortSpec("p", "br", trunks=(7, 5, 5)))
    assert trunk["tag"] == [] and trunk["trunks"] == [5, 7] and trunk["vlan_mode"] == ["trunk"]
    native = port_columns(PortSpec("p", "br", tag=100, trunks=(5,)))
    assert native["vlan_mode"] == ["native-untagged"] and native["tag"] == [100]
    assert port_columns(PortSpec("p", "br"))["vlan_mode"] == []
    i = iface_columns(PortSpec("p", "br", iface_ids={"owner": "ovs-underlay"}, ofport_request=9))
    assert i == {"name": "p", "type": "", "external_ids": {"owner": "ovs-underlay"}, "ofport_request": [9]}


# ---------------------------------------------------------------------------------------------
# "provider": a network of the node agent (bridge br-<name>, readiness on the Bridge row)


def test_provider_names_the_bridge_and_is_validated() -> None:
    _, c = mk({"provider": "net1", "bridge": None})
    assert c.bridge == "br-net1" and c.provider == "net1"
    _, c = mk({"provider": "net1", "bridge": "br-net1"})
    assert c.bridge == "br-net1"
    for bad, words in (({"provider": "net1"}, "attaches to bridge br-net1, but bridge is 'br0'"),
                       ({"provider": "attachnet.default.ovn", "bridge": None}, "not a provider network name"),
                       ({"provider": "a" * 13, "bridge": None}, "not a provider network name"),
                       ({"provider": 1, "bridge": None}, "not a provider network name")):
        with pytest.raises(CniError) as e:
            mk(bad)
        assert e.value.code == 7 and words in e.value.msg, e.value.msg


def test_provider_not_ready_is_50_for_status_and_11_for_add_without_side_effects() -> None:
    ready = {"provider-network": "net1", "provider-ready": "true", "provider-interface": "eth1"}
    cases = [(None, "br-net1 does not exist"),
             ({"provider-network": "net1", "provider-ready": "false"}, "being applied"),
             ({"provider-network": "net1", "provider-ready": "false", "provider-error": "apply failed at verify"},
              "apply failed at verify"),
             ({}, "not marked as provider network net1")]
    for ids, words in cases:
        w = World()
        if ids is not None:
            w.bridges["br-net1"] = ids
        a, c = mk({"provider": "net1", "bridge": None})
        with pytest.raises(CniError) as e:
            plugin.cmd_status(a, c, drivers(w))
        assert e.value.code == 50 and "provider network net1 is not ready" in e.value.msg and words in e.value.msg
        with pytest.raises(CniError) as e:
            plugin.cmd_add(a, c, drivers(w))
        assert e.value.code == 11 and words in e.value.msg
        assert w.journal == ["preflight", "preflight"] and w.links == {} and w.ports == {}
    w = World()
    w.bridges["br-net1"] = ready
    a, c = mk({"provider": "net1", "bridge": None})
    plugin.cmd_status(a, c, drivers(w))
    res = plugin.cmd_add(a, c, drivers(w))
    host = host_ifname("c1", "eth0")
    assert w.ports[host].bridge == "br-net1" and res.interfaces[0].name == host


# ---- issue 14: the Allocate before the veth, one port write, the probe port's answers ----------


def test_allocate_names_the_segment_and_the_pods_mac_and_the_port_is_written_once() -> None:
    w = World()
    a, c = mk({"ipam": {**IPAMD, "macFromIP": False}, "trunk": [{"id": 7}], "vlan": 100})
    d = drivers(w)
    made: list[str | None] = []
    create = d.netlink.create_veth

    def spy(**kw: Any) -> PodLink:
        made.append(kw["mac"])
        return create(**kw)

    d.netlink.create_veth = spy  # type: ignore[method-assign]
    plugin.cmd_add(a, c, d)
    (kw,) = w.allocated
    seg = kw["segment"]
    assert (seg.bridge, seg.vlan, seg.trunks, seg.ovsdb) == ("br0", 100, (7,), "unix:/run/openvswitch/db.sock")
    assert kw["interface_mac"] == made[0] and made[0] is not None  # chosen before the veth exists
    spec = w.ports[host_ifname("c1", "eth0")]
    assert spec.iface_ids["ip_addresses"] == "10.0.0.5/24" and spec.iface_ids["attached_mac"] == "0a:58:0a:00:00:05"
    assert "set_iface_ids" not in w.journal  # one OVSDB write per pod


def test_without_a_probe_port_the_held_addresses_are_probed_from_the_pod_after_the_port() -> None:
    w = World()
    w.ipamd_probes = False  # ipamd could not probe (no probe port for the segment)
    a, c = mk({"ipam": IPAMD})
    plugin.cmd_add(a, c, drivers(w))
    j = w.journal
    assert j.index("add_port") < j.index("allocate_held") < j.index("configure")
    assert "set_iface_ids" not in j  # the same address came back: nothing to rewrite


def test_a_gateway_seen_by_the_probe_port_needs_no_probe_and_an_unseen_one_does() -> None:
    w = World()
    w.seen = (GatewaySeen(IPAddress("10.0.0.1"), "0a:00:00:00:00:01", 120),)
    a, c = mk({"ipam": IPAMD})
    plugin.cmd_add(a, c, drivers(w))
    assert "probe_gateway" not in w.journal
    w2 = World()
    w2.seen = (GatewaySeen(IPAddress("10.0.0.99"), "0a:00:00:00:00:01", 120),)  # another gateway
    plugin.cmd_add(a, c, drivers(w2))
    assert "probe_gateway" in w2.journal


def test_a_failed_veth_releases_the_lease_only_after_the_allocate_answered() -> None:
    w = World(fail_at="create_veth")
    order: list[str] = []

    class Pending(FakePending):
        def settle(self) -> None:
            order.append("settled")

    ipam = FakeIpam(w)
    ipam.start_allocate = lambda **kw: Pending(ipam.allocate(**kw))  # type: ignore[method-assign]
    release = ipam.release

    def spy_release(**kw: Any) -> list[Lease]:
        order.append("release")
        return release(**kw)

    ipam.release = spy_release  # type: ignore[method-assign]
    d = Drivers(FakeNetlink(w), FakeOvsdb(w), lambda sock, t: ipam, FakeDelegate(w))
    a, c = mk({"ipam": IPAMD})
    with pytest.raises(CoreError):
        plugin.cmd_add(a, c, d)
    assert order == ["settled", "release"] and w.leases == set()
