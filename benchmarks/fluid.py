"""The fluid optimum of a fleet's workload: the shortest makespan any scheduler could reach.

``synthetic.lower_bound`` (the issue's bound) takes memory and slots as two separate
budgets and the larger of the two: it assumes every GPU's memory full whatever the sizes
of the tasks on it, though four 2 GiB tasks fill an H100's four slots and leave 72 GiB
idle. At every moment a GPU runs one *configuration* — a set of tasks that fits its
memory and its slots (a whole-GPU task alone) — so over a schedule each GPU kind spends
its GPUs' time across configurations, and every task class's run time must be covered by
the configurations it is part of.
The least time that covers them all is a small linear programme (the configuration LP of
bin packing), solved here with SciPy's HiGHS. It is still a lower bound: tasks may be
split across configurations at will (no fragmentation, no tail), and every task is
placed knowing the whole batch in advance. The ratio of a makespan to it says how far a
schedule is from the best placement, where the ratio to ``lower_bound`` also counts what
no placement can recover.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Sequence

from scipy.optimize import linprog

from benchmarks.synthetic import Host, eligible_kinds, kind_counts, kind_gpu, whole_gpu
from taskmesh.core.requirements import Requirement


def configurations(kind: str, classes: Sequence[int], reqs: Sequence[Requirement], slots: int,
                   margin: int) -> list[collections.Counter[int]]:
    """Every set of tasks (by class, with repeats) one GPU of *kind* can run at once."""
    usable = kind_gpu(kind).memory_total_mib - margin
    eligible = eligible_kinds([kind], reqs, margin)
    runnable = [c for c in classes if eligible[c]]
    whole = [c for c in runnable if whole_gpu(reqs[c])]
    shared = [c for c in runnable if c not in whole]
    found = [collections.Counter([c]) for c in whole]
    for count in range(1, slots + 1):
        for combo in itertools.combinations_with_replacement(shared, count):
            if sum(reqs[c].vram_mib * reqs[c].gpus for c in combo) <= usable:
                found.append(collections.Counter(combo))
    return found


def fluid_optimum(fleet: Sequence[Host], jobs: Sequence[tuple[int, float]], reqs: Sequence[Requirement],
                  slots: int, margin: int) -> float:
    """Seconds: no schedule of *jobs* on *fleet* ends sooner (nor before its longest task ends)."""
    count = kind_counts(fleet)
    kinds = sorted(count)
    eligible = eligible_kinds(kinds, reqs, margin)  # per class, once: not per job
    work: collections.Counter[int] = collections.Counter()
    longest = 0.0
    for cls, duration in jobs:
        if eligible[cls]:
            work[cls] += duration
            longest = max(longest, duration)
    classes = sorted(work)
    columns = [(k, config) for k in kinds for config in configurations(k, classes, reqs, slots, margin)]
    # variables: seconds of GPU time each configuration runs, then the makespan T (minimised)
    per_kind = [[1.0 if kind == k else 0.0 for kind, _ in columns] + [-count[k]] for k in kinds]
    covered = [[float(config[c]) for _, config in columns] + [0.0] for c in classes]
    solved = linprog([0.0] * len(columns) + [1.0], A_ub=per_kind, b_ub=[0.0] * len(kinds),
                     A_eq=covered, b_eq=[work[c] for c in classes], method="highs")
    if not solved.success:
        raise RuntimeError(f"fluid optimum: the linear programme failed: {solved.message}")
    return round(max(solved.x[-1], longest), 1)
