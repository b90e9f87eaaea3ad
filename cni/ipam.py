"""What both plugins do with ipamd's answer, in one copy: the result mapping and the gateway check.

Why one module: `ovs-underlay` (ipamd backend) and `ovs-underlay-ipam` turn the same Allocation
into CNI IP configs, routes and DNS, and both probe each gateway through ipamd after the address
is set. Two copies had drifted (the main plugin read a *skipped* probe as an unreachable gateway,
103); now there is one rule: skipped (the interface is not in the netns yet, or down, so nothing
was sent) is logged and ADD goes on; an unanswered probe is 103 naming the gateway and where it
was probed from. Errors are CniError: this is the CNI edge.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from netaddr import IPAddress

from cni.errors import CniError, Code
from cni.types import DNS, IPConfig, Route, addr_key
from core.spec import Allocation, GatewaySeen, ProbeResult

_log = logging.getLogger("ovs-underlay.ipam")


@dataclass(frozen=True)
class Addressing:
    """What IPAM gave one attachment, in CNI result terms."""

    ips: tuple[IPConfig, ...] = ()
    routes: tuple[Route, ...] = ()
    dns: DNS = field(default_factory=DNS)
    mac: str | None = None  # the lease's MAC (macFromIP), if any
    conflict_probed: bool = False  # ipamd probed the addresses (or took pre-probed ones)
    gateways: tuple[GatewaySeen, ...] = ()  # gateways ipamd's probe port saw answer recently


def addressing(alloc: Allocation, interface: int | None) -> Addressing:
    """An ipamd allocation as CNI result parts. `interface`: the result's index of the pod
    interface (the main plugin), or None for an IPAM plugin's result (CNI: no interfaces)."""
    return Addressing(
        ips=tuple(IPConfig(a.address, a.gateway, interface) for a in alloc.ips),
        routes=tuple(Route(r.dst, r.gw) for r in alloc.routes),
        dns=DNS(alloc.dns.nameservers, alloc.dns.domain, alloc.dns.search, alloc.dns.options),
        mac=alloc.mac or None, conflict_probed=alloc.conflict_probed, gateways=alloc.gateways)


def conflict_macs(lease: Allocation) -> dict[tuple[str, int], str]:
    """What CHECK says about each of the attachment's addresses that ipamd put in conflict (a
    foreign MAC answered for it or announced it while the pod held it), by addr_key."""
    out = {}
    for ip, mac in zip(lease.conflicts, lease.conflict_macs, strict=True):
        out[addr_key(ip.address)] = (
            f"address {ip.address} is in conflict on the network: another host (MAC {mac or 'unknown'}) "
            "answered for it or announced it, and ipamd quarantined it; find and stop that host, "
            "then re-create the pod")
    return out


class GatewayProber(Protocol):
    def probe_gateway(self, *, netns: str, ifname: str, gateway: IPAddress, sender_ip: IPAddress | None,
                      timeout_ms: int, cache_key: str) -> ProbeResult: ...


def gateway_check(client: GatewayProber, *, netns: str, ifname: str, ips: Sequence[IPConfig],
                  timeout_ms: int, cache_key: str, where: str, hint: str,
                  seen: Sequence[GatewaySeen] = ()) -> None:
    """Each gateway is reachable: answered by what ipamd's probe port on the pod's L2 segment
    saw recently (`seen`, from the Allocate answer: no probe, no wait), else probed from
    `ifname` in `netns` with the pod's address as sender. `where` completes the 103 message
    (the VLAN and bridge, or the netns and network); `hint` says what to check."""
    known = {g.gateway: g for g in seen}
    for ip in ips:
        if ip.gateway is None:
            continue
        hit = known.get(ip.gateway)
        if hit is not None:
            _log.info("gateway %s reachable (%s, seen by ipamd's probe port %d ms ago)", ip.gateway, hit.mac,
                      hit.age_ms)
            continue
        res = client.probe_gateway(netns=netns, ifname=ifname, gateway=ip.gateway, sender_ip=ip.address.ip,
                                   timeout_ms=timeout_ms, cache_key=cache_key)
        if res.skipped:
            _log.info("gateway probe skipped: %s is not in %s yet (or down)", ifname, netns)
            return  # the interface is the same for every gateway
        if not res.answered:
            raise CniError(Code.GATEWAY_UNREACHABLE,
                           f"gateway {ip.gateway} unreachable from {ifname} ({ip.address}) {where} within "
                           f"{timeout_ms} ms", hint)
        _log.info("gateway %s reachable (%s, %.1f ms%s)", ip.gateway, res.mac, res.elapsed_ms,
                  ", cached" if res.cached else "")
