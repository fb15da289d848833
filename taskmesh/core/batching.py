"""Micro-batching and result caching options, validated when the task is declared.

``batch_size=32, batch_wait="50ms"`` makes a task take a list of items: callers still
send one item per message (``.delay(x)``), and the worker calls the function once per
batch. ``vram_per_item="200MiB"`` scales the batch's GPU memory with its size (added to
``vram``, the part every batch needs, such as the model's weights). ``cache_ttl="5m"``
returns a stored result for identical arguments within the TTL. Durations are written
``"50ms"``, ``"2s"``, ``"5m"``, ``"1h"`` or a number of seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from taskmesh.core.errors import RequirementError
from taskmesh.core.requirements import Requirement
from taskmesh.core.sizes import SizeError, parse_mib

#: Task options of batching and caching; ``@app.task`` takes them out of Celery's way.
BATCH_OPTIONS = ("batch_size", "batch_wait", "vram_per_item", "cache_ttl")
DEFAULT_BATCH_WAIT_S = 0.05
_DURATION = re.compile(r"^\s*(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>ms|s|m|h|)\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "": 1.0, "m": 60.0, "h": 3600.0}


@dataclasses.dataclass(frozen=True)
class Batching:
    """How a task batches (``size`` ``None``: it does not) and caches (``cache_ttl_s`` ``None``: it does not)."""

    size: int | None = None
    wait_s: float = DEFAULT_BATCH_WAIT_S
    vram_per_item_mib: int | None = None
    cache_ttl_s: float | None = None

    def requirement(self, base: Requirement, items: int) -> Requirement:
        """What one batch of *items* needs: ``vram`` plus ``vram_per_item`` for each item."""
        if self.vram_per_item_mib is None:
            return base
        return dataclasses.replace(base, vram_mib=(base.vram_mib or 0) + self.vram_per_item_mib * items)

    def items_that_fit(self, base: Requirement, memory_mib: int) -> int:
        """The most items one batch may take on a GPU of *memory_mib* (at least 1; all without ``vram_per_item``)."""
        size = self.size or 1
        if self.vram_per_item_mib is None:
            return size
        return max(1, min(size, (memory_mib - (base.vram_mib or 0)) // self.vram_per_item_mib))


def parse_seconds(value: object) -> float:
    """``"50ms"`` → 0.05; a number is seconds. Raises ``ValueError`` saying how to write one."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise ValueError(f"{value!r} is not a duration; write it like '50ms', '2s', '5m', '1h' or 0.05")
        seconds = float(match["num"]) * _UNIT_S[match["unit"]]
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{value!r} is not a duration >= 0")
    return seconds


def batching_from_options(task: str, options: Mapping[str, Any], requirement: Requirement) -> Batching | None:
    """Build from ``@app.task`` keywords; ``None`` when the task neither batches nor caches."""
    given = {k: v for k, v in options.items() if v is not None}
    if not given:
        return None
    size = given.get("batch_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise RequirementError(task, f"batch_size {size!r} must be a whole number >= 1, such as 32")
    for name in ("batch_wait", "vram_per_item"):
        if name in given and size is None:
            raise RequirementError(task, f"{name} is set without batch_size; add batch_size=32 or remove {name}")
    wait = _duration(task, "batch_wait", given.get("batch_wait", DEFAULT_BATCH_WAIT_S))
    ttl = _duration(task, "cache_ttl", given["cache_ttl"]) if "cache_ttl" in given else None
    if ttl is not None and ttl <= 0:
        raise RequirementError(task, f"cache_ttl {given['cache_ttl']!r} must be above 0, such as '5m'")
    per_item = None
    if "vram_per_item" in given:
        if not requirement.profile.uses_gpu:
            raise RequirementError(task, f"vram_per_item is set but profile {requirement.profile.queue!r} runs on "
                                         "no GPU; use profile='gpu' or remove vram_per_item")
        try:
            per_item = parse_mib(given["vram_per_item"])
        except SizeError as exc:
            raise RequirementError(task, f"vram_per_item: {exc}") from None
    return Batching(size=size, wait_s=wait, vram_per_item_mib=per_item, cache_ttl_s=ttl)


def _duration(task: str, name: str, value: object) -> float:
    try:
        return parse_seconds(value)
    except ValueError as exc:
        raise RequirementError(task, f"{name}: {exc}") from None


def cache_key(task: str, args: Any, kwargs: Any) -> str:
    """A digest of the call: the same task with equal JSON arguments gives the same key."""
    text = json.dumps([task, list(args or ()), dict(kwargs or {})], sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


class RetryItem(Exception):  # noqa: N818 - read as "retry this item", not as an error
    """Return it in place of an item's result to run that item again later, as
    ``self.retry()`` does for one task: the same id, ``retries`` + 1, after *countdown*
    seconds, within the task's ``max_retries`` (past it the item fails with *exc*, or
    with Celery's ``MaxRetriesExceededError``). The other items' results are stored."""

    def __init__(self, exc: BaseException | None = None, countdown: float | None = None) -> None:
        super().__init__(repr(exc) if exc is not None else "retry this item")
        self.exc, self.countdown = exc, countdown
