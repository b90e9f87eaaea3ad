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
from core.netns import close_later, ifindex, socket_in_netns

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
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError  # noqa: E402

T = TypeVar("T")
IFA_F_NODAD = 0x02
RT_PROTO_STATIC = 4
RT_PROTO_BOOT = 3
IFF_UP = 1
NETLINK_ROUTE = 0
NL_BUFSIZE = 1 << 20  # what pyroute2 sets on the sockets it creates itself
_GONE = (errno.ENOENT, errno.EINVAL)  # no such path / the path is not a netns (any more)


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
            raise
        return str(msg.get("ifalias") or "")

    def delete_host_link(self, name: str, alias: str) -> bool:
        """Delete host link `name` only if its alias is exactly `alias`. True if deleted."""
        ipr = self._host_ipr()
        try:
            msg = _retry(lambda: ipr.link("get", ifname=name)[0], f"get link {name}")
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT):
                return False
            raise
        have = msg.get("ifalias") or ""
        if have != alias:
            _log.warning("not deleting link %s: alias %r is not %r", name, have, alias)
            return False
        try:
            ipr.link("del", index=msg["index"])
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT):
                return False
            raise
        return True

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
            if have != alias:
                raise NotOwned(f"host link {host} exists and is not ours (alias {have!r})")
            _log.info("removing stale host link %s left by an earlier attempt", host)
            self.delete_host_link(host, alias)
        peer: dict[str, Any] = {"ifname": ifname}
        if mtu:
            peer["mtu"] = mtu
        if mac:
            peer["address"] = mac
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
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
            try:
                made = ipr.link("get", ifname=host)[0]
            except NetlinkError as exc:
                raise CoreError(f"veth {host} vanished after creation: {exc}") from exc
            ipr.link("set", index=made["index"], ifalias=alias, state="up")
            host_mac = str(made.get("address"))  # alias and state do not change the MAC
        finally:
            os.close(fd)
        msg = _retry(lambda: pod.link("get", ifname=ifname)[0], "get pod link")
        pod.link("set", index=msg["index"], state="up")
        return PodLink(ifname, int(msg["index"]), str(msg.get("address")), int(msg.get("mtu")), True,
                       host_mac)

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
            raise
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
