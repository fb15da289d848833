"""``once=True``: a second delivery of a run that finished, or that another live worker is
running, is acknowledged and skipped; a run whose worker died still runs again.

Each case sends the same task id twice, as a producer retry or a restored message would.
The same sequence for a task without ``once`` runs twice, which shows each test could
see a second run.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

import pytest

from taskmesh.core.records import GpuRecord, WorkerRecord
from taskmesh.state.keys import COUNTERS, UNACKED
from taskmesh.state.registry import Registry

from .conftest import bind, queue_depth, wait_for_workers, wait_until

APP = "tests.apps.once_app"


@pytest.fixture
def once_app(broker_url: str):
    from tests.apps import once_app

    return bind(once_app, broker_url)


def runs(broker, task_id: str) -> int:
    return [r.decode() for r in broker.lrange("test:once-runs", 0, -1)].count(task_id)


def settled(broker) -> bool:
    return queue_depth(broker, "cpu_intensive") == 0 and broker.hlen(UNACKED) == 0



def start(processes, app, *names: str, env: dict[str, str] | None = None) -> list:
    workers = [processes.celery_worker(APP, "-Q", "cpu_intensive", "-c", "1", "-n", f"{n}@%h", env=env)
               for n in names]
    wait_for_workers(app, [f"{n}@{os.uname().nodename}" for n in names])
    return workers


@pytest.mark.slow
@pytest.mark.parametrize("task, runs_expected", [("once_job", 1), ("plain_job", 2)])
def test_a_second_delivery_of_a_finished_run_is_skipped(once_app, broker, processes, task, runs_expected):
    start(processes, once_app.app, "solo1")
    job, task_id = getattr(once_app, task), uuid.uuid4().hex
    job.apply_async((0.1,), task_id=task_id).get(timeout=60)
    job.apply_async((0.1,), task_id=task_id)  # the same run, delivered again
    wait_until(lambda: settled(broker) and runs(broker, task_id) >= runs_expected, "the second delivery settled")
    time.sleep(1.0)  # a second run would have started by now: the first took 0.1 s
    assert runs(broker, task_id) == runs_expected
    if task == "once_job":
        wait_until(lambda: int(broker.hget(COUNTERS, "duplicates_skipped") or 0) == 1, "the skip counted")


@pytest.mark.slow
@pytest.mark.parametrize("task, runs_expected", [("once_job", 1), ("plain_job", 2)])
def test_a_duplicate_of_a_run_still_going_waits_for_it_then_is_skipped(once_app, broker, processes, task,
                                                                      runs_expected):
    start(processes, once_app.app, "first", "second")
    job, task_id = getattr(once_app, task), uuid.uuid4().hex
    first = job.apply_async((3.0,), task_id=task_id)
    wait_until(lambda: runs(broker, task_id) == 1, "the first run started")
    job.apply_async((0.1,), task_id=task_id)  # the other worker is free and takes it
    first.get(timeout=60)
    wait_until(lambda: settled(broker), "the duplicate settled")
    time.sleep(1.0)
    assert runs(broker, task_id) == runs_expected


@pytest.mark.slow
def test_a_run_sent_on_to_gpus_that_fit_it_runs_there_at_once_not_after_its_claim_expires(once_app, broker,
                                                                                           processes):
    """A worker whose GPU is too small sends the task on (a need queue) and gives its claim back
    with it: the worker that takes it next runs it, rather than parking it for ``dead_after_s``."""
    env = {"TASKMESH_DEAD_AFTER_S": "600"}  # a claim kept by mistake would outlast the test
    host = os.uname().nodename
    processes.celery_worker(APP, "-Q", "gpu", "-c", "1", "-n", "small@%h",
                            env={**env, "TASKMESH_SIMULATE_GPUS": "1x16GiB"})
    wait_for_workers(once_app.app, [f"small@{host}"])
    seen = WorkerRecord(node=f"large@{host}", incarnation="earlier", host=host, queues=("gpu",), cpu_threads=2,
                        memory_total_mib=8192, gpus=(GpuRecord("GPU-large", 0, "sim", 24576, (8, 9)),))
    Registry(broker).stopped(seen)  # a GPU that fits it was seen today: the send is not refused
    result = once_app.big_gpu_once.apply_async((0.1,), queue="gpu")
    wait_until(lambda: queue_depth(broker, "gpu.20480MiB") == 1, "the small worker sent the task on")
    processes.celery_worker(APP, "-Q", "gpu", "-c", "1", "-n", "large@%h",
                            env={**env, "TASKMESH_SIMULATE_GPUS": "1x24GiB"})
    assert result.get(timeout=90) == result.id
    assert runs(broker, result.id) == 1 and int(broker.hget(COUNTERS, "duplicates_parked") or 0) == 0


@pytest.mark.slow
def test_a_run_whose_worker_died_runs_again_on_another(once_app, broker, processes):
    env = {"TASKMESH_RESERVATION_TTL_S": "6", "TASKMESH_DEAD_AFTER_S": "8"}
    (doomed,) = start(processes, once_app.app, "doomed", env=env)
    result = once_app.once_job.apply_async((8.0,))
    wait_until(lambda: runs(broker, result.id) == 1, "the first run started")
    start(processes, once_app.app, "survivor", env=env)
    time.sleep(2.0)  # the registry is told what a worker holds within a second of it arriving
    os.killpg(doomed.pid, signal.SIGKILL)
    assert result.get(timeout=90) == result.id  # the survivor ran it again, once its claim expired
    assert runs(broker, result.id) == 2


@pytest.mark.slow
@pytest.mark.parametrize("task, runs_expected", [("once_job", 1), ("plain_job", 2)])
def test_a_run_whose_body_returned_is_not_run_again_when_its_worker_dies_before_the_ack(
        once_app, broker, processes, task, runs_expected):
    """Found by the chaos suite's random SIGKILLs (a once=True task ran twice): the body ends in
    the pool child, and the worker's main process is killed before it acknowledges. The main
    process is stopped while the body runs, so the kill lands in that gap every time; the
    message is handed back after dead_after_s and delivered to the survivor. The same for a
    task without once=True runs twice, which shows the redelivery happens."""
    env = {"TASKMESH_RESERVATION_TTL_S": "6", "TASKMESH_DEAD_AFTER_S": "8"}
    (doomed,) = start(processes, once_app.app, "doomed", env=env)
    result = getattr(once_app, task).apply_async((4.0,))
    wait_until(lambda: runs(broker, result.id) == 1, "the first run started")
    time.sleep(1.5)  # the registry is told what a worker holds within a second of it arriving
    os.kill(doomed.pid, signal.SIGSTOP)  # the main process; its pool child runs the body on
    wait_until(lambda: result.state == "SUCCESS", "the body returned and its result was stored")
    os.killpg(doomed.pid, signal.SIGKILL)
    start(processes, once_app.app, "survivor", env=env)
    wait_until(lambda: runs(broker, result.id) >= runs_expected and settled(broker), "the redelivery settled", 90)
    time.sleep(1.0)
    assert runs(broker, result.id) == runs_expected
    if task == "once_job":
        wait_until(lambda: int(broker.hget(COUNTERS, "duplicates_skipped") or 0) == 1, "the second delivery skipped")
