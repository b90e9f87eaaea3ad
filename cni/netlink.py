"""Netlink boundary: the only module that imports pyroute2.

Why: kernel link/address/route changes for one attachment, reached through netns-bound sockets
(`IPRoute(netns=path, flags=0)`: `flags=0` so a bad path fails instead of creating a netns). The
process never switches its own netns. Dumps are retried on NetlinkDumpInterrupted (as Go's
`netlinksafe` does); only named errnos are tolerated (ENODEV/ENOENT on delete, EEXIST on
re-adding an identical address), everything else propagates.

Also the gratuitous ARP / unsolicited NA sender (packet / raw ICMPv6 sockets made inside the pod
netns by ipamd.netns_socket).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from netaddr import IPAddress, IPNetwork
from pyroute2 import IPRoute, NetlinkError
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted

from cni.errors import CniError, Code
from cni.types import IPConfig, Route

_log = logging.getLogger("ovs-underlay.netlink")
T = TypeVar("T")
IFA_F_NODAD = 0x02
ALIAS_PREFIX = "ovs-underlay "
RT_PROTO_STATIC = 4
RT_PROTO_BOOT = 3
IFF_UP = 1


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
    routes: tuple[Route, ...]  # main-table unicast routes with a gateway or non-kernel proto


def _retry(fn: Callable[[], T], what: str) -> T:
    for attempt in range(5):
        try:
            return fn()
        except NetlinkDumpInterrupted:
            _log.debug("%s: dump interrupted, retry %d", what, attempt + 1)
            time.sleep(0.01 * (attempt + 1))
    return fn()


def _nl_error(what: str, exc: NetlinkError, code: int = Code.INTERNAL) -> CniError:
    return CniError(code, f"{what}: {os.strerror(exc.code)} (errno {exc.code})")


class Netlink:
    """Link/address/route operations for the plugin. Stateless apart from sockets opened
    per call; safe to create per invocation."""

    # -- host side -------------------------------------------------------------------------

    def host_link_alias(self, name: str) -> str | None:
        """The alias of host link `name`, "" when it has none, None when it does not exist."""
        with IPRoute() as ipr:
            try:
                msg = _retry(lambda: ipr.link("get", ifname=name)[0], f"get link {name}")
            except NetlinkError as exc:
                if exc.code in (errno.ENODEV, errno.ENOENT):
                    return None
                raise
            return str(msg.get("ifalias") or "")

    def list_host_aliases(self) -> dict[str, str]:
        """{name: alias} of host links whose alias starts with "ovs-underlay "."""
        with IPRoute() as ipr:
            out = {}
            for msg in _retry(lambda: list(ipr.link("dump")), "dump links"):
                alias = msg.get("ifalias") or ""
                if alias.startswith(ALIAS_PREFIX):
                    out[str(msg.get("ifname"))] = str(alias)
            return out

    def delete_host_link(self, name: str, alias: str) -> bool:
        """Delete host link `name` only if its alias is exactly `alias`. True if deleted."""
        with IPRoute() as ipr:
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
        end's alias, MTU and up; the pod end's MTU, MAC and up. Raises CniError when `ifname`
        already exists in the netns or `host` exists and is not ours."""
        with IPRoute(netns=netns, flags=0) as pod:
            if _retry(lambda: pod.link_lookup(ifname=ifname), "lookup"):
                raise CniError(Code.INVALID_ENV, f"interface {ifname} already exists in netns {netns}",
                               "CNI_IFNAME must not exist in the container before ADD")
        have = self.host_link_alias(host)
        if have is not None:
            if have != alias:
                raise CniError(Code.INTERNAL, f"host link {host} exists and is not ours (alias {have!r})")
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
            with IPRoute() as ipr:
                try:
                    ipr.link("add", ifname=host, kind="veth", peer=peer, **kw)
                except NetlinkError as exc:
                    if exc.code == errno.EEXIST:
                        raise CniError(Code.INVALID_ENV,
                                       f"cannot create veth {host}/{ifname}: {ifname} exists in {netns} "
                                       f"or {host} exists on the host") from exc
                    raise _nl_error(f"create veth {host} (peer {ifname} in {netns})", exc) from exc
                idx = ipr.link_lookup(ifname=host)
                if not idx:
                    raise CniError(Code.INTERNAL, f"veth {host} vanished after creation")
                ipr.link("set", index=idx[0], ifalias=alias, state="up")
                host_mac = str(ipr.link("get", index=idx[0])[0].get("address"))
        finally:
            os.close(fd)
        with IPRoute(netns=netns, flags=0) as pod:
            msg = _retry(lambda: pod.link("get", ifname=ifname)[0], "get pod link")
            pod.link("set", index=msg["index"], state="up")
            return PodLink(ifname, int(msg["index"]), str(msg.get("address")), int(msg.get("mtu")), True,
                           host_mac)

    # -- pod side --------------------------------------------------------------------------

    def set_pod_mac(self, *, netns: str, ifname: str, mac: str) -> None:
        with IPRoute(netns=netns, flags=0) as pod:
            idx = _retry(lambda: pod.link_lookup(ifname=ifname), "lookup")
            if not idx:
                raise CniError(Code.INTERNAL, f"interface {ifname} is missing in {netns}")
            try:
                pod.link("set", index=idx[0], address=mac)
            except NetlinkError as exc:
                raise _nl_error(f"set MAC {mac} on {ifname}", exc) from exc

    def configure(self, *, netns: str, ifname: str, ips: Sequence[IPConfig], routes: Sequence[Route]) -> None:
        """Add addresses (IPv6 without DAD: conflicts were probed by ipamd) and routes."""
        with IPRoute(netns=netns, flags=0) as pod:
            idx = _retry(lambda: pod.link_lookup(ifname=ifname), "lookup")
            if not idx:
                raise CniError(Code.INTERNAL, f"interface {ifname} is missing in {netns}")
            for ip in ips:
                kw: dict[str, Any] = {"flags": IFA_F_NODAD} if ip.version == 6 else {}
                try:
                    pod.addr("add", index=idx[0], address=str(ip.address.ip), prefixlen=ip.address.prefixlen,
                             **kw)
                except NetlinkError as exc:
                    raise _nl_error(f"add address {ip.address} to {ifname}", exc) from exc
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
        Returns True when it was raised; False when it was already up or is not there yet."""
        try:
            pod = IPRoute(netns=netns, flags=0)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENODEV):
                return False
            raise CniError(Code.INTERNAL, f"open netlink in {netns}: {exc}") from exc
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
        """Undo raise_pod_link_if_down. A link or netns that is gone already is fine."""
        try:
            with IPRoute(netns=netns, flags=0) as pod:
                pod.link("set", ifname=ifname, state="down")
        except NetlinkError as exc:
            if exc.code not in (errno.ENODEV, errno.ENOENT):
                raise _nl_error(f"set {ifname} down in {netns}", exc) from exc
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENODEV):
                raise CniError(Code.INTERNAL, f"open netlink in {netns}: {exc}") from exc

    def pod_state(self, netns: str, ifname: str) -> PodState | None:
        """The pod interface as the kernel sees it, or None when the netns or link is gone."""
        try:
            pod = IPRoute(netns=netns, flags=0)
        except (FileNotFoundError, OSError) as exc:
            if isinstance(exc, FileNotFoundError) or exc.errno in (errno.ENOENT, errno.EINVAL):
                return None
            raise
        with pod:
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
                routes.append(Route(dst=dst.cidr, gw=IPAddress(gw) if gw else None))
            return PodState(link, tuple(addrs), tuple(routes))

    def announce(self, *, netns: str, ifname: str, ips: Sequence[IPConfig], mac: str) -> None:
        """Gratuitous ARP (IPv4) / unsolicited neighbour advertisement (IPv6) so the switch
        fabric and neighbours learn the new address and MAC at once. Failures are logged:
        announcing is an optimisation, never a reason to fail ADD."""
        for ip in ips:
            try:
                if ip.version == 4:
                    _garp(netns, ifname, ip.address.ip, mac)
                else:
                    _unsolicited_na(netns, ifname, ip.address.ip, mac)
            except OSError as exc:
                _log.warning("announcing %s on %s failed: %s", ip.address.ip, ifname, exc)


def _mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def garp_frame(ip: IPAddress, mac: str) -> bytes:
    """Broadcast ARP request with sender = target = ip (RFC 5227 'ARP announcement')."""
    m = _mac_bytes(mac)
    eth = b"\xff" * 6 + m + struct.pack("!H", 0x0806)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + m + bytes(ip.packed) + b"\x00" * 6 + bytes(ip.packed)
    return eth + arp


def _garp(netns: str, ifname: str, ip: IPAddress, mac: str) -> None:
    from ipamd.netns_socket import packet_socket

    sock, _ = packet_socket(netns, ifname, 0x0806)
    with sock:
        sock.send(garp_frame(ip, mac))


def na_message(ip: IPAddress, mac: str) -> bytes:
    """ICMPv6 neighbour advertisement (override flag) with the target link-layer address
    option; the kernel fills in the checksum on raw ICMPv6 sockets."""
    flags = 0x20000000  # O (override); not a router, not solicited
    return struct.pack("!BBHI", 136, 0, 0, flags) + bytes(ip.packed) + bytes([2, 1]) + _mac_bytes(mac)


def _unsolicited_na(netns: str, ifname: str, ip: IPAddress, mac: str) -> None:
    from ipamd.netns_socket import socket_in_netns

    sock = socket_in_netns(netns, socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
        with IPRoute(netns=netns, flags=0) as pod:
            idx = pod.link_lookup(ifname=ifname)
        if not idx:
            raise OSError(errno.ENODEV, f"{ifname} missing in {netns}")
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, idx[0])
        sock.bind((str(ip), 0, 0, 0))
        sock.sendto(na_message(ip, mac), ("ff02::1", 0, 0, idx[0]))
