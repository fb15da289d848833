"""The fleet benchmark's fluid optimum: the configuration LP sees what the separate memory
and slot budgets of the issue's bound miss, and never claims less than a schedule needs."""

from __future__ import annotations

from benchmarks.fluid import configurations, fluid_optimum
from benchmarks.synthetic import TaskClass, lower_bound, make_fleet, requirements

MARGIN = 512
# one L4 (24 GiB less the margin: 23.5 GiB usable), 4 slots
SMALL = TaskClass("small", {"profile": "gpu", "vram": "2GiB"}, 1, 10)
LARGE = TaskClass("large", {"profile": "gpu", "vram": "20GiB"}, 1, 10)
WHOLE = TaskClass("whole", {"profile": "gpu"}, 1, 10)


def test_a_large_task_cannot_use_memory_and_slots_left_by_small_ones_at_once():
    # 8 small tasks and 1 large, 10 s each. The bound: slots 90 task-s / 4 = 22.5 s.
    # But beside the large task only one small one fits (20 + 2 + 2 GiB > 23.5): 10 s running
    # {large, small}, then 70 task-s of small ones four at a time, 17.5 s: 27.5 s at best.
    reqs = requirements((SMALL, LARGE))
    jobs = [(0, 10.0)] * 8 + [(1, 10.0)]
    fleet = make_fleet(1)
    assert lower_bound(fleet, jobs, reqs, 4, MARGIN)["bound_s"] == 22.5
    assert fluid_optimum(fleet, jobs, reqs, 4, MARGIN) == 27.5


def test_a_whole_gpu_task_runs_alone_and_no_schedule_beats_the_longest_task():
    reqs = requirements((SMALL, WHOLE))
    assert [dict(c) for c in configurations("l4", [0, 1], reqs, 2, MARGIN)] == [{1: 1}, {0: 1}, {0: 2}]
    jobs = [(0, 10.0)] * 4 + [(1, 10.0)]  # whole GPU alone 10 s, then the small ones 4 at a time 10 s
    assert fluid_optimum(make_fleet(1), jobs, reqs, 4, MARGIN) == 20.0
    assert fluid_optimum(make_fleet(8), [(0, 1.0)] * 8 + [(1, 30.0)], reqs, 4, MARGIN) == 30.0
