"""ipamd's call socket (core/calls.py): the plugins' hot calls served without gRPC.

Why: see core/calls.py (a forked plugin worker would spend ~10 ms of CPU initialising gRPC for
one call). This module only frames: each call goes to the very same `IpamService` method the
gRPC server calls, with a context whose `abort` carries the status and the reason that the
service's one error translator (`service._rpc`) chose, so both ways in answer alike.

Threads: one accepts; each connection is served by a worker of a pool as large as the gRPC
server's (`workers`); a connection carries calls one at a time until the client closes it or
stays idle for IDLE_S. The
socket is made under umask 0177 and chmod'ed 0600, in the 0700 directory of the gRPC socket.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any

from core import calls
from core._proto import ipam_pb2 as pb
from core.wire import REASON_KEY
from ipamd.service import IpamService

log = logging.getLogger("ipamd.calls")

# method -> (request parser, servicer method name)
METHODS: dict[int, tuple[Callable[[bytes], Any], str]] = {
    calls.ALLOCATE: (pb.AllocateRequest.FromString, "Allocate"),
    calls.RELEASE: (pb.ReleaseRequest.FromString, "Release"),
    calls.GET_LEASE: (pb.GetLeaseRequest.FromString, "GetLease"),
    calls.PROBE_GATEWAY: (pb.ProbeGatewayRequest.FromString, "ProbeGateway"),
}
_INTERNAL, _INVALID = 13, 3
IDLE_S = 30.0  # a connection with no call for this long is closed (a plugin call lasts seconds)


class _Aborted(Exception):
    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg


class _Context:
    """What `service._rpc` uses of a grpc.ServicerContext."""

    def __init__(self) -> None:
        self.reason = ""

    def set_trailing_metadata(self, md: Any) -> None:
        for key, value in md:
            if key == REASON_KEY:
                self.reason = str(value)

    def abort(self, code: Any, details: str) -> None:
        raise _Aborted(int(code.value[0]), details)


class CallServer:
    def __init__(self, service: IpamService, path: str, workers: int) -> None:
        self.service = service
        self.path = path
        self._pool = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="calls")
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # the gRPC socket's lock is held: a file here is a dead daemon's
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            self._sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._sock.listen(256)
        self._thread = threading.Thread(target=self._accept, name="calls-accept", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting; calls in flight finish; connections are closed."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(5)
        with self._lock:
            for c in list(self._conns):
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RD)
        self._pool.shutdown(wait=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._stop.is_set():
                    return
                continue
            with self._lock:
                self._conns.add(conn)
            try:
                self._pool.submit(self._serve, conn)
            except RuntimeError:  # shutting down
                conn.close()
                return

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(IDLE_S)
        try:
            while not self._stop.is_set():
                try:
                    method, payload = calls.read_frame(conn)
                except OSError:
                    return  # the client is done (or gone)
                conn.sendall(self._one(method, payload))
        except OSError as exc:
            log.info("msg=%s error=%s", "call socket: client went away mid-call", exc)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _one(self, method: int, payload: bytes) -> bytes:
        known = METHODS.get(method)
        if known is None:
            return calls.frame(_INVALID, calls.error_payload("", f"unknown call {method}"))
        parse, name = known
        ctx = _Context()
        try:
            request = parse(payload)
        except Exception:  # protobuf's DecodeError
            return calls.frame(_INVALID, calls.error_payload("", f"{name}: malformed request"))
        try:
            response = getattr(self.service, name)(request, ctx)
        except _Aborted as exc:
            return calls.frame(exc.status, calls.error_payload(ctx.reason, exc.msg))
        except Exception:
            log.exception("rpc=%s msg=%s", name, "internal error on the call socket")
            return calls.frame(_INTERNAL, calls.error_payload("", f"ipamd internal error in {name}"))
        return calls.frame(calls.OK, response.SerializeToString())
