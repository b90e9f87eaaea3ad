"""ARP and IPv6 neighbour-discovery frames: pure builders and parsers (no sockets). One copy.

Why by hand: ipamd's probes send from an AF_PACKET socket in the pod's netns, so they work
before the pod's addresses are configured (RFC 5227 probes, DAD-style NS with source ::) and
never depend on the pod's kernel choosing a source address; the plugin announces a new address
(gratuitous ARP, unsolicited NA) the same way. Pure bytes in, bytes out: unit-tested.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from netaddr import IPAddress

ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
BROADCAST = b"\xff" * 6
ZERO_MAC = b"\x00" * 6
ICMPV6_NS, ICMPV6_NA = 135, 136
_ETH = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")


def random_mac() -> str:
    """A random locally administered unicast MAC (what the kernel picks for a veth end), made
    by us so that it is known before the interface exists."""
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFE) | 0x02
    return mac_text(bytes(raw))


def mac_bytes(mac: str) -> bytes:
    return bytes(int(p, 16) for p in mac.split(":"))


def mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


# ---- ARP ---------------------------------------------------------------------------------------


def arp_request(src_mac: bytes, sender_ip: IPAddress | None, target: IPAddress) -> bytes:
    """Broadcast ARP request. sender_ip None -> 0.0.0.0: an RFC 5227 probe (it does not touch
    anyone's ARP cache)."""
    spa = sender_ip.packed if sender_ip is not None else b"\x00" * 4
    return _ETH.pack(BROADCAST, src_mac, ETH_P_ARP) + _ARP.pack(
        1, 0x0800, 6, 4, 1, src_mac, spa, ZERO_MAC, target.packed)


def arp_announcement(mac: str, ip: IPAddress) -> bytes:
    """Broadcast ARP request with sender = target = ip: an RFC 5227 'ARP announcement'
    (gratuitous ARP), so neighbours and the switch fabric learn ip -> mac at once."""
    m = mac_bytes(mac)
    return _ETH.pack(BROADCAST, m, ETH_P_ARP) + _ARP.pack(1, 0x0800, 6, 4, 1, m, ip.packed, ZERO_MAC,
                                                          ip.packed)


@dataclass(frozen=True)
class Arp:
    op: int
    sha: bytes
    spa: IPAddress
    tha: bytes
    tpa: IPAddress


def parse_arp(frame: bytes) -> Arp | None:
    if len(frame) < _ETH.size + _ARP.size:
        return None
    _, _, ethertype = _ETH.unpack_from(frame)
    if ethertype != ETH_P_ARP:
        return None
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(frame, _ETH.size)
    if htype != 1 or ptype != 0x0800 or hlen != 6 or plen != 4:
        return None
    return Arp(int(op), bytes(sha), IPAddress(int.from_bytes(spa, "big"), 4), bytes(tha),
               IPAddress(int.from_bytes(tpa, "big"), 4))


def arp_answers_for(pkt: Arp, target: IPAddress, own_mac: bytes) -> bool:
    """Someone else claims `target`: a reply or request sent *from* it (RFC 5227 2.1.1)."""
    return pkt.sha != own_mac and pkt.spa == target


def arp_probe_collision(pkt: Arp, target: IPAddress, own_mac: bytes) -> bool:
    """Another host is probing the same address at the same time (RFC 5227 2.1.1)."""
    return (pkt.op == 1 and pkt.sha != own_mac and int(pkt.spa) == 0 and pkt.tpa == target)


# ---- IPv6 ND -----------------------------------------------------------------------------------


def solicited_node(target: IPAddress) -> IPAddress:
    return IPAddress((0xFF0200000000000000000001FF000000) | (int(target) & 0xFFFFFF), 6)


def multicast_mac(group: IPAddress) -> bytes:
    return b"\x33\x33" + bytes(group.packed[-4:])


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def unsolicited_na(ip: IPAddress, mac: str) -> bytes:
    """ICMPv6 neighbour advertisement body (override flag, not a router, not solicited) with the
    target link-layer address option, for a raw ICMPv6 socket: the kernel fills in the checksum
    and the IPv6 header (RFC 4861 7.2.6)."""
    flags = 0x20000000  # O (override)
    return struct.pack("!BBHI", ICMPV6_NA, 0, 0, flags) + bytes(ip.packed) + bytes([2, 1]) + mac_bytes(mac)


def neighbor_solicitation(src_mac: bytes, sender_ip: IPAddress | None, target: IPAddress) -> bytes:
    """NS for `target` to its solicited-node group. sender_ip None -> source :: (DAD, RFC 4862
    5.4.2: no source link-layer option); else the SLLA option lets the target answer unicast."""
    src: bytes = bytes(sender_ip.packed) if sender_ip is not None else b"\x00" * 16
    group = solicited_node(target)
    dst: bytes = bytes(group.packed)
    body: bytes = struct.pack("!BBHI", ICMPV6_NS, 0, 0, 0) + bytes(target.packed)
    if sender_ip is not None:
        body += struct.pack("!BB", 1, 1) + src_mac
    pseudo = src + dst + struct.pack("!I3xB", len(body), 58)
    csum = _checksum(pseudo + body)
    body = body[:2] + struct.pack("!H", csum) + body[4:]
    ip6 = struct.pack("!IHBB", 6 << 28, len(body), 58, 255) + src + dst
    return _ETH.pack(multicast_mac(group), src_mac, ETH_P_IPV6) + ip6 + body


@dataclass(frozen=True)
class Nd:
    type: int
    src_mac: bytes  # Ethernet source
    src_ip: IPAddress
    target: IPAddress
    lladdr: bytes | None  # target (NA) or source (NS) link-layer address option


def parse_nd(frame: bytes) -> Nd | None:
    """An NS or NA inside an Ethernet/IPv6 frame (no extension headers), else None."""
    if len(frame) < _ETH.size + 40 + 24:
        return None
    _, src_mac, ethertype = _ETH.unpack_from(frame)
    if ethertype != ETH_P_IPV6:
        return None
    ip6 = frame[_ETH.size:_ETH.size + 40]
    if ip6[6] != 58 or ip6[7] != 255:  # next header ICMPv6, hop limit 255 (RFC 4861 7.1.2)
        return None
    icmp = frame[_ETH.size + 40:]
    if icmp[0] not in (ICMPV6_NS, ICMPV6_NA) or icmp[1] != 0:
        return None
    target = IPAddress(int.from_bytes(icmp[8:24], "big"), 6)
    lladdr = None
    opts = icmp[24:]
    while len(opts) >= 8:
        otype, olen = opts[0], opts[1] * 8
        if olen == 0:
            break
        if otype in (1, 2) and olen >= 8:
            lladdr = opts[2:8]
        opts = opts[olen:]
    return Nd(icmp[0], src_mac, IPAddress(int.from_bytes(ip6[8:24], "big"), 6), target, lladdr)


def gateway_answer(frame: bytes, gateway: IPAddress, own_mac: bytes) -> bytes | None:
    """The MAC of `gateway` when `frame` answers our ARP request (an ARP reply from it) or
    neighbour solicitation (an NA for it), and is not our own frame; else None. The one rule for
    every gateway check (ipamd's pod-side probe, its probe ports, the node agent)."""
    if gateway.version == 6:
        nd = parse_nd(frame)
        if nd is None or nd.type != ICMPV6_NA or nd.target != gateway or nd.src_mac == own_mac:
            return None
        return nd.lladdr or nd.src_mac
    pkt = parse_arp(frame)
    if pkt is not None and pkt.op == 2 and arp_answers_for(pkt, gateway, own_mac):
        return pkt.sha
    return None
