"""When the waiting head of a held line is predicted to fit, from learned run times.

An age limit alone is a poor bound for backfill when tasks run for minutes: a 20 GiB
head on a 24 GiB GPU waits for the tasks already running to end, which takes far longer
than any sensible age limit, so the line goes strict and the GPU drains while small work
that would have finished long before waits behind it. EASY backfilling (Lifka 1995,
the rule of most HPC batch schedulers) asks the better question: *when* will the head
fit, given when each running task is expected to end? A message may then start in the
gap if it is predicted to end by then, or if it fits in what the head will leave free
beside it — either way the head's predicted start does not move. Predictions are the
worker's learned mean run time per task name; where one is missing, the age limit is
the only bound, as before.

``Plan`` is that prediction for one pass of the policy, updated as messages start in
it. Pure: sizes and times are the caller's units (MiB of GPU memory, seconds on the
line's clock).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
#: Weight of the newest run in a learned run time: recent runs count most (a model or input
#: size that changes shows within a few runs), and one outlier moves it by a fifth.
RECENT_WEIGHT = 0.2


class RunTimes:
    """Run times learned per kind of task (a task name), as a moving mean of its runs."""

    def __init__(self) -> None:
        self.means: dict[Hashable, float] = {}

    def observe(self, kind: Hashable, seconds: float) -> None:
        mean = self.means.get(kind)
        self.means[kind] = seconds if mean is None else mean + RECENT_WEIGHT * (seconds - mean)

    def mean(self, kind: Hashable) -> float | None:
        return self.means.get(kind)


@dataclasses.dataclass(frozen=True)
class Forecast(Generic[T]):
    """What a worker knows of its GPU now: room, what runs (predicted end, None if not
    learned yet; size), a held message's predicted run time, and its pool's slots."""

    free: float
    running: Sequence[tuple[float | None, float]]
    duration: Callable[[T], float | None]
    slots: int


class Plan:
    """The head's predicted start (``-inf``: cannot tell) and what it leaves spare then."""

    def __init__(self, forecast: Forecast[T], head_size: float, now: float) -> None:
        self.forecast, self.head_size, self.now = forecast, head_size, now
        self.free = forecast.free
        self.running = [(None if end is None else max(end, now), size) for end, size in forecast.running]
        self._predict()

    def _predict(self) -> None:
        self.start, self.spare, self.spare_slots = -math.inf, 0.0, 0
        if any(end is None for end, _ in self.running):
            return
        ends = sorted(self.running, key=lambda run: run[0])
        free, start, left = self.free, self.now, len(ends)
        for end, size in ends:
            if free >= self.head_size and left < self.forecast.slots:
                break
            free, start, left = free + size, end, left - 1
        if free < self.head_size and not math.isinf(self.head_size):
            return  # memory the running tasks do not explain is in use: no prediction
        self.start = start
        self.spare = 0.0 if math.isinf(self.head_size) else free - self.head_size
        self.spare_slots = self.forecast.slots - left - 1

    @property
    def known(self) -> bool:
        return self.start != -math.inf

    def allows(self, item: T, size: float, age_limit: float) -> bool:
        """May *item* start now without moving the head's predicted start past *age_limit*
        (the head's arrival plus ``max_head_wait_s``) or its prediction, whichever is later?
        Without predictions, only while the head is younger than the limit."""
        duration = self.forecast.duration(item)
        if duration is None or not self.known:
            return self.now < age_limit
        return self.now + duration <= max(self.start, age_limit) or (size <= self.spare and self.spare_slots > 0)

    def started(self, item: T, size: float) -> None:
        duration = self.forecast.duration(item)
        self.free -= size
        self.running.append((None if duration is None else self.now + duration, size))
        self._predict()
