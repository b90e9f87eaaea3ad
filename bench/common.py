"""Shared bench helpers: statistics, machine info, running a plugin exec with its rusage.

Why here: every row is measured the same way (wall clock around one exec, rusage of that exec
and its children from os.wait4), so rows stay comparable within one run.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed import netbed  # the network test bed the tests use too

ROOT = Path(__file__).resolve().parent.parent
__all__ = ["netbed"]


# The bundle under test; OU_BENCH_DIST measures another build (e.g. main's, for a before/after).
DIST = Path(os.environ.get("OU_BENCH_DIST") or ROOT / "dist" / "ovs-underlay")
FROZEN = DIST / "ovs-underlay"
REF_DIR = "/usr/lib/cni"


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


def summary(ms: list[float]) -> dict[str, float]:
    return {
        "n": len(ms),
        "min": min(ms, default=float("nan")),
        "p50": pct(ms, 50),
        "p95": pct(ms, 95),
        "p99": pct(ms, 99),
        "max": max(ms, default=float("nan")),
    }


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ovs = subprocess.run(["ovs-vsctl", "--version"], capture_output=True, text=True, check=False).stdout
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "ovs": ovs.splitlines()[0] if ovs else "?",
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
    }


@dataclass
class Exec:
    code: int
    wall_ms: float
    cpu_ms: float  # user+sys of the process and its reaped children
    stdout: str
    stderr: str

    def json(self) -> Any:
        try:
            return json.loads(self.stdout) if self.stdout.strip() else None
        except ValueError:
            return None


def run_exec(argv: list[str], env: dict[str, str], stdin: bytes, timeout: float = 60) -> Exec:
    """Run one plugin exec; wall time from spawn to reap; rusage via os.wait4."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=err, env=env)
        assert p.stdin is not None
        try:
            p.stdin.write(stdin)
            p.stdin.close()
        except BrokenPipeError:
            pass
        killer = threading.Timer(timeout, p.kill)
        killer.start()
        try:
            _, status, ru = os.wait4(p.pid, 0)
        finally:
            killer.cancel()
        wall = (time.perf_counter() - t0) * 1000
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Exec(
            p.returncode,
            wall,
            (ru.ru_utime + ru.ru_stime) * 1000,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
        )


def children_cpu_ms(pid: int) -> float:
    """cutime+cstime of a process (CPU of its reaped children, e.g. the warm server's workers)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[13]) + int(fields[14])) * 1000 / tick


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0
