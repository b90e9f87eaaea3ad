"""The warm path (cni/warm.py, cni/warm_server.py) without root: wire format, and a real fork
server on a temp socket running fake verbs, including every fallback rule (before and after the
commit) and the review's defects (issue 11)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cni import skel, warm, warm_server
from cni.errors import CniError, Code

# ---------------------------------------------------------------------------------------------
# wire format


def test_request_roundtrip() -> None:
    raw = warm.encode_request({"CNI_COMMAND": "ADD", "X": "é"}, b'{"a":1}', "/tmp", True, "ovs-underlay-ipam")
    jlen, slen = warm.decode_header(raw[:12])
    req = warm.decode_meta(raw[12:12 + jlen])
    assert req == warm.Request({"CNI_COMMAND": "ADD", "X": "é"}, "/tmp", "ovs-underlay-ipam", True)
    assert req.nfds == 4 and raw[12 + jlen:] == b'{"a":1}' and slen == 7


@pytest.mark.parametrize("head", [b"XXXX" + b"\0" * 8, b"OUW1", b"OUW1" + (2**31).to_bytes(4, "big") + b"\0" * 4])
def test_bad_headers(head: bytes) -> None:
    with pytest.raises(ValueError):
        warm.decode_header(head)


@pytest.mark.parametrize("meta", [{"env": {"A": 1}, "plugin": "ovs-underlay"}, {"env": {}}])
def test_meta_rejects_non_string_env_or_plugin(meta: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        warm.decode_meta(json.dumps(meta).encode())


def test_old_protocol_is_not_ours() -> None:
    with pytest.raises(ValueError):
        warm.decode_header(b"OUW1" + b"\0" * 8)


def test_reply_parses_split_chunks() -> None:
    r = warm.Reply()
    stream = b"R" + b"O" + b"X\x07" + b"E" + (7).to_bytes(4, "big")
    for i in range(len(stream)):
        r.feed(stream[i:i + 1])
    assert r.ready and r.output and r.exit_code == 7 and r.status == 7 and r.final_code() == 7


def test_reply_signal_means_unknown() -> None:
    r = warm.Reply()
    r.feed(b"R" + b"E" + (-9).to_bytes(4, "big", signed=True))
    assert r.done and r.final_code() is None
    with pytest.raises(ValueError):
        warm.Reply().feed(b"?")


@pytest.mark.parametrize("status", [0, warm.NOT_RUN])
def test_reply_exit_status_without_the_workers_report_is_no_result(status: int) -> None:
    r = warm.Reply()
    r.feed(b"R" + b"E" + status.to_bytes(4, "big"))
    assert r.done and r.final_code() is None


def test_reply_declined() -> None:
    r = warm.Reply()
    r.feed(b"RN")
    assert r.done and r.declined and r.final_code() is None


def test_netns_path_keeps_original_when_same_file(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("a")
    b.write_text("b")
    fd = os.open(a, os.O_RDONLY)
    try:
        assert warm_server.netns_path(str(a), fd) == str(a)
        assert warm_server.netns_path(str(b), fd) == f"/proc/{os.getpid()}/fd/{fd}"  # path now names another
        assert warm_server.netns_path(str(tmp_path / "gone"), fd) == f"/proc/{os.getpid()}/fd/{fd}"
    finally:
        os.close(fd)


def test_dispatch_leaves_version_and_disabled_alone(tmp_path: Path) -> None:
    verbs = skel.Verbs(add=lambda a: None, delete=lambda a: None)
    sock = str(tmp_path / "none.sock")
    stdin = io.BytesIO(b"{}")
    assert warm.dispatch(verbs, [], {"CNI_COMMAND": "VERSION", warm.ENV_SOCKET: sock}, stdin, io.StringIO()) is None
    assert warm.dispatch(verbs, [], {"CNI_COMMAND": "ADD", warm.ENV_SOCKET: sock}, stdin, io.StringIO()) is None
    Path(sock).touch()
    assert warm.dispatch(verbs, [], {"CNI_COMMAND": "ADD", warm.ENV_SOCKET: sock, warm.ENV_ENABLE: "0"},
                         stdin, io.StringIO()) is None
    assert stdin.read() == b"{}"  # untouched: the caller runs skel in-process


# ---------------------------------------------------------------------------------------------
# a real fork server with fake verbs


class FakeResult:
    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc

    def to_json(self, version: str) -> dict[str, Any]:
        return {"cniVersion": version, **self.doc}


TEST_PID = os.getpid()


def _record(args: Any, what: str) -> None:
    log = args.env.get("CALL_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"what": what, "pid": os.getpid(), "netns": args.netns,
                                "stdin": args.stdin_data.decode(), "env": args.env.get("MARK", "")}) + "\n")


def _behave(args: Any) -> None:
    """Fake-verb misbehaviour, only inside a warm worker (never in the test process)."""
    how = args.env.get("WORKER_DOES", "")
    if os.getpid() == TEST_PID or not how:
        return
    if how == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "print-die":
        print("partial", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "sleep":
        time.sleep(30)
    if how == "exit0":  # ends without reporting, as a worker that never ran the verb used to
        os._exit(0)


def fake_add(args: Any) -> FakeResult:
    _record(args, "ADD")
    _behave(args)
    if args.env.get("FAIL"):
        raise CniError(Code.TRY_AGAIN_LATER, "fake failure")
    return FakeResult({"ips": [], "pid": os.getpid()})


def fake_del(args: Any) -> None:
    _record(args, "DEL")
    if args.env.get("DEL_FAILS"):
        raise CniError(Code.INTERNAL, "fake DEL failure")
    _behave(args)


VERBS = skel.Verbs(add=fake_add, delete=fake_del, check=fake_del)
PLUGINS = {"ovs-underlay": VERBS}


@contextlib.contextmanager
def server(path: str, before: Callable[[], None] | None = None, **kw: Any) -> Iterator[int]:
    """A real fork server in a child process; `before` runs in that child first (fault injection
    stays inside the server process)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if before is not None:
                before()
            code = warm_server.Server(PLUGINS, path, preimport=(), **kw).run()
        finally:
            os._exit(code)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(path):
            assert time.monotonic() < deadline, "warm server did not start"
            time.sleep(0.01)
        yield pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "run" / "warm.sock")
    with server(path):
        yield path


def env_for(command: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0",
           "CNI_NETNS": "/proc/self/ns/net", "CNI_NETNS_OVERRIDE": "1", "CNI_PATH": "/nonexistent",
           "CALL_LOG": str(tmp_path / "calls.log"), "OVS_UNDERLAY_LOG_FILE": "-",
           "OVS_UNDERLAY_WARM_QUIET": "1"}
    env.update(extra)
    return env


CONF = json.dumps({"cniVersion": "1.1.0", "name": "n", "type": "fake"}).encode()


def run(env: dict[str, str], path: str, tmp_path: Path) -> tuple[int, str, list[dict[str, Any]]]:
    out_path = tmp_path / "stdout"
    with open(out_path, "w+") as out:
        code = warm.run_call(VERBS, env, CONF, out, path)
    calls_file = tmp_path / "calls.log"
    calls = [json.loads(line) for line in calls_file.read_text().splitlines()] if calls_file.exists() else []
    with contextlib.suppress(FileNotFoundError):
        calls_file.unlink()
    return code, out_path.read_text(), calls


def test_socket_is_private(sock: str) -> None:
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(sock)).st_mode) == 0o700


def test_add_runs_in_a_worker_with_env_stdin_and_stdout(sock: str, tmp_path: Path) -> None:
    code, out, calls = run(env_for("ADD", tmp_path, MARK="m1"), sock, tmp_path)
    assert code == 0, out
    doc = json.loads(out)
    assert doc["cniVersion"] == "1.1.0" and doc["pid"] != TEST_PID
    assert [c["what"] for c in calls] == ["ADD"] and calls[0]["pid"] != TEST_PID
    assert calls[0]["env"] == "m1" and json.loads(calls[0]["stdin"])["name"] == "n"
    assert calls[0]["netns"] == "/proc/self/ns/net"  # same namespace: original path kept


def test_error_json_and_exit_code_come_through(sock: str, tmp_path: Path) -> None:
    code, out, calls = run(env_for("ADD", tmp_path, FAIL="1"), sock, tmp_path)
    assert code == 1 and json.loads(out)["code"] == Code.TRY_AGAIN_LATER
    assert len(calls) == 1 and calls[0]["pid"] != TEST_PID


def test_no_server_listening_runs_in_process(tmp_path: Path) -> None:
    path = str(tmp_path / "dead.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)  # exists, but nobody listens: ECONNREFUSED
    try:
        code, out, calls = run(env_for("ADD", tmp_path), path, tmp_path)
    finally:
        s.close()
    assert code == 0 and json.loads(out)["pid"] == TEST_PID
    assert [(c["what"], c["pid"]) for c in calls] == [("ADD", TEST_PID)]


def test_silent_server_times_out_and_never_runs_the_verb(tmp_path: Path) -> None:
    path = str(tmp_path / "silent.sock")
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(path)
    lsock.listen(1)
    try:
        env = env_for("ADD", tmp_path, **{warm.ENV_HANDOFF: "50"})
        t0 = time.monotonic()
        code, _out, calls = run(env, path, tmp_path)
        assert time.monotonic() - t0 < 2
        assert code == 0 and [c["pid"] for c in calls] == [TEST_PID]
        conn, _ = lsock.accept()
        conn.settimeout(2)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        assert b"G" not in data[-1:]  # the client closed without committing
        conn.close()
    finally:
        lsock.close()


def test_busy_server_refuses_and_client_runs_in_process(tmp_path: Path) -> None:
    path = str(tmp_path / "busy.sock")
    with server(path, max_workers=0):
        code, _out, calls = run(env_for("ADD", tmp_path), path, tmp_path)
    assert code == 0 and [c["pid"] for c in calls] == [TEST_PID]


def test_worker_death_during_del_reruns_in_process(sock: str, tmp_path: Path) -> None:
    code, out, calls = run(env_for("DEL", tmp_path, WORKER_DOES="die"), sock, tmp_path)
    assert code == 0 and out == ""
    assert [c["what"] for c in calls] == ["DEL", "DEL"]
    assert calls[0]["pid"] != TEST_PID and calls[1]["pid"] == TEST_PID


def test_worker_death_during_add_cleans_up_then_reruns(sock: str, tmp_path: Path) -> None:
    code, out, calls = run(env_for("ADD", tmp_path, WORKER_DOES="die"), sock, tmp_path)
    assert code == 0 and json.loads(out)["pid"] == TEST_PID  # exactly one document
    assert [(c["what"], c["pid"] == TEST_PID) for c in calls] == [("ADD", False), ("DEL", True), ("ADD", True)]


def test_worker_death_during_add_with_failing_cleanup_is_code_11(sock: str, tmp_path: Path) -> None:
    code, out, calls = run(env_for("ADD", tmp_path, WORKER_DOES="die", DEL_FAILS="1"), sock, tmp_path)
    doc = json.loads(out)
    assert code == 1 and doc["code"] == Code.TRY_AGAIN_LATER and "died" in doc["msg"]
    assert [c["what"] for c in calls] == ["ADD", "DEL"]


def test_worker_death_after_output_is_not_rerun(sock: str, tmp_path: Path) -> None:
    code, out, calls = run(env_for("ADD", tmp_path, WORKER_DOES="print-die"), sock, tmp_path)
    assert code == 1 and out == "partial\n"
    assert len(calls) == 1 and calls[0]["pid"] != TEST_PID


def test_caller_hangup_kills_the_worker(sock: str, tmp_path: Path) -> None:
    env = env_for("DEL", tmp_path, WORKER_DOES="sleep")
    out = open(tmp_path / "o", "w")  # noqa: SIM115
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    s.sendall(warm.encode_request(env, CONF, "/", False))
    assert s.recv(1) == b"R"
    mnt = os.open("/proc/self/ns/mnt", os.O_RDONLY)
    socket.send_fds(s, [b"G"], [out.fileno(), out.fileno(), mnt])
    os.close(mnt)
    deadline = time.monotonic() + 5
    while not (tmp_path / "calls.log").exists():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    worker = json.loads((tmp_path / "calls.log").read_text())["pid"]
    s.close()  # the runtime killed the plugin
    out.close()
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{worker}"):
        assert time.monotonic() < deadline, "worker still alive after the caller hung up"
        time.sleep(0.02)


def test_server_stops_on_sigterm_and_removes_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    with server(path) as pid:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while os.path.exists(path):
            assert time.monotonic() < deadline
            time.sleep(0.01)


def test_second_server_refuses_a_live_socket(sock: str) -> None:
    assert warm_server.Server(PLUGINS, sock, preimport=()).run() == 1
    assert os.path.exists(sock)


# ---------------------------------------------------------------------------------------------
# issue 11: review defects


def test_worker_that_ends_without_its_report_is_never_success(sock: str, tmp_path: Path) -> None:
    """A worker that exits 0 without the verb's own report ("X") did not prove that ADD ran:
    the call is treated as a worker death (clean up, re-run), never as success with no result."""
    code, out, calls = run(env_for("ADD", tmp_path, WORKER_DOES="exit0"), sock, tmp_path)
    assert code == 0 and json.loads(out)["pid"] == TEST_PID
    assert [(c["what"], c["pid"] == TEST_PID) for c in calls] == [("ADD", False), ("DEL", True), ("ADD", True)]


def test_recover_variable_from_the_environment_is_ignored(tmp_path: Path) -> None:
    """OVS_UNDERLAY_WARM_RECOVER in a runtime's or user's environment must not decide the
    outcome (it used to make ADD exit 0 with no result): the verb runs."""
    env = env_for("ADD", tmp_path, OVS_UNDERLAY_WARM_RECOVER="0:0",
                  **{warm.ENV_SOCKET: str(tmp_path / "none.sock")})
    out = io.StringIO()
    code = warm.dispatch(VERBS, [], env, io.BytesIO(CONF), out)
    if code is None:  # not handled by the warm path: the entry point runs skel in-process
        code = skel.main(VERBS, env=env, stdin=io.BytesIO(CONF), stdout=out)
    assert code == 0 and json.loads(out.getvalue())["pid"] == TEST_PID


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _serve_briefly(path: str) -> int:
    """Run a server on `path` until it listens, stop it; its exit code (1 = refused to start)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = warm_server.Server(PLUGINS, path, preimport=()).run()
        finally:
            os._exit(code)
    deadline = time.monotonic() + 10
    while not _is_socket(path) and time.monotonic() < deadline:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(raw)
        time.sleep(0.01)
    os.kill(pid, signal.SIGTERM)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_existing_socket_directory_is_never_chmodded(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    assert _serve_briefly(str(shared / "x.sock")) == 0
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o755  # `--socket /tmp/x.sock` left /tmp alone


def test_sticky_shared_directory_is_used_as_it_is(tmp_path: Path) -> None:
    tmp_like = tmp_path / "tmp"
    tmp_like.mkdir()
    tmp_like.chmod(0o1777)
    assert _serve_briefly(str(tmp_like / "x.sock")) == 0
    assert stat.S_IMODE(os.stat(tmp_like).st_mode) == 0o1777


def test_writable_socket_directory_without_sticky_bit_is_refused(tmp_path: Path) -> None:
    """Anyone could replace the socket there and receive the runtime's calls: refuse, change nothing."""
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    assert _serve_briefly(str(open_dir / "x.sock")) == 1
    assert stat.S_IMODE(os.stat(open_dir).st_mode) == 0o777 and not (open_dir / "x.sock").exists()


def test_missing_socket_directory_is_created_private(tmp_path: Path) -> None:
    path = tmp_path / "new" / "run" / "x.sock"
    assert _serve_briefly(str(path)) == 0
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700


def _fail_once(name: str) -> Callable[[], None]:
    def patch() -> None:  # runs inside the server process only
        real = getattr(os, name)
        state = {"failed": False}

        def failing(*a: Any) -> Any:
            if not state["failed"]:
                state["failed"] = True
                raise OSError(11 if name == "fork" else 24, f"injected {name} failure")
            return real(*a)

        setattr(os, name, failing)

    return patch


@pytest.mark.parametrize("name", ["fork", "pidfd_open"])
def test_fork_or_pidfd_failure_answers_the_call_and_keeps_serving(tmp_path: Path, name: str) -> None:
    path = str(tmp_path / "run" / "warm.sock")
    with server(path, before=_fail_once(name)) as pid:
        code, out, calls = run(env_for("ADD", tmp_path), path, tmp_path)
        assert code == 0 and json.loads(out)["pid"] == TEST_PID  # that call ran in-process
        assert [c["pid"] for c in calls][-1] == TEST_PID
        code, out, calls = run(env_for("ADD", tmp_path), path, tmp_path)
        assert code == 0 and json.loads(out)["pid"] != TEST_PID  # and the server still serves
        assert os.waitpid(pid, os.WNOHANG) == (0, 0)


def test_a_file_that_is_not_a_socket_is_never_removed(tmp_path: Path) -> None:
    victim = tmp_path / "run" / "important.conf"
    victim.parent.mkdir()
    victim.write_text("keep me")
    assert _serve_briefly(str(victim)) == 1  # refused, not "a stale socket"
    assert victim.read_text() == "keep me"
