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
import time

from netaddr import IPAddress

from core import frames
from core.netns import PACKET_OUTGOING, join_allmulti

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
                join_allmulti(sock, socket.if_nametoindex(dev))
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
                mac = frames.gateway_answer(frame, gateway, own)
                if mac is not None:
                    return frames.mac_text(mac)
        finally:
            sock.close()

