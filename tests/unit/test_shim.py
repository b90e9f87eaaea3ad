"""The native warm-path client (packaging/shim/ovs-underlay-shim.c) without root.

The shim is compiled into tmp (as `ovs-underlay` and as `ovs-underlay-ipam`) and run against a
fake `<name>-py` next to it (it records argv, env, stdin and the recovery record it was handed)
and a fake warm server in this process, which parses what the shim sends with cni/warm.py's own
decoders. The request must be byte-identical to what the Python client (`warm.encode_request`)
would send for the same environment. Also the post-commit recovery hook (`--warm-recover FD`) of
`warm.dispatch` that the shim relies on.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cni import skel, warm
from cni.errors import CniError, Code

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "packaging" / "shim" / "ovs-underlay-shim.c"
STDIN = b'{"cniVersion": "1.1.0", "name": "n", "type": "ovs-underlay"}'

FAKE_PY = """#!{python}
import fcntl, json, os, sys
data = sys.stdin.buffer.read()
recovery = None
if sys.argv[1:2] == ["--warm-recover"]:
    fd = int(sys.argv[2])
    recovery = {{"name": os.readlink(f"/proc/self/fd/{{fd}}"), "seals": fcntl.fcntl(fd, fcntl.F_GET_SEALS),
                "record": os.pread(fd, 256, 0).decode(), "pid": os.getpid()}}
with open(os.environ["FAKE_RECORD"], "w") as f:
    json.dump({{"argv": sys.argv[1:], "stdin": data.decode("latin-1"), "recovery": recovery, "exe": sys.argv[0],
               "self": os.path.basename(__file__),
               "env": {{k.decode("latin-1"): v.decode("latin-1") for k, v in os.environb.items()}}}}, f)
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
"""


def build_shim(d: Path, name: str) -> Path:
    exe = d / name
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-D_GNU_SOURCE", f'-DPLUGIN_NAME="{name}"',
                    "-o", str(exe), str(SOURCE)], check=True, capture_output=True, timeout=120)
    fake = d / f"{name}-py"
    fake.write_text(FAKE_PY.format(python=sys.executable))
    fake.chmod(0o755)
    return exe


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shim(tmp_path_factory.mktemp("shim"), "ovs-underlay")


@pytest.fixture(scope="module")
def ipam_shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shim(tmp_path_factory.mktemp("shim-ipam"), "ovs-underlay-ipam")


def _ident(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


class FakeServer:
    """One connection, handled in a thread: `mode` is ok | silent | die | output-die | exit0 | decline."""

    def __init__(self, path: str, mode: str, code: int = 7, accept_s: float = 0.5) -> None:
        self.mode, self.code = mode, code
        self.lsock = socket.socket(socket.AF_UNIX)
        self.lsock.bind(path)
        self.lsock.listen(4)
        self.lsock.settimeout(accept_s)
        self.connected = False
        self.request = b""
        self.nfds = 0
        self.after_ready = b""  # what the client sent after our "R" ("G" when it committed)
        self.inode: tuple[int, int] | None = None
        self.mntns: tuple[int, int] | None = None
        self.early_fds = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.lsock.accept()
        except TimeoutError:
            return
        self.connected = True
        fds: list[int] = []
        try:
            conn.settimeout(10)
            fds = self._serve(conn)
        finally:
            conn.close()
            for fd in fds:  # as when the worker exits: the caller's pipes see EOF
                os.close(fd)

    def _serve(self, conn: socket.socket) -> list[int]:
        first, early, _flags, _ = socket.recv_fds(conn, 65536, 4)
        self.early_fds = len(early)  # fds before our "R": must be none
        for fd in early:
            os.close(fd)
        buf = bytearray(first)
        jlen, slen = warm.decode_header(bytes(buf[:12]))
        while len(buf) < 12 + jlen + slen:
            chunk = conn.recv(1 << 20)
            if not chunk:
                return []
            buf += chunk
        self.request = bytes(buf)
        if self.mode == "silent":
            while chunk := conn.recv(64):  # until the client gives up
                self.after_ready += chunk
            return []
        conn.sendall(b"R")
        msg, fds, _flags, _ = socket.recv_fds(conn, 1, 4)
        self.after_ready, self.nfds = msg, len(fds)
        if len(fds) >= 3:
            self.mntns = _ident(fds[2])
        if len(fds) == 4:
            self.inode = _ident(fds[3])
        if self.mode == "ok":
            conn.sendall(b"O")
            os.write(fds[0], b'{"from": "worker"}\n')
            os.write(fds[1], b"worker log line\n")
            conn.sendall(b"X" + bytes([self.code]))
            with contextlib.suppress(OSError):  # the client exits on "X"
                conn.sendall(b"E" + struct.pack("!i", self.code))
        elif self.mode == "output-die":
            conn.sendall(b"O" + b"E" + struct.pack("!i", -9))
        elif self.mode == "exit0":  # a worker that ended without its report, exit status 0
            conn.sendall(b"E" + struct.pack("!i", 0))
        elif self.mode == "decline":
            conn.sendall(b"N" + b"E" + struct.pack("!i", warm.NOT_RUN))
        return fds

    def meta(self) -> warm.Request:
        jlen, _ = warm.decode_header(self.request[:12])
        return warm.decode_meta(self.request[12:12 + jlen])

    def close(self) -> None:
        self.thread.join(15)
        self.lsock.close()


@contextlib.contextmanager
def fake_server(path: Path, mode: str, **kw: Any) -> Iterator[FakeServer]:
    s = FakeServer(str(path), mode, **kw)
    try:
        yield s
    finally:
        s.close()


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {"PATH": "/usr/bin:/bin", "CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0",
           "CNI_NETNS": "/proc/self/ns/net", "OVS_UNDERLAY_WARM_SOCKET": str(tmp_path / "warm.sock"),
           "FAKE_RECORD": str(tmp_path / "record.json"), "OVS_UNDERLAY_WARM_QUIET": "1"}
    env.update(extra)
    return env


def run_shim(shim: Path, env: dict[str, str] | dict[bytes, bytes], stdin: bytes = STDIN, *args: str,
             cwd: Path | None = None) -> tuple[subprocess.CompletedProcess[bytes], float]:
    t0 = time.monotonic()
    res = subprocess.run([str(shim), *args], env=env, input=stdin, capture_output=True, timeout=30, cwd=cwd)
    return res, time.monotonic() - t0


def record(tmp_path: Path) -> dict[str, Any] | None:
    p = tmp_path / "record.json"
    if not p.exists():
        return None
    rec: dict[str, Any] = json.loads(p.read_text())
    rec["stdin"] = rec["stdin"].encode("latin-1")
    return rec


# ---------------------------------------------------------------------------------------------
# (a) the hand-off itself


def test_happy_path_sends_what_the_python_client_sends(shim: Path, tmp_path: Path) -> None:
    env = base_env(tmp_path, MARK="m1")
    with fake_server(tmp_path / "warm.sock", "ok", code=7) as srv:
        res, _ = run_shim(shim, env, cwd=tmp_path)
    assert res.returncode == 7, res.stderr
    assert res.stdout == b'{"from": "worker"}\n'  # written by the "worker" to the passed stdout fd
    assert res.stderr == b"worker log line\n"
    assert srv.after_ready == b"G" and srv.early_fds == 0  # the fds came with "G", not before "R"
    assert srv.request == warm.encode_request(env, STDIN, str(tmp_path), True)
    req = srv.meta()
    assert req.env == env and req.cwd == str(tmp_path) and req.netns_fd and req.plugin == "ovs-underlay"
    st = os.stat("/proc/self/ns/net")
    assert srv.inode == (st.st_dev, st.st_ino)  # the netns fd pins the namespace CNI_NETNS named
    st = os.stat("/proc/self/ns/mnt")
    assert srv.mntns == (st.st_dev, st.st_ino)  # the caller's filesystem, for the worker to enter
    assert record(tmp_path) is None  # the Python plugin was never exec'd


def test_unopenable_netns_sends_no_fd(shim: Path, tmp_path: Path) -> None:
    env = base_env(tmp_path, CNI_COMMAND="DEL", CNI_NETNS="relative/gone")
    with fake_server(tmp_path / "warm.sock", "ok", code=0) as srv:
        res, _ = run_shim(shim, env, cwd=tmp_path)
    assert res.returncode == 0
    assert srv.nfds == 3 and srv.request == warm.encode_request(env, STDIN, str(tmp_path), False)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_a_device_as_netns_is_never_opened(shim: Path, tmp_path: Path, kind: str) -> None:
    """Issue 11 item 12: open(O_RDONLY) of a FIFO blocks until a writer comes, and opening a
    device runs its open handler (a watchdog starts counting). The shim opens CNI_NETNS with
    O_PATH first, as core.netns.open_netns does, and passes no netns fd for anything but a
    regular file (the worker's skel then reports the path: 8)."""
    path = tmp_path / "fifo"
    if kind == "fifo":
        os.mkfifo(path)
    env = base_env(tmp_path, CNI_NETNS=str(path) if kind == "fifo" else "/dev/null")
    with fake_server(tmp_path / "warm.sock", "ok", code=8) as srv:
        res, elapsed = run_shim(shim, env, cwd=tmp_path)
    assert res.returncode == 8 and elapsed < 10
    assert srv.nfds == 3 and srv.meta().netns_fd is False  # stdout, stderr, mount namespace


# ---------------------------------------------------------------------------------------------
# (b)-(d) fallbacks: everything is decided by the Python plugin the shim execs


def test_no_socket_execs_python_with_stdin_and_argv_untouched(shim: Path, tmp_path: Path) -> None:
    env = base_env(tmp_path, FAKE_EXIT="3")
    res, _ = run_shim(shim, env)
    rec = record(tmp_path)
    assert res.returncode == 3 and rec is not None
    assert rec["stdin"] == STDIN and rec["argv"] == []
    assert "OVS_UNDERLAY_WARM" not in rec["env"] and rec["recovery"] is None


def test_refused_connection_falls_back_with_stdin_restored(shim: Path, tmp_path: Path) -> None:
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(tmp_path / "warm.sock"))  # exists, nobody listens: ECONNREFUSED
    try:
        res, _ = run_shim(shim, base_env(tmp_path, OVS_UNDERLAY_WARM_QUIET="0"))
    finally:
        dead.close()
    rec = record(tmp_path)
    assert res.returncode == 0 and rec is not None
    assert rec["stdin"] == STDIN and rec["env"]["OVS_UNDERLAY_WARM"] == "0"
    assert b"running in-process" in res.stderr and res.stdout == b""


def test_silent_server_falls_back_within_the_deadline(shim: Path, tmp_path: Path) -> None:
    env = base_env(tmp_path, OVS_UNDERLAY_WARM_HANDOFF_MS="200")
    with fake_server(tmp_path / "warm.sock", "silent") as srv:
        res, elapsed = run_shim(shim, env)
    rec = record(tmp_path)
    assert res.returncode == 0 and rec is not None
    assert 0.2 <= elapsed < 2.0
    assert srv.connected and srv.after_ready == b""  # the client hung up without "G"
    assert srv.early_fds == 0 and srv.nfds == 0  # and never handed the server an fd
    assert rec["stdin"] == STDIN and rec["env"]["OVS_UNDERLAY_WARM"] == "0"
    assert rec["recovery"] is None


def test_declined_call_runs_in_process(shim: Path, tmp_path: Path) -> None:
    """"N" after "G": the worker did not run the verb (e.g. it cannot enter our mount namespace)."""
    with fake_server(tmp_path / "warm.sock", "decline") as srv:
        res, _ = run_shim(shim, base_env(tmp_path, FAKE_EXIT="4"))
    rec = record(tmp_path)
    assert srv.after_ready == b"G" and rec is not None
    assert res.returncode == 4 and rec["stdin"] == STDIN and rec["env"]["OVS_UNDERLAY_WARM"] == "0"
    assert rec["argv"] == [] and rec["recovery"] is None


@pytest.mark.parametrize(("mode", "output", "status"), [("die", "0", "unknown"), ("output-die", "1", "-9"),
                                                        ("exit0", "0", "0")])
def test_death_after_commit_execs_python_to_recover(shim: Path, tmp_path: Path, mode: str, output: str,
                                                    status: str) -> None:
    """Without the worker's own "X" (even with exit status 0) the shim never answers itself: it
    hands what it saw to the Python plugin on a sealed memfd that names the exec'd process."""
    big = STDIN + b" " * 300_000  # more than a pipe holds: restored through a memfd
    env = base_env(tmp_path, FAKE_EXIT="5")
    with fake_server(tmp_path / "warm.sock", mode) as srv:
        res, _ = run_shim(shim, env, big)
    rec = record(tmp_path)
    assert srv.after_ready == b"G" and rec is not None
    assert res.returncode == 5 and rec["stdin"] == big
    assert rec["argv"][0] == "--warm-recover" and len(rec["argv"]) == 2 and int(rec["argv"][1]) >= 3
    r = rec["recovery"]
    assert r["name"] == "/memfd:ovs-underlay-warm-recover (deleted)"
    import fcntl
    assert r["seals"] & fcntl.F_SEAL_WRITE and r["seals"] & fcntl.F_SEAL_SEAL
    assert r["record"] == f"OUWR1 pid={r['pid']} output={output} status={status}\n"
    assert "OVS_UNDERLAY_WARM" not in rec["env"]


# ---------------------------------------------------------------------------------------------
# (e) calls that are not for the warm path never connect


@pytest.mark.parametrize(("args", "extra"), [
    ((), {"CNI_COMMAND": "VERSION"}),
    (("--help",), {}),
    (("--warm-server", "--socket", "/x"), {}),
    ((), {"OVS_UNDERLAY_WARM": "0"}),
    ((), {"CNI_COMMAND": "add"}),
])
def test_non_warm_calls_never_connect(shim: Path, tmp_path: Path, args: tuple[str, ...],
                                      extra: dict[str, str]) -> None:
    with fake_server(tmp_path / "warm.sock", "ok") as srv:
        res, _ = run_shim(shim, base_env(tmp_path, **extra), STDIN, *args)
    rec = record(tmp_path)
    assert res.returncode == 0 and rec is not None
    assert not srv.connected
    assert rec["argv"] == list(args) and rec["stdin"] == STDIN
    assert rec["recovery"] is None


def test_missing_python_plugin_is_a_cni_error(shim: Path, tmp_path: Path) -> None:
    lonely = tmp_path / "bin" / "ovs-underlay"
    lonely.parent.mkdir()
    shutil.copy(shim, lonely)
    res, _ = run_shim(lonely, base_env(tmp_path, CNI_COMMAND="VERSION"))
    assert res.returncode == 1
    doc = json.loads(res.stdout)
    assert doc["code"] == 999 and doc["cniVersion"] == "1.0.0"
    assert doc["msg"].startswith(f"ovs-underlay: cannot exec {lonely.parent}/ovs-underlay-py: ")


# ---------------------------------------------------------------------------------------------
# (f) the environment's JSON round trip


def test_awkward_env_values_round_trip_byte_for_byte(shim: Path, tmp_path: Path) -> None:
    awkward: dict[bytes, bytes] = {
        b"QUOTES": b'say "hi" \\ back\\slash \\"',
        b"CONTROL": b"nl\ncr\rtab\tbs\bff\f\x01\x1f\x7f end",
        b"UTF8": "é 漢字 😀 \u2028".encode(),
        b"BROKEN": b"\xff\xfe \xc3( \xed\xa0\x80 \xf0\x9f\x98 \xe0\x80\xaf \xf4\x90\x80\x80 \xc3",
        "KÉY".encode(): b"v",
        b"EMPTY": b"",
        b"EQ": b"a=b=c",
    }
    env = {os.fsencode(k): os.fsencode(v) for k, v in base_env(tmp_path, CNI_COMMAND="CHECK").items()}
    env.update(awkward)
    with fake_server(tmp_path / "warm.sock", "ok", code=0) as srv:
        res, _ = run_shim(shim, env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    as_python = {os.fsdecode(k): os.fsdecode(v) for k, v in env.items()}  # what os.environ holds
    assert srv.request == warm.encode_request(as_python, STDIN, str(tmp_path), True)
    got = srv.meta().env
    assert {os.fsencode(k): os.fsencode(v) for k, v in got.items()} == env  # the worker's bytes


# ---------------------------------------------------------------------------------------------
# the recovery hook in warm.dispatch (what the shim execs after a death past "G")


class Calls:
    def __init__(self) -> None:
        self.log: list[str] = []

    def verbs(self, del_fails: bool = False) -> skel.Verbs:
        def add(args: Any) -> Any:
            self.log.append("ADD")
            return _Result()

        def delete(args: Any) -> None:
            self.log.append("DEL")
            if del_fails:
                raise CniError(Code.INTERNAL, "fake DEL failure")

        return skel.Verbs(add=add, delete=delete, check=delete)


class _Result:
    def to_json(self, version: str) -> dict[str, Any]:
        return {"cniVersion": version, "ips": []}


def recovery_memfd(record: str, *, name: str = warm.RECOVER_MEMFD, seal: bool = True) -> int:
    """What the shim's recovery_fd makes."""
    import fcntl

    fd = os.memfd_create(name, os.MFD_ALLOW_SEALING)
    os.write(fd, record.encode())
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
    return fd


def _recover(calls: Calls, command: str, output: str, status: str, del_fails: bool = False,
             argv: list[str] | None = None) -> tuple[int | None, str]:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0", "CNI_NETNS": "/proc/self/ns/net",
           "CNI_NETNS_OVERRIDE": "1", "CNI_PATH": "/nonexistent", "OVS_UNDERLAY_LOG_FILE": "-",
           "OVS_UNDERLAY_WARM_QUIET": "1", warm.ENV_SOCKET: "/nonexistent/never-used.sock"}
    out = io.StringIO()
    conf = json.dumps({"cniVersion": "1.1.0", "name": "n", "type": "fake"}).encode()
    fd = -1
    if argv is None:
        fd = recovery_memfd(f"OUWR1 pid={os.getpid()} output={output} status={status}\n")
        argv = [warm.RECOVER_FLAG, str(fd)]
    try:
        code = warm.dispatch(calls.verbs(del_fails), argv, env, io.BytesIO(conf), out)
    finally:
        if fd >= 0:
            assert not os.path.exists(f"/proc/self/fd/{fd}")  # read once, then closed
    return code, out.getvalue()


def test_recover_reruns_idempotent_verbs_in_process() -> None:
    calls = Calls()
    assert _recover(calls, "DEL", "0", "unknown") == (0, "")
    assert calls.log == ["DEL"]  # once, in-process


@pytest.mark.parametrize("status", ["-9", "0", str(warm.NOT_RUN)])
def test_recover_add_cleans_up_then_reruns(status: str) -> None:
    calls = Calls()
    code, out = _recover(calls, "ADD", "0", status)
    assert code == 0 and json.loads(out)["cniVersion"] == "1.1.0"
    assert calls.log == ["DEL", "ADD"]


def test_recover_add_with_failing_cleanup_is_code_11() -> None:
    calls = Calls()
    code, out = _recover(calls, "ADD", "0", "unknown", del_fails=True)
    assert code == 1 and json.loads(out)["code"] == Code.TRY_AGAIN_LATER
    assert calls.log == ["DEL"]


@pytest.mark.parametrize(("output", "status"), [("1", "-9"), ("1", "unknown"), ("garbage", "0")])
def test_recover_after_output_is_exit_1_without_rerun(output: str, status: str) -> None:
    calls = Calls()
    assert _recover(calls, "ADD", output, status) == (1, "")
    assert calls.log == []


@pytest.mark.parametrize("make", [
    lambda: recovery_memfd("OUWR1 pid=1 output=0 status=0\n"),  # another process's record
    lambda: recovery_memfd(f"OUWR1 pid={os.getpid()} output=0 status=0\n", seal=False),
    lambda: recovery_memfd(f"OUWR1 pid={os.getpid()} output=0 status=0\n", name="other"),
    lambda: os.open("/dev/null", os.O_RDONLY),
    lambda: 999,  # not open
])
def test_recovery_record_not_made_by_the_shim_is_refused(make: Any) -> None:
    """The outcome of a call is never decided by something a runtime or user can pass: a
    record that is not the shim's sealed memfd for this very process runs nothing and answers 11."""
    calls = Calls()
    fd = make()
    code, out = _recover(calls, "ADD", "0", "0", argv=[warm.RECOVER_FLAG, str(fd)])
    assert code == 1 and json.loads(out)["code"] == Code.TRY_AGAIN_LATER and "--warm-recover" in json.loads(out)["msg"]
    assert calls.log == []


def test_ipam_variant_names_its_plugin_and_execs_its_own_python(ipam_shim: Path, tmp_path: Path) -> None:
    """One source, built as ovs-underlay-ipam: the request says which plugin, so one warm server
    serves both; fallbacks exec ovs-underlay-ipam-py next to it."""
    env = base_env(tmp_path, CNI_NETNS="")
    with fake_server(tmp_path / "warm.sock", "ok", code=0) as srv:
        res, _ = run_shim(ipam_shim, env, cwd=tmp_path)
    assert res.returncode == 0 and res.stdout == b'{"from": "worker"}\n'
    assert srv.request == warm.encode_request(env, STDIN, str(tmp_path), False, "ovs-underlay-ipam")
    res, _ = run_shim(ipam_shim, base_env(tmp_path, CNI_COMMAND="VERSION"))
    rec = record(tmp_path)
    assert res.returncode == 0 and rec is not None and rec["self"] == "ovs-underlay-ipam-py"


def test_handoff_default_matches_the_python_client() -> None:
    from cni import warm

    src = (ROOT / "packaging/shim/ovs-underlay-shim.c").read_text()
    assert f"#define DEFAULT_HANDOFF_MS {warm.DEFAULT_HANDOFF_MS}\n" in src


# ---------------------------------------------------------------------------------------------
# issue 11: review defects


def test_unresponsive_server_never_holds_the_callers_stdout(shim: Path, tmp_path: Path) -> None:
    """A stopped or hung server (SIGSTOP: the connection waits in the listen backlog, never
    accepted): the shim falls back and exits, and the runtime's stdout pipe sees EOF at once,
    because no fd was sent before the server answered."""
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(str(tmp_path / "warm.sock"))
    lsock.listen(4)  # never accepted, as with a SIGSTOPped server
    try:
        proc = subprocess.Popen([str(shim)], env=base_env(tmp_path, OVS_UNDERLAY_WARM_HANDOFF_MS="200",
                                                          CNI_COMMAND="DEL"),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, _err = proc.communicate(STDIN, timeout=10)  # reads stdout until EOF
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail("the runtime's stdout stayed open after the shim fell back")
    finally:
        lsock.close()
    rec = record(tmp_path)
    assert proc.returncode == 0 and out == b"" and rec is not None and rec["stdin"] == STDIN


def test_large_environment_is_deduplicated_in_n_log_n(shim: Path, tmp_path: Path) -> None:
    """100,000 variables (the quadratic de-duplication took ~30 s here), with duplicates: the
    first occurrence wins, as in Python's os.environ, and the request still matches the Python
    client byte for byte."""
    env = base_env(tmp_path, CNI_COMMAND="CHECK")
    env.update({f"V{i:06d}": str(i % 7) for i in range(100_000)})
    envb = [f"{k}={v}".encode() for k, v in env.items()]
    envb += [b"V000001=dup", b"CNI_COMMAND=DEL", b"NOEQUALS"]
    with fake_server(tmp_path / "warm.sock", "ok", code=0, accept_s=20) as srv:
        res = subprocess.run([sys.executable, "-c", RAW_EXEC, str(shim)], input=b"\0".join(envb) + b"\n" + STDIN,
                             capture_output=True, timeout=20, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert srv.request == warm.encode_request(env, STDIN, str(tmp_path), True)


# execve with a raw environment block (duplicates, an entry without "="), which subprocess cannot
# pass: the block comes on stdin before the first newline, NUL-separated; the rest is stdin.
RAW_EXEC = r"""
import ctypes, os, sys
data = sys.stdin.buffer.read()
block, _, rest = data.partition(b"\n")
r, w = os.pipe()
os.write(w, rest)
os.close(w)
os.dup2(r, 0)
entries = block.split(b"\0")
envp = (ctypes.c_char_p * (len(entries) + 1))(*entries, None)
argv = (ctypes.c_char_p * 2)(sys.argv[1].encode(), None)
libc = ctypes.CDLL(None, use_errno=True)
libc.execve(sys.argv[1].encode(), argv, envp)
sys.exit(f"execve: {os.strerror(ctypes.get_errno())}")
"""
