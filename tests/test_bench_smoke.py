"""``scripts/bench --smoke`` runs every scenario end to end (real Redis, real workers) and
writes the JSON the lead's full runs will write; it asserts nothing about speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from benchmarks import SCENARIOS, tables
from benchmarks.real_gpu import unavailable

from .conftest import ROOT, marked

RESULT_KEYS = {"name", "title", "status", "reason", "params", "metrics", "rows", "targets", "notes", "seconds"}


@pytest.mark.slow
def test_smoke_runs_every_scenario_writes_json_and_leaves_no_process(tmp_path):
    marker = uuid.uuid4().hex
    no_gpu = unavailable()  # why real_gpu must skip here, or None where it must run
    env = {**os.environ, "TASKMESH_PYTHON": sys.executable, "TASKMESH_TEST_MARKER": marker}
    done = subprocess.run([str(ROOT / "scripts" / "bench"), "--smoke", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=280)
    try:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        summary = json.loads((tmp_path / "summary.json").read_text())
        assert summary["smoke"] is True and summary["machine"]["cpus"] >= 1 and summary["machine"]["date"]
        assert set(summary["scenarios"]) == set(SCENARIOS)
        for name, result in summary["scenarios"].items():
            assert set(result) == RESULT_KEYS, name
            assert json.loads((tmp_path / f"{name}.json").read_text()) == result
            assert result["status"] == ("skipped" if name == "real_gpu" and no_gpu else "ok"), (name, result["reason"])
        scenarios = summary["scenarios"]
        if no_gpu:
            assert scenarios["real_gpu"]["reason"] == no_gpu and "GPU" in no_gpu
        else:  # on a GPU machine with torch: admission keeps every task alive
            taskmesh = next(row for row in scenarios["real_gpu"]["rows"] if row["system"] == "taskmesh")
            assert taskmesh["completed"] == taskmesh["tasks"] > 0 and taskmesh["oom"] == 0
        mixed = {row["system"]: row for row in scenarios["mixed"]["rows"]}
        assert set(mixed) == {"taskmesh", "plain_typed_safe", "baseline"}
        assert all(r["makespan_s"] > 0 for r in mixed.values())
        assert scenarios["mixed"]["metrics"]["bound_s"] > 0
        assert {t["metric"] for t in scenarios["mixed"]["targets"]} == {"baseline_over_taskmesh",
                                                                        "taskmesh_over_bound"}
        assert scenarios["fleet"]["metrics"]["ledgers_agree"] is True
        assert all(row["rebalance_runs"] > 0 for row in scenarios["fleet"]["rows"])  # the real policy ran
        assert "[mixed]" in done.stdout and "makespan_s" in done.stdout
        assert marked(marker) == []
    finally:
        for proc in marked(marker):
            proc.kill()


def test_bench_lists_scenarios_and_names_the_fix_for_a_bad_parameter():
    listed = subprocess.run([sys.executable, "-m", "taskmesh", "bench", "--smoke", "--list"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert [line.split(":")[0] for line in listed.stdout.splitlines()] == list(SCENARIOS)
    bad = subprocess.run([sys.executable, "-m", "taskmesh", "bench", "--set", "mixed.gpu_task=3", "--list"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "mixed has no parameter 'gpu_task'" in bad.stderr and "gpu_tasks" in bad.stderr


def test_the_benchmarks_tables_are_generated_from_the_committed_results():
    """BENCHMARKS.md's generated blocks say what benchmarks/results/*.json say (python -m benchmarks.tables)."""
    text = tables.DOC.read_text()
    assert "<!-- generated: one_gpu -->" in text and tables.generated(text) == text
