"""The agent's file of provider networks: one parser, Kube-OVN's names, resolved for one node.

Why Kube-OVN's shape: its users already describe provider networks as ProviderNetwork objects
(`defaultInterface`, `customInterfaces`, `excludeNodes`, `vlanInterfaces`, a name of at most 12
characters so that `br-<name>` fits IFNAMSIZ). The file is either our list or those objects as
they are, so a cluster's existing manifests can be handed to the agent unchanged:

    {"providerNetworks": [{"name": "net1", "defaultInterface": "eth1", ...}]}

    apiVersion: kubeovn.io/v1          # one or more YAML documents, or a `kind: List`
    kind: ProviderNetwork
    metadata: {name: net1}
    spec: {defaultInterface: eth1, customInterfaces: [{interface: eth2, nodes: [node3]}]}

JSON or YAML (YAML through PyYAML's safe loader; JSON is tried first, so a .json file never
depends on it). Unknown keys are errors: a typo must not silently drop an exclusion. Kube-OVN
keys that we recognise but do not implement (`exchangeLinkName`, `autoCreateVlanSubinterfaces`,
`preserveVlanInterfaces`, `nodeSelector`) are errors when they ask for something, with the
reason; set to their "off" value they are accepted. Pure apart from reading the file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netaddr import AddrFormatError, IPAddress

from core.names import PROVIDER_NAME_RE, provider_bridge

NAME_MAX = 12  # Kube-OVN's limit: "br-" + 12 = 15 = IFNAMSIZ - 1
IFNAME_MAX = 15
DEFAULT_VERIFY_TIMEOUT_MS = 2000
_IFNAME_BAD = re.compile(r"[/:\s]")
DATAPATHS = ("system", "netdev")


class ConfigError(ValueError):
    """The file is invalid. The message names the key (as a path) and the value."""


# ---------------------------------------------------------------------------------------------
# Types


@dataclass(frozen=True)
class Verify:
    """How apply proves the bridged NIC works: the gateways answer ARP/NDP from the bridge.
    `gateways` None = the gateways of the NIC's default routes (none: nothing to probe)."""

    enabled: bool = True
    gateways: tuple[IPAddress, ...] | None = None
    timeout_ms: int = DEFAULT_VERIFY_TIMEOUT_MS


@dataclass(frozen=True)
class ProviderNetwork:
    name: str
    default_interface: str
    custom_interfaces: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (interface, nodes)
    exclude_nodes: frozenset[str] = frozenset()
    vlan_interfaces: tuple[str, ...] = ()
    datapath_type: str | None = None  # None: "system" when we create the bridge, any when it exists
    mtu: int | None = None
    verify: Verify = field(default_factory=Verify)
    manage: bool = False  # take an interface over from NetworkManager / systemd-networkd

    @property
    def bridge(self) -> str:
        return provider_bridge(self.name)

    def interface_for(self, node: str) -> str | None:
        """The NIC this network bridges on `node`, or None when the node is excluded."""
        if node in self.exclude_nodes:
            return None
        for iface, nodes in self.custom_interfaces:
            if node in nodes:
                return iface
        return self.default_interface


@dataclass(frozen=True)
class NodeNetwork:
    """A provider network as it applies to this node."""

    network: ProviderNetwork
    nic: str

    @property
    def name(self) -> str:
        return self.network.name

    @property
    def bridge(self) -> str:
        return self.network.bridge


@dataclass(frozen=True)
class AgentConfig:
    networks: tuple[ProviderNetwork, ...] = ()

    def get(self, name: str) -> ProviderNetwork | None:
        return next((n for n in self.networks if n.name == name), None)

    def for_node(self, node: str) -> tuple[list[NodeNetwork], list[str]]:
        """The networks to apply on `node`, and the names of those that exclude it. Two networks
        bridging the same NIC on this node are an error (a NIC can be in one bridge only)."""
        out: list[NodeNetwork] = []
        excluded: list[str] = []
        owner: dict[str, str] = {}
        for n in self.networks:
            nic = n.interface_for(node)
            if nic is None:
                excluded.append(n.name)
                continue
            for iface in (nic, *n.vlan_interfaces):
                if iface in owner:
                    raise ConfigError(
                        f"node {node}: interface {iface} is claimed by provider networks "
                        f"{owner[iface]} and {n.name}; an interface can be in one bridge only"
                    )
                owner[iface] = n.name
            out.append(NodeNetwork(n, nic))
        return out, excluded


# ---------------------------------------------------------------------------------------------
# Parsing


_NETWORK_KEYS = {
    "name",
    "defaultInterface",
    "customInterfaces",
    "excludeNodes",
    "vlanInterfaces",
    "datapathType",
    "mtu",
    "verify",
    "manage",
}
# Kube-OVN keys we know: accepted at the value that asks for nothing, refused otherwise.
_UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "exchangeLinkName": (False, "the NIC keeps its name and the bridge is br-<name>"),
    "autoCreateVlanSubinterfaces": (
        False,
        "create the VLAN interfaces yourself and list them in vlanInterfaces",
    ),
    "preserveVlanInterfaces": (
        False,
        "the agent touches only interfaces the file names: list them in vlanInterfaces",
    ),
    "nodeSelector": (None, "the agent has no node labels: use customInterfaces and excludeNodes"),
}


def load(path: str | Path) -> AgentConfig:
    """Read and parse the file at `path` (JSON, else YAML)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {p}: {exc.strerror or exc}") from exc
    return parse_text(text, str(p))


def parse_text(text: str, where: str = "config") -> AgentConfig:
    docs = _documents(text, where)
    return parse(docs, where)


def _documents(text: str, where: str) -> list[Any]:
    try:
        return [json.loads(text)]
    except json.JSONDecodeError as json_exc:
        if text.lstrip().startswith(("{", "[")):
            raise ConfigError(f"{where}: not valid JSON: {json_exc}") from json_exc
    import yaml  # only YAML files pay for it

    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: neither JSON nor YAML: {exc}") from exc


def parse(docs: Sequence[Any], where: str = "config") -> AgentConfig:
    """Parse already-decoded documents: our {"providerNetworks": [...]}, Kube-OVN ProviderNetwork
    objects, or a `kind: List` of them."""
    raw: list[tuple[str, Any]] = []
    for i, doc in enumerate(docs):
        at = where if len(docs) == 1 else f"{where}[doc {i}]"
        if not isinstance(doc, Mapping):
            raise ConfigError(f"{at}: expected an object, got {type(doc).__name__}")
        if "kind" in doc:
            raw += _from_objects(doc, at)
            continue
        extra = set(doc) - {"providerNetworks"}
        if extra:
            raise ConfigError(f"{at}: unknown key(s) {sorted(extra)} (expected providerNetworks)")
        items = doc.get("providerNetworks", [])
        if not isinstance(items, list):
            raise ConfigError(f"{at}.providerNetworks: expected a list")
        raw += [(f"{at}.providerNetworks[{j}]", item) for j, item in enumerate(items)]
    networks = [parse_network(item, at) for at, item in raw]
    seen: set[str] = set()
    for n in networks:
        if n.name in seen:
            raise ConfigError(f"{where}: provider network {n.name!r} is defined twice")
        seen.add(n.name)
    return AgentConfig(tuple(networks))


def _from_objects(doc: Mapping[str, Any], at: str) -> list[tuple[str, Any]]:
    kind = doc.get("kind")
    if kind == "List":
        items = doc.get("items")
        if not isinstance(items, list):
            raise ConfigError(f"{at}.items: expected a list")
        out: list[tuple[str, Any]] = []
        for j, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise ConfigError(f"{at}.items[{j}]: expected an object")
            out += _from_objects(item, f"{at}.items[{j}]")
        return out
    if kind != "ProviderNetwork":
        raise ConfigError(f"{at}.kind: {kind!r} is not ProviderNetwork (or List)")
    meta, spec = doc.get("metadata"), doc.get("spec")
    if not isinstance(meta, Mapping) or not isinstance(spec, Mapping):
        raise ConfigError(f"{at}: a ProviderNetwork needs metadata and spec objects")
    if "name" in spec:
        raise ConfigError(f"{at}.spec.name: the name comes from metadata.name")
    return [(f"{at}.spec", {"name": meta.get("name"), **spec})]


def parse_network(item: Any, at: str) -> ProviderNetwork:
    if not isinstance(item, Mapping):
        raise ConfigError(f"{at}: expected an object")
    for key, (off, why) in _UNSUPPORTED.items():
        if key in item and item[key] not in (off, None, {}, []):
            raise ConfigError(f"{at}.{key}: {item[key]!r} is not supported: {why}")
    unknown = set(item) - _NETWORK_KEYS - set(_UNSUPPORTED)
    if unknown:
        raise ConfigError(f"{at}: unknown key(s) {sorted(unknown)}")
    name = item.get("name")
    if not isinstance(name, str) or not PROVIDER_NAME_RE.match(name):
        raise ConfigError(
            f"{at}.name: {name!r} must be a lowercase name of 1-{NAME_MAX} characters "
            "(letters, digits, '-'): the bridge is br-<name>"
        )
    at = f"{at} ({name})"
    default = _ifname(item.get("defaultInterface"), f"{at}.defaultInterface")
    custom = []
    ci = item.get("customInterfaces", [])
    if not isinstance(ci, list):
        raise ConfigError(f"{at}.customInterfaces: expected a list of {{interface, nodes}}")
    for j, c in enumerate(ci):
        cat = f"{at}.customInterfaces[{j}]"
        if not isinstance(c, Mapping) or set(c) - {"interface", "nodes"}:
            raise ConfigError(f"{cat}: expected {{interface, nodes}}, got {c!r}")
        custom.append(
            (_ifname(c.get("interface"), f"{cat}.interface"), _names(c.get("nodes"), f"{cat}.nodes"))
        )
    exclude = frozenset(_names(item.get("excludeNodes", []), f"{at}.excludeNodes"))
    vlans = tuple(
        _ifname(v, f"{at}.vlanInterfaces[{j}]")
        for j, v in enumerate(_list(item.get("vlanInterfaces", []), f"{at}.vlanInterfaces"))
    )
    if len(set(vlans)) != len(vlans):
        raise ConfigError(f"{at}.vlanInterfaces: {list(vlans)} names an interface twice")
    dp = item.get("datapathType")
    if dp is not None and dp not in DATAPATHS:
        raise ConfigError(f"{at}.datapathType: {dp!r} must be one of {', '.join(DATAPATHS)}")
    mtu = item.get("mtu")
    if mtu is not None and (not isinstance(mtu, int) or isinstance(mtu, bool) or not 68 <= mtu <= 65535):
        raise ConfigError(f"{at}.mtu: {mtu!r} must be an integer 68-65535")
    manage = item.get("manage", False)
    if not isinstance(manage, bool):
        raise ConfigError(f"{at}.manage: {manage!r} must be true or false")
    return ProviderNetwork(
        name=name,
        default_interface=default,
        custom_interfaces=tuple(custom),
        exclude_nodes=exclude,
        vlan_interfaces=vlans,
        datapath_type=dp,
        mtu=mtu,
        verify=_verify(item.get("verify"), f"{at}.verify"),
        manage=manage,
    )


def _verify(v: Any, at: str) -> Verify:
    if v is None or v is True:
        return Verify()
    if v is False:
        return Verify(enabled=False)
    if not isinstance(v, Mapping) or set(v) - {"gateway", "gateways", "timeoutMs", "enabled"}:
        raise ConfigError(f"{at}: expected false or {{gateway (or gateways), timeoutMs, enabled}}, got {v!r}")
    if "gateway" in v and "gateways" in v:
        raise ConfigError(f"{at}: give gateway or gateways, not both")
    gws_raw = v.get("gateway", v.get("gateways"))
    gws: tuple[IPAddress, ...] | None = None
    if gws_raw is not None:
        items = gws_raw if isinstance(gws_raw, list) else [gws_raw]
        try:
            gws = tuple(IPAddress(str(g)) for g in items)
        except (AddrFormatError, ValueError) as exc:
            raise ConfigError(f"{at}.gateway: {gws_raw!r} is not an IP address (or a list of them)") from exc
    timeout = v.get("timeoutMs", DEFAULT_VERIFY_TIMEOUT_MS)
    if not isinstance(timeout, int) or isinstance(timeout, bool) or not 100 <= timeout <= 60000:
        raise ConfigError(f"{at}.timeoutMs: {timeout!r} must be an integer 100-60000")
    enabled = v.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{at}.enabled: {enabled!r} must be true or false")
    return Verify(enabled, gws, timeout)


def _list(v: Any, at: str) -> list[Any]:
    if not isinstance(v, list):
        raise ConfigError(f"{at}: expected a list, got {v!r}")
    return v


def _names(v: Any, at: str) -> tuple[str, ...]:
    items = _list(v, at)
    if not all(isinstance(x, str) and x for x in items):
        raise ConfigError(f"{at}: expected a list of node names, got {v!r}")
    return tuple(items)


def _ifname(v: Any, at: str) -> str:
    if not isinstance(v, str) or not v or len(v) > IFNAME_MAX or _IFNAME_BAD.search(v) or v in (".", ".."):
        raise ConfigError(
            f"{at}: {v!r} is not an interface name (1-{IFNAME_MAX} characters, no '/', ':' or spaces)"
        )
    return v
