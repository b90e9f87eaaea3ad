"""The gRPC servicer: translates proto <-> domain and calls the allocator and the prober.

Why thin: the servicer holds no IPAM logic. Its one other job is the single error translator
(`_rpc`): domain errors become their gRPC status, their message and the trailing metadata
`core.wire.REASON_KEY`, through the table `ipamd.errors.WIRE`; spec.ConfigError becomes
INVALID_ARGUMENT/INVALID_POOL; anything unexpected becomes INTERNAL with the traceback in the
daemon's log only.

Every Allocate carries the whole pool definition, nearly always the same one: it is validated
(spec.parse_ipam) once per distinct wire form (the message's deterministic serialisation is the
cache key) and the parsed definition, with its resolved routes and DNS, is reused after that.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, TypeVar

import grpc
from netaddr import IPAddress

from core import wire
from core._proto import ipam_pb2 as pb
from core._proto import ipam_pb2_grpc
from core.attachment import name_problem
from core.names import container_id_problem, ifname_problem
from core.spec import ConfigError, PoolDef
from core.wire import REASON_KEY, Reason
from ipamd.allocator import Allocator, Request
from ipamd.errors import InvalidPool, InvalidRequest, IpamError, LeaseNotFound, NotClustered, wire_status
from ipamd.metrics import Metrics
from ipamd.model import QUARANTINED, RESERVED, Entry
from ipamd.probe import Prober
from ipamd.reconcile import Reconciler
from ipamd.store import Cluster

log = logging.getLogger("ipamd.service")
POOL_CACHE_MAX = 256  # distinct pool definitions kept parsed (cleared when full)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[["IpamService", Req, grpc.ServicerContext], Resp]


def _rpc(fn: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """The one server-side error translator."""

    @functools.wraps(fn)
    def wrapper(self: IpamService, request: Req, context: grpc.ServicerContext) -> Resp:
        try:
            return fn(self, request, context)
        except ConfigError as exc:
            err: IpamError = InvalidPool(str(exc))
        except IpamError as exc:
            err = exc
        except Exception:
            log.exception("rpc=%s msg=%s", fn.__name__, "internal error")
            self.metrics.inc("ipamd_failures_total", rpc=fn.__name__, reason="INTERNAL")
            context.set_trailing_metadata(((REASON_KEY, Reason.INTERNAL),))
            context.abort(grpc.StatusCode.INTERNAL,
                          f"ipamd internal error in {fn.__name__} (see the ipamd log)")
        status, reason = wire_status(err)
        self.metrics.inc("ipamd_failures_total", rpc=fn.__name__, reason=status)
        level = logging.ERROR if status == "INTERNAL" else logging.INFO
        log.log(level, "rpc=%s status=%s reason=%s msg=%s", fn.__name__, status, reason, err.msg)
        context.set_trailing_metadata(((REASON_KEY, reason),))
        context.abort(getattr(grpc.StatusCode, status), err.msg)

    return wrapper


def _required(**fields: str) -> None:
    missing = [k for k, v in fields.items() if not v]
    if missing:
        raise InvalidRequest(f"missing required field(s): {', '.join(missing)}")


def _identity(network: str, container_id: str, ifname: str) -> None:
    """What ipamd stores and logs as an attachment's identity follows the plugins' rules (core.names,
    core.attachment): a direct client cannot put a name into the store that no plugin would."""
    for why in (name_problem(network, "network"),
                f"container_id {container_id!r} {p}" if (p := container_id_problem(container_id)) else None,
                f"ifname {ifname!r} {p}" if (p := ifname_problem(ifname)) else None):
        if why:
            raise InvalidRequest(why)


def _request_ips(values: Iterable[str]) -> tuple[IPAddress, ...]:
    """Requested addresses; garbage is a bad request (INVALID_REQUEST), not a bad pool."""
    try:
        return wire.ips_from_pb(list(values))
    except ConfigError as exc:
        raise InvalidRequest(str(exc)) from exc


def _request_ip(value: str, what: str) -> IPAddress:
    try:
        return wire.ip_from_pb(value, what)
    except ConfigError as exc:
        raise InvalidRequest(str(exc)) from exc


def _netns(path: str) -> str:
    if path and not os.path.isabs(path):
        raise InvalidRequest(f"netns {path!r} must be an absolute path")
    return path


class _ParsedPool(NamedTuple):
    pool: PoolDef
    routes: list[pb.Route]
    dns: pb.Dns


class IpamService(ipam_pb2_grpc.IpamServicer):
    def __init__(self, allocator: Allocator, prober: Prober, metrics: Metrics,
                 reconciler: Reconciler | None = None) -> None:
        self.allocator = allocator
        self.prober = prober
        self.metrics = metrics
        self.reconciler = reconciler
        self._pools: dict[bytes, _ParsedPool] = {}

    def _parsed_pool(self, msg: pb.PoolSpec) -> _ParsedPool:
        """The validated definition of a wire pool; parsed once per distinct wire form."""
        key = msg.SerializeToString(deterministic=True)
        hit = self._pools.get(key)
        if hit is None:
            pool = wire.pool_from_pb(msg)  # raises ConfigError: never cached
            hit = _ParsedPool(pool, wire.routes_to_pb(wire.resolve_routes(pool)),
                              wire.dns_to_pb(pool.dns))
            if len(self._pools) >= POOL_CACHE_MAX:
                self._pools.clear()
            self._pools[key] = hit
        return hit

    @_rpc
    def Allocate(self, request: pb.AllocateRequest, context: Any) -> pb.AllocateResponse:
        _required(network=request.network, container_id=request.container_id, ifname=request.ifname)
        _identity(request.network, request.container_id, request.ifname)
        parsed = self._parsed_pool(request.pool)
        pool = parsed.pool
        segment = wire.segment_from_pb(request.segment) if request.HasField("segment") else None
        req = Request(
            network=request.network, pool=pool, container_id=request.container_id, ifname=request.ifname,
            pod=wire.pod_from_pb(request.pod), requested_ips=_request_ips(request.requested_ips),
            requested_mac=request.requested_mac, netns=_netns(request.netns),
            conflict_check=request.conflict_check,
            conflict_check_wait_ms=min(int(request.conflict_check_wait_ms or 100), 10_000),
            segment=segment, interface_mac=request.interface_mac, probe_held=request.probe_held,
        )
        grant = self.allocator.allocate(req)
        if not grant.existing:
            self.metrics.inc("ipamd_allocations_total", len(grant.entries), network=request.network)
        seen = self.allocator.segments.gateways_seen(req) if self.allocator.segments is not None else []
        log.info("rpc=Allocate network=%s container_id=%s ifname=%s ips=%s existing=%s conflict_probed=%s "
                 "pre_probed=%d gateways_seen=%d", request.network, request.container_id, request.ifname,
                 ",".join(str(e.address) for e in grant.entries), grant.existing, grant.conflict_probed,
                 len(grant.pre_probed), len(seen))
        return pb.AllocateResponse(
            lease=leases_to_pb(grant.entries)[0], routes=parsed.routes, dns=parsed.dns,
            conflict_probed=grant.conflict_probed, quarantined=list(grant.quarantined),
            pre_probed=len(grant.pre_probed), gateways=wire.gateways_to_pb(seen))

    @_rpc
    def Release(self, request: pb.ReleaseRequest, context: Any) -> pb.ReleaseResponse:
        _required(container_id=request.container_id, ifname=request.ifname)
        released = self.allocator.release(request.network or None, request.container_id, request.ifname)
        if released:
            self.metrics.inc("ipamd_releases_total", len(released), network=request.network or "*")
        log.info("rpc=Release network=%s container_id=%s ifname=%s released=%s", request.network or "*",
                 request.container_id, request.ifname, ",".join(str(e.ip) for e in released) or "-")
        return pb.ReleaseResponse(released=leases_to_pb(released))

    @_rpc
    def GetLease(self, request: pb.GetLeaseRequest, context: Any) -> pb.GetLeaseResponse:
        _required(network=request.network, container_id=request.container_id, ifname=request.ifname)
        entries, pool = self.allocator.get(request.network, request.container_id, request.ifname)
        if pool is None:
            raise LeaseNotFound(f"network {request.network} is unknown to ipamd (no address was ever "
                                "allocated in it)")
        conflicts = self.allocator.conflicts_of(request.network, request.container_id, request.ifname)
        if not entries and not conflicts:
            raise LeaseNotFound(f"network {request.network}: no lease for container {request.container_id} "
                                f"ifname {request.ifname}")
        lease = leases_to_pb(entries)[0] if entries else pb.Lease(
            network=request.network, container_id=request.container_id, ifname=request.ifname)
        return pb.GetLeaseResponse(
            lease=lease, routes=wire.routes_to_pb(wire.resolve_routes(pool)), dns=wire.dns_to_pb(pool.dns),
            conflicts=leases_to_pb(conflicts))

    @_rpc
    def GarbageCollect(self, request: pb.GcRequest, context: Any) -> pb.GcResponse:
        # An empty network used to mean "every network": one call with a typo (or from a tool
        # that left the field unset) released every lease of the node. GC is per network.
        _required(network=request.network)
        released = self.allocator.gc(request.network, [(a.container_id, a.ifname) for a in request.valid])
        if released:
            self.metrics.inc("ipamd_releases_total", len(released), network=request.network)
        log.info("rpc=GarbageCollect network=%s kept=%d released=%s", request.network,
                 len(request.valid), ",".join(f"{e.network}/{e.ip}" for e in released) or "-")
        return pb.GcResponse(released=leases_to_pb(released))

    @_rpc
    def ListPools(self, request: pb.ListPoolsRequest, context: Any) -> pb.ListPoolsResponse:
        pools = [pb.PoolUsage(network=u.network, subnet=str(u.subnet), used=u.used, total=u.total,
                              quarantined=u.quarantined, gateway=str(u.gateway) if u.gateway else "")
                 for u in self.allocator.usage(request.network or None)]
        pools += [pb.PoolUsage(network=net, definition_error=why)
                  for net, why in sorted(self.allocator.quarantined().items())
                  if not request.network or net == request.network]
        return pb.ListPoolsResponse(pools=pools)

    @_rpc
    def ListLeases(self, request: pb.ListLeasesRequest, context: Any) -> pb.ListLeasesResponse:
        return pb.ListLeasesResponse(
            leases=leases_to_pb(self.allocator.leases(request.network or None, request.all)))

    @_rpc
    def ListNodes(self, request: pb.ListNodesRequest, context: Any) -> pb.ListNodesResponse:
        cluster = self._cluster()
        return pb.ListNodesResponse(
            node=cluster.node, online=cluster.online, replayed=cluster.replayed, nodes=[
            pb.NodeInfo(name=n.name, alive=n.alive, leases=n.leases, reserved=n.reserved,
                        blocks=[pb.Block(network=b.network, subnet=b.subnet, index=b.index, first=b.first,
                                         last=b.last) for b in n.blocks])
            for n in cluster.nodes()])

    @_rpc
    def ReleaseNode(self, request: pb.ReleaseNodeRequest, context: Any) -> pb.ReleaseNodeResponse:
        _required(node=request.node)
        r = self._cluster().release_node(request.node)
        return pb.ReleaseNodeResponse(leases=r.leases, blocks=r.blocks, reserved=r.reserved)

    def _cluster(self) -> Cluster:
        if self.allocator.cluster is None:
            raise NotClustered("this ipamd keeps its leases in SQLite (one node): there are no cluster "
                               "nodes; run every node's ipamd with --store etcd")
        return self.allocator.cluster

    @_rpc
    def ProbeGateway(self, request: pb.ProbeGatewayRequest, context: Any) -> pb.ProbeGatewayResponse:
        _required(netns=request.netns, ifname=request.ifname, gateway=request.gateway)
        if (why := ifname_problem(request.ifname)) is not None:
            raise InvalidRequest(f"ifname {request.ifname!r} {why}")
        gw = _request_ip(request.gateway, "gateway")
        sender = _request_ip(request.sender_ip, "sender_ip") if request.sender_ip else None
        timeout_ms = min(max(int(request.timeout_ms or 1000), 1), 60_000)
        res = self.prober.gateway(_netns(request.netns), request.ifname, gw, sender, timeout_ms,
                                  request.cache_key)
        log.info("rpc=ProbeGateway netns=%s ifname=%s gateway=%s reachable=%s mac=%s elapsed_ms=%.1f "
                 "cached=%s skipped=%s", request.netns, request.ifname, gw, res.answered, res.mac,
                 res.elapsed_ms, res.cached, res.skipped)
        return pb.ProbeGatewayResponse(reachable=res.answered, mac=res.mac or "",
                                       elapsed_us=int(res.elapsed_ms * 1000), cached=res.cached,
                                       skipped=res.skipped)

    @_rpc
    def Reconcile(self, request: pb.ReconcileRequest, context: Any) -> pb.ReconcileResponse:
        if self.reconciler is None:
            raise InvalidRequest("this ipamd runs no reconciler")
        grace = request.grace_seconds if request.HasField("grace_seconds") else None
        report = self.reconciler.run(dry_run=request.dry_run, grace_s=grace, trigger="request")
        return pb.ReconcileResponse(
            actions=[pb.ReconcileAction(step=a.step, target=a.target, container_id=a.container_id,
                                        ifname=a.ifname, outcome=a.outcome, reason=a.reason,
                                        network=a.network, netns=a.netns, detail=a.detail)
                     for a in report.actions],
            dry_run=report.dry_run, grace_seconds=int(report.grace_s), started_unix_ms=report.started_ms,
            duration_ms=report.duration_ms)


def leases_to_pb(entries: Iterable[Entry]) -> list[pb.Lease]:
    """Group address entries into one Lease per (network, attachment, state)."""
    grouped: dict[tuple[str, str, str, str, str], list[Entry]] = {}
    for e in entries:
        # Quarantined addresses are listed one by one: each has its own answering MAC.
        key = (e.network, e.container_id, e.ifname,
               e.state + (str(e.ip) if e.state in (QUARANTINED, RESERVED) else ""), e.node)
        grouped.setdefault(key, []).append(e)
    out = []
    for group in grouped.values():
        group.sort(key=lambda e: e.subnet_index)
        first = group[0]
        out.append(pb.Lease(
            network=first.network, container_id=first.container_id, ifname=first.ifname,
            pod=wire.pod_to_pb(first.pod),
            ips=[pb.IpConfig(address=str(e.address), gateway=str(e.gateway) if e.gateway else "")
                 for e in group],
            mac=next((e.mac for e in group if e.mac), ""), state=first.state,
            created_unix_ms=first.created_ms, netns=first.netns,
            conflict_mac=first.conflict_mac, node=first.node,
        ))
    return out
