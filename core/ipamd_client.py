"""The typed client of ipamd: what the CNI plugins and the admin CLI use to reach the daemon.

Why a wrapper around the generated stub: every call gets a deadline (never "no deadline"), and
every failure comes out as a neutral core error through one translator (`_translate`):
- UNAVAILABLE / DEADLINE_EXCEEDED -> `Unavailable`, naming the socket (try again later);
- any other status -> `IpamdRefused` with the daemon's machine-readable reason (trailing metadata
  `core.wire.REASON_KEY`); without one, INVALID_ARGUMENT reads as INVALID_REQUEST and anything
  else as INTERNAL.
Each program maps those at its edge (the plugins: cni/errors.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ParamSpec, Protocol, TypeVar, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from netaddr import IPAddress

from core import wire
from core._proto import ipam_pb2 as pb
from core._proto import ipam_pb2_grpc
from core.errors import CoreError, IpamdRefused, Unavailable
from core.spec import Allocation, PodRef, PoolDef, ProbeResult
from core.wire import REASON_KEY, Reason

P = ParamSpec("P")
R = TypeVar("R")


class _IpamStub(Protocol):
    """The generated stub, typed (the generated module is not)."""

    Allocate: Callable[..., pb.AllocateResponse]
    Release: Callable[..., pb.ReleaseResponse]
    GetLease: Callable[..., pb.GetLeaseResponse]
    GarbageCollect: Callable[..., pb.GcResponse]
    ListPools: Callable[..., pb.ListPoolsResponse]
    ListLeases: Callable[..., pb.ListLeasesResponse]
    ProbeGateway: Callable[..., pb.ProbeGatewayResponse]
    ListNodes: Callable[..., pb.ListNodesResponse]
    ReleaseNode: Callable[..., pb.ReleaseNodeResponse]
    Reconcile: Callable[..., pb.ReconcileResponse]


def reason_of(err: grpc.RpcError) -> str | None:
    """The reason the daemon attached to a failed call, if any."""
    meta: Any = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in meta or ():
        if key == REASON_KEY and isinstance(value, str) and value:
            return value
    return None


def _translate(fn: Callable[P, R]) -> Callable[P, R]:
    """The one place where grpc.RpcError becomes a core error."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except grpc.RpcError as err:
            self = args[0]
            assert isinstance(self, IpamClient)
            raise self.error_from(err) from err

    return wrapper


@dataclass(frozen=True)
class ClientTls:
    """Mutual TLS to ipamd's TCP listener: the CA that signed the daemon's certificate, and this
    client's certificate and key (signed by the CA the daemon trusts for clients)."""

    ca: str
    cert: str
    key: str
    server_name: str | None = None  # the name to expect in the daemon's certificate (default: the host)

    def credentials(self) -> grpc.ChannelCredentials:
        data = {}
        for what, path in (("CA", self.ca), ("certificate", self.cert), ("key", self.key)):
            try:
                with open(path, "rb") as fh:
                    data[what] = fh.read()
            except OSError as exc:
                raise CoreError(f"TLS {what} {path}: {exc.strerror}") from exc
        return grpc.ssl_channel_credentials(root_certificates=data["CA"], private_key=data["key"],
                                            certificate_chain=data["certificate"])


class IpamClient:
    """A connection to one ipamd. Cheap to create; use as a context manager.

    `target`: the unix socket's path (root-only), or HOST:PORT of ipamd's TCP listener with `tls`
    (mutual TLS: the daemon serves no TCP client without a certificate its client CA signed,
    and a plaintext TCP channel is never made)."""

    def __init__(self, target: str, timeout_ms: int = 10_000, tls: ClientTls | None = None) -> None:
        self.socket_path = target  # what error messages name: the socket, or HOST:PORT
        self.timeout_s = timeout_ms / 1000.0
        # No retries on the transport: a missing daemon must fail fast with code 11.
        options: list[tuple[str, Any]] = [("grpc.enable_retries", 0)]
        if tls is not None:
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
            self._channel = grpc.secure_channel(target, tls.credentials(), options=options)
        else:
            if not target.startswith("/") and ":" in target and not target.startswith("unix:"):
                raise CoreError(f"ipamd at {target}: a TCP address needs mutual TLS (ClientTls)")
            uri = f"unix://{target}" if target.startswith("/") else f"unix:{target}"
            self._channel = grpc.insecure_channel(uri, options=options)
        self._stub = cast(_IpamStub, ipam_pb2_grpc.IpamStub(self._channel))  # type: ignore[no-untyped-call]
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> IpamClient:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def error_from(self, err: grpc.RpcError) -> CoreError:
        status: Any = err.code() if hasattr(err, "code") else None
        details = str(err.details() if hasattr(err, "details") else "") or str(status)
        reason = reason_of(err)
        if reason is not None:
            return IpamdRefused(reason, details)
        if status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return Unavailable(f"ipamd at {self.socket_path} is unreachable: {details}")
        if status == grpc.StatusCode.INVALID_ARGUMENT:
            return IpamdRefused(Reason.INVALID_REQUEST, details)
        return IpamdRefused(Reason.INTERNAL, f"ipamd at {self.socket_path}: {details}")

    # ---- allocation ------------------------------------------------------------------------

    @_translate
    def allocate(self, *, network: str, pool: PoolDef, container_id: str, ifname: str,
                 pod: PodRef | None = None, requested_ips: Sequence[IPAddress] = (),
                 requested_mac: str | None = None, netns: str | None = None,
                 conflict_check: bool = False, conflict_check_wait_ms: int = 100) -> Allocation:
        req = pb.AllocateRequest(
            network=network, pool=wire.pool_to_pb(pool), container_id=container_id, ifname=ifname,
            pod=wire.pod_to_pb(pod), requested_ips=[str(ip) for ip in requested_ips],
            requested_mac=requested_mac or "", netns=netns or "", conflict_check=conflict_check,
            conflict_check_wait_ms=conflict_check_wait_ms,
        )
        resp = self._stub.Allocate(req, timeout=self.timeout_s)
        return wire.allocation_from_pb(resp.lease, resp.routes, resp.dns, resp.conflict_probed)

    @_translate
    def release(self, *, network: str, container_id: str, ifname: str) -> list[pb.Lease]:
        """Release every address of the attachment; returns the released leases; none is fine
        (idempotent). network "" releases the attachment in every network."""
        req = pb.ReleaseRequest(network=network, container_id=container_id, ifname=ifname)
        return list(self._stub.Release(req, timeout=self.timeout_s).released)

    @_translate
    def get_lease(self, *, network: str, container_id: str, ifname: str) -> Allocation | None:
        req = pb.GetLeaseRequest(network=network, container_id=container_id, ifname=ifname)
        try:
            resp = self._stub.GetLease(req, timeout=self.timeout_s)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return wire.allocation_from_pb(resp.lease, resp.routes, resp.dns)

    @_translate
    def gc(self, *, network: str, valid: Sequence[tuple[str, str]]) -> list[pb.Lease]:
        """Release every live lease of `network` whose (container id, ifname) is not in `valid`.
        Returns the released leases. An empty network is refused (by the daemon too)."""
        if not network:
            raise IpamdRefused(Reason.INVALID_REQUEST, "garbage collection needs a network name")
        req = pb.GcRequest(network=network,
                           valid=[pb.Attachment(container_id=c, ifname=i) for c, i in valid])
        return list(self._stub.GarbageCollect(req, timeout=self.timeout_s).released)

    # ---- probes ----------------------------------------------------------------------------

    @_translate
    def probe_gateway(self, *, netns: str, ifname: str, gateway: IPAddress, sender_ip: IPAddress | None,
                      timeout_ms: int, cache_key: str) -> ProbeResult:
        req = pb.ProbeGatewayRequest(netns=netns, ifname=ifname, gateway=str(gateway),
                                     sender_ip=str(sender_ip) if sender_ip is not None else "",
                                     timeout_ms=timeout_ms, cache_key=cache_key)
        # The probe's own budget plus headroom for the call itself.
        resp = self._stub.ProbeGateway(req, timeout=max(self.timeout_s, timeout_ms / 1000.0 + 2.0))
        return ProbeResult(answered=resp.reachable, mac=resp.mac or None,
                           elapsed_ms=resp.elapsed_us / 1000.0, cached=resp.cached, skipped=resp.skipped)

    # ---- admin -----------------------------------------------------------------------------

    @_translate
    def health(self) -> bool:
        """True iff the daemon reports SERVING. Unreachable -> Unavailable like every call."""
        resp = self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=self.timeout_s)
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

    @_translate
    def list_leases(self, *, network: str = "", all: bool = False) -> list[pb.Lease]:
        resp = self._stub.ListLeases(pb.ListLeasesRequest(network=network, all=all), timeout=self.timeout_s)
        return list(resp.leases)

    @_translate
    def list_pools(self, *, network: str = "") -> list[pb.PoolUsage]:
        resp = self._stub.ListPools(pb.ListPoolsRequest(network=network), timeout=self.timeout_s)
        return list(resp.pools)

    @_translate
    def list_nodes(self) -> pb.ListNodesResponse:
        """The cluster's nodes as the daemon's store sees them (NOT_CLUSTERED with SQLite)."""
        return self._stub.ListNodes(pb.ListNodesRequest(), timeout=self.timeout_s)

    @_translate
    def release_node(self, node: str) -> pb.ReleaseNodeResponse:
        """Free a dead node's blocks, leases and outage reserve (NODE_ALIVE while it beats)."""
        return self._stub.ReleaseNode(pb.ReleaseNodeRequest(node=node), timeout=max(self.timeout_s, 30.0))

    @_translate
    def reconcile(self, *, dry_run: bool = False, grace_seconds: int | None = None) -> pb.ReconcileResponse:
        """One reconcile pass of the daemon's node, now (grace None: the daemon's own)."""
        req = pb.ReconcileRequest(dry_run=dry_run)
        if grace_seconds is not None:
            req.grace_seconds = grace_seconds
        resp: pb.ReconcileResponse = self._stub.Reconcile(req, timeout=self.timeout_s)
        return resp
