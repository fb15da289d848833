"""Scenario 1: total time of a mixed GPU / CPU / I-O workload, taskmesh against what a
team runs today, and against the lower bound no scheduler can beat on this machine.

The same shuffled list of tasks is submitted to each system in turn, each with its own
fresh workers on the same Redis. GPU tasks hold a simulated GPU slot (sleep), CPU
tasks burn a fixed number of CPU seconds, I/O tasks sleep. The lower bound is
``max(GPU work / GPU slots, CPU work / cores, I/O work / I/O concurrency)``: each
resource working flat out on its own share, with no cost for getting work to it.

The utilisation figures (scenario 5) are computed from the same runs.
"""

from __future__ import annotations

import random
import time
from typing import Any

import redis

from benchmarks import plain_app, tm_app
from benchmarks.harness import (
    CpuSampler,
    LocalRedis,
    Processes,
    cores,
    python_argv,
    wait_for_records,
    wait_for_workers,
)
from benchmarks.scenario import Context, Result, ratio
from benchmarks.systems import TASKMESH_APP, start_plain, start_taskmesh, taskmesh_env
from taskmesh.app.celery_app import BROKER_ENV

TITLE = "Mixed workload: total time against plain Celery and the lower bound"
FULL = {
    "gpus": 2, "gpu_slots": 1, "io_concurrency": 100, "seed": 7,
    "gpu_tasks": 24, "gpu_s": 2.0, "cpu_tasks": 48, "cpu_s": 1.0, "io_tasks": 100, "io_s": 0.5,
    "systems": ["taskmesh", "plain_typed_safe", "baseline", "taskmesh_all", "taskmesh_all_static"],
    "rebalance_interval_s": 1.0,
}
SMOKE = {**FULL, "gpus": 1, "gpu_tasks": 2, "gpu_s": 0.2, "cpu_tasks": 2, "cpu_s": 0.2, "io_tasks": 4, "io_s": 0.1,
         "systems": ["taskmesh", "plain_typed_safe", "baseline"]}
#: Worker groups per system: the groups this workload uses, or ``--profile all``.
GROUPS = {"taskmesh": ["gpu", "cpu_intensive", "cpu_light"], "taskmesh_all": ["all"], "taskmesh_all_static": ["all"]}
KINDS = ("gpu", "cpu", "io")


def workload(params: dict[str, Any]) -> list[tuple[str, float, int]]:
    """(kind, seconds, label) for every task, shuffled the same way for every system."""
    tasks = [(kind, params[f"{kind}_s"]) for kind in KINDS for _ in range(params[f"{kind}_tasks"])]
    random.Random(params["seed"]).shuffle(tasks)
    return [(kind, seconds, label) for label, (kind, seconds) in enumerate(tasks)]


def lower_bound(params: dict[str, Any], cpus: int) -> dict[str, float]:
    work = {kind: params[f"{kind}_tasks"] * params[f"{kind}_s"] for kind in KINDS}
    bounds = {
        "gpu": work["gpu"] / (params["gpus"] * params["gpu_slots"]),
        "cpu": work["cpu"] / cpus,
        "io": work["io"] / params["io_concurrency"],
    }
    return {**{f"{k}_bound_s": round(v, 3) for k, v in bounds.items()}, "bound_s": round(max(bounds.values()), 3),
            "baseline_bound_s": round(sum(work.values()) / cpus, 3)}


def run(params: dict[str, Any], ctx: Context) -> Result:
    result = Result("mixed", TITLE, params=params)
    cpus = cores()
    result.metrics.update(lower_bound(params, cpus), cores=cpus)
    runs: dict[str, dict[str, Any]] = {}
    with LocalRedis() as server:
        for system in params["systems"]:
            server.client().flushall()
            runs[system] = run_system(system, params, server.url, ctx, cpus)
    bound = result.metrics["bound_s"]
    for system, measured in runs.items():
        row = measured["row"]
        result.rows.append({"system": system, **row, "vs_bound": ratio(row["makespan_s"], bound)})
    result.metrics["runs"] = {system: measured["detail"] for system, measured in runs.items()}
    makespan = {system: measured["row"]["makespan_s"] for system, measured in runs.items()}
    result.metrics["baseline_over_taskmesh"] = ratio(makespan.get("baseline"), makespan.get("taskmesh"))
    result.metrics["taskmesh_over_bound"] = ratio(makespan.get("taskmesh"), bound)
    # plain Celery with a queue and a worker per kind of work: what queue separation alone buys
    result.metrics["typed_plain_over_taskmesh"] = ratio(makespan.get("plain_typed_safe"), makespan.get("taskmesh"))
    if "taskmesh_all" in makespan:
        result.metrics["taskmesh_all_over_bound"] = ratio(makespan["taskmesh_all"], bound)
    if "taskmesh_all_static" in makespan:  # the same stack without beat: what the rebalancer buys
        result.metrics["rebalancer_speedup"] = ratio(makespan["taskmesh_all_static"], makespan.get("taskmesh_all"))
    result.target("baseline_over_taskmesh", ">= 2.5")
    result.target("taskmesh_over_bound", "<= 1.15")
    result.notes.append(
        f"bound = max(GPU {result.metrics['gpu_bound_s']}s, CPU {result.metrics['cpu_bound_s']}s, "
        f"I/O {result.metrics['io_bound_s']}s); the baseline runs everything through {cpus} prefork slots, "
        f"so it cannot beat all work / cores = {result.metrics['baseline_bound_s']}s: the ratio to the "
        "baseline is set by the mix, the ratio to the bound is taskmesh's own quality"
    )
    return result


def run_system(system: str, params: dict[str, Any], broker: str, ctx: Context, cpus: int) -> dict[str, Any]:
    logdir = ctx.logdir("mixed", system)
    env = taskmesh_env(broker, params["gpus"], params["gpu_slots"])
    env["TASKMESH_IO_CONCURRENCY"] = str(params["io_concurrency"])
    with Processes(logdir, {BROKER_ENV: broker}) as procs:
        if system == "baseline":
            app = plain_app.make_app(broker)
            nodes = [start_plain(procs, broker, cpus, gpu_locks=params["gpus"] * params["gpu_slots"])]
            plan = [{"node": nodes[0], "queue": plain_app.QUEUE, "pool": "prefork", "concurrency": cpus}]
            names = plain_app.NAMES
        elif system == "plain_typed_safe":
            app, plan = plain_app.make_app(broker, mode="matched"), typed_plain_plan(params, cpus)
            for worker in plan:
                node = start_plain(procs, broker, worker["concurrency"], mode="matched", pool=worker["pool"],
                                   queue=worker["queue"], name=worker["queue"], gpu_locks=slots(params),
                                   env={plain_app.ROUTES_ENV: "typed"})
                worker["node"] = node
            app.conf.task_routes = {plain_app.NAMES[k]: {"queue": q} for k, q in plain_app.TYPED_QUEUES.items()}
            nodes = [worker["node"] for worker in plan]
            names = plain_app.NAMES
        else:
            app = tm_app.make_app(broker)
            if system == "taskmesh_all":  # the documented stack: every group, and beat running the rebalancer
                env["TASKMESH_REBALANCE_INTERVAL_S"] = str(params["rebalance_interval_s"])
                procs.start("beat", python_argv("celery", "-A", TASKMESH_APP, "beat", "-s",
                                                str(logdir / "beat-schedule"), "--loglevel", "WARNING"), env)
            specs = start_taskmesh(procs, app, GROUPS[system], env, logdir)
            nodes = [spec.nodename for spec in specs]
            plan = [{"node": s.nodename, "queue": s.queue, "pool": s.pool, "concurrency": s.concurrency}
                    for s in specs]
            names = tm_app.NAMES
        wait_for_workers(app, nodes, procs)
        tasks = workload(params)
        client = redis.Redis.from_url(broker)
        with CpuSampler() as sampler:
            started = time.time()
            for kind, seconds, label in tasks:
                app.tasks[names[kind]].apply_async((seconds, label))
            submitted = time.time()
            records = wait_for_records(client, len(tasks), timeout=120 + 3 * sum(s for _, s, _ in tasks), procs=procs)
    return summarise(records, started, submitted, sampler, params, cpus, plan)


def slots(params: dict[str, Any]) -> int:
    return params["gpus"] * params["gpu_slots"]


def typed_plain_plan(params: dict[str, Any], cpus: int) -> list[dict[str, Any]]:
    """Plain Celery configured well: a worker per queue, GPU slots one task each, CPU prefork
    sized to the cores, I/O on gevent (``task_routes`` by name; late acks, prefetch 1)."""
    queues = plain_app.TYPED_QUEUES
    return [{"queue": queues["gpu"], "pool": "prefork", "concurrency": slots(params)},
            {"queue": queues["cpu"], "pool": "prefork", "concurrency": cpus},
            {"queue": queues["io"], "pool": "gevent", "concurrency": params["io_concurrency"]}]


def summarise(records: list[dict[str, Any]], started: float, submitted: float, sampler: CpuSampler,
              params: dict[str, Any], cpus: int, plan: list[dict[str, Any]]) -> dict[str, Any]:
    by_kind = {kind: [r for r in records if r["kind"] == kind] for kind in KINDS}
    end = max(r["ended"] for r in records)
    done = {kind: round(max((r["ended"] for r in rs), default=started) - started, 3) for kind, rs in by_kind.items()}
    gpu_window = done["gpu"]
    gpu_busy = sum(r["ended"] - r["started"] for r in by_kind["gpu"])
    slots = params["gpus"] * params["gpu_slots"]
    cpu_last_start = max((r["started"] for r in by_kind["cpu"]), default=started)
    cpu_window = done["cpu"]
    utilisation = {
        "gpu_busy": ratio(gpu_busy, slots * gpu_window),
        "cpu_util_while_cpu_waiting": _percent(sampler.mean(started, cpu_last_start)),
        "cpu_util_whole_run": _percent(sampler.mean(started, end)),
        "cpu_useful": ratio(sum(r["cpu_s"] for r in by_kind["cpu"]), cpus * cpu_window),
        "gpus_used": sorted({g for r in by_kind["gpu"] for g in r["gpus"]}),
    }
    row = {"makespan_s": round(end - started, 3), "submit_s": round(submitted - started, 3),
           **{f"{kind}_done_s": done[kind] for kind in KINDS}}
    return {"row": row, "detail": {**row, "plan": plan, "utilisation": utilisation,
                                   "cpu_samples": [(round(t - started, 2), p) for t, p in sampler.samples]}}


def _percent(value: float | None) -> float | None:
    return None if value is None else round(value / 100, 3)
