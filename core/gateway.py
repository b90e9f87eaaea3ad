"""Does a gateway answer ARP (IPv4) or NDP (IPv6) on an interface of this network namespace?

Why: the node agent's proof that a freshly bridged NIC works is the gateway answering from the
bridge, at layer 2, within a bound: no route, no ICMP policy and no neighbour-cache state can fake
it, and it needs no address other than the node's own. (ipamd probes from inside pod netns with
its own orchestration; this is the plain host-side exchange.)

One AF_PACKET socket bound to the interface, a request every 250 ms until an answer or the
deadline: an ARP request (sender = the node's address, or 0.0.0.0 as an RFC 5227 probe) or a
neighbour solicitation to the gateway's solicited-node group (with our link-layer address, so
the answer may be unicast; all-multicast is enabled so a multicast answer is seen too).
Frames we sent ourselves are ignored. stdlib + core.frames.
"""

from __future__ import annotations

import logging
import select
import socket
import struct
import time

from netaddr import IPAddress

from core import frames

SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_ALLMULTI = 2
PACKET_OUTGOING = 4
RESEND_S = 0.25
_log = logging.getLogger("ovs-underlay.gateway")


class GatewayProbe:
    def gateway(self, dev: str, gateway: IPAddress, sender: IPAddress | None, timeout_ms: int) -> str | None:
        """The MAC that answered for `gateway` on `dev` within `timeout_ms`, else None. OSError
        (ENODEV: no such interface; ENETDOWN: it is down) propagates."""
        v6 = gateway.version == 6
        eth = frames.ETH_P_IPV6 if v6 else frames.ETH_P_ARP
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(eth))
        try:
            sock.bind((dev, eth))
            own = sock.getsockname()[4]
            if v6:
                ifindex = socket.if_nametoindex(dev)
                mreq = struct.pack("iHH8s", ifindex, PACKET_MR_ALLMULTI, 0, b"")
                sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
                request = frames.neighbor_solicitation(own, sender, gateway)
            else:
                request = frames.arp_request(own, sender, gateway)
            deadline = time.monotonic() + timeout_ms / 1000
            next_send = 0.0
            while True:
                now = time.monotonic()
                if now >= deadline:
                    return None
                if now >= next_send:
                    sock.send(request)
                    next_send = now + RESEND_S
                ready, _, _ = select.select([sock], [], [], max(0.0, min(deadline, next_send) - now))
                if not ready:
                    continue
                frame, addr = sock.recvfrom(2048)
                if addr[2] == PACKET_OUTGOING:
                    continue
                mac = _answer(frame, gateway, own, v6)
                if mac:
                    return mac
        finally:
            sock.close()


def _answer(frame: bytes, gateway: IPAddress, own: bytes, v6: bool) -> str | None:
    if v6:
        nd = frames.parse_nd(frame)
        if nd is not None and nd.type == frames.ICMPV6_NA and nd.target == gateway and nd.src_mac != own:
            return frames.mac_text(nd.lladdr or nd.src_mac)
        return None
    pkt = frames.parse_arp(frame)
    if pkt is not None and pkt.spa == gateway and pkt.sha != own:
        return frames.mac_text(pkt.sha)
    return None
