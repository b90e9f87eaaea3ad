"""The canonical IPAM definition: one alias table, one parser, one canonical form.

Why in the core: this is the contract between the plugins and ipamd. The plugin parses the CNI
`ipam` section (or an ovn-kubernetes style top level) into `IpamConf` and sends the pool part to
ipamd; ipamd validates the same way when it stores a definition. Both import this module, so the
rules cannot drift. Pure: netaddr and stdlib only, no gRPC, no I/O (the plugin imports it on the
ADD path). Errors are `ConfigError` (a ValueError naming the key and value): each program maps
it (the plugins to CNI code 7, ipamd to INVALID_ARGUMENT).

Spellings accepted (each maps to one canonical key, see ALIASES):
- ours:            subnets: [{subnet, gateway, rangeStart, rangeEnd, exclude: [...], reserved: [...]}]
- ovn-kubernetes:  "subnets": "10.22.0.0/16,fd00::/64", "excludeSubnets": "10.22.200.0/24,10.22.0.5/32",
                   "reservedSubnets": "10.22.0.8/29"
- Kube-OVN:        excludeIps: ["192.168.1.1..192.168.1.100"], cidrBlock, disableGatewayCheck
- Spiderpool:      ips: ["172.18.30.131-172.18.30.140"] (the allocatable ranges), excludeIPs
- host-local:      ranges: [[{subnet, rangeStart, rangeEnd, gateway}]], legacy top-level subnet
- whereabouts:     range ("10.0.0.0/24" or "10.0.0.10-10.0.0.20/24"), range_start, range_end,
                   exclude (CIDRs), ipRanges: [{range, exclude, ...}]

Two classes of held-back addresses, by spelling, with the meaning each neighbour gives it:
- *excluded* (`exclude`, ovn-kubernetes `excludeSubnets`, Spiderpool `excludeIPs`, whereabouts
  `exclude`): never handed out, not even on request (a static request for one is refused, 102);
- *reserved* (`reserved`, Kube-OVN `excludeIps`, ovn-kubernetes `reservedSubnets`): never picked
  automatically, but a static request for one is granted (kube-ovn pkg/ipam/subnet.go). An
  address that is both excluded and reserved is excluded.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from netaddr import AddrFormatError, IPAddress, IPNetwork, IPRange

from core.attachment import socket_problem

DEFAULT_DAEMON_SOCKET = "/run/ovs-underlay/ipamd.sock"
DEFAULT_GATEWAY_CHECK_TIMEOUT_MS = 1000
DEFAULT_CONFLICT_CHECK_WAIT_MS = 100


class ConfigError(ValueError):
    """The IPAM definition is invalid. The message names the offending key and value."""


# ---------------------------------------------------------------------------------------------
# Canonical types


@dataclass(frozen=True)
class SubnetSpec:
    subnet: IPNetwork
    gateway: IPAddress | None
    range_start: IPAddress
    range_end: IPAddress
    exclude: tuple[IPRange, ...] = ()
    reserved_ranges: tuple[IPRange, ...] = ()  # statics only (Kube-OVN excludeIps)

    @property
    def version(self) -> int:
        return int(self.subnet.version)

    def reserved(self) -> tuple[IPAddress, ...]:
        """Addresses never handed out: gateway, IPv4 network/broadcast (except /31, /32), IPv6
        subnet-router anycast (the network address)."""
        out: list[IPAddress] = []
        if self.gateway is not None:
            out.append(self.gateway)
        if self.version == 4 and self.subnet.prefixlen < 31:
            out += [self.subnet.network, self.subnet.broadcast]
        elif self.version == 6 and self.subnet.prefixlen < 127:
            out.append(self.subnet.network)
        return tuple(out)

    def grantable(self, ip: IPAddress) -> bool:
        """True when `ip` may be handed out on request: inside the range, not the gateway or the
        network/broadcast address, not excluded (a reserved address may be requested)."""
        if ip.version != self.version or not (self.range_start <= ip <= self.range_end):
            return False
        if ip in self.reserved():
            return False
        return not any(ip in r for r in self.exclude)

    def allocatable(self, ip: IPAddress) -> bool:
        """True when `ip` may be picked automatically: grantable and not reserved."""
        return self.grantable(ip) and not any(ip in r for r in self.reserved_ranges)

    def canonical(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "subnet": str(self.subnet),
            "gateway": str(self.gateway) if self.gateway is not None else "",
            "rangeStart": str(self.range_start),
            "rangeEnd": str(self.range_end),
            "exclude": [f"{r[0]}-{r[-1]}" for r in self.exclude],
        }
        if self.reserved_ranges:  # absent when empty: definitions stored before it compare equal
            out["reserved"] = [f"{r[0]}-{r[-1]}" for r in self.reserved_ranges]
        return out


@dataclass(frozen=True)
class RouteSpec:
    dst: IPNetwork
    gw: IPAddress | None = None  # None: via the gateway of the subnet of dst's family


@dataclass(frozen=True)
class DnsSpec:
    nameservers: tuple[str, ...] = ()
    domain: str = ""
    search: tuple[str, ...] = ()
    options: tuple[str, ...] = ()

    def empty(self) -> bool:
        return not (self.nameservers or self.domain or self.search or self.options)


@dataclass(frozen=True)
class PoolDef:
    """What ipamd stores per network. Two definitions are compared with `==`."""

    subnets: tuple[SubnetSpec, ...]
    routes: tuple[RouteSpec, ...] = ()
    dns: DnsSpec = field(default_factory=DnsSpec)
    mac_from_ip: bool = False
    cooldown_s: int = 0


@dataclass(frozen=True)
class IpamConf:
    """The whole IPAM section as the plugin uses it: the pool plus the daemon contract."""

    pool: PoolDef
    daemon_socket: str = DEFAULT_DAEMON_SOCKET
    gateway_check: bool = True
    gateway_check_timeout_ms: int = DEFAULT_GATEWAY_CHECK_TIMEOUT_MS
    conflict_check: bool = True
    conflict_check_wait_ms: int = DEFAULT_CONFLICT_CHECK_WAIT_MS
    timeout_ms: int = 10_000  # deadline of every RPC; shorter than kubelet's CNI timeout


# Results shared by plugin and client ----------------------------------------------------------


@dataclass(frozen=True)
class PodRef:
    namespace: str = ""
    name: str = ""
    uid: str = ""


@dataclass(frozen=True)
class IpAssignment:
    address: IPNetwork  # host address with the subnet's prefix length
    gateway: IPAddress | None = None

    @property
    def version(self) -> int:
        return int(self.address.version)


@dataclass(frozen=True)
class Segment:
    """The L2 segment an attachment's OVS port joins: where ipamd's probe port for it goes.
    `vlan` is the VLAN the port's untagged frames are in (the access tag or a trunk's native
    VLAN; 0 = untagged), `trunks` the trunk's VLANs, `ovsdb` the OVSDB remote of the bridge."""

    bridge: str
    vlan: int = 0
    trunks: tuple[int, ...] = ()
    ovsdb: str = ""

    @property
    def key(self) -> str:
        return f"{self.bridge}/{self.vlan}"


@dataclass(frozen=True)
class GatewaySeen:
    """A gateway that a segment's probe port saw answer or announce itself `age_ms` ago."""

    gateway: IPAddress
    mac: str
    age_ms: int


@dataclass(frozen=True)
class Allocation:
    network: str
    container_id: str
    ifname: str
    ips: tuple[IpAssignment, ...]
    routes: tuple[RouteSpec, ...] = ()  # gw resolved
    dns: DnsSpec = field(default_factory=DnsSpec)
    mac: str | None = None
    conflict_probed: bool = False
    pre_probed: int = 0  # addresses taken from fresh pre-probed candidates
    gateways: tuple[GatewaySeen, ...] = ()  # seen by the segment's probe port recently
    conflicts: tuple[IpAssignment, ...] = ()  # GetLease: addresses quarantined while held
    conflict_macs: tuple[str, ...] = ()  # the MAC that claimed each of `conflicts`


@dataclass(frozen=True)
class ProbeResult:
    """What one ARP/NDP probe saw. `answered`: someone answered for the probed address (for a
    gateway probe, the gateway is reachable; for a conflict probe, the address is in use)."""

    answered: bool
    mac: str | None
    elapsed_ms: float
    cached: bool = False
    skipped: bool = False  # the interface was not in the netns (or down): nothing was sent


# ---------------------------------------------------------------------------------------------
# Alias table: every accepted spelling -> canonical key. Keys are matched case-sensitively
# first, then case-insensitively (users mix `excludeIps` / `excludeIPs` / `exclude_ips`).

ALIASES: dict[str, str] = {
    # ipam level
    "subnets": "subnets",
    "ranges": "ranges",  # host-local
    "ipRanges": "ipRanges",  # whereabouts
    "range": "range",  # whereabouts single range
    "subnet": "subnet",  # host-local legacy single range
    "cidr": "subnet",
    "cidrBlock": "subnet",  # Kube-OVN
    "gateway": "gateway",
    "rangeStart": "rangeStart",
    "range_start": "rangeStart",  # whereabouts
    "rangeEnd": "rangeEnd",
    "range_end": "rangeEnd",
    "exclude": "exclude",  # whereabouts / ours: never granted
    "excludeSubnets": "exclude",  # ovn-kubernetes: never granted
    "excludeIPs": "exclude",  # Spiderpool: never granted
    "exclude_ips": "exclude",
    "reserved": "reserved",  # ours: statics only
    "excludeIps": "reserved",  # Kube-OVN: not picked automatically, a static request is granted
    "reservedSubnets": "reserved",  # ovn-kubernetes: the same
    "ips": "ips",  # Spiderpool: allocatable ranges
    "routes": "routes",
    "dns": "dns",
    "daemonSocket": "daemonSocket",
    "ipam_unix_socket_path": "daemonSocket",  # Spiderpool
    "gatewayCheck": "gatewayCheck",
    "disableGatewayCheck": "disableGatewayCheck",  # Kube-OVN (inverted)
    "gatewayCheckTimeoutMs": "gatewayCheckTimeoutMs",
    "conflictCheck": "conflictCheck",
    "conflictCheckWaitMs": "conflictCheckWaitMs",
    "macFromIP": "macFromIP",
    "macFromIp": "macFromIP",
    "cooldownSeconds": "cooldownSeconds",
    "timeoutMs": "timeoutMs",
}
# Spellings that differ only in case but mean different things: the exact spelling is required.
_AMBIGUOUS = {"excludeips": "Kube-OVN's excludeIps (reserved: a static request is granted) or "
                            "Spiderpool's excludeIPs (excluded: never granted)"}
_ALIASES_LOWER = {k.lower(): v for k, v in ALIASES.items() if k.lower() not in _AMBIGUOUS}
_MERGED = ("exclude", "reserved")  # keys whose spellings may appear together: their lists merge

# ovn-kubernetes NADs carry the IPAM at the top level of the network config, with no `ipam`
# section; these are the keys read from there (daemonSocket so a node can move the socket).
TOP_LEVEL_KEYS = ("subnets", "excludeSubnets", "reservedSubnets", "daemonSocket")

# Keys a CNI ipam section carries that are not ours to interpret.
_PASSTHROUGH = {"type", "name", "cniVersion", "dataDir", "resolvConf", "log_level", "log_file"}


def _canonicalize(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Map every key through ALIASES; merge lists when two spellings of `exclude` appear."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        canon = ALIASES.get(key) or _ALIASES_LOWER.get(key.lower())
        if canon is None:
            if key in _PASSTHROUGH:
                continue
            if key.lower() in _AMBIGUOUS:
                raise ConfigError(f"{where}: key {key!r} is ambiguous: {_AMBIGUOUS[key.lower()]}; "
                                  "spell it exactly")
            raise ConfigError(f"{where}: unknown key {key!r}")
        if canon in _MERGED and canon in out:
            out[canon] = [*_as_list(out[canon], where, key), *_as_list(value, where, key)]
            continue
        if canon in out:
            raise ConfigError(f"{where}: key {key!r} given twice under different spellings")
        out[canon] = value
    return out


def _as_list(value: Any, where: str, key: str) -> list[Any]:
    """Accept a list or an ovn-kubernetes comma string."""
    if value is None:
        return []
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    if isinstance(value, list | tuple):
        return list(value)
    raise ConfigError(f"{where}: {key!r} must be a list or a comma-separated string, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Scalar parsers


def parse_ip(value: Any, where: str) -> IPAddress:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: expected an IP address, got {value!r}")
    try:
        if "/" in value:
            raise AddrFormatError("prefix not allowed")
        return IPAddress(value.strip())
    except (AddrFormatError, ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: invalid IP address {value!r}") from exc


def parse_cidr(value: Any, where: str) -> IPNetwork:
    if not isinstance(value, str) or "/" not in value:
        raise ConfigError(f"{where}: expected a CIDR like 192.168.1.0/24, got {value!r}")
    try:
        net = IPNetwork(value.strip())
    except (AddrFormatError, ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: invalid CIDR {value!r}") from exc
    return net.cidr  # host bits dropped: "10.0.0.1/24" names the 10.0.0.0/24 subnet


def parse_range(value: Any, where: str) -> IPRange:
    """One exclusion / allocation range in any of the neighbours' spellings:
    `a..b` (Kube-OVN), `a-b` (Spiderpool), a CIDR (ovn-kubernetes, whereabouts) or one address."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: expected an address range, got {value!r}")
    text = value.strip()
    try:
        if ".." in text:
            first, last = (p.strip() for p in text.split("..", 1))
            lo, hi = parse_ip(first, where), parse_ip(last, where)
        elif "/" in text:
            net = IPNetwork(text)
            if net.ip != net.network:
                raise ConfigError(f"{where}: {text!r} has host bits set; write {net.cidr} or one address")
            return IPRange(net.first, net.last)
        elif "-" in text:
            first, last = (p.strip() for p in text.split("-", 1))
            lo, hi = parse_ip(first, where), parse_ip(last, where)
        else:
            lo = hi = parse_ip(text, where)
    except (AddrFormatError, ValueError, TypeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where}: invalid address range {value!r}") from exc
    if lo.version != hi.version:
        raise ConfigError(f"{where}: range {value!r} mixes IPv4 and IPv6")
    if lo > hi:
        raise ConfigError(f"{where}: range {value!r} ends before it starts")
    return IPRange(lo, hi)


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(f"{where}: expected true or false, got {value!r}")


def _int(value: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{where}: expected an integer in {lo}..{hi}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# Subnet entries


def _subnet_entry(raw: Any, where: str, *, default_gateway: bool) -> tuple[SubnetSpec, list[IPRange]]:
    """Parse one subnet entry. Returns the spec (without pool-level exclusions) and the
    allocatable `ips` ranges (Spiderpool) to be turned into exclusions of their complement."""
    if isinstance(raw, str):
        raw = {"subnet": raw}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected an object or a CIDR string, got {raw!r}")
    entry = _canonicalize(raw, where)
    only_ips: list[IPRange] = []
    if "range" in entry:  # whereabouts: "10.0.0.0/24" or "10.0.0.10-10.0.0.20/24"
        text = entry.pop("range")
        if not isinstance(text, str):
            raise ConfigError(f"{where}: 'range' must be a string, got {text!r}")
        if "-" in text.split("/")[0]:
            span, _, plen = text.rpartition("/")
            r = parse_range(span, f"{where}.range")
            entry.setdefault("subnet", f"{r[0]}/{plen}")
            entry.setdefault("rangeStart", str(r[0]))
            entry.setdefault("rangeEnd", str(r[-1]))
        else:
            entry.setdefault("subnet", text)
    if "subnet" not in entry:
        raise ConfigError(f"{where}: missing 'subnet'")
    net = parse_cidr(entry["subnet"], f"{where}.subnet")
    v4_small = net.version == 4 and net.prefixlen >= 31
    first_host = IPAddress(net.first if v4_small else net.first + 1, net.version)
    last_host = IPAddress(net.last if (v4_small or net.version == 6) else net.last - 1, net.version)

    gateway: IPAddress | None
    if entry.get("gateway"):
        gateway = parse_ip(entry["gateway"], f"{where}.gateway")
    elif default_gateway and not v4_small:
        gateway = first_host  # host-local: ".1" unless told otherwise
    else:
        gateway = None
    if gateway is not None and gateway not in net:
        raise ConfigError(f"{where}.gateway: {gateway} is outside subnet {net}")

    start = parse_ip(entry["rangeStart"], f"{where}.rangeStart") if entry.get("rangeStart") else first_host
    end = parse_ip(entry["rangeEnd"], f"{where}.rangeEnd") if entry.get("rangeEnd") else last_host
    for name, ip in (("rangeStart", start), ("rangeEnd", end)):
        if ip not in net:
            raise ConfigError(f"{where}.{name}: {ip} is outside subnet {net}")
    if start > end:
        raise ConfigError(f"{where}: rangeStart {start} is after rangeEnd {end}")

    excl = [parse_range(e, f"{where}.exclude") for e in _as_list(entry.get("exclude"), where, "exclude")]
    held = [parse_range(e, f"{where}.reserved") for e in _as_list(entry.get("reserved"), where, "reserved")]
    for i, ips_text in enumerate(_as_list(entry.get("ips"), where, "ips")):
        only_ips.append(parse_range(ips_text, f"{where}.ips[{i}]"))
    for key in ("routes", "dns"):
        if key in entry:
            raise ConfigError(f"{where}: {key!r} belongs to the ipam section, not a subnet entry")
    return SubnetSpec(net, gateway, start, end, tuple(excl), tuple(held)), only_ips


def _merge_ranges(ranges: Iterable[IPRange]) -> tuple[IPRange, ...]:
    """Sort and merge overlapping/adjacent ranges so equal definitions compare equal."""
    out: list[IPRange] = []
    for r in sorted(ranges, key=lambda r: (r.version, r.first)):
        if out and out[-1].version == r.version and r.first <= out[-1].last + 1:
            prev = out[-1]
            out[-1] = IPRange(IPAddress(prev.first, r.version), IPAddress(max(prev.last, r.last), r.version))
        else:
            out.append(r)
    return tuple(out)


def _complement(within_lo: IPAddress, within_hi: IPAddress, keep: Sequence[IPRange]) -> list[IPRange]:
    """Exclusions that leave only `keep` allocatable inside [within_lo, within_hi]."""
    out: list[IPRange] = []
    cursor = int(within_lo)
    v = within_lo.version
    for r in _merge_ranges(keep):
        if r.first > cursor:
            out.append(IPRange(IPAddress(cursor, v), IPAddress(r.first - 1, v)))
        cursor = max(cursor, r.last + 1)
    if cursor <= int(within_hi):
        out.append(IPRange(IPAddress(cursor, v), within_hi))
    return out


def _finish_subnets(
    entries: list[tuple[SubnetSpec, list[IPRange]]], pool_excludes: list[IPRange], where: str,
    pool_reserved: Sequence[IPRange] = (),
) -> tuple[SubnetSpec, ...]:
    subnets = [e[0] for e in entries]
    for i, a in enumerate(subnets):
        for b in subnets[i + 1 :]:
            overlap = a.subnet.first <= b.subnet.last and b.subnet.first <= a.subnet.last
            if a.version == b.version and overlap:
                raise ConfigError(f"{where}: subnets {a.subnet} and {b.subnet} overlap")
    for what, ranges in (("exclusion", pool_excludes), ("reserved range", pool_reserved)):
        for r in ranges:
            if not any(r.version == s.version and r.first >= s.subnet.first and r.last <= s.subnet.last
                       for s in subnets):
                raise ConfigError(f"{where}: {what} {r[0]}-{r[-1]} is not inside any subnet "
                                  f"({', '.join(str(s.subnet) for s in subnets)})")
    out = []
    for spec, only_ips in entries:
        excl = list(spec.exclude)
        held = list(spec.reserved_ranges)
        for what, ranges in (("exclusion", excl), ("reserved range", held)):
            for r in ranges:
                if not (r.first >= spec.subnet.first and r.last <= spec.subnet.last):
                    raise ConfigError(f"{where}: {what} {r[0]}-{r[-1]} is outside subnet {spec.subnet}")
        excl += [r for r in pool_excludes if r.version == spec.version
                 and r.first >= spec.subnet.first and r.last <= spec.subnet.last]
        held += [r for r in pool_reserved if r.version == spec.version
                 and r.first >= spec.subnet.first and r.last <= spec.subnet.last]
        if only_ips:
            for r in only_ips:
                if not (r.first >= spec.subnet.first and r.last <= spec.subnet.last):
                    raise ConfigError(f"{where}: ips range {r[0]}-{r[-1]} is outside subnet {spec.subnet}")
            excl += _complement(spec.range_start, spec.range_end, only_ips)
        out.append(SubnetSpec(spec.subnet, spec.gateway, spec.range_start, spec.range_end,
                              _merge_ranges(excl), _merge_ranges(held)))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Whole section


def _routes(raw: Any, subnets: Sequence[SubnetSpec], where: str) -> tuple[RouteSpec, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"{where}.routes: expected a list, got {raw!r}")
    out = []
    for i, r in enumerate(raw):
        w = f"{where}.routes[{i}]"
        if not isinstance(r, Mapping) or "dst" not in r:
            raise ConfigError(f"{w}: expected {{\"dst\": CIDR, \"gw\"?: IP}}, got {r!r}")
        dst = parse_cidr(r["dst"], f"{w}.dst")
        gw = parse_ip(r["gw"], f"{w}.gw") if r.get("gw") else None
        if gw is not None and gw.version != dst.version:
            raise ConfigError(f"{w}: gw {gw} and dst {dst} are of different IP families")
        if gw is None and not any(s.version == dst.version and s.gateway is not None for s in subnets):
            raise ConfigError(f"{w}: no 'gw' given and no IPv{dst.version} subnet has a gateway")
        out.append(RouteSpec(dst, gw))
    return tuple(out)


_DNS_KEYS = ("nameservers", "domain", "search", "options")


def _dns_strings(raw: Mapping[str, Any], key: str, where: str, *, spaces: bool = False) -> tuple[str, ...]:
    """A list of strings; each without control characters (they end up in the pod's
    resolv.conf, where a newline would start a line of the config author's choosing) and,
    for names, without whitespace."""
    value = raw.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}.dns.{key}: expected a list of non-empty strings, got {value!r}")
    for v in value:
        if any(ord(c) < 0x20 or ord(c) == 0x7F or (c.isspace() and not spaces) for c in v):
            raise ConfigError(f"{where}.dns.{key}: {v!r} contains a control character or whitespace")
    return tuple(value)


def _dns(raw: Any, where: str) -> DnsSpec:
    if raw is None:
        return DnsSpec()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}.dns: expected an object, got {raw!r}")
    unknown = [k for k in raw if k not in _DNS_KEYS]
    if unknown:
        raise ConfigError(f"{where}.dns: unknown key {unknown[0]!r} (expected {', '.join(_DNS_KEYS)})")
    nameservers = _dns_strings(raw, "nameservers", where)
    for ns in nameservers:
        parse_ip(ns, f"{where}.dns.nameservers")
    domain = raw.get("domain") or ""
    if not isinstance(domain, str) or any(ord(c) <= 0x20 or ord(c) == 0x7F or c.isspace() for c in domain):
        raise ConfigError(f"{where}.dns.domain: expected a domain name, got {domain!r}")
    return DnsSpec(
        nameservers=nameservers,
        domain=domain,
        search=_dns_strings(raw, "search", where),
        options=_dns_strings(raw, "options", where, spaces=True),
    )


def parse_ipam(ipam: Mapping[str, Any] | None, top_level: Mapping[str, Any] | None = None) -> IpamConf:
    """Parse a CNI `ipam` section into the canonical `IpamConf`.

    `top_level` is the ovn-kubernetes spelling: a network config with `subnets` /
    `excludeSubnets` at its top level and no `ipam` section. Only TOP_LEVEL_KEYS are read from
    it. Raises ConfigError with the key and value at fault.
    """
    where = "ipam"
    if ipam is None:
        if top_level is None:
            raise ConfigError("ipam: no ipam section and no top-level subnets")
        where = "config"
        ipam = {k: top_level[k] for k in TOP_LEVEL_KEYS if k in top_level}
    if not isinstance(ipam, Mapping):
        raise ConfigError(f"{where}: expected an object, got {ipam!r}")
    conf = _canonicalize(ipam, where)

    entries: list[tuple[SubnetSpec, list[IPRange]]] = []
    spellings: list[str] = [k for k in ("subnets", "ranges", "ipRanges") if k in conf]
    single: list[str] = [k for k in ("subnet", "range") if k in conf]
    if len(spellings) + (1 if single else 0) > 1:
        raise ConfigError(f"{where}: give the subnets once (found {', '.join(spellings + single)})")
    if "subnets" in conf:
        for i, s in enumerate(_as_list(conf["subnets"], where, "subnets")):
            entries.append(_subnet_entry(s, f"{where}.subnets[{i}]", default_gateway=False))
    elif "ranges" in conf:  # host-local: one address per outer entry, gateway defaults to .1
        for i, rset in enumerate(_as_list(conf["ranges"], where, "ranges")):
            if not isinstance(rset, list) or len(rset) != 1:
                raise ConfigError(f"{where}.ranges[{i}]: ovs-underlay takes exactly one range per set "
                                  f"(one subnet entry per address); got {rset!r}")
            entries.append(_subnet_entry(rset[0], f"{where}.ranges[{i}][0]", default_gateway=True))
    elif "ipRanges" in conf:  # whereabouts
        for i, r in enumerate(_as_list(conf["ipRanges"], where, "ipRanges")):
            entries.append(_subnet_entry(r, f"{where}.ipRanges[{i}]", default_gateway=False))
    elif single:  # legacy single range at the ipam level (host-local `subnet`, whereabouts `range`)
        keys = ("subnet", "range", "gateway", "rangeStart", "rangeEnd", "ips")
        entry = {k: conf[k] for k in keys if k in conf}
        entries.append(_subnet_entry(entry, where, default_gateway="subnet" in conf))
    if not entries:
        raise ConfigError(f"{where}: no subnets defined")
    if "gateway" in conf and not single:
        raise ConfigError(f"{where}.gateway: put the gateway inside its subnet entry")

    pool_excludes = [parse_range(e, f"{where}.exclude")
                     for e in _as_list(conf.get("exclude"), where, "exclude")]
    pool_reserved = [parse_range(e, f"{where}.reserved")
                     for e in _as_list(conf.get("reserved"), where, "reserved")]
    subnets = _finish_subnets(entries, pool_excludes, where, pool_reserved)

    gateway_check = any(s.gateway is not None for s in subnets)
    if "gatewayCheck" in conf:
        gateway_check = _bool(conf["gatewayCheck"], f"{where}.gatewayCheck")
    if "disableGatewayCheck" in conf:
        gateway_check = not _bool(conf["disableGatewayCheck"], f"{where}.disableGatewayCheck")
    socket = conf.get("daemonSocket", DEFAULT_DAEMON_SOCKET)
    why = socket_problem(socket, f"{where}.daemonSocket")
    if why:
        raise ConfigError(why)

    pool = PoolDef(
        subnets=subnets,
        routes=_routes(conf.get("routes"), subnets, where),
        dns=_dns(conf.get("dns"), where),
        mac_from_ip=_bool(conf.get("macFromIP", False), f"{where}.macFromIP"),
        cooldown_s=_int(conf.get("cooldownSeconds", 0), f"{where}.cooldownSeconds", 0, 86_400),
    )
    return IpamConf(
        pool=pool,
        daemon_socket=socket,
        gateway_check=gateway_check,
        gateway_check_timeout_ms=_int(conf.get("gatewayCheckTimeoutMs", DEFAULT_GATEWAY_CHECK_TIMEOUT_MS),
                                      f"{where}.gatewayCheckTimeoutMs", 1, 60_000),
        conflict_check=_bool(conf.get("conflictCheck", True), f"{where}.conflictCheck"),
        conflict_check_wait_ms=_int(conf.get("conflictCheckWaitMs", DEFAULT_CONFLICT_CHECK_WAIT_MS),
                                    f"{where}.conflictCheckWaitMs", 0, 10_000),
        timeout_ms=_int(conf.get("timeoutMs", 10_000), f"{where}.timeoutMs", 100, 120_000),
    )


def daemon_contract(section: Any) -> tuple[str | None, int | None]:
    """The ipamd socket and RPC deadline that an ipam section (or an ovn-kubernetes top level)
    names, read leniently: any spelling of the keys, and a value that does not validate reads as
    None. For DEL, which must not depend on the rest of the section still validating."""
    if not isinstance(section, Mapping):
        return None, None
    socket: str | None = None
    timeout: int | None = None
    for key, value in section.items():
        canon = ALIASES.get(key) or (_ALIASES_LOWER.get(key.lower()) if isinstance(key, str) else None)
        if canon == "daemonSocket" and socket_problem(value) is None:
            socket = value
        elif canon == "timeoutMs" and not isinstance(value, bool) and isinstance(value, int) \
                and 100 <= value <= 120_000:
            timeout = value
    return socket, timeout


def parse_requested_ips(values: Iterable[Any], where: str) -> tuple[IPAddress, ...]:
    """Static addresses from runtimeConfig.ips / args.cni.ips / CNI_ARGS IP= (plain or CIDR)."""
    out = []
    for v in values:
        if not isinstance(v, str):
            raise ConfigError(f"{where}: expected an IP address string, got {v!r}")
        out.append(_strip_prefix(v.strip(), where))
    return tuple(out)


def _strip_prefix(text: str, where: str) -> IPAddress:
    if "/" in text:
        try:
            return IPNetwork(text).ip
        except (AddrFormatError, ValueError) as exc:
            raise ConfigError(f"{where}: invalid IP address {text!r}") from exc
    return parse_ip(text, where)


def mac_from_ipv4(ip: IPAddress) -> str:
    """ovn-kubernetes / ovs-cni deterministic MAC: 0a:58 followed by the IPv4 bytes."""
    return "0a:58:" + ":".join(f"{b:02x}" for b in ip.packed)
