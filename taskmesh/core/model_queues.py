"""Model queues: where a task for a warm model goes, and when a burst warms it on another GPU.

Affinity rides on Celery's own queues. A task declared with ``model=M`` goes to M's model
queue (``gpu.model.M``) when the registry shows a live worker with M ready, else to its
profile queue, where any GPU worker that can fit M plus the task takes it and loads M.
A worker consumes M's model queue (``add_consumer``/``cancel_consumer``) while M is warm
in it, so those tasks reach only GPUs that need no load.

A worker without M also consumes M's model queue when:

* the burst rule says so (``plan_warm_up``): M's tasks would wait longer where M is warm
  (M's queued work spread over the slots serving it, plus the holders' other queued work)
  than here (M's load time plus the work queued for the models this GPU holds); it then
  loads M with the first such task and stays a holder; or
* nobody holds M (evicted everywhere, its holders dead) and messages wait there: one live
  worker whose GPUs could ever fit M, the same one by every worker's reckoning
  (``stranded_taker``), takes them and loads M, so a model queue never strands its messages.

Pure (no Celery, no Redis): the worker and the tests decide alike.
"""

from __future__ import annotations

import dataclasses
import zlib

MODEL_QUEUE_PREFIX = "gpu.model."  # a model queue belongs to the gpu family (``need_queues.family``)


def model_queue(model: str) -> str:
    """The queue of the tasks for *model* that a GPU with it warm takes."""
    return f"{MODEL_QUEUE_PREFIX}{model}"


def model_of(queue: str) -> str | None:
    """The model whose queue *queue* is, or ``None`` for any other queue."""
    return queue[len(MODEL_QUEUE_PREFIX):] if queue.startswith(MODEL_QUEUE_PREFIX) else None


@dataclasses.dataclass(frozen=True)
class WarmUp:
    """A decision: load M on one more GPU (or not), the numbers it weighed, and why."""

    warm: bool
    expected_wait_s: float
    load_s: float
    reason: str


def plan_warm_up(queued: int, mean_run_s: float | None, serving_slots: int, load_s: float,
                 besides_s: float = 0.0, own_s: float | None = 0.0) -> WarmUp:
    """Whether a GPU without the model should load it to serve *queued* tasks waiting for it.

    The expected wait of those tasks where the model is warm is ``queued × mean_run_s /
    serving_slots`` plus *besides_s*, the other work queued for the GPUs that hold it (they
    serve every model they hold, so the wait is theirs, not one queue's). Here, they would
    wait for the model's (learned) load time plus *own_s*, the work already queued for the
    models this GPU holds. Another copy pays off only when the wait there is the longer.
    Before a run of the model's tasks (or of those queued here, *own_s* ``None``) was
    measured the comparison is unknown and nothing is warmed: the holders keep serving and
    a measurement follows within seconds. No slot serving it is the stranded case, handled
    apart (any GPU that fits takes it).
    """
    if queued <= 0:
        return WarmUp(False, 0.0, load_s, "nothing queued")
    if mean_run_s is None:
        return WarmUp(False, 0.0, load_s, f"keep: {queued} queued, no run time measured yet")
    if own_s is None:
        return WarmUp(False, 0.0, load_s, f"keep: {queued} queued, but no run time measured yet for the work "
                                          "queued here")
    wait = queued * mean_run_s / max(serving_slots, 1) + besides_s
    besides = f" + {besides_s:.1f}s of their other work" if besides_s else ""
    numbers = f"{queued} queued x {mean_run_s:.3f}s / {serving_slots} slot(s){besides} = {wait:.1f}s"
    here = f"load {load_s:.1f}s" + (f" + {own_s:.1f}s queued here" if own_s else "")
    if wait > load_s + own_s:
        return WarmUp(True, wait, load_s, f"warm: {numbers} > {here}")
    return WarmUp(False, wait, load_s, f"keep: {numbers} <= {here}")


def stranded_taker(model: str, nodes: list[str]) -> str | None:
    """The one worker that takes a stranded model queue: every worker works it out alike from
    the registry's live workers that could fit the model, so it is loaded once; by the model's
    name, so stranded models spread over the fleet."""
    if not nodes:
        return None
    ordered = sorted(set(nodes))
    return ordered[zlib.crc32(model.encode()) % len(ordered)]
