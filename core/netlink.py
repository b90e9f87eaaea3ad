"""Netlink boundary: the only module that imports pyroute2.

Why: kernel link/address/route changes for one attachment, reached through netns-bound sockets.
The process never switches its own netns. Dumps are retried on NetlinkDumpInterrupted (as Go's
`netlinksafe` does); only named errnos are tolerated (ENODEV/ENOENT on delete, EEXIST on
re-adding an identical address), everything else propagates as a neutral `core.errors` error
(each program maps it at its edge): a pod netns that cannot be opened is `NetnsUnusable`, a pod
interface that exists already is `AlreadyExists`, a host link of our name without our alias is
`NotOwned`, anything else `CoreError` naming the operation and the errno.

Pod-netns sockets (issue 6; numbers measured on the 2-core CI box, pyroute2 0.9.7):
`IPRoute(netns=path, flags=0)` forks a child per socket in pyroute2 0.9 (netns.create_socket ->
ChildProcess), ~4-9 ms per open, and a dual-stack ADD opened 4 of them. Instead the
NETLINK_ROUTE socket is made by `core.netns.socket_in_netns` (a short-lived thread
setns()es, creates the socket, exits: ~0.1 ms, no fork) and handed to `IPRoute(use_socket=...)`.
It opens the path read-only, so a missing path fails exactly as `flags=0` does (no netns is ever
created). A `Netlink` keeps ONE host IPRoute and ONE IPRoute per pod netns for the life of a
verb and `close()` (called by `Drivers.close()`) releases them: one object = one invocation.
Missing netns: ADD steps raise NetnsUnusable; `pod_state` returns None (gone).
Host links for GC and the reconciler: `host_links(prefix)` lists links by alias prefix in one
dump (with their ifindex), and `delete_host_link(..., index=)` deletes only the link that was
judged: one deleted and re-created under the same name has a new index and stays.

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

Announcements (gratuitous ARP / unsolicited NA, frames from core.frames), sent inside the pod
netns through core.netns: one GARP per IPv4 address and one NA per IPv6 address, sent at once (as
ovs-cni does: no repeats, no sleeps). The old sender cost ~30 ms per IPv4 address, all in the
kernel's RCU grace period (synchronize_net, ~13 ms here): AF_PACKET bound to ETH_P_ARP paid it
twice, on bind() (re-hooking the protocol) and on close() (packet_release). The socket now has
protocol 0 (no receive hook, so no bind) and sendto()s to (ifname, ETH_P_ARP); sendto transmits
synchronously, so the frame is on the wire when it returns, and the unavoidable close() runs on
the closer thread (core.netns.close_later). The NA does not open a (forking) IPRoute just to
learn the ifindex: SIOCGIFINDEX on its own socket answers in the pod netns.
Host interfaces for the node agent (`HostNet`, acting in the process's own netns): read an
interface's full state as `core.netstate` records and move it. Requests are built field by field
from those records and sent with `nlm_request`, not through pyroute2's argument guessing,
because the agent must put back EXACTLY what it took (flags, lifetimes, labels, metrics, tables,
multipath hops, rule selectors). Only named errnos are tolerated, each where the operation is
idempotent: EEXIST when adding what is there, EADDRNOTAVAIL/ESRCH/ENOENT when deleting what is
gone. IPv6 addresses are added with IFA_F_NODAD and then, when the record had no nodad,
replaced with their exact flags: the address is the node's own, DAD would make it unusable for
a second ("tentative") and, while the NIC and the bridge both hold it, fail on the copy; a
flags-only replace does not restart DAD.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar

from netaddr import IPAddress, IPNetwork

from core.errors import AlreadyExists, CoreError, NetnsUnusable, NotOwned
from core.frames import ETH_P_ARP, arp_announcement, unsolicited_na
from core.names import ALIAS_PREFIX, Alias, parse_alias, same_attachment
from core.netns import close_later, ifindex, open_netns, socket_in_netns
from core.netstate import AF_INET6, FOREVER, IFA_F_SECONDARY, Address, Hop, IfaceState, Link, Route, Rule

_log = logging.getLogger("ovs-underlay.netlink")


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
RT_PROTO_STATIC = 4
RT_PROTO_BOOT = 3
IFF_UP = 1
NETLINK_ROUTE = 0
NL_BUFSIZE = 1 << 20  # what pyroute2 sets on the sockets it creates itself
_GONE = (errno.ENOENT, errno.EINVAL)  # no such path / the path is not a netns (any more)
_ADD = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
_REPLACE = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
_DEL = NLM_F_REQUEST | NLM_F_ACK


class RouteLike(Protocol):
    """A route to install (the CNI result's route type satisfies it)."""

    @property
    def dst(self) -> IPNetwork: ...
    @property
    def gw(self) -> IPAddress | None: ...
    @property
    def mtu(self) -> int: ...
    @property
    def advmss(self) -> int: ...
    @property
    def priority(self) -> int: ...
    @property
    def table(self) -> int | None: ...
    @property
    def scope(self) -> int | None: ...


class PodRoute(NamedTuple):
    dst: IPNetwork
    gw: IPAddress | None


@dataclass(frozen=True)
class PodLink:
    ifname: str
    index: int
    mac: str
    mtu: int
    up: bool
    host_mac: str = ""


@dataclass(frozen=True)
class HostLink:
    """A link of the host netns as one dump shows it."""

    name: str
    index: int
    alias: str
    kind: str  # IFLA_INFO_KIND ("veth", ...); "" when the kernel gives none


@dataclass(frozen=True)
class PodState:
    link: PodLink
    addresses: tuple[IPNetwork, ...]  # global-scope addresses
    routes: tuple[PodRoute, ...]  # main-table unicast routes with a gateway or non-kernel proto


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


def open_pod_iproute(netns: str) -> Any:
    """An IPRoute on a NETLINK_ROUTE socket created inside `netns` without forking (see the
    module docstring). Raises OSError (ENOENT: no such path; EINVAL: not a netns). The caller
    closes it (`close()` also closes the socket)."""
    sock = socket_in_netns(netns, socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, NL_BUFSIZE)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, NL_BUFSIZE)
        return IPRoute(use_socket=sock)
    except BaseException:
        sock.close()
        raise


class Netlink:
    """Link/address/route operations on the host and in pod netns. Create one per invocation and
    `close()` it at the end (the plugin's Drivers.close does): it keeps one host socket and one
    socket per pod netns open in between. Not thread-safe (pyroute2 sockets are bound to their
    creating thread)."""

    def __init__(self) -> None:
        self._host: Any = None
        self._pods: dict[str, Any] = {}

    def close(self) -> None:
        """Close every cached socket. Idempotent; the object can be used again afterwards."""
        conns = [*self._pods.values(), *([self._host] if self._host is not None else [])]
        self._pods.clear()
        self._host = None
        for ipr in conns:
            try:
                ipr.close()
            except Exception as exc:  # closing must not mask the verb's outcome
                _log.debug("closing a netlink socket: %s", exc)

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _host_ipr(self) -> Any:
        if self._host is None:
            self._host = IPRoute()
        return self._host

    def _pod(self, netns: str) -> Any:
        """The cached pod-netns IPRoute; a netns that cannot be opened raises NetnsUnusable."""
        ipr = self._pods.get(netns)
        if ipr is None:
            try:
                ipr = open_pod_iproute(netns)
            except OSError as exc:
                kind = NetnsUnusable if exc.errno in _GONE else CoreError
                raise kind(f"cannot open netlink in netns {netns}: {exc.strerror or exc}") from exc
            self._pods[netns] = ipr
        return ipr

    # -- host side -------------------------------------------------------------------------

    def host_link_alias(self, name: str) -> str | None:
        """The alias of host link `name`, "" when it has none, None when it does not exist."""
        ipr = self._host_ipr()
        try:
            msg = _retry(lambda: ipr.link("get", ifname=name)[0], f"get link {name}")
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT):
                return None
            raise _nl_error(f"get link {name}", exc) from exc
        return str(msg.get("ifalias") or "")

    def host_links(self, alias_prefix: str) -> list[HostLink]:
        """Every link of the host netns whose alias starts with `alias_prefix`, from one dump
        (a reconciler or GC lists the links it may own; the caller judges ownership)."""
        ipr = self._host_ipr()
        try:
            msgs = _retry(lambda: list(ipr.link("dump")), "dump host links")
        except NetlinkError as exc:
            raise _nl_error("dump host links", exc) from exc
        out = []
        for msg in msgs:
            alias = str(msg.get("ifalias") or "")
            if alias_prefix and alias.startswith(alias_prefix):
                kind = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
                out.append(HostLink(str(msg.get("ifname")), int(msg["index"]), alias, str(kind or "")))
        return out

    def delete_host_link(self, name: str, alias: str, index: int | None = None) -> bool:
        """Delete host link `name` only if its alias names the same attachment as `alias`
        (core.names.same_attachment: container id and ifname) and, when `index` is given, only if
        it is still that link: one deleted and re-created under the same name since the caller
        looked has another index and is left alone. True if deleted."""
        ipr = self._host_ipr()
        try:
            msg = _retry(lambda: ipr.link("get", ifname=name)[0], f"get link {name}")
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT):
                return False
            raise _nl_error(f"get link {name}", exc) from exc
        have = msg.get("ifalias") or ""
        if not same_attachment(have, alias):
            _log.warning("not deleting link %s: alias %r is not %r", name, have, alias)
            return False
        if index is not None and int(msg["index"]) != index:
            _log.info("not deleting link %s: it was re-created (index %s, expected %d)", name,
                      msg["index"], index)
            return False
        try:
            ipr.link("del", index=msg["index"])
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT):
                return False
            raise _nl_error(f"delete link {name}", exc) from exc
        return True

    def owned_host_links(self) -> list[tuple[str, Alias]]:
        """Every host link whose alias marks it as one of ours: (name, parsed alias). One dump;
        for GC (core.orphans judges the same listing, with ifindexes, for the reconciler)."""
        out = []
        for ln in self.host_links(ALIAS_PREFIX):
            alias = parse_alias(ln.alias)
            if alias is not None:
                out.append((ln.name, alias))
        return out

    def create_veth(self, *, host: str, netns: str, ifname: str, alias: str, mtu: int | None,
                    mac: str | None) -> PodLink:
        """Create the pair with the pod end directly in `netns` named `ifname`; set the host
        end's alias, MTU and up; the pod end's MTU, MAC and up. Raises AlreadyExists when
        `ifname` already exists in the netns, NotOwned when `host` exists without our alias."""
        pod = self._pod(netns)
        if _retry(lambda: pod.link_lookup(ifname=ifname), "lookup"):
            raise AlreadyExists(f"interface {ifname} already exists in netns {netns}",
                                "CNI_IFNAME must not exist in the container before ADD")
        have = self.host_link_alias(host)
        if have is not None:
            if not same_attachment(have, alias):
                raise NotOwned(f"host link {host} exists and is not ours (alias {have!r})")
            _log.info("removing stale host link %s left by an earlier attempt", host)
            self.delete_host_link(host, alias)
        peer: dict[str, Any] = {"ifname": ifname}
        if mtu:
            peer["mtu"] = mtu
        if mac:
            peer["address"] = mac
        try:
            fd = open_netns(netns)
        except OSError as exc:
            raise NetnsUnusable(f"cannot open netns {netns}: {exc.strerror or exc}") from exc
        try:
            peer["net_ns_fd"] = fd
            kw: dict[str, Any] = {"mtu": mtu} if mtu else {}
            ipr = self._host_ipr()
            try:
                ipr.link("add", ifname=host, kind="veth", peer=peer, **kw)
            except NetlinkError as exc:
                if exc.code == errno.EEXIST:
                    raise AlreadyExists(f"cannot create veth {host}/{ifname}: {ifname} exists in {netns} "
                                        f"or {host} exists on the host") from exc
                raise _nl_error(f"create veth {host} (peer {ifname} in {netns})", exc) from exc
        finally:
            os.close(fd)
        # The pair exists from here on: any failure below removes it again (deleting the host
        # end deletes both), so the caller's rollback only ever covers a create_veth that
        # returned. Seen before: a 250-character container id made the alias too long, and the
        # pair was left behind.
        try:
            return self._finish_veth(host, netns, ifname, alias)
        except BaseException as exc:
            self._remove_new_veth(host, exc)
            if isinstance(exc, NetlinkError):
                raise _nl_error(f"set up veth {host} (peer {ifname} in {netns})", exc) from exc
            raise

    def _finish_veth(self, host: str, netns: str, ifname: str, alias: str) -> PodLink:
        ipr = self._host_ipr()
        try:
            made = ipr.link("get", ifname=host)[0]
        except NetlinkError as exc:
            raise CoreError(f"veth {host} vanished after creation: {exc}") from exc
        ipr.link("set", index=made["index"], ifalias=alias, state="up")
        host_mac = str(made.get("address"))  # alias and state do not change the MAC
        pod = self._pod(netns)
        msg = _retry(lambda: pod.link("get", ifname=ifname)[0], "get pod link")
        pod.link("set", index=msg["index"], state="up")
        return PodLink(ifname, int(msg["index"]), str(msg.get("address")), int(msg.get("mtu")), True,
                       host_mac)

    def _remove_new_veth(self, host: str, why: BaseException) -> None:
        """Delete the pair this call just created (by name: its alias may not be set yet)."""
        try:
            self._host_ipr().link("del", ifname=host)
        except NetlinkError as exc:
            if exc.code not in (errno.ENODEV, errno.ENOENT):
                _log.warning("could not remove veth %s after a failed set-up (%s): %s", host, why, exc)
        else:
            _log.info("removed veth %s after a failed set-up: %s", host, why)

    # -- pod side --------------------------------------------------------------------------

    def set_pod_mac(self, *, netns: str, ifname: str, mac: str) -> None:
        pod = self._pod(netns)
        idx = _retry(lambda: pod.link_lookup(ifname=ifname), "lookup")
        if not idx:
            raise CoreError(f"interface {ifname} is missing in {netns}")
        try:
            pod.link("set", index=idx[0], address=mac)
        except NetlinkError as exc:
            raise _nl_error(f"set MAC {mac} on {ifname}", exc) from exc

    def configure(self, *, netns: str, ifname: str, addresses: Sequence[IPNetwork],
                  routes: Sequence[RouteLike]) -> None:
        """Add addresses (IPv6 without DAD: conflicts were probed by ipamd) and routes."""
        pod = self._pod(netns)
        idx = _retry(lambda: pod.link_lookup(ifname=ifname), "lookup")
        if not idx:
            raise CoreError(f"interface {ifname} is missing in {netns}")
        for address in addresses:
            kw: dict[str, Any] = {"flags": IFA_F_NODAD} if address.version == 6 else {}
            try:
                pod.addr("add", index=idx[0], address=str(address.ip), prefixlen=address.prefixlen, **kw)
            except NetlinkError as exc:
                raise _nl_error(f"add address {address} to {ifname}", exc) from exc
        for r in routes:
            kw = {"dst": str(r.dst), "oif": idx[0]}
            if r.gw is not None:
                kw["gateway"] = str(r.gw)
            if r.priority:
                kw["priority"] = r.priority
            if r.table is not None:
                kw["table"] = r.table
            if r.scope is not None:
                kw["scope"] = r.scope
            if r.mtu or r.advmss:
                metrics = {}
                if r.mtu:
                    metrics["RTAX_MTU"] = r.mtu
                if r.advmss:
                    metrics["RTAX_ADVMSS"] = r.advmss
                kw["metrics"] = {"attrs": list(metrics.items())}
            try:
                pod.route("add", **kw)
            except NetlinkError as exc:
                raise _nl_error(f"add route {r.dst} via {r.gw} dev {ifname}", exc) from exc

    def raise_pod_link_if_down(self, netns: str, ifname: str) -> bool:
        """Set the pod link up if it exists and is down (a main plugin such as bridge or macvlan
        leaves it down until after IPAM, but probes cannot send through a down link).
        Returns True when it was raised; False when it was already up or is not there yet.
        Uses its own socket, closed before returning: the IPAM plugin calls this on a
        throwaway Netlink() that it never closes."""
        try:
            pod = open_pod_iproute(netns)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENODEV):
                return False
            raise CoreError(f"open netlink in {netns}: {exc}") from exc
        with pod:
            try:
                msg = _retry(lambda: pod.link("get", ifname=ifname)[0], "get pod link")
                if int(msg.get("flags", 0)) & IFF_UP:
                    return False
                pod.link("set", index=int(msg["index"]), state="up")
            except NetlinkError as exc:
                if exc.code in (errno.ENODEV, errno.ENOENT):
                    return False
                raise _nl_error(f"set {ifname} up in {netns} for the probes", exc) from exc
        return True

    def set_pod_link_down(self, netns: str, ifname: str) -> None:
        """Undo raise_pod_link_if_down. A link or netns that is gone already is fine. Own
        socket, as raise_pod_link_if_down."""
        try:
            with open_pod_iproute(netns) as pod:
                pod.link("set", ifname=ifname, state="down")
        except NetlinkError as exc:
            if exc.code not in (errno.ENODEV, errno.ENOENT):
                raise _nl_error(f"set {ifname} down in {netns}", exc) from exc
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENODEV):
                raise CoreError(f"open netlink in {netns}: {exc}") from exc

    def pod_state(self, netns: str, ifname: str) -> PodState | None:
        """The pod interface as the kernel sees it, or None when the netns or link is gone."""
        try:
            pod = self._pod(netns)
        except NetnsUnusable:  # ENOENT / EINVAL: the netns is gone
            return None
        try:
            msg = _retry(lambda: pod.link("get", ifname=ifname)[0], "get pod link")
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT):
                return None
            raise _nl_error(f"get {ifname} in {netns}", exc) from exc
        idx = int(msg["index"])
        link = PodLink(ifname, idx, str(msg.get("address")), int(msg.get("mtu")),
                       msg.get("flags", 0) & 1 == 1)
        addrs = []
        for a in _retry(lambda: list(pod.addr("dump", index=idx)), "dump addrs"):
            if a["scope"] != 0:
                continue
            addrs.append(IPNetwork(f"{a.get('address')}/{a['prefixlen']}"))
        routes = []
        for r in _retry(lambda: list(pod.route("dump", oif=idx)), "dump routes"):
            if r["type"] != 1 or r.get("table") not in (254, None):
                continue
            fam = "0.0.0.0/0" if r["family"] == socket.AF_INET else "::/0"
            dst = IPNetwork(f"{r.get('dst')}/{r['dst_len']}") if r.get("dst") else IPNetwork(fam)
            gw = r.get("gateway")
            routes.append(PodRoute(dst=dst.cidr, gw=IPAddress(gw) if gw else None))
        return PodState(link, tuple(addrs), tuple(routes))

    def announce(self, *, netns: str, ifname: str, addresses: Sequence[IPAddress], mac: str) -> None:
        """Gratuitous ARP (IPv4) / unsolicited neighbour advertisement (IPv6) so the switch
        fabric and neighbours learn the new address and MAC at once: one of each per address,
        sent now, nothing repeated or awaited. Failures are logged: announcing is an
        optimisation, never a reason to fail ADD."""
        v4 = [ip for ip in addresses if ip.version == 4]
        if v4:
            try:
                _garp(netns, ifname, v4, mac)
            except OSError as exc:
                _log.warning("announcing %s on %s failed: %s", ",".join(map(str, v4)), ifname, exc)
        for ip in addresses:
            if ip.version != 6:
                continue
            try:
                _unsolicited_na(netns, ifname, ip, mac)
            except OSError as exc:
                _log.warning("announcing %s on %s failed: %s", ip, ifname, exc)


def _garp(netns: str, ifname: str, ips: Sequence[IPAddress], mac: str) -> None:
    """One ARP announcement per address out of `ifname`, from one send-only packet socket
    (protocol 0: no receive hook to install, so no bind() and no grace period there)."""
    sock = socket_in_netns(netns, socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        for ip in ips:
            sock.sendto(arp_announcement(mac, ip), (ifname, ETH_P_ARP))
    finally:
        close_later(sock)


def _unsolicited_na(netns: str, ifname: str, ip: IPAddress, mac: str) -> None:
    sock = socket_in_netns(netns, socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    with sock:
        idx = ifindex(sock, ifname)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, idx)
        sock.bind((str(ip), 0, 0, 0))
        sock.sendto(unsolicited_na(ip, mac), ("ff02::1", 0, 0, idx))


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
