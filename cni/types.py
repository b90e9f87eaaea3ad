"""CNI protocol types: the invocation (`CmdArgs`), the result model and version conversion.

Why one module: the main plugin, the IPAM plugin and the delegate runner all produce or consume
results in every supported spec version, and the conversion rules must live in exactly one
place. Pure: netaddr and stdlib only.

Versions (CNI SPEC.md, libcni `types/100 convertTo04x`, cni.dev `spec-upgrades.md`):
- 1.1.0: interfaces {name, mac, mtu, sandbox, socketPath, pciID}; ips {address, gateway,
  interface}; routes {dst, gw, mtu, advmss, priority, table, scope}; dns.
- 1.0.0: as 1.1.0 without the interface fields 1.1.0 added (mtu, socketPath, pciID) and
  without the 1.1-only route fields (mtu, advmss, priority, table, scope).
- 0.3.0 / 0.3.1 / 0.4.0: ips[] gain "version": "4"|"6"; interfaces keep only name/mac/sandbox;
  routes keep only dst/gw.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from netaddr import AddrFormatError, IPAddress, IPNetwork

from cni.errors import CniError, Code
from cni.version import LATEST as LATEST
from cni.version import SUPPORTED_VERSIONS as SUPPORTED_VERSIONS
from cni.version import at_least as at_least
from cni.version import version_tuple as version_tuple

# ---------------------------------------------------------------------------------------------
# Invocation


@dataclass(frozen=True)
class CmdArgs:
    """One plugin invocation: the CNI_* environment plus the decoded config on stdin.

    Built only by skel after the environment and the config version were validated.
    `env` is the full environment, kept for delegated plugins (they get the same env)."""

    command: str
    container_id: str
    netns: str
    ifname: str
    args: str  # raw CNI_ARGS
    path: tuple[str, ...]  # CNI_PATH split on ':'
    stdin_data: bytes
    config: Mapping[str, Any]
    cni_version: str
    env: Mapping[str, str] = field(default_factory=dict)


def parse_cni_args(raw: str) -> dict[str, str]:
    """CNI_ARGS `K=V;K2=V2` -> {KEY: value} with keys upper-cased (keys are case-insensitive).
    Unknown keys are kept (callers ignore them); `IgnoreUnknown` is accepted as true/1 and
    anything else. A pair without '=' is an invalid environment (code 4)."""
    out: dict[str, str] = {}
    for pair in raw.split(";"):
        if not pair.strip():
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise CniError(Code.INVALID_ENV, f"CNI_ARGS: invalid pair {pair!r} (expected KEY=VALUE)")
        out[key.strip().upper()] = value.strip()
    return out


# ---------------------------------------------------------------------------------------------
# Result model


@dataclass(frozen=True)
class Interface:
    name: str
    mac: str = ""
    mtu: int = 0
    sandbox: str = ""
    socket_path: str = ""
    pci_id: str = ""


@dataclass(frozen=True)
class IPConfig:
    address: IPNetwork  # host address with prefix length
    gateway: IPAddress | None = None
    interface: int | None = None  # index into Result.interfaces

    @property
    def version(self) -> int:
        return int(self.address.version)


@dataclass(frozen=True)
class Route:
    dst: IPNetwork
    gw: IPAddress | None = None
    mtu: int = 0
    advmss: int = 0
    priority: int = 0
    table: int | None = None
    scope: int | None = None


@dataclass(frozen=True)
class DNS:
    nameservers: tuple[str, ...] = ()
    domain: str = ""
    search: tuple[str, ...] = ()
    options: tuple[str, ...] = ()

    def empty(self) -> bool:
        return not (self.nameservers or self.domain or self.search or self.options)


@dataclass(frozen=True)
class Result:
    """A CNI result (or an IPAM result when `interfaces` is empty)."""

    cni_version: str = LATEST
    interfaces: tuple[Interface, ...] = ()
    ips: tuple[IPConfig, ...] = ()
    routes: tuple[Route, ...] = ()
    dns: DNS = field(default_factory=DNS)

    def with_version(self, version: str) -> Result:
        return replace(self, cni_version=version)

    def to_json(self, version: str | None = None) -> dict[str, Any]:
        """Serialise in `version` (default: self.cni_version), down-converting as needed."""
        v = version or self.cni_version
        if v not in SUPPORTED_VERSIONS:
            raise CniError(Code.INCOMPATIBLE_VERSION, f"cannot write a result in CNI version {v}",
                           f"supported: {', '.join(SUPPORTED_VERSIONS)}")
        legacy = not at_least(v, "1.0.0")
        v11 = at_least(v, "1.1.0")
        out: dict[str, Any] = {"cniVersion": v}
        if self.interfaces:
            out["interfaces"] = [_iface_json(i, v11) for i in self.interfaces]
        if self.ips:
            out["ips"] = [_ip_json(ip, legacy) for ip in self.ips]
        if self.routes:
            out["routes"] = [_route_json(r, legacy, v11) for r in self.routes]
        out["dns"] = _dns_json(self.dns)
        return out

    @classmethod
    def from_json(cls, data: Any, default_version: str) -> Result:
        """Parse a result (delegate output, prevResult) in any supported version.
        Raises CniError(DECODE_FAILURE) when it is not a result."""
        try:
            return _parse_result(data, default_version)
        except CniError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, AddrFormatError) as exc:
            raise CniError(Code.DECODE_FAILURE, f"cannot decode CNI result: {exc}", repr(data)[:500]) from exc


def _iface_json(i: Interface, v11: bool) -> dict[str, Any]:
    d: dict[str, Any] = {"name": i.name}
    if i.mac:
        d["mac"] = i.mac
    if i.mtu and v11:  # interfaces[].mtu is a 1.1.0 field (SPEC 1.1.0), like socketPath and pciID
        d["mtu"] = i.mtu
    if i.sandbox:
        d["sandbox"] = i.sandbox
    if v11 and i.socket_path:
        d["socketPath"] = i.socket_path
    if v11 and i.pci_id:
        d["pciID"] = i.pci_id
    return d


def _ip_json(ip: IPConfig, legacy: bool) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if legacy:
        d["version"] = str(ip.version)
    d["address"] = str(ip.address)
    if ip.gateway is not None:
        d["gateway"] = str(ip.gateway)
    if ip.interface is not None:
        d["interface"] = ip.interface
    return d


def _route_json(r: Route, legacy: bool, v11: bool) -> dict[str, Any]:
    d: dict[str, Any] = {"dst": str(r.dst)}
    if r.gw is not None:
        d["gw"] = str(r.gw)
    if v11 and not legacy:
        if r.mtu:
            d["mtu"] = r.mtu
        if r.advmss:
            d["advmss"] = r.advmss
        if r.priority:
            d["priority"] = r.priority
        if r.table is not None:
            d["table"] = r.table
        if r.scope is not None:
            d["scope"] = r.scope
    return d


def _dns_json(dns: DNS) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if dns.nameservers:
        d["nameservers"] = list(dns.nameservers)
    if dns.domain:
        d["domain"] = dns.domain
    if dns.search:
        d["search"] = list(dns.search)
    if dns.options:
        d["options"] = list(dns.options)
    return d


def _strs(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise ValueError(f"{what}: expected a list of strings")
    return tuple(value)


def _int_or(value: Any, default: int | None, what: str) -> Any:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what}: expected an integer, got {value!r}")
    return value


def _ip(value: Any, what: str) -> IPAddress:
    if not isinstance(value, str):  # netaddr takes ints and more; a result has strings
        raise ValueError(f"{what}: expected an IP address string, got {value!r}")
    return IPAddress(value)


def _net(value: Any, what: str) -> IPNetwork:
    if not isinstance(value, str) or "/" not in value:
        raise ValueError(f"{what}: expected a CIDR string, got {value!r}")
    return IPNetwork(value)


def _objects(value: Any, what: str) -> list[Mapping[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(x, Mapping) for x in value):
        raise ValueError(f"{what}: expected a list of objects")
    return value


def _parse_result(data: Any, default_version: str) -> Result:
    if not isinstance(data, Mapping):
        raise ValueError("a result must be a JSON object")
    version = data.get("cniVersion") or default_version
    if version not in SUPPORTED_VERSIONS:
        raise CniError(Code.INCOMPATIBLE_VERSION, f"result has unsupported cniVersion {version!r}")
    ifaces = []
    for raw in _objects(data.get("interfaces"), "interfaces"):
        if not isinstance(raw.get("name"), str):
            raise ValueError(f"interfaces[].name: expected a string, got {raw.get('name')!r}")
        ifaces.append(Interface(
            name=raw["name"], mac=str(raw.get("mac") or ""), mtu=_int_or(raw.get("mtu"), 0, "mtu"),
            sandbox=str(raw.get("sandbox") or ""), socket_path=str(raw.get("socketPath") or ""),
            pci_id=str(raw.get("pciID") or "")))
    ips = []
    for raw in _objects(data.get("ips"), "ips"):
        addr = _net(raw.get("address"), "ips[].address")
        gw = _ip(raw["gateway"], "ips[].gateway") if raw.get("gateway") else None
        ips.append(IPConfig(addr, gw, _int_or(raw.get("interface"), None, "ips[].interface")))
    routes = []
    for raw in _objects(data.get("routes"), "routes"):
        routes.append(Route(
            dst=_net(raw.get("dst"), "routes[].dst").cidr,
            gw=_ip(raw["gw"], "routes[].gw") if raw.get("gw") else None,
            mtu=_int_or(raw.get("mtu"), 0, "mtu"), advmss=_int_or(raw.get("advmss"), 0, "advmss"),
            priority=_int_or(raw.get("priority"), 0, "priority"),
            table=_int_or(raw.get("table"), None, "table"), scope=_int_or(raw.get("scope"), None, "scope")))
    raw_dns = data.get("dns") or {}
    if not isinstance(raw_dns, Mapping):
        raise ValueError("dns must be an object")
    dns = DNS(nameservers=_strs(raw_dns.get("nameservers"), "dns.nameservers"),
              domain=str(raw_dns.get("domain") or ""), search=_strs(raw_dns.get("search"), "dns.search"),
              options=_strs(raw_dns.get("options"), "dns.options"))
    return Result(version, tuple(ifaces), tuple(ips), tuple(routes), dns)


def addr_key(address: IPNetwork) -> tuple[str, int]:
    """Identity of an interface address. Not IPNetwork equality: netaddr compares the networks,
    so 10.0.0.5/24 == 10.0.0.6/24, which would make CHECK miss a wrong address."""
    return str(address.ip), int(address.prefixlen)


def ips_of_family(ips: Sequence[IPConfig], family: int) -> list[IPConfig]:
    return [ip for ip in ips if ip.version == family]
