"""Decisions at submit time against a real Redis: QueueFull, InfeasibleRequirement and
fallback, each leaving the broker as it was when it refuses."""

from __future__ import annotations

import logging
import socket
import time

import pytest

from taskmesh import InfeasibleRequirement, QueueFull, create_app
from taskmesh.state.registry import Registry

from .conftest import queue_depth, wait_for_workers

HOST = socket.gethostname()
APP = "tests.apps.gpu_app"


def producer(tmp_path, broker_url, text: str):
    """An app with its own config that sends tasks the gpu_app workers know by name."""
    path = tmp_path / "producer.yaml"
    path.write_text(text)
    return create_app("producer", broker=broker_url, hardware=str(path))


def wait_registered(broker, count: int) -> None:
    deadline = time.monotonic() + 20
    while len(Registry(broker).workers()) < count:
        assert time.monotonic() < deadline, "workers never registered"
        time.sleep(0.1)


def test_queue_full_refuses_and_sends_nothing(tmp_path, broker_url, broker):
    app = producer(tmp_path, broker_url, "queues:\n  cpu_intensive:\n    max_depth: 3\n")

    @app.task(name="tests.apps.gpu_app.crunch", profile="cpu_intensive", shared=False)
    def crunch(seconds=0.5, label=None):
        return None

    for i in range(3):
        crunch.delay(label=i)
    with pytest.raises(QueueFull) as err:
        crunch.delay(label="one too many")
    message = str(err.value)
    assert "queue 'cpu_intensive' has 3 tasks waiting, its max_depth (queues.cpu_intensive.max_depth in" in message
    assert "'tests.apps.gpu_app.crunch' was not sent" in message and "queue_full_wait_s" in message
    assert queue_depth(broker, "cpu_intensive") == 3


@pytest.mark.slow
def test_queue_full_can_wait_for_room_while_workers_drain(tmp_path, broker_url, broker, processes, gpu_app):
    app = producer(tmp_path, broker_url,
                   "queues:\n  cpu_intensive:\n    max_depth: 2\nadmission:\n  queue_full_wait_s: 30\n")

    @app.task(name="tests.apps.gpu_app.crunch", profile="cpu_intensive", shared=False)
    def crunch(seconds=0.5, label=None):
        return None

    sent = [crunch.delay(0.3, label=i) for i in range(2)]
    processes.celery_worker(APP, "-Q", "cpu_intensive", "-c", "1", "-n", f"drain@{HOST}")
    sent += [crunch.delay(0.3, label=i) for i in range(2, 6)]  # each waits until the queue has room
    assert [r.get(timeout=60)["label"] for r in sent] == list(range(6))


@pytest.mark.slow
def test_infeasible_requirements_are_refused_naming_what_exists(gpu_app, broker, processes):
    processes.taskmesh("-A", APP, "worker", "--profile", "gpu", env={"TASKMESH_SIMULATE_GPUS": "1x24GiB,cc=8.9"})
    wait_for_workers(gpu_app.app, [f"gpu0@{HOST}"])
    wait_registered(broker, 1)
    with pytest.raises(InfeasibleRequirement) as err:
        gpu_app.forty_gib.delay()
    assert "'tests.apps.gpu_app.forty_gib' can never run: asked for vram=40GiB" in str(err.value)
    assert "the largest GPU seen has 24GiB" in str(err.value) and "nothing was sent" in str(err.value)
    expected = r"min_compute_capability=9.0.*highest compute capability seen is 8.9"
    with pytest.raises(InfeasibleRequirement, match=expected):
        gpu_app.hopper_only.delay()
    with pytest.raises(InfeasibleRequirement, match=r"gpus=2; the most GPUs one worker sees is 1 \(taskmesh worker"):
        gpu_app.two_gpus.delay()  # `worker --profile gpu` pins one GPU per worker: it would wait forever
    assert queue_depth(broker, "gpu") == 0 and not broker.keys("gpu.*")

    @gpu_app.app.task(name="wide", profile="cpu_intensive", cpu_threads=4096, shared=False)
    def wide():
        return None

    with pytest.raises(InfeasibleRequirement, match=r"cpu_threads=4096; the largest host seen has \d+"):
        wide.delay()
    assert queue_depth(broker, "cpu_intensive") == 0


def test_infeasible_can_be_configured_to_queue_with_a_warning(tmp_path, broker_url, broker, processes, caplog):
    processes.taskmesh("-A", APP, "worker", "--profile", "gpu", env={"TASKMESH_SIMULATE_GPUS": "1x24GiB"})
    wait_registered(broker, 1)
    app = producer(tmp_path, broker_url, "admission:\n  on_infeasible: warn\n")

    @app.task(name="tests.apps.gpu_app.forty_gib", profile="gpu", vram="40GiB", shared=False)
    def forty_gib():
        return None

    with caplog.at_level(logging.WARNING):
        forty_gib.delay()
    assert any("can never run: asked for vram=40GiB" in r.message and "queued anyway" in r.message
               for r in caplog.records)
    # the 24 GiB worker cannot run it either: it hands it to the queue of GPUs that fit, where it waits
    deadline = time.monotonic() + 10
    while queue_depth(broker, "gpu.40960MiB") != 1:
        assert time.monotonic() < deadline, "the message was not handed on"
        time.sleep(0.1)
    assert queue_depth(broker, "gpu") == 0


def test_a_fresh_system_queues_gpu_work_with_a_warning(gpu_app, broker, caplog):
    with caplog.at_level(logging.WARNING):
        gpu_app.forty_gib.delay()
    assert queue_depth(broker, "gpu") == 1
    assert any("no GPU worker has registered yet" in r.message for r in caplog.records)


def test_fallback_goes_to_cpu_when_no_gpu_can_take_it_and_the_task_knows(gpu_app, broker, processes):
    first = gpu_app.flexible.delay(0.1, label="first")  # nothing waits yet: stays on gpu
    assert queue_depth(broker, "gpu") == 1
    rest = [gpu_app.flexible.delay(0.1, label=i) for i in range(5)]
    assert queue_depth(broker, "gpu") == 1 and queue_depth(broker, "cpu_intensive") == 5
    processes.celery_worker(APP, "-Q", "cpu_intensive", "-c", "1", "-n", f"cpu@{HOST}")
    ran = [r.get(timeout=60) for r in rest]
    assert all(r["fallback_from"] == "gpu" and r["gpu_uuids"] == [] and r["queue"] == "cpu_intensive" for r in ran)
    assert not first.ready()


@pytest.mark.slow
def test_no_fallback_while_a_live_gpu_has_room(gpu_app, broker, processes):
    processes.taskmesh("-A", APP, "worker", "--profile", "gpu", env={"TASKMESH_SIMULATE_GPUS": "1x80GiB"})
    wait_for_workers(gpu_app.app, [f"gpu0@{HOST}"])
    wait_registered(broker, 1)
    results = [gpu_app.flexible.delay(1.0, label=i) for i in range(4)]
    ran = [r.get(timeout=60) for r in results]
    assert all(r["queue"] == "gpu" and r["fallback_from"] is None for r in ran)
