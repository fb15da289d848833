"""The fleet simulator's seams: the in-memory ledger answers exactly as the Redis one,
and a simulated fleet — driven by the real gate, ledger and producer checks — gives
the same schedule with either ledger, never oversubscribes a GPU, and refuses work no
GPU can run; the real rebalance policy watches it every interval without changing
what it does, and sees every task in exactly one place."""

from __future__ import annotations

import collections
import math
import random
import time

import pytest
import redis

from benchmarks.fleet import FULL, SIM_TTL_S, simulate, with_gpu_alerts
from benchmarks.rebalance_probe import RebalanceProbe
from benchmarks.simulate import Simulation
from benchmarks.synthetic import GPU_KINDS, TASK_CLASSES, kind_gpu, lower_bound, make_fleet, make_jobs, requirements
from taskmesh.core.claims import Claim, LedgerLike
from taskmesh.core.config import Config
from taskmesh.core.need_queues import fits
from taskmesh.state.ledger import Ledger
from taskmesh.state.memory_ledger import MemoryLedger

POOLS = ("gpu:a", "gpu:b", "host:h:threads")
CAPACITY = {"gpu:a": 100, "gpu:b": 60, "host:h:threads": 8}


def random_operations(seed: int, count: int) -> list[tuple[str, object]]:
    rng = random.Random(seed)
    ops: list[tuple[str, object]] = []
    for _ in range(count):
        reservation = f"r{rng.randrange(40)}"
        pools = rng.sample(POOLS, rng.randint(1, len(POOLS)))
        kind = rng.choices(["reserve", "reserve_first", "release", "refresh", "used"], weights=[4, 3, 3, 1, 1])[0]
        if kind == "reserve":
            ops.append((kind, (reservation, random_claims(rng, pools))))
        elif kind == "reserve_first":
            options = [random_claims(rng, rng.sample(POOLS, rng.randint(1, 2))) for _ in range(rng.randint(1, 3))]
            ops.append((kind, (reservation, options)))
        elif kind == "release":
            ops.append((kind, (reservation, pools)))
        elif kind == "refresh":
            ids = (reservation, f"r{rng.randrange(40)}")
            held = {r: {p: rng.randint(1, CAPACITY[p] // 2) for p in pools} for r in ids}
            ops.append((kind, (held,)))
        else:
            ops.append((kind, (list(pools),)))
    return ops


def random_claims(rng: random.Random, pools: list[str]) -> list[Claim]:
    return [Claim(p, rng.randint(1, CAPACITY[p] // 2), CAPACITY[p]) for p in pools]


def apply(ledger: LedgerLike, op: tuple[str, object]) -> object:
    kind, args = op
    return getattr(ledger, kind)(*args)


def test_the_memory_ledger_gives_every_answer_the_redis_ledger_gives(broker):
    on_redis, in_memory = Ledger(broker, ttl_s=3600), MemoryLedger(ttl_s=3600)
    assert isinstance(in_memory, LedgerLike)
    answers = collections.Counter()
    for op in random_operations(seed=3, count=1500):
        expected, got = apply(on_redis, op), apply(in_memory, op)
        assert got == expected, op
        answers[(op[0], (expected[0] if op[0] == "reserve_first" else expected) is None)] += 1
    for pool in POOLS:
        assert in_memory.holders(pool) == on_redis.holders(pool)
    for kind in ("reserve", "reserve_first"):  # both granted and refused
        assert answers[(kind, True)] > 100 and answers[(kind, False)] > 100, answers


def test_the_memory_ledger_expires_and_refreshes_like_the_redis_ledger(broker):
    on_redis, in_memory = Ledger(broker, ttl_s=2.0), MemoryLedger(ttl_s=2.0)
    claim = [Claim("gpu:a", 80, 100)]
    for ledger in (on_redis, in_memory):
        assert ledger.reserve("kept", claim) is None
        assert ledger.reserve("dropped", [Claim("gpu:b", 50, 60)]) is None
    time.sleep(1.0)
    assert in_memory.refresh({"kept": {"gpu:a": 80}}) == on_redis.refresh({"kept": {"gpu:a": 80}}) == []
    time.sleep(1.2)  # past the dropped one's expiry, 0.8 s short of the refreshed one's
    for ledger in (on_redis, in_memory):
        assert ledger.used(["gpu:a", "gpu:b"]) == {"gpu:a": 80, "gpu:b": 0}
        assert ledger.reserve("new", [Claim("gpu:b", 50, 60)]) is None  # the dead one no longer counts
        assert ledger.reserve("late", claim) is not None  # the refreshed one still does


def test_a_simulated_fleet_gives_the_same_schedule_with_either_ledger(redis_server):
    params = {**FULL, "producer_calls_per_class": None}
    _, on_redis = simulate(16, 300, "redis", params, f"{redis_server}/0", record=True)
    _, in_memory = simulate(16, 300, "memory", params, f"{redis_server}/0", record=True)
    assert in_memory.out.schedule == on_redis.out.schedule
    assert in_memory.out.waits == on_redis.out.waits and in_memory.out.waits > 0


def test_a_simulated_fleet_never_oversubscribes_and_runs_big_tasks_only_where_they_fit(redis_server):
    params = {**FULL, "producer_calls_per_class": None}
    row, sim = simulate(32, 3000, "memory", params, f"{redis_server}/0", record=True)
    out = sim.out
    margin = sim.config.safety_margin_mib
    gpus = {w.gpu.uuid: w.gpu for w in sim.workers}
    names = [c.name for c in TASK_CLASSES]
    too_big = sum(1 for cls, _ in sim.jobs if names[cls] == "too-big")
    assert too_big and out.rejected == too_big and out.admitted == len(sim.jobs) - too_big
    edges = collections.defaultdict(list)
    for job, uuid, start, end, amount in out.schedule:
        edges[uuid] += [(start, amount), (end, -amount)]
        requirement = sim.reqs[sim.jobs[job][0]]
        assert fits(gpus[uuid], requirement, margin), (names[sim.jobs[job][0]], gpus[uuid].memory_total_mib)
    for uuid, changes in edges.items():
        in_use = 0
        for _, delta in sorted(changes, key=lambda c: (c[0], c[1])):  # ends before starts at the same instant
            in_use += delta
            assert in_use <= gpus[uuid].memory_total_mib - margin
    kinds = {kind_gpu(k).memory_total_mib: k for k in GPU_KINDS}
    ran_on = collections.defaultdict(set)
    for job, uuid, *_ in out.schedule:
        ran_on[names[sim.jobs[job][0]]].add(kinds[gpus[uuid].memory_total_mib])
    assert ran_on["llm-70b"] == {"h100"} and ran_on["fp8-kernel"] == {"h100"}
    assert ran_on["embed"] == {"h100", "a6000", "l4"}
    bound = lower_bound(make_fleet(32), sim.jobs, sim.reqs, 4, margin)
    assert out.makespan_s >= bound["bound_s"] and row["bound_s"] == bound["bound_s"]


def test_the_producer_refuses_what_no_gpu_can_run_and_counts_it_in_redis(redis_server):
    params = {**FULL, "producer_calls_per_class": None}
    _, sim = simulate(8, 2000, "memory", params, f"{redis_server}/0")
    client = redis.Redis.from_url(f"{redis_server}/0")
    assert int(client.hget("taskmesh:counters", "infeasible")) == sim.out.rejected > 0


class CountingProbe(RebalanceProbe):
    """The real probe, checking at each run that every task is waiting, in flight, done or refused, and
    that what the queues say is in flight is what the workers' announced states say they run or hold."""

    def __init__(self, sim: Simulation, *args) -> None:
        super().__init__(*args)
        self.sim = sim
        self.peak_in_flight = self.peak_running = 0

    def observe(self, records, states, depths, runtimes) -> None:
        waiting = sum(d.waiting for d in depths.values())
        in_flight = sum(d.in_flight for d in depths.values())
        done = len(self.sim.out.release_us)
        assert waiting + in_flight + done + self.sim.out.rejected == len(self.sim.jobs), self.sim.now
        assert in_flight == sum(s["running"] + s["held"] for s in states.values()), self.sim.now
        self.peak_in_flight = max(self.peak_in_flight, in_flight)
        self.peak_running = max(self.peak_running, max(s["running"] for s in states.values()))
        super().observe(records, states, depths, runtimes)


def run_fleet(broker: str, watched: bool) -> Simulation:
    redis.Redis.from_url(broker).flushall()
    ledger = MemoryLedger(ttl_s=SIM_TTL_S)
    sim = Simulation(make_fleet(16), requirements(), make_jobs(400, seed=11), ledger, broker, record=True)
    ledger.clock = lambda: sim.now
    if watched:
        config = with_gpu_alerts(sim.app.taskmesh_config, {"gpu_alert_depth": None, "gpu_alert_age_s": 600})
        sim.probe = CountingProbe(sim, config)
    sim.run()
    return sim


def test_the_real_rebalance_policy_watches_every_interval_without_changing_the_schedule(redis_server):
    bare = run_fleet(f"{redis_server}/0", watched=False)
    watched = run_fleet(f"{redis_server}/0", watched=True)
    assert watched.out.schedule == bare.out.schedule and watched.out.waits == bare.out.waits
    probe = watched.probe
    assert probe.interval_s == watched.app.taskmesh_config.rebalance.interval_s
    assert probe.log.runs == math.ceil(watched.out.makespan_s / probe.interval_s) - 1 == len(probe.log.run_us)
    window = watched.policy.backfill_window
    assert 16 < probe.peak_in_flight <= 16 * (4 + 1 + window)  # GPUs share; held: a head and its window
    assert probe.peak_running == 4  # never beyond a worker's pool slots
    log = probe.log
    assert log.raised["age"] >= 1 and log.raised["depth"] == 0  # tasks waited past 600 s; no depth threshold
    assert log.peak_hints["gpu"] > 16 and log.peak_hints["cpu"] == 0  # backlog wants more GPU replicas
    assert 0 < log.saturated_runs["gpu"] < log.runs  # saturated while a backlog waits, not once it drained


def test_a_bad_rebalance_interval_is_refused_naming_the_fix():
    with pytest.raises(ValueError, match="give a number of seconds > 0, or null"):
        RebalanceProbe(Config(), -5)
