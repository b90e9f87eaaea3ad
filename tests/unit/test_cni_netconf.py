"""parse_netconf: defaults, alias table, validation errors (code 7), per-pod precedence."""

from __future__ import annotations

from typing import Any

import pytest
from netaddr import IPAddress

from cni.errors import CniError
from cni.netconf import ALIASES, DelegateBackend, IpamdBackend, NoIpam, parse_netconf
from cni.types import CmdArgs


def args(conf: dict[str, Any], cni_args: str = "", command: str = "ADD") -> CmdArgs:
    full = {"cniVersion": "1.1.0", "name": "net1", "type": "ovs-underlay", **conf}
    return CmdArgs(command=command, container_id="c1", netns="/run/netns/p", ifname="eth0", args=cni_args,
                   path=("/usr/lib/cni",), stdin_data=b"", config=full, cni_version=full.get("cniVersion", "1.1.0"))


def test_defaults_l2_only() -> None:
    c = parse_netconf(args({}))
    assert c.bridge == "br-int" and c.vlan is None and c.trunk == () and c.mtu is None
    assert c.ovsdb_socket == "unix:/run/openvswitch/db.sock" and c.datapath_type is None
    assert c.ipam == NoIpam() and c.mac is None and c.requested_ips == ()


def test_ovs_cni_spellings_through_alias_table() -> None:
    c = parse_netconf(args({"bridge": "br1", "vlan": 100, "trunk": [{"id": 5}, {"minID": 10, "maxID": 12}],
                            "socket_file": "unix:/tmp/db.sock", "ofport_request": 77, "mtu": 9000,
                            "unknownKey": {"x": 1}}))
    assert c.bridge == "br1" and c.vlan == 100 and c.trunk == ((5, 5), (10, 12))
    assert c.trunk_vlans() == (5, 10, 11, 12)
    assert c.ovsdb_socket == "unix:/tmp/db.sock" and c.ofport_request == 77 and c.mtu == 9000
    assert ALIASES["socket_file"] == "ovsdbSocket"
    assert "trunk" in c.vlan_text() and "native 100" in c.vlan_text()


@pytest.mark.parametrize(("conf", "text"), [
    ({"vlan": 4095}, "4095"),
    ({"vlan": -1}, "-1"),
    ({"vlan": True}, "True"),
    ({"vlan": "100"}, "'100'"),
    ({"trunk": [{"minID": 20, "maxID": 10}]}, "minID 20 is greater than maxID 10"),
    ({"trunk": [{"id": 5000}]}, "5000"),
    ({"trunk": [{"id": 5, "minID": 1, "maxID": 3}]}, "either id"),
    ({"trunk": [{"minID": 1}]}, "minID"),
    ({"trunk": {"id": 1}}, "trunk"),
    ({"mtu": 10}, "mtu"),
    ({"ofportRequest": 0}, "ofportRequest"),
    ({"socket_file": "unix:/a", "ovsdbSocket": "unix:/b"}, "given twice"),
    ({"ovsdbSocket": "/run/db.sock"}, "not an OVSDB remote"),
    ({"bridge": ""}, "bridge"),
    ({"name": "bad name"}, "network name"),
    ({"name": None}, "network name"),
    ({"type": ""}, "type"),
    ({"ipam": {"subnet": "10.0.0.0/24"}}, "ipam.type"),
    ({"ipam": {"type": "../evil"}}, "not a plugin name"),
    ({"ipam": "host-local"}, "ipam"),
    ({"ipam": {"type": "ovs-underlay-ipam", "subnets": [{"subnet": "10.0.0.0/24", "gateway": "10.1.0.1"}]}},
     "outside subnet"),
    ({"ipam": {"type": "host-local"}, "subnets": "10.0.0.0/24"}, "not both"),
    ({"runtimeConfig": {"mac": "zz"}}, "invalid MAC"),
    ({"args": {"cni": {"mac": "01:00:5e:00:00:01"}}}, "multicast"),
    ({"runtimeConfig": {"ips": ["10.0.0.300"]}, "ipam": {"type": "host-local"}}, "invalid IP"),
    ({"runtimeConfig": {"ips": ["10.0.0.3"]}}, "has no IPAM"),
    ({"cni.dev/valid-attachments": [{"containerID": 1}]}, "valid-attachments"),
    # issue 11 item 14: these answered 999 with a traceback, or slipped through
    ({"ipam": {"type": "ovs-underlay-ipam", "subnets": ["10.0.0.0/24"], "dns": {"search": 5}}}, "dns.search"),
    ({"ipam": {"type": "ovs-underlay-ipam", "subnets": ["10.0.0.0/24"], "dns": {"search": "a.b"}}}, "dns.search"),
    ({"ipam": {"type": "ovs-underlay-ipam", "subnets": ["10.0.0.0/24"], "dns": {"nameservers": 5}}},
     "dns.nameservers"),
    ({"ipam": {"type": "ovs-underlay-ipam", "subnets": ["10.0.0.0/24"], "dns": {"domain": ["a"]}}}, "dns.domain"),
    ({"ipam": {"type": "ovs-underlay-ipam", "subnets": ["10.0.0.0/24"],
               "dns": {"search": ["x\nnameserver 6.6.6.6"]}}}, "control character"),
    ({"ipam": {"type": "ovs-underlay-ipam", "subnets": ["10.0.0.0/24"], "dns": {"nameserver": ["1.1.1.1"]}}},
     "unknown key 'nameserver'"),
    ({"name": "n" * 254}, "at most 253"),
    ({"name": "net\n"}, "network name"),
    ({"bridge": "br-0123456789abc"}, "longer than 15 bytes"),
    ({"bridge": "br/0"}, "bridge"),
    ({"args": {"cni": {"mac": "0a:00:00:00:00:01\n"}}}, "invalid MAC"),
])
def test_invalid_configs_are_code_7(conf: dict[str, Any], text: str) -> None:
    with pytest.raises(CniError) as e:
        parse_netconf(args(conf))
    assert e.value.code == 7 and text in e.value.msg + e.value.details, e.value.msg


def test_ipam_backend_is_chosen_once_and_typed() -> None:
    c = parse_netconf(args({"ipam": {"type": "host-local", "subnet": "10.0.0.0/24"}}))
    assert c.ipam == DelegateBackend("host-local")
    c = parse_netconf(args({"ipam": {"type": "ovs-underlay-ipam", "daemonSocket": "/tmp/s.sock",
                                     "subnets": [{"subnet": "10.0.0.0/24", "gateway": "10.0.0.1"}]}}))
    assert isinstance(c.ipam, IpamdBackend) and c.ipam.conf.daemon_socket == "/tmp/s.sock"
    c = parse_netconf(args({"subnets": "10.22.0.0/16,fd00::/64", "excludeSubnets": "10.22.0.0/24"}))
    assert isinstance(c.ipam, IpamdBackend) and len(c.ipam.conf.pool.subnets) == 2
    assert parse_netconf(args({"ipam": {}})).ipam == NoIpam()


def test_mac_precedence() -> None:
    base = {"ipam": {"type": "host-local"}}
    cargs = "IgnoreUnknown=true;MAC=0a:00:00:00:00:03"
    both = {**base, "runtimeConfig": {"mac": "0A:00:00:00:00:01"}, "args": {"cni": {"mac": "0a:00:00:00:00:02"}}}
    assert parse_netconf(args(both, cargs)).mac == "0a:00:00:00:00:01"
    assert parse_netconf(args({**base, "args": {"cni": {"mac": "0a:00:00:00:00:02"}}}, cargs)).mac == "0a:00:00:00:00:02"
    assert parse_netconf(args(base, cargs)).mac == "0a:00:00:00:00:03"
    assert parse_netconf(args(base, "mac=0a:00:00:00:00:04")).mac == "0a:00:00:00:00:04"  # case-insensitive key


def test_ip_precedence_and_pod_ref() -> None:
    base = {"ipam": {"type": "host-local"}}
    cargs = "IgnoreUnknown=1;IP=10.0.0.3,fd00::3;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;K8S_POD_UID=u;" \
            "K8S_POD_INFRA_CONTAINER_ID=infra;SOMETHING_ELSE=x"
    c = parse_netconf(args({**base, "runtimeConfig": {"ips": ["10.0.0.1/24"]}, "args": {"cni": {"ips": ["10.0.0.2"]}}},
                           cargs))
    assert c.requested_ips == (IPAddress("10.0.0.1"),)
    c = parse_netconf(args({**base, "args": {"cni": {"ips": ["10.0.0.2"]}}}, cargs))
    assert c.requested_ips == (IPAddress("10.0.0.2"),)
    c = parse_netconf(args(base, cargs))
    assert c.requested_ips == (IPAddress("10.0.0.3"), IPAddress("fd00::3"))
    assert (c.pod.namespace, c.pod.name, c.pod.uid) == ("ns", "p", "u")


def test_ovn_port_only_from_the_network_config(caplog: pytest.LogCaptureFixture) -> None:
    """A pod annotation (args.cni via Multus, CNI_ARGS) must not choose the iface-id: it could
    claim another pod's logical port (issue 11, item 19)."""
    c = parse_netconf(args({"ovnPort": "cfg"}))
    assert c.ovn is not None and c.ovn.logical_port == "cfg"
    c = parse_netconf(args({"ovnPort": "cfg", "args": {"cni": {"ovnPort": "acni"}}}, "OvnPort=env"))
    assert c.ovn is not None and c.ovn.logical_port == "cfg"
    assert "ignoring args.cni.ovnPort='acni'" in caplog.text and "ignoring CNI_ARGS OvnPort='env'" in caplog.text
    assert parse_netconf(args({"args": {"cni": {"ovnPort": "acni"}}}, "OvnPort=env")).ovn is None


def test_ovn_port_pod_values_with_the_admins_opt_in() -> None:
    """With allowPodOvnPort: true (the admin's opt-in in the network config) the pod's value
    wins: args.cni.ovnPort > CNI_ARGS OvnPort= > config."""
    def port(conf: dict[str, Any], cargs: str = "") -> str | None:
        c = parse_netconf(args(conf, cargs))
        return c.ovn.logical_port if c.ovn is not None else None

    opt = {"ovnPort": "cfg", "allowPodOvnPort": True}
    assert port(opt) == "cfg"
    assert port(opt, "OvnPort=env") == "env"
    assert port({**opt, "args": {"cni": {"ovnPort": "acni"}}}, "OvnPort=env") == "acni"
    assert port({"allowPodOvnPort": True}, "OvnPort=env") == "env"
    for bad in ({"allowPodOvnPort": "yes"}, {"ovnPort": "a b"}, {"ovnPort": 5},
                {**opt, "args": {"cni": {"ovnPort": "x\ny"}}}):
        with pytest.raises(CniError) as e:
            parse_netconf(args(bad))
        assert e.value.code == 7


def test_gc_attachments_both_keys_and_prev_result() -> None:
    c = parse_netconf(args({"cni.dev/valid-attachments": [{"containerID": "a", "ifname": "eth0"}],
                            "cni.dev/attachments": [{"containerID": "a", "ifname": "eth0"},
                                                    {"containerID": "b", "ifname": "net1"}]}, command="GC"))
    assert c.valid_attachments == (("a", "eth0"), ("b", "net1"))
    assert parse_netconf(args({})).valid_attachments is None
    c = parse_netconf(args({"prevResult": {"cniVersion": "1.1.0", "ips": [{"address": "10.0.0.2/24"}]}}))
    assert c.prev_result is not None and str(c.prev_result.ips[0].address) == "10.0.0.2/24"
    with pytest.raises(CniError) as e:
        parse_netconf(args({"prevResult": {"ips": [{"address": "nope"}]}}))
    assert e.value.code == 6
