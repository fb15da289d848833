"""What the admission controller keeps per message: a held one (not admitted yet) and a
running one (admitted, with what it holds and what is needed to learn its run time);
and how the held-line policy (``core.held_line``) reads a held message — its size, its
Celery priority, and when it and the running tasks should end (``core.forecast``) —
on the worker's monotonic clock."""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from celery.utils.time import maybe_iso8601, maybe_make_aware

from taskmesh.core.claims import gpu_pool
from taskmesh.core.forecast import Forecast, RunTimes
from taskmesh.core.gate import Admitted, Gate
from taskmesh.core.held_line import LinePolicy, predicts, start_from_line
from taskmesh.core.requirements import Requirement


def expired(expires: Any) -> bool:
    """Past the message's ``expires`` (ISO 8601, as Celery sends it)."""
    try:
        return expires is not None and maybe_make_aware(maybe_iso8601(expires)) < datetime.now(UTC)
    except (TypeError, ValueError):
        return False  # Celery's own Request reports a malformed one when it is handed over


@dataclasses.dataclass(frozen=True)
class Running:
    """An admitted task: what it holds, and what is needed to learn its run time."""

    admitted: Admitted
    since: float  # monotonic, when handed to the pool
    queue: str | None
    task: str | None


@dataclasses.dataclass
class Held:
    message: Any
    proceed: Callable[[], Any]
    requirement: Requirement
    since: float
    give_back: Callable[..., Any]  # requeue it at the front of its queue (restore=False: already put back)


def size_of(held: Held) -> float:
    """What *held* claims, for the fit rules: its GPU memory (a whole-GPU task: everything), or host memory."""
    need = held.requirement
    if need.needs_gpu:
        return math.inf if need.exclusive or need.vram_mib is None else need.vram_mib * need.gpus
    return need.memory_mib or 0


def priority_of(held: Held) -> int:
    """Its Celery priority, as kombu's Redis transport files it (lower first; none sent: 0)."""
    sent = (held.message.properties or {}).get("priority")
    if sent is None:
        sent = held.requirement.priority
    try:
        return int(sent or 0)
    except (TypeError, ValueError):
        return 0


def forecast_of(gate: Gate, running: Mapping[str, Running], run_times: RunTimes,
                slots: int) -> Forecast[Held] | None:
    """What the worker knows of its GPU, for the head's predicted start: the room the gate
    sees (the provider's and this worker's claims, the lesser), and when each running task
    and held message should end, from the run time learned per task name. Only on a worker
    with one GPU, as ``taskmesh worker`` runs them, where a line's sizes are that GPU's memory."""
    gpus = gate.gpus()
    if len(gpus) != 1 or not gpus[0].healthy:
        return None
    (gpu,) = gpus
    margin, pool, mean = gate.config.safety_margin_mib, gpu_pool(gpu.uuid), run_times.mean
    claimed = [(run, run.admitted.claims().get(pool, 0)) for run in running.values()]
    free = min(gpu.memory_free_mib - margin, gpu.memory_total_mib - margin - sum(mib for _, mib in claimed))
    ends = [(None if (m := mean(run.task)) is None else run.since + m, mib) for run, mib in claimed]
    return Forecast(free, ends, lambda held: mean(held.message.headers.get("task")), slots)


def start_held(line: collections.deque[Held], admit: Callable[[Held], bool], policy: LinePolicy,
               slots: int, forecast: Callable[[], Forecast[Held] | None]) -> list[Held]:
    """The held-line policy on a worker's line (``core.held_line``), with monotonic time; at most
    *slots* start (the pool's free slots)."""
    return start_from_line(line, admit, time.monotonic(), policy, since=lambda h: h.since, size=size_of,
                           priority=priority_of, slots=slots, forecast=forecast)


def takes_more(line: collections.deque[Held], policy: LinePolicy,
               forecast: Callable[[], Forecast[Held] | None]) -> bool:
    """Whether intake stays open while *line* is held (past the head's age limit, only while
    its start can be predicted: asked of *forecast* only then)."""
    now = time.monotonic()
    waited = now - line[0].since if line else 0.0
    predicted = waited >= policy.max_head_wait_s and predicts(policy, forecast(), size_of(line[0]), now)
    return policy.takes_more(len(line), waited, predicted)
