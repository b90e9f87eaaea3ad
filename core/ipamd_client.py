"""The typed client of ipamd: what the CNI plugins and the admin CLI use to reach the daemon.

Why a wrapper around the generated stub: every call gets a deadline (never "no deadline"), and
every failure comes out as a neutral core error through one translator (`_refused`, and
`_translate` for gRPC errors):
- UNAVAILABLE / DEADLINE_EXCEEDED -> `Unavailable`, naming the socket (try again later);
- any other status -> `IpamdRefused` with the daemon's machine-readable reason (trailing metadata
  `core.wire.REASON_KEY`); without one, INVALID_ARGUMENT reads as INVALID_REQUEST and anything
  else as INTERNAL.
Each program maps those at its edge (the plugins: cni/errors.py).

The plugins' four hot calls (Allocate, Release, GetLease, ProbeGateway) go over ipamd's call
socket (core/calls.py: the same messages, framed, no gRPC) when it is there, so a plugin call
never initialises gRPC (~10 ms of CPU in a forked worker); everything else, and all calls to an
ipamd without a call socket or over TCP (mutual TLS), go over gRPC, which is imported and
connected only then.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar, cast

from netaddr import IPAddress

from core import calls, wire
from core._proto import ipam_pb2 as pb
from core.errors import CoreError, IpamdRefused, Unavailable
from core.spec import Allocation, PodRef, PoolDef, ProbeResult, Segment
from core.wire import REASON_KEY, Reason

if TYPE_CHECKING:
    import grpc

P = ParamSpec("P")
R = TypeVar("R")
M = TypeVar("M")
# grpc.StatusCode values that the call socket sends as numbers
_UNAVAILABLE, _DEADLINE, _INVALID, _NOT_FOUND = 14, 4, 3, 5


class _Unary(Protocol):
    """A unary-unary multicallable: called, or started (`future`)."""

    def __call__(self, request: Any, *, timeout: float) -> Any: ...
    def future(self, request: Any, *, timeout: float) -> Any: ...


class _IpamStub(Protocol):
    """The generated stub, typed (the generated module is not)."""

    Allocate: _Unary
    Release: Callable[..., pb.ReleaseResponse]
    GetLease: Callable[..., pb.GetLeaseResponse]
    GarbageCollect: Callable[..., pb.GcResponse]
    ListPools: Callable[..., pb.ListPoolsResponse]
    ListLeases: Callable[..., pb.ListLeasesResponse]
    ProbeGateway: Callable[..., pb.ProbeGatewayResponse]
    ListNodes: Callable[..., pb.ListNodesResponse]
    ReleaseNode: Callable[..., pb.ReleaseNodeResponse]
    Reconcile: Callable[..., pb.ReconcileResponse]


def reason_of(err: Any) -> str | None:
    """The reason the daemon attached to a failed gRPC call, if any."""
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
        except CoreError:
            raise
        except Exception as err:
            self = args[0]
            assert isinstance(self, IpamClient)
            if not self._is_rpc_error(err):
                raise
            raise self.error_from(err) from err  # type: ignore[arg-type]

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
        import grpc

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
        self._tls = tls
        tcp = not target.startswith("/") and ":" in target and not target.startswith("unix:")
        if tcp and tls is None:
            raise CoreError(f"ipamd at {target}: a TCP address needs mutual TLS (ClientTls)")
        self._channel: Any = None  # gRPC, made on first use
        self._stub_: _IpamStub | None = None
        self._health_: Any = None
        self._calls: socket.socket | None = None
        self._no_calls = tcp or tls is not None  # the call socket is a unix socket next to ipamd's

    def close(self) -> None:
        if self._calls is not None:
            self._calls.close()
            self._calls = None
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def __enter__(self) -> IpamClient:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ---- gRPC, on first use --------------------------------------------------------------

    def _grpc(self) -> None:
        import grpc
        from grpc_health.v1 import health_pb2_grpc

        from core._proto import ipam_pb2_grpc

        target, tls = self.socket_path, self._tls
        # No retries on the transport: a missing daemon must fail fast with code 11.
        options: list[tuple[str, Any]] = [("grpc.enable_retries", 0)]
        if tls is not None:
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
            self._channel = grpc.secure_channel(target, tls.credentials(), options=options)
        else:
            uri = f"unix://{target}" if target.startswith("/") else f"unix:{target}"
            self._channel = grpc.insecure_channel(uri, options=options)
        self._stub_ = cast(_IpamStub, ipam_pb2_grpc.IpamStub(self._channel))  # type: ignore[no-untyped-call]
        self._health_ = health_pb2_grpc.HealthStub(self._channel)

    @property
    def _stub(self) -> _IpamStub:
        if self._stub_ is None:
            self._grpc()
        assert self._stub_ is not None
        return self._stub_

    @property
    def _health(self) -> Any:
        if self._health_ is None:
            self._grpc()
        return self._health_

    @staticmethod
    def _is_rpc_error(err: BaseException) -> bool:
        import grpc

        return isinstance(err, grpc.RpcError)

    def error_from(self, err: grpc.RpcError) -> CoreError:
        import grpc

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

    # ---- the call socket -----------------------------------------------------------------

    def _refused(self, status: int, reason: str, msg: str) -> CoreError:
        """A failed call on the call socket: the same mapping as error_from."""
        if reason:
            return IpamdRefused(reason, msg)
        if status in (_UNAVAILABLE, _DEADLINE):
            return Unavailable(f"ipamd at {self.socket_path} is unreachable: {msg}")
        if status == _INVALID:
            return IpamdRefused(Reason.INVALID_REQUEST, msg)
        return IpamdRefused(Reason.INTERNAL, f"ipamd at {self.socket_path}: {msg}")

    def _calls_socket(self, timeout_s: float) -> socket.socket | None:
        """The connected call socket, or None when ipamd has none (then gRPC is used)."""
        if self._calls is None and not self._no_calls:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            s.settimeout(timeout_s)
            try:
                s.connect(calls.socket_path(self.socket_path))
            except OSError as exc:
                s.close()
                if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                    raise Unavailable(f"ipamd at {self.socket_path} is unreachable: {exc}") from exc
                self._no_calls = True  # an older ipamd (or none: gRPC says so)
                return None
            self._calls = s
        if self._calls is not None:
            self._calls.settimeout(timeout_s)
        return self._calls

    def _send(self, method: int, req: Any, timeout_s: float) -> bool:
        """Send one call on the call socket; False when there is none."""
        s = self._calls_socket(timeout_s)
        if s is None:
            return False
        try:
            s.sendall(calls.frame(method, req.SerializeToString()))
        except OSError as exc:
            self._lost()
            raise Unavailable(f"ipamd at {self.socket_path} is unreachable: {exc}") from exc
        return True

    def _receive(self, resp_type: Callable[[bytes], M], not_found: bool = False) -> M | None:
        """The answer to the call sent last; None for NOT_FOUND when `not_found`."""
        assert self._calls is not None
        try:
            status, payload = calls.read_frame(self._calls)
        except OSError as exc:  # a timeout, or the daemon went away
            self._lost()
            raise Unavailable(f"ipamd at {self.socket_path} is unreachable: {exc}") from exc
        if status == calls.OK:
            return resp_type(payload)
        if status == _NOT_FOUND and not_found:
            return None
        raise self._refused(status, *calls.parse_error(payload))

    def _lost(self) -> None:
        if self._calls is not None:
            self._calls.close()
            self._calls = None

    def _call(self, method: int, req: Any, resp_type: Callable[[bytes], M], timeout_s: float | None = None,
              not_found: bool = False) -> tuple[bool, M | None]:
        """(True, answer) over the call socket, or (False, None) when there is none."""
        if not self._send(method, req, timeout_s or self.timeout_s):
            return False, None
        return True, self._receive(resp_type, not_found)

    # ---- allocation ------------------------------------------------------------------------

    def _allocate_request(self, *, network: str, pool: PoolDef, container_id: str, ifname: str,
                          pod: PodRef | None, requested_ips: Sequence[IPAddress], requested_mac: str | None,
                          netns: str | None, conflict_check: bool, conflict_check_wait_ms: int,
                          segment: Segment | None, interface_mac: str,
                          probe_held: bool) -> pb.AllocateRequest:
        return pb.AllocateRequest(
            network=network, pool=wire.pool_to_pb(pool), container_id=container_id, ifname=ifname,
            pod=wire.pod_to_pb(pod), requested_ips=[str(ip) for ip in requested_ips],
            requested_mac=requested_mac or "", netns=netns or "", conflict_check=conflict_check,
            conflict_check_wait_ms=conflict_check_wait_ms, segment=wire.segment_to_pb(segment),
            interface_mac=interface_mac, probe_held=probe_held,
        )

    @staticmethod
    def _allocation(resp: pb.AllocateResponse) -> Allocation:
        return wire.allocation_from_pb(resp.lease, resp.routes, resp.dns, resp.conflict_probed,
                                       pre_probed=resp.pre_probed, gateways=resp.gateways)

    @_translate
    def allocate(self, *, network: str, pool: PoolDef, container_id: str, ifname: str,
                 pod: PodRef | None = None, requested_ips: Sequence[IPAddress] = (),
                 requested_mac: str | None = None, netns: str | None = None,
                 conflict_check: bool = False, conflict_check_wait_ms: int = 100,
                 segment: Segment | None = None, interface_mac: str = "",
                 probe_held: bool = False) -> Allocation:
        req = self._allocate_request(
            network=network, pool=pool, container_id=container_id, ifname=ifname, pod=pod,
            requested_ips=requested_ips, requested_mac=requested_mac, netns=netns,
            conflict_check=conflict_check, conflict_check_wait_ms=conflict_check_wait_ms,
            segment=segment, interface_mac=interface_mac, probe_held=probe_held)
        done, resp = self._call(calls.ALLOCATE, req, pb.AllocateResponse.FromString)
        if not done:
            resp = self._stub.Allocate(req, timeout=self.timeout_s)
        assert resp is not None
        return self._allocation(resp)

    def start_allocate(self, *, network: str, pool: PoolDef, container_id: str, ifname: str,
                       pod: PodRef | None = None, requested_ips: Sequence[IPAddress] = (),
                       requested_mac: str | None = None, netns: str | None = None,
                       conflict_check: bool = False, conflict_check_wait_ms: int = 100,
                       segment: Segment | None = None, interface_mac: str = "") -> PendingAllocation:
        """Send an Allocate and return at once: ipamd decides (and probes) while the caller does
        other work (the plugin creates the veth meanwhile); `result()` reads the answer."""
        req = self._allocate_request(
            network=network, pool=pool, container_id=container_id, ifname=ifname, pod=pod,
            requested_ips=requested_ips, requested_mac=requested_mac, netns=netns,
            conflict_check=conflict_check, conflict_check_wait_ms=conflict_check_wait_ms,
            segment=segment, interface_mac=interface_mac, probe_held=False)
        if self._send(calls.ALLOCATE, req, self.timeout_s):
            return PendingAllocation(self, None)
        try:
            fut = self._stub.Allocate.future(req, timeout=self.timeout_s)
        except Exception as err:
            if self._is_rpc_error(err):
                raise self.error_from(err) from err  # type: ignore[arg-type]
            raise
        return PendingAllocation(self, fut)

    @_translate
    def release(self, *, network: str, container_id: str, ifname: str) -> list[pb.Lease]:
        """Release every address of the attachment; returns the released leases; none is fine
        (idempotent). network "" releases the attachment in every network."""
        req = pb.ReleaseRequest(network=network, container_id=container_id, ifname=ifname)
        done, resp = self._call(calls.RELEASE, req, pb.ReleaseResponse.FromString)
        if not done:
            resp = self._stub.Release(req, timeout=self.timeout_s)
        assert resp is not None
        return list(resp.released)

    @_translate
    def get_lease(self, *, network: str, container_id: str, ifname: str) -> Allocation | None:
        """The attachment's lease (with `conflicts`: its addresses quarantined while it held
        them), or None when it holds nothing."""
        req = pb.GetLeaseRequest(network=network, container_id=container_id, ifname=ifname)
        done, resp = self._call(calls.GET_LEASE, req, pb.GetLeaseResponse.FromString, not_found=True)
        if not done:
            try:
                resp = self._stub.GetLease(req, timeout=self.timeout_s)
            except Exception as err:
                if self._is_rpc_error(err) and err.code().value[0] == _NOT_FOUND:  # type: ignore[attr-defined]
                    return None
                raise
        if resp is None:
            return None
        return wire.allocation_from_pb(resp.lease, resp.routes, resp.dns, conflicts=resp.conflicts)

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
        timeout_s = max(self.timeout_s, timeout_ms / 1000.0 + 2.0)
        done, resp = self._call(calls.PROBE_GATEWAY, req, pb.ProbeGatewayResponse.FromString, timeout_s)
        if not done:
            resp = self._stub.ProbeGateway(req, timeout=timeout_s)
        assert resp is not None
        return ProbeResult(answered=resp.reachable, mac=resp.mac or None,
                           elapsed_ms=resp.elapsed_us / 1000.0, cached=resp.cached, skipped=resp.skipped)

    # ---- admin -----------------------------------------------------------------------------

    @_translate
    def health(self) -> bool:
        """True iff the daemon reports SERVING. Unreachable -> Unavailable like every call."""
        from grpc_health.v1 import health_pb2

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


class PendingAllocation:
    """An Allocate in flight (IpamClient.start_allocate): on the call socket (`fut` None: the
    answer is the next frame on it) or a gRPC future."""

    def __init__(self, client: IpamClient, fut: Any) -> None:
        self._client = client
        self._fut = fut
        self._resp: pb.AllocateResponse | None = None
        self._err: CoreError | None = None
        self._read = False

    def _wait(self) -> pb.AllocateResponse:
        if not self._read:
            self._read = True
            try:
                if self._fut is None:
                    self._resp = self._client._receive(pb.AllocateResponse.FromString)
                else:
                    self._resp = self._fut.result()
            except CoreError as exc:
                self._err = exc
            except Exception as err:
                if not self._client._is_rpc_error(err):
                    raise
                self._err = self._client.error_from(err)  # type: ignore[arg-type]
        if self._err is not None:
            raise self._err
        assert self._resp is not None
        return self._resp

    def result(self) -> Allocation:
        """Wait for the answer; the same errors as IpamClient.allocate."""
        return IpamClient._allocation(self._wait())

    def settle(self) -> None:
        """Wait until the call is over, whatever its outcome (before undoing what it may have
        granted: a release must come after the grant, never race it)."""
        with contextlib.suppress(CoreError):
            self._wait()
