"""GPU admission against a real Redis and real worker processes: never oversubscribe a
GPU, wait for memory that is really free, survive dead workers and sick GPUs."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

from taskmesh.core.claims import Claim, gpu_pool
from taskmesh.core.config import AdmissionConfig
from taskmesh.core.gate import Admitted, Gate, Wait
from taskmesh.core.requirements import Requirement
from taskmesh.hardware.simulated import SimulatedProvider, SimulationControl
from taskmesh.state.ledger import Ledger

from .conftest import wait_for_workers

HOST = socket.gethostname()
APP = "tests.apps.gpu_app"
GIB = 1024


def start_gpus(processes, app, spec: str, **env: str) -> list[str]:
    processes.taskmesh("-A", APP, "worker", "--profile", "gpu", "--loglevel", "WARNING",
                       env={"TASKMESH_SIMULATE_GPUS": spec, **env})
    nodes = [f"gpu{i}@{HOST}" for i in range(len(SimulatedProvider(spec).snapshot()))]
    wait_for_workers(app, nodes)
    return nodes


def most_at_once(results: list[dict]) -> int:
    edges = sorted([(r["started"], 1) for r in results] + [(r["ended"], -1) for r in results])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def stats(app, node: str) -> dict:
    return app.control.inspect(destination=[node], timeout=5).stats()[node]["taskmesh"]


@pytest.mark.slow
def test_three_slots_on_24gib_run_at_most_two_10gib_tasks_and_lose_none(gpu_app, broker, processes):
    (node,) = start_gpus(processes, gpu_app.app, "1x24GiB", TASKMESH_GPU_SLOTS="3")
    uuid = SimulatedProvider("1x24GiB").snapshot()[0].uuid
    ledger, samples, done = Ledger(broker), [], threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(ledger.used([gpu_pool(uuid)])[gpu_pool(uuid)])
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    results = [gpu_app.ten_gib.delay(0.5, label=i) for i in range(20)]
    finished = [r.get(timeout=120) for r in results]
    done.set()
    sampler.join()
    assert sorted(f["label"] for f in finished) == list(range(20))
    runs = [r.decode() for r in broker.lrange("test:runs", 0, -1)]
    assert len(runs) == 20 and len(set(runs)) == 20  # none twice
    assert most_at_once(finished) == 2
    assert max(samples) == 20 * GIB and min(samples) >= 0
    counters = stats(gpu_app.app, node)["counters"]
    assert counters["admitted"] == 20 and counters["waits"] > 0 and counters["pauses"] > 0


@pytest.mark.slow
def test_big_and_hopper_only_tasks_run_only_on_the_gpu_that_fits(gpu_app, processes):
    spec = "1x80GiB,cc=9.0;1x24GiB,cc=8.9"
    big_uuid, small_uuid = (g.uuid for g in SimulatedProvider(spec).snapshot())
    start_gpus(processes, gpu_app.app, spec)
    big = [gpu_app.forty_gib.delay(2.0, label=f"big{i}") for i in range(2)]
    time.sleep(0.5)
    hopper = gpu_app.hopper_only.delay(0.2, label="hopper")
    small = [gpu_app.ten_gib.delay(0.2, label=f"small{i}") for i in range(3)]
    ran_big = [r.get(timeout=60) for r in big]
    ran_hopper = hopper.get(timeout=60)
    ran_small = [r.get(timeout=60) for r in small]
    assert {tuple(r["gpu_uuids"]) for r in ran_big} == {(big_uuid,)}
    assert ran_hopper["gpu_uuids"] == [big_uuid] or tuple(ran_hopper["gpu_uuids"]) == (big_uuid,)
    # the cc 9.0 task waited for the busy H100-class GPU although the other one was idle
    assert ran_hopper["started"] >= min(r["ended"] for r in ran_big) - 0.05
    assert any(tuple(r["gpu_uuids"]) == (small_uuid,) for r in ran_small)
    # sent after both workers registered, later big tasks go straight to the queue of GPUs that fit
    late = gpu_app.forty_gib.delay(0.1, label="late").get(timeout=60)
    assert late["queue"] == "gpu.40960MiB" and tuple(late["gpu_uuids"]) == (big_uuid,)


@pytest.mark.slow
def test_memory_used_by_another_process_holds_a_task_until_it_is_freed(gpu_app, broker, processes):
    (node,) = start_gpus(processes, gpu_app.app, "1x24GiB")
    control = SimulationControl(broker)
    control.use(0, 20 * GIB)
    result = gpu_app.ten_gib.delay(0.1, label="waits")
    deadline = time.monotonic() + 20
    while stats(gpu_app.app, node)["held"] != 1:
        assert time.monotonic() < deadline, "the task was never held"
        time.sleep(0.2)
    state = stats(gpu_app.app, node)
    # intake stays open: a task behind it that fits may run in the gap (backfill)
    assert not state["paused"] and "observed: GPU 0 4096 MiB free" in state["reasons"]["waiting"]
    assert state["gpus"][0]["memory_free_observed_mib"] == 4 * GIB
    time.sleep(1.0)
    assert not result.ready()
    freed_at = time.time()
    control.use(0, 0)
    ran = result.get(timeout=30)
    assert ran["started"] >= freed_at
    assert not stats(gpu_app.app, node)["paused"]


@pytest.mark.slow
def test_a_sigkilled_worker_loses_its_reservation_and_its_task_runs_again(gpu_app, broker, processes):
    (node,) = start_gpus(processes, gpu_app.app, "1x24GiB", TASKMESH_RESERVATION_TTL_S="6", TASKMESH_DEAD_AFTER_S="8")
    uuid = SimulatedProvider("1x24GiB").snapshot()[0].uuid
    ledger = Ledger(broker)
    result = gpu_app.ten_gib.delay(8.0, label="survivor")
    deadline = time.monotonic() + 20
    while ledger.used([gpu_pool(uuid)])[gpu_pool(uuid)] != 10 * GIB or not broker.llen("test:runs"):
        assert time.monotonic() < deadline, "never reserved and started"
        time.sleep(0.1)
    time.sleep(2.0)  # killed two seconds into an 8 s task (the registry is told within a second)
    (old,) = ledger.holders(gpu_pool(uuid))
    os.kill(gpu_app.app.control.inspect(destination=[node], timeout=5).stats()[node]["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    # the restarted worker (same node name) takes its own reservation for the redelivered task;
    # the dead one's must still expire rather than be adopted and kept alive
    while ledger.used([gpu_pool(uuid)]) and old in ledger.holders(gpu_pool(uuid)):
        assert time.monotonic() - killed_at < 6 + 2 + 3, "the dead worker's reservation did not expire"
        time.sleep(0.2)
    ran = result.get(timeout=60)
    assert ran["label"] == "survivor"
    runs = [r.decode() for r in broker.lrange("test:runs", 0, -1)]
    assert runs == [result.id, result.id]  # delivered again after the kill, and completed once


@pytest.mark.slow
def test_a_gpu_that_fails_takes_no_new_task_and_queued_work_completes_on_the_other(gpu_app, broker, processes):
    gpu0, gpu1 = start_gpus(processes, gpu_app.app, "2x24GiB")
    uuids = [g.uuid for g in SimulatedProvider("2x24GiB").snapshot()]
    results = [gpu_app.ten_gib.delay(0.5, label=i) for i in range(12)]
    results[1].get(timeout=30)
    SimulationControl(broker).fail(0)
    failed_at = time.time()
    finished = [r.get(timeout=60) for r in results]
    assert sorted(f["label"] for f in finished) == list(range(12))
    late = [f for f in finished if f["started"] > failed_at + 1.0]
    assert late and all(tuple(f["gpu_uuids"]) == (uuids[1],) for f in late)
    state = stats(gpu_app.app, gpu0)
    assert state["paused"] and "unhealthy" in state["reasons"] and not state["gpus"][0]["healthy"]
    SimulationControl(broker).recover(0)
    deadline = time.monotonic() + 10
    while stats(gpu_app.app, gpu0)["paused"]:
        assert time.monotonic() < deadline, "the recovered GPU did not take work again"
        time.sleep(0.2)


def test_admission_state_is_sent_as_worker_events_flower_receives(gpu_app, processes):
    (node,) = start_gpus(processes, gpu_app.app, "1x24GiB")
    seen = []
    with gpu_app.app.connection_for_read() as conn:
        receiver = gpu_app.app.events.Receiver(conn, handlers={"worker-taskmesh": seen.append})
        gpu_app.ten_gib.delay(0.2)
        for _ in receiver.itercapture(limit=None, timeout=8, wakeup=False):
            if any(e["hostname"] == node for e in seen):
                break
    event = next(e for e in seen if e["hostname"] == node)
    assert event["taskmesh"]["gpus"][0]["memory_total_mib"] == 24 * GIB


@pytest.mark.slow
def test_a_gpu_added_at_run_time_gets_its_own_worker_group(gpu_app, broker, processes):
    start_gpus(processes, gpu_app.app, "1x24GiB")
    SimulationControl(broker).add("1x48GiB")
    new_uuid = SimulatedProvider("1x24GiB;1x48GiB").snapshot()[1].uuid
    wait_for_workers(gpu_app.app, [f"gpu1@{HOST}"], timeout=60)
    ran = gpu_app.forty_gib.delay(0.1).get(timeout=60)
    assert tuple(ran["gpu_uuids"]) == (new_uuid,)


@pytest.mark.slow
def test_a_cpu_worker_pauses_intake_under_host_pressure_and_loses_nothing(gpu_app, broker, processes, tmp_path):
    strict = tmp_path / "strict.yaml"
    strict.write_text("admission:\n  max_memory_percent: 0.1\n")
    results = [gpu_app.crunch.delay(0.1, label=i) for i in range(3)]
    strict_worker = processes.taskmesh("--hardware", str(strict), "-A", APP, "worker", "--profile", "cpu_intensive")
    node = f"cpu@{HOST}"
    wait_for_workers(gpu_app.app, [node])
    deadline = time.monotonic() + 20
    while not stats(gpu_app.app, node)["paused"]:
        assert time.monotonic() < deadline, "never paused"
        time.sleep(0.2)
    assert "host memory" in stats(gpu_app.app, node)["reasons"]["pressure"]
    time.sleep(1.0)
    assert not any(r.ready() for r in results)  # checked before the first message is taken
    processes.stop(strict_worker)
    processes.taskmesh("-A", APP, "worker", "--profile", "cpu_intensive")
    assert sorted(r.get(timeout=60)["label"] for r in results) == [0, 1, 2]


@pytest.mark.slow
def test_a_message_held_for_half_the_visibility_timeout_is_handed_back_not_run_twice(gpu_app, broker, processes):
    (node,) = start_gpus(processes, gpu_app.app, "1x24GiB", TASKMESH_VISIBILITY_TIMEOUT_S="6")
    SimulationControl(broker).use(0, 20 * GIB)
    result = gpu_app.ten_gib.delay(0.1, label="patient")
    deadline = time.monotonic() + 30
    while not stats(gpu_app.app, node)["counters"].get("requeued"):
        assert time.monotonic() < deadline, "the held message was never handed back"
        time.sleep(0.5)
    SimulationControl(broker).use(0, 0)
    assert result.get(timeout=60)["label"] == "patient"
    time.sleep(7)  # past the visibility timeout: a second delivery would run it again
    assert [r.decode() for r in broker.lrange("test:runs", 0, -1)] == [result.id]


def test_a_whole_gpu_task_runs_where_the_driver_shows_a_few_hundred_mib_and_waits_where_a_process_has_more(broker):
    """A task with no ``vram`` (or ``exclusive=True``) claims the whole GPU; a real idle GPU
    always shows the driver's and a CUDA context's few hundred MiB in use."""
    control = SimulationControl(broker, host="whole-gpu-host")
    provider = SimulatedProvider("2x24GiB", host="whole-gpu-host", control=broker)
    gate = Gate(host="whole-gpu-host", provider=provider, ledger=Ledger(broker), config=AdmissionConfig(),
                gpu_uuids=None, cpu_threads=8, memory_total_mib=64 * GIB)
    whole = Requirement.from_options("whole_gpu", {"profile": "gpu"})
    control.use(0, 2 * GIB)
    control.use(1, 300)
    decision = gate.decide(whole, "whole-1")
    assert isinstance(decision, Admitted) and decision.gpus == (provider.snapshot()[1].uuid,)
    assert isinstance(gate.decide(whole, "whole-2"), Wait)  # GPU 1 is claimed, GPU 0 has a process on it
    control.use(0, 300)
    second = gate.decide(whole, "whole-2")
    assert isinstance(second, Admitted) and second.gpus == (provider.snapshot()[0].uuid,)


def test_a_gate_offers_the_best_few_gpus_first_and_the_rest_only_if_the_ledger_refused_them(broker):
    """Four candidates go to the ledger first; only when it refuses them all (it knows of memory
    the provider does not show yet) do the others go, in a second call — and one of them is taken."""
    provider = SimulatedProvider("8x24GiB", host="many-gpus")
    ledger = Ledger(broker)
    calls = []
    reserve_first = ledger.reserve_first
    ledger.reserve_first = lambda rid, options: calls.append(len(options)) or reserve_first(rid, options)
    gate = Gate(host="many-gpus", provider=provider, ledger=ledger, config=AdmissionConfig(), gpu_uuids=None,
                cpu_threads=8, memory_total_mib=64 * GIB)
    task = Requirement.from_options("ten", {"profile": "gpu", "vram": "10GiB"})
    idle = gate.decide(task, "idle")
    assert isinstance(idle, Admitted) and calls == [4]
    ledger.release(idle.reservation, idle.pools)
    for gpu in provider.snapshot():  # the ledger full everywhere but GPU 6; the provider shows nothing yet
        if gpu.index != 6:
            ledger.reserve(f"filler-{gpu.index}", [Claim(gpu_pool(gpu.uuid), 20 * GIB, 24 * GIB - 512)])
    calls.clear()
    stale = gate.decide(task, "stale")
    assert isinstance(stale, Admitted) and stale.gpus == (provider.snapshot()[6].uuid,) and calls == [4, 4]
    ledger.release(stale.reservation, stale.pools)
    assert ledger.reserve("filler-6", [Claim(gpu_pool(provider.snapshot()[6].uuid), 20 * GIB, 24 * GIB - 512)]) is None
    calls.clear()
    assert isinstance(gate.decide(task, "full"), Wait) and calls == [4, 4]
