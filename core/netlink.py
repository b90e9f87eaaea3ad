"""Netlink boundary: link, address and route changes for one attachment, on the host and in pod
network namespaces, through core/rtnl.py (rtnetlink built by hand).

Why: kernel link/address/route changes for one attachment, reached through netns-bound sockets.
The process never switches its own netns. Dumps are listed again when the kernel marks them
interrupted (as Go's `netlinksafe` does); only named errnos are tolerated (ENODEV/ENOENT on
delete), everything else propagates as a neutral `core.errors` error (each program maps it at its
edge): a pod netns that cannot be opened is `NetnsUnusable`, a pod interface that exists already
is `AlreadyExists`, a host link of our name without our alias is `NotOwned`, anything else
`CoreError` naming the operation and the errno.

Pod-netns sockets: the NETLINK_ROUTE socket is made by `core.netns.socket_in_netns` (a
short-lived thread setns()es, creates the socket, exits: ~0.1 ms, no fork). It opens the path
read-only, so a missing path is an error and no netns is ever created. A `Netlink` keeps ONE host
socket and ONE socket per pod netns for the life of a verb and `close()` (called by
`Drivers.close()`) releases them: one object = one invocation.
Host links for GC and the reconciler: `host_links(prefix)` lists links by alias prefix in one
dump (with their ifindex), and `delete_host_link(..., index=)` deletes only the link that was
judged: one deleted and re-created under the same name has a new index and stays.

Cost (issue 14, 2 cores): pyroute2 (used here until issue 14) cost ~2.6 ms of CPU per veth pair
and ~8 ms per ADD in all, more than anything else in the plugin, and under 8 concurrent ADDs CPU
is what they queue for; the same requests built by core/rtnl.py cost a few hundredths of that.
The veth pair is one request (host end up at once, pod end created inside the netns with its
MAC and MTU), then the alias, then the pod end up: three round trips, nothing read back but the
pod end's index.

Announcements (gratuitous ARP / unsolicited NA, frames from core.frames), sent inside the pod
netns through core.netns: one GARP per IPv4 address and one NA per IPv6 address, sent at once (as
ovs-cni does: no repeats, no sleeps). AF_PACKET with protocol 0 (no receive hook, so no bind and
no RCU grace period on bind) sendto()s to (ifname, ETH_P_ARP); sendto transmits synchronously,
so the frame is on the wire when it returns, and the unavoidable close() (one grace period) runs
on the closer thread (core.netns.close_later). The NA learns the ifindex with SIOCGIFINDEX on its
own socket in the pod netns.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from netaddr import IPAddress, IPNetwork

from core import rtnl
from core.errors import AlreadyExists, CoreError, NetnsUnusable, NotOwned
from core.frames import ETH_P_ARP, arp_announcement, random_mac, unsolicited_na
from core.names import same_attachment
from core.netns import close_later, ifindex, open_netns, socket_in_netns
from core.rtnl import Rtnl, RtnlError

_log = logging.getLogger("ovs-underlay.netlink")

_GONE = (errno.ENOENT, errno.EINVAL)  # no such path / the path is not a netns (any more)
_NO_LINK = (errno.ENODEV, errno.ENOENT)


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
    index: int  # 0 from create_veth, which reads nothing back (it chose the MACs itself)
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


def _nl_error(what: str, exc: OSError) -> CoreError:
    code = exc.errno or 0
    return CoreError(f"{what}: {os.strerror(code)} (errno {code})")


def open_pod_rtnl(netns: str) -> Rtnl:
    """A NETLINK_ROUTE socket created inside `netns` without forking. Raises OSError (ENOENT: no
    such path; EINVAL: not a netns). The caller closes it."""
    return Rtnl(socket_in_netns(netns, socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                rtnl.NETLINK_ROUTE))


class Netlink:
    """Link/address/route operations on the host and in pod netns. Create one per invocation and
    `close()` it at the end (the plugin's Drivers.close does): it keeps one host socket and one
    socket per pod netns open in between. Not thread-safe."""

    def __init__(self) -> None:
        self._host: Rtnl | None = None
        self._pods: dict[str, Rtnl] = {}

    def close(self) -> None:
        """Close every cached socket. Idempotent; the object can be used again afterwards."""
        conns = [*self._pods.values(), *([self._host] if self._host is not None else [])]
        self._pods.clear()
        self._host = None
        for conn in conns:
            try:
                conn.close()
            except OSError as exc:  # closing must not mask the verb's outcome
                _log.debug("closing a netlink socket: %s", exc)

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _host_nl(self) -> Rtnl:
        if self._host is None:
            self._host = Rtnl()
        return self._host

    def _pod(self, netns: str) -> Rtnl:
        """The cached pod-netns socket; a netns that cannot be opened raises NetnsUnusable."""
        conn = self._pods.get(netns)
        if conn is None:
            try:
                conn = open_pod_rtnl(netns)
            except OSError as exc:
                kind = NetnsUnusable if exc.errno in _GONE else CoreError
                raise kind(f"cannot open netlink in netns {netns}: {exc.strerror or exc}") from exc
            self._pods[netns] = conn
        return conn

    def _pod_link(self, netns: str, ifname: str) -> rtnl.Link:
        try:
            link = self._pod(netns).get_link(name=ifname)
        except RtnlError as exc:
            raise _nl_error(f"get {ifname} in {netns}", exc) from exc
        if link is None:
            raise CoreError(f"interface {ifname} is missing in {netns}")
        return link

    # -- host side -------------------------------------------------------------------------

    def host_link_alias(self, name: str) -> str | None:
        """The alias of host link `name`, "" when it has none, None when it does not exist."""
        try:
            link = self._host_nl().get_link(name=name)
        except RtnlError as exc:
            raise _nl_error(f"get link {name}", exc) from exc
        return None if link is None else link.alias

    def host_links(self, alias_prefix: str) -> list[HostLink]:
        """Every link of the host netns whose alias starts with `alias_prefix`, from one dump
        (a reconciler or GC lists the links it may own; the caller judges ownership)."""
        try:
            links = self._host_nl().links()
        except RtnlError as exc:
            raise _nl_error("dump host links", exc) from exc
        return [
            HostLink(ln.name, ln.index, ln.alias, ln.kind)
            for ln in links
            if alias_prefix and ln.alias.startswith(alias_prefix)
        ]

    def delete_host_link(self, name: str, alias: str, index: int | None = None) -> bool:
        """Delete host link `name` only if its alias names the same attachment as `alias`
        (core.names.same_attachment: container id and ifname) and, when `index` is given, only if
        it is still that link: one deleted and re-created under the same name since the caller
        looked has another index and is left alone. True if deleted."""
        host = self._host_nl()
        try:
            link = host.get_link(name=name)
        except RtnlError as exc:
            raise _nl_error(f"get link {name}", exc) from exc
        if link is None:
            return False
        if not same_attachment(link.alias, alias):
            _log.warning("not deleting link %s: alias %r is not %r", name, link.alias, alias)
            return False
        if index is not None and link.index != index:
            _log.info("not deleting link %s: it was re-created (index %d, expected %d)",
                      name, link.index, index)
            return False
        try:
            host.call(rtnl.link_del(index=link.index))
        except RtnlError as exc:
            if exc.errno in _NO_LINK:
                return False
            raise _nl_error(f"delete link {name}", exc) from exc
        return True

    def create_veth(self, *, host: str, netns: str, ifname: str, alias: str, mtu: int | None,
                    mac: str | None) -> PodLink:
        """Create the pair with the pod end directly in `netns` named `ifname` (with `mac`, or a
        random one chosen here); the host end's alias, MTU and up; the pod end's MTU and up.
        Raises AlreadyExists when `ifname` already exists in the netns, NotOwned when `host`
        exists without our alias. Three requests in the usual case: the pair is created at once
        and only a refusal (EEXIST) makes it look at what is there (a stale host end of ours is
        removed and the pair created again). Once the pair exists, a failure removes it."""
        pod = self._pod(netns)
        pod_mac, host_mac = (mac or random_mac()).lower(), random_mac()
        for attempt in (1, 2):
            try:
                self._veth_add(host, ifname, netns, mtu, pod_mac, host_mac)
                break
            except RtnlError as exc:
                if exc.errno != errno.EEXIST or attempt == 2:
                    raise _nl_error(f"create veth {host} (peer {ifname} in {netns})", exc) from exc
                self._why_exists(pod, host, ifname, netns, alias)
        try:
            h = self._host_nl()
            h.call(rtnl.link_set(name=host, alias=alias))
            pod.call(rtnl.link_set(name=ifname, up=True))
        except RtnlError as exc:
            self._remove_new(host, exc)
            raise _nl_error(f"set up veth {host} (peer {ifname} in {netns})", exc) from exc
        except BaseException as exc:
            self._remove_new(host, exc)
            raise
        # A veth's MTU is the one given, else the kernel's default for it (ETH_DATA_LEN).
        return PodLink(ifname, 0, pod_mac, mtu or 1500, True, host_mac)

    def _veth_add(self, host: str, ifname: str, netns: str, mtu: int | None, pod_mac: str,
                  host_mac: str) -> None:
        try:
            fd = open_netns(netns)
        except OSError as exc:
            raise NetnsUnusable(f"cannot open netns {netns}: {exc.strerror or exc}") from exc
        try:
            self._host_nl().call(rtnl.veth_add(host=host, peer=ifname, peer_netns_fd=fd, mtu=mtu,
                                               peer_mac=pod_mac, host_mac=host_mac))
        finally:
            os.close(fd)

    def _why_exists(self, pod: Rtnl, host: str, ifname: str, netns: str, alias: str) -> None:
        """The pair could not be made (EEXIST): raise why, or remove a stale host end of ours."""
        try:
            taken = pod.get_link(name=ifname) is not None
        except RtnlError as exc:
            raise _nl_error(f"get {ifname} in {netns}", exc) from exc
        if taken:
            raise AlreadyExists(f"interface {ifname} already exists in netns {netns}",
                                "CNI_IFNAME must not exist in the container before ADD")
        have = self.host_link_alias(host)
        if have is not None and not same_attachment(have, alias):
            raise NotOwned(f"host link {host} exists and is not ours (alias {have!r})")
        if have is not None:
            _log.info("removing stale host link %s left by an earlier attempt", host)
            self.delete_host_link(host, alias)

    def _remove_new(self, host: str, why: BaseException) -> None:
        """Delete the pair this call just created (by name: its alias may not be set yet)."""
        try:
            self._host_nl().call(rtnl.link_del(name=host))
        except RtnlError as exc:
            if exc.errno not in _NO_LINK:
                _log.warning("could not remove veth %s after a failed set-up (%s): %s", host, why, exc)
        else:
            _log.info("removed veth %s after a failed set-up: %s", host, why)

    # -- pod side --------------------------------------------------------------------------

    def set_pod_mac(self, *, netns: str, ifname: str, mac: str) -> None:
        pod = self._pod(netns)
        try:
            pod.call(rtnl.link_set(name=ifname, mac=mac))
        except RtnlError as exc:
            if exc.errno in _NO_LINK:
                raise CoreError(f"interface {ifname} is missing in {netns}") from exc
            raise _nl_error(f"set MAC {mac} on {ifname}", exc) from exc

    def configure(self, *, netns: str, ifname: str, addresses: Sequence[IPNetwork],
                  routes: Sequence[RouteLike]) -> None:
        """Add addresses (IPv6 without DAD: conflicts were probed by ipamd) and routes (main
        table unless given, proto static)."""
        pod = self._pod(netns)
        idx = self._pod_link(netns, ifname).index
        for address in addresses:
            try:
                pod.call(rtnl.addr_add(index=idx, address=address.ip.packed, prefixlen=address.prefixlen,
                                       nodad=address.version == 6))
            except RtnlError as exc:
                raise _nl_error(f"add address {address} to {ifname}", exc) from exc
        for r in routes:
            spec = rtnl.RouteSpec(
                family=socket.AF_INET if r.dst.version == 4 else socket.AF_INET6,
                dst=r.dst.network.packed, dst_len=r.dst.prefixlen, oif=idx,
                gateway=r.gw.packed if r.gw is not None else None, priority=r.priority, table=r.table,
                scope=r.scope, mtu=r.mtu, advmss=r.advmss)
            try:
                pod.call(rtnl.route_add(spec))
            except RtnlError as exc:
                raise _nl_error(f"add route {r.dst} via {r.gw} dev {ifname}", exc) from exc

    def raise_pod_link_if_down(self, netns: str, ifname: str) -> bool:
        """Set the pod link up if it exists and is down (a main plugin such as bridge or macvlan
        leaves it down until after IPAM, but probes cannot send through a down link).
        Returns True when it was raised; False when it was already up or is not there yet.
        Uses its own socket, closed before returning: the IPAM plugin calls this on a
        throwaway Netlink() that it never closes."""
        try:
            pod = open_pod_rtnl(netns)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENODEV):
                return False
            raise CoreError(f"open netlink in {netns}: {exc}") from exc
        with pod:
            try:
                link = pod.get_link(name=ifname)
                if link is None or link.up:
                    return False
                pod.call(rtnl.link_set(index=link.index, up=True))
            except RtnlError as exc:
                if exc.errno in _NO_LINK:
                    return False
                raise _nl_error(f"set {ifname} up in {netns} for the probes", exc) from exc
        return True

    def set_pod_link_down(self, netns: str, ifname: str) -> None:
        """Undo raise_pod_link_if_down. A link or netns that is gone already is fine. Own
        socket, as raise_pod_link_if_down."""
        try:
            with open_pod_rtnl(netns) as pod:
                pod.call(rtnl.link_set(name=ifname, up=False))
        except RtnlError as exc:
            if exc.errno not in _NO_LINK:
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
            found = pod.get_link(name=ifname)
            if found is None:
                return None
            idx = found.index
            link = PodLink(ifname, idx, found.mac, found.mtu, found.up)
            addrs = tuple(IPNetwork(f"{rtnl.unpacked(a.address)}/{a.prefixlen}") for a in pod.addrs()
                          if a.index == idx and a.scope == 0 and a.address)
            routes = []
            for r in pod.routes():
                if r.oif != idx or r.type != rtnl.RTN_UNICAST or r.table != rtnl.RT_TABLE_MAIN:
                    continue
                fam = "0.0.0.0/0" if r.family == socket.AF_INET else "::/0"
                dst = IPNetwork(f"{rtnl.unpacked(r.dst)}/{r.dst_len}") if r.dst else IPNetwork(fam)
                gw = IPAddress(rtnl.unpacked(r.gateway)) if r.gateway else None
                routes.append(PodRoute(dst=dst.cidr, gw=gw))
        except RtnlError as exc:
            raise _nl_error(f"read {ifname} in {netns}", exc) from exc
        return PodState(link, addrs, tuple(routes))

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
