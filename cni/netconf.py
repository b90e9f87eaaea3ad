"""The typed network configuration of the `ovs-underlay` plugin: one constructor, one alias table.

Why: `parse_netconf` is the only code that interprets the plugin's JSON config and CNI_ARGS;
everything downstream gets a frozen `NetConf` with validated values. It runs before any side
effect, so a bad config never leaves a trace. Errors are CniError code 7 (invalid network
config) naming the key and value, code 4 for a malformed CNI_ARGS, code 6 for a prevResult that
is not a result.

Keys are camelCase; ovs-cni / snake_case spellings go through ALIASES (one table). Unknown
top-level keys are ignored: Multus and runtimes add their own.

The IPAM backend is chosen once, here, as one typed value (`NetConf.ipam`):
- `ipam.type == "ovs-underlay-ipam"`         -> IpamdBackend: gRPC to ipamd (core.spec parses).
- any other `ipam.type`                       -> DelegateBackend: exec that plugin from CNI_PATH.
- no `ipam` but top-level `subnets`/`excludeSubnets` (ovn-kubernetes) -> IpamdBackend.
- neither                                     -> NoIpam: L2-only attachment, no addresses.
Verbs `match` on it; nothing compares mode strings.

Per-pod values, highest precedence first (documented contract; Multus may send several):
- MAC: runtimeConfig.mac (libcni injects it only when `capabilities.mac` is declared; we accept
  it whenever present) > args.cni.mac > CNI_ARGS `MAC=` > lease MAC (ipamd macFromIP) > kernel.
- IPs: runtimeConfig.ips > args.cni.ips > CNI_ARGS `IP=` (comma list). The first channel that
  is present wins entirely (lists are not merged).
- ovnPort (`external_ids:iface-id`, and the logical switch port's name): the network config's
  `ovnPort`. A pod's args.cni.ovnPort / CNI_ARGS `OvnPort=` (a pod annotation through Multus)
  would let a pod claim another pod's logical port, so it is ignored with a warning, unless the
  network config opts in with `allowPodOvnPort: true` (the admin's choice, for a CMS that names
  the port per pod); then args.cni.ovnPort > CNI_ARGS `OvnPort=` > config (`_ovn_port`, the one
  place that decides).
OVN keys (ovnPort, logicalSwitch, ovnNorthbound, ovn-kubernetes' topology spelling): cni.ovnconf.
CNI_ARGS keys are case-insensitive; `IgnoreUnknown` (true/1) is accepted and unknown keys are
always ignored. K8S_POD_NAMESPACE / K8S_POD_NAME / K8S_POD_UID are recorded in OVSDB and sent
to ipamd.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from netaddr import IPAddress

from cni.errors import CniError, Code
from cni.ovnconf import (
    OVN_NAME_RE,
    BridgeSource,
    NodeNorthbound,
    OvnAttach,
    Topology,
    no_node_northbound,
    parse_ovn,
)
from cni.types import CmdArgs, Result, parse_cni_args
from core.attachment import IPAMD, MAX_NAME, name_problem
from core.names import (
    DEFAULT_OVSDB,
    MAC_RE,
    PROVIDER_NAME_RE,
    ifname_problem,
    is_ovsdb_remote,
    provider_bridge,
)
from core.spec import (
    DEFAULT_DAEMON_SOCKET,
    ConfigError,
    IpamConf,
    PodRef,
    daemon_contract,
    parse_ipam,
    parse_requested_ips,
)

_log = logging.getLogger("ovs-underlay.netconf")
IPAMD_TYPE = IPAMD  # the plugin type is what ADD records as `ipam` (core.attachment)
DEFAULT_BRIDGE = "br-int"

# Peer spelling -> our canonical key (ovs-cni `socket_file`/`ofport_request`, snake_case).
ALIASES: dict[str, str] = {
    "socket_file": "ovsdbSocket",
    "ovsdb_socket": "ovsdbSocket",
    "ofport_request": "ofportRequest",
    "datapath_type": "datapathType",
    "ovn_port": "ovnPort",
    "logical_switch": "logicalSwitch",
    "allow_pod_ovn_port": "allowPodOvnPort",
    "log_file": "logFile",
    "log_level": "logLevel",
}
VALID_ATTACHMENTS_KEYS = ("cni.dev/valid-attachments", "cni.dev/attachments")


@dataclass(frozen=True)
class IpamdBackend:
    """Addresses from the node's ipamd (`ipam.type` ours, or ovn-kubernetes top-level subnets)."""

    conf: IpamConf


@dataclass(frozen=True)
class DelegateBackend:
    """Addresses from another IPAM plugin (host-local, static, whereabouts...) run from CNI_PATH."""

    plugin: str


@dataclass(frozen=True)
class NoIpam:
    """An L2-only attachment: no addresses (as in ovn-kubernetes without subnets)."""


IpamBackend = IpamdBackend | DelegateBackend | NoIpam


@dataclass(frozen=True)
class NetConf:
    name: str
    cni_version: str
    bridge: str = DEFAULT_BRIDGE
    # A provider network of the node agent (`"provider": "net1"` -> bridge br-net1): ADD and
    # STATUS also require the agent to have marked it ready on this node.
    provider: str | None = None
    vlan: int | None = None
    trunk: tuple[tuple[int, int], ...] = ()  # inclusive (min, max) ranges
    mtu: int | None = None
    ovn: OvnAttach | None = None  # the port is OVN's: iface-id, ovn-installed wait, managed LSP
    topology: Topology = ""  # ovn-kubernetes' topology ("" = ours: bridge + vlan/trunk)
    bridge_source: BridgeSource = "config"  # else resolved at ADD from the node's OVS
    physical_network: str | None = None  # localnet: the ovn-bridge-mappings key
    nad: str = ""  # ovn-kubernetes netAttachDefName (namespace/name)
    ovsdb_socket: str = DEFAULT_OVSDB
    # None: accept the bridge as it is (userspace/netdev or kernel). Set: an assertion.
    datapath_type: str | None = None
    ofport_request: int | None = None
    ipam: IpamBackend = field(default_factory=NoIpam)
    mac: str | None = None
    requested_ips: tuple[IPAddress, ...] = ()
    pod: PodRef = field(default_factory=PodRef)
    prev_result: Result | None = None
    valid_attachments: tuple[tuple[str, str], ...] | None = None

    def trunk_vlans(self) -> tuple[int, ...]:
        out: set[int] = set()
        for lo, hi in self.trunk:
            out.update(range(lo, hi + 1))
        return tuple(sorted(out))

    def vlan_text(self) -> str:
        if self.trunk:
            native = f", native {self.vlan}" if self.vlan is not None else ""
            return "trunk " + ",".join(f"{a}-{b}" if a != b else str(a) for a, b in self.trunk) + native
        return str(self.vlan) if self.vlan is not None else "untagged (all VLANs)"


@dataclass(frozen=True)
class IpamdSocket:
    """DEL's view of an ipamd backend: where the lease is, nothing about the pool."""

    socket: str = DEFAULT_DAEMON_SOCKET
    timeout_ms: int = 10_000


DelIpam = IpamdSocket | DelegateBackend | NoIpam


@dataclass(frozen=True)
class DelConf:
    """What DEL reads of the config, leniently and field by field (`parse_del`).

    DEL cleans up by identity (container id, ifname; core.attachment): the network, the IPAM
    backend and the OVSDB endpoint are hints from the config, each None/default when it does
    not validate, and the record that ADD left on the OVS Interface wins over them."""

    cni_version: str
    name: str | None = None
    ovsdb_socket: str = DEFAULT_OVSDB
    ipam: DelIpam | None = None  # None: the config names no usable IPAM backend
    ovn: OvnAttach | None = None  # the OVN part, when it still parses (managed: the LSP to delete)
    problems: tuple[str, ...] = ()


def _bad(msg: str, details: str = "") -> CniError:
    return CniError(Code.INVALID_NETWORK_CONFIG, msg, details)


def canonicalize(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Map alias keys to canonical ones; a key given under two spellings is an error."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        canon = ALIASES.get(key, key)
        if canon in out:
            raise _bad(f"config key {canon!r} given twice (also as {key!r})")
        out[canon] = value
    return out


def _int(conf: Mapping[str, Any], key: str, lo: int, hi: int) -> int | None:
    v = conf.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _bad(f"{key}: {v!r} is not an integer in {lo}..{hi}")
    return v


def _str(conf: Mapping[str, Any], key: str, default: str) -> str:
    v = conf.get(key, default)
    if not isinstance(v, str) or not v:
        raise _bad(f"{key}: expected a non-empty string, got {v!r}")
    return v


def _bridge(conf: Mapping[str, Any]) -> str:
    """An OVS bridge is also a network device of the same name: the interface name rules hold."""
    bridge = _str(conf, "bridge", DEFAULT_BRIDGE)
    why = ifname_problem(bridge)
    if why:
        raise _bad(f"bridge: {bridge!r} {why}")
    return bridge


def _trunk(value: Any) -> tuple[tuple[int, int], ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _bad(f"trunk: expected a list of {{id}} or {{minID, maxID}}, got {value!r}")
    out = []
    for i, item in enumerate(value):
        where = f"trunk[{i}]"
        if not isinstance(item, Mapping):
            raise _bad(f"{where}: expected {{id}} or {{minID, maxID}}, got {item!r}")
        if "id" in item and ("minID" in item or "maxID" in item):
            raise _bad(f"{where}: give either id or minID/maxID, not both: {item!r}")
        if "id" in item:
            lo = hi = _vlan_id(item["id"], f"{where}.id")
        elif "minID" in item and "maxID" in item:
            lo, hi = _vlan_id(item["minID"], f"{where}.minID"), _vlan_id(item["maxID"], f"{where}.maxID")
            if lo > hi:
                raise _bad(f"{where}: minID {lo} is greater than maxID {hi}")
        else:
            raise _bad(f"{where}: expected {{id}} or {{minID, maxID}}, got {item!r}")
        out.append((lo, hi))
    return tuple(out)


def _vlan_id(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 4094:
        raise _bad(f"{where}: VLAN {v!r} is outside 0..4094")
    return v


def _mac(v: Any, where: str) -> str:
    if not isinstance(v, str) or not MAC_RE.match(v):
        raise _bad(f"{where}: invalid MAC address {v!r}")
    if int(v[:2], 16) & 1:
        raise _bad(f"{where}: {v} is a multicast MAC address")
    if v.replace(":", "") == "0" * 12:
        raise _bad(f"{where}: {v} is the all-zero MAC address")
    return v.lower()


def _ips(v: Any, where: str) -> tuple[IPAddress, ...]:
    if isinstance(v, str):
        v = [p for p in v.split(",") if p.strip()]
    if not isinstance(v, list):
        raise _bad(f"{where}: expected a list of IP addresses, got {v!r}")
    try:
        return parse_requested_ips(v, where)
    except ConfigError as exc:
        raise _bad(str(exc)) from exc


def _mapping(conf: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    v = conf.get(key)
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise _bad(f"{key}: expected an object, got {v!r}")
    return v


def _ovn_port(conf: Mapping[str, Any], acni: Mapping[str, Any], cargs: Mapping[str, str]) -> str | None:
    """Who may set the iface-id (see the module docstring): the network config, and the pod only
    where the config says `allowPodOvnPort: true`."""
    allow = conf.get("allowPodOvnPort", False)
    if not isinstance(allow, bool):
        raise _bad(f"allowPodOvnPort: expected true or false, got {allow!r}")
    chosen: str | None = None
    channels = (("args.cni.ovnPort", acni.get("ovnPort")), ("CNI_ARGS OvnPort", cargs.get("OVNPORT")),
                ("ovnPort", conf.get("ovnPort")))
    for where, value in channels:
        if value is None or (value == "" and where != "ovnPort"):  # an empty pod channel: absent
            continue
        if where != "ovnPort" and not allow:
            _log.warning("ignoring %s=%r: only the network config sets ovnPort "
                         "(set allowPodOvnPort: true in it to let pods choose)", where, value)
            continue
        if not isinstance(value, str) or not OVN_NAME_RE.match(value):
            raise _bad(f"{where}: invalid OVN logical port name {value!r}",
                       f"must match {OVN_NAME_RE.pattern}")
        chosen = chosen or value
    return chosen


def _attachments(conf: Mapping[str, Any]) -> tuple[tuple[str, str], ...] | None:
    found: list[tuple[str, str]] = []
    seen = False
    for key in VALID_ATTACHMENTS_KEYS:
        if key not in conf:
            continue
        seen = True
        items = conf[key]
        if not isinstance(items, list):
            raise _bad(f"{key}: expected a list of {{containerID, ifname}}, got {items!r}")
        for i, a in enumerate(items):
            if not isinstance(a, Mapping) or not isinstance(a.get("containerID"), str) \
                    or not isinstance(a.get("ifname"), str):
                raise _bad(f"{key}[{i}]: expected {{containerID, ifname}}, got {a!r}")
            found.append((a["containerID"], a["ifname"]))
    return tuple(dict.fromkeys(found)) if seen else None


def _ipam(conf: Mapping[str, Any]) -> IpamBackend:
    ipam = conf.get("ipam")
    has_top = any(k in conf for k in ("subnets", "excludeSubnets"))
    if ipam is not None and not isinstance(ipam, Mapping):
        raise _bad(f"ipam: expected an object, got {ipam!r}")
    try:
        if ipam:
            if has_top:
                raise _bad("give either an ipam section or top-level subnets/excludeSubnets, not both")
            itype = ipam.get("type")
            if not isinstance(itype, str) or not itype:
                raise _bad(f"ipam.type: expected a plugin name, got {itype!r}")
            if itype == IPAMD_TYPE:
                return IpamdBackend(parse_ipam(ipam))
            if "/" in itype or itype in (".", ".."):
                raise _bad(f"ipam.type: {itype!r} is not a plugin name")
            return DelegateBackend(itype)
        if has_top:
            return IpamdBackend(parse_ipam(None, top_level=conf))
    except ConfigError as exc:
        raise _bad(str(exc)) from exc
    return NoIpam()


def _provider(conf: Mapping[str, Any]) -> tuple[str | None, str]:
    """(provider network, bridge). `provider` names a network of ovs-underlay-node: its bridge is
    br-<provider>; a `bridge` given as well must be that one."""
    bridge = _bridge(conf)
    provider = conf.get("provider")
    if provider is None:
        return None, bridge
    if not isinstance(provider, str) or not PROVIDER_NAME_RE.match(provider):
        raise _bad(f"provider: {provider!r} is not a provider network name",
                   "the name of a network in ovs-underlay-node's file (lowercase, at most 12 characters); "
                   "the pod attaches to its bridge br-<name>")
    if "bridge" in conf and bridge != provider_bridge(provider):
        raise _bad(f"provider {provider!r} attaches to bridge {provider_bridge(provider)}, "
                   f"but bridge is {bridge!r}", "give provider or bridge")
    return provider, provider_bridge(provider)


def parse_del(args: CmdArgs, node_nb: NodeNorthbound = no_node_northbound, *,
              ipam_plugin: bool = False) -> DelConf:
    """The config as DEL reads it: never raises. Nothing DEL does depends on the per-pod
    channels, prevResult, VLANs or the pool definition, so those are not read at all; the
    network name, the OVSDB endpoint and the IPAM backend are taken when they validate and
    named in `problems` when they do not. `ipam_plugin`: the config is that of another main
    plugin calling ovs-underlay-ipam, so the ipam section is ipamd's whatever its type."""
    conf = {ALIASES.get(k, k): v for k, v in args.config.items()}  # a duplicate spelling: last wins
    problems: list[str] = []
    name = conf.get("name")
    if (why := name_problem(name, "name")) is not None:
        problems.append(why)
        name = None
    ovsdb = conf.get("ovsdbSocket", DEFAULT_OVSDB)
    if not is_ovsdb_remote(ovsdb):
        problems.append(f"ovsdbSocket {ovsdb!r} is not an OVSDB remote; using {DEFAULT_OVSDB}")
        ovsdb = DEFAULT_OVSDB
    ipam: DelIpam | None
    section = conf.get("ipam")
    if section is not None and not isinstance(section, Mapping):
        problems.append(f"ipam {section!r} is not an object")
        ipam = None
    elif section and (ipam_plugin or section.get("type") == IPAMD_TYPE):
        ipam = _del_ipamd(section, problems)
    elif section:
        itype = section.get("type")
        if (why := name_problem(itype, "ipam.type")) is not None:
            problems.append(why)
            ipam = None
        else:
            ipam = DelegateBackend(str(itype))
    elif any(k in conf for k in ("subnets", "excludeSubnets")):
        ipam = _del_ipamd(conf, problems)
    else:
        ipam = None if ipam_plugin else NoIpam()
    ovn = None if ipam_plugin else _del_ovn(conf, node_nb, problems)
    return DelConf(args.cni_version, name, ovsdb, ipam, ovn, tuple(problems))


def _del_ovn(conf: Mapping[str, Any], node_nb: NodeNorthbound, problems: list[str]) -> OvnAttach | None:
    """The OVN part as far as DEL needs it (is the port's LSP ours, and where is the northbound):
    the OVN keys alone, not the VLANs or the bridge they are checked against at ADD."""
    raw_name = conf.get("name")
    name = raw_name if isinstance(raw_name, str) and raw_name else "network"
    try:
        return parse_ovn(conf, name=name, vlan=None, trunk=False, bridge="", node_nb=node_nb).ovn
    except (CniError, ConfigError, OSError, ValueError) as exc:  # the node's settings may fail too
        problems.append(f"OVN keys: {getattr(exc, 'msg', exc)}")
        return None


def _del_ipamd(section: Mapping[str, Any], problems: list[str]) -> IpamdSocket:
    socket, timeout = daemon_contract(section)
    if socket is None and any(str(k).lower() in ("daemonsocket", "ipam_unix_socket_path") for k in section):
        problems.append(f"the ipamd socket is not a usable path; trying {DEFAULT_DAEMON_SOCKET}")
    return IpamdSocket(socket or DEFAULT_DAEMON_SOCKET, timeout or 10_000)


def parse_netconf(args: CmdArgs, node_nb: NodeNorthbound = no_node_northbound) -> NetConf:
    """Validate the whole plugin config + CNI_ARGS for this invocation (no side effects but
    `node_nb`, which reads the node's OVN settings (core.ovnsettings) when the network needs them)."""
    conf = canonicalize(args.config)
    name = conf.get("name")
    if name_problem(name, "name") is not None or not isinstance(name, str):
        raise _bad(f"name: missing or invalid network name {name!r}",
                   f"must match ^[a-zA-Z0-9][a-zA-Z0-9_.\\-]*$, at most {MAX_NAME} characters")
    ptype = conf.get("type")
    if not isinstance(ptype, str) or not ptype:
        raise _bad(f"type: missing or invalid plugin type {ptype!r}")
    ovsdb = _str(conf, "ovsdbSocket", DEFAULT_OVSDB)
    if not is_ovsdb_remote(ovsdb):
        raise _bad(f"ovsdbSocket: {ovsdb!r} is not an OVSDB remote (unix:PATH, tcp:IP:PORT or ssl:IP:PORT)")
    cargs = parse_cni_args(args.args)
    rc = _mapping(conf, "runtimeConfig")
    acni = _mapping(_mapping(conf, "args"), "cni")
    mac = None
    for where, source, key in (("runtimeConfig.mac", rc, "mac"), ("args.cni.mac", acni, "mac"),
                               ("CNI_ARGS MAC", cargs, "MAC")):
        if source.get(key):
            mac = _mac(source[key], where)
            break
    ips: tuple[IPAddress, ...] = ()
    for where, source, key in (("runtimeConfig.ips", rc, "ips"), ("args.cni.ips", acni, "ips"),
                               ("CNI_ARGS IP", cargs, "IP")):
        if source.get(key):
            ips = _ips(source[key], where)
            break
    vlan = None if conf.get("vlan") is None else _vlan_id(conf["vlan"], "vlan")
    trunk = _trunk(conf.get("trunk"))
    provider, bridge = _provider(conf)
    port = _ovn_port(conf, acni, cargs)
    ovn_conf = conf if port is conf.get("ovnPort") else {**conf, "ovnPort": port}
    ovn = parse_ovn(ovn_conf, name=name, vlan=vlan, trunk=bool(trunk), bridge=bridge, node_nb=node_nb)

    backend = _ipam(conf)
    if ips and isinstance(backend, NoIpam):
        raise _bad(f"static IPs {', '.join(map(str, ips))} requested but the network {name} has no IPAM")
    prev = conf.get("prevResult")
    return NetConf(
        name=name, cni_version=args.cni_version,
        bridge=bridge, vlan=ovn.vlan if ovn.bridge_source == "bridge-mapping" else vlan, trunk=trunk,
        provider=provider,
        mtu=_int(conf, "mtu", 68, 65535),
        ovn=ovn.ovn, topology=ovn.topology, bridge_source=ovn.bridge_source,
        physical_network=ovn.physical_network, nad=ovn.nad,
        ovsdb_socket=ovsdb,
        datapath_type=None if conf.get("datapathType") is None else _str(conf, "datapathType", ""),
        ofport_request=_int(conf, "ofportRequest", 1, 65279),
        ipam=backend,
        mac=mac, requested_ips=ips,
        pod=PodRef(cargs.get("K8S_POD_NAMESPACE", ""), cargs.get("K8S_POD_NAME", ""),
                   cargs.get("K8S_POD_UID", "")),
        prev_result=Result.from_json(prev, args.cni_version) if prev else None,
        valid_attachments=_attachments(conf),
    )
