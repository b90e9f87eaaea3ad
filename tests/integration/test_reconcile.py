"""ipamd's reconciler on a real node: its own netns and Open vSwitch (testbed/cninode.py), the
ipamd process, the plugin (`python -m cni`) making real veths, ports and leases, then the ways a
node loses track of them: a DEL that never came (netns deleted, the kernel took the veth), an ADD
killed between the veth and the port, the IPAM plugin's lease under another main plugin, and an
OVS database that lost every port. Asserted through `ip -n`, the node's `ovs-vsctl` and the
`leases` command, never through the reconciler's own report alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.ipamd_client import IpamClient
from core.spec import parse_ipam
from testbed import netbed
from testbed.cninode import CniNode, make_cni_node
from tests.integration.plugin_helpers import host_ifname


@pytest.fixture
def cn(tmp_path: Path) -> Iterator[CniNode]:
    n = make_cni_node("rc", tmp_path / "node", ipamd_args=("--reconcile-interval", "0"))
    yield n
    n.destroy()


class Pods:
    def __init__(self, cn: CniNode, net: str) -> None:
        self.cn, self.net = cn, net
        self.conf = cn.conf(net, "10.203.0.0/24")
        self.netns: list[netbed.Netns] = []

    def add(self, role: str) -> tuple[str, netbed.Netns]:
        ns = netbed.make_netns(role)
        self.netns.append(ns)
        cid = netbed.container_id(role)
        res = self.cn.call("ADD", self.conf, cid, ns.path)
        assert res.rc == 0, res.stdout + res.stderr[-2000:]
        return cid, ns

    def cleanup(self) -> None:
        for ns in self.netns:
            ns.delete()


@pytest.fixture
def pods(cn: CniNode) -> Iterator[Pods]:
    p = Pods(cn, f"rec{netbed.TOKEN}")
    yield p
    p.cleanup()


def leased(cn: CniNode) -> set[str]:
    return {r["containerID"] for r in cn.active_leases()}


def ports(cn: CniNode) -> set[str]:
    return {r["external_ids"]["container_id"] for r in cn.our_ports()}


def veths(cn: CniNode) -> set[str]:
    return {ln["ifname"] for ln in cn.our_veths()}


def wait_gone(cn: CniNode, name: str) -> None:
    deadline = time.monotonic() + 10  # the kernel destroys a deleted netns (and its veths) async
    while name in veths(cn) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert name not in veths(cn)


def test_reconcile_frees_what_a_crashed_node_left_and_nothing_else(cn: CniNode, pods: Pods) -> None:
    alive, _ = pods.add("alive")
    missed, missed_ns = pods.add("missed")
    # 1. A DEL that never came: the runtime removed the netns, the kernel took the veth pair.
    missed_ns.delete()
    wait_gone(cn, host_ifname(missed, "eth0"))
    # 2. An ADD killed between the veth and the port: a veth with our alias, its peer in a live netns.
    crashed_ns = netbed.make_netns("crash")
    pods.netns.append(crashed_ns)
    crashed = netbed.container_id("crash")
    host = host_ifname(crashed, "eth0")
    cn.node.exec("ip", "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", crashed_ns.name)
    cn.node.exec("ip", "link", "set", host, "alias", f"ovs-underlay {crashed} eth0")
    # 3. The IPAM plugin's lease under another main plugin (no port, no veth of ours): its netns is gone.
    bridged_ns = netbed.make_netns("bridged")
    bridged = netbed.container_id("bridged")
    with IpamClient(cn.ipamd.socket) as c:
        c.allocate(network=pods.net, pool=parse_ipam(pods.conf["ipam"]).pool, container_id=bridged,
                   ifname="net1", netns=bridged_ns.path)
    bridged_ns.delete()
    # 4. Someone else's port and link on the node: never ours to judge.
    cn.node.exec("ip", "link", "add", "other0", "type", "veth", "peer", "name", "other1")
    cn.node.vsctl("add-port", cn.bridge, "other0", "--", "set", "Interface", "other0",
                  "external_ids:container_id=" + missed, "external_ids:netns=/run/netns/none")
    assert leased(cn) == {alive, missed, bridged}
    assert ports(cn) == {alive, missed}

    dry = cn.reconcile("--dry-run", "--grace-seconds", "0")
    done = {(a["step"], a["containerID"]) for a in dry["actions"] if a["outcome"] == "would"}
    assert dry["dryRun"] and done == {("port", missed), ("lease", missed), ("veth", crashed), ("lease", bridged)}
    assert leased(cn) == {alive, missed, bridged} and ports(cn) == {alive, missed}  # nothing changed
    assert host in veths(cn)

    # With the default grace (300 s): the dead port goes (no grace for a port whose netns and veth
    # are gone), the leases are too young and the veth was first seen portless just now.
    early = cn.reconcile()
    got = {(a["step"], a["containerID"], a["outcome"]) for a in early["actions"]}
    assert got == {("port", missed, "done"), ("lease", missed, "deferred"), ("veth", crashed, "deferred"),
                   ("lease", bridged, "deferred")}, early
    assert leased(cn) == {alive, missed, bridged}

    res = cn.reconcile("--grace-seconds", "0")
    got = {(a["step"], a["containerID"], a["outcome"]) for a in res["actions"]}
    assert got == {("lease", missed, "done"), ("veth", crashed, "done"), ("lease", bridged, "done")}, res
    assert leased(cn) == {alive}
    assert ports(cn) == {alive}
    assert host not in veths(cn) and host_ifname(alive, "eth0") in veths(cn)
    assert crashed_ns.exec("ip", "link", "show", "eth0", check=False).returncode != 0  # the pair went
    assert "other0" in cn.bridge_ports() and cn.node.link("other0") is not None
    # one log line per action, with its metric's labels
    log = Path(cn.ipamd.log_path).read_text()
    assert f"step=lease outcome=done target={pods.net}" in log and f"container_id={bridged}" in log
    # the next pass has nothing left to do
    assert [a for a in cn.reconcile("--grace-seconds", "0")["actions"] if a["outcome"] != "kept"] == []


def test_a_live_pod_that_lost_its_port_keeps_its_veth_and_lease(cn: CniNode, pods: Pods) -> None:
    cid, ns = pods.add("lost")
    port = host_ifname(cid, "eth0")
    cn.node.vsctl("del-port", port)  # an OVS database reset, for this one port
    res = cn.reconcile("--grace-seconds", "0")
    assert [(a["step"], a["outcome"]) for a in res["actions"]] == [("veth", "kept")]
    assert cid in leased(cn) and port in veths(cn)
    assert ns.exec("ip", "link", "show", "eth0", check=False).returncode == 0


def test_the_periodic_pass_waits_for_the_grace(tmp_path: Path) -> None:
    cn = make_cni_node("rp", tmp_path / "node", ipamd_args=("--reconcile-interval", "1", "--reconcile-grace", "4"))
    try:
        pods = Pods(cn, f"per{netbed.TOKEN}")
        try:
            cid, ns = pods.add("per")
            t_add = time.monotonic()
            ns.delete()
            deadline = t_add + 20
            while cid in leased(cn) and time.monotonic() < deadline:
                time.sleep(0.25)
            held = time.monotonic() - t_add
            # freed by a periodic pass (no `reconcile` call here), and not before the grace
            assert cid not in leased(cn) and held >= 4, held
            assert ports(cn) == set() and veths(cn) == set()
        finally:
            pods.cleanup()
    finally:
        cn.destroy()
