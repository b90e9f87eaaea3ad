"""Every file in conf-examples/ parses and carries what its consumer needs.

CNI configs: valid JSON, the keys libcni requires, plugin types we or the reference plugins
provide, and every IPAM section (or ovn-kubernetes top-level subnets) accepted by the same
parser the plugin and ipamd use (`core.spec.parse_ipam`); the NetworkAttachmentDefinition in
the ovn-kubernetes spelling is checked by hand. The Kubernetes manifests (DaemonSet, ConfigMap,
NADs) under conf-examples/kubernetes/ have their own tests: test_kubernetes_examples.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.spec import IpamConf, parse_ipam

EXAMPLES = Path(__file__).resolve().parents[2] / "conf-examples"
OURS = {"ovs-underlay"}
OUR_IPAM = "ovs-underlay-ipam"
REFERENCE = {"bridge", "macvlan", "ipvlan", "tuning", "portmap", "bandwidth", "host-device"}
CNI_FILES = sorted(p.name for p in EXAMPLES.glob("*.conf*"))
EXPECTED = {
    "10-underlay-vlan.conflist", "20-trunk.conf", "30-br-int-ovn.conf", "40-dual-stack.conflist",
    "50-static-ip-mac.conflist", "60-nad-vlan100.yaml", "70-bridge-ipam.conflist",
    "71-macvlan-ipam.conf", "80-chain-tuning-portmap-bandwidth.conflist", "kubernetes",
    "90-nad-ovnk-localnet.yaml", "91-nad-ovnk-layer2.yaml", "ovn.json",
    "92-provider-net1.conflist", "provider-networks.yaml", "ovs-underlay-node.service",
}
SUPPORTED_VERSIONS = {"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}


def load_cni(name: str) -> dict[str, Any]:
    data = json.loads((EXAMPLES / name).read_text())
    assert isinstance(data, dict), name
    return data


def plugins_of(conf: dict[str, Any]) -> list[dict[str, Any]]:
    """A .conflist's plugins, or a single .conf as a one-plugin list (libcni ConfListFromConf)."""
    if "plugins" in conf:
        assert isinstance(conf["plugins"], list) and conf["plugins"], "empty plugins list"
        return list(conf["plugins"])
    return [conf]


def check_network(conf: dict[str, Any], where: str) -> list[IpamConf]:
    """libcni's required keys plus our plugin's; returns the parsed IPAM sections."""
    assert isinstance(conf.get("name"), str) and conf["name"], f"{where}: missing name"
    assert conf.get("cniVersion") in SUPPORTED_VERSIONS, f"{where}: cniVersion {conf.get('cniVersion')!r}"
    for v in conf.get("cniVersions", []):
        assert v in SUPPORTED_VERSIONS, f"{where}: cniVersions has {v!r}"
    ipams: list[IpamConf] = []
    for i, p in enumerate(plugins_of(conf)):
        w = f"{where}.plugins[{i}]"
        assert p.get("type") in OURS | REFERENCE, f"{w}: unknown plugin type {p.get('type')!r}"
        # Examples must run on any bridge, userspace (netdev) or kernel: datapathType is an
        # assertion a user adds on purpose, never part of a copy-and-paste example.
        assert "datapathType" not in p, f"{w}: leave datapathType out (default: accept the bridge as it is)"
        for cap in p.get("capabilities", {}):
            assert cap in {"ips", "mac", "portMappings", "bandwidth", "ipRanges"}, f"{w}: capability {cap}"
        if p["type"] == "ovs-underlay":
            assert p.get("bridge") or p.get("ovnPort") or p.get("topology") or p.get("provider"), \
                f"{w}: needs bridge (or ovnPort for br-int, an ovn-kubernetes topology, or provider)"
            if "vlan" in p:
                assert isinstance(p["vlan"], int) and 0 <= p["vlan"] <= 4094, f"{w}: vlan"
            for t in p.get("trunk", []):
                ids = [t["id"]] if "id" in t else [t["minID"], t["maxID"]]
                assert all(isinstance(x, int) and 0 <= x <= 4094 for x in ids), f"{w}: trunk {t}"
                assert ids == sorted(ids), f"{w}: trunk range {t}"
            assert not ("vlan" in p and "trunk" in p), f"{w}: vlan and trunk are exclusive"
            if "ipam" not in p and "subnets" in p:
                ipams.append(parse_ipam(None, top_level=p))
        if "ipam" in p:
            assert p["ipam"].get("type") == OUR_IPAM, f"{w}: ipam type {p['ipam'].get('type')!r}"
            ipams.append(parse_ipam(p["ipam"]))
    return ipams


def test_the_expected_examples_exist() -> None:
    present = {p.name for p in EXAMPLES.iterdir()}
    assert present >= EXPECTED, f"missing: {sorted(EXPECTED - present)}"


@pytest.mark.parametrize("name", [n for n in CNI_FILES if not n.endswith(".yaml")])
def test_cni_config_parses(name: str) -> None:
    conf = load_cni(name)
    assert name.endswith(".conflist") == ("plugins" in conf), f"{name}: .conflist <=> plugins list"
    check_network(conf, name)


def test_access_vlan_example_has_gateway_and_default_route() -> None:
    (ipam,) = check_network(load_cni("10-underlay-vlan.conflist"), "10")
    (subnet,) = ipam.pool.subnets
    assert str(subnet.gateway) == "192.168.100.1"
    assert [str(r.dst) for r in ipam.pool.routes] == ["0.0.0.0/0"]
    assert ipam.gateway_check and ipam.conflict_check
    assert ipam.daemon_socket == "/run/ovs-underlay/ipamd.sock"


def test_dual_stack_example_has_both_families() -> None:
    (ipam,) = check_network(load_cni("40-dual-stack.conflist"), "40")
    assert sorted(s.version for s in ipam.pool.subnets) == [4, 6]
    assert sorted(str(r.dst) for r in ipam.pool.routes) == ["0.0.0.0/0", "::/0"]


def test_static_example_declares_capabilities() -> None:
    (plugin,) = load_cni("50-static-ip-mac.conflist")["plugins"]
    assert plugin["capabilities"] == {"ips": True, "mac": True}


def test_trunk_example_is_a_trunk_without_ipam() -> None:
    conf = load_cni("20-trunk.conf")
    assert "vlan" not in conf and conf["trunk"] and "ipam" not in conf


def test_ovn_example_sets_ovn_port() -> None:
    conf = load_cni("30-br-int-ovn.conf")
    assert conf["bridge"] == "br-int" and conf["ovnPort"]
    (ipam,) = check_network(conf, "30")
    assert ipam.pool.mac_from_ip


def test_reference_plugin_examples_use_our_ipam_without_probes() -> None:
    for name, kind in (("70-bridge-ipam.conflist", "bridge"), ("71-macvlan-ipam.conf", "macvlan")):
        conf = load_cni(name)
        (plugin,) = plugins_of(conf)
        assert plugin["type"] == kind
        (ipam,) = check_network(conf, name)
        assert not ipam.gateway_check and not ipam.conflict_check, name


def test_chain_example_order() -> None:
    conf = load_cni("80-chain-tuning-portmap-bandwidth.conflist")
    assert [p["type"] for p in conf["plugins"]] == ["ovs-underlay", "tuning", "portmap", "bandwidth"]
    check_network(conf, "80")


def test_nad_is_a_multus_attachment_with_ovn_k_style_subnets() -> None:
    docs = list(yaml.safe_load_all((EXAMPLES / "60-nad-vlan100.yaml").read_text()))
    assert len(docs) == 1
    nad = docs[0]
    assert nad["apiVersion"] == "k8s.cni.cncf.io/v1"
    assert nad["kind"] == "NetworkAttachmentDefinition"
    assert set(nad) == {"apiVersion", "kind", "metadata", "spec"}
    assert nad["metadata"]["name"] and set(nad["spec"]) == {"config"}
    conf = json.loads(nad["spec"]["config"])
    assert conf["type"] == "ovs-underlay" and "ipam" not in conf
    assert isinstance(conf["subnets"], str) and isinstance(conf["excludeSubnets"], str)
    (ipam,) = check_network(conf, "60")
    (subnet,) = ipam.pool.subnets
    assert str(subnet.subnet) == "192.168.100.0/24"
    assert not subnet.allocatable(subnet.subnet[1])  # excluded 192.168.100.1/32
    assert not subnet.allocatable(subnet.subnet[245])  # inside excluded 192.168.100.240/28

def _nad_config(name: str) -> dict[str, Any]:
    (nad,) = list(yaml.safe_load_all((EXAMPLES / name).read_text()))
    assert (nad["apiVersion"], nad["kind"]) == ("k8s.cni.cncf.io/v1", "NetworkAttachmentDefinition")
    conf = json.loads(nad["spec"]["config"])
    assert conf["type"] == "ovn-k8s-cni-overlay" and conf["netAttachDefName"] == \
        f"{nad['metadata']['namespace']}/{nad['metadata']['name']}"
    return dict(conf)


def _parse(conf: dict[str, Any], node_nb: Any) -> Any:
    from cni.netconf import parse_netconf
    from cni.types import CmdArgs

    args = CmdArgs("ADD", "c1", "/run/netns/p", "net1", "", ("/opt/cni/bin",), b"", conf, conf["cniVersion"])
    return parse_netconf(args, node_nb=lambda: node_nb)


def test_ovnk_localnet_nad_works_with_and_without_ovn() -> None:
    """90: an unchanged ovn-kubernetes localnet NAD: managed (logical switch + localnet port on
    VLAN 100) on a node that names the NB, an access port on VLAN 100 of the mapped bridge
    on a node without OVN; tests/integration/test_ovn.py runs it both ways."""
    from core.ovnsettings import Northbound

    conf = _nad_config("90-nad-ovnk-localnet.yaml")
    (ipam,) = check_network({**conf, "type": "ovs-underlay"}, "90")
    assert all(s.gateway is None for s in ipam.pool.subnets)
    with_ovn = _parse(conf, Northbound("unix:/run/ovn/ovnnb_db.sock"))
    assert with_ovn.ovn.managed and (with_ovn.ovn.physical_network, with_ovn.ovn.localnet_vlan) == ("physnet1", 100)
    without = _parse(conf, None)
    assert without.ovn is None and (without.bridge_source, without.physical_network, without.vlan) == \
        ("bridge-mapping", "physnet1", 100)


def test_ovnk_layer2_nad_needs_ovn() -> None:
    from cni.errors import CniError
    from core.ovnsettings import Northbound

    conf = _nad_config("91-nad-ovnk-layer2.yaml")
    c = _parse(conf, Northbound("unix:/run/ovn/ovnnb_db.sock"))
    assert c.topology == "layer2" and c.ovn.managed and c.ovn.logical_switch == "tenantblue" and c.mtu == 1400
    with pytest.raises(CniError) as e:
        _parse(conf, None)
    assert e.value.code == 7 and "layer2 needs OVN" in e.value.msg


def test_node_ovn_settings_example() -> None:
    import os

    from core.ovnsettings import load_northbound

    path = EXAMPLES / "ovn.json"
    nb = load_northbound({"OVS_UNDERLAY_OVN_CONFIG": str(path)}, owner_uid=os.stat(path).st_uid)
    assert nb is not None and len(nb.remotes()) == 3 and all(r.startswith("ssl:") for r in nb.remotes())
    # the node's settings directory holds the TLS files too (warm workers read the node's files)
    assert all(f.startswith("/etc/ovs-underlay/") for f in (nb.private_key, nb.certificate, nb.ca_cert) if f)


def test_ipamd_etcd_example_loads() -> None:
    """conf-examples/ipamd-etcd.json: the cluster store, three TLS endpoints, the node's name
    defaulting to the hostname (started against a real etcd in test_ipamd_cluster.py)."""
    from ipamd.config import load

    cfg = load(str(EXAMPLES / "ipamd-etcd.json"), {})
    assert cfg.store == "etcd" and len(cfg.endpoints()) == 3
    assert all(e.startswith("https://") for e in cfg.endpoints())
    assert cfg.etcd_prefix == "/ovs-underlay" and cfg.node_name and cfg.block_size == 16
    assert {cfg.etcd_cacert, cfg.etcd_cert, cfg.etcd_key} <= {
        f"/etc/ovs-underlay-etcd/{n}" for n in ("ca.crt", "client.crt", "client.key")}


def test_etcd_client_secret_validates_against_the_kubernetes_schema() -> None:
    import kubernetes_validate

    docs = [d for d in yaml.safe_load_all((EXAMPLES / "etcd-client-secret.yaml").read_text()) if d]
    assert [d["kind"] for d in docs] == ["Secret"]
    assert set(docs[0]["stringData"]) == {"ca.crt", "client.crt", "client.key"}
    kubernetes_validate.validate(docs[0], "1.33.0", strict=True)
