"""The OVN keys and ovn-kubernetes' NAD spelling (cni/ovnconf.py via parse_netconf), and the
node's OVN settings file (cni/nodeconf.py). Every unsupported key or value is a clear 7."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from netaddr import IPRange

from cni.errors import CniError
from cni.netconf import IpamdBackend, NetConf, parse_netconf
from cni.ovnconf import logical_port_name
from cni.types import CmdArgs
from core.ovnsettings import Northbound, load_northbound
from core.spec import ConfigError

NB = Northbound("unix:/run/ovn/ovnnb_db.sock")


def parse(conf: dict[str, Any], node_nb: Northbound | None = None, cni_args: str = "") -> NetConf:
    full = {"cniVersion": "1.1.0", "name": "net1", "type": "ovs-underlay", **conf}
    a = CmdArgs("ADD", "c1", "/run/netns/p", "eth0", cni_args, ("/usr/lib/cni",), b"", full, "1.1.0")
    return parse_netconf(a, node_nb=lambda: node_nb)


def bad(conf: dict[str, Any], node_nb: Northbound | None = None) -> CniError:
    with pytest.raises(CniError) as e:
        parse(conf, node_nb)
    assert e.value.code == 7
    return e.value


OVNK_LOCALNET = {"type": "ovn-k8s-cni-overlay", "topology": "localnet", "netAttachDefName": "default/ln100",
                 "subnets": "192.168.100.0/24", "excludeSubnets": "192.168.100.1/32", "vlanID": 100,
                 "mtu": 1500, "physicalNetworkName": "physnet1"}


# ---------------------------------------------------------------------------------------------
# our own keys


def test_plain_networks_are_not_ovn() -> None:
    c = parse({"bridge": "br-ul", "vlan": 100})
    assert c.ovn is None and c.bridge_source == "config" and c.vlan == 100 and c.topology == ""


def test_bind_mode_ovn_port() -> None:
    c = parse({"ovnPort": "vm-1", "ovnInstalledTimeoutMs": 0})
    assert c.ovn is not None and c.ovn.logical_port == "vm-1" and not c.ovn.managed
    assert c.ovn.installed_timeout_ms == 0 and c.bridge_source == "ovn-bridge"  # the node's ovn-bridge
    c = parse({"ovnPort": "vm-1", "bridge": "br-int"})
    assert c.bridge == "br-int" and c.bridge_source == "config"  # named: must be the integration bridge


def test_managed_mode_from_config_and_from_the_node() -> None:
    c = parse({"logicalSwitch": "ls1", "ovnNorthbound": "tcp:10.0.0.1:6641,tcp:10.0.0.2:6641"})
    assert c.ovn is not None and c.ovn.managed and c.ovn.logical_switch == "ls1" and c.ovn.logical_port is None
    assert c.ovn.northbound is not None and c.ovn.northbound.remotes() == ("tcp:10.0.0.1:6641", "tcp:10.0.0.2:6641")
    assert c.ovn.port_security and c.ovn.installed_timeout_ms == 20_000
    c = parse({"logicalSwitch": "ls1", "portSecurity": False}, node_nb=NB)
    assert c.ovn is not None and c.ovn.northbound == NB and not c.ovn.port_security
    # the network config's endpoint wins over the node's
    c = parse({"logicalSwitch": "ls1", "ovnNorthbound": "unix:/tmp/nb.sock"}, node_nb=NB)
    assert c.ovn is not None and c.ovn.northbound == Northbound("unix:/tmp/nb.sock")


def test_tls_files_come_only_from_the_node_file() -> None:
    """A NAD author must not make root read files of their choosing as key material: the TLS
    files are node settings. An ssl: remote in a network config uses the node's files."""
    tls = {"ovnNbPrivateKey": "/k.pem", "ovnNbCertificate": "/c.pem", "ovnNbCaCert": "/ca.pem"}
    for key in tls:
        assert "node settings" in bad({"logicalSwitch": "ls1", "ovnNorthbound": "ssl:[fd00::1]:6641",
                                       key: tls[key]}).msg
    node = Northbound("ssl:10.0.0.9:6641", "/etc/k.pem", "/etc/c.pem", "/etc/ca.pem")
    c = parse({"logicalSwitch": "ls1", "ovnNorthbound": "ssl:[fd00::1]:6641"}, node_nb=node)
    assert c.ovn is not None
    assert c.ovn.northbound == Northbound("ssl:[fd00::1]:6641", "/etc/k.pem", "/etc/c.pem", "/etc/ca.pem")
    assert "this node has none" in bad({"logicalSwitch": "ls1", "ovnNorthbound": "ssl:1.2.3.4:6641"}).msg
    assert "this node has none" in bad({"logicalSwitch": "ls1", "ovnNorthbound": "ssl:1.2.3.4:6641"},
                                       node_nb=Northbound("tcp:1.2.3.4:6641")).msg


def test_derived_logical_port_name() -> None:
    assert logical_port_name("abc123", "net1") == "abc123_net1"


@pytest.mark.parametrize(("conf", "text"), [
    ({"ovnPort": "vm-1", "vlan": 100}, "OVN tags at the localnet port"),
    ({"ovnPort": "vm-1", "trunk": [{"id": 5}]}, "trunk"),
    ({"vlan": 100}, "OVN tags at the localnet port"),  # default bridge br-int
    ({"bridge": "br-int", "trunk": [{"id": 5}]}, "localnet port"),
    ({"logicalSwitch": "ls1"}, "needs the OVN northbound DB"),
    ({"ovnNorthbound": "unix:/x.sock"}, "without logicalSwitch"),
    ({"logicalSwitch": "ls1", "ovnNorthbound": "/x.sock"}, "not an OVSDB remote"),
    ({"logicalSwitch": "ls1", "ovnNorthbound": "unix:relative"}, "absolute"),
    ({"logicalSwitch": "ls1", "ovnNorthbound": "tcp:1.2.3.4"}, "not an OVSDB remote"),
    ({"logicalSwitch": "ls1", "ovnNorthbound": "tcp:1.2.3.4:6641", "ovnNbCaCert": "/ca"}, "node settings"),
    ({"ovnNbCaCert": "/ca"}, "node settings"),
    ({"ovnPort": ""}, "ovnPort"),
    ({"ovnPort": "bad name"}, "ovnPort"),
    ({"ovnPort": 7}, "ovnPort"),
    ({"logicalSwitch": "a\nb", "ovnNorthbound": "unix:/x"}, "logicalSwitch"),
    ({"ovnPort": "p", "ovnInstalledTimeoutMs": -1}, "ovnInstalledTimeoutMs"),
    ({"ovnPort": "p", "ovnInstalledTimeoutMs": True}, "ovnInstalledTimeoutMs"),
    ({"logicalSwitch": "ls", "ovnNorthbound": "unix:/x", "portSecurity": "yes"}, "portSecurity"),
    ({"vlanID": 100, "bridge": "br-ul"}, "needs topology"),
    ({"physicalNetworkName": "p", "bridge": "br-ul"}, "needs topology"),
])
def test_invalid_ovn_keys_are_7(conf: dict[str, Any], text: str) -> None:
    e = bad(conf)
    assert text in e.msg + e.details, e.msg


def test_pod_channels_never_set_the_logical_port() -> None:
    c = parse({"logicalSwitch": "ls1", "ovnNorthbound": "unix:/x", "args": {"cni": {"ovnPort": "other-pods-port"}}},
              cni_args="OvnPort=other")
    assert c.ovn is not None and c.ovn.logical_port is None


# ---------------------------------------------------------------------------------------------
# ovn-kubernetes spelling


def test_ovnk_localnet_with_ovn_is_managed_with_a_localnet_port() -> None:
    c = parse(OVNK_LOCALNET, node_nb=NB)
    assert c.topology == "localnet" and c.bridge_source == "ovn-bridge" and c.vlan is None
    assert c.ovn is not None and c.ovn.managed and c.ovn.logical_switch == "net1"
    assert (c.ovn.physical_network, c.ovn.localnet_vlan) == ("physnet1", 100)
    assert c.nad == "default/ln100" and c.mtu == 1500
    assert isinstance(c.ipam, IpamdBackend) and c.ipam.conf.pool.subnets[0].gateway is None


def test_ovnk_localnet_without_ovn_is_an_access_port_on_the_mapped_bridge() -> None:
    c = parse(OVNK_LOCALNET)
    assert c.ovn is None and c.bridge_source == "bridge-mapping" and c.physical_network == "physnet1"
    assert c.vlan == 100 and c.trunk == ()


def test_ovnk_reserved_subnets_keep_their_meaning() -> None:
    """ovn-kubernetes' reservedSubnets: never picked automatically, granted to a static request
    (our `reserved` class), in an ovn-kubernetes NAD as in our own configs."""
    c = parse({**OVNK_LOCALNET, "reservedSubnets": "192.168.100.8/30"})
    assert isinstance(c.ipam, IpamdBackend)
    (s,) = c.ipam.conf.pool.subnets
    assert s.reserved_ranges == (IPRange("192.168.100.8", "192.168.100.11"),)
    assert s.exclude == (IPRange("192.168.100.1", "192.168.100.1"),)


def test_ovnk_defaults() -> None:
    c = parse({"topology": "localnet"})  # physicalNetworkName defaults to the network name; untagged
    assert c.physical_network == "net1" and c.vlan is None
    c = parse({"topology": "localnet", "vlanID": 0})
    assert c.vlan is None
    c = parse({"topology": "layer2", "role": "secondary", "allowPersistentIPs": False,
               "logfile-maxsize": 100}, node_nb=NB)
    assert c.ovn is not None and c.ovn.managed and c.ovn.physical_network is None and c.topology == "layer2"
    c = parse({"topology": "layer2", "logicalSwitch": "blue", "ovnPort": "vm-7"}, node_nb=NB)
    assert c.ovn is not None and (c.ovn.logical_switch, c.ovn.logical_port) == ("blue", "vm-7")


def test_the_node_file_is_only_read_when_a_network_needs_it() -> None:
    def explode() -> Northbound | None:
        raise AssertionError("read the node file for a plain network")

    full = {"cniVersion": "1.1.0", "name": "n", "type": "ovs-underlay", "bridge": "br-ul", "vlan": 5}
    parse_netconf(CmdArgs("ADD", "c", "/p", "eth0", "", (), b"", full, "1.1.0"), node_nb=explode)
    full = {**full, "ovnPort": "x"}
    del full["vlan"]
    parse_netconf(CmdArgs("ADD", "c", "/p", "eth0", "", (), b"", full, "1.1.0"), node_nb=explode)


@pytest.mark.parametrize(("conf", "text"), [
    ({"type": "ovn-k8s-cni-overlay"}, "'layer3' is not supported"),
    ({"topology": "layer3"}, "'layer3' is not supported"),
    ({"topology": "vxlan"}, "not one of layer2, localnet"),
    ({"topology": "layer2"}, "layer2 needs OVN"),
    ({"topology": "layer2", "role": "primary"}, "secondary networks only"),
    ({"topology": "layer2", "joinSubnet": "100.65.0.0/16"}, "joinSubnet"),
    ({"topology": "layer2", "defaultGatewayIPs": "10.0.0.1"}, "defaultGatewayIPs"),
    ({"topology": "layer2", "transport": "evpn"}, "transport"),
    ({"topology": "localnet", "deviceID": "0000:03:00.1"}, "SR-IOV"),
    ({"topology": "localnet", "allowPersistentIPs": True}, "IPAMClaims"),
    ({"topology": "localnet", "allowPersistentIPs": "true"}, "allowPersistentIPs"),
    ({"topology": "layer2", "vlanID": 100}, "only applies to topology localnet"),
    ({"topology": "layer2", "physicalNetworkName": "p"}, "only applies to topology localnet"),
    ({"topology": "localnet", "vlanID": 4095}, "1..4094"),
    ({"topology": "localnet", "vlanID": "100"}, "1..4094"),
    ({"topology": "localnet", "physicalNetworkName": "a:b"}, "physicalNetworkName"),
    ({"topology": "localnet", "vlan": 100}, "vlanID (localnet)"),
    ({"topology": "localnet", "bridge": "br-ul"}, "ovn-bridge-mappings"),
    ({"topology": "localnet", "netAttachDefName": "noslash"}, "namespace/name"),
    ({"topology": "localnet", "netAttachDefName": "Default/x"}, "namespace/name"),
    ({"topology": "localnet", "ovnPort": "vm-1"}, "needs the OVN northbound DB"),
    ({"topology": "localnet", "subnets": "10.0.0.0/33"}, "10.0.0.0/33"),
])
def test_unsupported_ovnk_keys_and_values_are_7(conf: dict[str, Any], text: str) -> None:
    e = bad(conf)
    assert text in e.msg + e.details, e.msg


# ---------------------------------------------------------------------------------------------
# the node file


def write(tmp_path: Path, data: Any, mode: int = 0o644) -> dict[str, str]:
    p = tmp_path / "ovn.json"
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    p.chmod(mode)
    return {"OVS_UNDERLAY_OVN_CONFIG": str(p)}


def test_node_file(tmp_path: Path) -> None:
    me = os.geteuid()
    assert load_northbound({"OVS_UNDERLAY_OVN_CONFIG": str(tmp_path / "absent.json")}, owner_uid=me) is None
    env = write(tmp_path, {"ovnNorthbound": "ssl:10.0.0.10:6641", "ovnNbPrivateKey": "/k", "ovnNbCertificate": "/c",
                           "ovnNbCaCert": "/ca"})
    assert load_northbound(env, owner_uid=me) == Northbound("ssl:10.0.0.10:6641", "/k", "/c", "/ca")


@pytest.mark.parametrize(("data", "mode", "text"), [
    ({"ovnNorthbound": "unix:/x"}, 0o666, "not writable by group or others"),
    ({"ovnNorthbound": "unix:/x"}, 0o620, "not writable by group or others"),
    ("{not json", 0o644, "not JSON"),
    ([1], 0o644, "JSON object"),
    ({"ovnNorthbound": "unix:/x", "logFile": "/tmp/x"}, 0o644, "unknown key 'logFile'"),
    ({"ovnNorthbound": "ssl:1.2.3.4:6641"}, 0o644, "ovnNbPrivateKey"),
])
def test_bad_node_file_is_7_naming_the_file(tmp_path: Path, data: Any, mode: int, text: str) -> None:
    env = write(tmp_path, data, mode)
    with pytest.raises(ConfigError) as e:
        load_northbound(env, owner_uid=os.geteuid())
    assert text in str(e.value) and env["OVS_UNDERLAY_OVN_CONFIG"] in str(e.value)


def test_node_file_of_another_owner_or_not_a_file_is_refused(tmp_path: Path) -> None:
    env = write(tmp_path, {"ovnNorthbound": "unix:/x"})
    with pytest.raises(ConfigError, match="owned by"):
        load_northbound(env, owner_uid=os.geteuid() + 1)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_northbound({"OVS_UNDERLAY_OVN_CONFIG": str(tmp_path)}, owner_uid=os.geteuid())
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "ovn.json")
    with pytest.raises(ConfigError):
        load_northbound({"OVS_UNDERLAY_OVN_CONFIG": str(link)}, owner_uid=os.geteuid())
