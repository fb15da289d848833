"""The real rebalance policy, run on the simulated fleet every rebalance interval.

At each interval of simulated time the simulator hands the probe what the live
rebalancer reads from Redis: every worker's registry record and the state its
controller announced, every queue's depth (waiting, in flight, oldest age) and the
mean run time learned per queue. The probe then runs the rebalancer's own code on
it: ``rebalance.worker_view``, ``queue_views`` and ``groups_seen`` build the views,
and the policy's ``alerts``, ``scaling_hints`` and ``saturated`` (for each GPU queue,
the test ``rebalance`` applies before moving fallback tasks) judge them.

It only observes; the simulation carries out nothing it says, so the schedule is the
same with or without it. On this fleet the live rebalancer would do nothing more
either: ``assist_moves`` and ``pool_sizes`` act only on mixed, CPU and gevent workers,
which the simulated fleet has none of (so they are not called), and a saturated GPU
queue gives up only tasks that declare a ``fallback``, which no synthetic task does.
An alert counts as raised when it was not standing at the previous run, as
``rebalance`` counts the ones it announces.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

from taskmesh.app.rebalance import groups_seen, queue_views, worker_view
from taskmesh.core.config import Config
from taskmesh.core.need_queues import family
from taskmesh.core.rebalance_policy import alerts, saturated, scaling_hints
from taskmesh.core.records import WorkerRecord
from taskmesh.state.queues import QueueDepth


@dataclasses.dataclass
class PolicyLog:
    """What the policy said over a run, and what saying it cost on the wall clock."""

    runs: int = 0
    run_us: array.array = dataclasses.field(default_factory=lambda: array.array("f"))
    peak_hints: dict[str, int] = dataclasses.field(default_factory=dict)  # largest replicas wanted, by group
    raised: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)  # by alert kind
    saturated_runs: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)  # by queue


class RebalanceProbe:
    """Runs the rebalance policy at ``interval_s``, ``2 * interval_s``, ... of simulated time."""

    def __init__(self, config: Config, interval_s: float | None = None) -> None:
        if interval_s is not None and not interval_s > 0:
            raise ValueError(f"rebalance interval {interval_s!r} s: give a number of seconds > 0, or null for the "
                             "configured rebalance.interval_s")
        self.config = config
        self.interval_s = interval_s or config.rebalance.interval_s
        self.next_at = self.interval_s
        self.log = PolicyLog()
        self._standing: set[str] = set()

    def observe(self, records: Sequence[WorkerRecord], states: Mapping[str, Mapping[str, Any]],
                depths: Mapping[str, QueueDepth], runtimes: Mapping[str, float]) -> None:
        """One rebalance run on a snapshot; its cost is the real code's, from snapshot to verdicts."""
        start = time.perf_counter_ns()
        workers = [worker_view(r, states[r.node]) for r in records]
        queues = queue_views(depths, runtimes, workers)
        found = alerts(queues, workers, self.config, groups_seen(records))
        hints = scaling_hints(queues, workers, self.config)
        fallback_depth = self.config.queue("gpu").fallback_depth
        full = [v.name for v in queues.values() if family(v.name) == "gpu" and saturated(v, workers, fallback_depth)]
        log = self.log
        log.run_us.append((time.perf_counter_ns() - start) / 1000)
        log.runs += 1
        self.next_at = (log.runs + 1) * self.interval_s  # multiplied, not summed: no drift over 10^5 runs
        for group, wanted in hints.items():
            log.peak_hints[group] = max(wanted, log.peak_hints.get(group, 0))
        log.raised.update(a.kind for a in found if a.target not in self._standing)
        self._standing = {a.target for a in found}
        log.saturated_runs.update(full)
