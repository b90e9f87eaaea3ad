"""The warm path: hand a CNI call to a pre-imported fork server instead of importing the world.

Why: a cold `ovs-underlay` exec spends most of an ADD importing pyroute2, ovs, grpc and netaddr.
`ovs-underlay --warm-server` (the same frozen binary) imports all of that once and then forks
one worker per call. The worker runs exactly the in-process code, `skel.main(verbs, env, stdin,
stdout)`, with the caller's env, stdin bytes and stdout/stderr fds, so the result JSON goes
straight to the runtime's pipe. stdlib only at module level (socket is imported lazily, so
VERSION does not pay for it).

Protocol (AF_UNIX stream, one connection per call):
  client -> server  b"OUW1" + !II(json_len, stdin_len) + json{env,cwd,netns_fd} + stdin,
                    with SCM_RIGHTS [stdout, stderr, (netns)] on the first bytes
  worker -> client  b"R"                  request read, ready to run
  client -> worker  b"G"                  commit: run the verb (the client will not fall back)
  worker -> client  b"O"                  before the first byte it writes to the caller's stdout
  worker -> client  b"X" + code (1 byte)  the verb returned; the worker exits with code
  server -> client  b"E" + !i(status)     after reaping the worker (exit code, or -signal)

Fallback rules (exactly once): before the client sends "G", no verb has run, so any failure
(no socket, refused, busy, no "R" within the hand-off deadline) runs in-process. The worker
reads "G" before touching anything; a client that gave up closes the connection and the worker
exits without running. After "G", if the worker dies without "X":
  - nothing was written to stdout ("O" not seen): DEL/CHECK/STATUS/GC are idempotent or
    read-only, so they are re-run in-process. ADD may have left a half-built attachment: it is
    cleaned up with an in-process DEL of the same (container id, ifname, config), then ADD is
    re-run in-process. If that DEL fails, the answer is code 11 (try again later) and the
    runtime's own DEL cleans up.
  - stdout may hold output: the exit code is 1 (re-running would print a second document).

The native client: `ovs-underlay` as installed is a small C program
(packaging/shim/ovs-underlay-shim.c) that speaks this protocol itself, because the frozen
Python bootstrap alone costs ~40 ms; it execs this plugin, `ovs-underlay-py`, for everything
else, so all policy stays here. A failure before "G": it execs us with the stdin bytes restored
and OVS_UNDERLAY_WARM=0 (in-process). The worker died after "G": it execs us with the stdin
restored and OVS_UNDERLAY_WARM_RECOVER=<output seen 0|1>:<server status | "unknown">, and
`dispatch` applies the rules above (`after_commit`).

grpc and fork: the server imports grpc but never creates a channel, and grpc's fork support is
left OFF (GRPC_ENABLE_FORK_SUPPORT=0 set before the import): with no channel and no grpc thread
in the parent there is nothing for its atfork handlers to do, and they cost every fork. Every
worker creates its own channel after the fork. Before each fork the server checks that it is
still single-threaded (/proc/self/task); if not, it refuses the call (client runs in-process)
and exits so that systemd restarts it clean.

The pod netns travels as an fd, opened by the client: it pins the namespace the runtime named.
The worker keeps the original CNI_NETNS path (so logs and OVS external_ids record the real path)
when that path still is the same namespace (dev, inode); otherwise it uses /proc/<pid>/fd/<n>.

Security: the socket directory is 0700 and the socket 0600; the server also checks SO_PEERCRED
(root or its own uid). When the client hangs up (the runtime killed the plugin on its timeout)
the server SIGKILLs the worker, as the runtime would have killed an in-process plugin.

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
from collections.abc import Callable, Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import socket

    from cni.skel import Verbs

SERVE_FLAG = "--warm-server"
DEFAULT_SOCKET = "/run/ovs-underlay/cni-warm.sock"
ENV_SOCKET = "OVS_UNDERLAY_WARM_SOCKET"
ENV_ENABLE = "OVS_UNDERLAY_WARM"
ENV_HANDOFF = "OVS_UNDERLAY_WARM_HANDOFF_MS"
ENV_RECOVER = "OVS_UNDERLAY_WARM_RECOVER"  # set by the native client, see the module docstring
DEFAULT_HANDOFF_MS = 1000  # see the module docstring; the C client has the same default
WARM_COMMANDS = frozenset({"ADD", "DEL", "CHECK", "STATUS", "GC"})
MAGIC = b"OUW1"
_HDR = struct.Struct("!4sII")
_STATUS = struct.Struct("!i")
MAX_REQUEST = 16 * 1024 * 1024
KILL_GRACE_S = 0.5
# What the server imports before it forks: the ADD/DEL/CHECK code and its heavy dependencies.
PREIMPORT = (
    "cni.types", "cni.netconf", "cni.drivers", "cni.plugin", "cni.ipam", "cni.delegate",
    "core.netlink", "core.ovsdb", "core.vswitch", "core.spec", "core.ipamd_client", "core.wire",
    "core.netns", "core.frames",
    "ovs.jsonrpc", "ovs.stream", "ovs.poller", "ovs.vlog", "ovs.json",
    # grpc imports these on the first channel: ~4 ms per worker if left to the worker.
    "grpc", "grpc._channel", "grpc._simple_stubs", "grpc.experimental",
    "grpc_health.v1.health_pb2", "grpc_health.v1.health_pb2_grpc", "netaddr",
)


class HandoffFailed(Exception):
    """The server did not take the call; nothing ran, the caller may run it in-process."""


# ---------------------------------------------------------------------------------------------
# Wire format (pure; unit-tested)


def encode_request(env: Mapping[str, str], stdin: bytes, cwd: str, netns_fd: bool) -> bytes:
    meta = json.dumps({"env": dict(env), "cwd": cwd, "netns_fd": netns_fd}).encode()
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


def decode_meta(raw: bytes) -> tuple[dict[str, str], str, bool]:
    meta = json.loads(raw.decode())
    env = meta.get("env")
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                            for k, v in env.items()):
        raise ValueError("env must be an object of strings")
    return env, str(meta.get("cwd") or "/"), bool(meta.get("netns_fd"))


class Reply:
    """What the client has learnt from the server, fed byte chunks as they arrive."""

    def __init__(self) -> None:
        self.ready = False
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
        return self.exit_code is not None or self.status is not None

    def final_code(self) -> int | None:
        """The verb's exit code, or None when the worker died without finishing."""
        if self.exit_code is not None:
            return self.exit_code
        if self.status is not None and self.status >= 0:
            return self.status
        return None


# ---------------------------------------------------------------------------------------------
# Client


def socket_path(env: Mapping[str, str]) -> str:
    return env.get(ENV_SOCKET) or DEFAULT_SOCKET


def dispatch(verbs: Verbs, argv: Sequence[str], env: Mapping[str, str], stdin: IO[bytes],
             stdout: IO[str]) -> int | None:
    """Called first by the entry point. Returns an exit code when the call was handled here
    (server mode, or a warm/fallback run), None when the caller should run skel in-process as
    usual (stdin untouched)."""
    if argv and argv[0] == SERVE_FLAG:
        return serve_main(verbs, argv[1:])
    recover = env.get(ENV_RECOVER)
    if recover is not None and env.get("CNI_COMMAND") in WARM_COMMANDS:
        env = {k: v for k, v in env.items() if k != ENV_RECOVER}  # not passed on to delegates
        return after_commit(verbs, env, stdin.read(), stdout, parse_recover(recover))
    if env.get("CNI_COMMAND") not in WARM_COMMANDS or env.get(ENV_ENABLE, "1") == "0":
        return None
    path = socket_path(env)
    if not os.path.exists(path):
        return None
    data = stdin.read()
    return run_call(verbs, env, data, stdout, path)


def run_call(verbs: Verbs, env: Mapping[str, str], data: bytes, stdout: IO[str], path: str) -> int:
    """Hand the call to the server at `path`; fall back to in-process where that is safe."""
    from cni import skel

    def in_process(e: Mapping[str, str] = env, out: IO[str] = stdout) -> int:
        return skel.main(verbs, env=e, stdin=io.BytesIO(data), stdout=out)

    try:
        reply = call(path, env, data, stdout_fd=_fileno(stdout), stderr_fd=_fileno(sys.stderr),
                     handoff_ms=_handoff_ms(env))
    except (HandoffFailed, OSError, ValueError) as exc:  # nothing ran (bad stdout/stderr fd included)
        _note(env, f"warm path not used ({exc}); running in-process")
        return in_process()
    return after_commit(verbs, env, data, stdout, reply)


def parse_recover(value: str) -> Reply:
    """OVS_UNDERLAY_WARM_RECOVER (`<output seen 0|1>:<status | unknown>`) as the Reply the native
    client saw. Anything unreadable counts as "output may have been written" (never re-run)."""
    reply = Reply()
    seen, _, status = value.partition(":")
    reply.output = seen != "0"
    try:
        reply.status = int(status)
    except ValueError:
        reply.status = None
    return reply


def after_commit(verbs: Verbs, env: Mapping[str, str], data: bytes, stdout: IO[str], reply: Reply) -> int:
    """The exit code once "G" was sent: the verb's own, or the post-commit rules (docstring)."""
    from cni import skel

    def in_process(e: Mapping[str, str] = env, out: IO[str] = stdout) -> int:
        return skel.main(verbs, env=e, stdin=io.BytesIO(data), stdout=out)

    code = reply.final_code()
    if code is not None:
        return code
    why = f"warm worker died ({_describe(reply.status)})"
    if reply.output:
        _note(env, f"{why} after writing output; not re-running")
        return 1
    command = env.get("CNI_COMMAND", "")
    if command != "ADD":
        _note(env, f"{why}; re-running {command} in-process (idempotent)")
        return in_process()
    _note(env, f"{why} during ADD; cleaning up with DEL, then re-running ADD in-process")
    sink = io.StringIO()
    if in_process({**env, "CNI_COMMAND": "DEL"}, sink) != 0:
        return skel.main(_unknown_verbs(why, sink.getvalue()), env=env, stdin=io.BytesIO(data), stdout=stdout)
    return in_process()


def call(path: str, env: Mapping[str, str], data: bytes, *, stdout_fd: int, stderr_fd: int,
         handoff_ms: int = DEFAULT_HANDOFF_MS) -> Reply:
    """One round trip with the server. Raises HandoffFailed when the verb surely did not run."""
    import socket

    netns = env.get("CNI_NETNS", "")
    fds = [stdout_fd, stderr_fd]
    ns_fd = -1
    if netns:
        try:
            ns_fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            fds.append(ns_fd)
        except OSError:
            ns_fd = -1  # DEL of a gone netns, or a bad path: the worker's skel reports it as usual
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    reply = Reply()
    try:
        sock.settimeout(handoff_ms / 1000.0)
        try:
            sock.connect(path)
            req = encode_request(env, data, _cwd(), ns_fd >= 0)
            sent = socket.send_fds(sock, [req[:65536]], fds)
            sock.sendall(req[sent:])
            while not reply.ready:
                chunk = sock.recv(64)
                if not chunk:
                    raise HandoffFailed("server closed the connection before the hand-off")
                reply.feed(chunk)
            sock.sendall(b"G")  # committed from here on: no silent fallback
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
    finally:
        sock.close()
        if ns_fd >= 0:
            os.close(ns_fd)


def _unknown_verbs(why: str, cleanup_out: str) -> Verbs:
    from cni import skel
    from cni.errors import CniError, Code

    def fail(_args: Any) -> None:
        raise CniError(Code.TRY_AGAIN_LATER, f"{why} during ADD and the cleanup DEL failed",
                       cleanup_out.strip()[:500])

    return skel.Verbs(add=fail, delete=fail)


def _describe(status: int | None) -> str:
    if status is None:
        return "no status from the server"
    if status < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
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


# ---------------------------------------------------------------------------------------------
# Server


def serve_main(verbs: Verbs, argv: Sequence[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="ovs-underlay --warm-server",
                                description="warm-path fork server for the ovs-underlay CNI plugin")
    p.add_argument("--socket", default=os.environ.get(ENV_SOCKET) or DEFAULT_SOCKET)
    p.add_argument("--max-workers", type=int, default=32,
                   help="calls served at once; more are refused (they run in-process)")
    p.add_argument("--log-level", default="info")
    a = p.parse_args(list(argv))
    return Server(verbs, a.socket, max_workers=a.max_workers, log_level=a.log_level).run()


class Server:
    """Single-threaded fork server: accept, check the peer, fork a worker, report its status."""

    def __init__(self, verbs: Verbs, path: str, *, max_workers: int = 32, log_level: str = "info",
                 preimport: Sequence[str] = PREIMPORT) -> None:
        import logging

        self.verbs = verbs
        self.path = path
        self.max_workers = max_workers
        self.preimport = preimport
        self.log = logging.getLogger("ovs-underlay-warm")
        if not self.log.handlers:
            h = logging.StreamHandler(sys.stderr)
            h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s ovs-underlay-warm: %(message)s"))
            self.log.addHandler(h)
            self.log.propagate = False
        self.log.setLevel(log_level.upper())
        self.workers: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, conn)
        self.conns: dict[int, int] = {}  # conn fd -> pidfd
        self.kill_at: dict[int, float] = {}  # pidfd -> monotonic deadline (caller hung up)
        self.private_fds: list[int] = []
        self.stopping = False
        self.served = 0

    # ---- set-up -----------------------------------------------------------------------------

    def warm_up(self) -> None:
        import gc
        import importlib

        os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "0"  # see module docstring
        for name in self.preimport:
            try:
                importlib.import_module(name)
            except ImportError as exc:
                self.log.warning("pre-import of %s failed: %s", name, exc)
        gc.collect()
        gc.freeze()  # keep the pre-imported heap out of the children's collections (fewer COW faults)

    def bind(self) -> socket.socket:
        import socket

        d = os.path.dirname(self.path) or "."
        os.makedirs(d, mode=0o700, exist_ok=True)
        os.chmod(d, 0o700)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
        except OSError:
            pass
        else:
            raise RuntimeError(f"another warm server answers on {self.path}")
        finally:
            probe.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(128)
        return sock

    # ---- loop -------------------------------------------------------------------------------

    def run(self) -> int:
        import select
        import signal

        self.warm_up()
        threads = _thread_count()
        if threads != 1:
            self.log.error("%d threads after the pre-imports; a fork server must be single-threaded", threads)
            return 1
        try:
            lsock = self.bind()
        except (OSError, RuntimeError) as exc:
            self.log.error("cannot listen on %s: %s", self.path, exc)
            return 1
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.private_fds = [wake_r, wake_w]

        def on_term(signum: int, _frame: Any) -> None:
            self.stopping = True
            os.write(wake_w, b"x")

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        poller = select.poll()
        poller.register(lsock.fileno(), select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        self.log.info("serving on %s (pid %d, %d modules loaded)", self.path, os.getpid(), len(sys.modules))
        listening = True
        try:
            while not (self.stopping and not self.workers):
                if self.stopping and listening:
                    poller.unregister(lsock.fileno())
                    _unlink_quiet(self.path)
                    lsock.close()
                    listening = False
                timeout = None
                if self.kill_at:
                    timeout = max(0, int((min(self.kill_at.values()) - time.monotonic()) * 1000) + 1)
                try:
                    events = poller.poll(timeout)
                except InterruptedError:
                    continue
                for fd, _ev in events:
                    if fd == wake_r:
                        _drain(wake_r)
                    elif listening and fd == lsock.fileno():
                        self._accept(lsock, poller)
                    elif fd in self.workers:
                        self._reap(fd, poller)
                    elif fd in self.conns:
                        self._hangup(fd, poller)
                self._kill_overdue()
        finally:
            if listening:
                _unlink_quiet(self.path)
                lsock.close()
        self.log.info("stopped after %d calls", self.served)
        return 0

    def _accept(self, lsock: socket.socket, poller: Any) -> None:
        import select
        import socket

        try:
            conn, _ = lsock.accept()
        except BlockingIOError:
            return
        conn.setblocking(True)
        pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                             struct.calcsize("3i")))
        if uid not in (0, os.geteuid()):
            self.log.warning("refused pid %d: uid %d", pid, uid)
            conn.close()
            return
        if len(self.workers) >= self.max_workers:
            self.log.info("busy (%d workers): caller pid %d runs in-process", len(self.workers), pid)
            conn.close()
            return
        threads = _thread_count()
        if threads != 1:
            self.log.error("%d threads in the fork server: refusing and exiting for a clean restart", threads)
            conn.close()
            self.stopping = True
            return
        child = os.fork()
        if child == 0:  # the worker
            code = 70
            try:
                others = [lsock.fileno(), *self.private_fds, *self.workers,
                          *(c.fileno() for _, c in self.workers.values())]
                code = serve_one(self.verbs, conn, close_fds=others)
            finally:
                os._exit(code)
        self.served += 1
        pidfd = os.pidfd_open(child)
        self.workers[pidfd] = (child, conn)
        self.conns[conn.fileno()] = pidfd
        poller.register(pidfd, select.POLLIN)
        poller.register(conn.fileno(), select.POLLRDHUP)

    def _reap(self, pidfd: int, poller: Any) -> None:
        pid, conn = self.workers.pop(pidfd)
        killed = self.kill_at.pop(pidfd, None) is not None
        poller.unregister(pidfd)
        _, raw = os.waitpid(pid, 0)
        os.close(pidfd)
        status = os.waitstatus_to_exitcode(raw)
        if status < 0 and not killed:
            self.log.warning("worker %d died: signal %d", pid, -status)
        if self.conns.pop(conn.fileno(), None) is not None:
            poller.unregister(conn.fileno())
        with contextlib.suppress(OSError):  # the caller exits as soon as the worker's "X" arrives
            conn.sendall(b"E" + _STATUS.pack(status))
        conn.close()

    def _hangup(self, conn_fd: int, poller: Any) -> None:
        """The caller closed its end. Normal after "X"; otherwise the runtime killed the plugin,
        and the worker is killed too unless it exits within the grace period."""
        pidfd = self.conns.pop(conn_fd)
        poller.unregister(conn_fd)
        if pidfd in self.workers:
            self.kill_at[pidfd] = time.monotonic() + KILL_GRACE_S

    def _kill_overdue(self) -> None:
        import signal

        now = time.monotonic()
        for pidfd, when in list(self.kill_at.items()):
            if when <= now and pidfd in self.workers:
                self.log.info("caller of worker %d hung up: killing it (as the runtime kills a plugin)",
                              self.workers[pidfd][0])
                self.kill_at[pidfd] = float("inf")
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)


def serve_one(verbs: Verbs, conn: socket.socket, close_fds: Sequence[int] = ()) -> int:
    """The worker: read the request, hand-off, run skel.main exactly as in-process."""
    import signal
    import socket

    for fd in close_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    conn.settimeout(5.0)
    try:
        first, fds, flags, _ = socket.recv_fds(conn, 65536, 3)
        if flags & socket.MSG_CTRUNC:
            raise ValueError("file descriptors were truncated")
        buf = bytearray(first)
        jlen, slen = decode_header(bytes(buf[:_HDR.size]))
        need = _HDR.size + jlen + slen
        while len(buf) < need:
            chunk = conn.recv(min(1 << 20, need - len(buf)))
            if not chunk:
                raise ValueError("short request")
            buf += chunk
        env, cwd, has_netns = decode_meta(bytes(buf[_HDR.size:_HDR.size + jlen]))
        data = bytes(buf[_HDR.size + jlen:need])
        if len(fds) != 2 + int(has_netns):
            raise ValueError(f"expected {2 + int(has_netns)} fds, got {len(fds)}")
        conn.sendall(b"R")
        if conn.recv(1) != b"G":
            return 0  # the client gave up: it runs the call itself
    except (OSError, ValueError):
        return 0
    conn.settimeout(None)
    out_fd, err_fd = fds[0], fds[1]
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd in (out_fd, err_fd, null):
        if fd > 2:
            os.close(fd)
    if has_netns:
        env = {**env, "CNI_NETNS": netns_path(env.get("CNI_NETNS", ""), fds[2])}
    os.environ.clear()
    os.environ.update(env)
    try:
        os.chdir(cwd)
    except OSError:
        os.chdir("/")
    err = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", line_buffering=True)
    out = _MarkedStdout(io.FileIO(1, "w", closefd=False), lambda: conn.sendall(b"O"))
    sys.stdout, sys.stderr = out, err
    from cni import skel

    code = skel.main(verbs, env=env, stdin=io.BytesIO(data), stdout=out, stderr=err)
    try:
        out.flush()
        err.flush()
        conn.sendall(b"X" + bytes([code & 0xFF]))
    except OSError:
        pass
    return code


def netns_path(original: str, fd: int) -> str:
    """The path the worker hands to skel: the original when it still names the namespace the
    client opened, else a /proc path to the passed fd (which pins that namespace)."""
    try:
        a, b = os.stat(original), os.fstat(fd)
        if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
            return original
    except OSError:
        pass
    return f"/proc/{os.getpid()}/fd/{fd}"


class _MarkedStdout(io.TextIOWrapper):
    """The caller's stdout; tells the client once, before the first byte, that output began."""

    def __init__(self, raw: io.FileIO, mark: Callable[[], None]) -> None:
        super().__init__(io.BufferedWriter(raw), encoding="utf-8")
        self._mark: Callable[[], None] | None = mark

    def write(self, s: str) -> int:
        if self._mark is not None and s:
            mark, self._mark = self._mark, None
            with contextlib.suppress(OSError):
                mark()
        return super().write(s)


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        import threading

        return threading.active_count()


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 64):
            pass
    except BlockingIOError:
        pass


def _unlink_quiet(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
