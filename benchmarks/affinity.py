"""Scenario 13: warm-model affinity on two simulated 24 GiB GPUs — a shuffled stream of
tasks for three models that load in 2, 5 and 10 s (``model_gib`` each, 8: one GPU cannot
hold all three beside a task), with affinity on and off, against a lower bound.

- ``affinity``: ``taskmesh worker --profile gpu`` (one worker per GPU, one slot each);
  a warm model's tasks go to its model queue (``core.model_queues``);
- ``off``: the same with ``TASKMESH_AFFINITY=false``: every task goes to ``gpu`` and any
  GPU takes it, loading (and evicting for) its model.

The stream is sent at one task every ``interval_s``, shuffled (``seed``). Per mode: loads
done and seconds spent loading (the models' own counters, ``state.models``), makespan
from the first send to the last task's end, and its ratio to the bound: each model loaded
once and every task run, spread over the GPUs, and no sooner than the last arrival.
"""

from __future__ import annotations

import random
import time
from typing import Any

import redis

from benchmarks import model_apps
from benchmarks.harness import LocalRedis, Processes, wait_for_records, wait_for_workers
from benchmarks.scenario import Context, Result, ratio
from benchmarks.systems import environ, start_taskmesh, taskmesh_env
from taskmesh.state.models import ModelStore

TITLE = "Warm-model affinity: three models (2/5/10 s loads) on two simulated GPUs, affinity on and off"
MODES = ("affinity", "off")
FULL: dict[str, Any] = {"tasks_per_model": 30, "task_s": 0.3, "interval_s": 0.1, "gpus": 2, "gpu_gib": 24,
                        "model_gib": 8, "load_scale": 1.0, "seed": 1, "modes": list(MODES)}
# the smoke run's models all fit on one GPU: it checks the harness, not eviction
SMOKE: dict[str, Any] = {**FULL, "tasks_per_model": 4, "task_s": 0.1, "load_scale": 0.2, "model_gib": 4}
APP = "benchmarks.model_apps:app"


def stream(params: dict[str, Any]) -> list[str]:
    """The model of each task, in the order sent."""
    models = [m for m in model_apps.LOAD_S for _ in range(params["tasks_per_model"])]
    random.Random(params["seed"]).shuffle(models)
    return models


def bound_s(params: dict[str, Any], models: list[str]) -> float:
    loads = sum(model_apps.LOAD_S.values()) * params["load_scale"]
    work = len(models) * params["task_s"]
    return round(max((work + loads) / params["gpus"], (len(models) - 1) * params["interval_s"] + params["task_s"]), 2)


def run(params: dict[str, Any], ctx: Context) -> Result:
    unknown = set(params["modes"]) - set(MODES)
    if unknown:
        raise ValueError(f"affinity.modes: {sorted(unknown)} unknown; use some of {list(MODES)}")
    models = stream(params)
    bound = bound_s(params, models)
    result = Result("affinity", TITLE, params=params)
    with LocalRedis() as server:
        for mode in params["modes"]:
            server.client().flushall()
            row = run_mode(mode, params, models, server.url, ctx)
            row["vs_bound"] = ratio(row["makespan_s"], bound)
            result.rows.append({"mode": mode, **row})
    by = {row["mode"]: row for row in result.rows}
    result.metrics["bound_s"] = bound
    if "affinity" in by:  # the targets
        result.metrics["affinity_vs_bound"] = by["affinity"]["vs_bound"]
        result.target("affinity_vs_bound", "<= 1.2")
        result.metrics["loads_vs_min"] = ratio(by["affinity"]["loads"], len(set(models)))  # one load per model
        result.target("loads_vs_min", "<= 1.2")
        if "off" in by:
            result.metrics["loads_saved"] = by["off"]["loads"] - by["affinity"]["loads"]
            result.metrics["speedup_vs_off"] = ratio(by["off"]["makespan_s"], by["affinity"]["makespan_s"])
            result.target("speedup_vs_off", ">= 2.0")
    result.notes.append(f"bound {bound} s = max((tasks x task_s + one load of each model) / {params['gpus']} GPUs, "
                        "the last arrival + task_s); loads and load_s from the models' own counters; makespan "
                        "from the first send to the last task's end")
    return result


def run_mode(mode: str, params: dict[str, Any], models: list[str], broker: str, ctx: Context) -> dict[str, Any]:
    logdir = ctx.logdir("affinity", mode)
    env = {**taskmesh_env(broker, gpus=params["gpus"], gpu_slots=1, gpu_memory=f"{params['gpu_gib']}GiB"),
           model_apps.SCALE_ENV: str(params["load_scale"]), model_apps.MODEL_GIB_ENV: str(params["model_gib"]),
           "TASKMESH_AFFINITY": "true" if mode == "affinity" else "false"}
    with environ(env):  # the producer reads TASKMESH_AFFINITY as the workers do
        app = model_apps.make_app(broker)
    with Processes(logdir, env) as procs:
        nodes = [spec.nodename for spec in start_taskmesh(procs, app, ["gpu"], env, logdir, APP)]
        wait_for_workers(app, nodes, procs)
        started = time.time()
        for label, model in enumerate(models):
            app.tasks[model_apps.task_name(model)].apply_async((params["task_s"], label))
            time.sleep(params["interval_s"])
        records = wait_for_records(redis.Redis.from_url(broker), len(models), procs=procs,
                                   timeout=120 + 4 * (len(models) * params["task_s"] + 17 * params["load_scale"]))
    loads = ModelStore(redis.Redis.from_url(broker)).loads()
    return {"tasks": len(records), "loads": int(sum(v.get("count", 0) for v in loads.values())),
            "load_s": round(sum(v.get("seconds", 0.0) for v in loads.values()), 1),
            "makespan_s": round(max(r["ended"] for r in records) - started, 2),
            "gpus_per_model": round(sum(len({tuple(r["gpus"]) for r in records if r["model"] == m})
                                        for m in model_apps.LOAD_S) / len(model_apps.LOAD_S), 2)}
