"""Micro-batching on real workers: one function call per batch, one result per item under
its own task id, nothing lost when the worker is killed mid-batch, CRITICAL items not kept
waiting for a batch to fill; batch jobs with progress; cached results."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import requests
from celery import chain, chord

from taskmesh import Priority, batch_status, submit_batch
from taskmesh.observe.metrics import TaskmeshCollector
from taskmesh.observe.status import collect_status
from taskmesh.state import dead_letters
from taskmesh.state.batches import job as job_record
from taskmesh.state.keys import COUNTERS, INFLIGHT, LEDGER_PREFIX, UNACKED
from taskmesh.worker.controller import RECONCILE_AFTER_S

from .conftest import ROOT, bind, queue_depth, wait_for_workers, wait_until
from .test_flower import LOGIN, start_flower
from .test_status import frame_text

APP = "tests.apps.batch_app"
HOST = os.uname().nodename
GPU = {"TASKMESH_SIMULATE_GPUS": "1x24GiB"}


@pytest.fixture
def batch_app(broker_url: str):
    from tests.apps import batch_app

    return bind(batch_app, broker_url)


def calls(broker) -> list[list]:
    return [json.loads(c) for c in broker.lrange("test:batch-calls", 0, -1)]



def start_gpu_worker(processes, app, name: str, env: dict[str, str] | None = None):
    node = f"{name}@{HOST}"
    worker = processes.celery_worker(APP, "-Q", "gpu", "-c", "1", "-n", node, env={**GPU, **(env or {})})
    wait_for_workers(app, [node])
    return worker


@pytest.mark.slow
def test_items_sent_one_by_one_run_in_batches_with_each_result_in_its_own_async_result(batch_app, broker,
                                                                                     processes):
    n = 300
    values = [*range(n - 1), -5]  # the last item fails alone: the function returns an exception for it
    results = [batch_app.square.delay(v) for v in values]
    start_gpu_worker(processes, batch_app.app, "batcher")
    later = batch_app.square.apply_async((1000,), countdown=3)
    chained = chain(batch_app.square.s(3), batch_app.square.s()).delay()  # batch items in Celery's canvas
    summed = chord(batch_app.square.s(i) for i in (1, 2, 3))(batch_app.total.s())
    for value, result in zip(values[:-1], results[:-1], strict=True):
        assert result.get(timeout=60) == value * value
    with pytest.raises(Exception, match="negative item -5"):
        results[-1].get(timeout=60)
    assert results[-1].state == "FAILURE"
    wait_until(lambda: results[-1].id in {e["id"] for e in dead_letters.entries(broker)}, "dead-lettered")
    assert later.get(timeout=60) == 1000 * 1000  # a countdown item joins a batch when it comes due
    assert (chained.get(timeout=60), summed.get(timeout=60)) == (81, 14)
    made = calls(broker)
    assert sorted(v for call in made for v in call) == sorted([*values, 1000, 3, 9, 1, 2, 3])  # every item once
    assert max(len(call) for call in made) == 32
    assert len(made) <= math.ceil(n / 32) + 2  # about n/32 calls, not n
    wait_until(lambda: broker.hlen(UNACKED) == 0, "every message acknowledged")
    series = {(m.name, tuple(x.labels.items()), x.name): x.value
              for m in TaskmeshCollector(batch_app.app, broker).collect() for x in m.samples}
    task = (("task", batch_app.square.name),)
    assert series[("taskmesh_batch_size", task, "taskmesh_batch_size_count")] == len(made)
    assert series[("taskmesh_batch_size", task + (("le", "32.0"),), "taskmesh_batch_size_bucket")] == len(made)
    assert series[("taskmesh_batch_size", task + (("le", "16.0"),), "taskmesh_batch_size_bucket")] == sum(
        1 for call in made if len(call) <= 16)
    assert series[("taskmesh_batch_items", task, "taskmesh_batch_items_total")] == n + 6
    assert series[("taskmesh_batch_items_per_second", task, "taskmesh_batch_items_per_second")] > 0
    # the countdown item came due with nothing to join it: its batch waited out batch_wait (2 s) for more
    assert series[("taskmesh_batch_fill_wait_seconds", task, "taskmesh_batch_fill_wait_seconds_total")] >= 2.0
    shown = collect_status(batch_app.app)["batches"][batch_app.square.name]  # status --json, and top's lines
    assert shown["calls"] == len(made) and shown["mean_size"] == round((n + 6) / len(made), 1)
    assert f"{batch_app.square.name}: {len(made)} calls, {shown['mean_size']} items each" in frame_text(
        collect_status(batch_app.app))


@pytest.mark.slow
def test_one_item_retries_alone_and_one_past_max_retries_fails_alone(batch_app, broker, processes):
    start_gpu_worker(processes, batch_app.app, "flaky")
    sent = {x: batch_app.flaky.delay(x) for x in (1, 2, 3, 4, 99)}
    assert sent[2].get(timeout=60) == 20 and sent[4].get(timeout=60) == 40
    assert sent[1].get(timeout=60) == 10 and sent[3].get(timeout=60) == 30  # each ran again, under its own id
    with pytest.raises(ValueError, match="item 99 never works"):  # max_retries=2: three runs, then its error
        sent[99].get(timeout=60)
    ran = [x for call in calls(broker) for x in call]
    assert {x: ran.count(x) for x in sent} == {1: 2, 2: 1, 3: 2, 4: 1, 99: 3}
    assert sent[1].state == "SUCCESS" and sent[99].state == "FAILURE"


def revoked_by_workers(app) -> set[str]:
    return {task_id for ids in (app.control.inspect(timeout=2).revoked() or {}).values() for task_id in ids}


def gpu_reservations(broker) -> dict[str, int]:
    """Reservation id → MiB, over every GPU pool of the ledger."""
    pools = [k for k in broker.scan_iter(LEDGER_PREFIX + "gpu:*") if not k.endswith(b":expiry")]
    return {holder.decode(): int(amount) for pool in pools for holder, amount in broker.hgetall(pool).items()}


def tracked_by_registry(broker) -> set[bytes]:
    """Delivery tags the workers' heartbeats announced (what recovery gives back if they die)."""
    return {tag for key in broker.scan_iter(INFLIGHT + "*") for tag in broker.smembers(key)}


@pytest.mark.slow
def test_a_worker_killed_mid_batch_loses_no_item(batch_app, broker, processes):
    env = {"TASKMESH_RESERVATION_TTL_S": "6", "TASKMESH_DEAD_AFTER_S": "8"}
    values = list(range(20))
    results = [batch_app.gated.delay(v) for v in values]
    doomed = start_gpu_worker(processes, batch_app.app, "doomed", env)
    wait_until(lambda: len(calls(broker)) == 1, "a batch started")  # it blocks until the gate opens
    running = calls(broker)[0]
    assert len(running) == 8
    time.sleep(RECONCILE_AFTER_S + 1.5)  # the controller has reconciled its reservations since
    (holder, amount), = gpu_reservations(broker).items()  # the running batch's, held while it runs
    assert "/batch-" in holder and amount == 1024
    # deterministic: every message the worker holds is known to the registry before the kill
    wait_until(lambda: set(broker.hkeys(UNACKED)) <= tracked_by_registry(broker), "the held messages announced")
    assert broker.hlen(UNACKED) >= 8
    os.killpg(doomed.pid, signal.SIGKILL)
    broker.set(batch_app.GATE, 1)
    start_gpu_worker(processes, batch_app.app, "survivor", env)
    assert [r.get(timeout=90) for r in results] == [v + 1000 for v in values]
    again = [v for call in calls(broker)[1:] for v in call]
    assert sorted(again) == values  # the killed batch's items ran again; every item ran after the kill
    wait_until(lambda: broker.hlen(UNACKED) == 0 and queue_depth(broker, "gpu") == 0, "everything acknowledged")


@pytest.mark.slow
def test_batches_keep_celerys_priorities_revokes_and_time_limits(batch_app, broker, processes):
    start_gpu_worker(processes, batch_app.app, "gpu1")
    low = [batch_app.slow_to_fill.apply_async((f"low{i}",), priority=Priority.LOW) for i in range(3)]
    wait_until(lambda: queue_depth(broker, "gpu") == 0 and broker.hlen(UNACKED) == 3, "the LOW items buffered")
    batch_app.app.control.revoke(low[1].id)
    wait_until(lambda: low[1].id in revoked_by_workers(batch_app.app), "the worker has the revoke")
    # batch_wait is 60 s and batch_size 32: only the CRITICAL item's arrival can start this batch now
    critical = batch_app.slow_to_fill.apply_async(("urgent",), priority=Priority.CRITICAL)
    assert critical.get(timeout=20) == "done urgent"
    assert [low[0].get(timeout=5), low[2].get(timeout=5)] == ["done low0", "done low2"]
    assert low[1].state == "REVOKED"
    assert calls(broker) == [["low0", "low2", "urgent"]]
    slow = [batch_app.too_slow.delay(i) for i in range(4)]  # time_limit=1.5 for the whole batch
    for result in slow:
        with pytest.raises(Exception, match="TimeLimitExceeded"):
            result.get(timeout=30)


def batch_cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "taskmesh", "-A", APP, "batch", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.slow
def test_a_batch_job_reports_progress_and_eta_and_cancel_revokes_what_has_not_started(batch_app, broker,
                                                                                     processes):
    start_gpu_worker(processes, batch_app.app, "jobs")
    job = submit_batch(batch_app.gated, [*range(8), *range(100, 108)])  # two batches of 8, each behind its gate
    wait_until(lambda: len(calls(broker)) == 1, "the first batch started")
    status = batch_status(batch_app.app, job)
    assert (status["total"], status["done"], status["progress"], status["eta_s"]) == (16, 0, 0.0, None)
    broker.set(batch_app.GATE, 1)
    wait_until(lambda: batch_status(batch_app.app, job)["done"] == 8, "the first batch's items done")
    status = batch_status(batch_app.app, job)
    assert status["progress"] == 0.5 and status["running_or_waiting"] == 8 and status["eta_s"] > 0
    assert "8/16 ended (50%)" in batch_cli("status", job)
    assert f"job {job[:8]} {batch_app.gated.name}: 8/16 ended (50%), 0 failed" in frame_text(
        collect_status(batch_app.app))  # taskmesh top shows the newest jobs
    broker.set(f"{batch_app.GATE}:1", 1)
    wait_until(lambda: batch_status(batch_app.app, job)["done"] == 16, "every item done")
    assert batch_status(batch_app.app, job)["progress"] == 1.0

    cancelled = submit_batch(batch_app.gated, range(200, 216))
    wait_until(lambda: len(calls(broker)) == 3, "the cancelled job's first batch started")
    wait_until(lambda: batch_status(batch_app.app, cancelled)["running_or_waiting"] == 16, "started ones stored")
    assert batch_cli("cancel", cancelled).strip() == "revoked 8 item(s) not started"
    _, task_ids = job_record(broker, cancelled)
    wait_until(lambda: set(task_ids[8:]) <= revoked_by_workers(batch_app.app), "the worker has the revokes")
    broker.set(f"{batch_app.GATE}:2", 1)
    wait_until(lambda: batch_status(batch_app.app, cancelled)["progress"] == 1.0, "the cancelled job ended")
    status = batch_status(batch_app.app, cancelled)
    assert (status["done"], status["revoked"], status["cancelled"]) == (8, 8, True)
    assert len(calls(broker)) == 3  # the revoked half never ran


@pytest.mark.slow
def test_a_cache_ttl_task_called_twice_with_the_same_arguments_runs_once(batch_app, broker, processes):
    processes.celery_worker(APP, "-Q", "cpu_intensive", "-c", "1", "-n", f"cache@{HOST}")
    wait_for_workers(batch_app.app, [f"cache@{HOST}"])
    first = batch_app.cached_double.delay(21)
    assert first.get(timeout=30) == 42
    second = batch_app.cached_double.delay(21)
    assert second.id != first.id and second.get(timeout=30) == 42
    assert batch_app.cached_double.delay(5).get(timeout=30) == 10  # other arguments run: the task could run again
    assert [int(r) for r in broker.lrange(batch_app.RUNS, 0, -1)] == [21, 5]
    assert int(broker.hget(COUNTERS, "cache_hits")) == 1


def flower_json(url: str, path: str, method: str = "get", **kwargs):
    response = getattr(requests, method)(f"{url}{path}", auth=LOGIN, timeout=10, **kwargs)
    assert response.status_code == 200, (path, response.status_code, response.text[:200])
    return response.json()


@pytest.mark.slow
def test_flowers_http_api_submits_batch_items_and_reports_each_ones_result(batch_app, broker, processes):
    start_gpu_worker(processes, batch_app.app, "flowerbatch")
    url = start_flower(processes, APP)
    name = batch_app.square.name
    ids = [flower_json(url, f"/api/task/async-apply/{name}", "post", json={"args": [n]})["task-id"] for n in (3, 4)]
    for task_id, expected in zip(ids, (9, 16), strict=True):
        wait_until(lambda: flower_json(url, f"/api/task/result/{task_id}")["state"] == "SUCCESS",  # noqa: B023
                   "the item's result over HTTP")
        assert flower_json(url, f"/api/task/result/{task_id}")["result"] == expected
        # Flower's own task record comes from the worker's events for this item
        wait_until(lambda: flower_json(url, f"/api/task/info/{task_id}").get("state") == "SUCCESS",  # noqa: B023
                   "Flower's record of the item")
        assert flower_json(url, f"/api/task/info/{task_id}")["name"] == name
    assert calls(broker) == [[3, 4]]  # both items in one call
