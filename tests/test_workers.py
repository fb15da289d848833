"""Typed worker groups as real processes: sized, pinned, supervised, visible mid-task."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from taskmesh.hardware.simulated import SimulatedProvider

from .conftest import queue_depth, wait_for_workers

HOST = socket.gethostname()
APP = "tests.apps.e2e_app"


@pytest.mark.slow
def test_profile_all_starts_pinned_gpu_groups_prefork_and_gevent(e2e, broker, processes):
    sent = {
        "gpu": e2e.on_gpu.delay(label="early"),
        "cpu_intensive": e2e.on_cpu.delay(),
        "cpu_light": e2e.on_io.delay(),
        "mixed": e2e.on_mixed.delay(),
    }
    assert {q: queue_depth(broker, q) for q in sent} == dict.fromkeys(sent, 1)
    env = {"TASKMESH_SIMULATE_GPUS": "2x24GiB"}
    processes.taskmesh("-A", APP, "worker", "--profile", "all", "--loglevel", "WARNING", env=env)
    nodes = [f"gpu0@{HOST}", f"gpu1@{HOST}", f"cpu@{HOST}", f"io@{HOST}", f"mixed@{HOST}"]
    wait_for_workers(e2e.app, nodes)

    ran = {queue: result.get(timeout=60) for queue, result in sent.items()}
    assert {q: (r["queue"], r["pool"]) for q, r in ran.items()} == {
        "gpu": ("gpu", "prefork"),
        "cpu_intensive": ("cpu_intensive", "prefork"),
        "cpu_light": ("cpu_light", "gevent"),
        "mixed": ("mixed", "prefork"),
    }
    assert ran["cpu_intensive"]["node"] == f"cpu@{HOST}" and ran["cpu_intensive"]["cuda_visible_devices"] == ""
    assert ran["cpu_light"]["node"] == f"io@{HOST}"

    uuids = [g.uuid for g in SimulatedProvider("2x24GiB").snapshot()]
    both = [e2e.on_gpu.delay(1.0, label=i) for i in range(4)]
    placed = {(r["node"], r["cuda_visible_devices"]) for r in (x.get(timeout=60) for x in both)}
    assert placed == {(f"gpu0@{HOST}", uuids[0]), (f"gpu1@{HOST}", uuids[1])}
    # the mixed worker sees every GPU; admission gave this task one of them
    assert ran["mixed"]["cuda_visible_devices"] == ",".join(uuids)
    assert len(ran["mixed"]["gpu_uuids"]) == 1 and ran["mixed"]["gpu_uuids"][0] in uuids

    stats = e2e.app.control.inspect(destination=nodes, timeout=5).stats()
    pools = {node: stats[node]["pool"]["implementation"].rsplit(":", 1)[-1] for node in nodes}
    assert pools[f"gpu0@{HOST}"] == pools[f"gpu1@{HOST}"] == pools[f"cpu@{HOST}"] == "TaskPool"
    assert "gevent" in stats[f"io@{HOST}"]["pool"]["implementation"]
    assert stats[f"io@{HOST}"]["pool"]["max-concurrency"] == 100


def heartbeat_gaps(app, node: str, seconds: float) -> list[float]:
    """Gaps between worker-heartbeat events of *node* over *seconds*, as Flower receives them."""
    beats: list[float] = []

    def on_heartbeat(event):
        if event["hostname"] == node:
            beats.append(time.monotonic())

    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"worker-heartbeat": on_heartbeat})
        deadline = time.monotonic() + seconds
        for _ in receiver.itercapture(limit=None, timeout=seconds, wakeup=False):
            if time.monotonic() > deadline:
                break
    return [b - a for a, b in zip(beats, beats[1:], strict=False)] + ([seconds] if len(beats) < 2 else [])


def start_gpu_worker(processes, e2e, pool: str | None) -> str:
    args = ["-A", APP, "worker", "--profile", "gpu", "--loglevel", "WARNING"]
    if pool:
        args += ["--gpu-pool", pool]
    processes.taskmesh(*args, env={"TASKMESH_SIMULATE_GPUS": "1x24GiB"})
    node = f"gpu0@{HOST}"
    wait_for_workers(e2e.app, [node])
    return node


def wait_until_active(app, node: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        active = (app.control.inspect(destination=[node], timeout=1).active() or {}).get(node)
        if active:
            return
        time.sleep(0.2)
    raise AssertionError(f"{node} never reported an active task")


@pytest.mark.slow
def test_a_gpu_worker_answers_ping_and_stays_alive_during_a_30s_task(e2e, processes):
    node = start_gpu_worker(processes, e2e, pool=None)
    result = e2e.on_gpu.delay(30)
    started = time.monotonic()
    gaps: list[float] = []
    collector = threading.Thread(target=lambda: gaps.extend(heartbeat_gaps(e2e.app, node, 24)))
    collector.start()
    wait_until_active(e2e.app, node)
    answered = []
    while time.monotonic() - started < 26:
        answered.append(bool(e2e.app.control.ping(destination=[node], timeout=2)))
        time.sleep(3)
    collector.join()
    assert len(answered) >= 6 and all(answered), answered
    # Flower counts a worker alive while its last heartbeat is within 2x the 2 s interval.
    assert gaps and max(gaps) < 4.0, gaps
    assert result.get(timeout=60)["pool"] == "prefork"


@pytest.mark.slow
def test_the_solo_pool_goes_silent_during_a_task_which_is_why_it_is_not_the_default(e2e, processes):
    node = start_gpu_worker(processes, e2e, pool="solo")
    result = e2e.on_gpu.delay(8)
    time.sleep(3)
    assert e2e.app.control.ping(destination=[node], timeout=2) == []
    assert result.get(timeout=60)["pool"] == "solo"
    assert e2e.app.control.ping(destination=[node], timeout=2)


@pytest.mark.slow
def test_threads_gpu_pool_also_stays_responsive(e2e, processes):
    node = start_gpu_worker(processes, e2e, pool="threads")
    result = e2e.on_gpu.delay(6)
    wait_until_active(e2e.app, node)
    assert e2e.app.control.ping(destination=[node], timeout=2)
    assert result.get(timeout=60)["pool"] == "threads"


@pytest.mark.slow
def test_a_worker_that_dies_is_restarted_and_reported(e2e, processes):
    supervisor = processes.taskmesh("-A", APP, "worker", "--profile", "cpu_intensive", "--loglevel", "WARNING",
                                    stderr=subprocess.PIPE, text=True)
    node = f"cpu@{HOST}"
    wait_for_workers(e2e.app, [node])
    pid = e2e.app.control.inspect(destination=[node], timeout=5).stats()[node]["pid"]
    os.kill(pid, signal.SIGKILL)
    lines = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any("restarted" in line for line in lines):
        lines.append(supervisor.stderr.readline())
    assert any(re.search(rf"cpu \(pid {pid}\) exited with code -9; restart 1 in 1s", line) for line in lines), lines
    wait_for_workers(e2e.app, [node])
    new_pid = e2e.app.control.inspect(destination=[node], timeout=5).stats()[node]["pid"]
    assert new_pid != pid
    assert e2e.on_cpu.delay(label="after").get(timeout=60)["label"] == "after"
    processes.stop(supervisor)
    assert supervisor.returncode == 0
    assert e2e.app.control.ping(destination=[node], timeout=1) == []


def test_dry_run_prints_the_exact_commands():
    out = subprocess.run(
        [sys.executable, "-m", "taskmesh", "-A", APP, "worker", "--profile", "all", "--dry-run"],
        env={"TASKMESH_SIMULATE_GPUS": "2x24GiB", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    uuids = [g.uuid for g in SimulatedProvider("2x24GiB").snapshot()]
    assert lines[0].startswith(f"CUDA_VISIBLE_DEVICES={uuids[0]} CUDA_DEVICE_ORDER=PCI_BUS_ID ")
    assert f"-Q gpu -P prefork -c 1 -n gpu0@{HOST}" in lines[0]
    assert f"-Q gpu -P prefork -c 1 -n gpu1@{HOST}" in lines[1] and uuids[1] in lines[1]
    assert "-Q cpu_intensive -P prefork" in lines[2]
    assert f"-Q cpu_light -P gevent -c 100 -n io@{HOST}" in lines[3]
    assert "-Q mixed -P prefork" in lines[4] and f"CUDA_VISIBLE_DEVICES={uuids[0]},{uuids[1]}" in lines[4]
    # the prefetch is the app's (worker_prefetch_multiplier, one per slot unless create_app says otherwise)
    assert not [line for line in lines if "--prefetch-multiplier" in line]


def test_celery_entry_point_reaches_taskmesh_commands():
    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", APP, "taskmesh", "worker", "--profile", "gpu", "--dry-run"],
        env={"TASKMESH_SIMULATE_GPUS": "1x24GiB", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr
    assert f"-A {APP} worker -Q gpu -P prefork -c 1 -n gpu0@{HOST}" in out.stdout


def test_no_gpu_means_a_clear_error_for_the_gpu_group():
    out = subprocess.run([sys.executable, "-m", "taskmesh", "-A", APP, "worker", "--profile", "gpu", "--dry-run"],
                         env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert out.returncode == 2
    assert "no GPUs found" in out.stderr and "TASKMESH_SIMULATE_GPUS=1x24GiB" in out.stderr


def test_a_bad_config_stops_the_worker_start_and_loses_nothing_queued(e2e, broker, tmp_path, processes):
    for i in range(5):
        e2e.on_cpu.delay(label=i)
    bad = tmp_path / "bad.yaml"
    bad.write_text("queues:\n  cpu_intensive:\n    pool: [prefork\n")
    proc = processes.taskmesh("--hardware", str(bad), "-A", APP, "worker", "--profile", "cpu_intensive",
                              stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert f"{bad}: malformed YAML at line 4" in err
    assert queue_depth(broker, "cpu_intensive") == 5
