"""The warm path's fork server (`ovs-underlay --warm-server`) and its workers; cni/warm.py has
the protocol, the client and the fallback rules.

One server serves both plugins: the request names `ovs-underlay` or `ovs-underlay-ipam`, and
the worker runs that plugin's verbs. It is single-threaded: accept, check the peer, fork a
worker, report the worker's exit status. An error from accept, fork or pidfd_open answers that
one call (the client falls back, or applies the post-commit rules) and the server keeps serving.

The worker sees the caller's filesystem: the client sends its mount namespace with "G", and a
worker in another mount namespace (the warm server in a container, the runtime on the node)
enters it with setns(CLONE_NEWNS) before it runs the verb. A forked worker is single-threaded,
which setns requires, and nothing in it has started a thread yet. So a delegated IPAM plugin
(host-local), CNI_PATH, the log file, the ipamd and OVSDB sockets and a relative path resolve as
they would in-process, and a warm call and an in-process call share host-local's state. Python
still imports lazily after that switch, so the worker first checks that its own code (the
executable, every sys.path entry and package directory) is the very same files in the caller's
view (dev, inode);
otherwise it answers "N" (did not run) and the caller runs in-process. In a container that means:
run the bundle installed on the node, from the same path (see the README, "Install on a node").
Entering a mount namespace needs CAP_SYS_ADMIN and CAP_SYS_CHROOT (a privileged container).

grpc and fork: the server imports grpc but never creates a channel, and grpc's fork support is
left OFF (GRPC_ENABLE_FORK_SUPPORT=0 set before the import): with no channel and no grpc thread
in the parent there is nothing for its atfork handlers to do, and they cost every fork. Every
worker creates its own channel after the fork. Before each fork the server checks that it is
still single-threaded (/proc/self/task); if not, it refuses the call (client runs in-process)
and exits so that systemd restarts it clean.

Security: a directory the server creates for its socket is 0700; an existing one is used as it
is (never chmodded: `--socket /tmp/x.sock` must not lock down /tmp), but refused when it belongs
to another user or others may write to it without the sticky bit (they could replace the socket
and receive the runtime's calls). The socket is 0600 and the server checks SO_PEERCRED (root or
its own uid); the client checks the server's uid the same way. When the client hangs up (the
runtime killed the plugin on its timeout) the server SIGKILLs the worker, as the runtime would
have killed an in-process plugin.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import struct
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from cni import warm

if TYPE_CHECKING:
    import logging
    import socket

    from cni.skel import Verbs

KILL_GRACE_S = 0.5
ACCEPT_BACKOFF_S = 0.05  # after accept fails (EMFILE): the pending connection keeps poll readable
# What the server imports before it forks: both plugins' verb code and its heavy dependencies.
PREIMPORT = (
    "cni.types", "cni.netconf", "cni.drivers", "cni.plugin", "cni.ipam", "cni.delegate", "cni.ipam_plugin",
    "core.netlink", "core.ovsdb", "core.vswitch", "core.spec", "core.ipamd_client", "core.wire",
    "core.netns", "core.frames", "core.rtnl", "core.calls", "core.ovn", "core.ovnsettings",
    "cni.ovn_attach", "cni.ovnconf",  # the verbs' OVN steps: default_drivers imports core.ovn (~5 ms)
    "ovs.jsonrpc", "ovs.stream", "ovs.poller", "ovs.vlog", "ovs.json",
    # grpc imports these on the first channel: ~4 ms per worker if left to the worker.
    "grpc", "grpc._channel", "grpc._simple_stubs", "grpc.experimental",
    "grpc_health.v1.health_pb2", "grpc_health.v1.health_pb2_grpc", "netaddr",
)


class Declined(Exception):
    """The worker will not run this call (nothing ran); the client runs it in-process."""


def serve_main(plugins: Mapping[str, Verbs], argv: Sequence[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="ovs-underlay --warm-server",
                                description="warm-path fork server for the ovs-underlay CNI plugins "
                                            f"({', '.join(plugins)})")
    p.add_argument("--socket", default=os.environ.get(warm.ENV_SOCKET) or warm.DEFAULT_SOCKET)
    p.add_argument("--max-workers", type=int, default=32,
                   help="calls served at once; more are refused (they run in-process)")
    p.add_argument("--log-level", default="info")
    a = p.parse_args(list(argv))
    return Server(plugins, a.socket, max_workers=a.max_workers, log_level=a.log_level).run()


class Server:
    """Single-threaded fork server: accept, check the peer, fork a worker, report its status."""

    def __init__(self, plugins: Mapping[str, Verbs], path: str, *, max_workers: int = 32,
                 log_level: str = "info", preimport: Sequence[str] = PREIMPORT) -> None:
        import logging

        self.plugins = dict(plugins)
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
        self.code: list[tuple[str, tuple[int, int]]] = []
        self.stopping = False
        self.served = 0
        self._last_accept_error = 0.0

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
        self.code = code_identity()
        gc.collect()
        gc.freeze()  # keep the pre-imported heap out of the children's collections (fewer COW faults)

    def bind(self) -> socket.socket:
        import socket

        self._socket_dir(os.path.dirname(os.path.abspath(self.path)))
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
        except OSError:
            pass
        else:
            raise RuntimeError(f"another warm server answers on {self.path}")
        finally:
            probe.close()
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise RuntimeError(f"{self.path} exists and is not a socket: not removing it")
            os.unlink(self.path)  # a stale socket of ours (nobody answers on it)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(128)
        return sock

    def _socket_dir(self, d: str) -> None:
        """Create the socket's directory 0700, or accept an existing one as it is when it is safe."""
        try:
            os.makedirs(os.path.dirname(d), exist_ok=True)
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
        else:
            os.chmod(d, 0o700)  # ours: whatever the umask was
            return
        st = os.stat(d)
        if not stat.S_ISDIR(st.st_mode):
            raise RuntimeError(f"{d} is not a directory")
        if st.st_uid not in (0, os.geteuid()):
            raise RuntimeError(f"socket directory {d} belongs to uid {st.st_uid}: use a directory of root's")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o022 and not mode & stat.S_ISVTX:
            raise RuntimeError(f"socket directory {d} is writable by others (mode {mode:04o}): anyone could "
                               "replace the socket; use a private directory such as /run/ovs-underlay")
        if mode & 0o022:
            self.log.warning("socket directory %s is shared (mode %04o): the socket is safe (0600, "
                             "sticky directory), but a private directory such as /run/ovs-underlay is better",
                             d, mode)

    # ---- loop -------------------------------------------------------------------------------

    def run(self) -> int:
        import select
        import signal

        self.warm_up()
        threads = _thread_count()
        if threads != 1:
            self.log.error("%d threads after the pre-imports; a fork server must be single-threaded", threads)
            return 1
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.private_fds = [wake_r, wake_w]

        def on_term(signum: int, _frame: Any) -> None:
            self.stopping = True
            os.write(wake_w, b"x")

        # Before the socket exists: a SIGTERM right after it appears must still remove it.
        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        try:
            lsock = self.bind()
        except (OSError, RuntimeError) as exc:
            self.log.error("cannot listen on %s: %s", self.path, exc)
            return 1
        poller = select.poll()
        poller.register(lsock.fileno(), select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        self.log.info("serving %s on %s (pid %d, %d modules loaded)", ", ".join(self.plugins), self.path,
                      os.getpid(), len(sys.modules))
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
        except OSError as exc:  # EMFILE/ENFILE/ENOMEM: the caller falls back after its deadline
            now = time.monotonic()
            if now - self._last_accept_error > 10:
                self.log.error("accept failed: %s (callers run in-process meanwhile)", exc)
                self._last_accept_error = now
            time.sleep(ACCEPT_BACKOFF_S)
            return
        try:
            conn.setblocking(True)
            pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                 struct.calcsize("3i")))
        except OSError as exc:
            self.log.warning("dropped a connection: %s", exc)
            conn.close()
            return
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
        try:
            child = os.fork()
        except OSError as exc:  # EAGAIN (pids limit), ENOMEM: this call runs in-process
            self.log.error("fork failed: %s; caller pid %d runs in-process", exc, pid)
            conn.close()
            return
        if child == 0:  # the worker
            code = warm.NOT_RUN
            try:
                others = [lsock.fileno(), *self.private_fds, *self.workers,
                          *(c.fileno() for _, c in self.workers.values())]
                code = serve_one(self.plugins, conn, close_fds=others, code=self.code, log=self.log)
            finally:
                os._exit(code)
        self.served += 1
        try:
            pidfd = os.pidfd_open(child)
        except OSError as exc:  # EMFILE: we cannot watch this worker, so it must not run
            self.log.error("pidfd_open(%d) failed: %s; stopping that worker (the caller falls back)",
                           child, exc)
            self._abandon(child, conn)
            return
        self.workers[pidfd] = (child, conn)
        self.conns[conn.fileno()] = pidfd
        poller.register(pidfd, select.POLLIN)
        poller.register(conn.fileno(), select.POLLRDHUP)

    def _abandon(self, child: int, conn: socket.socket) -> None:
        """A worker we cannot watch: kill and reap it, tell the caller how it ended. Before "G" the
        caller sees the connection close and runs in-process; after, the post-commit rules apply."""
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)  # our unreaped child: the pid cannot have been reused
        _, raw = os.waitpid(child, 0)
        with contextlib.suppress(OSError):
            conn.sendall(b"E" + struct.pack("!i", os.waitstatus_to_exitcode(raw)))
        conn.close()

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
            conn.sendall(b"E" + struct.pack("!i", status))
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


# ---------------------------------------------------------------------------------------------
# The worker


def serve_one(plugins: Mapping[str, Verbs], conn: socket.socket, close_fds: Sequence[int] = (),
              code: Sequence[tuple[str, tuple[int, int]]] = (), log: logging.Logger | None = None) -> int:
    """The worker: read the request, hand-off, run skel.main exactly as in-process. Returns the
    exit code: the verb's, or NOT_RUN whenever it did not run."""
    import signal
    import socket

    for fd in close_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    conn.settimeout(5.0)
    fds: list[int] = []
    try:
        req, data = _read_request(conn)
        verbs = plugins.get(req.plugin)
        if verbs is None:
            raise ValueError(f"unknown plugin {req.plugin!r}")
        if log is not None:
            log.debug("worker %d: %s %s container_id=%s", os.getpid(), req.plugin, req.env.get("CNI_COMMAND"),
                      req.env.get("CNI_CONTAINERID"))
        conn.sendall(b"R")
        msg, fds, flags, _ = socket.recv_fds(conn, 1, 4)
        if msg != b"G":
            _close_all(fds)
            return warm.NOT_RUN  # the client gave up: it runs the call itself
        if flags & socket.MSG_CTRUNC or len(fds) != req.nfds:
            raise Declined(f"expected {req.nfds} file descriptors with the commit, got {len(fds)}")
        enter_caller_mounts(fds[2], code)
    except Declined as exc:
        if log is not None:
            log.warning("worker %d declined a call (the caller runs it in-process): %s", os.getpid(), exc)
        _close_all(fds)
        with contextlib.suppress(OSError):
            conn.sendall(b"N")
        return warm.NOT_RUN
    except (OSError, ValueError):
        _close_all(fds)
        return warm.NOT_RUN
    conn.settimeout(None)
    out_fd, err_fd = fds[0], fds[1]
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    _close_all([fd for fd in (out_fd, err_fd, fds[2], null) if fd > 2])
    env = req.env
    if req.netns_fd:
        env = {**env, "CNI_NETNS": netns_path(env.get("CNI_NETNS", ""), fds[3])}
    os.environ.clear()
    os.environ.update(env)
    try:
        os.chdir(req.cwd)
    except OSError:
        os.chdir("/")
    err = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", line_buffering=True)
    out = _MarkedStdout(io.FileIO(1, "w", closefd=False), lambda: conn.sendall(b"O"))
    sys.stdout, sys.stderr = out, err
    from cni import skel

    rc = skel.main(verbs, env=env, stdin=io.BytesIO(data), stdout=out, stderr=err)
    try:
        out.flush()
        err.flush()
        conn.sendall(b"X" + bytes([rc & 0xFF]))
    except OSError:
        pass
    return rc


def _read_request(conn: socket.socket) -> tuple[warm.Request, bytes]:
    """The request (no fds ride on it: they come with "G"). The client sends nothing more until
    our "R", so reading in large chunks cannot run past the request."""
    buf = bytearray()
    need = 12
    while len(buf) < need:
        chunk = conn.recv(min(1 << 20, max(65536, need - len(buf))))
        if not chunk:
            raise ValueError("short request")
        buf += chunk
        if need == 12 and len(buf) >= 12:
            jlen, slen = warm.decode_header(bytes(buf[:12]))
            need = 12 + jlen + slen
    jlen, _ = warm.decode_header(bytes(buf[:12]))
    return warm.decode_meta(bytes(buf[12:12 + jlen])), bytes(buf[12 + jlen:need])


def code_identity() -> list[tuple[str, tuple[int, int]]]:
    """(path, (dev, inode)) of what this process may still import from: its executable (the
    frozen bundle's archive), every sys.path entry and the directory of every package it has
    imported (a mount over one of them shows too). A worker in another mount namespace runs only
    where these are the same files."""
    paths = {sys.executable, *sys.path}
    for name, mod in list(sys.modules.items()):
        where = getattr(mod, "__file__", None)
        if "." not in name and getattr(mod, "__path__", None) and isinstance(where, str):
            paths.add(os.path.dirname(where))
    out = []
    for path in sorted(p for p in paths if p and os.path.isabs(p)):
        try:
            st = os.stat(path)
        except OSError:
            continue  # not a file here either (a frozen module's virtual path)
        out.append((path, (st.st_dev, st.st_ino)))
    return out


def enter_caller_mounts(mnt_fd: int, code: Sequence[tuple[str, tuple[int, int]]]) -> None:
    """Enter the caller's mount namespace unless we are in it; Declined when we cannot, or when
    our own code is not the same files there (see the module docstring)."""
    from core import netns

    mine, theirs = os.stat("/proc/self/ns/mnt"), os.fstat(mnt_fd)
    if (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino):
        return
    try:
        netns.enter_mount_namespace(mnt_fd)
    except OSError as exc:
        raise Declined(f"cannot enter the caller's mount namespace: {exc}") from exc
    for path, ident in code:
        try:
            st = os.stat(path)
            same = (st.st_dev, st.st_ino) == ident
        except OSError:
            same = False
        if not same:
            raise Declined(f"{path} is not this server's own file in the caller's mount namespace: run the "
                           "warm server from the bundle installed on the node, at the same path")


def netns_path(original: str, fd: int) -> str:
    """The path the worker hands to skel: the original when it still names the namespace the
    client opened, else a /proc path to the passed fd (which pins that namespace)."""
    try:
        a, b = os.stat(original), os.fstat(fd)
        if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
            return original
    except OSError:
        pass
    return f"/proc/{_proc_pid()}/fd/{fd}"


def _proc_pid() -> int:
    """Our pid as the /proc we now see counts it (the caller's, after entering its mounts)."""
    try:
        return int(os.readlink("/proc/self"))
    except (OSError, ValueError):
        return os.getpid()


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


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


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
