"""Exclusive batch mode on a GPU worker: while a batch has every GPU, nothing else starts.

``submit_batch(task, items, exclusive=True)`` records the batch as exclusive
(``state.exclusive``) and sends its items to one queue that every GPU worker consumes.
Each GPU worker follows the mode:

* its heartbeat thread reads it (one ``GET`` a beat) and, while the worker takes part,
  keeps the mode's lease and ends it once every item has finished (done, failed or
  revoked, as ``batch_status`` counts them);
* on entering (on the event loop): its held line goes back to the front of its queues,
  it consumes the batch's queue alone (``Intake.only``: Celery's ``cancel_task_queue``),
  so other GPU work waits in its queues, never fetched, nothing lost; what runs finishes;
  it notes the models warm in it, and the first item its pool process runs unloads them
  (the ``evict`` of ``worker.warm``), so the batch has the whole GPU;
* a message of other GPU work already on its way is handed back as it arrives;
* on leaving: it consumes its queues again and, with ``reload_after``, sends one warm-up
  task per model it had warm (``taskmesh.warm.<model>``, declared with the model), which
  loads it again on a GPU that can take it.
"""

from __future__ import annotations

import logging
from typing import Any

from taskmesh.core.headers import BATCH_HEADER
from taskmesh.core.need_queues import EXCLUSIVE_QUEUE
from taskmesh.core.profiles import Profile
from taskmesh.state.batches import job, job_progress, result_states
from taskmesh.state.exclusive import ExclusiveBatches

log = logging.getLogger(__name__)
REASON = "exclusive"
GPU_QUEUE = Profile.GPU_INTENSIVE.queue


def warm_up_task(model: str) -> str:
    """The name of the task that loads *model* (``app.models`` declares one per model)."""
    return f"taskmesh.warm.{model}"


class ExclusiveFollower:
    def __init__(self, controller: Any) -> None:
        self.c = controller
        self.store = ExclusiveBatches(controller.registry.client)
        self.seen: dict[str, Any] | None = None  # the mode as the heartbeat last read it
        self.active: str | None = None  # the batch this worker follows (event loop)

    # --- heartbeat thread ------------------------------------------------------------

    def poll(self) -> None:
        mode = self.store.current()
        self.seen = mode
        if mode is None or self.active != mode["batch"]:
            return
        if self._finished(mode["batch"]):
            if self.store.end(mode["batch"]):
                log.warning("exclusive batch %s finished: GPUs back to all work", mode["batch"])
            self.seen = None
        else:
            self.store.extend(mode["batch"])

    def _finished(self, batch_id: str) -> bool:
        found = job(self.c.registry.client, batch_id)
        if found is None:
            return True  # its record expired: nothing left to wait for
        record, task_ids = found
        backend = self.c.consumer.app.backend
        states = result_states(backend.client, [backend.get_key_for_task(t) for t in task_ids])
        return job_progress(record, states)["running_or_waiting"] <= 0

    # --- event loop ------------------------------------------------------------------

    def tick(self) -> None:
        c = self.c
        consumed = c.intake.consumed()
        if not (c.gate.known and GPU_QUEUE in set(consumed) - {c.intake.assist}):
            return  # only GPU workers take part (a mixed worker, even one assisting gpu, goes on with its own)
        if EXCLUSIVE_QUEUE not in consumed:
            c.intake.add(EXCLUSIVE_QUEUE)  # always: items left when a mode's lease lapsed still run
        batch = self.seen["batch"] if self.seen else None
        if batch == self.active:
            return
        if self.active is not None:
            self._leave(self.active)
        if batch is not None:
            self._enter(batch)

    def holds_back(self, message: Any, requirement: Any) -> bool:
        """Is *message* other GPU work, which waits while the batch runs?"""
        return self.active is not None and requirement.needs_gpu and message.headers.get(BATCH_HEADER) != self.active

    def owns(self, message: Any) -> bool:
        """Is *message* an item of the exclusive batch this worker runs now?"""
        return self.active is not None and message.headers.get(BATCH_HEADER) == self.active

    def _enter(self, batch: str) -> None:
        c = self.c
        self.active = batch
        c.reasons[REASON] = f"exclusive batch {batch}: other GPU work waits in its queues"
        c.hand_back.line(f"exclusive batch {batch} began")
        c.intake.only(EXCLUSIVE_QUEUE)
        warm = sorted({name for entry in c.warm.read().values() for name in entry["models"]})
        self.store.note_warm(batch, c.node, warm)
        log.warning("exclusive batch %s: this worker runs its items only (models warm here: %s)", batch,
                    ", ".join(warm) or "none")

    def _leave(self, batch: str) -> None:
        c = self.c
        self.active = None
        c.reasons.pop(REASON, None)
        c.intake.restore()
        info = self.store.info(batch) or {}
        reload = self.store.take_warm(batch, c.node) if info.get("reload_after", True) else []
        app = c.consumer.app
        for model in reload:
            if warm_up_task(model) in app.tasks:
                app.send_task(warm_up_task(model))
        log.warning("exclusive batch %s over: back to all work%s", batch,
                    f"; loading again {', '.join(reload)}" if reload else "")
