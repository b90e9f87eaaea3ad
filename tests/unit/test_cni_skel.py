"""skel dispatch with a dict env and BytesIO: every error path gives CNI error JSON on stdout,
never a traceback, and the right exit code."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from cni import log as cni_log
from cni import skel
from cni.errors import CniError
from cni.types import CmdArgs, Result

CONF = {"cniVersion": "1.1.0", "name": "n1", "type": "ovs-underlay"}
calls: list[CmdArgs] = []


def _add(args: CmdArgs) -> Result:
    calls.append(args)
    return Result(cni_version="1.1.0")


def _boom(args: CmdArgs) -> Result:
    raise RuntimeError("kaboom")


def _cni_err(args: CmdArgs) -> Result:
    raise CniError(101, "pool exhausted", "subnet 10.0.0.0/30")


VERBS = skel.Verbs(add=_add, delete=lambda a: None, check=lambda a: None, status=lambda a: None,
                   gc=lambda a: None)


def run(command: str | None, conf: Any = CONF, verbs: skel.Verbs = VERBS, **env: str) -> tuple[int, Any, str]:
    e = {"CNI_CONTAINERID": "abc", "CNI_IFNAME": "eth0", "CNI_NETNS": "/proc/self/ns/net",
         "CNI_NETNS_OVERRIDE": "1", "CNI_PATH": "/usr/lib/cni", "OVS_UNDERLAY_LOG_FILE": "-"}
    if command is not None:
        e["CNI_COMMAND"] = command
    e.update(env)
    e = {k: v for k, v in e.items() if v != "<unset>"}
    data = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
    out, err = io.StringIO(), io.StringIO()
    rc = skel.main(verbs, env=e, stdin=io.BytesIO(data), stdout=out, stderr=err)
    text = out.getvalue()
    assert "Traceback" not in text
    assert text.count("\n") <= 1
    return rc, json.loads(text) if text.strip() else None, err.getvalue()


def test_version() -> None:
    rc, out, _ = run("VERSION", b"")
    assert rc == 0 and out == {"cniVersion": "1.1.0",
                               "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}


def test_add_writes_result_in_config_version() -> None:
    calls.clear()
    rc, out, _ = run("ADD", {**CONF, "cniVersion": "0.4.0"})
    assert rc == 0 and out == {"cniVersion": "0.4.0", "dns": {}}
    assert calls[0].container_id == "abc" and calls[0].ifname == "eth0" and calls[0].cni_version == "0.4.0"
    assert calls[0].path == ("/usr/lib/cni",) and calls[0].config["name"] == "n1"


@pytest.mark.parametrize("cmd", ["DEL", "CHECK", "STATUS", "GC"])
def test_other_verbs_write_nothing(cmd: str) -> None:
    rc, out, _ = run(cmd)
    assert rc == 0 and out is None


@pytest.mark.parametrize(("command", "conf", "env", "code", "text"), [
    (None, CONF, {}, 4, "CNI_COMMAND"),
    ("FROB", CONF, {}, 4, "CNI_COMMAND"),
    ("ADD", b"{nope", {}, 6, "cannot decode"),
    ("ADD", b"[1]", {}, 6, "not a JSON object"),
    ("ADD", b"\xff\xfe", {}, 6, "cannot decode"),
    ("ADD", {"name": "n"}, {}, 1, "'0.1.0'"),
    ("ADD", {**CONF, "cniVersion": "2.0.0"}, {}, 1, "incompatible"),
    ("ADD", {**CONF, "cniVersion": 1}, {}, 1, "incompatible"),
    ("CHECK", {**CONF, "cniVersion": "0.3.1"}, {}, 1, "does not allow CHECK"),
    ("STATUS", {**CONF, "cniVersion": "1.0.0"}, {}, 1, "does not allow STATUS"),
    ("GC", {**CONF, "cniVersion": "0.4.0"}, {}, 1, "does not allow GC"),
    ("ADD", CONF, {"CNI_CONTAINERID": "<unset>"}, 4, "CNI_CONTAINERID is required"),
    ("ADD", CONF, {"CNI_CONTAINERID": "-x"}, 4, "CNI_CONTAINERID"),
    ("ADD", CONF, {"CNI_CONTAINERID": "a b"}, 4, "CNI_CONTAINERID"),
    ("ADD", CONF, {"CNI_CONTAINERID": "a" * 250}, 4, "longer than 128"),
    ("DEL", CONF, {"CNI_CONTAINERID": "a" * 129}, 4, "longer than 128"),
    ("ADD", CONF, {"CNI_CONTAINERID": "a\nb"}, 4, "CNI_CONTAINERID"),
    ("ADD", CONF, {"CNI_IFNAME": "<unset>"}, 4, "CNI_IFNAME is required"),
    ("ADD", CONF, {"CNI_IFNAME": "a234567890123456"}, 4, "longer than 15"),
    ("ADD", CONF, {"CNI_IFNAME": "eth:0"}, 4, "':'"),
    ("ADD", CONF, {"CNI_IFNAME": "eth 0"}, 4, "whitespace"),
    ("ADD", CONF, {"CNI_IFNAME": ".."}, 4, "'.' or '..'"),
    # issue 11 item 14: IFNAMSIZ counts bytes; the kernel reserves these names; '%' is a template
    ("ADD", CONF, {"CNI_IFNAME": "\u00e9" * 8}, 4, "longer than 15 bytes"),
    ("ADD", CONF, {"CNI_IFNAME": "all"}, 4, "reserved by the kernel"),
    ("ADD", CONF, {"CNI_IFNAME": "default"}, 4, "reserved by the kernel"),
    ("ADD", CONF, {"CNI_IFNAME": "net%d"}, 4, "'%'"),
    ("ADD", CONF, {"CNI_IFNAME": "eth0\x1b"}, 4, "control characters"),
    ("ADD", CONF, {"CNI_CONTAINERID": "abc\n"}, 4, "CNI_CONTAINERID"),
    ("ADD", b"[" * 100_000, {}, 6, "nested too deeply"),
    ("ADD", b'{"cniVersion": "1.1.0", "mtu": ' + b"1" * 5000 + b"}", {}, 6, "4300 digits"),
    ("ADD", b"{" * 100_000, {}, 6, "cannot decode"),
    ("DEL", CONF, {"CNI_IFNAME": "a/b"}, 4, "'/'"),
    ("ADD", CONF, {"CNI_NETNS": "<unset>"}, 4, "CNI_NETNS is required"),
    ("ADD", CONF, {"CNI_NETNS": "run/netns/x"}, 4, "not an absolute path"),
    ("ADD", CONF, {"CNI_NETNS": "/etc/hostname"}, 8, "not a network namespace"),
    ("ADD", CONF, {"CNI_NETNS": "/nonexistent/ns"}, 8, "not a network namespace"),
    ("ADD", CONF, {"CNI_NETNS_OVERRIDE": "<unset>"}, 8, "own network namespace"),
])
def test_error_paths(command: str | None, conf: Any, env: dict[str, str], code: int, text: str) -> None:
    rc, out, _ = run(command, conf, **env)
    assert rc == 1
    assert out["code"] == code and text in out["msg"] + out.get("details", ""), out
    assert set(out) <= {"cniVersion", "code", "msg", "details"}


def test_del_without_netns_and_missing_netns_path_is_fine() -> None:
    assert run("DEL", CNI_NETNS="<unset>")[0] == 0
    assert run("DEL", CNI_NETNS="/run/netns/gone-already")[0] == 0


def test_del_with_a_relative_netns_is_logged_and_cleans_up_by_identity() -> None:
    """DEL never needs the netns (issue 11 item 5): a bad one used to fail with 4 and strand the
    attachment; now the verb runs without it."""
    calls.clear()
    rc, out, err = run("DEL", verbs=skel.Verbs(add=_add, delete=_add), CNI_NETNS="x")
    assert rc == 0 and out is None
    assert calls[-1].netns == "" and "ignoring CNI_NETNS 'x'" in err


def test_verb_cni_error_and_internal_error() -> None:
    verbs = skel.Verbs(add=_cni_err, delete=_boom)
    rc, out, err = run("ADD", {**CONF, "cniVersion": "1.0.0"}, verbs=verbs)
    assert rc == 1 and out == {"cniVersion": "1.0.0", "code": 101, "msg": "pool exhausted",
                               "details": "subnet 10.0.0.0/30"}
    assert "code 101" in err  # and a log line
    rc, out, err = run("DEL", verbs=verbs)
    assert rc == 1 and out["code"] == 999 and "kaboom" in out["msg"]
    assert "Traceback" in err  # traceback goes to the log, never stdout


def test_add_without_result_is_internal_error() -> None:
    rc, out, _ = run("ADD", verbs=skel.Verbs(add=lambda a: None, delete=lambda a: None))
    assert rc == 1 and out["code"] == 999


def test_lazy_verbs_by_name() -> None:
    verbs = skel.Verbs(add=f"{__name__}:_add", delete="json:dumps", check=None)
    calls.clear()
    rc, _, _ = run("ADD", verbs=verbs)
    assert rc == 0 and len(calls) == 1
    assert run("CHECK", verbs=verbs)[0] == 0  # None = nothing to do


@pytest.fixture
def log_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """LOG_DIR (/var/log/ovs-underlay in production) in a temp dir, for this process only."""
    d = tmp_path / "var-log-ovs-underlay"
    monkeypatch.setattr(cni_log, "LOG_DIR", str(d))
    return d


def test_log_line_carries_context(log_dir: Path) -> None:
    run("ADD", {**CONF, "cniVersion": "9"}, OVS_UNDERLAY_LOG_FILE="p.log")
    text = (log_dir / "p.log").read_text()
    assert "container_id=abc" in text and "ifname=eth0" in text and "netns=/proc/self/ns/net" in text
    assert "code 1" in text
    assert oct((log_dir / "p.log").stat().st_mode & 0o777) == "0o640"


def test_the_config_cannot_choose_the_log_file_or_level(log_dir: Path, tmp_path: Path) -> None:
    """Issue 11 item 2: logFile/logLevel came from the network config (a NAD author's), and root
    then created directories and appended anywhere, following symlinks. They are ignored now,
    with a warning; the host's environment decides, inside LOG_DIR."""
    target = tmp_path / "etc" / "cron.d" / "x"
    conf = {**CONF, "logFile": str(target), "logLevel": "debug", "log_file": "/tmp/elsewhere.log"}
    rc, _, err = run("ADD", conf, OVS_UNDERLAY_LOG_FILE="p.log")
    assert rc == 0
    assert not target.parent.exists() and not os.path.exists("/tmp/elsewhere.log")
    text = (log_dir / "p.log").read_text()
    assert "ignoring logFile=" in text and "ignoring logLevel='debug'" in text and "ignoring log_file=" in text
    assert "ignoring logFile=" in err  # a warning: on stderr too
    assert " DEBUG " not in text  # the level stayed the host's (info)


@pytest.mark.parametrize("value", ["/tmp/x.log", "../escape.log", "/var/log/ovs-underlay/../x.log", "a\x00b"])
def test_a_log_file_outside_the_log_dir_is_refused(log_dir: Path, value: str) -> None:
    rc, _, err = run("ADD", OVS_UNDERLAY_LOG_FILE=value)
    assert rc == 0 and "not logging to a file" in err
    assert not os.path.exists("/tmp/x.log") or value != "/tmp/x.log"


def test_symlinks_fifos_and_hard_links_in_the_log_dir_are_refused(log_dir: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    log_dir.mkdir(mode=0o750)
    (log_dir / "link.log").symlink_to(victim)
    os.mkfifo(log_dir / "fifo.log")
    os.link(victim, log_dir / "hard.log")
    (log_dir / "sub").symlink_to(tmp_path)  # a symlinked directory on the way
    for name in ("link.log", "fifo.log", "hard.log", "sub/victim"):
        rc, _, err = run("ADD", OVS_UNDERLAY_LOG_FILE=name)
        assert rc == 0 and "not logging to a file" in err, name
    assert victim.read_text() == "precious\n"


def test_log_lines_cannot_be_forged(log_dir: Path) -> None:
    """Values from the config and the environment are escaped before they reach a line."""
    run("ADD", {**CONF, "cniVersion": "9\n2026-01-01 00:00:00 INFO fake: DEL succeeded"},
        OVS_UNDERLAY_LOG_FILE="p.log", CNI_NETNS="/proc/self/ns/net\x1b[2J")
    lines = (log_dir / "p.log").read_text().splitlines()
    assert lines and all(ln.startswith("20") for ln in lines), lines
    assert not any(ln.startswith("2026-01-01") for ln in lines)
    assert "\\n2026-01-01" in "".join(lines) and "\\x1b[2J" in "".join(lines)


def test_log_level_from_the_environment(log_dir: Path) -> None:
    run("ADD", OVS_UNDERLAY_LOG_FILE="p.log", OVS_UNDERLAY_LOG_LEVEL="warning")
    assert "succeeded" not in (log_dir / "p.log").read_text()
    run("ADD", OVS_UNDERLAY_LOG_FILE="q.log", OVS_UNDERLAY_LOG_LEVEL="debug")
    assert "succeeded" in (log_dir / "q.log").read_text()
