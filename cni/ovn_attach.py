"""The OVN steps of the plugin's verbs: where the port goes, its logical port, the LSP, the wait.

Why apart from plugin.py: the verbs stay short and read the same for every mode; this module
holds what differs when the port is OVN's (bind or managed) or follows an ovn-kubernetes
localnet mapping. Everything here goes through the injected drivers (node, northbound).

Where the port goes (`resolve`):
- plain: the config's `bridge`, `vlan`/`trunk` as given;
- OVN (ovnPort / logicalSwitch / topology with a northbound DB): the node's integration
  bridge (`external_ids:ovn-bridge`, default br-int), never a tag; the node must be a chassis
  (`system-id`), and for localnet its `ovn-bridge-mappings` must name the physical network;
- localnet without OVN: the bridge `ovn-bridge-mappings` names for the physical network, as
  an access port on vlanID.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cni.drivers import Drivers
from cni.errors import CniError, Code
from cni.netconf import NetConf
from cni.ovnconf import OvnAttach, logical_port_name
from cni.types import CmdArgs, IPConfig
from core.errors import CoreError
from core.names import PROVIDER_ERROR, PROVIDER_NETWORK, PROVIDER_READY

if TYPE_CHECKING:  # core.ovn imports the ovs library: only when a verb needs it
    from core.ovn import Chassis, LspSpec
    from core.vswitch import BridgeView

_log = logging.getLogger("ovs-underlay.ovn")


@dataclass(frozen=True)
class Target:
    """The OVS bridge and VLAN an attachment's port gets, as resolved on this node."""

    bridge: str
    tag: int | None = None
    trunks: tuple[int, ...] = ()
    chassis: Chassis | None = None  # read when the network involves OVN or a bridge mapping

    def vlan_text(self) -> str:
        if self.trunks:
            return "trunk " + ",".join(map(str, self.trunks)) + (f", native {self.tag}" if self.tag else "")
        return str(self.tag) if self.tag is not None else "untagged"


def logical_port(args: CmdArgs, conf: NetConf) -> str | None:
    """The OVS Interface's iface-id: the config's ovnPort, else (managed) the derived LSP name."""
    if conf.ovn is None:
        return None
    return conf.ovn.logical_port or logical_port_name(args.container_id, args.ifname)


def _mapping_error(conf: NetConf, ch: Chassis, code: int) -> CniError:
    return CniError(code, f"physical network {conf.physical_network!r} is not in this node's "
                          f"ovn-bridge-mappings ({ch.mappings_text or 'unset'})",
                    f"map it to the underlay bridge: ovs-vsctl set Open_vSwitch . "
                    f"external_ids:ovn-bridge-mappings={conf.physical_network}:<bridge>")


def resolve(conf: NetConf, d: Drivers, code: int) -> Target:
    """Where this attachment's port goes on this node; raises `code` (7 for ADD, 50 for STATUS)
    when the node cannot take it. Plain networks cost one OVSDB select, as before."""
    if conf.ovn is None and conf.bridge_source == "config":
        bv = d.ovsdb.bridge_view(conf.bridge)
        if conf.provider:
            _check_provider(conf, bv, code)
        _check_bridge(conf, conf.bridge, bv.datapath_type if bv else None, code)
        return Target(conf.bridge, conf.vlan, conf.trunk_vlans())
    view = d.chassis().inspect()
    ch = view.chassis
    if conf.bridge_source == "bridge-mapping":
        bridge = ch.bridge_for(conf.physical_network or "")
        if bridge is None:
            raise _mapping_error(conf, ch, code)
        _check_bridge(conf, bridge, view.bridges.get(bridge), code)
        return Target(bridge, conf.vlan, (), ch)
    bridge = ch.integration_bridge if conf.bridge_source == "ovn-bridge" else conf.bridge
    if ch.system_id is None:
        raise CniError(code, "this node is not an OVN chassis: Open_vSwitch external_ids:system-id is unset",
                       "configure ovn-controller on this node (system-id, ovn-remote, ovn-encap-ip)")
    if bridge != ch.integration_bridge:
        raise CniError(code, f"OVS bridge {bridge!r} is not OVN's integration bridge "
                             f"({ch.integration_bridge!r}, external_ids:ovn-bridge): ovn-controller would "
                             "never bind the port", "leave `bridge` out or name the integration bridge")
    _check_bridge(conf, bridge, view.bridges.get(bridge), code)
    physnet = conf.ovn.physical_network if conf.ovn is not None else None
    if physnet and ch.bridge_for(physnet) is None:
        raise _mapping_error(conf, ch, code)
    return Target(bridge, None, (), ch)


def _check_provider(conf: NetConf, bv: BridgeView | None, code: int) -> None:
    """A provider network (`"provider": "net1"`, bridge br-net1) is usable once ovs-underlay-node
    has bridged the NIC and verified it: it marks the Bridge row, which the one select above
    returned. Not ready is "try again later" (11) for ADD, the agent is converging (kubelet
    retries), and 50 for STATUS."""
    pcode = Code.TRY_AGAIN_LATER if code == Code.INVALID_NETWORK_CONFIG else code
    if bv is None:
        raise CniError(pcode, f"provider network {conf.provider} is not ready on this node: "
                              f"OVS bridge {conf.bridge} does not exist",
                       "ovs-underlay-node creates it: `ovs-underlay-node status` on the node")
    ids = bv.external_ids
    if ids.get(PROVIDER_NETWORK) != conf.provider or ids.get(PROVIDER_READY) != "true":
        ours = ids.get(PROVIDER_NETWORK) == conf.provider
        unmarked = f"{conf.bridge} is not marked as provider network {conf.provider}"
        why = ids.get(PROVIDER_ERROR) or ("being applied" if ours else unmarked)
        raise CniError(pcode, f"provider network {conf.provider} is not ready on this node: {why}",
                       "`ovs-underlay-node status` on the node")


def _check_bridge(conf: NetConf, bridge: str, dp: str | None, code: int) -> None:
    if dp is None:
        raise CniError(code, f"OVS bridge {bridge!r} does not exist",
                       "ovs-underlay does not create bridges; create it or fix `bridge`")
    if conf.datapath_type is not None and dp != conf.datapath_type:
        raise CniError(code, f"OVS bridge {bridge!r} has datapath_type {dp!r}, "
                             f"config expects {conf.datapath_type!r}")


def attachment_ids(args: CmdArgs, conf: NetConf, chassis: Chassis | None) -> dict[str, str]:
    """The owner ids of an attachment's LSP (the node is the chassis that binds it)."""
    ids = {"container_id": args.container_id, "ifname": args.ifname, "network": conf.name,
           "pod_namespace": conf.pod.namespace, "pod_name": conf.pod.name, "pod_uid": conf.pod.uid}
    if chassis is not None and chassis.system_id:
        ids["node"] = chassis.system_id
    if conf.nad:
        ids["nad"] = conf.nad
    return ids


def lsp_spec(args: CmdArgs, conf: NetConf, target: Target, mac: str, ips: tuple[IPConfig, ...]) -> LspSpec:
    from core.ovn import Localnet, LspSpec

    ovn = conf.ovn
    assert ovn is not None and ovn.logical_switch is not None
    port = logical_port(args, conf)
    assert port is not None
    localnet = Localnet(ovn.physical_network, ovn.localnet_vlan) if ovn.physical_network else None
    switch_ids = {"network": conf.name, "topology": conf.topology or "layer2"}
    if conf.nad:
        switch_ids["nad"] = conf.nad
    return LspSpec(name=port, switch=ovn.logical_switch, mac=mac, ips=tuple(str(i.address.ip) for i in ips),
                   port_security=ovn.port_security, ids=attachment_ids(args, conf, target.chassis),
                   chassis=target.chassis.system_id if target.chassis else None, localnet=localnet,
                   switch_ids=switch_ids)


def undo(what: str, fn: Callable[..., Any], *a: Any, **kw: Any) -> None:
    """One rollback step of ADD (an ExitStack callback): a failure is logged, never raised."""
    try:
        fn(*a, **kw)
    except Exception as exc:  # rollback must go on; the original error is what the runtime sees
        _log.warning("rollback: %s failed: %s", what, exc)
    else:
        _log.info("rollback: %s", what)


def add_lsp(args: CmdArgs, conf: NetConf, d: Drivers, target: Target, mac: str,
            ips: tuple[IPConfig, ...], stack: contextlib.ExitStack) -> None:
    """Managed mode: create the attachment's LSP (one NB transaction); undo pushed on `stack`."""
    assert conf.ovn is not None and conf.ovn.northbound is not None
    spec = lsp_spec(args, conf, target, mac, ips)
    nb = d.nb(conf.ovn.northbound)
    nb.add_lsp(spec)
    stack.callback(undo, f"delete logical switch port {spec.name}", nb.delete_attachment, dict(spec.ids))
    _log.info("logical switch port %s on %s: %s", spec.name, spec.switch, " ".join([mac, *spec.ips]))


def wait_installed(args: CmdArgs, conf: NetConf, d: Drivers, target: Target, host: str) -> None:
    assert conf.ovn is not None and target.chassis is not None
    if conf.ovn.installed_timeout_ms == 0:
        return
    port = logical_port(args, conf)
    assert port is not None
    ms = d.chassis().wait_installed(host, port, conf.ovn.installed_timeout_ms, target.chassis)
    _log.info("ovn-controller installed logical port %s after %.1f ms", port, ms)


def del_lsp(args: CmdArgs, ovn: OvnAttach | None, d: Drivers, recorded: str | None = None) -> None:
    """DEL: remove this attachment's LSPs (ours, this node's), by identity (container id, ifname,
    node). `ovn`: the OVN part of the config as DEL read it (cni.netconf.parse_del); `recorded`:
    the LSP ADD recorded on the OVS port (core.attachment). Missing = success."""
    if ovn is None or not ovn.managed:
        if recorded:  # ADD made an LSP, but the config no longer says where the northbound is
            _log.warning("DEL: logical switch port %s left: the network config's OVN keys do not parse "
                         "now; CNI GC of the network (or the reconciler) removes it", recorded)
        return
    assert ovn.northbound is not None
    want = {"container_id": args.container_id, "ifname": args.ifname}
    with contextlib.suppress(CoreError):  # an unreachable OVS must not keep the LSP: match without node
        chassis = d.chassis().inspect().chassis
        if chassis.system_id:
            want["node"] = chassis.system_id
    removed = d.nb(ovn.northbound).delete_attachment(want)
    if removed:
        _log.info("deleted logical switch port(s) %s", ", ".join(removed))


def gc_lsps(conf: NetConf, d: Drivers, valid: set[tuple[str, str]]) -> list[str]:
    """GC: remove this node's LSPs of this network whose attachment is not valid."""
    from core.ovn import gc_logical_ports

    if conf.ovn is None or not conf.ovn.managed:
        return []
    assert conf.ovn.northbound is not None
    chassis = d.chassis().inspect().chassis
    if chassis.system_id is None:
        raise CniError(Code.INTERNAL, "GC: this node has no OVN system-id; its logical switch ports "
                                      "cannot be told from other nodes'")
    return gc_logical_ports(d.nb(conf.ovn.northbound), node=chassis.system_id,
                            keep=lambda c, i: (c, i) in valid, network=conf.name)


def check(args: CmdArgs, conf: NetConf, d: Drivers, iface_ids: Mapping[str, str]) -> list[str]:
    """CHECK: the port's iface-id and ovn-installed, and (managed) that our LSP still exists."""
    if conf.ovn is None:
        return []
    out = []
    port = logical_port(args, conf)
    if iface_ids.get("iface-id") != port:
        out.append(f"OVS interface iface-id is {iface_ids.get('iface-id')!r}, expected {port!r}")
    if conf.ovn.installed_timeout_ms and iface_ids.get("ovn-installed") != "true":
        out.append(f"logical port {port} is not installed by ovn-controller (no ovn-installed=true)")
    if conf.ovn.managed:
        assert conf.ovn.northbound is not None
        lsps = d.nb(conf.ovn.northbound).find_lsps({"container_id": args.container_id, "ifname": args.ifname})
        if not any(lsp.name == port for lsp in lsps):
            out.append(f"logical switch port {port} is missing from the OVN northbound DB")
    return out
