"""scripts/step.sh: one line per set-up step, the output in a log, the output shown on failure."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

STEP = Path(__file__).resolve().parents[2] / "scripts" / "step.sh"


def step(tmp: Path, *cmd: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k not in ("V", "STEP_TAIL")}
    full.update(STEP_LOG=str(tmp / "logs" / "setup.log"), **env)
    return subprocess.run([str(STEP), "the label", *cmd], env=full, capture_output=True, text=True, timeout=30)


def test_success_prints_one_line_and_logs_the_output(tmp_path: Path) -> None:
    res = step(tmp_path, "sh", "-c", "echo noisy apt output; echo more noise >&2")
    assert res.returncode == 0
    assert res.stderr == "" and res.stdout.startswith("==> the label ... ok (") and res.stdout.count("\n") == 1
    log = (tmp_path / "logs" / "setup.log").read_text()
    assert "the label" in log and "noisy apt output" in log and "more noise" in log


def test_failure_shows_the_end_of_this_steps_output_and_keeps_the_exit_code(tmp_path: Path) -> None:
    step(tmp_path, "echo", "an earlier step")
    res = step(tmp_path, "sh", "-c", "for i in $(seq 1 100); do echo line $i; done; echo 'E: no such package' >&2; exit 7")
    assert res.returncode == 7
    assert "FAILED (exit 7" in res.stdout
    assert "E: no such package" in res.stderr and "line 100" in res.stderr
    assert "line 50" not in res.stderr and "an earlier step" not in res.stderr  # last 40 lines of this step
    everything = step(tmp_path, "sh", "-c", "seq 1 100; exit 1", STEP_TAIL="all")
    assert "\n1\n" in everything.stderr and "\n100\n" in everything.stderr


def test_verbose_shows_everything(tmp_path: Path) -> None:
    res = step(tmp_path, "echo", "visible", V="1")
    assert res.returncode == 0 and "visible" in res.stdout
    assert not (tmp_path / "logs" / "setup.log").exists()
