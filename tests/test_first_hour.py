"""A new user's first hour: the mistakes they make get one line and exit 2, ``doctor``
says which declared task this machine cannot run, and ``status`` reads whole when piped."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from taskmesh import create_app
from taskmesh.core.records import GpuRecord, WorkerRecord
from taskmesh.observe.status import collect_status
from taskmesh.state.keys import REBALANCE_RUNS
from taskmesh.state.registry import Registry

from .conftest import ROOT

TASKS = '''
from taskmesh import create_app

app = create_app("myapp")

@app.task(profile="cpu_intensive", cpu_threads=4096, memory="2GiB", time_limit=60)
def lemmatize(text): ...

@app.task(profile="gpu", vram="6GiB", time_limit=60)
def transcribe(path): ...

@app.task(profile="io")
def fetch(word): ...
'''


def taskmesh(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "taskmesh", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=120)


def user_project(tmp_path: Path, **modules: str) -> Path:
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    for name, text in modules.items():
        (tmp_path / "myapp" / f"{name}.py").write_text(text)
    return tmp_path


def test_a_wrong_or_broken_app_module_is_one_line_naming_the_fix_and_exit_2(tmp_path: Path) -> None:
    project = user_project(tmp_path, tasks=TASKS, broken="from taskmesh import create_app\napp = create_app('b')\n"
                                            "raise RuntimeError('no settings')\n",
                           needs="import a_package_nobody_installed\n")
    cases = {
        "myapp.taks": "no module named 'myapp.taks'",
        "nosuch": "no module named 'nosuch'",
        "myapp.broken": "importing it raised RuntimeError: no settings at",
        "myapp.needs": "it imports 'a_package_nobody_installed', which is not installed",
    }
    for module, says in cases.items():
        done = taskmesh(project, "-A", module, "doctor")
        assert done.returncode == 2, (module, done.stderr)
        assert done.stderr.count("\n") == 1 and says in done.stderr and "Traceback" not in done.stderr, done.stderr
    typo = taskmesh(project, "-A", "myapp.tasks", "doctor", env={"TASKMESH_DEFAULT_PROFILE": "gpuu"})
    assert typo.returncode == 2 and typo.stderr.count("\n") == 1 and "TASKMESH_DEFAULT_PROFILE" in typo.stderr


def test_doctor_checks_every_declared_task_against_this_machine(tmp_path: Path) -> None:
    project = user_project(tmp_path, tasks=TASKS)
    done = taskmesh(project, "-A", "myapp.tasks", "doctor", env={"TASKMESH_SIMULATE_GPUS": ""})
    assert done.returncode == 0, done.stderr
    lines = {line.split(" →")[0]: line for line in done.stdout.splitlines() if line.startswith("task ")}
    assert "cannot run on this machine: asked for cpu_threads=4096" in lines["task myapp.tasks.lemmatize"]
    assert "cannot run on this machine: it needs a GPU and none is visible here" in lines["task myapp.tasks.transcribe"]
    assert lines["task myapp.tasks.fetch"].endswith("fits this machine")
    assert "None" not in done.stdout
    with_gpu = taskmesh(project, "-A", "myapp.tasks", "doctor", env={"TASKMESH_SIMULATE_GPUS": "1x24GiB"})
    assert "transcribe → gpu" in with_gpu.stdout and [
        line for line in with_gpu.stdout.splitlines() if "transcribe" in line and line.endswith("fits this machine")]


def test_status_piped_keeps_whole_lines(broker_url: str, broker) -> None:
    node = "gpu0@a-rather-long-host-name-of-a-gpu-node.example.internal"
    gpu = GpuRecord("GPU-1", 0, "Simulated GPU", 24576, (8, 9))
    state = {"paused": False, "reasons": {}, "held": 0, "running": 0,
             "gpus": [{"index": 0, "uuid": "GPU-1", "name": "Simulated GPU", "memory_total_mib": 24576,
                       "memory_reserved_mib": 0, "healthy": True, "running": []}]}
    Registry(broker).announce(WorkerRecord(node, "1", "box", ("gpu",), (gpu,), 8, 16384), state=state)
    done = subprocess.run([sys.executable, "-m", "taskmesh", "status"], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "TASKMESH_BROKER_URL": broker_url}, timeout=60)
    assert done.returncode == 0, done.stderr
    assert node in done.stdout, done.stdout


def test_a_scaling_hint_for_gpu_does_not_show_a_phantom_group_beside_gpu0(broker_url: str, broker) -> None:
    gpu = GpuRecord("GPU-1", 0, "Simulated GPU", 24576, (8, 9))
    Registry(broker).announce(WorkerRecord("gpu0@box", "1", "box", ("gpu",), (gpu,), 8, 16384),
                              state={"paused": False, "reasons": {}, "held": 0, "running": 0, "gpus": []})
    run = {"at": time.time(), "acted": False, "skipped": None, "depths": {}, "decisions": [],
           "hints": {"gpu": 1, "cpu": 2}}
    broker.lpush(REBALANCE_RUNS, json.dumps(run))
    groups = {g["group"]: g["workers"] for g in collect_status(create_app("hints", broker=broker_url))["groups"]}
    assert groups == {"gpu0": 1, "cpu": 0}  # cpu has no live member: shown, scaled to zero; gpu is gpu0


@pytest.mark.slow
def test_quickstart_runs_a_users_app_from_the_users_own_directory(tmp_path: Path) -> None:
    project = user_project(tmp_path, tasks=TASKS)
    done = subprocess.run([str(ROOT / "scripts" / "quickstart"), "-A", "myapp.tasks", "doctor"], cwd=project,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "task myapp.tasks.fetch → cpu_light" in done.stdout
