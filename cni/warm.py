"""The warm path: hand a CNI call to a pre-imported fork server instead of importing the world.

Why: a cold plugin exec spends most of an ADD importing ovs, grpc, protobuf and netaddr.
`ovs-underlay --warm-server` (cni/warm_server.py, the same frozen bundle) imports all of that
once and then forks one worker per call, for both plugins, `ovs-underlay` and
`ovs-underlay-ipam`: the request names the plugin. The worker runs exactly the in-process code,
`skel.main(verbs, env, stdin, stdout)`, with the caller's env, stdin bytes, stdout/stderr fds and
filesystem (it enters the caller's mount namespace), so the result JSON goes straight to the
runtime's pipe and a delegated IPAM such as host-local sees the same files as an in-process call.
This module is the protocol and the client side; stdlib only at module level (socket is
imported lazily, so VERSION does not pay for it).

Protocol (AF_UNIX stream, one connection per call):
  client -> server  b"OUW2" + !II(json_len, stdin_len) + json{env,cwd,plugin,netns_fd} + stdin
  worker -> client  b"R"                  request read, ready to run
  client -> worker  b"G" + SCM_RIGHTS [stdout, stderr, mount ns, (netns)]
                                          commit: run the verb (the client will not fall back)
  worker -> client  b"N"                  after "G": the worker did NOT run the verb (it cannot
                                          enter the caller's mount namespace, or sees other code
                                          there); the client runs the call in-process
  worker -> client  b"O"                  before the first byte it writes to the caller's stdout
  worker -> client  b"X" + code (1 byte)  the verb returned; the worker exits with code
  server -> client  b"E" + !i(status)     after reaping the worker (exit code, or -signal)

The caller's fds travel with "G", never before the server has answered: a stopped or hung
server (SIGSTOP: the connection waits unaccepted in the listen backlog) then holds nothing of
the caller's, and the runtime sees EOF as soon as the fallback run exits. The client also checks
the server's uid (SO_PEERCRED: root or its own) before it sends anything.

Only the worker's own report ("X") is a result. A worker that did not run the verb exits with
NOT_RUN, never 0, and the server's "E" status is used only to describe a death.

Fallback rules (exactly once): before the client sends "G", no verb has run, so any failure
(no socket, refused, busy, no "R" within the hand-off deadline) runs in-process; so does "N".
The worker reads "G" before touching anything; a client that gave up closes the connection and
the worker exits NOT_RUN without running. After "G", if the worker ends without "X" or "N":
  - nothing was written to stdout ("O" not seen): DEL/CHECK/STATUS/GC are idempotent or
    read-only, so they are re-run in-process. ADD may have left a half-built attachment: it is
    cleaned up with an in-process DEL of the same (container id, ifname, config), then ADD is
    re-run in-process. If that DEL fails, the answer is code 11 (try again later) and the
    runtime's own DEL cleans up.
  - stdout may hold output: the exit code is 1 (re-running would print a second document).

The native client: `ovs-underlay` and `ovs-underlay-ipam` as installed are one small C program
(packaging/shim/ovs-underlay-shim.c, built once per name) that speaks this protocol itself,
because the frozen Python bootstrap alone costs ~40 ms; it execs the Python plugin next to it
(`<name>-py`) for everything else, so all policy stays here. A failure before "G", or "N": it
execs us with the stdin bytes restored and OVS_UNDERLAY_WARM=0 (in-process). The worker died
after "G": it execs us with the stdin restored and `--warm-recover FD`, FD a sealed memfd named
ovs-underlay-warm-recover that holds what it saw and the pid the record is for (exec keeps the
pid); `read_recovery` accepts nothing else, so no environment variable or stale fd a runtime or
user passes can decide the outcome, and `dispatch` applies the rules above (`after_commit`).

The pod netns travels as an fd, opened by the client (O_NONBLOCK: a FIFO must not block): it
pins the namespace the runtime named. The worker keeps the original CNI_NETNS path (so logs and
OVS external_ids record the real path) when that path still is the same namespace (dev, inode);
otherwise it uses /proc/<pid>/fd/<n>.

Environment: OVS_UNDERLAY_WARM=0 disables the client side; OVS_UNDERLAY_WARM_SOCKET overrides
the socket path (default /run/ovs-underlay/cni-warm.sock); OVS_UNDERLAY_WARM_HANDOFF_MS the
hand-off deadline (default 1000: under a burst the server's fork and "ready" can take a few
hundred ms, and falling back to the in-process path then costs far more than waiting; a dead
server refuses the connection at once, so only a hung one makes a caller wait the full deadline).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cni.skel import Verbs

SERVE_FLAG = "--warm-server"
RECOVER_FLAG = "--warm-recover"
RECOVER_MEMFD = "ovs-underlay-warm-recover"  # the native client's memfd name (recovery_fd)
DEFAULT_SOCKET = "/run/ovs-underlay/cni-warm.sock"
ENV_SOCKET = "OVS_UNDERLAY_WARM_SOCKET"
ENV_ENABLE = "OVS_UNDERLAY_WARM"
ENV_HANDOFF = "OVS_UNDERLAY_WARM_HANDOFF_MS"
DEFAULT_HANDOFF_MS = 1000  # see the module docstring; the C client has the same default
DEFAULT_PLUGIN = "ovs-underlay"
WARM_COMMANDS = frozenset({"ADD", "DEL", "CHECK", "STATUS", "GC"})
MAGIC = b"OUW2"
NOT_RUN = 200  # a worker's exit status when it did not run the verb (skel exits 0 or 1)
_HDR = struct.Struct("!4sII")
_STATUS = struct.Struct("!i")
MAX_REQUEST = 16 * 1024 * 1024


class HandoffFailed(Exception):
    """The server did not take the call; nothing ran, the caller may run it in-process."""


# ---------------------------------------------------------------------------------------------
# Wire format (pure; unit-tested)


@dataclass(frozen=True)
class Request:
    env: dict[str, str]
    cwd: str
    plugin: str
    netns_fd: bool

    @property
    def nfds(self) -> int:
        """What rides on "G": stdout, stderr, the mount namespace, and the netns if sent."""
        return 3 + int(self.netns_fd)


def encode_request(env: Mapping[str, str], stdin: bytes, cwd: str, netns_fd: bool,
                   plugin: str = DEFAULT_PLUGIN) -> bytes:
    meta = json.dumps({"env": dict(env), "cwd": cwd, "plugin": plugin, "netns_fd": netns_fd}).encode()
    return _HDR.pack(MAGIC, len(meta), len(stdin)) + meta + stdin


def decode_header(head: bytes) -> tuple[int, int]:
    """(json length, stdin length) of a request header; ValueError when it is not ours."""
    if len(head) < _HDR.size:
        raise ValueError("short request header")
    magic, jlen, slen = _HDR.unpack(head[:_HDR.size])
    if magic != MAGIC:
        raise ValueError(f"bad magic {magic!r}")
    if jlen + slen > MAX_REQUEST:
        raise ValueError(f"request of {jlen + slen} bytes is too large")
    return jlen, slen


def decode_meta(raw: bytes) -> Request:
    meta = json.loads(raw.decode())
    env = meta.get("env")
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                            for k, v in env.items()):
        raise ValueError("env must be an object of strings")
    plugin = meta.get("plugin")
    if not isinstance(plugin, str):
        raise ValueError("plugin must be a string")
    return Request(env, str(meta.get("cwd") or "/"), plugin, bool(meta.get("netns_fd")))


class Reply:
    """What the client has learnt from the server, fed byte chunks as they arrive."""

    def __init__(self) -> None:
        self.ready = False
        self.declined = False  # "N": the worker did not run the verb
        self.output = False
        self.exit_code: int | None = None  # from the worker ("X")
        self.status: int | None = None  # from the server ("E"): exit code or -signal
        self._buf = b""

    def feed(self, data: bytes) -> None:
        self._buf += data
        while self._buf:
            tag = self._buf[:1]
            if tag == b"R":
                self.ready, self._buf = True, self._buf[1:]
            elif tag == b"N":
                self.declined, self._buf = True, self._buf[1:]
            elif tag == b"O":
                self.output, self._buf = True, self._buf[1:]
            elif tag == b"X":
                if len(self._buf) < 2:
                    return
                self.exit_code, self._buf = self._buf[1], self._buf[2:]
            elif tag == b"E":
                if len(self._buf) < 1 + _STATUS.size:
                    return
                self.status = _STATUS.unpack(self._buf[1:1 + _STATUS.size])[0]
                self._buf = self._buf[1 + _STATUS.size:]
            else:
                raise ValueError(f"unexpected reply byte {tag!r}")

    @property
    def done(self) -> bool:
        return self.exit_code is not None or self.declined or self.status is not None

    def final_code(self) -> int | None:
        """The verb's exit code as the worker reported it; None when it ended without a report
        (whatever its exit status: a worker that never ran the verb proves nothing)."""
        return self.exit_code


# ---------------------------------------------------------------------------------------------
# Client


def socket_path(env: Mapping[str, str]) -> str:
    return env.get(ENV_SOCKET) or DEFAULT_SOCKET


def dispatch(verbs: Verbs, argv: Sequence[str], env: Mapping[str, str], stdin: IO[bytes],
             stdout: IO[str], plugin: str = DEFAULT_PLUGIN) -> int | None:
    """Called first by the entry point (after --warm-server was handled). Returns an exit code
    when the call was handled here (a recovery, or a warm/fallback run), None when the caller
    should run skel in-process as usual (stdin untouched)."""
    if argv and argv[0] == RECOVER_FLAG:
        reply, why = read_recovery(argv[1:])
        data = stdin.read()
        if reply is None:
            return _fail(env, data, stdout, f"{plugin}: {RECOVER_FLAG} refused: {why}",
                         "only the native client passes it, after a warm worker died")
        return after_commit(verbs, env, data, stdout, reply)
    if env.get("CNI_COMMAND") not in WARM_COMMANDS or env.get(ENV_ENABLE, "1") == "0":
        return None
    path = socket_path(env)
    if not os.path.exists(path):
        return None
    data = stdin.read()
    return run_call(verbs, env, data, stdout, path, plugin)


def run_call(verbs: Verbs, env: Mapping[str, str], data: bytes, stdout: IO[str], path: str,
             plugin: str = DEFAULT_PLUGIN) -> int:
    """Hand the call to the server at `path`; fall back to in-process where that is safe."""
    try:
        reply = call(path, env, data, stdout_fd=_fileno(stdout), stderr_fd=_fileno(sys.stderr),
                     handoff_ms=_handoff_ms(env), plugin=plugin)
    except (HandoffFailed, OSError, ValueError) as exc:  # nothing ran (bad stdout/stderr fd included)
        _note(env, f"warm path not used ({exc}); running in-process")
        return _in_process(verbs, env, data, stdout)
    if reply.declined:
        _note(env, "warm path not used (the warm worker declined the call); running in-process")
        return _in_process(verbs, env, data, stdout)
    return after_commit(verbs, env, data, stdout, reply)


def read_recovery(args: Sequence[str]) -> tuple[Reply | None, str]:
    """The native client's record of a worker death (`--warm-recover FD`), as the Reply it saw;
    (None, why) unless FD is its sealed memfd and the record names this very process."""
    import fcntl

    try:
        fd = int(args[0]) if len(args) == 1 else -1
    except ValueError:
        fd = -1
    if fd < 3:
        return None, "expected one file descriptor number >= 3"
    try:
        name = os.readlink(f"/proc/self/fd/{fd}")
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        raw = os.pread(fd, 256, 0)
    except OSError as exc:
        return None, f"fd {fd}: {exc.strerror}"
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    if not name.startswith(f"/memfd:{RECOVER_MEMFD} ") or not seals & fcntl.F_SEAL_WRITE:
        return None, f"fd {fd} is not the native client's sealed record ({name})"
    fields = dict(f.split("=", 1) for f in raw.decode(errors="replace").split()[1:] if "=" in f)
    if not raw.startswith(b"OUWR1 ") or fields.get("pid") != str(os.getpid()):
        return None, "the record is not for this process"
    reply = Reply()
    reply.output = fields.get("output") != "0"  # unreadable counts as "output may have been written"
    try:
        reply.status = int(fields.get("status", ""))
    except ValueError:
        reply.status = None
    return reply, ""


def after_commit(verbs: Verbs, env: Mapping[str, str], data: bytes, stdout: IO[str], reply: Reply) -> int:
    """The exit code once "G" was sent: the verb's own, or the post-commit rules (docstring)."""
    code = reply.final_code()
    if code is not None:
        return code
    why = f"warm worker died without its report ({_describe(reply.status)})"
    if reply.output:
        _note(env, f"{why} after writing output; not re-running")
        return 1
    command = env.get("CNI_COMMAND", "")
    if command != "ADD":
        _note(env, f"{why}; re-running {command} in-process (idempotent)")
        return _in_process(verbs, env, data, stdout)
    _note(env, f"{why} during ADD; cleaning up with DEL, then re-running ADD in-process")
    sink = io.StringIO()
    if _in_process(verbs, {**env, "CNI_COMMAND": "DEL"}, data, sink) != 0:
        return _fail(env, data, stdout, f"{why} during ADD and the cleanup DEL failed",
                     sink.getvalue().strip()[:500])
    return _in_process(verbs, env, data, stdout)


def call(path: str, env: Mapping[str, str], data: bytes, *, stdout_fd: int, stderr_fd: int,
         handoff_ms: int = DEFAULT_HANDOFF_MS, plugin: str = DEFAULT_PLUGIN) -> Reply:
    """One round trip with the server. Raises HandoffFailed when the verb surely did not run."""
    import socket

    netns = env.get("CNI_NETNS", "")
    fds = [stdout_fd, stderr_fd]
    opened: list[int] = []
    try:
        try:
            opened.append(os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC))
        except OSError as exc:
            raise HandoffFailed(f"cannot open /proc/self/ns/mnt: {exc.strerror}") from exc
        if netns:
            from core.netns import open_netns  # O_PATH first: never a FIFO's wait, never a device's open

            # DEL of a gone netns, or a bad path: the worker's skel reports it as usual
            with contextlib.suppress(OSError):
                opened.append(open_netns(netns))
        fds += opened
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
            return _exchange(sock, path, encode_request(env, data, _cwd(), len(opened) > 1, plugin), fds,
                             time.monotonic() + handoff_ms / 1000.0)
    finally:
        for fd in opened:
            os.close(fd)


def _exchange(sock: Any, path: str, req: bytes, fds: list[int], deadline: float) -> Reply:
    import socket

    reply = Reply()
    try:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.connect(path)
        uid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        if uid not in (0, os.geteuid()):
            raise HandoffFailed(f"the server at {path} runs as uid {uid}")
        sock.sendall(req)
        while not reply.ready:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = sock.recv(64)
            if not chunk:
                raise HandoffFailed("server closed the connection before the hand-off")
            reply.feed(chunk)
        socket.send_fds(sock, [b"G"], fds)  # committed from here on: no silent fallback
    except OSError as exc:  # ENOENT, ECONNREFUSED, EACCES, timeout, EPIPE
        raise HandoffFailed(f"{type(exc).__name__}: {exc}") from exc
    except ValueError as exc:
        raise HandoffFailed(f"bad reply: {exc}") from exc
    sock.settimeout(None)
    while not reply.done:
        try:
            chunk = sock.recv(64)
        except OSError:
            break
        if not chunk:
            break
        try:
            reply.feed(chunk)
        except ValueError:
            break
    return reply


def _in_process(verbs: Verbs, env: Mapping[str, str], data: bytes, out: IO[str]) -> int:
    from cni import skel

    return skel.main(verbs, env=env, stdin=io.BytesIO(data), stdout=out)


def _fail(env: Mapping[str, str], data: bytes, stdout: IO[str], msg: str, details: str) -> int:
    """Answer the call with code 11 (try again later) through skel, without running a verb."""
    from cni import skel
    from cni.errors import CniError, Code

    def fail(_args: Any) -> None:
        raise CniError(Code.TRY_AGAIN_LATER, msg, details)

    verbs = skel.Verbs(add=fail, delete=fail, check=fail, status=fail, gc=fail)
    return skel.main(verbs, env=env, stdin=io.BytesIO(data), stdout=stdout)


def _describe(status: int | None) -> str:
    if status is None:
        return "no status from the server"
    if status < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    if status == NOT_RUN:
        return "it did not run the verb"
    return f"exit {status}"


def _note(env: Mapping[str, str], msg: str) -> None:
    # Before skel has set up logging: stderr only (never stdout), one line.
    if env.get("OVS_UNDERLAY_WARM_QUIET") != "1":
        sys.stderr.write(f"ovs-underlay: {msg}\n")
        sys.stderr.flush()


def _handoff_ms(env: Mapping[str, str]) -> int:
    try:
        return max(1, int(env.get(ENV_HANDOFF, DEFAULT_HANDOFF_MS)))
    except ValueError:
        return DEFAULT_HANDOFF_MS


def _fileno(stream: IO[Any]) -> int:
    stream.flush()
    return stream.fileno()


def _cwd() -> str:
    try:
        return os.getcwd()
    except OSError:
        return "/"
