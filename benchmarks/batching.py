"""Scenario: micro-batching — items per second for a body costing ``a + b·n`` (a fixed
per-call cost, as a GPU forward pass has), taskmesh with ``batch_size`` 1, 8 and 32
against plain Celery running one task per item; same machine, same Redis, one pool
process each (one GPU slot), rounds interleaved.

Throughput: N items are sent to an idle worker's queue, then it is told to consume it
(``add_consumer``) and timed until the queue and Redis's unacked hash are empty. Latency:
items are sent at a steady rate (half of plain Celery's measured rate, so every system
is under capacity) to a consuming worker, and each item's time from send to the end of
the call that ran it is read back; the issue's target is p99 ≤ ``batch_wait`` + one
batch's run time.
"""

from __future__ import annotations

import json
import socket
import statistics
import time
from typing import Any

import redis

from benchmarks.batch_apps import BATCH_WAIT, LATENCY_KEY, PLAIN_QUEUE, SIZES, cost, make_plain, make_tm
from benchmarks.harness import LocalRedis, Processes, percentile, python_argv, wait_for_workers
from benchmarks.overhead import backlog
from benchmarks.scenario import Context, Result, ratio
from taskmesh.app.celery_app import BROKER_ENV
from taskmesh.core.batching import parse_seconds

TITLE = "Micro-batching: items/s for a body costing a + b*n, batch_size 1/8/32 against plain Celery"
FULL = {"items": 640, "pairs": 2, "a_s": 0.02, "b_s": 0.001, "latency_seconds": 4.0}
SMOKE = {**FULL, "items": 32, "pairs": 1, "latency_seconds": 0.5}
FLAGS = ("--without-mingle", "--without-gossip")


def start(procs: Processes, broker: str, name: str, app_path: str, env: dict[str, str]) -> str:
    node = f"{name}@{socket.gethostname()}"
    procs.start(name, python_argv("celery", "-A", app_path, "worker", "-P", "prefork", "-c", "1", "-Q",
                                  f"bench.idle.{name}", "-n", node, "--loglevel", "WARNING", *FLAGS),
                {BROKER_ENV: broker, **env})
    return node


def drain(app: Any, node: str, queue: str, client: redis.Redis, seconds_max: float) -> float:
    started = time.perf_counter()
    app.control.add_consumer(queue, destination=[node], reply=True, timeout=10)
    deadline = time.monotonic() + seconds_max
    while backlog(client, queue):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{node} did not drain {queue} in {seconds_max:.0f}s")
        time.sleep(0.005)
    return time.perf_counter() - started


def throughput(system: dict[str, Any], count: int, client: redis.Redis) -> float:
    task, queue = system["task"], system["queue"]
    for _ in range(count):
        task.apply_async((time.time(),), **system["options"])
    seconds = drain(system["app"], system["node"], queue, client, 60 + count * cost(1) * 2)
    system["app"].control.cancel_consumer(queue, destination=[system["node"]], reply=True, timeout=10)
    return count / seconds


def latencies(system: dict[str, Any], rate: float, seconds: float, client: redis.Redis) -> list[float]:
    client.delete(LATENCY_KEY)
    app, queue, node = system["app"], system["queue"], system["node"]
    app.control.add_consumer(queue, destination=[node], reply=True, timeout=10)
    count = max(1, int(rate * seconds))
    started = time.monotonic()
    for i in range(count):
        time.sleep(max(0.0, started + i / rate - time.monotonic()))
        system["task"].apply_async((time.time(),), **system["options"])
    deadline = time.monotonic() + 60 + seconds
    while client.llen(LATENCY_KEY) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    app.control.cancel_consumer(queue, destination=[node], reply=True, timeout=10)
    return [ended - sent for sent, ended in (json.loads(r) for r in client.lrange(LATENCY_KEY, 0, -1))]


def run(params: dict[str, Any], ctx: Context) -> Result:
    result = Result("batching", TITLE, params=params)
    env = {"TASKMESH_BENCH_A_S": str(params["a_s"]), "TASKMESH_BENCH_B_S": str(params["b_s"]),
           "TASKMESH_SIMULATE_GPUS": "1x24GiB"}
    rates: dict[str, list[float]] = {}
    with LocalRedis() as server, Processes(ctx.logdir("batching"), env) as procs:
        tm, plain = make_tm(server.url), make_plain(server.url)
        systems = [{"name": "plain_celery", "app": plain, "task": plain.tasks["benchmarks.batch_apps.plain"],
                    "queue": PLAIN_QUEUE, "options": {"queue": PLAIN_QUEUE},
                    "node": start(procs, server.url, "plain_celery", "benchmarks.batch_apps:plain", env)}]
        node = start(procs, server.url, "taskmesh", "benchmarks.batch_apps:tm", env)
        systems += [{"name": f"batch_size_{size}", "app": tm, "task": tm.tasks[f"benchmarks.batch_apps.batch{size}"],
                     "queue": "gpu", "options": {}, "node": node} for size in SIZES]
        wait_for_workers(tm, [systems[0]["node"], node], procs)
        client = server.client()
        for _ in range(params["pairs"]):
            for system in systems:
                rates.setdefault(system["name"], []).append(throughput(system, params["items"], client))
        plain_rate = statistics.median(rates["plain_celery"])
        rate = plain_rate / 2
        for system in systems:
            found = sorted(latencies(system, rate, params["latency_seconds"], client))
            size = int(system["name"].rsplit("_", 1)[1]) if system["name"] != "plain_celery" else 1
            bound = (parse_seconds(BATCH_WAIT) if system["name"] != "plain_celery" else 0) + cost(size)
            result.rows.append({
                "system": system["name"], "items_per_s": round(statistics.median(rates[system["name"]]), 1),
                "vs_plain": ratio(statistics.median(rates[system["name"]]), plain_rate),
                "latency_rate_per_s": round(rate, 1), "p50_ms": round(percentile(found, 50) * 1000, 1),
                "p99_ms": round(percentile(found, 99) * 1000, 1),
                "p99_bound_ms": round(bound * 1000, 1), "items_timed": len(found),
            })
    by_name = {row["system"]: row for row in result.rows}
    result.metrics["batch32_vs_plain"] = by_name["batch_size_32"]["vs_plain"]
    result.metrics["batch32_p99_over_bound"] = ratio(by_name["batch_size_32"]["p99_ms"],
                                                     by_name["batch_size_32"]["p99_bound_ms"])
    result.metrics["rounds"] = rates
    result.target("batch32_vs_plain", ">= 5")
    result.target("batch32_p99_over_bound", "<= 1")
    result.notes.append(f"body = a + b*n with a={params['a_s']}s, b={params['b_s']}s; batch_wait {BATCH_WAIT}; "
                        "p99 bound = batch_wait + the cost of one full batch (a + b*batch_size); plain Celery: a + b")
    return result
