"""A person running the binaries by hand gets help, not a protocol error; runtimes are unaffected."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(module: str, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    e.update(env or {}, OVS_UNDERLAY_LOG_FILE="/dev/null", OVS_UNDERLAY_WARM="0")
    return subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True,
                          env=e, cwd=ROOT, input="", timeout=30)


@pytest.mark.parametrize("module,prog", [("cni", "ovs-underlay"), ("cni.ipam_main", "ovs-underlay-ipam")])
def test_help_version_and_about(module: str, prog: str) -> None:
    h = run(module, "--help")
    assert h.returncode == 0 and h.stdout.startswith(f"usage: {prog}") and "CNI_IFNAME" in h.stdout
    assert ("--warm-server" in h.stdout) == (module == "cni")
    v = run(module, "--version")
    assert v.returncode == 0 and v.stdout.startswith(f"{prog} ") and "1.1.0" in v.stdout
    # No CNI_COMMAND: the about line on stderr, nothing on stdout (Go skel behaviour).
    a = run(module)
    assert a.returncode == 0 and a.stdout == "" and "CNI protocol versions supported" in a.stderr
    bad = run(module, "--frobnicate")
    assert bad.returncode == 2 and "unknown argument" in bad.stderr and bad.stdout == ""


def test_runtime_calls_are_unaffected() -> None:
    out = run("cni", env={"CNI_COMMAND": "VERSION"})
    assert out.returncode == 0 and json.loads(out.stdout)["supportedVersions"][-1] == "1.1.0"
    bad = run("cni", env={"CNI_COMMAND": "FROB"})
    assert bad.returncode == 1 and json.loads(bad.stdout)["code"] == 4


def test_warm_server_flag_is_not_mistaken_for_a_human_call() -> None:
    from cni.__main__ import VERBS
    from cni.usage import handle

    # No CNI_COMMAND in server mode: it must reach cni.warm, not print the about text.
    assert handle(VERBS, "ovs-underlay", ["--warm-server", "--socket", "/x"], {}, warm=True) is None
    assert handle(VERBS, "ovs-underlay-ipam", ["--warm-server"], {}) == 2
