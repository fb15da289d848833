"""Warm-model affinity through Celery queues: a task for a warm model goes to its model queue,
which only GPUs holding it consume, so it is not loaded again while another GPU serves other
work; a burst warms the model on a second GPU only when the burst rule's numbers say so.
Real redis-server, two real GPU workers (``taskmesh worker`` on two simulated GPUs), a loader
that sleeps 2 s."""

from __future__ import annotations

import os
import signal
import socket
import time

import psutil
import pytest
import redis

from taskmesh.app.affinity import Affinity
from taskmesh.core.errors import ModelLoadError
from taskmesh.core.model_queues import model_of, model_queue, plan_warm_up, stranded_taker
from taskmesh.hardware.simulated import SimulatedProvider, SimulationControl
from taskmesh.state.keys import RUNTIMES
from taskmesh.state.models import ModelStore
from taskmesh.worker.model_queues import ANNOUNCED_S

from .conftest import wait_for_workers, wait_until
from .test_models import events

HOST = socket.gethostname()
APP = "tests.apps.model_app"
GPUS = "2x24GiB"  # room for one 16 GiB model beside a 4 GiB task on each
UUIDS = [g.uuid for g in SimulatedProvider(GPUS).snapshot()]
NODES = [f"gpu0@{HOST}", f"gpu1@{HOST}"]
QUEUE = model_queue("alpha")


# --- the pure policy ---------------------------------------------------------------------

def test_a_burst_warms_another_gpu_only_when_its_expected_wait_exceeds_the_load_time():
    plan = plan_warm_up(queued=200, mean_run_s=0.15, serving_slots=1, load_s=14.6)
    assert plan.warm and plan.expected_wait_s == pytest.approx(30.0)
    assert plan.reason == "warm: 200 queued x 0.150s / 1 slot(s) = 30.0s > load 14.6s"
    assert not plan_warm_up(30, 0.15, 1, 14.6).warm  # 4.5 s of work: the holder drains it sooner than a load
    assert not plan_warm_up(200, 0.15, 3, 14.6).warm  # three slots serve it: 10 s
    assert not plan_warm_up(0, 10.0, 1, 1.0).warm


def test_the_wait_counts_the_holders_other_work_and_this_gpus_own():
    # a holder that also serves another model's 7 s of queued work: 2.1 + 7 s there ...
    plan = plan_warm_up(queued=7, mean_run_s=0.3, serving_slots=1, load_s=2.0, besides_s=7.0)
    assert plan.warm and plan.expected_wait_s == pytest.approx(9.1)
    # ... against a load of 2 s behind 7.5 s of this GPU's own work: they start sooner where they are
    plan = plan_warm_up(queued=7, mean_run_s=0.3, serving_slots=1, load_s=2.0, besides_s=7.0, own_s=7.5)
    assert not plan.warm
    assert plan.reason == ("keep: 7 queued x 0.300s / 1 slot(s) + 7.0s of their other work = 9.1s "
                           "<= load 2.0s + 7.5s queued here")
    unknown = plan_warm_up(queued=70, mean_run_s=0.3, serving_slots=1, load_s=2.0, own_s=None)
    assert not unknown.warm and "no run time measured yet for the work queued here" in unknown.reason
    assert not plan_warm_up(queued=6, mean_run_s=0.3, serving_slots=1, load_s=2.0).warm  # 1.8 s against 2 s: ...
    assert plan_warm_up(queued=7, mean_run_s=0.3, serving_slots=1, load_s=2.0).warm  # ... and 2.1 s


def test_no_run_time_measured_warms_nothing_yet():
    plan = plan_warm_up(10_000, None, 1, 1.0)
    assert not plan.warm and plan.reason == "keep: 10000 queued, no run time measured yet"


def test_one_worker_takes_a_stranded_model_queue_by_every_workers_reckoning():
    nodes = ["gpu1@b", "gpu0@a", "gpu0@b"]
    taker = stranded_taker("alpha", nodes)
    assert taker in nodes and stranded_taker("alpha", list(reversed(nodes))) == taker
    assert len({stranded_taker(f"m{i}", nodes) for i in range(20)}) > 1  # models spread over the fleet
    assert stranded_taker("alpha", []) is None


def test_model_queues_are_named_in_one_place_and_belong_to_the_gpu_family():
    from taskmesh.core.need_queues import family

    assert QUEUE == "gpu.model.alpha" and model_of(QUEUE) == "alpha" and model_of("gpu.4096MiB") is None
    assert family(QUEUE) == "gpu"


def test_on_a_broker_other_than_redis_every_task_stays_on_its_profile_queue():
    unreachable = redis.Redis(port=1)  # never asked: a model queue is not even considered
    assert Affinity(unreachable, "amqp://guest@127.0.0.1//").queue_for("alpha", "gpu", set) == "gpu"
    assert Affinity(unreachable, "redis://127.0.0.1:1/0").enabled


# --- real workers -------------------------------------------------------------------------

def start_two_gpus(processes, app) -> None:
    processes.taskmesh("-A", APP, "worker", "--profile", "gpu", "--loglevel", "WARNING",
                       env={"TASKMESH_SIMULATE_GPUS": GPUS, "TASKMESH_TEST_LOAD_S": "2", "TASKMESH_GPU_SLOTS": "1"})
    wait_for_workers(app, NODES)


def warm_alpha(model_app) -> int:
    """Load alpha on whichever GPU takes the first task; returns that GPU's index once
    producers route alpha's tasks to its model queue."""
    (uuid,) = model_app.use_alpha.delay().get(timeout=60)["gpus"]
    warm = UUIDS.index(uuid)
    store = ModelStore(model_app.app.redis())
    wait_until(lambda: set(store.ready("alpha")) == {NODES[warm]}, "the warm worker announced alpha ready")
    policy = model_app.app.submit_policy()
    wait_until(lambda: policy.affinity.queue_for("alpha", "gpu", policy.live_nodes) == QUEUE,
               "the producer routes alpha's tasks to its model queue")
    return warm


def learn_run_time(model_app, broker, seconds: float, count: int = 10) -> None:
    """Run *count* alpha tasks through its model queue so the burst rule has a measured run time."""
    for result in [model_app.use_alpha.delay(seconds) for _ in range(count)]:
        result.get(timeout=60)
    wait_until(lambda: int(broker.hget(RUNTIMES, f"q:{QUEUE}:count") or 0) >= count,
               "the model queue's run time reported")


def loads(model_app) -> int:
    return int(ModelStore(model_app.app.redis()).loads().get("alpha", {}).get("count", 0))


def warm_ups(model_app, node: str) -> list[dict]:
    return [d for d in ModelStore(model_app.app.redis()).warm_ups(100) if d["node"] == node]


@pytest.mark.slow
def test_fifty_tasks_for_a_model_warm_on_one_gpu_run_there_with_no_further_load(model_app, broker, processes):
    start_two_gpus(processes, model_app.app)
    warm = warm_alpha(model_app)
    other = 1 - warm
    sent = []
    for i in range(50):
        sent.append(("alpha", model_app.use_alpha.delay(0.05)))
        if i % 2:
            sent.append(("small", model_app.small.delay(0.2)))
    ran = [(kind, result.get(timeout=60)["gpus"]) for kind, result in sent]
    assert [gpus for kind, gpus in ran if kind == "alpha"] == [[UUIDS[warm]]] * 50
    assert loads(model_app) == 1 and events(broker) == ["load:alpha"]  # 51 tasks, one load
    # the other GPU was free and took work the while: it could have taken alpha's tasks, and did not
    assert [UUIDS[other]] in [gpus for kind, gpus in ran if kind == "small"]


@pytest.mark.slow
def test_tasks_sent_to_the_profile_queue_for_a_model_warm_elsewhere_are_handed_over_not_loaded_again(
        model_app, broker, processes):
    start_two_gpus(processes, model_app.app)
    warm = warm_alpha(model_app)
    busy = model_app.use_alpha.delay(3.0)  # the warm GPU is busy: the other one is free to take from gpu
    wait_until(lambda: ModelStore(model_app.app.redis()).held(NODES[warm]) and any(
        e["state"] == "busy" for e in ModelStore(model_app.app.redis()).held(NODES[warm]).values()),
        "the warm GPU runs the long task")
    # sent as a producer does that has not yet read that alpha is warm (or names the queue itself)
    late = [model_app.use_alpha.apply_async((0.05,), queue="gpu") for _ in range(4)]
    ran = [r.get(timeout=60)["gpus"] for r in late]
    busy.get(timeout=60)
    assert ran == [[UUIDS[warm]]] * 4 and loads(model_app) == 1  # no second copy for them
    # the other GPU took them off gpu and sent them on, rather than loading alpha beside the warm one
    counters = model_app.app.control.inspect(destination=[NODES[1 - warm]], timeout=5).stats()[
        NODES[1 - warm]]["taskmesh"]["counters"]
    assert counters["rerouted"] >= 1, counters


@pytest.mark.slow
def test_a_small_burst_stays_on_the_gpu_that_has_the_model_warm(model_app, broker, processes):
    start_two_gpus(processes, model_app.app)
    warm = warm_alpha(model_app)
    learn_run_time(model_app, broker, 0.15)
    burst = [model_app.use_alpha.delay(0.15) for _ in range(30)]  # about 5 s of work against a 14.6 s load
    wait_until(lambda: loads(model_app) > 1 or any(d["queued"] >= 10 for d in warm_ups(model_app, NODES[1 - warm])),
               "the other GPU weighed the burst", seen=lambda: warm_ups(model_app, NODES[1 - warm]))
    assert loads(model_app) == 1
    seen = [d for d in warm_ups(model_app, NODES[1 - warm]) if d["queued"] >= 10]
    assert not any(d["warm"] for d in seen) and seen[0]["reason"].startswith("keep: "), seen
    assert {tuple(r.get(timeout=60)["gpus"]) for r in burst} == {(UUIDS[warm],)}
    assert loads(model_app) == 1


@pytest.mark.slow
def test_a_burst_longer_than_a_load_warms_the_model_on_the_second_gpu(model_app, broker, processes):
    start_two_gpus(processes, model_app.app)
    warm = warm_alpha(model_app)
    learn_run_time(model_app, broker, 0.15)
    burst = [model_app.use_alpha.delay(0.15) for _ in range(200)]  # about 30 s on one GPU against a 14.6 s load
    gpus = [tuple(r.get(timeout=90)["gpus"]) for r in burst]
    decided = [d for d in warm_ups(model_app, NODES[1 - warm]) if d["warm"]][-1]  # the first (newest first)
    assert decided["expected_wait_s"] > decided["load_s"] > 10, decided
    assert decided["reason"].startswith("warm: ") and decided["holders"] == [NODES[warm]]
    assert loads(model_app) == 2 and events(broker) == ["load:alpha", "load:alpha"]
    assert (UUIDS[1 - warm],) in gpus and (UUIDS[warm],) in gpus
    assert set(ModelStore(model_app.app.redis()).ready("alpha")) == set(NODES)


@pytest.mark.slow
def test_tasks_sent_to_a_model_queue_whose_only_holder_died_are_run_by_a_gpu_that_loads_it(
        model_app, broker, processes):
    start_two_gpus(processes, model_app.app)
    supervisor = processes.procs[-1]
    warm = warm_alpha(model_app)
    (worker,) = [p for p in psutil.Process(supervisor.pid).children()
                 if NODES[warm] in " ".join(p.cmdline())]
    pool = worker.children()
    os.kill(worker.pid, signal.SIGKILL)
    for child in pool:
        child.send_signal(signal.SIGKILL)  # the model is gone with its process; the supervisor restarts the worker
    psutil.wait_procs([worker, *pool], timeout=10)  # gone, with its connection: nothing sent next reaches it
    policy = model_app.app.submit_policy()
    assert policy.affinity.queue_for("alpha", "gpu", policy.live_nodes) == QUEUE  # it still looks warm there
    stranded = [model_app.use_alpha.delay(0.05) for _ in range(5)]  # so these go to the model queue
    ran = [r.get(timeout=60) for r in stranded]
    assert len(ran) == 5 and loads(model_app) == 2  # a GPU that could fit alpha took them and loaded it


@pytest.mark.slow
def test_a_holder_whose_gpu_fails_stops_drawing_its_models_tasks_and_the_other_gpu_loads_them(
        model_app, broker, processes):
    start_two_gpus(processes, model_app.app)
    warm = warm_alpha(model_app)
    store = ModelStore(model_app.app.redis())
    SimulationControl(broker).fail(warm)  # the holder pauses: it takes nothing more from alpha's queue
    wait_until(lambda: NODES[warm] not in store.ready("alpha"), "the failed GPU's worker withdrew alpha",
               seen=lambda: store.ready("alpha"))
    policy = model_app.app.submit_policy()
    wait_until(lambda: policy.affinity.queue_for("alpha", "gpu", policy.live_nodes) == "gpu",
               "the producer stops routing alpha to the failed holder")
    ran = [r.get(timeout=60)["gpus"] for r in [model_app.use_alpha.delay(0.05) for _ in range(3)]]
    assert ran == [[UUIDS[1 - warm]]] * 3 and loads(model_app) == 2


@pytest.mark.slow
def test_a_load_that_fails_withdraws_its_announcement_as_its_task_ends(model_app, broker, processes):
    """Announced at admission, a load that then fails must not keep drawing the model's tasks
    (to its queue, where no copy serves them) for the rest of ``ANNOUNCED_S``."""
    start_two_gpus(processes, model_app.app)
    store = ModelStore(model_app.app.redis())
    sent = time.monotonic()
    failing = model_app.use_broken.delay()
    wait_until(lambda: store.ready("broken"), "the load was announced as it was admitted")
    with pytest.raises(ModelLoadError):
        failing.get(timeout=60)
    wait_until(lambda: not store.ready("broken"), "the failed load's announcement withdrawn",
               seen=lambda: store.ready("broken"))
    assert time.monotonic() - sent < ANNOUNCED_S  # withdrawn as the task ended, not when the announcement aged


@pytest.mark.slow
def test_micro_batch_items_for_a_model_warm_elsewhere_are_handed_over_one_by_one(model_app, broker, processes):
    start_two_gpus(processes, model_app.app)
    warm = warm_alpha(model_app)
    busy = model_app.use_alpha.delay(3.0)  # the warm GPU is busy: the other one is free to take from gpu
    wait_until(lambda: any(e["state"] == "busy" for e in ModelStore(model_app.app.redis()).held(NODES[warm]).values()),
               "the warm GPU runs the long task")
    items = [model_app.embed_alpha.apply_async((i,), queue="gpu") for i in range(4)]
    ran = [r.get(timeout=60) for r in items]
    busy.get(timeout=60)
    assert [r["item"] for r in ran] == [0, 1, 2, 3]
    assert {tuple(r["gpus"]) for r in ran} == {(UUIDS[warm],)} and loads(model_app) == 1, events(broker)
    counters = model_app.app.control.inspect(destination=[NODES[1 - warm]], timeout=5).stats()[
        NODES[1 - warm]]["taskmesh"]["counters"]
    assert counters["rerouted"] == 4, counters
