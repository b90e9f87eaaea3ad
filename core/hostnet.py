"""Host interfaces for the node agent (`HostNet`, acting in the process's own netns), through
pyroute2: read an interface's full state as `core.netstate` records and move it. Split out of
core/netlink.py in issue 14, when the plugin's own netlink (pod veths, addresses, routes) moved to
the hand-built rtnetlink of core/rtnl.py: the agent is not on the ADD path and needs far more of
rtnetlink (every address flag, lifetimes, labels, metrics, route tables, multipath hops, rule
selectors), which pyroute2 encodes for it. Only the agent imports this module.

Requests are built field by field from those records and sent with `nlm_request`, not through
pyroute2's argument guessing, because the agent must put back EXACTLY what it took (flags,
lifetimes, labels, metrics, tables, multipath hops, rule selectors). Only named errnos are
tolerated, each where the operation is idempotent: EEXIST when adding what is there,
EADDRNOTAVAIL/ESRCH/ENOENT when deleting what is gone. IPv6 addresses are added with
IFA_F_NODAD and then, when the record had no nodad, replaced with their exact flags: the address
is the node's own, DAD would make it unusable for a second ("tentative") and, while the NIC and
the bridge both hold it, fail on the copy; a flags-only replace does not restart DAD. Dumps are
retried on NetlinkDumpInterrupted (as Go's `netlinksafe` does).

Import cost: `from pyroute2 import IPRoute` costs 100-145 ms, because pyroute2/__init__.py is a
re-export aggregator importing ~40 modules we never use (ipdb, ndb, conntrack, nl80211, plan9,
ipset...); the part we use, `pyroute2.iproute`, is 22-35 ms (`python -X importtime`).
`_lean_pyroute2()` puts the package module in sys.modules from its real spec without running its
__init__, and imports only pyroute2.config.log (the one side effect of that __init__: the
NullHandler on the "pyroute2" logger), pyroute2.iproute.linux and pyroute2.netlink.exceptions.
The stub's module-level __getattr__ runs the real __init__ on the first attribute that is not a
submodule, so any later `from pyroute2 import X` (NDB, IPRoute, ...) still works. find_spec
works with PyInstaller's importer, and packaging/ovs-underlay.spec collects every pyroute2
submodule.
"""

from __future__ import annotations

import errno
import importlib
import importlib.util
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from core.errors import CoreError
from core.netstate import AF_INET6, FOREVER, IFA_F_SECONDARY, Address, Hop, IfaceState, Link, Route, Rule

_log = logging.getLogger("ovs-underlay.hostnet")


def _lean_pyroute2() -> None:
    """Register the pyroute2 package without executing its __init__ (see the module docstring).
    A no-op when pyroute2 is already imported (by anyone, lean or not)."""
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.loader is None:
        raise ImportError("pyroute2 is not installed", name="pyroute2")
    loader = spec.loader
    pkg = importlib.util.module_from_spec(spec)
    lock = threading.RLock()
    state = {"ran_init": False}

    def __getattr__(name: str) -> Any:  # module-level __getattr__ (PEP 562)
        sub = f"pyroute2.{name}"
        if sub in sys.modules:  # a submodule still being imported (circular imports)
            return sys.modules[sub]
        if importlib.util.find_spec(sub) is not None:  # `from pyroute2 import config`
            return importlib.import_module(sub)
        with lock:
            if not state["ran_init"]:
                state["ran_init"] = True
                _log.debug("pyroute2.%s requested: running the full pyroute2 __init__", name)
                loader.exec_module(pkg)
        try:
            return pkg.__dict__[name]
        except KeyError:
            raise AttributeError(f"module 'pyroute2' has no attribute {name!r}") from None

    setattr(pkg, "__getattr__", __getattr__)  # noqa: B010 (mypy: ModuleType has no such attribute)
    sys.modules["pyroute2"] = pkg


_lean_pyroute2()

import pyroute2.config.log  # noqa: E402,F401  (the "pyroute2" logger's NullHandler)
from pyroute2.iproute.linux import IPRoute  # noqa: E402
from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST  # noqa: E402
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError  # noqa: E402
from pyroute2.netlink.rtnl import RTM_DELADDR, RTM_DELRULE, RTM_NEWADDR, RTM_NEWROUTE, RTM_NEWRULE  # noqa: E402
from pyroute2.netlink.rtnl.fibmsg import fibmsg  # noqa: E402
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg  # noqa: E402
from pyroute2.netlink.rtnl.rtmsg import rtmsg  # noqa: E402

T = TypeVar("T")
IFA_F_NODAD = 0x02
IFF_UP = 1
_ADD = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
_REPLACE = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
_DEL = NLM_F_REQUEST | NLM_F_ACK


def _retry(fn: Callable[[], T], what: str) -> T:
    for attempt in range(5):
        try:
            return fn()
        except NetlinkDumpInterrupted:
            _log.debug("%s: dump interrupted, retry %d", what, attempt + 1)
            time.sleep(0.01 * (attempt + 1))
    return fn()


def _nl_error(what: str, exc: NetlinkError) -> CoreError:
    return CoreError(f"{what}: {os.strerror(exc.code)} (errno {exc.code})")



# ---------------------------------------------------------------------------------------------
# Messages -> records


def link_of(msg: Any) -> Link:
    kind, vlan_id = "", None
    info = msg.get("IFLA_LINKINFO")
    if info is not None:
        kind = str(info.get("IFLA_INFO_KIND") or "")
        data = info.get("IFLA_INFO_DATA")
        if kind == "vlan" and data is not None:
            vlan_id = data.get("IFLA_VLAN_ID")
    return Link(
        name=str(msg.get("IFLA_IFNAME")),
        index=int(msg["index"]),
        mac=str(msg.get("IFLA_ADDRESS") or ""),
        mtu=int(msg.get("IFLA_MTU") or 0),
        up=bool(msg["flags"] & IFF_UP),
        kind=kind,
        master=msg.get("IFLA_MASTER"),
        vlan_id=vlan_id,
        vlan_link=msg.get("IFLA_LINK") if kind == "vlan" else None,
        alias=str(msg.get("IFLA_IFALIAS") or ""),
    )


def address_of(msg: Any) -> Address:
    local, addr = msg.get("IFA_LOCAL"), msg.get("IFA_ADDRESS")
    ip = local or addr
    peer = addr if local and addr and addr != local else ""
    ci = msg.get("IFA_CACHEINFO") or {}
    valid, pref = ci.get("ifa_valid", FOREVER), ci.get("ifa_preferred", FOREVER)
    flags = msg.get("IFA_FLAGS")
    return Address(
        address=f"{ip}/{msg['prefixlen']}",
        flags=int(flags if flags is not None else msg["flags"]),
        scope=int(msg["scope"]),
        label=str(msg.get("IFA_LABEL") or ""),
        broadcast=str(msg.get("IFA_BROADCAST") or ""),
        peer=f"{peer}/{msg['prefixlen']}" if peer else "",
        metric=int(msg.get("IFA_RT_PRIORITY") or 0),
        proto=int(msg.get("IFA_PROTO") or 0),
        valid_lft=None if valid == FOREVER else int(valid),
        preferred_lft=None if pref == FOREVER else int(pref),
    )


def route_of(msg: Any, names: dict[int, str]) -> Route:
    fam = msg["family"]
    dst = msg.get("RTA_DST")
    any_ = "::" if fam == socket.AF_INET6 else "0.0.0.0"
    src = msg.get("RTA_SRC")
    hops = tuple(
        Hop(
            oif=int(h["oif"]),
            gateway=str(dict(h.get("attrs", [])).get("RTA_GATEWAY") or ""),
            weight=int(h.get("hops", 0)) + 1,
            flags=int(h.get("flags", 0)),
            dev=names.get(int(h["oif"]), ""),
        )
        for h in (msg.get("RTA_MULTIPATH") or ())
    )
    metrics = msg.get("RTA_METRICS")
    mlist = tuple((str(k), int(v)) for k, v in (metrics.get("attrs", []) if metrics is not None else []))
    expires = msg.get("RTA_EXPIRES")
    return Route(
        dst=f"{dst or any_}/{msg['dst_len']}",
        table=int(msg.get("RTA_TABLE") or msg["table"]),
        oif=int(msg.get("RTA_OIF") or 0),
        gateway=str(msg.get("RTA_GATEWAY") or ""),
        prefsrc=str(msg.get("RTA_PREFSRC") or ""),
        src=f"{src}/{msg['src_len']}" if src else "",
        metric=int(msg.get("RTA_PRIORITY") or 0),
        proto=int(msg["proto"]),
        scope=int(msg["scope"]),
        type=int(msg["type"]),
        tos=int(msg["tos"]),
        flags=int(msg["flags"]) & 0xFF,
        pref=msg.get("RTA_PREF"),
        metrics=mlist,
        hops=hops,
        expires=int(expires) if expires else None,
    )


def rule_of(msg: Any) -> Rule:
    attrs = tuple((str(k), v) for k, v in msg["attrs"] if isinstance(k, str) and k != "FRA_PRIORITY")
    return Rule(
        family=int(msg["family"]),
        action=int(msg["action"]),
        priority=int(msg.get("FRA_PRIORITY") or 0),
        attrs=attrs,
        dst_len=int(msg["dst_len"]),
        src_len=int(msg["src_len"]),
        tos=int(msg["tos"]),
        flags=int(msg["flags"]),
    )


# ---------------------------------------------------------------------------------------------
# Records -> messages (pure)


def address_msg(index: int, a: Address, flags: int) -> ifaddrmsg:
    ip, plen = a.address.split("/")
    msg = ifaddrmsg()
    msg["family"] = AF_INET6 if a.family == AF_INET6 else socket.AF_INET
    msg["prefixlen"] = int(plen)
    msg["flags"] = flags & 0xFF
    msg["scope"] = a.scope
    msg["index"] = index
    attrs: list[tuple[str, Any]] = [
        ("IFA_LOCAL", ip),
        ("IFA_ADDRESS", a.peer.split("/")[0] if a.peer else ip),
    ]
    if a.family == AF_INET6:
        attrs = [("IFA_ADDRESS", ip)]
    attrs.append(("IFA_FLAGS", flags))
    if a.label:
        attrs.append(("IFA_LABEL", a.label))
    if a.broadcast:
        attrs.append(("IFA_BROADCAST", a.broadcast))
    if a.metric:
        attrs.append(("IFA_RT_PRIORITY", a.metric))
    if a.proto:
        attrs.append(("IFA_PROTO", a.proto))
    if a.valid_lft is not None or a.preferred_lft is not None:
        attrs.append(
            (
                "IFA_CACHEINFO",
                {
                    "ifa_preferred": FOREVER if a.preferred_lft is None else a.preferred_lft,
                    "ifa_valid": FOREVER if a.valid_lft is None else a.valid_lft,
                    "cstamp": 0,
                    "tstamp": 0,
                },
            )
        )
    msg["attrs"] = attrs
    return msg


def route_msg(r: Route) -> rtmsg:
    ip, plen = r.dst.split("/")
    msg = rtmsg()
    msg["family"] = AF_INET6 if r.family == AF_INET6 else socket.AF_INET
    msg["dst_len"] = int(plen)
    msg["src_len"] = int(r.src.split("/")[1]) if r.src else 0
    msg["tos"] = r.tos
    msg["table"] = r.table if r.table < 256 else 0
    msg["proto"] = r.proto
    msg["scope"] = r.scope
    msg["type"] = r.type
    msg["flags"] = r.flags
    attrs: list[tuple[str, Any]] = [("RTA_TABLE", r.table)]
    if int(plen):
        attrs.append(("RTA_DST", ip))
    if r.src:
        attrs.append(("RTA_SRC", r.src.split("/")[0]))
    if r.oif:
        attrs.append(("RTA_OIF", r.oif))
    if r.gateway:
        attrs.append(("RTA_GATEWAY", r.gateway))
    if r.metric:
        attrs.append(("RTA_PRIORITY", r.metric))
    if r.prefsrc:
        attrs.append(("RTA_PREFSRC", r.prefsrc))
    if r.pref is not None:
        attrs.append(("RTA_PREF", r.pref))
    if r.metrics:
        attrs.append(("RTA_METRICS", {"attrs": [list(m) for m in r.metrics]}))
    if r.hops:
        attrs.append(
            (
                "RTA_MULTIPATH",
                [
                    {
                        "oif": h.oif,
                        "hops": h.weight - 1,
                        "flags": h.flags,
                        "attrs": [("RTA_GATEWAY", h.gateway)] if h.gateway else [],
                    }
                    for h in r.hops
                ],
            )
        )
    msg["attrs"] = attrs
    return msg


def rule_msg(r: Rule) -> fibmsg:
    msg = fibmsg()
    msg["family"] = r.family
    msg["dst_len"] = r.dst_len
    msg["src_len"] = r.src_len
    msg["tos"] = r.tos
    table = dict(r.attrs).get("FRA_TABLE") or 0
    msg["table"] = table if table < 256 else 0
    msg["action"] = r.action
    msg["flags"] = r.flags
    msg["attrs"] = [*([("FRA_PRIORITY", r.priority)] if r.priority else []), *[(k, v) for k, v in r.attrs]]
    return msg


# ---------------------------------------------------------------------------------------------
# The driver


class HostNet:
    """Links, addresses, routes and rules of this process's network namespace. One netlink
    socket, opened on first use; `close()` releases it. Not thread-safe."""

    def __init__(self) -> None:
        self._ipr: Any = None

    def _nl(self) -> Any:
        if self._ipr is None:
            ipr = IPRoute()
            # nlm_request() returns a tuple only when this status key is False; pyroute2 0.9's
            # IPRoute never sets it (KeyError otherwise).
            ipr.asyncore.status["nlm_generator"] = False
            self._ipr = ipr
        return self._ipr

    def close(self) -> None:
        if self._ipr is not None:
            ipr, self._ipr = self._ipr, None
            ipr.close()

    # -- reads -----------------------------------------------------------------------------

    def _get_link(self, name: str) -> Any | None:
        try:
            return _retry(lambda: self._nl().link("get", ifname=name)[0], f"get link {name}")
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT):
                return None
            raise _nl_error(f"read link {name}", exc) from exc

    def link(self, name: str) -> Link | None:
        msg = self._get_link(name)
        return link_of(msg) if msg is not None else None

    def addresses(self, name: str) -> list[Address]:
        link = self.link(name)
        if link is None:
            return []
        return [
            address_of(m)
            for m in _retry(lambda: list(self._nl().addr("dump")), "dump addresses")
            if m["index"] == link.index
        ]

    def iface_state(self, name: str) -> IfaceState | None:
        """The link, its addresses (in kernel order: primary first), the routes of every table
        that go through it (oif or a multipath hop) and the rules naming it (iif/oif)."""
        link = self.link(name)
        if link is None:
            return None
        nl = self._nl()
        addrs = [
            address_of(m)
            for m in _retry(lambda: list(nl.addr("dump")), "dump addresses")
            if m["index"] == link.index
        ]
        msgs = _retry(lambda: list(nl.route("dump")), "dump routes")
        names: dict[int, str] = {}
        if any(m.get("RTA_MULTIPATH") for m in msgs):
            names = {
                int(m["index"]): str(m.get("IFLA_IFNAME"))
                for m in _retry(lambda: list(nl.link("dump")), "dump links")
            }
        routes = [r for r in (route_of(m, names) for m in msgs) if r.uses(link.index)]
        rules = [
            r
            for r in (rule_of(m) for m in _retry(lambda: list(nl.rule("dump")), "dump rules"))
            if r.names(name)
        ]
        return IfaceState(link, tuple(addrs), tuple(routes), tuple(rules))

    # -- writes ----------------------------------------------------------------------------

    def _index(self, dev: str) -> int:
        link = self.link(dev)
        if link is None:
            raise CoreError(f"interface {dev} does not exist")
        return link.index

    def add_address(self, dev: str, a: Address) -> None:
        """Add `a` to `dev` with its exact flags (see module docstring for IPv6). Present: fine."""
        idx = self._index(dev)
        flags = a.flags & ~IFA_F_SECONDARY
        first = flags | IFA_F_NODAD if a.family == AF_INET6 else flags
        try:
            self._nl().nlm_request(address_msg(idx, a, first), RTM_NEWADDR, _ADD)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise _nl_error(f"add address {a.address} to {dev}", exc) from exc
            return
        if first != flags:
            try:
                self._nl().nlm_request(address_msg(idx, a, flags), RTM_NEWADDR, _REPLACE)
            except NetlinkError as exc:
                raise _nl_error(f"set the flags of address {a.address} on {dev}", exc) from exc

    def delete_address(self, dev: str, a: Address) -> None:
        link = self.link(dev)
        if link is None:
            return
        try:
            self._nl().nlm_request(address_msg(link.index, a, a.flags), RTM_DELADDR, _DEL)
        except NetlinkError as exc:
            if exc.code not in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ENODEV):
                raise _nl_error(f"delete address {a.address} from {dev}", exc) from exc

    def replace_route(self, r: Route) -> None:
        """Install `r`, replacing the route with the same key (table, dst, tos, metric): atomic."""
        try:
            self._nl().nlm_request(route_msg(r), RTM_NEWROUTE, _REPLACE)
        except NetlinkError as exc:
            raise _nl_error(f"replace route {r.dst} (table {r.table})", exc) from exc

    def add_rule(self, r: Rule) -> None:
        try:
            self._nl().nlm_request(rule_msg(r), RTM_NEWRULE, _ADD)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise _nl_error(f"add rule {r.render()}", exc) from exc

    def delete_rule(self, r: Rule) -> None:
        try:
            self._nl().nlm_request(rule_msg(r), RTM_DELRULE, _DEL)
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.ESRCH):
                raise _nl_error(f"delete rule {r.render()}", exc) from exc

    def set_link(
        self, name: str, *, mac: str | None = None, mtu: int | None = None, up: bool | None = None
    ) -> None:
        idx = self._index(name)
        kw: dict[str, Any] = {}
        if mac:
            kw["address"] = mac
        if mtu:
            kw["mtu"] = mtu
        if up is not None:
            kw["state"] = "up" if up else "down"
        if not kw:
            return
        try:
            self._nl().link("set", index=idx, **kw)
        except NetlinkError as exc:
            raise _nl_error(f"set {', '.join(kw)} of {name}", exc) from exc
