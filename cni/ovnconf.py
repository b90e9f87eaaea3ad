"""How a network meets OVN: the `ovnPort` / managed-LSP keys and ovn-kubernetes' NAD spelling.

Why a module of its own: it is the one place that reads the OVN keys of a network config, so
`parse_netconf` stays one call and the rules (which key means what, in which topology, with or
without OVN) live in one table. Pure: no I/O. The node's own OVN settings (the northbound
endpoint and its TLS files, core.ovnsettings) come through a callable, called only when a
network could use them.

Three ways a port meets OVN (see the README section "OVN"):
- bind: the network config names `ovnPort`; the port gets `external_ids:iface-id` and the
  logical switch port is someone else's (a CMS created it). ADD waits for ovn-controller.
- managed: the config names `logicalSwitch` (or an ovn-kubernetes `topology`) and the
  northbound DB is known: ADD creates the logical switch port (and the switch, with its
  localnet port, when missing), DEL and GC remove it.
- localnet without OVN: an ovn-kubernetes `localnet` NAD on a node that knows no northbound DB
  attaches straight to the bridge that `ovn-bridge-mappings` names, as an access port on
  `vlanID`.

ovn-kubernetes' spelling (`type: ovn-k8s-cni-overlay` or any `topology`): keys with their
ovn-kubernetes meaning (`topology`, `netAttachDefName`, `subnets`, `excludeSubnets`, `vlanID`,
`mtu`, `physicalNetworkName`, `allowPersistentIPs`, `role`). A key or value we cannot honour is
refused (7) with the reason, never dropped: an ovn-kubernetes user must not get a different
network than the NAD describes. Its log-rotation keys (`logfile-max*`) are ignored, like every
unknown top-level key: the host decides how we log.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from cni.errors import CniError, Code
from core.ovnsettings import TLS_KEYS, Northbound, parse_northbound
from core.spec import ConfigError

OVNK_TYPE = "ovn-k8s-cni-overlay"
DEFAULT_INSTALLED_TIMEOUT_MS = 20_000
# Logical switch/port names: what OVN, OpenStack and ovn-kubernetes use (uuids, `ns.net_ovn_x`).
OVN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@/\-]{0,254}\Z")
# A bridge-mapping key: no ':' or ',' (the separators of ovn-bridge-mappings).
PHYSNET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}\Z")
DNS1123_RE = re.compile(r"^[a-z0-9]([a-z0-9\-]{0,61}[a-z0-9])?\Z")
NAD_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9.\-]{0,251}[a-z0-9])?\Z")

Topology = Literal["", "layer2", "localnet"]
BridgeSource = Literal["config", "ovn-bridge", "bridge-mapping"]

# ovn-kubernetes keys we refuse, and why (the message a user sees).
OVNK_UNSUPPORTED: dict[str, str] = {
    "joinSubnet": "it configures ovn-kubernetes' primary user-defined networks",
    "defaultGatewayIPs": "it configures ovn-kubernetes' primary layer2 networks",
    "infrastructureSubnets": "it configures ovn-kubernetes' primary layer2 networks",
    "transport": "east-west traffic is whatever the logical switch uses (geneve)",
    "evpn": "EVPN is an ovn-kubernetes control-plane feature",
    "deviceID": "SR-IOV / DPU ports are not plugged by ovs-underlay",
}
# Our keys that contradict a topology (with the key that replaces them there).
TOPOLOGY_CONFLICTS: dict[str, str] = {
    "vlan": "vlanID (localnet)",
    "trunk": "vlanID (localnet)",
    "bridge": "the node's external_ids:ovn-bridge (OVN) or ovn-bridge-mappings (localnet)",
}


@dataclass(frozen=True)
class OvnAttach:
    """The OVN side of one attachment."""

    logical_port: str | None  # ovnPort from the network config; None: derived (managed mode)
    logical_switch: str | None = None  # managed mode: the switch our LSPs go on
    northbound: Northbound | None = None  # managed mode
    installed_timeout_ms: int = DEFAULT_INSTALLED_TIMEOUT_MS  # 0: do not wait for ovn-installed
    port_security: bool = True
    localnet_vlan: int | None = None  # managed localnet: the localnet port's tag
    physical_network: str | None = None  # managed localnet: the localnet port's network_name

    @property
    def managed(self) -> bool:
        return self.northbound is not None and self.logical_switch is not None


@dataclass(frozen=True)
class OvnPart:
    """What the OVN keys of a network config decide: the attachment mode and where the port
    goes. `vlan` is the access tag (localnet without OVN: vlanID)."""

    topology: Topology = ""
    ovn: OvnAttach | None = None
    bridge_source: BridgeSource = "config"
    physical_network: str | None = None
    vlan: int | None = None
    nad: str = ""


def _bad(msg: str, details: str = "") -> CniError:
    return CniError(Code.INVALID_NETWORK_CONFIG, msg, details)


def logical_port_name(container_id: str, ifname: str) -> str:
    """The LSP name ADD derives when the network config gives no `ovnPort`: unique per
    attachment (container ids are random), readable in `ovn-nbctl show`, and computable again
    by DEL from the CNI identity alone."""
    return f"{container_id}_{ifname}"


def _name(v: Any, key: str, pattern: re.Pattern[str] = OVN_NAME_RE) -> str:
    if not isinstance(v, str) or not pattern.match(v):
        raise _bad(f"{key}: invalid name {v!r}", f"must match {pattern.pattern}")
    return v


def _bool(conf: Mapping[str, Any], key: str, default: bool) -> bool:
    v = conf.get(key, default)
    if not isinstance(v, bool):
        raise _bad(f"{key}: expected true or false, got {v!r}")
    return v


def _timeout(conf: Mapping[str, Any]) -> int:
    v = conf.get("ovnInstalledTimeoutMs", DEFAULT_INSTALLED_TIMEOUT_MS)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 300_000:
        raise _bad(f"ovnInstalledTimeoutMs: {v!r} is not an integer in 0..300000 (0: do not wait)")
    return v


def _topology(conf: Mapping[str, Any], ovnk: bool) -> Topology:
    if not ovnk:
        return ""
    topo = conf.get("topology", "layer3")  # ovn-kubernetes' default
    if topo in ("layer2", "localnet"):
        return topo  # type: ignore[no-any-return]
    if topo == "layer3":
        raise _bad("topology: 'layer3' is not supported: it needs ovn-kubernetes' per-node subnets "
                   "and cluster router", "use topology layer2 (one logical switch) or localnet")
    raise _bad(f"topology: {topo!r} is not one of layer2, localnet")


def _ovnk_checks(conf: Mapping[str, Any], topo: Topology) -> None:
    for key, why in OVNK_UNSUPPORTED.items():
        if conf.get(key) not in (None, "", []):
            raise _bad(f"{key}: {conf[key]!r} is not supported by ovs-underlay: {why}")
    role = conf.get("role", "secondary")
    if role != "secondary":
        raise _bad(f"role: {role!r} is not supported: ovs-underlay attaches secondary networks only")
    for key, instead in TOPOLOGY_CONFLICTS.items():
        if key in conf:
            raise _bad(f"{key}: not used with topology {topo}: the port follows {instead}")
    if _bool(conf, "allowPersistentIPs", False):
        raise _bad("allowPersistentIPs: true is not supported: ovs-underlay cannot read "
                   "ovn-kubernetes' IPAMClaims", "request the address statically (runtimeConfig.ips) instead")
    if topo != "localnet":
        for key in ("vlanID", "physicalNetworkName"):
            if conf.get(key) not in (None, 0, ""):
                raise _bad(f"{key}: only applies to topology localnet (this network is {topo})")


def _vlan_id(conf: Mapping[str, Any]) -> int | None:
    v = conf.get("vlanID")
    if v is None or v == 0:  # ovn-kubernetes: 0 / absent = untagged
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 4094:
        raise _bad(f"vlanID: VLAN {v!r} is outside 1..4094")
    return v


def _nad(conf: Mapping[str, Any]) -> str:
    v = conf.get("netAttachDefName")
    if v is None or v == "":
        return ""
    ns, sep, name = v.partition("/") if isinstance(v, str) else ("", "", "")
    if not sep or not DNS1123_RE.match(ns) or not NAD_NAME_RE.match(name):
        raise _bad(f"netAttachDefName: {v!r} is not namespace/name")
    return str(v)


NodeNorthbound = Callable[[], "Northbound | None"]


def no_node_northbound() -> Northbound | None:
    return None


def _config_northbound(conf: Mapping[str, Any], node_nb: NodeNorthbound) -> Northbound | None:
    """`ovnNorthbound` from a network config. Its TLS files come only from the node's settings
    file: a network config is written by a NAD author, who must not make root read files of
    their choosing (key material included) and present them to an endpoint of their choosing."""
    stray = [k for k in TLS_KEYS if k in conf]
    if stray:
        raise ConfigError(f"{stray[0]}: the northbound TLS files are node settings: put them in the node's "
                          "/etc/ovs-underlay/ovn.json, not in a network config")
    nb = parse_northbound({"ovnNorthbound": conf["ovnNorthbound"]}, "") if "ovnNorthbound" in conf and \
        not any(r.startswith("ssl:") for r in _remotes(conf["ovnNorthbound"])) else None
    if nb is not None or conf.get("ovnNorthbound") is None:
        return nb
    node = node_nb()  # an ssl: remote: the node's client certificate and CA
    if node is None or node.private_key is None:
        raise ConfigError("ovnNorthbound: an ssl: remote in a network config uses the node's TLS files "
                          "(ovnNbPrivateKey, ovnNbCertificate, ovnNbCaCert in /etc/ovs-underlay/ovn.json), "
                          "and this node has none")
    return parse_northbound({"ovnNorthbound": conf["ovnNorthbound"], "ovnNbPrivateKey": node.private_key,
                             "ovnNbCertificate": node.certificate, "ovnNbCaCert": node.ca_cert}, "")


def _remotes(value: Any) -> tuple[str, ...]:
    return Northbound(value.strip()).remotes() if isinstance(value, str) and value.strip() else ()


def parse_ovn(conf: Mapping[str, Any], *, name: str, vlan: int | None, trunk: bool, bridge: str,
              node_nb: NodeNorthbound = no_node_northbound) -> OvnPart:
    """The OVN part of a (canonicalized) network config. `vlan`/`trunk`/`bridge` are the
    already-parsed plain keys (to refuse a VLAN on br-int); `node_nb` returns the node's
    northbound endpoint, if the node has one (called only when the network could use it)."""
    ptype = conf.get("type")
    ovnk = ptype == OVNK_TYPE or "topology" in conf
    topo = _topology(conf, ovnk)
    if ovnk:
        _ovnk_checks(conf, topo)
    else:
        for key in ("vlanID", "physicalNetworkName", "allowPersistentIPs", "netAttachDefName"):
            if key in conf:
                raise _bad(f"{key}: an ovn-kubernetes key; it needs topology (layer2 or localnet)",
                           "for a plain access port on an underlay bridge use vlan")
    port = conf.get("ovnPort")
    if port is not None:
        port = _name(port, "ovnPort")
    switch = conf.get("logicalSwitch")
    if switch is not None:
        switch = _name(switch, "logicalSwitch")
    try:
        nb = _config_northbound(conf, node_nb)
        if nb is None and (topo or switch is not None):
            nb = node_nb()
    except ConfigError as exc:
        raise _bad(str(exc)) from exc
    timeout, security = _timeout(conf), _bool(conf, "portSecurity", True)
    nad = _nad(conf) if ovnk else ""

    if topo == "":
        if conf.get("ovnNorthbound") is not None and switch is None:
            raise _bad("ovnNorthbound: given without logicalSwitch (the switch our ports go on)")
        if switch is not None and nb is None:
            raise _bad("logicalSwitch: needs the OVN northbound DB: set ovnNorthbound in the network "
                       "config or in the node's /etc/ovs-underlay/ovn.json")
        ovn = None
        if port is not None or switch is not None:
            ovn = OvnAttach(port, switch, nb if switch else None, timeout, security)
        if (ovn is not None or bridge == "br-int") and (vlan is not None or trunk):
            raise _bad(f"{'trunk' if trunk else 'vlan'}: a port on OVN's integration bridge carries no "
                       "VLAN tag: OVN tags at the localnet port",
                       "give the localnet port the tag (topology localnet + vlanID, or tag_request "
                       "on your localnet logical switch port), or plug into an underlay bridge")
        # Without an explicit `bridge`, an OVN port goes on the node's integration bridge
        # (external_ids:ovn-bridge, br-int unless the node says otherwise).
        source: BridgeSource = "ovn-bridge" if ovn is not None and "bridge" not in conf else "config"
        return OvnPart(ovn=ovn, bridge_source=source)

    physnet = None
    if topo == "localnet":
        physnet = _name(conf.get("physicalNetworkName") or name, "physicalNetworkName", PHYSNET_RE)
    vlan_id = _vlan_id(conf)
    if nb is None:
        if topo == "layer2":
            raise _bad("topology layer2 needs OVN: one logical switch spans the nodes",
                       "set ovnNorthbound in the network config or in the node's /etc/ovs-underlay/ovn.json")
        if port is not None or switch is not None:
            raise _bad(f"{'ovnPort' if port else 'logicalSwitch'}: needs the OVN northbound DB "
                       "(ovnNorthbound); without it a localnet network attaches straight to the "
                       "bridge that ovn-bridge-mappings names")
        return OvnPart(topology=topo, bridge_source="bridge-mapping", physical_network=physnet,
                       vlan=vlan_id, nad=nad)
    ovn = OvnAttach(port, switch or name, nb, timeout, security,
                    localnet_vlan=vlan_id, physical_network=physnet)
    return OvnPart(topology=topo, ovn=ovn, bridge_source="ovn-bridge", physical_network=physnet, nad=nad)
