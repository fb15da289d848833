"""Admission fails closed: a GPU task never runs on a worker that cannot see a GPU it fits, a
worker started for GPUs that finds none says why (log, state, status, alert, doctor) and takes no
GPU work, and a task needing two GPUs is never bounced between queues.

Real workers against a real Redis. With ``TASKMESH_SIMULATE_GPUS`` empty the NVML provider is used,
and nvidia-ml-py is not installed here, so it reports no GPU, as on a machine missing the library.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from taskmesh.app.rebalance import rebalance
from taskmesh.core.config import load_config
from taskmesh.core.gate import Admitted, Gate, Reroute
from taskmesh.core.need_queues import need_queue
from taskmesh.core.rebalance_policy import QueueView, WorkerView, assist_moves
from taskmesh.core.records import GpuRecord, WorkerRecord
from taskmesh.core.requirements import Requirement
from taskmesh.hardware.simulated import SimulatedProvider
from taskmesh.observe.status import collect_status
from taskmesh.state.memory_ledger import MemoryLedger
from taskmesh.state.registry import Registry

from .conftest import ROOT, queue_depth, wait_for_workers

HOST = socket.gethostname()
APP = "tests.apps.gpu_app"
NO_SUCH_GPU = "GPU-00000000-0000-0000-0000-000000000000"
no_nvml = pytest.mark.skipif(importlib.util.find_spec("pynvml") is not None,
                             reason="nvidia-ml-py is installed here, so NVML is not missing")


def start_worker(processes, tmp_path, queues: str, node: str, env: dict[str, str]):
    log = tmp_path / f"{node.split('@')[0]}.log"
    proc = processes.start(
        [sys.executable, "-m", "celery", "-A", APP, "worker", "-Q", queues, "-c", "1", "-n", node,
         "--loglevel", "WARNING"],
        env, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    return proc, log


def stats(app, node: str) -> dict:
    return app.control.inspect(destination=[node], timeout=5).stats()[node]["taskmesh"]


def active_queues(app, node: str) -> set[str]:
    replies = app.control.inspect(destination=[node], timeout=5).active_queues() or {}
    return {q["name"] for q in replies.get(node, [])}


def until(condition, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(0.2)
    return value


def runs(broker) -> list[str]:
    return [r.decode() for r in broker.lrange("test:runs", 0, -1)]


def doctor(**env: str) -> str:
    done = subprocess.run([sys.executable, "-m", "taskmesh", "doctor"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    return done.stdout


def gpu_task_stays_queued(gpu_app, broker, node: str) -> None:
    """A GPU task sent first and a CPU task sent after: the CPU one runs (the worker consumes and
    is healthy), the GPU one never runs there and still waits on ``gpu``."""
    gpu_task = gpu_app.ten_gib.delay(0.1, label="gpu")
    cpu_task = gpu_app.crunch.delay(0.1, label="cpu")
    assert cpu_task.get(timeout=60)["label"] == "cpu"
    time.sleep(2.0)  # one more heartbeat: time for a wrongly taken GPU task to have started
    assert runs(broker) == [cpu_task.id] and not gpu_task.ready()
    assert queue_depth(broker, "gpu") == 1
    assert "gpu" not in active_queues(gpu_app.app, node)
    return gpu_task


@pytest.mark.slow
@no_nvml
def test_a_gpu_worker_without_nvml_says_why_everywhere_and_runs_no_gpu_task(gpu_app, broker, processes, tmp_path):
    node = f"nonvml@{HOST}"
    proc, log = start_worker(processes, tmp_path, "gpu,cpu_intensive", node, {"TASKMESH_SIMULATE_GPUS": ""})
    wait_for_workers(gpu_app.app, [node])
    gpu_task = gpu_task_stays_queued(gpu_app, broker, node)

    reason = stats(gpu_app.app, node)["reasons"]["no_gpu"]
    assert "NVML unavailable" in reason and "nvidia-ml-py" in reason and "not consuming gpu" in reason
    (line,) = [line for line in log.read_text().splitlines() if "sees no GPU" in line]
    assert "ERROR" in line and "was started on gpu" in line and "NVML unavailable" in line
    status = json.loads(subprocess.run([sys.executable, "-m", "taskmesh", "-A", APP, "status", "--json"], cwd=ROOT,
                                       capture_output=True, text=True, timeout=60, check=True).stdout)
    (worker,) = [w for w in status["workers"] if w["node"] == node]
    assert "NVML unavailable" in worker["reasons"]["no_gpu"] and "gpu" not in worker["queues"]
    run = rebalance(gpu_app.app)
    assert any(d.get("kind") == "no_gpu" and d["target"] == f"no_gpu:{node}" for d in run["decisions"])
    assert any(a["kind"] == "no_gpu" for a in collect_status(gpu_app.app)["alerts"])
    assert "WARNING: no usable GPU: NVML unavailable" in doctor(TASKMESH_SIMULATE_GPUS="")

    # nothing was lost: a worker that has a GPU runs it
    start_worker(processes, tmp_path, "gpu", f"real@{HOST}", {"TASKMESH_SIMULATE_GPUS": "1x24GiB"})
    assert gpu_task.get(timeout=60)["label"] == "gpu"
    assert proc.poll() is None


@pytest.mark.slow
def test_cuda_visible_devices_naming_no_gpu_takes_no_gpu_work(gpu_app, broker, processes, tmp_path):
    node = f"nomatch@{HOST}"
    env = {"TASKMESH_SIMULATE_GPUS": "1x24GiB", "CUDA_VISIBLE_DEVICES": NO_SUCH_GPU}
    start_worker(processes, tmp_path, "gpu,cpu_intensive", node, env)
    wait_for_workers(gpu_app.app, [node])
    gpu_task_stays_queued(gpu_app, broker, node)
    reason = stats(gpu_app.app, node)["reasons"]["no_gpu"]
    assert f"CUDA_VISIBLE_DEVICES='{NO_SUCH_GPU}' names no GPU found here" in reason
    assert SimulatedProvider("1x24GiB").snapshot()[0].uuid in reason  # what it could have named
    assert "names no GPU found here" in doctor(**env)
    assert "MIG instance(s) MIG-0123" in doctor(TASKMESH_SIMULATE_GPUS="1x24GiB", CUDA_VISIBLE_DEVICES="MIG-0123")


@pytest.mark.slow
@no_nvml
def test_a_mixed_worker_without_a_gpu_runs_mixed_on_cpu_and_hands_gpu_tasks_on(gpu_app, broker, processes,
                                                                             tmp_path):
    node = f"mixed@{HOST}"
    start_worker(processes, tmp_path, "mixed", node, {"TASKMESH_SIMULATE_GPUS": ""})
    wait_for_workers(gpu_app.app, [node])
    gpu_task = gpu_app.ten_gib.apply_async((0.1,), {"label": "gpu"}, queue="mixed")
    mixed_task = gpu_app.blend.delay(0.1, label="mixed")
    ran = mixed_task.get(timeout=60)
    assert ran["label"] == "mixed" and ran["gpu_uuids"] == [] and ran["queue"] == "mixed"
    until(lambda: queue_depth(broker, "gpu") == 1, "the GPU task was not handed to queue gpu")
    time.sleep(2.0)
    assert runs(broker) == [mixed_task.id] and not gpu_task.ready()
    assert queue_depth(broker, "gpu") == 1 and stats(gpu_app.app, node)["counters"]["rerouted"] == 1  # no loop
    (reply,) = gpu_app.app.control.broadcast("taskmesh_assist", arguments={"queue": "gpu"}, destination=[node],
                                             reply=True, timeout=5)
    assert "sees no GPU" in reply[node]["error"]
    assert active_queues(gpu_app.app, node) == {"mixed"}


def test_the_rebalancer_never_sends_a_mixed_worker_without_a_gpu_to_gpu_work():
    config = load_config()
    gpu = QueueView(name="gpu", waiting=50, in_flight=0, oldest_age_s=10.0, mean_runtime_s=5.0, consumers=0,
                    capacity=0)

    def mixed(has_gpus: bool) -> WorkerView:
        return WorkerView(node=f"mixed@{HOST}", group="mixed", host=HOST, queues=("mixed",), assist=None,
                          pool="prefork", pool_size=1, threads_per_task=1, cpu_threads=2, has_gpus=has_gpus)

    assert [d.queue for d in assist_moves({"gpu": gpu}, [mixed(True)], config)] == ["gpu"]
    assert assist_moves({"gpu": gpu}, [mixed(False)], config) == []  # not even home to gpu when idle
    idle = QueueView(name="gpu", waiting=0, in_flight=0, oldest_age_s=None, mean_runtime_s=None, consumers=0,
                     capacity=0)
    assert assist_moves({"gpu": idle}, [mixed(False)], config) == []


def test_the_gate_never_admits_a_gpu_task_where_it_sees_no_gpu():
    gate = Gate(host=HOST, provider=SimulatedProvider("1x24GiB"), ledger=MemoryLedger(ttl_s=60),
                config=load_config().admission, gpu_uuids=(NO_SUCH_GPU,), cpu_threads=2, memory_total_mib=8192)
    gpu = Requirement.from_options("t", {"profile": "gpu", "vram": "4GiB"})
    assert gate.decide(gpu, "r1") == Reroute("gpu", "this worker sees no GPU")
    assert isinstance(gate.decide(Requirement.from_options("t", {"profile": "mixed"}), "r2"), Admitted)
    # sent to its CPU fallback, it runs as the fallback profile
    flexible = Requirement.from_options("t", {"profile": "gpu", "vram": "4GiB", "fallback": "cpu"})
    assert isinstance(gate.decide(flexible.as_fallback(), "r3"), Admitted)


def test_a_need_queue_carries_the_gpu_count():
    two = Requirement.from_options("t", {"profile": "gpu", "vram": "4GiB", "gpus": 2})
    assert need_queue(two) == "gpu.x2.4096MiB"
    assert need_queue(Requirement.from_options("t", {"profile": "gpu", "vram": "4GiB"})) == "gpu.4096MiB"


@pytest.mark.slow
def test_a_two_gpu_task_runs_once_where_two_gpus_are_and_never_loops_on_one(gpu_app, broker, processes, tmp_path):
    one = f"one@{HOST}"
    start_worker(processes, tmp_path, "gpu", one, {"TASKMESH_SIMULATE_GPUS": "1x24GiB"})
    wait_for_workers(gpu_app.app, [one])
    gone = WorkerRecord(node=f"gone@{HOST}", incarnation="earlier", host=HOST, queues=("gpu",), cpu_threads=2,
                        memory_total_mib=8192, gpus=tuple(GpuRecord(f"GPU-gone-{i}", i, "sim", 24576, (8, 9))
                                                          for i in range(2)))
    Registry(broker).stopped(gone)  # a two-GPU worker seen today, now stopped: the send is not refused
    result = gpu_app.two_gpus.apply_async((0.2,), {"label": "two"}, queue="gpu")
    name = "gpu.x2.4096MiB"
    until(lambda: stats(gpu_app.app, one)["counters"].get("rerouted"), "the task was never handed on")
    # prove the worker subscribes to need queues it can serve, after the two-GPU one was registered
    Registry(broker).register_need_queue("gpu.1024MiB", Requirement.from_options("t", {"profile": "gpu",
                                                                                        "vram": "1GiB"}))
    until(lambda: "gpu.1024MiB" in active_queues(gpu_app.app, one), "need queues were never subscribed")
    time.sleep(2.0)
    assert name not in active_queues(gpu_app.app, one)
    assert stats(gpu_app.app, one)["counters"].get("rerouted") == 1  # once, not back and forth
    assert queue_depth(broker, name) == 1 and runs(broker) == []  # waiting where only two GPUs take it

    two = f"two@{HOST}"
    start_worker(processes, tmp_path, "gpu", two, {"TASKMESH_SIMULATE_GPUS": "2x24GiB"})
    ran = result.get(timeout=60)
    assert ran["label"] == "two" and len(set(ran["gpu_uuids"])) == 2 and ran["queue"] == name
    assert runs(broker) == [result.id]
    assert stats(gpu_app.app, one)["counters"].get("rerouted") == 1
