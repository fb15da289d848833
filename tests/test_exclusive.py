"""Exclusive batch mode (seed 001's video batch): ``submit_batch(task, items, exclusive=True)``
gives the batch every GPU — other GPU work waits in its queue and runs after, warm models
are unloaded for the batch and loaded again after it. Real redis-server, a real ``taskmesh
worker`` on two simulated GPUs, a loader that sleeps about a second."""

from __future__ import annotations

import socket

import pytest

from taskmesh.app.batch_jobs import ExclusiveRefused, batch_status, submit_batch
from taskmesh.observe.status import collect_status

from .conftest import wait_for_workers, wait_until
from .test_admission import stats
from .test_models import APP, events

HOST = socket.gethostname()
NODES = [f"gpu0@{HOST}", f"gpu1@{HOST}"]


@pytest.mark.slow
def test_an_exclusive_batch_has_both_gpus_other_work_waits_and_warm_models_come_back(model_app, broker, processes):
    app = model_app.app
    processes.taskmesh("-A", APP, "worker", "--profile", "gpu", "--loglevel", "WARNING",
                       env={"TASKMESH_SIMULATE_GPUS": "2x24GiB"})
    wait_for_workers(app, NODES)
    model_app.use_cheap.delay().get(timeout=60)  # the model warm on one GPU
    assert events(broker) == ["load:cheap"]
    batch = submit_batch(model_app.frame, [0.3] * 40, exclusive=True)
    with pytest.raises(ExclusiveRefused, match=f"exclusive batch {batch} is running: one at a time"):
        submit_batch(model_app.frame, [0.1], exclusive=True)
    wait_until(lambda: all("exclusive" in stats(app, node)["reasons"] for node in NODES), "both GPUs in the mode", 30)
    others = [model_app.plain.delay(0.1) for _ in range(4)]  # other GPU work, queued meanwhile
    assert batch_status(app, batch)["exclusive"] and collect_status(app)["mode"]["exclusive"]["batch"] == batch
    wait_until(lambda: batch_status(app, batch)["done"] == 40, "the batch done", 120)
    items = [app.AsyncResult(t).get(timeout=10) for t in _items(broker, batch)]
    assert len({gpu for item in items for gpu in item["gpus"]}) == 2  # on both GPUs
    ran = [other.get(timeout=60) for other in others]
    assert min(r["started"] for r in ran) > max(i["ended"] for i in items)  # it waited, then ran
    wait_until(lambda: events(broker) == ["load:cheap", "unload:cheap", "load:cheap"],
               "the model unloaded for the batch and loaded again after it", 60)
    wait_until(lambda: collect_status(app)["mode"]["exclusive"] is None, "the mode over")
    assert not batch_status(app, batch)["exclusive"]


def test_only_a_gpu_task_can_have_every_gpu(model_app, broker):
    with pytest.raises(ExclusiveRefused, match="only a GPU task can have every GPU"):
        submit_batch(model_app.app.tasks["celery.backend_cleanup"], [1], exclusive=True)


def _items(broker, batch: str) -> list[str]:
    from taskmesh.state.batches import job

    return job(broker, batch)[1]
