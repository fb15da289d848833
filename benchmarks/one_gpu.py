"""Scenario 10: one machine, one simulated 24 GiB GPU that runs out of memory — taskmesh
against plain Celery configured well, on the issue's mix.

The mix: shuffled GPU tasks of 3–18 GiB, 1 s each (``packing.mix``, the same as the
simulated scenario 9). Each task takes its memory on a simulated device that fails an
allocation past its capacity, as CUDA would (``device_apps``), for every system alike:

- ``taskmesh``: ``taskmesh worker --profile gpu`` with ``slots`` pool slots on the GPU;
  admission (and backfill, ``admission.backfill``) decides what starts; defaults otherwise;
- ``taskmesh_lookahead``: the same with ``admission.lookahead`` set to ``lookahead``: the
  worker holds that many messages beyond its slots, to pick the best fit among them;
- ``plain_typed_safe``: plain ``celery worker -Q gpu -c 1`` (routed by task name, late
  acks, prefetch 1): one task at a time, never out of memory, never packed;
- ``plain_typed_packed``: the same with ``-c <slots>``: packs blindly.

Per system: makespan from the first send to the last end, tasks completed, OOM
failures, GPU memory-time utilisation (GiB×s of the tasks that ran over 24 GiB ×
makespan) and the ratio to the packing lower bound (``synthetic.lower_bound``).
"""

from __future__ import annotations

import collections
import socket
import time
from typing import Any

import redis

from benchmarks import device_apps
from benchmarks.harness import LocalRedis, Processes, python_argv, wait_for_records, wait_for_workers
from benchmarks.packing import mix
from benchmarks.scenario import Context, Result, ratio
from benchmarks.synthetic import Host, lower_bound
from benchmarks.systems import start_taskmesh, taskmesh_env
from taskmesh.app.celery_app import BROKER_ENV
from taskmesh.core.config import AdmissionConfig

TITLE = "One machine, one simulated 24 GiB GPU that runs out of memory: taskmesh against plain Celery"
SYSTEMS = ("taskmesh", "taskmesh_lookahead", "plain_typed_safe", "plain_typed_packed")
FULL: dict[str, Any] = {"tasks": 40, "min_gib": 3, "max_gib": 18, "seconds": 1.0, "gpu_gib": 24, "slots": 4,
                        "seed": 1, "lookahead": 2, "systems": list(SYSTEMS)}
SMOKE: dict[str, Any] = {**FULL, "tasks": 8, "seconds": 0.3, "systems": ["taskmesh", "plain_typed_packed"]}
TASKMESH_APP = "benchmarks.device_apps:taskmesh_app"
PLAIN_APP = "benchmarks.device_apps:plain_app"


def workload(params: dict[str, Any]) -> list[tuple[int, float]]:
    """(GiB, seconds) of every task, in the order sent."""
    if not device_apps.SIZES_GIB[0] <= params["min_gib"] <= params["max_gib"] <= device_apps.SIZES_GIB[-1]:
        raise ValueError(f"one_gpu: min_gib/max_gib must lie within {device_apps.SIZES_GIB[0]}-"
                         f"{device_apps.SIZES_GIB[-1]} (the sizes device_apps registers)")
    _, jobs = mix(params["tasks"], params["min_gib"], params["max_gib"], params["seconds"], params["seed"])
    return [(params["min_gib"] + size, seconds) for size, seconds in jobs]


def packing_bound(params: dict[str, Any]) -> dict[str, float]:
    reqs, jobs = mix(params["tasks"], params["min_gib"], params["max_gib"], params["seconds"], params["seed"])
    fleet = [Host("one", "l4", f"1x{params['gpu_gib']}GiB")]
    return lower_bound(fleet, jobs, reqs, params["slots"], AdmissionConfig().safety_margin_mib)


def run(params: dict[str, Any], ctx: Context) -> Result:
    unknown = set(params["systems"]) - set(SYSTEMS)
    if unknown:
        raise ValueError(f"one_gpu.systems: {sorted(unknown)} unknown; use some of {list(SYSTEMS)}")
    tasks = workload(params)
    bound = packing_bound(params)
    result = Result("one_gpu", TITLE, params=params)
    with LocalRedis() as server:
        for system in params["systems"]:
            server.client().flushall()
            row = run_system(system, params, tasks, server.url, ctx)
            row["vs_bound"] = ratio(row["makespan_s"], bound["bound_s"])
            result.rows.append({"system": system, **row})
    result.metrics["bound"] = bound
    by = {row["system"]: row for row in result.rows}
    if "taskmesh" in by:
        result.metrics.update(taskmesh_vs_bound=by["taskmesh"]["vs_bound"], taskmesh_oom=by["taskmesh"]["oom"])
        result.target("taskmesh_vs_bound", "<= 1.10")
        result.target("taskmesh_oom", "<= 0")
        if "plain_typed_safe" in by:
            result.metrics["speedup_vs_safe"] = ratio(by["plain_typed_safe"]["makespan_s"],
                                                      by["taskmesh"]["makespan_s"])
            result.target("speedup_vs_safe", ">= 1.8")
    if "taskmesh_lookahead" in by:
        result.metrics["lookahead_vs_bound"] = by["taskmesh_lookahead"]["vs_bound"]
    result.notes.append(f"bound {bound['bound_s']} s = max(memory x time / (GPU less the 512 MiB safety margin), "
                        f"tasks x time / {params['slots']} slots, longest task); makespan from the first send "
                        "to the last task's end; mem_util = GiB x s of tasks that ran / (GPU GiB x makespan)")
    return result


def run_system(system: str, params: dict[str, Any], tasks: list[tuple[int, float]], broker: str,
               ctx: Context) -> dict[str, Any]:
    logdir = ctx.logdir("one_gpu", system)
    capacity = params["gpu_gib"] * 1024
    env = {BROKER_ENV: broker, device_apps.DEVICE_MIB_ENV: str(capacity)}
    with Processes(logdir, env) as procs:
        if system.startswith("taskmesh"):
            env.update(taskmesh_env(broker, gpus=1, gpu_slots=params["slots"], gpu_memory=f"{params['gpu_gib']}GiB"))
            if system == "taskmesh_lookahead":
                env["TASKMESH_LOOKAHEAD"] = str(params["lookahead"])
            app = device_apps.make_taskmesh_app(broker)
            nodes = [spec.nodename for spec in start_taskmesh(procs, app, ["gpu"], env, logdir, TASKMESH_APP)]
        else:
            app = device_apps.make_plain_app(broker)
            concurrency = 1 if system == "plain_typed_safe" else params["slots"]
            node = f"{system}@{socket.gethostname()}"
            procs.start(system, python_argv("celery", "-A", PLAIN_APP, "worker", "-P", "prefork", "-c",
                                            str(concurrency), "-Q", device_apps.QUEUE, "-n", node,
                                            "--loglevel", "WARNING"))
            nodes = [node]
        wait_for_workers(app, nodes, procs)
        started = time.time()
        for label, (gib, seconds) in enumerate(tasks):
            app.tasks[device_apps.task_name(gib)].apply_async((gib, seconds, label))
        records = wait_for_records(redis.Redis.from_url(broker), len(tasks),
                                   timeout=120 + 4 * sum(s for _, s in tasks), procs=procs)
    end = max(r["ended"] for r in records)
    outcomes = collections.Counter(r["outcome"] for r in records)
    area = sum(r["size"] * (r["ended"] - r["started"]) for r in records if r["outcome"] == "ok")
    makespan = end - started
    return {"tasks": len(records), "completed": outcomes["ok"], "oom": outcomes["oom"],
            "makespan_s": round(makespan, 2), "mem_util": ratio(area, params["gpu_gib"] * makespan)}
