"""What the admission controller keeps per message: a held one (not admitted yet) and a
running one (admitted, with what it holds and what is needed to learn its run time)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from celery.utils.time import maybe_iso8601, maybe_make_aware

from taskmesh.core.gate import Admitted
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
    give_back: Callable[[], Any]  # requeue it at the front of its queue, unacknowledged till now
