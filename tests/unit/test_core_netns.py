"""core/netns.py: opening a netns path never blocks and never opens a device (issue 11 item 12).

A FIFO as CNI_NETNS hung ADD: open(O_RDONLY) of a FIFO waits for a writer. Every netns path is
now opened by `open_netns` (O_PATH, regular files only, then read-only through /proc/self/fd).
Each call runs in a child process with a deadline, so a regression fails instead of hanging
the suite. No root needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _check(path: str) -> str:
    """check_netns(path) in a child: 'ok' or the NetnsError text; a hang fails the test."""
    code = ("import sys\nfrom core.netns import NetnsError, check_netns\n"
            "try:\n    check_netns(sys.argv[1]); print('ok')\n"
            "except NetnsError as e:\n    print('NetnsError', e.errno, e.strerror)\n")
    res = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=20,
                         cwd=ROOT, check=False)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


@pytest.fixture
def fifo(tmp_path: Path) -> str:
    p = tmp_path / "fifo"
    os.mkfifo(p)
    return str(p)


def test_a_fifo_is_refused_at_once(fifo: str) -> None:
    assert _check(fifo) == f"NetnsError 22 {fifo} is a FIFO, not a namespace file"


@pytest.mark.parametrize(("path", "kind"), [("/dev/null", "a character device"), ("/", "a directory")])
def test_devices_and_directories_are_refused_without_being_opened(path: str, kind: str) -> None:
    assert _check(path) == f"NetnsError 22 {path} is {kind}, not a namespace file"


def test_a_regular_file_is_opened_and_found_not_to_be_a_namespace(tmp_path: Path) -> None:
    f = tmp_path / "plain"
    f.write_text("")
    assert "is not a namespace file" in _check(str(f))


def test_missing_path_and_a_real_netns() -> None:
    assert _check("/nonexistent/netns").startswith("NetnsError 2 ")
    assert _check("/proc/self/ns/net") == "ok"


def test_add_with_a_fifo_as_netns_is_code_8_without_hanging(fifo: str) -> None:
    """Through skel as the runtime calls it, in a child process with a deadline."""
    code = ("import io, json, sys\nfrom cni import skel\n"
            "v = skel.Verbs(add=lambda a: None, delete=lambda a: None)\n"
            "env = {'CNI_COMMAND': 'ADD', 'CNI_CONTAINERID': 'c1', 'CNI_IFNAME': 'eth0', 'CNI_NETNS': sys.argv[1],"
            " 'OVS_UNDERLAY_LOG_FILE': '-'}\n"
            "out = io.StringIO()\n"
            "rc = skel.main(v, env=env, stdin=io.BytesIO(b'{\"cniVersion\":\"1.1.0\",\"name\":\"n\",\"type\":\"x\"}'),"
            " stdout=out, stderr=io.StringIO())\n"
            "print(rc, out.getvalue().strip())\n")
    res = subprocess.run([sys.executable, "-c", code, fifo], capture_output=True, text=True, timeout=20,
                         cwd=ROOT, check=False)
    rc, _, doc = res.stdout.strip().partition(" ")
    assert rc == "1" and json.loads(doc)["code"] == 8 and "FIFO" in json.loads(doc)["msg"], res
