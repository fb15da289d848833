"""The message headers taskmesh adds to Celery's, named in one place.

Producers stamp them in ``TaskmeshTask.apply_async``; workers, the rebalancer and the
exporter read them straight from kombu's stored messages, so every reader must agree
on the spelling.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

REQUIREMENT_HEADER = "taskmesh"  # the task's Requirement, as Requirement.to_header() writes it
ENQUEUED_AT = "taskmesh_enqueued_at"  # time.time() at submit: the age of what waits
GPUS_HEADER = "taskmesh_gpus"  # set by the worker on admission: the UUIDs of the GPUs given to the run
FALLBACK_HEADER = "taskmesh_fallback_from"  # the queue a fallback move took the message from
BATCH_HEADER = "taskmesh_batch"  # the exclusive batch job an item belongs to (submit_batch(exclusive=True))
WARM_HEADER = "taskmesh_warm"  # set on admission of a task for a declared model: its reservation id,
# the model memory it carries ("claim"), and the idle models its process must unload first ("evict")


def enqueued_at(headers: Mapping[str, Any]) -> float | None:
    """The submit time stamped in *headers*, or None if absent or not a finite number."""
    stamp = headers.get(ENQUEUED_AT)
    if isinstance(stamp, bool) or not isinstance(stamp, int | float) or not math.isfinite(stamp):
        return None
    return float(stamp)
