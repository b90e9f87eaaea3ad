"""Open a socket inside another network namespace without moving the process there.

Why: ipamd probes (ARP/NDP) and the plugin's gratuitous ARP must send from the pod's interface,
which lives in the pod's netns. A socket belongs to the netns it was created in, for its whole
life, whatever thread later uses it. setns(2) with CLONE_NEWNET only moves the *calling thread*,
so we create the socket on a short-lived thread that enters the netns, makes the socket and
exits. The thread never returns to a pool and runs no other code, so no other work (gRPC
handlers, SQLite, logging) ever runs in a pod's netns, and the process's own netns never changes.
No fork: the daemon is multi-threaded (pyroute2's fork-based helpers are unsafe there).
The one process-wide switch here, `enter_mount_namespace`, is for a freshly forked
single-threaded warm-path worker that must see its caller's filesystem.

stdlib only: the plugin imports this on the ADD path.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import enum
import errno
import fcntl
import logging
import os
import queue
import re
import socket
import stat
import struct
import threading
from collections.abc import Callable

CLONE_NEWNET = 0x40000000
CLONE_NEWNS = 0x00020000
MS_BIND, MS_REC, MS_SHARED = 0x1000, 0x4000, 0x100000
MNT_DETACH = 2
NETNS_RUN_DIR = "/run/netns"
NS_GET_NSTYPE = 0xB703  # ioctl(2) on an nsfs fd: the namespace type (linux/nsfs.h)
SIOCGIFINDEX = 0x8933

log = logging.getLogger("ovs-underlay.netns")

_libc_cache: list[ctypes.CDLL] = []


def _libc() -> ctypes.CDLL:
    """libc for setns(2) (and unshare/mount for named netns), loaded on first use: find_library
    may run ldconfig, which a caller that only opens a netns path (the warm client) must not pay
    for."""
    if not _libc_cache:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.setns.argtypes = (ctypes.c_int, ctypes.c_int)
        lib.unshare.argtypes = (ctypes.c_int,)
        lib.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                              ctypes.c_void_p)
        lib.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
        _libc_cache.append(lib)
    return _libc_cache[0]


class NetnsError(OSError):
    """The path is not a network namespace, or entering it failed."""


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"))


def open_netns(path: str) -> int:
    """Open a netns path for reading without ever blocking or touching a device: the path is
    opened with O_PATH (which runs no open handler: not a FIFO's, which blocks until a writer
    comes, nor a device's, such as a watchdog's), must be a regular file (namespace files are),
    and only then is it opened for reading through /proc/self/fd. Raises NetnsError naming
    what the path is instead. The caller closes the fd. Every netns path we open goes through
    here (netns checks, netns sockets, the veth's peer netns, the warm client)."""
    try:
        pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        raise NetnsError(exc.errno, f"cannot open netns {path}: {exc.strerror}") from exc
    try:
        mode = os.fstat(pfd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((k for test, k in _KINDS if test(mode)), "not a regular file")
            raise NetnsError(errno.EINVAL, f"{path} is {kind}, not a namespace file")
        try:
            return os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as exc:
            raise NetnsError(exc.errno, f"cannot open netns {path}: {exc.strerror}") from exc
    finally:
        os.close(pfd)


def check_netns(path: str) -> int:
    """Return the inode of the network namespace at `path`; raise NetnsError if `path` is not
    one (a plain file, a FIFO, a device, a mount namespace, a missing path)."""
    fd = open_netns(path)
    try:
        try:
            nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError as exc:
            raise NetnsError(errno.EINVAL, f"{path} is not a namespace file") from exc
        if nstype != CLONE_NEWNET:
            raise NetnsError(errno.EINVAL, f"{path} is a namespace but not a network namespace")
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def enter_mount_namespace(fd: int) -> None:
    """Move this whole process into the mount namespace `fd` refers to (setns(CLONE_NEWNS)).

    Why here: the warm path's forked worker must see its caller's filesystem. Unlike the netns
    sockets above this switches the *process* (root and cwd are reset to the namespace's root),
    which the kernel allows only in a single-threaded process: call it in a fresh fork, before
    anything starts a thread. Needs CAP_SYS_ADMIN and CAP_SYS_CHROOT."""
    if _libc().setns(fd, CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNS): {os.strerror(err)}")


class NetnsState(enum.Enum):
    PRESENT = "present"  # a network namespace is mounted at the path
    GONE = "gone"  # the path no longer exists, and we could have seen it if it did
    UNKNOWN = "unknown"  # cannot tell: never evidence that a pod is gone


_PROC_NS = re.compile(r"^/proc/(\d+)/")


def netns_state(path: str) -> NetnsState:
    """Whether the network namespace a pod was given at `path` still exists, for a reconciler
    that frees what a gone pod held. Only a missing path is GONE, and only when the place it
    lived in is visible to us:
    - a path that exists but is not a netns (an empty file left after the runtime unmounted
      it, or every netns file when /run/netns is mounted into our container without mount
      propagation) is UNKNOWN, never GONE: a blind daemon must leak, not free live addresses;
    - `/run/netns/X` whose directory is missing is UNKNOWN (not mounted into our container);
    - `/proc/<pid>/ns/net` whose process is gone is GONE only in the host's PID namespace
      (kthreadd is pid 2 there and nowhere else): in a container without hostPID no host pid
      is visible, and every such pod would look gone.
    Never blocks: a FIFO or a device is not opened (S_ISREG only; nsfs files are regular). A path
    that is not absolute (none is ever recorded) is UNKNOWN."""
    if not os.path.isabs(path):
        return NetnsState.UNKNOWN
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
            return NetnsState.UNKNOWN
        m = _PROC_NS.match(path)
        if m is not None:
            return NetnsState.GONE if _in_host_pid_namespace() else NetnsState.UNKNOWN
        return NetnsState.GONE if os.path.isdir(os.path.dirname(path)) else NetnsState.UNKNOWN
    if not stat.S_ISREG(st.st_mode):
        return NetnsState.UNKNOWN
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return NetnsState.UNKNOWN
    try:
        nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        return NetnsState.UNKNOWN  # not a namespace file (any more)
    finally:
        os.close(fd)
    return NetnsState.PRESENT if nstype == CLONE_NEWNET else NetnsState.UNKNOWN


def _in_host_pid_namespace() -> bool:
    try:
        with open("/proc/2/comm", encoding="ascii") as fh:
            return fh.read().strip() == "kthreadd"
    except OSError:
        return False


def own_netns_inode() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def socket_in_netns(netns_path: str, family: int, type_: int, proto: int = 0) -> socket.socket:
    """Create a socket in the network namespace at `netns_path` (see module docstring)."""
    fd = open_netns(netns_path)
    libc = _libc()
    box: dict[str, object] = {}

    def make() -> None:
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise NetnsError(err, f"setns({netns_path}): {os.strerror(err)}")
            box["sock"] = socket.socket(family, type_, proto)
        except BaseException as exc:  # handed to the caller's thread below
            box["err"] = exc

    try:
        t = threading.Thread(target=make, name="netns-socket", daemon=True)
        t.start()
        t.join()
    finally:
        os.close(fd)
    if "err" in box:
        raise box["err"]  # type: ignore[misc]
    sock = box["sock"]
    assert isinstance(sock, socket.socket)
    return sock


def _on_thread(fn: Callable[[], object], name: str) -> object:
    """Run `fn` on a short-lived thread (it may change its own namespaces: the thread dies with
    them) and return its result or raise its exception here."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["out"] = fn()
        except BaseException as exc:  # handed to the caller's thread below
            box["err"] = exc

    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    t.join()
    if "err" in box:
        raise box["err"]  # type: ignore[misc]
    return box.get("out")


def _errno_check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _shared_run_dir() -> None:
    """/run/netns as a shared mount point, as `ip netns add` makes it (so that a netns made
    here is seen by every mount namespace that shares the directory)."""
    os.makedirs(NETNS_RUN_DIR, mode=0o755, exist_ok=True)
    run_dir = NETNS_RUN_DIR.encode()
    if _libc().mount(b"", run_dir, b"none", MS_SHARED | MS_REC, None) == 0:
        return
    if ctypes.get_errno() != errno.EINVAL:  # EINVAL: not a mount point yet
        _errno_check(-1, f"make {NETNS_RUN_DIR} shared")
    _errno_check(_libc().mount(run_dir, run_dir, b"none", MS_BIND | MS_REC, None), f"bind {NETNS_RUN_DIR}")
    _errno_check(_libc().mount(b"", run_dir, b"none", MS_SHARED | MS_REC, None),
                 f"make {NETNS_RUN_DIR} shared")


def create_named(name: str) -> str:
    """The named network namespace /run/netns/<name>, created as `ip netns add` creates it, or
    the existing one of that name (reused: a restarted daemon finds the netns it made). Returns
    its path. The new netns is made by a short-lived thread that unshares and dies."""
    path = os.path.join(NETNS_RUN_DIR, name)
    try:
        check_netns(path)
        return path
    except NetnsError:
        pass
    _shared_run_dir()
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o444))  # the mount point
    except OSError as exc:
        raise NetnsError(exc.errno, f"cannot create {path}: {exc.strerror}") from exc

    def make() -> None:
        _errno_check(_libc().unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        _errno_check(_libc().mount(b"/proc/thread-self/ns/net", path.encode(), b"none", MS_BIND, None),
                     f"bind the new netns to {path}")

    try:
        _on_thread(make, "netns-create")
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise NetnsError(exc.errno, f"cannot create netns {name}: {exc.strerror}") from exc
    return path


def delete_named(name: str) -> None:
    """Remove /run/netns/<name> (as `ip netns del`); a missing one is fine. The netns itself goes
    once nothing holds it any more."""
    path = os.path.join(NETNS_RUN_DIR, name)
    if _libc().umount2(path.encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # not mounted / not there: nothing to undo
            raise NetnsError(err, f"cannot unmount {path}: {os.strerror(err)}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def write_sysctl(netns_path: str, key: str, value: str) -> None:
    """Write a net.* sysctl (`key` as in sysctl(8), e.g. net.ipv6.conf.eth0.disable_ipv6) inside
    the netns: /proc/sys/net resolves against the netns of the thread that opens it."""
    fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    path = "/proc/sys/" + key.replace(".", "/")

    def write() -> None:
        if _libc().setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(err, f"setns({netns_path}): {os.strerror(err)}")
        with open(path, "w") as fh:
            fh.write(value)

    try:
        _on_thread(write, "netns-sysctl")
    finally:
        os.close(fd)


# linux/if_packet.h: what our packet sockets set and read.
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_ALLMULTI = 2
PACKET_OUTGOING = 4  # sll_pkttype of a frame this host sent (recvfrom's addr[2])


def join_allmulti(sock: socket.socket, ifindex: int) -> None:
    """Receive every multicast frame on the interface (solicited-node groups of addresses we do
    not hold, whatever the interface's own IPv6 state)."""
    mreq = struct.pack("iHH8s", ifindex, PACKET_MR_ALLMULTI, 0, b"")
    sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)


def packet_socket(netns_path: str, ifname: str, ethertype: int, *,
                  allmulti: bool = False) -> tuple[socket.socket, int]:
    """An AF_PACKET/SOCK_RAW socket bound to `ifname` inside the netns, receiving `ethertype`
    (and every multicast frame with `allmulti`). Returns the socket and the interface index
    (raises OSError ENODEV if ifname is missing).

    Created with protocol 0, then bound to the ethertype: a socket created with a protocol has a
    packet hook registered already, and bind() must unregister it first, which waits for an RCU
    grace period (synchronize_net: 8-15 ms measured here). With protocol 0 there is nothing to
    unregister and bind() is immediate. close() still pays one grace period: callers on a
    latency-critical path should close on another thread (`close_later`)."""
    sock = socket_in_netns(netns_path, socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        sock.bind((ifname, ethertype))
        ifindex = _ifindex_of(sock)
        if allmulti:
            join_allmulti(sock, ifindex)
    except OSError:
        sock.close()
        raise
    return sock, ifindex


def _ifindex_of(sock: socket.socket) -> int:
    # getsockname() on a bound AF_PACKET socket gives (ifname, proto, pkttype, hatype, addr);
    # the index is not exposed, so resolve it via SIOCGIFINDEX on this (namespaced) socket.
    return ifindex(sock, sock.getsockname()[0])


def ifindex(sock: socket.socket, ifname: str) -> int:
    """The index of `ifname` in the netns `sock` lives in (SIOCGIFINDEX; OSError ENODEV if it is
    missing). Answers without a netlink socket, which in a pod netns would cost a setns thread."""
    res = fcntl.ioctl(sock.fileno(), SIOCGIFINDEX, struct.pack("16si12x", ifname.encode(), 0))
    return int(struct.unpack("16si12x", res)[1])


# ---- closing packet sockets off the request path ---------------------------------------------

_closing: queue.SimpleQueue[socket.socket] = queue.SimpleQueue()
_closer_lock = threading.Lock()
_closer: threading.Thread | None = None


def close_later(sock: socket.socket) -> None:
    """Close a packet socket on the closer thread. Closing an AF_PACKET socket unregisters its
    packet hook (packet_release), which waits for an RCU grace period (synchronize_net: 8-20 ms
    measured here); what was sent is sent and what was read is read, so no caller needs to wait
    for it. One long-lived daemon thread, not one per socket. The one copy for the probes
    (ipamd) and the announcements (the plugin)."""
    global _closer
    with _closer_lock:
        if _closer is None or not _closer.is_alive():
            _closer = threading.Thread(target=_close_loop, name="packet-socket-closer", daemon=True)
            _closer.start()
    _closing.put(sock)


def _close_loop() -> None:
    while True:
        sock = _closing.get()
        try:
            sock.close()
        except OSError as exc:  # nothing to do about it but say so
            log.warning("closing a packet socket failed: %s", exc)
