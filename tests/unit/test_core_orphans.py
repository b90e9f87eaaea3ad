"""core/orphans.py, core.names.parse_alias and core.netns.netns_state: the shared judgment of what
ovs-underlay left behind (CNI GC and ipamd's reconciler), over listings given as data, and the
netns test on real files (no root needed)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from core.names import host_alias, host_ifname
from core.netlink import HostLink
from core.netns import NetnsState, netns_state
from core.orphans import NodeObjects, dead_ports, our_veths, owner_of, portless_veths
from core.vswitch import PortInfo


def veth(cid: str, ifname: str = "eth0", index: int = 10) -> HostLink:
    return HostLink(host_ifname(cid, ifname), index, host_alias(cid, ifname), "veth")


def port(cid: str, ifname: str = "eth0", netns: str = "/run/netns/x", **ids: str) -> PortInfo:
    iface = {"owner": "ovs-underlay", "container_id": cid, "ifname": ifname, "netns": netns, **ids}
    return PortInfo(host_ifname(cid, ifname), "br0", None, (), None,
                    {"owner": "ovs-underlay", "container_id": cid, "ifname": ifname}, iface, 5, uuid=f"u-{cid}")


# ---- ownership -----------------------------------------------------------------------------------


def test_owner_of_reads_our_alias_and_insists_on_the_derived_name() -> None:
    name = host_ifname("abc", "net1")
    v = owner_of(HostLink(name, 1, host_alias("abc", "net1"), "veth"))
    assert v is not None and (v.container_id, v.ifname, v.network_key) == ("abc", "net1", None)
    v = owner_of(HostLink(name, 1, host_alias("abc", "net1") + " vlan100", "veth"))  # with its network
    assert v is not None and (v.container_id, v.ifname, v.network_key) == ("abc", "net1", "vlan100")
    # an alias that looks like ours on a link of another name is not ours
    assert owner_of(HostLink("eth7", 1, host_alias("abc", "net1"), "veth")) is None
    assert owner_of(HostLink(name, 1, host_alias("abc", "net2"), "veth")) is None
    for alias in ("", "ovs-underlay", "ovs-underlay abc", "ovs-underlay a b c d", "other abc net1",
                  "ovs-underlay -bad net1"):
        assert owner_of(HostLink(name, 1, alias, "veth")) is None, alias


# ---- judgments -----------------------------------------------------------------------------------


def test_our_veths_keeps_only_links_with_our_marks() -> None:
    mine = veth("c1")
    fake = HostLink("ovu000000000000", 3, host_alias("c1", "eth0"), "veth")
    other = HostLink("eth0", 2, "uplink", "veth")
    assert [v.container_id for v in our_veths([mine, fake, other])] == ["c1"]


def test_portless_veths_by_name_and_by_attachment() -> None:
    objs = NodeObjects(
        ports=(port("c1"),
               # a port of the attachment under another name (ovnPort naming, an older release)
               PortInfo("renamed", "br0", None, (), None, {}, {"owner": "ovs-underlay", "container_id": "c2",
                                                               "ifname": "eth0", "netns": "/n"}, 1)),
        veths=tuple(our_veths([veth("c1", index=1), veth("c2", index=2), veth("c3", index=3)])))
    assert [v.container_id for v in portless_veths(objs)] == ["c3"]
    assert objs.present("c1", "eth0") and objs.present("c3", "eth0") and not objs.present("c4", "eth0")


def test_dead_ports_need_a_netns_that_is_not_there_and_a_veth_that_is_gone() -> None:
    states = {"/run/netns/gone": NetnsState.GONE, "/run/netns/alive": NetnsState.PRESENT,
              "/run/netns/file": NetnsState.UNKNOWN}
    objs = NodeObjects(
        ports=(port("gone", netns="/run/netns/gone"),
               port("held", netns="/run/netns/gone"),  # its veth lives: the netns is held by someone
               port("alive", netns="/run/netns/alive"),
               port("file", netns="/run/netns/file"),  # veth gone too: the pod's interface is gone
               port("none", netns="")),  # nothing recorded: never judged
        veths=tuple(our_veths([veth("held")])))
    asked: list[str] = []

    def state_of(p: str) -> NetnsState:
        asked.append(p)
        return states[p]

    dead = dead_ports(objs, state_of)
    assert [(d.attachment[0], d.netns_state) for d in dead] == [("gone", NetnsState.GONE),
                                                               ("file", NetnsState.UNKNOWN)]
    assert "" not in asked


# ---- the netns test on real files ------------------------------------------------------------------


def test_netns_state_of_real_paths(tmp_path: Path) -> None:
    assert netns_state("/proc/self/ns/net") is NetnsState.PRESENT
    assert netns_state("/proc/self/ns/mnt") is NetnsState.UNKNOWN  # a namespace, not a netns
    empty = tmp_path / "netns-file"
    empty.write_text("")  # what a netns path is after the runtime unmounted it
    assert netns_state(str(empty)) is NetnsState.UNKNOWN
    assert netns_state(str(tmp_path / "gone")) is NetnsState.GONE  # its directory is visible
    assert netns_state(str(tmp_path / "nodir" / "gone")) is NetnsState.UNKNOWN  # not mounted here?
    assert netns_state(str(tmp_path)) is NetnsState.UNKNOWN  # a directory


def test_netns_state_never_blocks_on_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    out: list[NetnsState] = []
    t = threading.Thread(target=lambda: out.append(netns_state(str(fifo))), daemon=True)
    t.start()
    t.join(5)
    assert out == [NetnsState.UNKNOWN]


def test_netns_state_of_a_dead_process_depends_on_seeing_the_host_pids() -> None:
    with open("/proc/sys/kernel/pid_max") as fh:
        beyond = int(fh.read()) + 1  # no process can have it
    st = netns_state(f"/proc/{beyond}/ns/net")
    host_pids = Path("/proc/2/comm").exists() and Path("/proc/2/comm").read_text().strip() == "kthreadd"
    assert st is (NetnsState.GONE if host_pids else NetnsState.UNKNOWN)


@pytest.mark.parametrize("path", ["", "relative/path", "proc/self/ns/net"])
def test_netns_state_of_a_path_that_is_not_absolute_is_unknown(path: str) -> None:
    assert netns_state(path) is NetnsState.UNKNOWN
