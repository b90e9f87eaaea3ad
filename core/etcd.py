"""The etcd v3 client: etcd's own gRPC API (stubs generated from its vendored .proto files), over
several endpoints, with TLS and client certificates.

Why generated stubs over grpcio and not a client package: ipamd already runs grpcio, whose C core
gives us what the etcd clients on PyPI wrap or lack: a synchronous API for the daemon's threads,
TLS with client certificates (`grpc.ssl_channel_credentials`), keepalives and fast reconnects, and
no JSON/base64 layer on the hot path (see proto/etcd/README.md; the commit message says more).

What this module decides, and nothing more:
- endpoints are tried in turn. A *transport* failure (refused, reset, no answer before the
  deadline) moves to the next endpoint. An answer from a member that cannot serve right now
  ("etcdserver: no leader", "leader changed", "request timed out": an election) is retried on any
  member until the call's deadline. Only when no member answered at all is the failure
  `Unavailable` with `answered=False`: that is the one signal a caller may treat as an outage;
- requests are counted per kind (`counts`), for the metrics and the bench (writes per allocation);
- errors come out as the core's neutral errors (`Unavailable`, `CoreError`).
The data model (keys, values, compare-and-swap rules) belongs to the caller (ipamd/store_etcd.py).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import grpc

from core._proto.etcd import kv_pb2, rpc_pb2, rpc_pb2_grpc
from core.errors import CoreError, Unavailable

log = logging.getLogger("core.etcd")

Compare = rpc_pb2.Compare
RequestOp = rpc_pb2.RequestOp
KeyValue = kv_pb2.KeyValue
Event = kv_pb2.Event
PUT, DELETE = kv_pb2.Event.PUT, kv_pb2.Event.DELETE

ATTEMPT_TIMEOUT_S = 2.0  # one request to one member
CALL_DEADLINE_S = 6.0  # a whole call: every member, elections included (shorter than a CNI call)
SILENT_S = 2.0  # no member answered at all for this long: unreachable (an election answers)
_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),  # grpc's default (120 s) would outlast an outage
    ("grpc.enable_retries", 0),
    ("grpc.max_receive_message_length", 64 << 20),
]


class EtcdError(CoreError):
    """etcd answered and refused the request (not an availability problem)."""


class EtcdUnavailable(Unavailable):
    """No member could serve the call. `answered`: some member answered (no leader, timeouts
    inside etcd), as opposed to no member answering at all (the only outage signal)."""

    def __init__(self, msg: str, answered: bool) -> None:
        super().__init__(msg, hint="check that etcd is running and reachable from this node")
        self.answered = answered


class Compacted(CoreError):
    """A watch asked for history that etcd compacted: re-read the range and watch again."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"etcd compacted its history up to revision {revision}")
        self.revision = revision


@dataclass(frozen=True)
class EtcdConfig:
    endpoints: tuple[str, ...]  # http(s)://host:port
    cacert: str = ""
    cert: str = ""
    key: str = ""

    def validate(self) -> None:
        if not self.endpoints:
            raise ValueError("no etcd endpoints given")
        for ep in self.endpoints:
            u = urlsplit(ep)
            if u.scheme not in ("http", "https") or not u.hostname or not u.port or u.path not in ("", "/"):
                raise ValueError(f"etcd endpoint {ep!r}: expected http://HOST:PORT or https://HOST:PORT")
        if bool(self.cert) != bool(self.key):
            raise ValueError("etcd client certificate and key go together (--etcd-cert and --etcd-key)")
        if (self.cacert or self.cert) and not all(urlsplit(e).scheme == "https" for e in self.endpoints):
            raise ValueError("TLS files given but an etcd endpoint is not https://")


@dataclass(frozen=True)
class Kv:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int  # the store revision after the transaction (of the puts when it succeeded)
    ranges: tuple[tuple[Kv, ...], ...]  # the Range responses among the executed ops, in order


# ---- request builders (plain data, no I/O) ---------------------------------------------------


def prefix_end(prefix: bytes) -> bytes:
    """range_end that selects every key starting with `prefix`."""
    b = bytearray(prefix)
    for i in range(len(b) - 1, -1, -1):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[: i + 1])
    return b"\0"


def mod_is(key: bytes, revision: int) -> Compare:
    """The key's last modification is `revision` (0: the key does not exist)."""
    return Compare(result=Compare.EQUAL, target=Compare.MOD, key=key, mod_revision=revision)


def absent(key: bytes) -> Compare:
    return Compare(result=Compare.EQUAL, target=Compare.CREATE, key=key, create_revision=0)


def put(key: bytes, value: bytes, lease: int = 0) -> RequestOp:
    return RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=value, lease=lease))


def delete(key: bytes, prefix: bool = False) -> RequestOp:
    return RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(
        key=key, range_end=prefix_end(key) if prefix else b""))


def get(key: bytes, prefix: bool = False) -> RequestOp:
    end = prefix_end(key) if prefix else b""
    return RequestOp(request_range=rpc_pb2.RangeRequest(key=key, range_end=end))


def _kv(k: kv_pb2.KeyValue) -> Kv:
    return Kv(k.key, k.value, k.create_revision, k.mod_revision, k.lease)


# ---- the client ------------------------------------------------------------------------------


@dataclass
class _Endpoint:
    url: str
    channel: grpc.Channel
    kv: Any
    lease: Any
    watch: Any


class EtcdClient:
    """Thread-safe. One channel per endpoint; calls go to the endpoint that last answered."""

    def __init__(self, cfg: EtcdConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self._creds = self._credentials(cfg)
        self._eps = [self._open(url) for url in cfg.endpoints]
        self._cur = 0
        self._mu = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self.closed = False

    @staticmethod
    def _credentials(cfg: EtcdConfig) -> grpc.ChannelCredentials | None:
        if not any(urlsplit(e).scheme == "https" for e in cfg.endpoints):
            return None

        def read(path: str) -> bytes | None:
            if not path:
                return None
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError as exc:
                raise ValueError(f"cannot read {path}: {exc.strerror}") from exc

        return grpc.ssl_channel_credentials(read(cfg.cacert), read(cfg.key), read(cfg.cert))

    def _open(self, url: str) -> _Endpoint:
        u = urlsplit(url)
        target = f"{u.hostname}:{u.port}" if ":" not in (u.hostname or "") else f"[{u.hostname}]:{u.port}"
        if self._creds is not None and u.scheme == "https":
            ch = grpc.secure_channel(target, self._creds, options=_CHANNEL_OPTIONS)
        else:
            ch = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
        return _Endpoint(url, ch, rpc_pb2_grpc.KVStub(ch),  # type: ignore[no-untyped-call]
                         rpc_pb2_grpc.LeaseStub(ch), rpc_pb2_grpc.WatchStub(ch))  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self.closed = True
        for ep in self._eps:
            ep.channel.close()

    def request_counts(self) -> dict[str, int]:
        with self._mu:
            return dict(self.counts)

    @property
    def endpoints_text(self) -> str:
        return ",".join(self.cfg.endpoints)

    # ---- the retry loop ------------------------------------------------------------------

    def _call(self, kind: str, fn: Callable[[_Endpoint, float], Any],
              deadline_s: float = CALL_DEADLINE_S) -> Any:
        """Run `fn(endpoint, timeout)` until one member serves it (see the module docstring)."""
        end = time.monotonic() + deadline_s
        answered = False
        last = ""
        n = len(self._eps)
        with self._mu:
            start = self._cur
        attempt = 0
        while True:
            ep = self._eps[(start + attempt) % n]
            timeout = min(ATTEMPT_TIMEOUT_S, max(0.05, end - time.monotonic()))
            with self._mu:
                self.counts[kind] += 1
            try:
                out = fn(ep, timeout)
            except grpc.RpcError as err:
                code = err.code() if hasattr(err, "code") else None
                details = (err.details() if hasattr(err, "details") else "") or ""
                if code == grpc.StatusCode.UNAVAILABLE and details.startswith("etcdserver:"):
                    answered = True  # a member answered: an election or an overloaded leader
                    last = f"{ep.url}: {details}"
                    time.sleep(0.1)
                elif code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                              grpc.StatusCode.CANCELLED):
                    last = f"{ep.url}: {details or code}"
                elif code == grpc.StatusCode.UNAUTHENTICATED or code == grpc.StatusCode.PERMISSION_DENIED:
                    raise EtcdError(f"etcd at {ep.url} refused {kind}: {details}") from err
                else:
                    raise EtcdError(f"etcd at {ep.url}: {kind} failed: {code}: {details}") from err
                attempt += 1
                now = time.monotonic()
                if now >= end or (not answered and attempt >= n and now >= end - deadline_s + SILENT_S):
                    what = "no etcd member could serve the request" if answered else "unreachable"
                    raise EtcdUnavailable(f"etcd at {self.endpoints_text} {what} ({last})", answered) from err
                if attempt % n == 0 and not answered:
                    time.sleep(0.05)  # every member failed once: do not spin
                continue
            with self._mu:
                self._cur = (start + attempt) % n
            return out

    # ---- KV --------------------------------------------------------------------------------

    def range(self, key: bytes, prefix: bool = False, revision: int = 0) -> tuple[list[Kv], int]:
        """The keys (and the store revision of the read). Linearizable."""
        req = rpc_pb2.RangeRequest(key=key, range_end=prefix_end(key) if prefix else b"", revision=revision)
        resp = self._call("range", lambda ep, t: ep.kv.Range(req, timeout=t))
        return [_kv(k) for k in resp.kvs], int(resp.header.revision)

    def txn(self, compare: Sequence[Compare], success: Sequence[RequestOp],
            failure: Sequence[RequestOp] = (), deadline_s: float = CALL_DEADLINE_S) -> TxnResult:
        req = rpc_pb2.TxnRequest(compare=list(compare), success=list(success), failure=list(failure))
        resp = self._call("txn", lambda ep, t: ep.kv.Txn(req, timeout=t), deadline_s)
        ranges = tuple(tuple(_kv(k) for k in r.response_range.kvs) for r in resp.responses
                       if r.WhichOneof("response") == "response_range")
        return TxnResult(bool(resp.succeeded), int(resp.header.revision), ranges)

    def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        req = rpc_pb2.PutRequest(key=key, value=value, lease=lease)
        return int(self._call("put", lambda ep, t: ep.kv.Put(req, timeout=t)).header.revision)

    def delete(self, key: bytes, prefix: bool = False) -> int:
        req = rpc_pb2.DeleteRangeRequest(key=key, range_end=prefix_end(key) if prefix else b"")
        return int(self._call("delete", lambda ep, t: ep.kv.DeleteRange(req, timeout=t)).deleted)

    # ---- leases (heartbeats) -----------------------------------------------------------------

    def lease_grant(self, ttl_s: int) -> int:
        req = rpc_pb2.LeaseGrantRequest(TTL=ttl_s)
        resp = self._call("lease_grant", lambda ep, t: ep.lease.LeaseGrant(req, timeout=t))
        if resp.error:
            raise EtcdError(f"etcd refused a lease: {resp.error}")
        return int(resp.ID)

    def lease_keepalive(self, lease_id: int) -> int:
        """Renew once; the remaining TTL (0: the lease is gone)."""

        def once(ep: _Endpoint, t: float) -> int:
            it = ep.lease.LeaseKeepAlive(iter([rpc_pb2.LeaseKeepAliveRequest(ID=lease_id)]), timeout=t)
            for resp in it:
                return int(resp.TTL)
            return 0

        return cast(int, self._call("keepalive", once))

    def lease_revoke(self, lease_id: int) -> None:
        req = rpc_pb2.LeaseRevokeRequest(ID=lease_id)
        with contextlib.suppress(EtcdError):  # already expired
            self._call("lease_revoke", lambda ep, t: ep.lease.LeaseRevoke(req, timeout=t), deadline_s=2.0)

    # ---- watch -----------------------------------------------------------------------------

    def watch(self, prefix: bytes, start_revision: int, on_events: Callable[[list[Event], int], None],
              stop: threading.Event) -> None:
        """Deliver every change under `prefix` from `start_revision` on, in order, until `stop` is
        set: `on_events(events, revision)` (revision: the header's, also sent with no events as
        progress). Moves to another member when a stream breaks, resuming after the last
        revision delivered. Raises Compacted when that history is gone, EtcdUnavailable when no
        member answers (the caller decides when to try again)."""
        next_rev = start_revision
        while not stop.is_set():
            reqs: queue.Queue[rpc_pb2.WatchRequest | None] = queue.Queue()
            reqs.put(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(
                key=prefix, range_end=prefix_end(prefix), start_revision=next_rev, progress_notify=True)))

            def requests(q: queue.Queue[Any] = reqs) -> Iterator[rpc_pb2.WatchRequest]:
                while (r := q.get()) is not None:
                    yield r

            def open_stream(ep: _Endpoint, t: float) -> Any:
                stream = ep.watch.Watch(requests())
                first = next(stream)  # raises RpcError when this member does not answer
                return stream, first

            stream, first = self._call("watch", open_stream)
            done = threading.Event()

            def stopper(s: Any = stream, q: queue.Queue[Any] = reqs, d: threading.Event = done) -> None:
                while not d.is_set():
                    if stop.wait(0.5):
                        q.put(None)
                        s.cancel()
                        return

            threading.Thread(target=stopper, daemon=True, name="etcd-watch-stop").start()
            try:
                for resp in _chain(first, stream):
                    if resp.compact_revision:
                        raise Compacted(int(resp.compact_revision))
                    if resp.canceled:
                        raise EtcdError(f"etcd cancelled the watch: {resp.cancel_reason}")
                    rev = int(resp.header.revision)
                    if resp.events:
                        on_events(list(resp.events), rev)
                        next_rev = max(next_rev, int(resp.events[-1].kv.mod_revision) + 1)
                    elif rev >= next_rev and not resp.created:
                        on_events([], rev)  # progress: nothing changed up to rev
            except grpc.RpcError as err:
                if stop.is_set():
                    return
                log.info("msg=%s error=%s", "etcd watch stream broke: reconnecting", err.code())
                time.sleep(0.2)
            finally:
                done.set()
                reqs.put(None)


def _chain(first: Any, rest: Any) -> Iterator[Any]:
    yield first
    yield from rest
