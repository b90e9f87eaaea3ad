"""ovs-underlay against a real OVN: ovn-controller binds our ports, managed logical switch ports,
ovn-kubernetes' localnet and layer2 NADs, with and without OVN on the node.

The bed (testbed/ovnbed.py, testbed/nodebed.py): an OVN central (NB, SB, ovn-northd) on unix sockets
plus an ssl: NB listener; a node "o" made of a netns with its own OVS and ovn-controller (br-int
netdev, geneve to the node's address); the node's eth2 is a trunk into `br-phys`, mapped as this
run's physical network, and leads to a ToR whose VLAN 100 router holds 192.168.100.1. The plugin
runs inside the node's netns (`ip netns exec`), as it runs where its OVS runs; pods are netns
joined to the node by the plugin's veth. Oracles: ovn-nbctl / ovn-sbctl, the node's ovs-vsctl,
ip, ping and tcpdump, never our own code.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plugin_helpers as ph
import pytest
import yaml

from testbed import netbed, nodebed, ovnbed

EXAMPLES = Path(__file__).resolve().parents[2] / "conf-examples"
pytestmark = pytest.mark.timeout(180)


@dataclass
class Bed:
    central: ovnbed.Central
    tor: nodebed.Tor
    node: nodebed.Node  # "o": the chassis most tests use; its eth2 trunks into br-phys
    chassis: ovnbed.Chassis
    node2: nodebed.Node  # "p": a second chassis, for a logical switch that spans nodes
    chassis2: ovnbed.Chassis
    physnet: str
    uplink_tor: str  # the ToR-side port of node o's eth2 (host netns): where tags are seen


@pytest.fixture(scope="module")
def bed() -> Iterator[Bed]:
    cleanup: list[Callable[[], None]] = []
    try:
        central = ovnbed.start_central(tls=True)
        cleanup.append(central.destroy)
        tor = nodebed.make_tor(vlans={100: ["192.168.100.1/24"]})
        cleanup.append(tor.destroy)
        physnet = f"physnet{netbed.TOKEN}"
        node, chassis = ovnbed.make_ovn_node(central, tor, "o", {physnet: "br-phys"})
        cleanup += [node.destroy, chassis.destroy]
        up = tor.plug(node, "eth2", addresses=[], gateways=[])
        node.vsctl("add-br", "br-phys", "--", "set", "Bridge", "br-phys", "datapath_type=netdev",
                   "--", "add-port", "br-phys", "eth2")
        node2, chassis2 = ovnbed.make_ovn_node(central, tor, "p")
        cleanup += [node2.destroy, chassis2.destroy]
        yield Bed(central, tor, node, chassis, node2, chassis2, physnet, up.tor_port)
    finally:
        for fn in reversed(cleanup):
            fn()


@dataclass
class Pods:
    """Pods on a node: each a netns attached by the plugin run inside the node's netns. DELs and
    removes everything at teardown, and removes the logical switches the test names."""

    node: nodebed.Node
    env: dict[str, str]
    made: list[tuple[ph.Attachment, netbed.Netns]] = field(default_factory=list)
    switches: list[str] = field(default_factory=list)

    def new(self, conf: dict[str, Any], role: str = "c", node: nodebed.Node | None = None,
            **kw: Any) -> ph.Attachment:
        """An attachment of `conf` (plus the node's OVSDB socket) for a new pod netns on `node`
        (default: the bed's node)."""
        node = node or self.node
        ns = netbed.make_netns("pod")
        conf = {**conf, "ovsdbSocket": node.ovsdb}
        a = ph.Attachment(conf, netbed.container_id(role), ns.path, **kw)
        a.run_kw = {"prefix": ("ip", "netns", "exec", node.ns), "extra_env": self.env}
        self.made.append((a, ns))
        return a

    def ns(self, a: ph.Attachment) -> str:
        return next(ns.name for x, ns in self.made if x is a)

    def cleanup(self, central: ovnbed.Central | None) -> None:
        for a, ns in reversed(self.made):
            if not a.deleted:
                a.delete()
            ns.delete()
        for sw in self.switches:
            if central is not None:
                central.delete_switch(sw)


def node_file(tmp_path: Path, central: ovnbed.Central | None, ssl: bool = True) -> dict[str, str]:
    """The env that points the plugin at a node OVN settings file (absent when `central` is None)."""
    path = tmp_path / "ovn.json"
    if central is not None:
        assert central.tls is not None
        data = {"ovnNorthbound": central.nb_ssl, "ovnNbPrivateKey": central.tls.private_key,
                "ovnNbCertificate": central.tls.certificate, "ovnNbCaCert": central.tls.ca_cert} \
            if ssl else {"ovnNorthbound": central.nb}
        path.write_text(json.dumps(data))
    return {"OVS_UNDERLAY_OVN_CONFIG": str(path)}


@pytest.fixture
def pods(bed: Bed, tmp_path: Path) -> Iterator[Pods]:
    p = Pods(bed.node, node_file(tmp_path, bed.central))
    yield p
    p.cleanup(bed.central)


def nad_config(example: str, **subst: Any) -> dict[str, Any]:
    doc = yaml.safe_load((EXAMPLES / example).read_text())
    conf = dict(json.loads(doc["spec"]["config"]))
    conf.update(subst)
    return conf


def managed(bed: Bed, ipamd: netbed.Ipamd, switch: str, subnet: str = "10.77.0.0/24", **extra: Any) -> dict[str, Any]:
    """Our own spelling: logicalSwitch + ovnNorthbound in the network config."""
    return {"cniVersion": "1.1.0", "name": f"l2{netbed.TOKEN}", "type": "ovs-underlay", "logicalSwitch": switch,
            "ovnNorthbound": bed.central.nb, "ipam": {"type": "ovs-underlay-ipam", "daemonSocket": ipamd.socket,
                                                      "subnets": [{"subnet": subnet}]}, **extra}


def pod_ip(result: dict[str, Any]) -> str:
    return str(result["ips"][0]["address"].split("/")[0])


def iface_ids(node: nodebed.Node, host: str) -> dict[str, str]:
    rows = node.ovs_rows("Interface", "external_ids", where=[f"name={host}"])
    return dict(rows[0]["external_ids"]) if rows else {}


def ours_left(bed: Bed, node: nodebed.Node, a: ph.Attachment, ns: str) -> list[str]:
    left = []
    if node.ovs_rows("Interface", "name", where=[f"external_ids:container_id={a.container_id}"]):
        left.append("OVS interface")
    if node.link(a.host) is not None:
        left.append(f"veth {a.host}")
    if netbed.link(a.ifname, ns=ns) is not None:
        left.append(f"pod {a.ifname}")
    if bed.central.nb_rows("Logical_Switch_Port", "name", where=(f"external_ids:container_id={a.container_id}",)):
        left.append("logical switch port")
    return left


# ---------------------------------------------------------------------------------------------
# bind: ovnPort names an LSP that someone else made


def test_bind_waits_for_ovn_controller(bed: Bed, pods: Pods) -> None:
    sw, lsp, mac = netbed.uniq("ls", 40), f"t{netbed.TOKEN}-vm1", "0a:58:0a:0b:00:0a"
    pods.switches.append(sw)
    bed.central.nbctl("ls-add", sw, "--", "lsp-add", sw, lsp, "--", "lsp-set-addresses", lsp, f"{mac} 10.11.0.10")
    conf = {"cniVersion": "1.0.0", "name": f"bind{netbed.TOKEN}", "type": "ovs-underlay", "ovnPort": lsp,
            "runtimeConfig": {"mac": mac},
            "ipam": {"type": "static", "addresses": [{"address": "10.11.0.10/24"}]}}
    a = pods.new(conf)
    # ovn-controller down: ADD must wait for it, not return with an unbound port.
    bed.chassis.stop()
    try:  # the module's bed: ovn-controller runs again whatever happens here
        proc = subprocess.Popen(["ip", "netns", "exec", bed.node.ns, ph.PYTHON, "-m", "cni"], cwd=ph.ROOT,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**ph.os.environ, **pods.env, "CNI_COMMAND": "ADD",
                                     "CNI_CONTAINERID": a.container_id, "CNI_NETNS": a.netns, "CNI_IFNAME": "eth0",
                                     "CNI_PATH": ph.CNI_PATH, "OVS_UNDERLAY_LOG_FILE": ph.LOG_FILE})
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(a.conf).encode())
        proc.stdin.close()
        time.sleep(1.5)
        assert proc.poll() is None, "ADD returned before ovn-controller bound the port"
        assert iface_ids(bed.node, a.host).get("iface-id") == lsp  # set with the port itself
    finally:
        bed.chassis.start()
    proc.wait(30)
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    assert proc.returncode == 0, (out, err)
    a.result = json.loads(out)
    ids = iface_ids(bed.node, a.host)
    assert ids["iface-id"] == lsp and ids.get("ovn-installed") == "true"
    assert bed.central.binding_chassis(lsp) == bed.chassis.name
    port = bed.node.ovs_rows("Port", "tag", "trunks", where=[f"name={a.host}"])[0]
    assert port["tag"] == [] and port["trunks"] == []  # OVN tags at the localnet port, never here
    rc, out2, err2 = a.run("CHECK", {**a.conf, "prevResult": a.result})
    assert rc == 0, (out2, err2)
    assert a.delete()[0] == 0
    assert bed.central.lsp(lsp) is not None, "DEL must not remove a logical port it does not own"
    assert not ours_left(bed, bed.node, a, pods.ns(a))


def test_bind_to_missing_lsp_fails_within_the_bound(bed: Bed, pods: Pods, ipamd: netbed.Ipamd) -> None:
    lsp = f"t{netbed.TOKEN}-nosuchport"
    conf = {"cniVersion": "1.1.0", "name": f"miss{netbed.TOKEN}", "type": "ovs-underlay", "ovnPort": lsp,
            "ovnInstalledTimeoutMs": 1500,
            "ipam": {"type": "ovs-underlay-ipam", "daemonSocket": ipamd.socket, "subnets": "10.12.0.0/24"}}
    a = pods.new(conf)
    t0 = time.monotonic()
    rc, out, err = a.run("ADD")
    elapsed = time.monotonic() - t0
    assert rc != 0 and out["code"] == 11 and lsp in out["msg"] and "1500 ms" in out["msg"], (out, err)
    assert 1.4 < elapsed < 6, elapsed
    assert not ours_left(bed, bed.node, a, pods.ns(a))
    assert not ipamd.leases()


# ---------------------------------------------------------------------------------------------
# managed: ADD creates the logical switch port


def test_managed_lsp_rows_check_del(bed: Bed, pods: Pods, ipamd: netbed.Ipamd) -> None:
    sw = netbed.uniq("ls", 40)
    pods.switches.append(sw)
    conf = managed(bed, ipamd, sw)
    a = pods.new(conf)
    res = a.add()
    name, mac, ip = f"{a.container_id}_eth0", res["interfaces"][1]["mac"], pod_ip(res)
    lsp = bed.central.lsp(name)
    assert lsp is not None and bed.central.switch_ports(sw) == [name]
    assert lsp["addresses"] == f"{mac} {ip}" and lsp["port_security"] == f"{mac} {ip}"
    assert lsp["options"] == {"requested-chassis": bed.chassis.name}
    ext = lsp["external_ids"]
    assert (ext["owner"], ext["container_id"], ext["ifname"], ext["network"], ext["node"]) == \
        ("ovs-underlay", a.container_id, "eth0", conf["name"], bed.chassis.name)
    sw_row = bed.central.nb_rows("Logical_Switch", "external_ids", where=(f"name={sw}",))[0]
    assert sw_row["external_ids"]["owner"] == "ovs-underlay"
    ids = iface_ids(bed.node, a.host)
    assert ids["iface-id"] == name and ids["ovn-installed"] == "true"
    assert bed.central.binding_chassis(name) == bed.chassis.name
    rc, out, err = a.run("CHECK", {**a.conf, "prevResult": res})
    assert rc == 0, (out, err)
    assert a.delete()[0] == 0
    assert bed.central.lsp(name) is None and not ours_left(bed, bed.node, a, pods.ns(a))
    assert not ipamd.leases()
    assert a.delete()[0] == 0  # idempotent


def test_managed_add_rolls_back_when_ovn_controller_never_installs(bed: Bed, pods: Pods,
                                                                   ipamd: netbed.Ipamd) -> None:
    sw = netbed.uniq("ls", 40)
    pods.switches.append(sw)
    a = pods.new(managed(bed, ipamd, sw, ovnInstalledTimeoutMs=1000))
    bed.chassis.stop()
    try:
        rc, out, err = a.run("ADD")
    finally:
        bed.chassis.start()
    assert rc != 0 and out["code"] == 11 and f"{a.container_id}_eth0" in out["msg"], (out, err)
    assert not ours_left(bed, bed.node, a, pods.ns(a))
    assert not ipamd.leases(), "the lease must be released on rollback"


def test_layer2_nad_spans_two_nodes_with_port_security(bed: Bed, pods: Pods, ipamd: netbed.Ipamd) -> None:
    """conf-examples/91: an unchanged ovn-kubernetes layer2 NAD; the node file names the NB
    (ssl:, with the client's certificate). Pod a on node o, pod b on node p: one logical switch,
    geneve between the chassis."""
    name = f"blue{netbed.TOKEN}"
    pods.switches.append(name)
    conf = nad_config("91-nad-ovnk-layer2.yaml", name=name, daemonSocket=ipamd.socket)
    a, b = pods.new(conf, "a"), pods.new(conf, "b", node=bed.node2)
    ra, rb = a.add(), b.add()
    ip_a, ip_b = pod_ip(ra), pod_ip(rb)
    assert ip_a.startswith("10.100.200.") and int(ip_a.rsplit(".", 1)[1]) >= 8  # excludeSubnets .0/29
    assert netbed.link("eth0", ns=pods.ns(a))["mtu"] == 1400
    assert set(bed.central.switch_ports(name)) == {f"{a.container_id}_eth0", f"{b.container_id}_eth0"}
    assert bed.central.lsp(f"{a.container_id}_eth0")["external_ids"]["nad"] == "default/tenantblue"
    assert bed.central.binding_chassis(f"{b.container_id}_eth0") == bed.chassis2.name
    assert bed.central.lsp(f"{b.container_id}_eth0")["options"] == {"requested-chassis": bed.chassis2.name}
    assert netbed.ping_retry(pods.ns(a), ip_b, attempts=10)
    # Port security: a spoofed source MAC (and then a spoofed source IP) gets nothing through.
    real_mac = ra["interfaces"][1]["mac"]
    netbed.sh("ip", "link", "set", "eth0", "address", "0a:00:00:00:0f:0f", ns=pods.ns(a))
    netbed.sh("ip", "neigh", "flush", "all", ns=pods.ns(a))
    assert not netbed.ping(pods.ns(a), ip_b, count=2)
    netbed.sh("ip", "link", "set", "eth0", "address", real_mac, ns=pods.ns(a))
    assert netbed.ping_retry(pods.ns(a), ip_b)
    netbed.sh("ip", "addr", "add", "10.100.200.250/24", "dev", "eth0", ns=pods.ns(a))
    spoof = netbed.sh("ping", "-c", "2", "-W", "1", "-I", "10.100.200.250", ip_b, ns=pods.ns(a), check=False)
    assert spoof.returncode != 0
    assert a.delete()[0] == 0
    assert bed.central.switch_ports(name) == [f"{b.container_id}_eth0"]


# ---------------------------------------------------------------------------------------------
# localnet


def _tor_sees_vlan(bed: Bed, tor_port: str, ns: str) -> list[str]:
    with netbed.capture(tor_port, "vlan 100 and icmp") as lines:
        assert netbed.ping_retry(ns, "192.168.100.1")
    return lines


def test_localnet_nad_with_ovn_reaches_the_tor_gateway(bed: Bed, pods: Pods, ipamd: netbed.Ipamd) -> None:
    """conf-examples/90 on a chassis: logical switch + localnet port (network_name, tag 100),
    ovn-controller patches br-int to br-phys by the bridge mapping, the uplink carries tag 100."""
    name = f"ln{netbed.TOKEN}"
    pods.switches.append(name)
    conf = nad_config("90-nad-ovnk-localnet.yaml", name=name, physicalNetworkName=bed.physnet,
                      daemonSocket=ipamd.socket)
    a = pods.new(conf)
    res = a.add()
    ip = pod_ip(res)
    assert ip.startswith("192.168.100.") and ip != "192.168.100.1"
    ln = bed.central.lsp(f"ln-{name}")
    assert ln is not None and ln["type"] == "localnet" and ln["tag"] == 100
    assert ln["options"] == {"network_name": bed.physnet} and ln["addresses"] == "unknown"
    assert set(bed.central.switch_ports(name)) == {f"ln-{name}", f"{a.container_id}_eth0"}
    port = bed.node.ovs_rows("Port", "tag", where=[f"name={a.host}"])[0]
    assert port["tag"] == [] and a.host in bed.node.vsctl("list-ports", "br-int").stdout.split()
    lines = _tor_sees_vlan(bed, bed.uplink_tor, pods.ns(a))
    assert any("vlan 100" in ln and ip in ln for ln in lines), lines


def test_localnet_nad_without_ovn_attaches_to_the_mapped_bridge(bed: Bed, tmp_path: Path,
                                                                 ipamd: netbed.Ipamd) -> None:
    """The same NAD on a node with no OVN (no northbound in its settings, no ovn-controller):
    an access port on VLAN 100 of the bridge ovn-bridge-mappings names, same gateway."""
    node = nodebed.make_node("d")
    p = Pods(node, node_file(tmp_path, None))
    try:
        up = bed.tor.plug(node, "eth2", addresses=[], gateways=[])
        node.vsctl("add-br", "br-ul", "--", "set", "Bridge", "br-ul", "datapath_type=netdev",
                   "--", "add-port", "br-ul", "eth2",
                   "--", "set", "Open_vSwitch", ".", f"external_ids:ovn-bridge-mappings={bed.physnet}:br-ul")
        conf = nad_config("90-nad-ovnk-localnet.yaml", name=f"ln{netbed.TOKEN}", physicalNetworkName=bed.physnet,
                          daemonSocket=ipamd.socket)
        a = p.new(conf)
        res = a.add()
        port = node.ovs_rows("Port", "tag", "vlan_mode", where=[f"name={a.host}"])[0]
        assert (port["tag"], port["vlan_mode"]) == (100, "access")
        assert a.host in node.vsctl("list-ports", "br-ul").stdout.split()
        assert "iface-id" not in iface_ids(node, a.host)
        lines = _tor_sees_vlan(bed, up.tor_port, p.ns(a))
        assert any("vlan 100" in ln and pod_ip(res) in ln for ln in lines), lines
        assert a.delete()[0] == 0
        assert not node.ovs_rows("Port", "name", where=[f"name={a.host}"])
    finally:
        p.cleanup(None)
        node.destroy()


# ---------------------------------------------------------------------------------------------
# GC and OVN restarts


def test_gc_removes_our_stale_lsp_and_leaves_foreign_ones(bed: Bed, pods: Pods, ipamd: netbed.Ipamd) -> None:
    sw = netbed.uniq("ls", 40)
    pods.switches.append(sw)
    conf = managed(bed, ipamd, sw)
    a, b = pods.new(conf, "a"), pods.new(conf, "b")
    a.add()
    b.add()
    foreign, other_node = f"t{netbed.TOKEN}-foreign", f"t{netbed.TOKEN}-othernode"
    bed.central.nbctl("lsp-add", sw, foreign, "--", "lsp-add", sw, other_node, "--", "set", "Logical_Switch_Port",
                      other_node, "external_ids:owner=ovs-underlay", "external_ids:node=elsewhere",
                      f"external_ids:network={conf['name']}", "external_ids:container_id=x", "external_ids:ifname=eth0")
    gc = {**a.conf, "cni.dev/valid-attachments": [{"containerID": b.container_id, "ifname": "eth0"}]}
    rc, out, err = ph.run_plugin("GC", gc, **a.run_kw)
    assert rc == 0, (out, err)
    assert set(bed.central.switch_ports(sw)) == {f"{b.container_id}_eth0", foreign, other_node}
    assert not ours_left(bed, bed.node, a, pods.ns(a))  # its OVS port and veth went with the LSP
    a.deleted = True
    assert iface_ids(bed.node, b.host).get("ovn-installed") == "true"


def test_ovn_restart_keeps_ports_bound_and_traffic_resumes(bed: Bed, pods: Pods, ipamd: netbed.Ipamd) -> None:
    sw = netbed.uniq("ls", 40)
    pods.switches.append(sw)
    conf = managed(bed, ipamd, sw)
    a, b = pods.new(conf, "a"), pods.new(conf, "b", node=bed.node2)
    a.add()
    ip_b = pod_ip(b.add())
    lsp_a = f"{a.container_id}_eth0"
    assert netbed.ping_retry(pods.ns(a), ip_b)
    bed.central.stop_northd()
    try:  # the module's bed: northd runs again whatever happens here
        assert netbed.ping(pods.ns(a), ip_b), "installed flows do not need northd"
    finally:
        bed.central.start_northd()
    assert netbed.ping_retry(pods.ns(a), ip_b, attempts=10)
    bed.chassis.stop(signal.SIGTERM)
    bed.chassis.start()
    assert ph.wait_for(lambda: bed.central.binding_chassis(lsp_a) == bed.chassis.name, timeout=15)
    assert ph.wait_for(lambda: iface_ids(bed.node, a.host).get("ovn-installed") == "true", timeout=15)
    assert netbed.ping_retry(pods.ns(a), ip_b, attempts=10)


# ---------------------------------------------------------------------------------------------
# The shipped bind example, by a real runtime and the frozen binaries


def test_example_30_bind_by_cnitool_frozen(bed: Bed, bundle: Path, cnitool_bin: Path, frozen_ipamd: netbed.Ipamd,
                                           tmp_path: Path) -> None:
    """conf-examples/30-br-int-ovn.conf, unchanged but for the node's OVSDB socket and the test
    ipamd: cnitool runs the frozen plugin inside the node; the LSP `default_vm-1` was made by
    "the CMS" (here: ovn-nbctl) on a switch whose OVN router port is the gateway 10.10.0.1, so
    ipamd's gateway check is answered by OVN's logical router."""
    import e2e_helpers as e2e

    sw, lr = netbed.uniq("ls", 40), netbed.uniq("lr", 40)
    nb = bed.central.nbctl
    nb("ls-add", sw, "--", "lsp-add", sw, "default_vm-1", "--", "lsp-set-addresses", "default_vm-1", "unknown")
    nb("lr-add", lr, "--", "lrp-add", lr, f"{lr}-p", "0a:00:00:0a:0a:01", "10.10.0.1/24",
       "--", "lsp-add", sw, f"{sw}-r", "--", "lsp-set-type", f"{sw}-r", "router",
       "--", "lsp-set-addresses", f"{sw}-r", "router", "--", "lsp-set-options", f"{sw}-r", f"router-port={lr}-p")
    conf = e2e.adapt(e2e.load_example("30-br-int-ovn.conf"), daemon_socket=frozen_ipamd.socket)
    conf["ovsdbSocket"] = bed.node.ovsdb
    tool = e2e.Cnitool(tmp_path / "net.d", [bundle, e2e.REFERENCE_PLUGINS], binary=cnitool_bin,
                       prefix=("ip", "netns", "exec", bed.node.ns),
                       env={"OVS_UNDERLAY_LOG_FILE": str(netbed.plugin_log(tmp_path.name)),
                            **node_file(tmp_path, None)})
    e2e.write_conf(tool.netconfpath, conf)
    pod, cid = netbed.make_netns("pod"), netbed.container_id("e")
    try:
        res = tool.add(conf["name"], pod.path, container_id=cid).ok().json()
        ip = pod_ip(res)
        assert res["interfaces"][1]["mac"] == "0a:58:" + ":".join(f"{int(b):02x}" for b in ip.split("."))
        host = ph.host_ifname(cid, "eth0")
        assert iface_ids(bed.node, host)["iface-id"] == "default_vm-1"
        assert iface_ids(bed.node, host)["ovn-installed"] == "true"
        assert bed.central.binding_chassis("default_vm-1") == bed.chassis.name
        assert "gateway 10.10.0.1 reachable" in netbed.plugin_log(tmp_path.name).read_text()
        assert netbed.ping_retry(pod.name, "10.10.0.1")
        tool.check(conf["name"], pod.path, container_id=cid).ok()
        tool.delete(conf["name"], pod.path, container_id=cid).ok()
        assert not bed.node.ovs_rows("Interface", "name", where=[f"external_ids:container_id={cid}"])
        assert bed.central.lsp("default_vm-1") is not None  # the CMS's port: never ours to delete
        assert not frozen_ipamd.leases()
    finally:
        tool.delete(conf["name"], pod.path, container_id=cid)
        e2e.forget_cached_results(cid)
        pod.delete()
        nb("--if-exists", "lr-del", lr)
        bed.central.delete_switch(sw)
