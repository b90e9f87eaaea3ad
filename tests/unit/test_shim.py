"""The native warm-path client (packaging/shim/ovs-underlay-shim.c) without root.

The shim is compiled into tmp and run against a fake `ovs-underlay-py` next to it (it records
argv, env and stdin) and a fake warm server in this process, which parses what the shim sends
with cni/warm.py's own decoders. The request must be byte-identical to what the Python client
(`warm.encode_request`) would send for the same environment. Also the post-commit recovery hook
(OVS_UNDERLAY_WARM_RECOVER) of `warm.dispatch` that the shim relies on.
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
import json, os, sys
data = sys.stdin.buffer.read()
with open(os.environ["FAKE_RECORD"], "w") as f:
    json.dump({{"argv": sys.argv[1:], "stdin": data.decode("latin-1"),
               "env": {{k.decode("latin-1"): v.decode("latin-1") for k, v in os.environb.items()}}}}, f)
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
"""


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("shim")
    exe = d / "ovs-underlay"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-D_GNU_SOURCE", "-o", str(exe), str(SOURCE)],
                   check=True, capture_output=True, timeout=120)
    fake = d / "ovs-underlay-py"
    fake.write_text(FAKE_PY.format(python=sys.executable))
    fake.chmod(0o755)
    return exe


class FakeServer:
    """One connection, handled in a thread: `mode` is ok | silent | die | output-die."""

    def __init__(self, path: str, mode: str, code: int = 7) -> None:
        self.mode, self.code = mode, code
        self.lsock = socket.socket(socket.AF_UNIX)
        self.lsock.bind(path)
        self.lsock.listen(4)
        self.lsock.settimeout(0.5)
        self.connected = False
        self.request = b""
        self.nfds = 0
        self.after_ready = b""  # what the client sent after our "R" ("G" when it committed)
        self.inode: tuple[int, int] | None = None
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
            first, fds, _flags, _ = socket.recv_fds(conn, 65536, 3)
            self.nfds = len(fds)
            self._serve(conn, bytearray(first), fds)
        finally:
            conn.close()
            for fd in fds:  # as when the worker exits: the caller's pipes see EOF
                os.close(fd)

    def _serve(self, conn: socket.socket, buf: bytearray, fds: list[int]) -> None:
        jlen, slen = warm.decode_header(bytes(buf[:12]))
        while len(buf) < 12 + jlen + slen:
            chunk = conn.recv(1 << 20)
            if not chunk:
                return
            buf += chunk
        self.request = bytes(buf)
        if len(fds) == 3:
            st = os.fstat(fds[2])
            self.inode = (st.st_dev, st.st_ino)
        if self.mode == "silent":
            while chunk := conn.recv(64):  # until the client gives up
                self.after_ready += chunk
            return
        conn.sendall(b"R")
        self.after_ready = conn.recv(1)
        if self.mode == "ok":
            conn.sendall(b"O")
            os.write(fds[0], b'{"from": "worker"}\n')
            os.write(fds[1], b"worker log line\n")
            conn.sendall(b"X" + bytes([self.code]))
            with contextlib.suppress(OSError):  # the client exits on "X"
                conn.sendall(b"E" + struct.pack("!i", self.code))
        elif self.mode == "output-die":
            conn.sendall(b"O" + b"E" + struct.pack("!i", -9))

    def meta(self) -> tuple[dict[str, str], str, bool]:
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
    assert srv.after_ready == b"G"
    assert srv.request == warm.encode_request(env, STDIN, str(tmp_path), True)
    got_env, cwd, has_ns = srv.meta()
    assert got_env == env and cwd == str(tmp_path) and has_ns
    st = os.stat("/proc/self/ns/net")
    assert srv.inode == (st.st_dev, st.st_ino)  # the netns fd pins the namespace CNI_NETNS named
    assert record(tmp_path) is None  # the Python plugin was never exec'd


def test_unopenable_netns_sends_no_fd(shim: Path, tmp_path: Path) -> None:
    env = base_env(tmp_path, CNI_COMMAND="DEL", CNI_NETNS="relative/gone")
    with fake_server(tmp_path / "warm.sock", "ok", code=0) as srv:
        res, _ = run_shim(shim, env, cwd=tmp_path)
    assert res.returncode == 0
    assert srv.nfds == 2 and srv.request == warm.encode_request(env, STDIN, str(tmp_path), False)


# ---------------------------------------------------------------------------------------------
# (b)-(d) fallbacks: everything is decided by the Python plugin the shim execs


def test_no_socket_execs_python_with_stdin_and_argv_untouched(shim: Path, tmp_path: Path) -> None:
    env = base_env(tmp_path, FAKE_EXIT="3")
    res, _ = run_shim(shim, env)
    rec = record(tmp_path)
    assert res.returncode == 3 and rec is not None
    assert rec["stdin"] == STDIN and rec["argv"] == []
    assert "OVS_UNDERLAY_WARM" not in rec["env"] and "OVS_UNDERLAY_WARM_RECOVER" not in rec["env"]


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
    assert rec["stdin"] == STDIN and rec["env"]["OVS_UNDERLAY_WARM"] == "0"
    assert "OVS_UNDERLAY_WARM_RECOVER" not in rec["env"]


@pytest.mark.parametrize(("mode", "recover"), [("die", "0:unknown"), ("output-die", "1:-9")])
def test_death_after_commit_execs_python_to_recover(shim: Path, tmp_path: Path, mode: str, recover: str) -> None:
    big = STDIN + b" " * 300_000  # more than a pipe holds: restored through a memfd
    env = base_env(tmp_path, FAKE_EXIT="5")
    with fake_server(tmp_path / "warm.sock", mode) as srv:
        res, _ = run_shim(shim, env, big)
    rec = record(tmp_path)
    assert srv.after_ready == b"G" and rec is not None
    assert res.returncode == 5 and rec["stdin"] == big
    assert rec["env"]["OVS_UNDERLAY_WARM_RECOVER"] == recover
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
    assert "OVS_UNDERLAY_WARM_RECOVER" not in rec["env"]


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
    got, _, _ = srv.meta()
    assert {os.fsencode(k): os.fsencode(v) for k, v in got.items()} == env  # the worker's bytes


# ---------------------------------------------------------------------------------------------
# the recovery hook in warm.dispatch (what the shim execs after a death past "G")


class Calls:
    def __init__(self) -> None:
        self.log: list[tuple[str, bool]] = []

    def verbs(self, del_fails: bool = False) -> skel.Verbs:
        def add(args: Any) -> Any:
            self.log.append(("ADD", warm.ENV_RECOVER in args.env))
            return _Result()

        def delete(args: Any) -> None:
            self.log.append(("DEL", warm.ENV_RECOVER in args.env))
            if del_fails:
                raise CniError(Code.INTERNAL, "fake DEL failure")

        return skel.Verbs(add=add, delete=delete, check=delete)


class _Result:
    def to_json(self, version: str) -> dict[str, Any]:
        return {"cniVersion": version, "ips": []}


def _recover(calls: Calls, command: str, value: str, del_fails: bool = False) -> tuple[int | None, str]:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0", "CNI_NETNS": "/proc/self/ns/net",
           "CNI_NETNS_OVERRIDE": "1", "CNI_PATH": "/nonexistent", "OVS_UNDERLAY_LOG_FILE": "-",
           "OVS_UNDERLAY_WARM_QUIET": "1", warm.ENV_RECOVER: value,
           warm.ENV_SOCKET: "/nonexistent/never-used.sock"}
    out = io.StringIO()
    conf = json.dumps({"cniVersion": "1.1.0", "name": "n", "type": "fake"}).encode()
    code = warm.dispatch(calls.verbs(del_fails), [], env, io.BytesIO(conf), out)
    return code, out.getvalue()


def test_recover_reruns_idempotent_verbs_in_process() -> None:
    calls = Calls()
    assert _recover(calls, "DEL", "0:unknown") == (0, "")
    assert calls.log == [("DEL", False)]  # once, in-process, without the marker in its env


def test_recover_add_cleans_up_then_reruns() -> None:
    calls = Calls()
    code, out = _recover(calls, "ADD", "0:-9")
    assert code == 0 and json.loads(out)["cniVersion"] == "1.1.0"
    assert calls.log == [("DEL", False), ("ADD", False)]


def test_recover_add_with_failing_cleanup_is_code_11() -> None:
    calls = Calls()
    code, out = _recover(calls, "ADD", "0:unknown", del_fails=True)
    assert code == 1 and json.loads(out)["code"] == Code.TRY_AGAIN_LATER
    assert calls.log == [("DEL", False)]


@pytest.mark.parametrize("value", ["1:-9", "1:unknown", "garbage"])
def test_recover_after_output_is_exit_1_without_rerun(value: str) -> None:
    calls = Calls()
    assert _recover(calls, "ADD", value) == (1, "")
    assert calls.log == []


def test_parse_recover() -> None:
    r = warm.parse_recover("0:-15")
    assert not r.output and r.status == -15 and r.final_code() is None
    r = warm.parse_recover("1:unknown")
    assert r.output and r.status is None


def test_handoff_default_matches_the_python_client() -> None:
    from cni import warm

    src = (ROOT / "packaging/shim/ovs-underlay-shim.c").read_text()
    assert f"#define DEFAULT_HANDOFF_MS {warm.DEFAULT_HANDOFF_MS}\n" in src
