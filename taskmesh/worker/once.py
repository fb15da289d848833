"""``@app.task(once=True)``: a second delivery of a run that is running or finished is
acknowledged and skipped, not run again.

Celery delivers at least once: a broker connection drop restores a running task's
message, a visibility timeout can pass, a producer can retry a publish. For a task
that must not run twice (a non-idempotent GPU job), the worker claims each run
(``state.once``) before admission. A delivery whose run is done is acknowledged and
counted (``duplicates_skipped``); one whose run another live holder has is *parked* —
kept unacknowledged, outside the held line so nothing waits behind it — until that run
is done (then skipped) or its holder is gone (then it runs). A claim lasts as long as a
holder is not presumed dead (``admission.dead_after_s``), the same horizon after which
its messages are given back, or until this worker gives the message up unrun (sent on to
GPUs that fit it, handed over to a model's queue, handed back to its queue), when the
claim goes with it. A parked message keeps one prefetch slot.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from taskmesh.state.once import OnceClaims, once_key
from taskmesh.worker.controller import AdmissionController

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Parked:
    message: Any
    proceed: Callable[[], Any]
    give_back: Callable[[], Any]
    key: str
    previous: str | None


class OnceGuard:
    def __init__(self, controller: AdmissionController, claims: OnceClaims) -> None:
        self.controller = controller
        self.claims = claims
        self.keys: dict[str, str] = {}  # task id → claim key of the run this worker holds
        self.parked: list[Parked] = []

    def offer(self, message: Any, proceed: Callable[[], Any], give_back: Callable[[], Any]) -> None:
        """Before admission: run it (through the controller), park it, or skip it."""
        headers = message.headers
        task_id = headers.get("id")
        retries = int(headers.get("retries") or 0)
        key, previous = once_key(task_id, retries), once_key(task_id, retries - 1) if retries else None
        with self.controller.lock:  # a copy of this run is already held or running in this worker
            held_here = task_id in self.controller.tags or task_id in self.controller.reservations
        if not held_here:
            self.controller.arrived(message)  # before the claim's round trip, and while it is parked
        answer = self.claims.claim(key, previous)
        if answer == "done":
            self._skip(message, "it already ran")
        elif answer == "running" or (answer == "mine" and held_here):
            self._park(Parked(message, proceed, give_back, key, previous))
        else:
            with self.controller.lock:
                self.keys[task_id] = key
            self.controller.offer(message, proceed, give_back)

    def _park(self, parked: Parked) -> None:
        with self.controller.lock:
            self.controller.tags.setdefault(parked.message.headers.get("id"), str(parked.message.delivery_tag))
        self.parked.append(parked)
        self.controller.counters["duplicates_parked"] += 1
        log.warning("task %s is already running elsewhere; this delivery waits for that run",
                    parked.message.headers.get("id"))

    def _skip(self, message: Any, why: str) -> None:
        task_id = message.headers.get("id")
        message.ack()
        with self.controller.lock:
            self.controller.tags.pop(task_id, None)
        self.controller.counters["duplicates_skipped"] += 1
        log.warning("task %s (once=True) delivered again; skipped: %s", task_id, why)

    def tick(self) -> None:
        """On the event loop: settle parked deliveries whose first run ended or lost its holder."""
        parked, self.parked = self.parked, []
        for entry in parked:
            task_id = entry.message.headers.get("id")
            answer = self.claims.claim(entry.key, entry.previous)
            if answer == "done":
                self._skip(entry.message, "the run it duplicated finished")
            elif answer == "claimed":
                with self.controller.lock:
                    self.controller.tags.pop(task_id, None)
                    self.keys[task_id] = entry.key
                self.controller.offer(entry.message, entry.proceed, entry.give_back)
            else:
                self.parked.append(entry)

    def ended(self, task_id: str, ran: bool) -> None:
        """A request ended: *ran* (acknowledged, or rejected for good) marks the run done;
        otherwise (requeued) the claim is given back so the redelivery can run."""
        with self.controller.lock:
            key = self.keys.pop(task_id, None)
        if key is None:
            return
        if ran:
            self.claims.done(key)
        else:
            self.claims.release(key)

    def handed_on(self, task_id: str) -> None:
        """Its message was sent on or handed back unrun: the claim goes with it, or the worker
        that takes it next would park it until this claim expired (``dead_after_s``)."""
        self.ended(task_id, ran=False)

    def refresh(self) -> None:
        """From the heartbeat: keep the claims of what this worker still holds; forget the rest."""
        c = self.controller
        with c.lock:
            for task_id in [t for t in self.keys if t not in c.tags and t not in c.reservations]:
                del self.keys[task_id]
            keys = list(self.keys.values())
        self.claims.refresh(keys)
