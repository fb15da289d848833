"""Scenario 9: where one Redis stops being enough — Redis's own CPU time per GPU task and
per idle worker, measured on a real redis-server, and the fleet size that follows.

Redis runs commands on one thread, so its CPU seconds are the budget: a fleet whose
workers and producers make Redis busier than one core cannot go faster, whatever the
GPUs could do. The figures read Redis's ``INFO cpu`` and ``INFO commandstats`` around
two phases (less what Redis spends alone), with every command Celery, kombu and taskmesh send included (the producer's
submit checks too): an idle phase (heartbeats, leases, kombu's polling) and a drain of
zero-second GPU tasks through admission. The model: a GPU running ``slots`` tasks of
``L`` seconds at a time costs Redis ``slots / L`` tasks' worth per second plus one idle
worker's worth, and ``headroom`` of one core is what the fleet may use.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from benchmarks import tm_app
from benchmarks.harness import LocalRedis, Processes, wait_for_records, wait_for_workers
from benchmarks.scenario import Context, Result
from benchmarks.systems import start_taskmesh, taskmesh_env
from taskmesh.app.celery_app import BROKER_ENV

TITLE = "Capacity: Redis CPU per GPU task and per idle worker, and the GPUs one Redis core serves"
FULL = {"tasks": 3000, "gpus": 4, "slots": 4, "idle_s": 30, "task_s": [1, 10, 60], "headroom": 0.5}
SMOKE = {**FULL, "tasks": 40, "gpus": 1, "slots": 2, "idle_s": 2}


def redis_load(client: redis.Redis) -> tuple[float, dict[str, tuple[int, int]]]:
    """Redis's CPU seconds so far (user + system, every thread), and per command the calls and
    microseconds spent so far."""
    cpu = client.info("cpu")
    commands = {name.removeprefix("cmdstat_"): (int(stat["calls"]), int(stat["usec"]))
                for name, stat in client.info("commandstats").items()}
    return cpu["used_cpu_user"] + cpu["used_cpu_sys"], commands


def total_calls(commands: dict[str, tuple[int, int]]) -> int:
    return sum(count for count, _ in commands.values())


def costliest(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], tasks: int) -> dict[str, Any]:
    """The five commands that took Redis longest in between, as calls and microseconds per task."""
    spent = {name: (calls - before.get(name, (0, 0))[0], usec - before.get(name, (0, 0))[1])
             for name, (calls, usec) in after.items()}
    top = sorted(spent.items(), key=lambda item: -item[1][1])[:5]
    return {name: {"calls": round(calls / tasks, 2), "us": round(usec / tasks, 1)} for name, (calls, usec) in top}


def run(params: dict[str, Any], ctx: Context) -> Result:
    result = Result("capacity", TITLE, params=params)
    logdir = ctx.logdir("capacity")
    with LocalRedis() as server, Processes(logdir, {BROKER_ENV: server.url}) as procs:
        client = server.client()
        alone0 = redis_load(client)[0]
        time.sleep(params["idle_s"])
        alone = (redis_load(client)[0] - alone0) / params["idle_s"]  # Redis's own housekeeping, no worker
        app = tm_app.make_app(server.url)
        env = taskmesh_env(server.url, gpus=params["gpus"], gpu_slots=params["slots"], gpu_memory="80GiB")
        specs = start_taskmesh(procs, app, ["gpu"], env, logdir)
        wait_for_workers(app, [s.nodename for s in specs], procs)
        time.sleep(2)  # past the workers' first announcements
        cpu0, seen0 = redis_load(client)
        time.sleep(params["idle_s"])
        cpu1, seen1 = redis_load(client)
        idle_cpu = ((cpu1 - cpu0) / params["idle_s"] - alone) / len(specs)
        idle_calls = (total_calls(seen1) - total_calls(seen0)) / params["idle_s"] / len(specs)

        task = app.tasks[tm_app.NAMES["gpu"]]
        started = time.monotonic()
        for label in range(params["tasks"]):
            task.apply_async((0.0, label))
        wait_for_records(client, params["tasks"], timeout=60 + params["tasks"] / 5, procs=procs)
        elapsed = time.monotonic() - started
        cpu2, seen2 = redis_load(client)
        result.metrics["per_task_by_command"] = costliest(seen1, seen2, params["tasks"])
    idle_share = (idle_cpu * len(specs) + alone) * elapsed
    per_task_cpu = max(0.0, cpu2 - cpu1 - idle_share) / params["tasks"]
    per_task_calls = (total_calls(seen2) - total_calls(seen1) - idle_calls * len(specs) * elapsed) / params["tasks"]
    result.metrics.update(
        redis_cpu_us_per_task=round(per_task_cpu * 1e6, 1),
        redis_commands_per_task=round(per_task_calls, 1),
        redis_cpu_us_per_idle_worker_s=round(idle_cpu * 1e6, 1),
        redis_cpu_us_per_s_alone=round(alone * 1e6, 1),
        redis_commands_per_idle_worker_s=round(idle_calls, 1),
        redis_core_tasks_per_s=round(params["headroom"] / per_task_cpu) if per_task_cpu else None,
        drain_tasks_per_s=round(params["tasks"] / elapsed, 1),
    )
    for seconds in params["task_s"]:
        per_gpu = params["slots"] / seconds * per_task_cpu + idle_cpu
        result.rows.append({"task_s": seconds, "slots_per_gpu": params["slots"],
                            "redis_cpu_ms_per_gpu_s": round(per_gpu * 1e3, 3),
                            "gpus_per_redis_core": round(params["headroom"] / per_gpu) if per_gpu else None})
    result.notes.append(f"gpus_per_redis_core: GPUs (one worker each, always busy) whose Redis load fits "
                        f"{params['headroom']:.0%} of one core; the drain was bounded by this machine's "
                        f"{len(specs)} worker(s), not by Redis")
    return result
