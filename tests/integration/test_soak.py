"""The soak's one-minute version (bench/soak.py; `make soak` runs 10,000 calls): ADD/DEL churn
through the frozen plugin at concurrency 8 on a node of its own, with every fault at least once
(kill -9 of a plugin call, of the warm server and of ipamd, an OVS restart, a full state dir) and
ipamd's reconciler running beside it; then one reconcile, and the books must balance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.soak import FAULTS, SoakConfig, run_soak


@pytest.mark.timeout(300)
def test_one_minute_of_churn_with_faults_balances(bundle: Path, tmp_path: Path) -> None:
    doc = run_soak(SoakConfig.quick(duration_s=60, seed=11), tmp_path / "soak")
    brief = json.dumps({k: doc[k] for k in ("outcomes", "faults", "leaks", "duplicates", "lost_leases",
                                            "failed_without_error_json", "faults_failed", "harness_errors")},
                       default=str)[:6000]
    assert doc["duplicates"] == [], brief
    assert doc["lost_leases"] == [], brief
    assert doc["failed_without_error_json_count"] == 0, brief
    assert doc["tracebacks"] == 0, brief
    assert doc["leaks"] == {}, brief
    assert doc["faults_failed"] == [] and doc["harness_errors"] == [], brief
    assert set(doc["faults"]) == set(FAULTS), brief  # every kind of fault happened
    # it really churned, checked and reconciled
    assert doc["outcomes"].get("ADD ok", 0) >= 100 and doc["outcomes"].get("DEL ok", 0) >= 100, brief
    assert doc["add_checks"] >= 100 and doc["samples"] >= 20, brief
    assert doc["forgotten_dels"] > 0 and doc["periodic_reconcile_actions"].get("lease done", 0) > 0, brief
    assert doc["balanced"]
