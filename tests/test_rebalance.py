"""The rebalancer against a real Redis, real workers and a real beat."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time

import pytest

from taskmesh.app.rebalance import rebalance
from taskmesh.state.keys import REBALANCE_RUNS, RUNTIMES
from taskmesh.state.registry import Registry

from .conftest import queue_depth, wait_for_workers

HOST = socket.gethostname()
APP = "tests.apps.gpu_app"
INTERVAL = 1.0


def start_beat(processes, tmp_path, env):
    return processes.start([sys.executable, "-m", "celery", "-A", APP, "beat", "-s", str(tmp_path / "schedule"),
                            "--loglevel", "WARNING"], env)


def active_queues(app, node: str) -> set[str]:
    replies = app.control.inspect(destination=[node], timeout=2).active_queues() or {}
    return {q["name"] for q in replies.get(node, [])}


def wait_until(predicate, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, what
        time.sleep(0.2)
    return time.monotonic() - started


@pytest.mark.slow
def test_mixed_workers_move_to_a_cpu_burst_and_go_back(gpu_app, broker, processes, tmp_path):
    env = {"TASKMESH_SIMULATE_GPUS": "1x24GiB", "TASKMESH_REBALANCE_INTERVAL_S": str(INTERVAL)}
    processes.taskmesh("-A", APP, "worker", "--profile", "all", "--loglevel", "WARNING", env=env)
    mixed = f"mixed@{HOST}"
    wait_for_workers(gpu_app.app, [mixed, f"cpu@{HOST}", f"io@{HOST}", f"gpu0@{HOST}"])
    start_beat(processes, tmp_path, env)
    wait_until(lambda: active_queues(gpu_app.app, mixed) == {"mixed", "gpu"}, 30, "mixed never served gpu")

    burst = [gpu_app.crunch.delay(0.05, label=i) for i in range(200)]
    moved_after = wait_until(lambda: "cpu_intensive" in active_queues(gpu_app.app, mixed), 2 * INTERVAL + 3,
                             "mixed workers did not move to the CPU burst within two intervals")
    assert "gpu" not in active_queues(gpu_app.app, mixed)
    # counted in rebalance runs, not seconds (a loaded machine stretches both): the move is
    # decided by the first or second run that saw the burst
    runs = [json.loads(r) for r in reversed(broker.lrange(REBALANCE_RUNS, 0, -1))]
    saw_burst = [r for r in runs if r.get("depths", {}).get("cpu_intensive", {}).get("waiting")]
    moves = [i for i, r in enumerate(saw_burst) for d in r["decisions"]
             if d["action"] == "move_consumer" and d["target"] == mixed and d.get("queue") == "cpu_intensive"]
    assert moves and moves[0] < 2, f"moved on run {moves[:1]} of those that saw the burst"
    ran = [r.get(timeout=120) for r in burst]
    assert any(r["node"] == mixed for r in ran)  # the mixed worker really did CPU work
    wait_until(lambda: active_queues(gpu_app.app, mixed) == {"mixed", "gpu"}, 5 * INTERVAL + 5,
               "mixed workers did not go back to gpu after the burst")
    assert moved_after < 2 * INTERVAL + 3


@pytest.mark.slow
def test_saturated_gpu_work_with_a_fallback_moves_to_cpu_none_lost_none_twice(gpu_app, broker, processes, tmp_path):
    env = {"TASKMESH_SIMULATE_GPUS": "1x24GiB", "TASKMESH_REBALANCE_INTERVAL_S": str(INTERVAL)}
    processes.taskmesh("-A", APP, "worker", "--profile", "gpu", "--loglevel", "WARNING", env=env)
    processes.taskmesh("-A", APP, "worker", "--profile", "cpu_intensive", "--loglevel", "WARNING", env=env)
    processes.taskmesh("-A", APP, "worker", "--profile", "io", "--loglevel", "WARNING", env=env)
    wait_for_workers(gpu_app.app, [f"gpu0@{HOST}", f"cpu@{HOST}", f"io@{HOST}"])
    blocker = gpu_app.ten_gib.delay(10, label="blocker")
    wait_until(lambda: broker.llen("test:runs") == 1, 20, "the GPU never got busy")
    flexible = [gpu_app.flexible.apply_async((0.05,), {"label": i}, queue="gpu") for i in range(50)]
    assert queue_depth(broker, "gpu") == 50
    start_beat(processes, tmp_path, env)
    ran = [r.get(timeout=120) for r in flexible]
    assert sorted(r["label"] for r in ran) == list(range(50))
    on_cpu = [r for r in ran if r["queue"] == "cpu_intensive"]
    assert len(on_cpu) >= 45 and all(r["fallback_from"] == "gpu" and r["gpu_uuids"] == [] for r in on_cpu)
    runs = [r.decode() for r in broker.lrange("test:runs", 0, -1)]
    assert len(runs) == len(set(runs)) == 51  # blocker + 50: none lost, none run twice
    assert not blocker.ready()
    decisions = [d for run in broker.lrange(REBALANCE_RUNS, 0, -1) for d in json.loads(run)["decisions"]]
    assert any(d["action"] == "reroute" and d["target"] == "cpu_intensive" for d in decisions)


@pytest.mark.slow
def test_pools_grow_under_load_and_never_exceed_the_thread_budget(gpu_app, broker, processes, tmp_path):
    config = tmp_path / "hw.yaml"
    config.write_text("hardware:\n  cpu: {cores: 6, threads: 6}\nqueues:\n  mixed: {concurrency: 3}\n"
                      "rebalance: {mixed_home: none}\n")
    env = {"TASKMESH_HARDWARE": str(config), "TASKMESH_REBALANCE_INTERVAL_S": str(INTERVAL)}
    processes.taskmesh("-A", APP, "worker", "--profile", "all", "--loglevel", "WARNING", env=env)
    wait_for_workers(gpu_app.app, [f"mixed@{HOST}", f"cpu@{HOST}", f"io@{HOST}"])
    registry = Registry(broker)
    wait_until(lambda: {"mixed@" + HOST, "cpu@" + HOST} <= set(registry.states()), 10, "no state announced")
    start_beat(processes, tmp_path, env)
    burst = [gpu_app.blend.delay(0.2, label=i) for i in range(120)]
    sizes_seen = []
    while not all(r.ready() for r in burst):
        states = registry.states()
        sizes_seen.append({node.split("@")[0]: s["pool"]["size"] for node, s in states.items()})
        time.sleep(0.2)
    [r.get(timeout=180) for r in burst]
    assert sizes_seen[0]["mixed"] == 3 and sizes_seen[0]["cpu"] == 3
    assert max(s["mixed"] for s in sizes_seen) > 3  # the busy pool grew
    # every resize is timestamped by the worker that did it: replay them in time order
    states = registry.states()
    changes = sorted((at, node.split("@")[0], size) for node, s in states.items()
                     for at, size in s["pool"]["history"] if node.split("@")[0] in ("mixed", "cpu"))
    assert changes, "no pool was resized"
    current = {"mixed": 3, "cpu": 3}
    for _, group, size in changes:
        current[group] = size
        assert current["mixed"] + current["cpu"] <= 6, changes


def test_two_runs_at_once_one_acts_and_the_other_says_it_did_nothing(gpu_app, broker):
    outcomes: list[dict] = []
    for _ in range(5):
        barrier = threading.Barrier(2)

        def run(barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            outcomes.append(rebalance(gpu_app.app))

        threads = [threading.Thread(target=run) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    acted = [o for o in outcomes if o["acted"]]
    skipped = [o for o in outcomes if not o["acted"]]
    assert skipped and all(o["skipped"] == "another rebalance run holds the lock" for o in skipped)
    assert all(not o["decisions"] for o in skipped)
    for i, a in enumerate(acted):  # runs that acted never overlapped while holding the lock
        for b in acted[i + 1:]:
            assert a["at"] <= b["started_at"] or b["at"] <= a["started_at"]
    recorded = [json.loads(r) for r in broker.lrange(REBALANCE_RUNS, 0, -1)]
    assert len(recorded) == 10 and sum(not r["acted"] for r in recorded) == len(skipped)


def test_expected_work_comes_from_the_learned_run_time_of_each_task_waiting(gpu_app, broker):
    """A queue whose mean is dominated by many fast runs, with slow tasks waiting, is judged
    by the slow ones: what matters is what waits, not what ran."""
    learned = {"q:mixed": (0.1, 100), f"t:{gpu_app.blend.name}": (0.1, 100), f"t:{gpu_app.ten_gib.name}": (20.0, 5)}
    for key, (mean, count) in learned.items():
        broker.hset(RUNTIMES, mapping={f"{key}:sum": mean * count, f"{key}:count": count})
    for _ in range(2):
        gpu_app.blend.delay()
    for _ in range(3):
        gpu_app.ten_gib.apply_async(queue="mixed")
    gpu_app.hopper_only.apply_async(queue="mixed")  # never seen run: counted at the queue's mean
    run = rebalance(gpu_app.app)
    assert run["depths"]["mixed"]["waiting"] == 6
    assert run["depths"]["mixed"]["expected_work_s"] == pytest.approx(6 * (3 * 20.0 + 3 * 0.1) / 6, abs=0.01)
