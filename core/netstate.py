"""What a host interface holds, as plain data: link, addresses, routes, policy rules.

Why a module of its own: the node agent snapshots a NIC before it bridges it, journals that
snapshot, moves the configuration to the bridge, and must later put back exactly what was there
and prove it did. That needs a faithful, comparable, serialisable picture of the kernel's state
that does not depend on pyroute2 (the journal is read back by a later process, the dry run and
the unit tests run without root). `core.hostnet` produces and consumes these records; nothing
here has side effects. stdlib + netaddr only.

What "faithful" keeps, so a restore is exact:
- addresses with their flags (nodad, noprefixroute, ...), label, broadcast, peer, metric, proto
  and lifetimes (a DHCP lease keeps its remaining lifetime);
- routes of EVERY table with metric, protocol, scope, type, preferred source, gateway, onlink,
  metrics (mtu, advmss, ...), IPv6 preference and multipath hops;
- policy rules (`ip rule`) naming the interface as iif or oif, with all their selectors.

What moves with an interface and what the kernel re-creates by itself (`movable_*`): the local
table, link-local IPv6, addresses the kernel configured (SLAAC, link-local: IFA_PROTO), routes
learnt from router advertisements and the prefix routes the kernel makes for an address are not
moved; they come back on their own on the new device, and are left out of comparisons.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from netaddr import IPAddress, IPNetwork

AF_INET, AF_INET6 = 2, 10
FOREVER = 0xFFFFFFFF
# IFA_F_* flags an administrator sets (ip addr add ... nodad noprefixroute ...); the others
# (secondary, tentative, deprecated, permanent, dadfailed) are the kernel's view of the address.
IFA_F_SECONDARY = 0x01
IFA_F_NODAD = 0x02
IFA_F_HOMEADDRESS = 0x10
IFA_F_MANAGETEMPADDR = 0x100
IFA_F_NOPREFIXROUTE = 0x200
IFA_F_MCAUTOJOIN = 0x400
CONFIG_FLAGS = IFA_F_NODAD | IFA_F_HOMEADDRESS | IFA_F_MANAGETEMPADDR | IFA_F_NOPREFIXROUTE | IFA_F_MCAUTOJOIN
IFA_PROTO_KERNEL = (1, 2, 3)  # loopback, router advertisement (SLAAC), link-local
RT_TABLE_MAIN, RT_TABLE_LOCAL = 254, 255
RTPROT_KERNEL, RTPROT_BOOT, RTPROT_STATIC, RTPROT_RA = 2, 3, 4, 9
RTN_UNICAST = 1
RTNH_F_ONLINK = 4
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_HOST = 0, 253, 254
_SCOPES = {0: "global", 200: "site", 253: "link", 254: "host"}
_PROTOS = {2: "kernel", 3: "boot", 4: "static", 9: "ra", 16: "dhcp"}
_TABLES = {254: "main", 255: "local", 253: "default"}
_TYPES = {
    1: "unicast",
    2: "local",
    3: "broadcast",
    5: "multicast",
    6: "blackhole",
    7: "unreachable",
    8: "prohibit",
    9: "throw",
}


def family_of(cidr: str) -> int:
    return AF_INET6 if ":" in cidr else AF_INET


# ---------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class Link:
    """A link as `ip -d link` shows what we care about. `kind` is the rtnl kind ("veth", "vlan",
    "tun", "" for a physical NIC); `vlan_id`/`vlan_link` for an 802.1Q device."""

    name: str
    index: int
    mac: str
    mtu: int
    up: bool  # administratively (IFF_UP)
    kind: str = ""
    master: int | None = None
    vlan_id: int | None = None
    vlan_link: int | None = None
    alias: str = ""


@dataclass(frozen=True)
class Address:
    """One address. `address` is "ip/prefixlen" of IFA_LOCAL; `peer` only when IFA_ADDRESS differs
    (point-to-point). Lifetimes in seconds, None = forever."""

    address: str
    flags: int = 0
    scope: int = 0
    label: str = ""
    broadcast: str = ""
    peer: str = ""
    metric: int = 0
    proto: int = 0
    valid_lft: int | None = None
    preferred_lft: int | None = None

    @property
    def family(self) -> int:
        return family_of(self.address)

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]

    @property
    def network(self) -> IPNetwork:
        return IPNetwork(self.address).cidr

    def key(self) -> tuple[str, str]:
        return (self.address, self.peer)

    def on(self, old: str, new: str) -> Address:
        """The same address on interface `new` instead of `old`: an IPv4 label naming the old
        interface ("eth1", "eth1:0") is renamed, and the kernel decides primary/secondary anew."""
        label = self.label
        if label == old or label.startswith(old + ":"):
            label = new + label[len(old) :]
        return replace(self, label=label[:15], flags=self.flags & ~IFA_F_SECONDARY)

    def config(self) -> tuple[Any, ...]:
        """What must be equal for two addresses to be "the same configuration" (lifetimes are
        compared as forever-or-not: a finite one counts down)."""
        return (
            self.address,
            self.peer,
            self.flags & (CONFIG_FLAGS | IFA_F_SECONDARY),
            self.scope,
            self.label,
            self.broadcast,
            self.metric,
            self.valid_lft is None,
            self.preferred_lft is None,
        )

    def render(self, dev: str) -> str:
        parts = [self.address]
        if self.peer:
            parts += ["peer", self.peer]
        if self.broadcast:
            parts += ["brd", self.broadcast]
        if self.scope:
            parts += ["scope", _SCOPES.get(self.scope, str(self.scope))]
        parts += ["dev", dev]
        if self.label and self.label != dev:
            parts += ["label", self.label]
        if self.metric:
            parts += ["metric", str(self.metric)]
        for bit, word in (
            (IFA_F_NODAD, "nodad"),
            (IFA_F_NOPREFIXROUTE, "noprefixroute"),
            (IFA_F_MANAGETEMPADDR, "mngtmpaddr"),
            (IFA_F_HOMEADDRESS, "home"),
            (IFA_F_MCAUTOJOIN, "autojoin"),
        ):
            if self.flags & bit:
                parts.append(word)
        if self.valid_lft is not None:
            parts += ["valid_lft", str(self.valid_lft), "preferred_lft", str(self.preferred_lft or 0)]
        return " ".join(parts)


@dataclass(frozen=True)
class Hop:
    """One next hop of a multipath route."""

    oif: int
    gateway: str = ""
    weight: int = 1
    flags: int = 0
    dev: str = ""  # the interface's name when recorded (indexes change across reboots)


@dataclass(frozen=True)
class Route:
    """One route. `dst` is a CIDR ("0.0.0.0/0" for default). `oif` 0 with `hops` = multipath."""

    dst: str
    table: int = RT_TABLE_MAIN
    oif: int = 0
    gateway: str = ""
    prefsrc: str = ""
    src: str = ""  # source selector (IPv6 source routing), CIDR
    metric: int = 0
    proto: int = RTPROT_BOOT
    scope: int = RT_SCOPE_UNIVERSE
    type: int = RTN_UNICAST
    tos: int = 0
    flags: int = 0  # rtm_flags: RTNH_F_ONLINK
    pref: int | None = None  # IPv6 router preference
    metrics: tuple[tuple[str, int], ...] = ()  # ("RTAX_MTU", 1400) ...
    hops: tuple[Hop, ...] = ()
    expires: int | None = None

    @property
    def family(self) -> int:
        return family_of(self.dst)

    def uses(self, index: int) -> bool:
        return self.oif == index or any(h.oif == index for h in self.hops)

    def moved(self, old: int, new: int) -> Route:
        """The same route through interface index `new` wherever it went through `old`."""
        hops = tuple(replace(h, oif=new) if h.oif == old else h for h in self.hops)
        return replace(self, oif=new if self.oif == old else self.oif, hops=hops)

    def key(self) -> tuple[Any, ...]:
        """The kernel's identity of a route: replace/delete match on this."""
        return (self.family, self.table, self.dst, self.tos, self.metric, self.src)

    def config(self, names: Mapping[int, str] | None = None) -> tuple[Any, ...]:
        hops = tuple(sorted((_name(h.oif, names), h.gateway, h.weight, h.flags) for h in self.hops))
        return (
            *self.key(),
            _name(self.oif, names),
            self.gateway,
            self.prefsrc,
            self.proto,
            self.scope,
            self.type,
            self.flags & RTNH_F_ONLINK,
            self.pref,
            tuple(sorted(self.metrics)),
            hops,
        )

    def render(self, names: Mapping[int, str]) -> str:
        dst = "default" if IPNetwork(self.dst).prefixlen == 0 else self.dst
        parts = [] if self.type == RTN_UNICAST else [_TYPES.get(self.type, str(self.type))]
        parts.append(dst)
        if self.src:
            parts += ["from", self.src]
        if self.gateway:
            parts += ["via", self.gateway]
        if self.oif:
            parts += ["dev", _name(self.oif, names)]
        for h in self.hops:
            parts += (
                ["nexthop"]
                + (["via", h.gateway] if h.gateway else [])
                + ["dev", _name(h.oif, names), "weight", str(h.weight)]
            )
        if self.table != RT_TABLE_MAIN:
            parts += ["table", _TABLES.get(self.table, str(self.table))]
        if self.proto != RTPROT_BOOT:
            parts += ["proto", _PROTOS.get(self.proto, str(self.proto))]
        if self.scope != RT_SCOPE_UNIVERSE:
            parts += ["scope", _SCOPES.get(self.scope, str(self.scope))]
        if self.prefsrc:
            parts += ["src", self.prefsrc]
        if self.metric:
            parts += ["metric", str(self.metric)]
        if self.flags & RTNH_F_ONLINK:
            parts.append("onlink")
        for name, value in self.metrics:
            parts += [name.removeprefix("RTAX_").lower(), str(value)]
        return " ".join(parts)


@dataclass(frozen=True)
class Rule:
    """One policy-routing rule. `attrs` holds its selectors and action as FRA_* names -> values
    (e.g. ("FRA_TABLE", 100), ("FRA_IIFNAME", "eth1")), so every selector round-trips."""

    family: int
    action: int
    priority: int
    attrs: tuple[tuple[str, Any], ...]
    dst_len: int = 0
    src_len: int = 0
    tos: int = 0
    flags: int = 0

    def get(self, name: str) -> Any:
        return dict(self.attrs).get(name)

    def names(self, ifname: str) -> bool:
        return ifname in (self.get("FRA_IIFNAME"), self.get("FRA_OIFNAME"))

    def renamed(self, old: str, new: str) -> Rule:
        attrs = tuple(
            (k, new if k in ("FRA_IIFNAME", "FRA_OIFNAME") and v == old else v) for k, v in self.attrs
        )
        return replace(self, attrs=attrs)

    def config(self) -> tuple[Any, ...]:
        return (
            self.family,
            self.action,
            self.priority,
            tuple(sorted(self.attrs, key=lambda kv: kv[0])),
            self.dst_len,
            self.src_len,
            self.tos,
            self.flags,
        )

    def render(self) -> str:
        a = dict(self.attrs)
        parts = [f"priority {self.priority}"]
        if self.flags & 2:
            parts.append("not")
        if a.get("FRA_SRC"):
            parts.append(f"from {a['FRA_SRC']}/{self.src_len}")
        if a.get("FRA_DST"):
            parts.append(f"to {a['FRA_DST']}/{self.dst_len}")
        if a.get("FRA_IIFNAME"):
            parts.append(f"iif {a['FRA_IIFNAME']}")
        if a.get("FRA_OIFNAME"):
            parts.append(f"oif {a['FRA_OIFNAME']}")
        if a.get("FRA_FWMARK") is not None:
            parts.append(f"fwmark {a['FRA_FWMARK']:#x}")
        if a.get("FRA_TABLE") is not None:
            parts.append(f"lookup {_TABLES.get(a['FRA_TABLE'], a['FRA_TABLE'])}")
        return " ".join(parts)


@dataclass(frozen=True)
class IfaceState:
    """Everything about one interface that moves with it."""

    link: Link
    addresses: tuple[Address, ...] = ()
    routes: tuple[Route, ...] = ()  # every table, through this interface
    rules: tuple[Rule, ...] = ()  # naming this interface

    def names(self) -> dict[int, str]:
        return {self.link.index: self.link.name}


def _name(index: int, names: Mapping[int, str] | None) -> str:
    if names and index in names:
        return names[index]
    return f"if{index}"


# ---------------------------------------------------------------------------------------------
# What moves with an interface


def movable_address(a: Address) -> bool:
    """Addresses an administrator (or their network manager) configured: not IPv6 link-local
    and not kernel-made (SLAAC, link-local, loopback: IFA_PROTO) ones, which the kernel
    re-creates on the new device (same MAC, so SLAAC yields the same address)."""
    if a.family == AF_INET6 and IPAddress(a.ip).is_link_local():
        return False
    return a.proto not in IFA_PROTO_KERNEL


def kernel_prefix_route(r: Route, addresses: Iterable[Address]) -> bool:
    """The route the kernel adds for an address by itself (and removes with it): same table
    (main), the address's network, proto kernel, metric = the address's (0 for IPv4, 256 for
    IPv6 by default), unless the address says noprefixroute."""
    if r.proto != RTPROT_KERNEL or r.table != RT_TABLE_MAIN or r.hops:
        return False
    for a in addresses:
        if a.family != r.family or a.flags & IFA_F_NOPREFIXROUTE:
            continue
        default_metric = 256 if a.family == AF_INET6 else 0
        if str(a.network) == r.dst and r.metric == (a.metric or default_metric):
            return True
    return False


def movable_route(r: Route, addresses: Iterable[Address]) -> bool:
    """Routes that must be carried over explicitly: not the local table, not learnt from router
    advertisements or expiring, not IPv6 link-local/multicast, not an address's own prefix route."""
    if r.table == RT_TABLE_LOCAL or r.proto == RTPROT_RA or r.expires:
        return False
    if r.family == AF_INET6:
        net = IPNetwork(r.dst)
        if net.prefixlen and (net.ip.is_link_local() or net.ip.is_multicast()):
            return False
    return not kernel_prefix_route(r, addresses)


def movable(state: IfaceState) -> IfaceState:
    """`state` reduced to what has to be carried to another interface explicitly."""
    addrs = tuple(a for a in state.addresses if movable_address(a))
    routes = tuple(r for r in state.routes if movable_route(r, state.addresses))
    return replace(state, addresses=addrs, routes=routes)


# ---------------------------------------------------------------------------------------------
# Comparing


def differences(
    want: IfaceState, have: IfaceState, *, mac: bool = True, mtu: bool = True, up: bool = True
) -> list[str]:
    """How `have` differs from `want`, as sentences (empty: the same). Compares the movable part
    only (see module docstring), links by name (indexes may change), routes as sets."""
    out: list[str] = []
    w, h = movable(want), movable(have)
    if mac and w.link.mac.lower() != h.link.mac.lower():
        out.append(f"{h.link.name}: MAC {h.link.mac}, was {w.link.mac}")
    if mtu and w.link.mtu != h.link.mtu:
        out.append(f"{h.link.name}: MTU {h.link.mtu}, was {w.link.mtu}")
    if up and w.link.up != h.link.up:
        out.append(
            f"{h.link.name}: link {'up' if h.link.up else 'down'}, was {'up' if w.link.up else 'down'}"
        )
    wa = [a.config() for a in w.addresses]
    ha = [a.config() for a in h.addresses]
    for a in w.addresses:
        if a.config() not in ha:
            out.append(f"{h.link.name}: address {a.render(h.link.name)} is missing")
    for a in h.addresses:
        if a.config() not in wa:
            out.append(f"{h.link.name}: address {a.render(h.link.name)} is extra")
    # Routes through the interface, whatever its index: compare with the index as a role.
    wn, hn = {w.link.index: "<dev>"}, {h.link.index: "<dev>"}
    wr = {r.config(wn) for r in w.routes}
    hr = {r.config(hn) for r in h.routes}
    for r in w.routes:
        if r.config(wn) not in hr:
            out.append(f"route {r.render(w.names())} is missing")
    for r in h.routes:
        if r.config(hn) not in wr:
            out.append(f"route {r.render(h.names())} is extra")
    wrules = {r.renamed(w.link.name, "<dev>").config() for r in w.rules}
    hrules = {r.renamed(h.link.name, "<dev>").config() for r in h.rules}
    for ru in w.rules:
        if ru.renamed(w.link.name, "<dev>").config() not in hrules:
            out.append(f"rule {ru.render()} is missing")
    for ru in h.rules:
        if ru.renamed(h.link.name, "<dev>").config() not in wrules:
            out.append(f"rule {ru.render()} is extra")
    return out


# ---------------------------------------------------------------------------------------------
# JSON (the agent's journal)


def to_json(state: IfaceState) -> dict[str, Any]:
    return asdict(state)


def from_json(d: Mapping[str, Any]) -> IfaceState:
    """Inverse of to_json. Raises KeyError/TypeError/ValueError on a malformed record."""
    link = Link(**d["link"])
    addrs = tuple(Address(**a) for a in d.get("addresses", ()))
    routes = tuple(
        Route(
            **{
                **r,
                "metrics": tuple((str(k), int(v)) for k, v in r.get("metrics", ())),
                "hops": tuple(Hop(**hp) for hp in r.get("hops", ())),
            }
        )
        for r in d.get("routes", ())
    )
    rules = tuple(
        Rule(**{**ru, "attrs": tuple((str(k), v) for k, v in ru.get("attrs", ()))})
        for ru in d.get("rules", ())
    )
    return IfaceState(link, addrs, routes, rules)
