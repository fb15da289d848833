"""Checks on the arguments of taskmesh's remote-control commands, before a worker acts.

Anyone who can write to the broker can broadcast ``taskmesh_resize`` and
``taskmesh_assist`` (Celery's remote control has no authentication of its own), and
the arguments arrive as JSON, so a worker must not trust them: an unbounded ``n``
would fork thousands of processes, and an arbitrary queue name would make a worker
consume a queue nobody declared. Each check returns the problem as one line naming the
argument and what is allowed, or ``None`` when the command may run.
"""

from __future__ import annotations

from collections.abc import Collection

MAX_QUEUE_NAME = 200


def resize_problem(n: object, size: int, ceiling: int) -> str | None:
    """Why ``taskmesh_resize n`` may not run on a pool of *size* processes that may hold at most
    *ceiling* (the host's CPU threads for prefork, ``max_concurrency`` for gevent)."""
    if isinstance(n, bool) or not isinstance(n, int):
        return f"n must be a whole number, not {n!r}"
    target = size + n
    if target < 1:
        return f"n={n} would leave {target} processes; the pool keeps at least 1 (it has {size})"
    if target > ceiling:
        return f"n={n} would make {target} processes; this pool may hold at most {ceiling} (it has {size})"
    return None


def assist_problem(queue: object, known: Collection[str]) -> str | None:
    """Why ``taskmesh_assist queue`` may not run: the queue must be one the app declares
    (empty or ``None``: stop assisting)."""
    if queue is None or queue == "":
        return None
    if not isinstance(queue, str) or len(queue) > MAX_QUEUE_NAME:
        return f"queue must be a queue name, not {str(queue)[:40]!r}"
    if queue not in known:
        return f"unknown queue {queue!r}; this app declares {', '.join(sorted(known))}"
    return None
