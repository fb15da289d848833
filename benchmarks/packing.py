"""Scenario 9: packing one GPU — the held-line policy's rules side by side, by simulation.

Two mixes on one simulated 24 GiB GPU with 4 pool slots, played by the fleet simulator
(``simulate.py``: the real gate, ledger and held-line policy) once per rule, head bound
and seed:

- ``uniform``, the issue's one-machine mix: a shuffled batch of GPU tasks of 3–18 GiB,
  1 s each;
- ``varied``: 2–20 GiB, each task name with its own typical run time (5, 20, 60 or
  180 s, drawn per name) and ±30% (log-normal) per task, as real GPU work runs —
  where an age limit on the head is hit long before memory frees.

``strict`` is head of line (what taskmesh did before backfill); the others backfill
past a waiting head, as ``admission.backfill`` chooses, bounded either by the head's
predicted start (``predicted``: ``admission.predict_head_start``, the default) or by
its age alone (``age``). Each row reports makespan against the packing lower bound
(max of memory×time / usable memory, tasks×time / slots, the longest task), memory
and slot utilisation, and the longest a head of the line waited to start.
"""

from __future__ import annotations

import random
import statistics
from typing import Any

import redis

from benchmarks.fleet import SIM_TTL_S
from benchmarks.harness import LocalRedis
from benchmarks.scenario import Context, Result, ratio
from benchmarks.simulate import Simulation
from benchmarks.synthetic import Host, lower_bound
from taskmesh.core.held_line import RULES, LinePolicy
from taskmesh.core.requirements import Requirement
from taskmesh.state.memory_ledger import MemoryLedger

TITLE = "Packing one 24 GiB GPU: backfill rules and head bounds against strict head of line (simulated)"
MIXES = {"uniform": {"tasks": 40, "min_gib": 3, "max_gib": 18, "seconds": 1.0},
         "varied": {"tasks": 200, "min_gib": 2, "max_gib": 20, "medians_s": [5, 20, 60, 180], "sigma": 0.3}}
FULL = {"mixes": MIXES, "gpu": "1x24GiB", "slots": 4, "seeds": list(range(1, 11)), "rules": list(RULES),
        "bounds": ["predicted", "age"], "max_head_wait_s": 30.0, "backfill_window": 8}
SMOKE = {**FULL, "seeds": [1, 2]}


def mix(tasks: int, min_gib: int, max_gib: int, seconds: float, seed: int) -> tuple[list[Requirement],
                                                                                    list[tuple[int, float]]]:
    """One requirement per size in GiB, and *tasks* jobs of shuffled sizes (as a user sends them)."""
    reqs = [Requirement.from_options(f"pack.{gib}gib", {"profile": "gpu", "vram": f"{gib}GiB"})
            for gib in range(min_gib, max_gib + 1)]
    rng = random.Random(seed)
    jobs = [(rng.randrange(len(reqs)), seconds) for _ in range(tasks)]
    return reqs, jobs


def varied_mix(tasks: int, min_gib: int, max_gib: int, medians_s: list[float], sigma: float,
               seed: int) -> tuple[list[Requirement], list[tuple[int, float]]]:
    """One requirement per size in GiB, each with a typical run time drawn from *medians_s*,
    and *tasks* jobs of shuffled sizes whose run times vary around their name's."""
    reqs = [Requirement.from_options(f"pack.{gib}gib", {"profile": "gpu", "vram": f"{gib}GiB"})
            for gib in range(min_gib, max_gib + 1)]
    rng = random.Random(seed)
    typical = [rng.choice(medians_s) for _ in reqs]
    picks = [rng.randrange(len(reqs)) for _ in range(tasks)]
    return reqs, [(c, round(typical[c] * rng.lognormvariate(0, sigma), 2)) for c in picks]


def play(params: dict[str, Any], mix_name: str, rule: str, bound: str, seed: int,
         broker: str) -> tuple[dict[str, Any], Simulation]:
    """One simulated run of a mix under *rule* and head *bound*; its table row and the finished simulation."""
    redis.Redis.from_url(broker).flushall()
    shape = params["mixes"][mix_name]
    reqs, jobs = (mix(seed=seed, **shape) if mix_name == "uniform" else varied_mix(seed=seed, **shape))
    fleet = [Host("pack-host", "l4", params["gpu"])]
    ledger = MemoryLedger(ttl_s=SIM_TTL_S)
    policy = LinePolicy(rule, params["max_head_wait_s"], params["backfill_window"],
                        predict_head_start=bound == "predicted")
    sim = Simulation(fleet, reqs, jobs, ledger, broker, slots=params["slots"], record=True, policy=policy)
    ledger.clock = lambda: sim.now
    out = sim.run()
    bound = lower_bound(fleet, jobs, reqs, params["slots"], sim.config.safety_margin_mib)
    usable = sum(w.gpu.memory_total_mib for w in sim.workers)
    longest_wait = max(start for _, _, start, _, _ in out.schedule)  # everything is sent at time 0
    return {"rule": rule, "seed": seed, "makespan_s": round(out.makespan_s, 2), "bound_s": bound["bound_s"],
            "vs_bound": ratio(out.makespan_s, bound["bound_s"]),
            "memory_util": ratio(out.reserved_area, usable * out.makespan_s),
            "slot_util": ratio(out.busy_slot_s, params["slots"] * out.makespan_s),
            "longest_wait_s": round(longest_wait, 2), "longest_head_wait_s": round(out.longest_head_wait_s, 2),
            "waits": out.waits}, sim


def run(params: dict[str, Any], ctx: Context) -> Result:
    result = Result("packing", TITLE, params=params)
    runs: dict[str, list[dict[str, Any]]] = {}
    with LocalRedis() as server:
        for mix_name in params["mixes"]:
            for rule in params["rules"]:
                for bound in params["bounds"] if rule != "strict" else ["-"]:
                    runs[f"{mix_name}/{rule}/{bound}"] = [play(params, mix_name, rule, bound, seed, server.url)[0]
                                                          for seed in params["seeds"]]
    for key, rows in runs.items():
        mix_name, rule, bound = key.split("/")
        ratios = [r["vs_bound"] for r in rows]
        result.rows.append({"mix": mix_name, "rule": rule, "head_bound": bound, "runs": len(rows),
                            "vs_bound_min": min(ratios),
                            "vs_bound_median": round(statistics.median(ratios), 3), "vs_bound_max": max(ratios),
                            "slot_util": round(statistics.mean(r["slot_util"] for r in rows), 3),
                            "memory_util": round(statistics.mean(r["memory_util"] for r in rows), 3),
                            "longest_wait_s": max(r["longest_wait_s"] for r in rows),
                            "longest_head_wait_s": max(r["longest_head_wait_s"] for r in rows)})
    result.metrics["runs"] = runs
    default = f"uniform/{LinePolicy().rule}/{'predicted' if LinePolicy().predict_head_start else 'age'}"
    if default in runs:
        result.metrics["default_vs_bound_max"] = max(r["vs_bound"] for r in runs[default])
        result.target("default_vs_bound_max", "<= 1.10")
    result.notes.append("simulated seconds; bound = max(memory x time / usable memory, tasks x time / slots, "
                        "longest task); usable memory = 24 GiB less admission.safety_margin (512 MiB); "
                        "longest_wait_s: the latest start (all is sent at 0); longest_head_wait_s: the longest a "
                        "message waited at the head of the worker's held line")
    return result
