"""Scenario 4: what one decision costs, and how it grows with GPUs and queued tasks.

* router: ``route_by_profile`` and the app's whole Celery router, per call;
* producer: ``SubmitPolicy.prepare`` for a GPU task (feasibility against the worker
  registry, need-queue choice), with and without a ``max_depth`` (a depth read per send);
* admission: ``Gate.decide`` + ``Ledger.release`` against this scenario's Redis, with a
  ``SimulatedProvider`` read through Redis as a worker reads it, for a worker seeing
  1, 8 or 64 GPUs, with 0 or 10k tasks queued, on an idle fleet, a busy one (all GPUs
  but one full, as both the ledger and the provider see it) and a stale one (the ledger
  full but the provider not showing it yet: the decision tries every GPU).

Each call is timed on its own (``perf_counter_ns``); the timer's own cost is reported.
"""

from __future__ import annotations

import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import tm_app
from benchmarks.harness import LocalRedis, percentile
from benchmarks.scenario import Context, Result
from taskmesh.app.routing import route_by_profile
from taskmesh.core.claims import Claim, gpu_pool
from taskmesh.core.config import AdmissionConfig
from taskmesh.core.gate import Admitted, Gate
from taskmesh.core.records import GpuRecord, WorkerRecord
from taskmesh.hardware.simulated import SimulatedProvider, SimulationControl
from taskmesh.state.ledger import Ledger
from taskmesh.state.memory_ledger import MemoryLedger
from taskmesh.state.registry import Registry

TITLE = "Decision cost: router, producer checks and admission, by GPUs and queued tasks"
FULL = {"iterations": 5000, "router_iterations": 100000, "gpus": [1, 8, 64], "queued": [0, 10000],
        "occupancy": ["idle", "busy", "stale"]}
SMOKE = {**FULL, "iterations": 50, "router_iterations": 1000, "queued": [0, 100]}
GIB = 1024
HOST = "bench-decision"


def timed(call: Any, iterations: int) -> list[float]:
    """Microseconds per call, each call timed on its own."""
    out = []
    for _ in range(iterations):
        start = time.perf_counter_ns()
        call()
        out.append((time.perf_counter_ns() - start) / 1000)
    return out


def stats(samples: list[float]) -> dict[str, float]:
    return {"p50_us": round(percentile(samples, 50), 2), "p99_us": round(percentile(samples, 99), 2)}


def announce_fleet(client: Any, gpus: int) -> None:
    """Register one simulated worker per GPU, as real GPU workers announce themselves."""
    client.delete("taskmesh:workers")
    registry = Registry(client)
    for gpu in SimulatedProvider(f"{gpus}x24GiB", host=HOST).snapshot():
        registry.announce(WorkerRecord(
            node=f"gpu{gpu.index}@{HOST}", incarnation="bench", host=HOST, queues=("gpu",),
            gpus=(GpuRecord(gpu.uuid, gpu.index, gpu.name, gpu.memory_total_mib, gpu.compute_capability),),
            cpu_threads=64, memory_total_mib=512 * GIB))


def run(params: dict[str, Any], ctx: Context) -> Result:
    result = Result("decision", TITLE, params=params)
    empty = timed(lambda: None, params["router_iterations"])
    result.metrics["timer_overhead_us"] = stats(empty)
    with LocalRedis() as server:
        app = tm_app.make_app(server.url)
        task = app.tasks[tm_app.NAMES["gpu"]]
        router = app.amqp.router
        result.rows.append({"part": "route_by_profile", **stats(timed(
            lambda: route_by_profile(task.name, (), {}, {}, task=task), params["router_iterations"]))})
        result.rows.append({"part": "app router", **stats(timed(
            lambda: router.route({}, task.name, (), {}, task), params["router_iterations"]))})
        result.metrics["router_p99_us"] = result.rows[0]["p99_us"]
        result.metrics["app_router_p99_us"] = result.rows[1]["p99_us"]
        client = server.client()
        result.rows.append({"part": "redis PING (reference)", **stats(timed(client.ping, params["iterations"]))})
        admission: dict[str, float] = {}
        for queued in params["queued"]:
            fill_queue(app, task, queued)
            for gpus in params["gpus"]:
                announce_fleet(client, gpus)
                result.rows += producer_rows(server.url, gpus, queued, params["iterations"])
                for occupancy in params["occupancy"]:
                    row = admission_row(client, gpus, queued, occupancy, params["iterations"])
                    result.rows.append(row)
                    if occupancy != "stale":
                        admission[f"{gpus}"] = max(admission.get(f"{gpus}", 0.0), row["p99_us"])
                if queued == params["queued"][0]:  # the same decisions with no Redis: what is Python's
                    result.rows.append(admission_row(None, gpus, queued, "idle", params["iterations"]))
    result.metrics["admission_p99_us"] = max(admission.values())
    result.metrics["admission_p99_us_by_gpus"] = admission
    result.target("router_p99_us", "<= 50")
    result.target("admission_p99_us", "<= 1000")
    result.notes.append("admission rows: p50/p99 of decide+release; admission_p99_us is the worst of the idle and busy "
                        "fleets; the stale rows show the worst case, when the provider has not yet seen memory "
                        "the ledger already gave out; compare with the Redis PING row: each admission is 2-3 "
                        "round trips (provider HGETALL, reserve script, release)")
    return result


def fill_queue(app: Any, task: Any, count: int) -> None:
    """*count* real messages waiting in the GPU queue (no worker consumes them)."""
    stale = app.redis().keys("gpu*")
    if stale:
        app.redis().delete(*stale)
    for label in range(count):
        task.apply_async((0.0, label))


def producer_rows(broker: str, gpus: int, queued: int, iterations: int) -> list[dict[str, Any]]:
    """``prepare`` as configured by default, then with a ``max_depth`` on the gpu queue."""
    with tempfile.TemporaryDirectory() as tmp:
        limited = Path(tmp) / "bench.yaml"
        limited.write_text("queues:\n  gpu: {max_depth: 1000000000}\n")
        rows = []
        for part, hardware in (("producer prepare", None), ("producer prepare + max_depth", limited)):
            prepare = sending(tm_app.make_app(broker, hardware))
            rows.append({"part": part, "gpus": gpus, "queued": queued, **stats(timed(prepare, iterations))})
    return rows


def sending(app: Any) -> Any:
    """One producer check of a GPU task, as ``apply_async`` makes it (fresh options each time)."""
    task, policy = app.tasks[tm_app.NAMES["gpu"]], app.submit_policy()
    return lambda: policy.prepare(task.name, task.requirement, {})


def admission_row(client: Any, gpus: int, queued: int, occupancy: str, iterations: int) -> dict[str, Any]:
    """Decide + release in a loop; with *client* None, on the in-memory ledger and a provider read from memory."""
    config = AdmissionConfig()
    if client is None:
        gate = Gate(host=HOST, provider=SimulatedProvider(f"{gpus}x24GiB", host=HOST), ledger=MemoryLedger(),
                    config=config, gpu_uuids=None, cpu_threads=64, memory_total_mib=512 * GIB)
        return {**_admit_loop(gate, iterations), "part": f"admission ({occupancy}, no Redis)", "gpus": gpus}
    control = SimulationControl(client, host=HOST)
    control.reset()
    client.delete(*client.keys("taskmesh:ledger:*") or ["none"])
    provider = SimulatedProvider(f"{gpus}x24GiB", host=HOST, control=client)
    filler = Ledger(client, ttl_s=3600)
    full = 24 * GIB - config.safety_margin_mib
    for gpu in provider.snapshot()[:-1] if occupancy != "idle" else ():
        filler.reserve(f"filler-{gpu.index}", [Claim(gpu_pool(gpu.uuid), full, full)])
        if occupancy == "busy":
            control.use(gpu.index, 24 * GIB)
    gate = Gate(host=HOST, provider=provider, ledger=Ledger(client), config=config, gpu_uuids=None,
                cpu_threads=64, memory_total_mib=512 * GIB)
    return {"part": f"admission ({occupancy})", "gpus": gpus, "queued": queued, **_admit_loop(gate, iterations)}


def _admit_loop(gate: Gate, iterations: int) -> dict[str, Any]:
    requirement = tm_app.app.tasks[tm_app.NAMES["gpu"]].requirement
    decide, release = [], []
    for i in range(iterations):
        start = time.perf_counter_ns()
        decision = gate.decide(requirement, f"{socket.gethostname()}/{i}")
        middle = time.perf_counter_ns()
        if not isinstance(decision, Admitted):
            raise RuntimeError(f"admission on {len(gate.known)} GPUs did not admit: {decision}")
        gate.ledger.release(decision.reservation, decision.pools)
        end = time.perf_counter_ns()
        decide.append((middle - start) / 1000)
        release.append((end - middle) / 1000)
    total = [d + r for d, r in zip(decide, release, strict=True)]
    return {**stats(total), "decide_p50_us": round(percentile(decide, 50), 1),
            "decide_p99_us": round(percentile(decide, 99), 1), "release_p99_us": round(percentile(release, 99), 1)}
