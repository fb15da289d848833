"""The held line: its head is never overtaken, even when the worker hands its held
messages back to the queue before Redis would deliver them again; and a message held
back for memory counts as waiting for the queue's age, as a user waiting for it would."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from taskmesh.app.rebalance import rebalance
from taskmesh.core.config import QueueConfig
from taskmesh.hardware.simulated import SimulationControl
from taskmesh.state.keys import STATES
from taskmesh.state.queues import QueueDepth, app_queue_depths, queue_depths
from taskmesh.state.registry import Registry

from .conftest import wait_until
from .test_admission import GIB, start_gpus, stats

AGE_S = 4.0



@pytest.mark.slow
def test_the_head_of_the_line_handed_back_at_half_the_visibility_timeout_still_runs_first(
        gpu_app, broker, processes):
    (node,) = start_gpus(processes, gpu_app.app, "1x24GiB", TASKMESH_VISIBILITY_TIMEOUT_S="8")
    memory = SimulationControl(broker)
    memory.use(0, 20 * GIB)
    head = gpu_app.ten_gib.delay(0.1, label="head")
    wait_until(lambda: stats(gpu_app.app, node)["held"] == 1, "the first task was held")
    behind = [gpu_app.ten_gib.delay(0.1, label=f"behind{i}") for i in range(2)]
    wait_until(lambda: stats(gpu_app.app, node)["held"] == 3, "the later tasks wait behind it (none fits)")
    wait_until(lambda: stats(gpu_app.app, node)["counters"].get("requeued"), "the line was handed back", 30)
    wait_until(lambda: stats(gpu_app.app, node)["held"] == 3, "the line is held again")
    memory.use(0, 0)
    for result in [head, *behind]:
        result.get(timeout=60)
    runs = [r.decode() for r in broker.lrange(gpu_app.RUNS, 0, -1)]
    assert runs == [head.id] + [r.id for r in behind]


@pytest.mark.slow
def test_a_task_held_for_memory_counts_for_the_queue_age_and_raises_the_age_alert(
        gpu_app, broker, processes, monkeypatch):
    (node,) = start_gpus(processes, gpu_app.app, "1x24GiB")
    SimulationControl(broker).use(0, 20 * GIB)
    sent = time.time()
    gpu_app.ten_gib.delay(0.1, label="held")
    wait_until(lambda: stats(gpu_app.app, node)["held"] == 1, "the task was held")
    time.sleep(AGE_S)
    wait_until(lambda: (app_queue_depths(gpu_app.app)["gpu"].oldest_age_s or 0) >= AGE_S, "the held task's age shows")
    depth = app_queue_depths(gpu_app.app)["gpu"]
    assert (depth.waiting, depth.in_flight) == (0, 1)  # nothing in the queue's lists: it is the held one
    assert depth.oldest_age_s <= time.time() - sent
    config = gpu_app.app.taskmesh_config
    monkeypatch.setattr(gpu_app.app, "taskmesh_config", dataclasses.replace(
        config, queues={**config.queues, "gpu": QueueConfig(alert_age_s=AGE_S / 2)}))
    run = rebalance(gpu_app.app)
    assert any(d["action"] == "alert" and d.get("kind") == "age" and d.get("queue") == "gpu"
               for d in run["decisions"]), run["decisions"]


def test_only_live_workers_held_messages_count_for_the_age(broker):
    """A dead worker's last state still names what it held; those messages go back to the
    queue (and are counted there), so its stale stamp must not keep an age alert up."""
    now = time.time()
    broker.hset(STATES, "live@host", json.dumps({"updated": now - 1, "held_since": {"gpu": now - 100}}))
    broker.hset(STATES, "dead@host", json.dumps({"updated": now - 60, "held_since": {"gpu": now - 1000}}))
    held = Registry(broker, alive_s=15).held_since(now)
    assert held == {"gpu": now - 100}
    assert queue_depths(broker, ["gpu", "cpu_intensive"], held_since=held, now=now) == {
        "gpu": QueueDepth("gpu", 0, 0, 100.0, {0: 0, 3: 0, 6: 0, 9: 0}),
        "cpu_intensive": QueueDepth("cpu_intensive", 0, 0, None, {0: 0, 3: 0, 6: 0, 9: 0}),
    }
