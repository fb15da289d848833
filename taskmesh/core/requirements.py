"""What a task needs, as a frozen value object validated when the task is declared.

Validation happens at import (``@app.task``), not when a message first arrives at a
worker hours later: a typo in ``vram=`` should break the deploy, with the task's name
in the message, not a GPU queue at 3 a.m.

The requirement travels in the message headers (``to_header``/``from_header``) so
any worker — or the rebalancer — can read it without importing the task's module.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from taskmesh.core.errors import RequirementError
from taskmesh.core.profiles import Priority, Profile
from taskmesh.core.sizes import SizeError, parse_mib

#: Task options that describe resources; ``@app.task`` takes them out of Celery's way.
REQUIREMENT_OPTIONS = (
    "profile",
    "vram",
    "min_compute_capability",
    "cpu_cores",
    "cpu_threads",
    "memory",
    "gpus",
    "exclusive",
    "fallback",
    "model",
    "urgency",
)
_CC = re.compile(r"^\s*(\d+)\.(\d+)\s*$")


@dataclasses.dataclass(frozen=True)
class Requirement:
    """Resources one run of a task needs. Sizes are MiB; ``None`` means "not declared"."""

    profile: Profile = Profile.IO_BOUND
    vram_mib: int | None = None
    min_compute_capability: tuple[int, int] | None = None
    cpu_cores: float | None = None
    cpu_threads: int = 1
    memory_mib: int | None = None
    gpus: int = 0
    exclusive: bool = False
    fallback: Profile | None = None
    model: str | None = None
    priority: int | None = None

    @property
    def needs_gpu(self) -> bool:
        return self.gpus > 0

    @classmethod
    def from_options(
        cls, task: str, options: Mapping[str, Any], default_profile: Profile = Profile.IO_BOUND
    ) -> Requirement:
        """Build from ``@app.task`` keyword options; raise ``RequirementError`` naming *task*."""
        unknown = set(options) - set(REQUIREMENT_OPTIONS) - {"priority"}
        if unknown:
            raise RequirementError(task, f"unknown resource option(s) {sorted(unknown)}")
        try:
            profile = Profile.parse(options.get("profile", default_profile))
        except ValueError as exc:
            raise RequirementError(task, str(exc)) from None
        vram = _size(task, "vram", options.get("vram"))
        memory = _size(task, "memory", options.get("memory"))
        cc = _compute_capability(task, options.get("min_compute_capability"))
        gpus = _whole(task, "gpus", options.get("gpus", 1 if profile.uses_gpu else 0), minimum=0)
        if not profile.uses_gpu:
            for name, given in (("vram", vram), ("min_compute_capability", cc)):
                if given is not None:
                    raise RequirementError(
                        task,
                        f"{name} is set but profile {profile.queue!r} runs on no GPU; "
                        f"use profile='gpu' (or 'mixed'), or remove {name}",
                    )
            if gpus:
                raise RequirementError(
                    task, f"gpus={gpus} on profile {profile.queue!r}; use profile='gpu' or remove gpus"
                )
        fallback = options.get("fallback")
        if fallback is not None:
            try:
                fallback = Profile.parse(fallback)
            except ValueError as exc:
                raise RequirementError(task, f"fallback: {exc}") from None
            if fallback is profile:
                raise RequirementError(
                    task, f"fallback {fallback.queue!r} is the task's own profile; name another one"
                )
        cores = options.get("cpu_cores")
        if cores is not None and (
            isinstance(cores, bool) or not isinstance(cores, (int, float)) or cores <= 0
        ):
            raise RequirementError(task, f"cpu_cores {cores!r} must be a positive number such as 2 or 0.5")
        exclusive = options.get("exclusive", False)
        if not isinstance(exclusive, bool):
            raise RequirementError(task, f"exclusive {exclusive!r} must be True or False")
        model = options.get("model")
        if model is not None and (not isinstance(model, str) or not model.strip()):
            raise RequirementError(task, f"model {model!r} must be a non-empty name such as 'whisper-small'")
        return cls(
            profile=profile,
            vram_mib=vram,
            min_compute_capability=cc,
            cpu_cores=float(cores) if cores is not None else None,
            cpu_threads=_whole(task, "cpu_threads", options.get("cpu_threads", 1), minimum=1),
            memory_mib=memory,
            gpus=gpus,
            exclusive=exclusive,
            fallback=fallback,
            model=model,
            priority=_priority(task, options),
        )

    def to_header(self) -> dict[str, Any]:
        """A compact JSON-safe form for the message header ``taskmesh``."""
        out: dict[str, Any] = {"profile": self.profile.queue}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "profile" or value == field.default:
                continue
            if isinstance(value, Profile):
                value = value.queue
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        return out

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> Requirement:
        """Inverse of ``to_header``; trusts the producer (it validated at import)."""
        values = dict(header)
        values["profile"] = Profile.parse(values.get("profile", Profile.IO_BOUND))
        if values.get("fallback") is not None:
            values["fallback"] = Profile.parse(values["fallback"])
        if values.get("min_compute_capability") is not None:
            values["min_compute_capability"] = tuple(values["min_compute_capability"])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def _size(task: str, name: str, value: object) -> int | None:
    if value is None:
        return None
    try:
        return parse_mib(value)
    except SizeError as exc:
        raise RequirementError(task, f"{name}: {exc}") from None


def _whole(task: str, name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RequirementError(task, f"{name} {value!r} must be a whole number >= {minimum}")
    return value


def _compute_capability(task: str, value: object) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (value[0], value[1])
    match = _CC.match(str(value)) if isinstance(value, (str, float)) else None
    if match is None:
        raise RequirementError(
            task, f"min_compute_capability {value!r} is not a compute capability; write it like '8.0' or '8.9'"
        )
    return (int(match[1]), int(match[2]))


def _priority(task: str, options: Mapping[str, Any]) -> int | None:
    try:
        if options.get("urgency") is not None:
            if options.get("priority") is not None:
                raise ValueError("give priority= or urgency=, not both")
            return int(Priority.from_urgency(options["urgency"]))
        if options.get("priority") is not None:
            return Priority.parse(options["priority"])
    except ValueError as exc:
        raise RequirementError(task, str(exc)) from None
    return None
