"""ipamd's call socket: the plugins' four hot calls (Allocate, Release, GetLease, ProbeGateway) as
framed protobuf over a unix socket next to the gRPC one (`<daemonSocket>.calls`). The framing is
here, pure; the client side is core.ipamd_client, the server side ipamd/calls_server.py.

Why a second way in (issue 14): the plugin runs each call in a freshly forked process (the warm
server's worker, or an exec), and the first gRPC channel of a process initialises gRPC's C core:
it starts 7 threads, and measured on the 2-core CI box a forked worker spends ~10 ms of CPU
(user 3.5 + sys 7) and 4-6 ms of wall time on it before the call is even sent, about half of
everything a warm ADD costs in CPU. Under 8 concurrent ADDs on 2 cores, CPU is what ADDs wait
for. A unix socket and the same protobuf messages cost a few tenths of a millisecond. gRPC stays
THE API: the admin CLI, health (STATUS, probes of the DaemonSet) and any other client use it;
the call socket serves the same servicer methods with the same error table, and the client falls
back to gRPC when the call socket is not there (an older ipamd).

Frames (all integers network order):
  request   !BI  method, length   + the request message (method: 1 Allocate, 2 Release,
                                    3 GetLease, 4 ProbeGateway)
  reply     !BI  status, length   + status 0: the response message; else (a grpc.StatusCode
                                    value) UTF-8 "<reason>\\n<message>" (reason as the gRPC
                                    trailing metadata core.wire.REASON_KEY, "" when none)
One connection carries any number of calls, one at a time. Root only: the socket is 0600 in the
0700 directory of the gRPC socket.
"""

from __future__ import annotations

import socket
import struct

SUFFIX = ".calls"
HEAD = struct.Struct("!BI")
MAX_FRAME = 4 * 1024 * 1024
ALLOCATE, RELEASE, GET_LEASE, PROBE_GATEWAY = 1, 2, 3, 4
OK = 0


def socket_path(grpc_socket: str) -> str:
    """The call socket next to ipamd's gRPC socket."""
    return grpc_socket + SUFFIX


def frame(kind: int, payload: bytes) -> bytes:
    return HEAD.pack(kind, len(payload)) + payload


def error_payload(reason: str, msg: str) -> bytes:
    return f"{reason}\n{msg}".encode()


def parse_error(payload: bytes) -> tuple[str, str]:
    reason, _, msg = payload.decode(errors="replace").partition("\n")
    return reason, msg


class FrameError(OSError):
    """The peer closed the connection or sent something that is not a frame."""


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """(kind, payload) of the next frame; FrameError at EOF or on a bad length."""
    head = _read(sock, HEAD.size)
    kind, size = HEAD.unpack(head)
    if size > MAX_FRAME:
        raise FrameError(f"frame of {size} bytes is too large")
    return kind, _read(sock, size)


def _read(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise FrameError("connection closed" if not buf else "connection closed inside a frame")
        buf += chunk
    return bytes(buf)
