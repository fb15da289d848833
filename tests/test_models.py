"""Warm models: loaded once per pool process and held as their own ledger reservation,
evicted for waiting work only when the cost rule says so (never a never_evict one), a
failing loader leaves nothing reserved, and a dead worker's model reservation expires.
Real redis-server, real workers on simulated GPUs, loaders that sleep about a second."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from taskmesh import create_app
from taskmesh.core.claims import gpu_pool
from taskmesh.core.errors import ConfigError, ModelDeclarationError, ModelLoadError
from taskmesh.core.models import ModelSpec, WarmModel, plan_eviction
from taskmesh.hardware.simulated import SimulatedProvider
from taskmesh.observe.metrics import TaskmeshCollector
from taskmesh.observe.status import collect_status
from taskmesh.observe.top import warm_line
from taskmesh.state.keys import MODELS_HELD
from taskmesh.state.ledger import Ledger
from taskmesh.state.models import ModelStore

from .conftest import ROOT, wait_for_workers, wait_until
from .test_status import frame_text

HOST = socket.gethostname()
APP = "tests.apps.model_app"
GPU = "1x24GiB"  # room for one 16 GiB model (or one 16 GiB task) at a time
UUID = SimulatedProvider(GPU).snapshot()[0].uuid
POOL = gpu_pool(UUID)
GIB = 1024


def start_gpu(processes, app, **env: str) -> str:
    processes.taskmesh("-A", APP, "worker", "--profile", "gpu", "--loglevel", "WARNING",
                       env={"TASKMESH_SIMULATE_GPUS": GPU, **env})
    node = f"gpu0@{HOST}"
    wait_for_workers(app, [node])
    return node


def events(broker) -> list[str]:
    return [e.decode().rsplit(":", 1)[0] for e in broker.lrange("test:model-events", 0, -1)]


def holders(broker) -> dict[str, int]:
    Ledger(broker).used([POOL])  # sweep what expired
    return Ledger(broker).holders(POOL)


def decisions(app) -> list[dict]:
    return collect_status(app)["models"]["evictions"]


# --- the pure policy ---------------------------------------------------------------------

def warm(name: str, last_used: float, reload_s: float, never_evict: bool = False, vram: int = 16 * GIB):
    return WarmModel(name, vram, last_used, reload_s, never_evict)


def test_eviction_takes_the_least_recently_used_first_and_only_what_is_needed():
    plan = plan_eviction(10 * GIB, [warm("new", 2.0, 1.0), warm("old", 1.0, 1.0)], waiting_s=5.0)
    assert [m.name for m in plan.evict] == ["old"] and "evict old" in plan.reason


def test_eviction_weighs_waiting_work_against_reload_cost():
    assert not plan_eviction(GIB, [warm("dear", 1.0, 120.0)], waiting_s=100.0).evicts
    plan = plan_eviction(GIB, [warm("dear", 1.0, 120.0)], waiting_s=121.0)
    assert plan.evicts and "waiting work 121.0s + waited 0.0s > reload 120.0s" in plan.reason


def test_a_lone_short_task_is_not_kept_out_for_ever_by_an_idle_model():
    """Found by the affinity benchmark: 2 s of work never outweighs a 120 s reload, so the last
    task for a model that does not fit waited for ever. Its wait counts: once it has waited
    the reload, the idle model goes."""
    dear = [warm("dear", 1.0, 120.0)]
    assert not plan_eviction(GIB, dear, waiting_s=2.0, waited_s=100.0).evicts
    assert plan_eviction(GIB, dear, waiting_s=2.0, waited_s=119.0).evicts
    assert not plan_eviction(GIB, [warm("brain", 1.0, 1.0, never_evict=True)], waiting_s=2.0, waited_s=1e6).evicts


def test_never_evict_models_stay_even_when_enough_work_waits():
    plan = plan_eviction(GIB, [warm("brain", 1.0, 1.0, never_evict=True)], waiting_s=10_000.0)
    assert not plan.evicts and "never_evict: brain" in plan.reason
    plan = plan_eviction(20 * GIB, [warm("brain", 1.0, 1.0, True), warm("small", 2.0, 1.0)], waiting_s=1e4)
    assert not plan.evicts and "frees 16384 MiB of the 20480 MiB" in plan.reason  # half an eviction is none


def test_nothing_short_evicts_nothing():
    assert not plan_eviction(0, [warm("a", 1.0, 1.0)], waiting_s=1e6).evicts


def test_the_config_file_overrides_a_models_load_time_and_eviction_and_bad_sizes_fail_at_import(tmp_path):
    config = tmp_path / "hw.yaml"
    config.write_text("models:\n  llm:\n    load_s: 140\n    never_evict: true\n")
    app = create_app("declares", broker="redis://127.0.0.1:1/0", hardware=str(config))
    declared = app.model("llm", vram="16GiB", load_s=5)(lambda: object())
    assert declared.spec == ModelSpec("llm", 16 * GIB, 140, True)
    with pytest.raises(ModelDeclarationError, match="model 'bad': vram '16 gigs' cannot be read: .* unknown unit"):
        app.model("bad", vram="16 gigs")
    config.write_text("models:\n  llm:\n    never_evict: 1\n")
    with pytest.raises(ConfigError, match="models.llm.never_evict: 1 is not true or false"):
        create_app("declares", broker="redis://127.0.0.1:1/0", hardware=str(config))


# --- real workers -------------------------------------------------------------------------

@pytest.mark.slow
def test_many_tasks_for_a_warm_model_load_it_once_and_count_it_once(model_app, broker, processes):
    node = start_gpu(processes, model_app.app)
    samples, done = [], threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(Ledger(broker).used([POOL])[POOL])
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    ran = [r.get(timeout=60) for r in [model_app.use_cheap.delay(0.02) for _ in range(20)]]
    done.set()
    sampler.join()
    assert events(broker) == ["load:cheap"]  # one load for 20 tasks
    assert len({(r["pid"], r["loaded_at"]) for r in ran}) == 1  # every task got the same loaded object
    # the model (16 GiB) plus one 1 GiB task at most: the loading task's claim became the model's, not a copy
    assert max(samples) == 17 * GIB
    wait_until(lambda: holders(broker) == {f"model:{node}/{ran[0]['pid']}/cheap": 16 * GIB},
               "only the model's reservation left once the tasks ended")
    wait_until(lambda: collect_status(model_app.app)["gpus"][0]["model_tasks"] == 20,
               "the worker announced the warm model and its 20 tasks")
    status = collect_status(model_app.app)
    gpu = status["gpus"][0]
    assert gpu["model_state"] == "ready" and gpu["models"] == ["cheap"]
    assert status["models"]["loads"]["cheap"]["count"] == 1
    assert 0.3 < status["models"]["learned_load_s"]["cheap"] < 5  # measured about 1 s, from a guess of 1 s
    assert warm_line(gpu, status["at"]).startswith("GPU 0: [READY] cheap  idle ")
    assert warm_line(gpu, status["at"]).endswith("tasks: 20")
    assert warm_line(gpu, status["at"]) in frame_text(status)  # the line as taskmesh top draws it
    flower = model_app.app.control.inspect(destination=[node], timeout=5).stats()[node]["taskmesh_gpus"]
    assert flower.endswith(", 0 running, READY cheap"), flower  # Flower's worker page, "Other" tab
    families = {f.name: f for f in TaskmeshCollector(model_app.app, broker).families()}
    assert [s.labels["model"] for s in families["taskmesh_model_loaded"].samples] == ["cheap"]
    assert {s.labels["state"]: s.value for s in families["taskmesh_gpu_state"].samples}["ready"] == 1
    assert [s.value for s in families["taskmesh_model_loads"].samples if s.name.endswith("_total")] == [1]


@pytest.mark.slow
def test_a_threads_pool_shares_one_copy_among_its_slots(model_app, broker, processes):
    node = start_gpu(processes, model_app.app, TASKMESH_GPU_SLOTS="2", TASKMESH_GPU_POOL="threads")
    ran = [r.get(timeout=60) for r in [model_app.use_cheap.delay(0.2) for _ in range(8)]]
    assert events(broker) == ["load:cheap"] and len({r["loaded_at"] for r in ran}) == 1
    wait_until(lambda: holders(broker) == {f"model:{node}/{ran[0]['pid']}/cheap": 16 * GIB},
               "one copy counted once the tasks ended")


@pytest.mark.slow
def test_a_task_that_declares_only_its_model_reuses_the_warm_copy_and_does_not_claim_the_whole_gpu(
        model_app, broker, processes):
    node = start_gpu(processes, model_app.app)
    ran = [model_app.use_cheap_only.delay().get(timeout=60) for _ in range(3)]
    assert len({r["pid"] for r in ran}) == 1 and len({r["loaded_at"] for r in ran}) == 1
    assert events(broker) == ["load:cheap"]  # loaded once: never evicted to make room for its own task
    assert not [e for e in ModelStore(model_app.app.redis()).evictions(20) if e["node"] == node and e["evicted"]]


@pytest.mark.slow
def test_a_loader_that_raises_fails_the_task_and_leaves_the_gpu_idle(model_app, broker, processes):
    start_gpu(processes, model_app.app)
    with pytest.raises(ModelLoadError, match="model 'broken' failed to load: OSError: weights not found"):
        model_app.use_broken.delay().get(timeout=60)
    wait_until(lambda: holders(broker) == {}, "nothing reserved for the model that did not load")
    wait_until(lambda: collect_status(model_app.app)["gpus"][0]["model_state"] == "idle", "the GPU back to idle")
    assert model_app.plain.delay().get(timeout=60)["gpus"] == [UUID]  # the whole 16 GiB is usable


@pytest.mark.slow
def test_an_idle_model_is_evicted_when_and_only_when_the_waiting_work_outweighs_its_reload(
        model_app, broker, processes):
    start_gpu(processes, model_app.app)
    model_app.use_cheap.delay().get(timeout=60)
    # 16 GiB of plain work, expected 10 s before any run is measured, waits behind cheap (reload ~1 s): cheap goes
    model_app.plain.delay(2.0).get(timeout=60)
    assert events(broker) == ["load:cheap", "unload:cheap"]
    (evicted,) = decisions(model_app.app)
    assert evicted["evicted"] and evicted["evict"] == ["cheap"] and evicted["reason"].startswith("evict cheap")
    wait_until(lambda: broker.hget("taskmesh:runtimes", "t:tests.apps.model_app.plain:count"), "plain's run learned")
    model_app.use_dear.delay().get(timeout=60)  # learned ~42 s: 0.3 x the ~1 s measured + 0.7 x the 60 s declared
    waiting = [model_app.plain.delay()]  # ~2 s of work against ~42 s of reload: dear stays
    wait_until(lambda: len(decisions(model_app.app)) == 2, "the worker decided about the waiting plain task")
    kept = decisions(model_app.app)[0]
    assert not kept["evicted"] and kept["kept"] == ["dear"] and kept["reason"].startswith("keep dear: waiting work")
    assert not waiting[0].ready() and events(broker) == ["load:cheap", "unload:cheap", "load:dear"]
    assert any(r.startswith("model:") and r.endswith("/dear") for r in holders(broker))
    waiting += [model_app.plain.delay() for _ in range(25)]  # 26 x ~2 s waiting now outweighs the reload
    for result in waiting:
        result.get(timeout=60)
    assert events(broker) == ["load:cheap", "unload:cheap", "load:dear", "unload:dear"]
    last = decisions(model_app.app)[0]
    assert last["evicted"] and last["evict"] == ["dear"] and last["waiting_s"] > 40, last
    shown = json.loads(subprocess.run([sys.executable, "-m", "taskmesh", "-A", APP, "status", "--json"], cwd=ROOT,
                                      capture_output=True, text=True, timeout=60, check=True).stdout)
    assert [d["reason"][:10] for d in shown["models"]["evictions"]] == ["evict dear", "keep dear:", "evict chea"]


@pytest.mark.slow
def test_a_never_evict_model_stays_loaded_while_work_waits_for_its_memory(model_app, broker, processes):
    start_gpu(processes, model_app.app)
    model_app.use_brain.delay().get(timeout=60)
    waiting = [model_app.plain.delay() for _ in range(3)]
    wait_until(lambda: decisions(model_app.app), "the worker decided about the plain task")
    (kept,) = decisions(model_app.app)
    assert not kept["evicted"] and "never_evict: brain" in kept["reason"]
    assert not any(r.ready() for r in waiting) and events(broker) == ["load:brain"]


@pytest.mark.slow
def test_a_sigkilled_worker_holding_a_model_loses_its_reservation_at_expiry(model_app, broker, processes):
    worker = processes.celery_worker(APP, "-Q", "gpu", "-c", "1", "-n", f"gpu0@{HOST}",
                                     env={"TASKMESH_SIMULATE_GPUS": GPU, "TASKMESH_RESERVATION_TTL_S": "6"})
    wait_for_workers(model_app.app, [f"gpu0@{HOST}"])
    pid = model_app.use_cheap.delay().get(timeout=60)["pid"]
    wait_until(lambda: list(holders(broker)) == [f"model:gpu0@{HOST}/{pid}/cheap"], "the model's reservation alone")
    time.sleep(7)  # past one TTL: the heartbeat keeps a live worker's model reservation
    assert list(holders(broker)) == [f"model:gpu0@{HOST}/{pid}/cheap"]
    child = psutil.Process(pid)
    os.kill(worker.pid, signal.SIGKILL)
    child.send_signal(signal.SIGKILL)  # the model is really gone with its process
    wait_until(lambda: holders(broker) == {}, "the dead worker's model reservation expired", timeout=20)
    assert broker.hgetall(f"{MODELS_HELD}gpu0@{HOST}")  # nobody was left to clean the hash: only expiry freed it


@pytest.mark.slow
def test_a_sigkilled_worker_loading_a_model_leaves_nothing_reserved_once_its_reservation_expires(
        model_app, broker, processes):
    worker = processes.celery_worker(APP, "-Q", "gpu", "-c", "1", "-n", f"gpu0@{HOST}",
                                     env={"TASKMESH_SIMULATE_GPUS": GPU, "TASKMESH_RESERVATION_TTL_S": "6",
                                          "TASKMESH_TEST_LOAD_S": "30"})
    wait_for_workers(model_app.app, [f"gpu0@{HOST}"])
    model_app.use_cheap.delay()
    store = ModelStore(model_app.app.redis())
    wait_until(lambda: any(e.get("loading") == "cheap" for e in store.held(f"gpu0@{HOST}").values()),
               "the pool process is loading the model")
    assert sum(holders(broker).values()) == 17 * GIB  # the loading task's claim: the model and its own 1 GiB
    (child,) = psutil.Process(worker.pid).children()
    os.kill(worker.pid, signal.SIGKILL)
    child.send_signal(signal.SIGKILL)  # the half-loaded model is gone with its process
    wait_until(lambda: holders(broker) == {}, "the dead worker's claim expired", timeout=20)
    assert events(broker) == []  # nothing was loaded, and nothing is counted as loaded


@pytest.mark.slow
def test_a_pool_process_that_dies_with_its_model_has_it_released_by_its_worker(model_app, broker, processes):
    node = start_gpu(processes, model_app.app)  # reservations expire after the default 15 s TTL
    first = model_app.use_cheap.delay().get(timeout=60)["pid"]
    wait_until(lambda: list(holders(broker)) == [f"model:{node}/{first}/cheap"], "the model's reservation alone")
    psutil.Process(first).send_signal(signal.SIGKILL)  # Celery starts another pool process
    # well before the TTL: released by the worker, which saw the process gone, not by expiry
    wait_until(lambda: holders(broker) == {}, "the dead process's model released", timeout=8)
    second = model_app.use_cheap.delay().get(timeout=60)["pid"]
    assert second != first and events(broker) == ["load:cheap", "load:cheap"]
    wait_until(lambda: list(holders(broker)) == [f"model:{node}/{second}/cheap"], "only the new copy counted")


@pytest.mark.slow
def test_a_task_with_several_models_runs_the_largest_that_fits_now_and_a_warm_one_first(
        model_app, broker, processes):
    """model=["large", "small"] (16 and 6 GiB) on one 24 GiB GPU, two threads sharing one copy
    of each model: with 12 GiB taken by another task only the small one fits, and it runs with
    it, the large one never loaded; later, with the GPU free again, the small one is warm and
    is chosen over loading the large one."""
    node = start_gpu(processes, model_app.app, TASKMESH_GPU_SLOTS="2", TASKMESH_GPU_POOL="threads")
    blocker = model_app.hold12.delay(6.0)
    wait_until(lambda: Ledger(broker).used([POOL])[POOL] == 12 * GIB, "the 12 GiB task runs")
    pressed = model_app.use_best.delay().get(timeout=60)
    assert pressed["chosen"] == pressed["model"] == "small"
    assert events(broker) == ["load:small"]  # the large model was not loaded
    blocker.get(timeout=60)
    again = model_app.use_best.delay().get(timeout=60)
    assert again["chosen"] == "small" and again["loaded_at"] == pressed["loaded_at"]  # warm first: no load
    assert events(broker) == ["load:small"]
    wait_until(lambda: holders(broker) == {f"model:{node}/{pressed['pid']}/small": 6 * GIB},
               "the warm small model's reservation only")


@pytest.mark.slow
def test_a_task_with_several_models_takes_the_preferred_one_when_the_gpu_has_room(model_app, broker, processes):
    start_gpu(processes, model_app.app)
    assert model_app.use_best.delay().get(timeout=60)["chosen"] == "large"
    assert events(broker) == ["load:large"]


def test_model_lists_are_checked_at_import():
    app = create_app("tests.model_list_check")
    for bad in ([], ["a", "a"], ["a", ""], 3):
        with pytest.raises(Exception, match="list of distinct names"):
            app.task(profile="gpu", model=bad)(lambda: None)
