"""Routing against a real Redis: each profile lands on its queue, with its requirement
in the headers; ``apply_async(queue=...)`` still wins; priorities run in order."""

from __future__ import annotations

import json
import time

import pytest

from taskmesh import Priority

from .conftest import queue_depth, wait_for_workers


def queued_messages(broker, queue):
    keys = [queue] + [f"{queue}\x06\x16{p}" for p in (3, 6, 9)]
    return [json.loads(raw) for key in keys for raw in broker.lrange(key, 0, -1)]


def test_each_profile_lands_on_its_queue_before_any_worker_runs(e2e, broker):
    e2e.on_gpu.delay()
    e2e.on_cpu.delay()
    e2e.on_cpu.delay()
    e2e.on_io.delay()
    e2e.on_mixed.delay()
    e2e.undeclared.delay()
    depths = {q: queue_depth(broker, q) for q in ("gpu", "cpu_intensive", "cpu_light", "mixed")}
    assert depths == {"gpu": 1, "cpu_intensive": 2, "cpu_light": 2, "mixed": 1}
    (gpu_message,) = queued_messages(broker, "gpu")
    assert gpu_message["headers"]["taskmesh"] == {"profile": "gpu", "vram_mib": 4096, "gpus": 1}
    assert gpu_message["headers"]["taskmesh_enqueued_at"] == pytest.approx(time.time(), abs=30)
    assert gpu_message["properties"]["priority"] == Priority.NORMAL


def test_apply_async_queue_overrides_the_router_and_keeps_caller_headers(e2e, broker):
    e2e.on_io.apply_async(queue="cpu_intensive", headers={"trace": "abc"})
    assert queue_depth(broker, "cpu_light") == 0
    (message,) = queued_messages(broker, "cpu_intensive")
    assert message["headers"]["trace"] == "abc"
    assert message["headers"]["taskmesh"]["profile"] == "cpu_light"


def test_priority_names_and_urgency_reach_the_redis_priority_lists(e2e, broker):
    e2e.on_cpu.apply_async(priority=Priority.CRITICAL)
    e2e.on_cpu.apply_async(priority="low")
    e2e.on_cpu.apply_async(urgency=4)
    e2e.on_cpu.apply_async()
    assert broker.llen("cpu_intensive") == 1  # CRITICAL (0)
    assert broker.llen("cpu_intensive\x06\x163") == 1  # urgency 4 → HIGH
    assert broker.llen("cpu_intensive\x06\x166") == 1  # default NORMAL
    assert broker.llen("cpu_intensive\x06\x169") == 1  # LOW


def test_a_declared_priority_is_the_default_and_the_caller_can_override_it(broker_url, broker):
    from taskmesh import create_app

    app = create_app("declared-priority", broker=broker_url)

    @app.task(name="dp.urgent", urgency=5, shared=False)
    def urgent():
        return None

    urgent.delay()
    urgent.apply_async(priority=Priority.LOW)
    assert broker.llen("cpu_light") == 1 and broker.llen("cpu_light\x06\x169") == 1


def test_a_user_router_runs_once_per_send_so_a_round_robin_router_lands_where_it_said(broker_url, broker):
    """A router with state (round robin over two queues) must be asked once per send: asked
    twice, the submit checks judged one queue and the message went to the other."""
    from taskmesh import create_app

    asked = []

    def round_robin(name, args, kwargs, options, task=None, **kw):
        if name != "rr.embed":
            return None
        asked.append(name)
        return {"queue": ("embed_a", "embed_b")[len(asked) % 2]}

    app = create_app("round-robin", broker=broker_url)
    app.conf.task_routes = (round_robin,)

    @app.task(name="rr.embed", profile="cpu_light", shared=False)
    def embed():
        return None

    for _ in range(4):
        embed.delay()
    assert len(asked) == 4
    assert queue_depth(broker, "embed_a") == 2 and queue_depth(broker, "embed_b") == 2
    assert queued_messages(broker, "embed_a")[0]["headers"]["taskmesh"]["profile"] == "cpu_light"


def test_critical_tasks_queued_after_low_ones_run_first(e2e, broker, processes):
    results = [e2e.on_cpu.apply_async(kwargs={"label": f"low-{i}"}, priority=Priority.LOW) for i in range(10)]
    results += [e2e.on_cpu.apply_async(kwargs={"label": f"crit-{i}"}, priority=Priority.CRITICAL) for i in range(10)]
    assert queue_depth(broker, "cpu_intensive") == 20
    processes.celery_worker("tests.apps.e2e_app", "-Q", "cpu_intensive", "-P", "prefork", "-c", "1",
                            "-n", "prio@%h")
    finished = [r.get(timeout=60) for r in results]
    order = [f["label"] for f in sorted(finished, key=lambda f: f["at"])]
    assert all(label.startswith("crit-") for label in order[:10]), order
    assert all(label.startswith("low-") for label in order[10:]), order


def test_plain_celery_worker_still_consumes_a_typed_queue(e2e, processes):
    processes.celery_worker("tests.apps.e2e_app", "-Q", "cpu_intensive", "-P", "prefork", "-c", "1",
                            "-n", "plain@%h")
    where = e2e.on_cpu.delay(label="plain").get(timeout=60)
    assert where["queue"] == "cpu_intensive" and where["pool"] == "prefork" and where["node"].startswith("plain@")
    wait_for_workers(e2e.app, [where["node"]])
