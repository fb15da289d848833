"""What the admission controller keeps per message: a held one (not admitted yet) and a
running one (admitted, with what it holds and what is needed to learn its run time);
and how the held-line policy (``core.held_line``) reads a held message: its size and
its Celery priority, on the worker's monotonic clock."""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from celery.utils.time import maybe_iso8601, maybe_make_aware

from taskmesh.core.gate import Admitted
from taskmesh.core.held_line import LinePolicy, start_from_line
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


def start_held(line: collections.deque[Held], admit: Callable[[Held], bool], policy: LinePolicy,
               slots: int) -> list[Held]:
    """The held-line policy on a worker's line (``core.held_line``), with monotonic time; at most
    *slots* start (the pool's free slots)."""
    return start_from_line(line, admit, time.monotonic(), policy, since=lambda h: h.since, size=size_of,
                           priority=priority_of, slots=slots)


def takes_more(line: collections.deque[Held], policy: LinePolicy) -> bool:
    """Whether intake stays open while *line* is held."""
    return policy.takes_more(len(line), time.monotonic() - line[0].since if line else 0.0)
