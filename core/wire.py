"""The ipamd wire contract: proto <-> spec conversion and the error reasons, in one place.

Why one module: the wire format (core/_proto) and the IPAM contract (core.spec) must agree in
exactly one spot, for the client (core.ipamd_client), the daemon (ipamd/service.py) and the
stores. A pool definition crosses the wire in its canonical form and is re-validated on arrival
through `spec.parse_ipam`, the same parser the plugin used, so a hand-made or corrupted request
is refused with the parser's precise message.

Errors travel as a gRPC status plus the trailing metadata REASON_KEY holding one of `Reason`:
machine-readable, so each client maps it to its own codes (the CNI plugins: cni/errors.py) and
the daemon never needs to know what a CNI code is.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from netaddr import AddrFormatError, IPAddress, IPNetwork

from core._proto import ipam_pb2 as pb
from core.names import is_ovsdb_remote
from core.spec import (
    Allocation,
    ConfigError,
    DnsSpec,
    GatewaySeen,
    IpAssignment,
    PodRef,
    PoolDef,
    RouteSpec,
    Segment,
    parse_ipam,
)

# Trailing metadata key of a failed call: the machine-readable reason (see proto/ipam.proto).
REASON_KEY = "ovs-underlay-reason"


class Reason:
    """Why ipamd refused a request. The strings are the wire contract: add, never rename."""

    INVALID_POOL = "INVALID_POOL"  # the pool definition does not validate
    INVALID_REQUEST = "INVALID_REQUEST"  # a field of the request is malformed or missing
    POOL_CHANGED = "POOL_CHANGED"  # the network's definition changed unsafely
    POOL_EXHAUSTED = "POOL_EXHAUSTED"
    ADDRESS_TAKEN = "ADDRESS_TAKEN"  # a requested address is held or quarantined
    ADDRESS_OUT_OF_POOL = "ADDRESS_OUT_OF_POOL"  # outside the subnets/range, excluded, reserved
    GATEWAY_UNREACHABLE = "GATEWAY_UNREACHABLE"
    ADDRESS_CONFLICT = "ADDRESS_CONFLICT"  # answered for on the wire
    LEASE_NOT_FOUND = "LEASE_NOT_FOUND"
    INVALID_NETNS = "INVALID_NETNS"  # the netns to probe from is not usable
    COMMIT_FAILED = "COMMIT_FAILED"  # the store could not make the change durable
    STORE_UNAVAILABLE = "STORE_UNAVAILABLE"  # the cluster store (etcd) is unreachable: try again later
    NODE_ALIVE = "NODE_ALIVE"  # `nodes release` of a node whose heartbeat is alive
    NOT_CLUSTERED = "NOT_CLUSTERED"  # a cluster command on an ipamd with a node-local store
    NETWORK_QUARANTINED = "NETWORK_QUARANTINED"  # the network's stored definition does not parse
    RECONCILE_FAILED = "RECONCILE_FAILED"  # a reconcile pass could not list OVS or the kernel
    INTERNAL = "INTERNAL"


# ---------------------------------------------------------------------------------------------
# pool definitions


def pool_to_dict(pool: PoolDef) -> dict[str, Any]:
    """The canonical, JSON-able form of a pool: an `ipam` section that parse_ipam accepts."""
    out: dict[str, Any] = {"subnets": [s.canonical() for s in pool.subnets]}
    if pool.routes:
        out["routes"] = [{"dst": str(r.dst), **({"gw": str(r.gw)} if r.gw is not None else {})}
                         for r in pool.routes]
    if not pool.dns.empty():
        out["dns"] = {"nameservers": list(pool.dns.nameservers), "domain": pool.dns.domain,
                      "search": list(pool.dns.search), "options": list(pool.dns.options)}
    out["macFromIP"] = pool.mac_from_ip
    out["cooldownSeconds"] = pool.cooldown_s
    return out


def pool_from_dict(raw: dict[str, Any]) -> PoolDef:
    """Inverse of pool_to_dict; raises spec.ConfigError on an invalid definition."""
    return parse_ipam(raw).pool


def pool_to_json(pool: PoolDef) -> str:
    return json.dumps(pool_to_dict(pool), sort_keys=True)


def pool_from_json(text: str) -> PoolDef:
    """A stored definition; raises spec.ConfigError when `text` is not one (not JSON, or not a
    valid definition): a store reports a definition that no longer parses this way."""
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError, TypeError) as exc:
        raise ConfigError(f"stored definition is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"stored definition is not an object: {type(raw).__name__}")
    return pool_from_dict(raw)


def pool_to_pb(pool: PoolDef) -> pb.PoolSpec:
    d = pool_to_dict(pool)
    return pb.PoolSpec(
        subnets=[pb.SubnetSpec(subnet=s["subnet"], gateway=s["gateway"], range_start=s["rangeStart"],
                               range_end=s["rangeEnd"], exclude=s["exclude"], reserved=s.get("reserved", []))
                 for s in d["subnets"]],
        routes=[pb.Route(dst=r["dst"], gw=r.get("gw", "")) for r in d.get("routes", [])],
        dns=dns_to_pb(pool.dns),
        mac_from_ip=pool.mac_from_ip,
        cooldown_s=pool.cooldown_s,
    )


def pool_from_pb(msg: pb.PoolSpec) -> PoolDef:
    """Validate a pool received on the wire. Raises spec.ConfigError naming the bad field."""
    raw: dict[str, Any] = {
        "subnets": [
            {"subnet": s.subnet, "gateway": s.gateway, "rangeStart": s.range_start,
             "rangeEnd": s.range_end, "exclude": list(s.exclude), "reserved": list(s.reserved)}
            for s in msg.subnets
        ],
        "macFromIP": msg.mac_from_ip,
    }
    if msg.cooldown_s:
        raw["cooldownSeconds"] = int(msg.cooldown_s)
    if msg.routes:
        raw["routes"] = [{"dst": r.dst, **({"gw": r.gw} if r.gw else {})} for r in msg.routes]
    if msg.HasField("dns"):
        raw["dns"] = {"nameservers": list(msg.dns.nameservers), "domain": msg.dns.domain,
                      "search": list(msg.dns.search), "options": list(msg.dns.options)}
    return parse_ipam(raw).pool


def dns_to_pb(dns: DnsSpec) -> pb.Dns:
    return pb.Dns(nameservers=list(dns.nameservers), domain=dns.domain, search=list(dns.search),
                  options=list(dns.options))


def dns_from_pb(msg: pb.Dns) -> DnsSpec:
    return DnsSpec(nameservers=tuple(msg.nameservers), domain=msg.domain, search=tuple(msg.search),
                   options=tuple(msg.options))


def resolve_routes(pool: PoolDef) -> tuple[RouteSpec, ...]:
    """host-local semantics: a route without gw goes via the gateway of its family's subnet."""
    out = []
    for r in pool.routes:
        gw = r.gw
        if gw is None:
            gw = next((s.gateway for s in pool.subnets
                       if s.version == r.dst.version and s.gateway is not None), None)
        out.append(RouteSpec(r.dst, gw))
    return tuple(out)


def routes_to_pb(routes: Iterable[RouteSpec]) -> list[pb.Route]:
    return [pb.Route(dst=str(r.dst), gw=str(r.gw) if r.gw is not None else "") for r in routes]


def routes_from_pb(msgs: Iterable[pb.Route]) -> tuple[RouteSpec, ...]:
    return tuple(RouteSpec(IPNetwork(r.dst), IPAddress(r.gw) if r.gw else None) for r in msgs)


# ---------------------------------------------------------------------------------------------
# pods, requested addresses


def pod_to_pb(pod: PodRef | None) -> pb.PodRef:
    pod = pod or PodRef()
    return pb.PodRef(namespace=pod.namespace, name=pod.name, uid=pod.uid)


def pod_from_pb(msg: pb.PodRef) -> PodRef:
    return PodRef(namespace=msg.namespace, name=msg.name, uid=msg.uid)


def ips_from_pb(values: Sequence[str]) -> tuple[IPAddress, ...]:
    """Requested addresses: plain IPs or CIDRs. Raises spec.ConfigError on garbage."""
    out = []
    for v in values:
        try:
            out.append(IPNetwork(v).ip if "/" in v else IPAddress(v))
        except (AddrFormatError, ValueError, TypeError) as exc:
            raise ConfigError(f"requested address {v!r} is not an IP address") from exc
    return tuple(out)


def ip_from_pb(value: str, what: str) -> IPAddress:
    try:
        return IPAddress(value)
    except (AddrFormatError, ValueError, TypeError) as exc:
        raise ConfigError(f"{what} {value!r} is not an IP address") from exc


# ---------------------------------------------------------------------------------------------
# segments and what their probe ports saw

BRIDGE_MAX = 255  # OVS bridge names are strings; ours travel as data, never into a command line


def segment_to_pb(seg: Segment | None) -> pb.Segment | None:
    if seg is None:
        return None
    return pb.Segment(bridge=seg.bridge, vlan=seg.vlan, trunks=list(seg.trunks), ovsdb=seg.ovsdb)


def segment_from_pb(msg: pb.Segment) -> Segment:
    """Validate a segment received on the wire. Raises spec.ConfigError naming the bad field."""
    if not msg.bridge or len(msg.bridge) > BRIDGE_MAX or not msg.bridge.isprintable():
        raise ConfigError(f"segment.bridge {msg.bridge[:80]!r} is not an OVS bridge name")
    if msg.vlan > 4094 or any(t > 4094 for t in msg.trunks):
        raise ConfigError(f"segment: VLAN {msg.vlan} / trunks {list(msg.trunks)[:8]} outside 0..4094")
    if len(msg.ovsdb) > 4096 or (msg.ovsdb and not is_ovsdb_remote(msg.ovsdb)):
        raise ConfigError(f"segment.ovsdb {msg.ovsdb[:80]!r} is not an OVSDB remote")
    return Segment(msg.bridge, int(msg.vlan), tuple(int(t) for t in msg.trunks), msg.ovsdb)


def gateways_to_pb(seen: Iterable[GatewaySeen]) -> list[pb.GatewaySeen]:
    return [pb.GatewaySeen(gateway=str(g.gateway), mac=g.mac, age_ms=g.age_ms) for g in seen]


def gateways_from_pb(msgs: Iterable[pb.GatewaySeen]) -> tuple[GatewaySeen, ...]:
    return tuple(GatewaySeen(IPAddress(g.gateway), g.mac, int(g.age_ms)) for g in msgs if g.gateway)


# ---------------------------------------------------------------------------------------------
# leases


def ips_of_lease(msg: pb.Lease) -> tuple[IpAssignment, ...]:
    return tuple(IpAssignment(IPNetwork(i.address), IPAddress(i.gateway) if i.gateway else None)
                 for i in msg.ips)


def allocation_from_pb(lease: pb.Lease, routes: Iterable[pb.Route], dns: pb.Dns,
                       conflict_probed: bool = False, *, pre_probed: int = 0,
                       gateways: Iterable[pb.GatewaySeen] = (),
                       conflicts: Iterable[pb.Lease] = ()) -> Allocation:
    """An Allocate or GetLease answer as the plugin's `Allocation`."""
    held = list(conflicts)
    return Allocation(
        network=lease.network, container_id=lease.container_id, ifname=lease.ifname,
        ips=ips_of_lease(lease), routes=routes_from_pb(routes), dns=dns_from_pb(dns),
        mac=lease.mac or None, conflict_probed=conflict_probed, pre_probed=pre_probed,
        gateways=gateways_from_pb(gateways),
        conflicts=tuple(ip for c in held for ip in ips_of_lease(c)),
        conflict_macs=tuple(c.conflict_mac for c in held for _ in c.ips),
    )
