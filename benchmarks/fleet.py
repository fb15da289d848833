"""Scenario 7: beyond one machine, by simulation — schedule quality and decision cost as
the fleet grows to 1,000 GPUs and a million tasks, with taskmesh's real producer checks,
gate, ledger and rebalance policy (``simulate.py`` says what is real and what is
re-modelled) on a synthetic fleet and workload (``synthetic.py``).

Each run reports makespan against the lower bound, GPU memory and slot utilisation,
the wall-clock cost per task of the producer's checks, each admission decision and
each release, and the rebalance policy's runs (one per rebalance interval of simulated
time), their wall-clock cost, and what it said. Runs of the same size with the Redis
ledger and the in-memory one must produce the same schedule; ``ledgers_agree`` says
whether they did.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import redis

from benchmarks.fluid import fluid_optimum
from benchmarks.harness import LocalRedis, percentile
from benchmarks.rebalance_probe import RebalanceProbe
from benchmarks.scenario import Context, Result, ratio
from benchmarks.simulate import Simulation
from benchmarks.synthetic import GPUS_PER_HOST, TASK_CLASSES, lower_bound, make_fleet, make_jobs, requirements
from taskmesh.core.config import Config
from taskmesh.core.held_line import LinePolicy
from taskmesh.state.ledger import Ledger
from taskmesh.state.memory_ledger import MemoryLedger

TITLE = "Fleet simulation: 100-1,000 GPUs, up to 1M tasks, real admission and rebalance policy code"
#: runs: [GPUs, tasks, ledger ("redis" or "memory"), optional pool slots per GPU (default slots_per_gpu)];
#: rebalance_interval_s: null = the configured ``rebalance.interval_s``; gpu_alert_*: thresholds for the
#: gpu queue and its need queues (the default config sets none, so the policy would raise no alert);
#: backfill: the held-line rule (core.held_line.RULES), null = admission.backfill's default.
FULL = {"slots_per_gpu": 4, "seed": 11, "producer_calls_per_class": 2000, "rebalance_interval_s": None,
        "backfill": None, "gpu_alert_depth": 10000, "gpu_alert_age_s": 3600, "runs": [
    [100, 20000, "redis"], [100, 20000, "memory"], [100, 100000, "memory"], [100, 100000, "memory", 1],
    [300, 300000, "memory"], [1000, 1000000, "memory"]]}
SMOKE = {**FULL, "gpu_alert_age_s": 600,  # toy runs end within the hour
         "runs": [[16, 400, "redis"], [16, 400, "memory"], [100, 2000, "memory"], [100, 2000, "memory", 1]]}
#: A reservation must outlive any simulated task: nothing refreshes it in the simulation.
SIM_TTL_S = 10**9


def simulate(gpus: int, tasks: int, ledger_kind: str, params: dict[str, Any], broker: str, slots: int | None = None,
             record: bool = False) -> tuple[dict[str, Any], Simulation]:
    """One simulated run; returns its table row and the finished simulation."""
    slots = slots or params["slots_per_gpu"]
    client = redis.Redis.from_url(broker)
    client.flushall()
    fleet = make_fleet(gpus)
    reqs = requirements()
    jobs = make_jobs(tasks, params["seed"])
    ledger = Ledger(client, ttl_s=SIM_TTL_S) if ledger_kind == "redis" else MemoryLedger(ttl_s=SIM_TTL_S)
    started = time.perf_counter()
    policy = LinePolicy(params["backfill"]) if params.get("backfill") else None
    sim = Simulation(fleet, reqs, jobs, ledger, broker, slots=slots, record=record,
                     producer_calls_per_class=params["producer_calls_per_class"], policy=policy)
    if isinstance(ledger, MemoryLedger):
        ledger.clock = lambda: sim.now  # simulated time drives expiry
    probe = sim.probe = RebalanceProbe(with_gpu_alerts(sim.app.taskmesh_config, params),
                                       params["rebalance_interval_s"])
    out = sim.run()
    wall = time.perf_counter() - started
    margin = sim.config.safety_margin_mib
    bound = lower_bound(fleet, jobs, reqs, slots, margin)
    fluid = fluid_optimum(fleet, jobs, reqs, slots, margin)
    memory_total = sum(w.gpu.memory_total_mib for w in sim.workers)
    policy = probe.log
    row = {
        "gpus": gpus, "tasks": tasks, "ledger": ledger_kind, "slots": slots, "backfill": sim.policy.rule,
        "makespan_s": round(out.makespan_s, 1),
        "bound_s": bound["bound_s"], "vs_bound": ratio(out.makespan_s, bound["bound_s"]),
        "fluid_s": fluid, "vs_fluid": ratio(out.makespan_s, fluid),
        "memory_util": ratio(out.reserved_area, memory_total * out.makespan_s),
        "slot_util": ratio(out.busy_slot_s, slots * gpus * out.makespan_s),
        "held_frac": ratio(out.held_s, gpus * out.makespan_s),
        "head_wait_s": round(out.longest_head_wait_s, 1),
        "rejected": out.rejected, "waits": out.waits, "reroutes": out.reroutes,
        "produce_us": _mean(out.produce_us), "produce_p99_us": round(percentile(out.produce_us, 99), 1),
        "decide_us": _mean(out.decide_us), "decide_p99_us": round(percentile(out.decide_us, 99), 1),
        "release_us": _mean(out.release_us), "rebalance_runs": policy.runs,
        "rebalance_us": _percentile(policy.run_us, 50), "rebalance_p99_us": _percentile(policy.run_us, 99),
        "wall_s": round(wall, 1),
    }
    row["detail"] = {**bound, "admitted": out.admitted, "hosts": len(fleet), "gpus_per_host": GPUS_PER_HOST,
                     "decisions": len(out.decide_us), "max_head_wait_s": sim.policy.max_head_wait_s,
                     "rebalance": {"interval_s": probe.interval_s, "peak_hints": policy.peak_hints,
                                   "alerts_raised": dict(policy.raised), "saturated_runs": dict(policy.saturated_runs)}}
    return row, sim


def with_gpu_alerts(config: Config, params: dict[str, Any]) -> Config:
    """*config* with the scenario's alert thresholds on the gpu queue (need queues share them)."""
    gpu = dataclasses.replace(config.queue("gpu"), alert_depth=params["gpu_alert_depth"],
                              alert_age_s=params["gpu_alert_age_s"])
    return dataclasses.replace(config, queues={**config.queues, "gpu": gpu})


def _run_key(row: dict[str, Any]) -> str:
    """A run's key in ``metrics.runs``: GPUs/tasks/ledger/slots."""
    return f"{row['gpus']}/{row['tasks']}/{row['ledger']}/{row['slots']}"


def _percentile(values: Any, q: float) -> float | None:
    return round(percentile(values, q), 1) if len(values) else None


def _mean(values: Any) -> float:
    return round(sum(values) / len(values), 1) if len(values) else 0.0


def run(params: dict[str, Any], ctx: Context) -> Result:
    result = Result("fleet", TITLE, params=params)
    details = {}
    with LocalRedis() as server:
        for gpus, tasks, ledger_kind, *slots in params["runs"]:
            row, _ = simulate(gpus, tasks, ledger_kind, params, server.url, *slots)
            details[_run_key(row)] = row.pop("detail")
            result.rows.append(row)
    result.metrics["runs"] = details
    result.metrics["task_classes"] = {c.name: {"options": c.options, "weight": c.weight, "median_s": c.median_s}
                                      for c in TASK_CLASSES}
    pairs = {}
    for row in result.rows:
        pairs.setdefault((row["gpus"], row["tasks"], row["slots"]), {})[row["ledger"]] = row
    compared = [p for p in pairs.values() if len(p) == 2]
    keys = ("makespan_s", "waits", "rejected", "reroutes")
    result.metrics["ledgers_agree"] = (all(all(p["redis"][k] == p["memory"][k] for k in keys) for p in compared)
                                       if compared else None)
    largest = max(result.rows, key=lambda r: (r["gpus"], r["tasks"], r["slots"] == params["slots_per_gpu"]))
    detail = details[_run_key(largest)]
    head_limit = round(detail["max_head_wait_s"] + detail["longest_task_s"], 1)
    result.metrics.update(largest_vs_bound=largest["vs_bound"], largest_vs_fluid=largest["vs_fluid"],
                          largest_slot_util=largest["slot_util"], largest_decide_us=largest["decide_us"],
                          largest_decide_p99_us=largest["decide_p99_us"], largest_produce_us=largest["produce_us"],
                          largest_rebalance_us=largest["rebalance_us"],
                          largest_head_wait_over_limit_s=round(largest["head_wait_s"] - head_limit, 1))
    result.target("largest_vs_bound", "<= 1.10")
    result.target("largest_slot_util", ">= 0.8")
    result.target("largest_head_wait_over_limit_s", "<= 0")
    result.target("largest_decide_p99_us", "<= 150")
    result.notes.append("fluid_s = the fluid optimum (benchmarks/fluid.py): the least makespan of any placement if "
                        "tasks could be split across the sets of tasks each GPU can run at once; vs_fluid = how far "
                        "the schedule is from it, where vs_bound also counts what no placement can recover")
    result.notes.append(f"head_wait_s = the longest a message waited at the head of a held line; target: at most "
                        f"admission.max_head_wait_s plus the longest task ({head_limit} s in the largest run), "
                        "what a head waits for the tasks already running when backfill adds nothing")
    result.notes.append("held_frac = GPU-time workers spent holding a message that did not fit yet "
                        "(their held line not empty), over GPUs x makespan")
    result.notes.append("makespan and bound are simulated seconds; *_us are real wall-clock microseconds per call "
                        "on this machine; memory_util = reserved MiB x s / (all GPU memory x makespan)")
    result.notes.append("rebalance_*: the real rebalance policy run once per rebalance interval of simulated time "
                        "(observing only); rebalance_us / _p99_us = p50 / p99 wall-clock cost of one run (views "
                        "built from the fleet's snapshot, alerts, scaling hints, saturation), without the Redis "
                        "reads a live run also makes; peak hints, alerts raised and saturated runs: metrics.runs")
    return result
