"""This worker's lease as the worker itself must treat it: fencing, not only heartbeats.

Redis times the lease (each announce renews it, ``Registry.announce``); the worker keeps
a stricter view of its own: the lease holds until ``reservation_ttl_s`` after the renewal
was *sent* (monotonic clock), so here it runs out before it can run out in Redis. While
it does not hold (a stall, Redis unreachable, a renewal that shows it was lost) the
admission controller takes no new work (reason ``lease``).

A renewal shows the lease lost when Redis had none (restarted, flushed), when it was
renewed later than the TTL (the reservations may have expired and the memory been given
to others), or when the worker was presumed dead and its messages given back. The
heartbeat then re-creates the reservations of what the worker still runs and lifts the
pause. Messages given back are no longer this worker's: a held copy is dropped, never
run here; a running copy is the one case in which a task runs twice, counted in
``duplicates_detected`` and logged.
"""

from __future__ import annotations

import time

from taskmesh.state.registry import Renewal


class Lease:
    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self.valid_until: float | None = None  # monotonic; None until the first renewal
        self.lost: str | None = None  # why, until the heartbeat has recovered from it
        self.given_back: set[str] = set()  # delivery tags already dealt with
        self.holding_since: float | None = None  # monotonic: since when it has held without a break

    def doubt(self) -> str | None:
        """Why this worker must not take new work now; ``None`` while its lease holds."""
        if self.lost is not None:
            return self.lost
        if self.valid_until is not None and time.monotonic() > self.valid_until:
            return f"lease not renewed within reservation_ttl_s ({self.ttl_s:g}s)"
        return None

    def renewed(self, renewal: Renewal) -> tuple[str | None, dict[str, str]]:
        """Read a renewal: why the lease was lost (kept until ``holds``; ``None`` if it held), and
        the messages (tag → task id) given back elsewhere that this worker has not dealt with yet."""
        new = {tag: task_id for tag, task_id in renewal.given_back.items() if tag not in self.given_back}
        self.given_back.update(new)
        why = []
        if renewal.age_s is None and self.valid_until is not None:
            why.append("Redis no longer had it (restarted, flushed or its keys deleted)")
        elif renewal.age_s is not None and renewal.age_s > self.ttl_s:
            why.append(f"not renewed for {renewal.age_s:.1f}s by Redis's clock, "
                       f"past reservation_ttl_s ({self.ttl_s:g}s)")
        if new:
            why.append(f"presumed dead, {len(new)} of its messages delivered again elsewhere")
        if why:
            self.lost = "; ".join(why)
        return self.lost, new

    def holds(self, sent_at: float) -> None:
        """The renewal sent at *sent_at* (monotonic) held, or what was lost is restored."""
        if self.lost is not None or self.holding_since is None:
            self.holding_since = sent_at
        self.lost = None
        self.valid_until = sent_at + self.ttl_s

    def held_for(self) -> float:
        """How long this worker has held its lease without a break, by its own clock.

        A worker presumes others dead only after holding its own for ``dead_after_s``:
        when Redis was unreachable or stalled for everyone, every lease looks old at once,
        and the first worker back must not give away the work of all the others."""
        return 0.0 if self.holding_since is None else time.monotonic() - self.holding_since
