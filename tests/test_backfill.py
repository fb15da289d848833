"""Backfill: while the head of a worker's held line waits for memory, a later task that
fits now runs in the gap — never past a waiting task of higher priority, and not so as
to delay the head: where run times are learned, only what ends before the head is
predicted to fit (or fits beside it then), and where they are not, nothing once the head
has waited ``admission.max_head_wait_s``; every message still runs once and is
acknowledged. The fleet simulator runs the same policy and makes the same choices as a
real worker on the same sequence."""

from __future__ import annotations

import collections
import math
import time

import pytest
import redis

from benchmarks.fleet import SIM_TTL_S
from benchmarks.simulate import Simulation
from benchmarks.synthetic import Host
from taskmesh.core.config import load_config
from taskmesh.core.errors import ConfigError
from taskmesh.core.forecast import Forecast
from taskmesh.core.held_line import LinePolicy, start_from_line
from taskmesh.core.profiles import Priority
from taskmesh.core.requirements import Requirement
from taskmesh.hardware.simulated import SimulationControl
from taskmesh.state.memory_ledger import MemoryLedger

from .conftest import queue_depth, wait_until
from .test_admission import GIB, start_gpus, stats

# --- the policy itself -------------------------------------------------------------


class Gpu:
    """A gate over one GPU's free memory: admits what fits, and counts what it was asked."""

    def __init__(self, free: int) -> None:
        self.free, self.asked = free, []

    def admit(self, job: tuple[str, int, int]) -> bool:
        self.asked.append(job[0])
        if job[1] > self.free:
            return False
        self.free -= job[1]
        return True


def line_of(*jobs: tuple[str, int, int]) -> collections.deque:
    return collections.deque(jobs)  # (name, GiB, priority); all arrived at 0


def play(line: collections.deque, free: int, rule: str = "best_fit", now: float = 1.0, **policy) -> list[str]:
    gpu = Gpu(free)
    started = start_from_line(line, gpu.admit, now, LinePolicy(rule, **policy), since=lambda j: 0.0,
                              size=lambda j: j[1], priority=lambda j: j[2])
    return [j[0] for j in started]


def test_each_rule_fills_the_gap_behind_a_waiting_head_its_own_way():
    jobs = (("head", 16, 6), ("small", 4, 6), ("mid", 8, 6), ("tiny", 2, 6))
    assert play(line_of(*jobs), free=10, rule="best_fit") == ["mid", "tiny"]  # leaves 0 GiB idle
    assert play(line_of(*jobs), free=10, rule="first_fit") == ["small", "tiny"]
    assert play(line_of(*jobs), free=10, rule="smallest_fit") == ["tiny", "small"]
    assert play(line_of(*jobs), free=10, rule="strict") == []
    line = line_of(*jobs)
    assert play(line, free=16) == ["head"] and [j[0] for j in line] == ["small", "mid", "tiny"]


def test_nothing_is_backfilled_once_the_head_has_waited_past_the_limit():
    jobs = (("head", 16, 6), ("small", 4, 6))
    assert play(line_of(*jobs), free=10, now=29.9, max_head_wait_s=30) == ["small"]
    assert play(line_of(*jobs), free=10, now=30.0, max_head_wait_s=30) == []
    policy = LinePolicy(max_head_wait_s=30, backfill_window=2)
    assert policy.takes_more(held=2, head_waited_s=29.9) and not policy.takes_more(held=2, head_waited_s=30)
    assert not policy.takes_more(held=3, head_waited_s=0)  # the window behind the head is full: intake pauses
    assert not LinePolicy("strict").takes_more(held=1, head_waited_s=0)


#: Run times learned per task (None: not yet), for the predicted start of the head.
DURATIONS = {"short": 3.0, "long": 10.0, "tiny": 100.0, "unknown": None, "half": 15.0, "most": 25.0}


def predicted_play(line: collections.deque, free: int, running: list, now: float, **policy) -> list[str]:
    gpu = Gpu(free)
    forecast = Forecast(free, running, lambda j: DURATIONS[j[0]], slots=4)
    started = start_from_line(line, gpu.admit, now, LinePolicy(**policy), since=lambda j: 0.0,
                              size=lambda j: j[1], priority=lambda j: j[2], forecast=lambda: forecast)
    return [j[0] for j in started]


def test_past_its_age_limit_what_ends_before_the_head_is_predicted_to_fit_is_backfilled():
    # 10 GiB free, an 8 GiB task ends at 45: the 16 GiB head is predicted to start then, with 2 GiB beside it
    jobs = (("head", 16, 6), ("long", 4, 6), ("short", 4, 6), ("tiny", 2, 6), ("unknown", 1, 6))
    running = [(45.0, 8)]
    assert predicted_play(line_of(*jobs), 10, running, now=40.0) == ["short", "tiny"]  # 'tiny' fits beside it
    assert predicted_play(line_of(*jobs), 10, running, now=40.0, predict_head_start=False) == []  # the age rule
    # a running task whose run time is not learned yet: no prediction, only the age limit
    assert predicted_play(line_of(*jobs), 10, [(None, 8)], now=40.0) == []
    assert predicted_play(line_of(*jobs), 10, [(None, 8)], now=10.0) == ["long", "short", "tiny"]
    policy = LinePolicy(max_head_wait_s=30, backfill_window=2)
    assert policy.takes_more(held=1, head_waited_s=40, predicted=True) and not policy.takes_more(1, 40)


def test_before_the_age_limit_a_backfill_may_delay_the_head_up_to_the_limit_and_no_further():
    jobs = (("head", 16, 6), ("most", 4, 6), ("half", 4, 6))
    # the head is predicted to fit at 12; 'half' ends at 25, within the 30 s limit; 'most' at 35
    assert predicted_play(line_of(*jobs), 10, [(12.0, 8)], now=10.0) == ["half"]
    assert predicted_play(line_of(*jobs), 10, [(12.0, 8)], now=10.0, predict_head_start=False) == ["most", "half"]
    # a whole-GPU head waits for everything to end, and leaves no room beside it
    whole = (("head", math.inf, 6), ("most", 4, 6), ("half", 4, 6), ("tiny", 2, 6))
    assert predicted_play(line_of(*whole), 10, [(50.0, 8)], now=31.0) == ["half"]


def test_a_message_never_starts_ahead_of_a_waiting_one_of_higher_priority():
    critical, normal, low = int(Priority.CRITICAL), int(Priority.NORMAL), int(Priority.LOW)
    assert play(line_of(("head", 16, critical), ("low", 4, low)), free=10) == []
    assert play(line_of(("head", 16, low), ("urgent", 4, critical)), free=10) == ["urgent"]
    # an urgent one that does not fit still holds back the less urgent behind it, not those ahead of it
    assert play(line_of(("head", 16, normal), ("urgent", 12, critical), ("low", 4, low)), free=10) == []
    assert play(line_of(("head", 16, normal), ("normal", 4, normal), ("urgent", 12, critical)), free=10) == ["normal"]


def test_the_window_and_the_free_pool_slots_bound_what_starts():
    jobs = [("head", 16, 6)] + [(f"s{i}", 1, 6) for i in range(5)]
    gpu = Gpu(10)
    started = start_from_line(line_of(*jobs), gpu.admit, 1.0, LinePolicy(backfill_window=3), since=lambda j: 0.0,
                              size=lambda j: j[1], priority=lambda j: j[2], slots=2)
    assert [j[0] for j in started] == ["s0", "s1"] and gpu.asked == ["head", "s0", "s1"]
    assert play(line_of(*jobs), free=10, backfill_window=3) == ["s0", "s1", "s2"]


def test_with_a_lookahead_the_largest_that_fits_starts_even_when_the_head_fits():
    jobs = (("head", 4, 6), ("big", 16, 6), ("mid", 8, 6))
    one_slot = {"slots": 1}

    def pick(line, **policy):
        gpu = Gpu(20)
        started = start_from_line(line, gpu.admit, policy.pop("now", 1.0), LinePolicy(**policy),
                                  since=lambda j: 0.0, size=lambda j: j[1], priority=lambda j: j[2], **one_slot)
        return [j[0] for j in started]

    assert pick(line_of(*jobs)) == ["head"]  # no lookahead: the oldest first when it fits
    assert pick(line_of(*jobs), lookahead=2) == ["big"]  # the largest that fits
    assert pick(line_of(*jobs), lookahead=2, now=30.0, max_head_wait_s=30) == ["head"]  # a head past its limit
    low = int(Priority.LOW)
    assert pick(line_of(("head", 4, 6), ("big", 16, low)), lookahead=2) == ["head"]  # never past a more urgent one
    with pytest.raises(ValueError, match="lookahead 9 must lie within 0 and backfill_window"):
        LinePolicy(lookahead=9)


def test_the_backfill_settings_are_checked_and_can_be_set_from_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "hw.yaml"
    path.write_text("admission:\n  backfill: first_fit\n  max_head_wait_s: 12\n  backfill_window: 3\n")
    assert load_config(path).admission.line_policy() == LinePolicy("first_fit", 12.0, 3)
    monkeypatch.setenv("TASKMESH_BACKFILL", "strict")
    monkeypatch.setenv("TASKMESH_MAX_HEAD_WAIT_S", "5")
    monkeypatch.setenv("TASKMESH_BACKFILL_WINDOW", "0")
    assert load_config(path).admission.line_policy() == LinePolicy("strict", 5.0, 0)
    monkeypatch.setenv("TASKMESH_BACKFILL", "fastest")
    with pytest.raises(ConfigError, match="TASKMESH_BACKFILL: 'fastest' is not a backfill rule; use one of best_fit"):
        load_config(path)
    monkeypatch.delenv("TASKMESH_BACKFILL")
    monkeypatch.setenv("TASKMESH_LOOKAHEAD", "4")
    with pytest.raises(ConfigError, match="admission.lookahead: 4 is more than backfill_window"):
        load_config(path)  # the window is 0 here
    monkeypatch.delenv("TASKMESH_LOOKAHEAD")
    monkeypatch.setenv("TASKMESH_PREDICT_HEAD_START", "false")
    assert load_config(path).admission.line_policy() == LinePolicy("first_fit", 5.0, 0, predict_head_start=False)
    monkeypatch.setenv("TASKMESH_PREDICT_HEAD_START", "maybe")
    with pytest.raises(ConfigError, match="TASKMESH_PREDICT_HEAD_START: 'maybe' is not true or false"):
        load_config(path)
    monkeypatch.delenv("TASKMESH_PREDICT_HEAD_START")
    path.write_text("admission:\n  backfill_window: -1\n")
    with pytest.raises(ConfigError, match="admission.backfill_window.*-1 is not a whole number >= 0"):
        load_config(path)


# --- on a real worker ---------------------------------------------------------------


def ran(broker, app) -> list[str]:
    return [r.decode() for r in broker.lrange(app.RUNS, 0, -1)]


def all_acknowledged(broker) -> bool:
    return broker.hlen("unacked") == 0 and queue_depth(broker, "gpu") == 0


@pytest.mark.slow
def test_a_small_task_runs_behind_a_held_one_until_the_head_has_waited_too_long(gpu_app, broker, processes):
    (node,) = start_gpus(processes, gpu_app.app, "1x24GiB", TASKMESH_GPU_SLOTS="4", TASKMESH_MAX_HEAD_WAIT_S="4")
    memory = SimulationControl(broker)
    memory.use(0, 20 * GIB)  # 3.5 GiB usable is left: a 10 GiB task waits, a 2 GiB one fits
    head = gpu_app.ten_gib.delay(0.1, label="head")
    wait_until(lambda: stats(gpu_app.app, node)["held"] == 1, "the 10 GiB task was held")
    held_at = time.monotonic()
    gap = gpu_app.two_gib.delay(0.1, label="gap")
    gap.get(timeout=30)  # ran in the gap while the head still waits
    assert ran(broker, gpu_app) == [gap.id] and stats(gpu_app.app, node)["held"] == 1
    time.sleep(max(0.0, held_at + 4.5 - time.monotonic()))  # the head has now waited past max_head_wait_s
    wait_until(lambda: stats(gpu_app.app, node)["paused"], "intake paused for the head")
    late = gpu_app.two_gib.delay(0.1, label="late")
    time.sleep(2.0)  # 'gap' ran in less; 'late' must not
    assert ran(broker, gpu_app) == [gap.id] and queue_depth(broker, "gpu") == 1
    memory.use(0, 0)
    for result in (head, late):
        result.get(timeout=30)
    assert ran(broker, gpu_app) == [gap.id, head.id, late.id]  # the head first, then the one it kept waiting
    wait_until(lambda: all_acknowledged(broker), "every message acknowledged", 10)
    assert stats(gpu_app.app, node)["counters"]["admitted"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("predict", [True, False], ids=["predicted", "age_only"])
def test_past_the_age_limit_a_task_that_ends_before_the_head_fits_runs_and_a_long_one_waits(
        gpu_app, broker, processes, predict):
    (node,) = start_gpus(processes, gpu_app.app, "1x24GiB", TASKMESH_GPU_SLOTS="4", TASKMESH_MAX_HEAD_WAIT_S="1",
                         TASKMESH_PREDICT_HEAD_START=str(predict).lower())
    for learned in (gpu_app.ten_gib.delay(4.0), gpu_app.flexible.delay(0.3)):  # the worker learns 4 s and 0.3 s
        learned.get(timeout=30)
    broker.delete(gpu_app.RUNS)
    running = gpu_app.ten_gib.delay(4.0, label="running")  # 13.5 GiB usable left beside it
    wait_until(lambda: ran(broker, gpu_app) == [running.id], "the 10 GiB task started")
    head = gpu_app.twenty_gib.delay(0.1, label="head")  # predicted to fit when 'running' ends, 3.5 GiB beside it
    wait_until(lambda: stats(gpu_app.app, node)["held"] == 1, "the 20 GiB head was held")
    time.sleep(1.5)  # past max_head_wait_s
    long = gpu_app.ten_gib.delay(0.1, label="long")  # fits now, but a ten_gib is predicted to run 4 s
    short = gpu_app.flexible.delay(0.3, label="short")  # predicted to end well before the head fits
    for result in (running, head, long, short):
        result.get(timeout=30)
    order = [r for r in ran(broker, gpu_app)]
    assert order.index(long.id) > order.index(head.id)  # never ahead of the head it would have delayed
    if predict:
        assert order == [running.id, short.id, head.id, long.id]
    else:  # the age limit alone: nothing more is taken once the head has waited 1 s
        assert order.index(short.id) > order.index(head.id)
    wait_until(lambda: all_acknowledged(broker), "every message acknowledged", 10)


@pytest.mark.slow
def test_a_low_priority_task_that_fits_does_not_overtake_a_critical_one_that_waits(gpu_app, broker, processes):
    (node,) = start_gpus(processes, gpu_app.app, "1x24GiB", TASKMESH_GPU_SLOTS="4")
    memory = SimulationControl(broker)
    memory.use(0, 20 * GIB)
    head = gpu_app.ten_gib.apply_async((0.1,), {"label": "head"}, priority=int(Priority.CRITICAL))
    wait_until(lambda: stats(gpu_app.app, node)["held"] == 1, "the critical task was held")
    low = gpu_app.two_gib.apply_async((0.1,), {"label": "low"}, priority=int(Priority.LOW))
    wait_until(lambda: stats(gpu_app.app, node)["held"] == 2, "the low one was held behind it")
    urgent = gpu_app.two_gib.apply_async((0.1,), {"label": "urgent"}, priority=int(Priority.CRITICAL))
    urgent.get(timeout=30)  # as urgent as the head: it may fill the gap
    assert ran(broker, gpu_app) == [urgent.id] and stats(gpu_app.app, node)["held"] == 2
    memory.use(0, 0)
    for result in (head, low):
        result.get(timeout=30)
    assert ran(broker, gpu_app) == [urgent.id, head.id, low.id]
    wait_until(lambda: all_acknowledged(broker), "every message acknowledged", 10)


# --- the simulator and a real worker agree -------------------------------------------

#: (task, seconds), sent in this order to one 24 GiB GPU with 4 slots. At 2 s the 10 GiB
#: task ends: best_fit starts 'f' (10 GiB) in the gap the 20 GiB head cannot use, first_fit 'e'.
SEQUENCE = (("ten_gib", 6.0), ("twenty_gib", 1.0), ("ten_gib", 2.0), ("two_gib", 3.0), ("two_gib", 1.0),
            ("ten_gib", 1.6))
LABELS = "abcdef"
SIZES = {"ten_gib": 10, "twenty_gib": 20, "two_gib": 2}


def simulated_starts(broker_url: str, rule: str, sequence=SEQUENCE, slots: int = 4,
                     lookahead: int = 0) -> list[set[str]]:
    """The simulator's start order for *sequence*: labels grouped by start time."""
    redis.Redis.from_url(broker_url).flushall()
    names = sorted(SIZES)
    reqs = [Requirement.from_options(n, {"profile": "gpu", "vram": f"{SIZES[n]}GiB"}) for n in names]
    jobs = [(names.index(task), seconds) for task, seconds in sequence]
    ledger = MemoryLedger(ttl_s=SIM_TTL_S)
    sim = Simulation([Host("agree", "l4", "1x24GiB")], reqs, jobs, ledger, broker_url, slots=slots, record=True,
                     policy=LinePolicy(rule, lookahead=lookahead))
    ledger.clock = lambda: sim.now
    sim.run()
    groups: dict[float, set[str]] = collections.defaultdict(set)
    for job, _, start, _, _ in sim.out.schedule:
        groups[start].add(LABELS[job])
    return [groups[t] for t in sorted(groups)]


@pytest.mark.slow
def test_the_simulator_and_a_real_worker_start_the_same_tasks_in_the_same_order(gpu_app, broker, broker_url,
                                                                             processes):
    expected = simulated_starts(broker_url, "best_fit")
    assert expected != simulated_starts(broker_url, "first_fit")  # the sequence tells the rules apart
    broker.flushall()
    start_gpus(processes, gpu_app.app, "1x24GiB", TASKMESH_GPU_SLOTS="4")
    results = {getattr(gpu_app, task).delay(seconds, label=label).id: label
               for (task, seconds), label in zip(SEQUENCE, LABELS, strict=True)}
    for result_id in results:
        gpu_app.app.AsyncResult(result_id).get(timeout=60)
    order = [results[r] for r in ran(broker, gpu_app)]
    sizes = [len(group) for group in expected]  # tasks started at one instant may reach Redis in any order
    starts = [set(order[sum(sizes[:i]):sum(sizes[:i + 1])]) for i in range(len(sizes))]
    assert starts == expected, order
    wait_until(lambda: all_acknowledged(broker), "every message acknowledged", 10)


#: One slot: while 'a' runs, 'b' (2 GiB) and 'c' (20 GiB) wait. Without a lookahead the worker
#: fetches only what its slot takes, so 'b' runs next; with one it holds both and starts the
#: largest that fits, 'c'.
AHEAD = (("two_gib", 3.0), ("two_gib", 1.0), ("twenty_gib", 1.0))


@pytest.mark.slow
def test_with_a_lookahead_the_simulator_and_a_real_worker_start_the_largest_that_fits_next(
        gpu_app, broker, broker_url, processes):
    expected = simulated_starts(broker_url, "best_fit", AHEAD, slots=1, lookahead=2)
    assert expected == [{"a"}, {"c"}, {"b"}]
    assert simulated_starts(broker_url, "best_fit", AHEAD, slots=1) == [{"a"}, {"b"}, {"c"}]  # it can tell
    broker.flushall()
    start_gpus(processes, gpu_app.app, "1x24GiB", TASKMESH_GPU_SLOTS="1", TASKMESH_LOOKAHEAD="2")
    results = {getattr(gpu_app, task).delay(seconds, label=label).id: label
               for (task, seconds), label in zip(AHEAD, "abc", strict=True)}
    for result_id in results:
        gpu_app.app.AsyncResult(result_id).get(timeout=60)
    assert [{results[r]} for r in ran(broker, gpu_app)] == expected
    wait_until(lambda: all_acknowledged(broker), "every message acknowledged", 10)
