"""What a task needs, as a frozen value object validated when the task is declared.

Validation happens at import (``@app.task``), not when a message first arrives at a
worker hours later: a typo in ``vram=`` should break the deploy, with the task's name
in the message, not a GPU queue at 3 a.m.

The requirement travels in the message headers (``to_header``/``from_header``) so
any worker — or the rebalancer — can read it without importing the task's module.
A header is input from the wire (``send_task(headers=...)``, another producer), so
``from_header`` checks every field ``to_header`` writes and raises ``RequirementError``
naming the field, never anything else; fields it does not know are ignored, so a
newer producer's additions do not stop an older worker.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from taskmesh.core.errors import RequirementError
from taskmesh.core.header_fields import HeaderFields, finite_number, shown
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
    model_choices: tuple[str, ...] = ()  # model=[...]: every model it may run with, the preferred first
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
        if profile.uses_gpu and gpus == 0:  # it would run as a CPU task, with nothing reserved on any GPU
            raise RequirementError(
                task, f"gpus=0 on profile {profile.queue!r}; a GPU task needs gpus >= 1, or use a CPU profile"
            )
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
        if cores is not None and ((number := finite_number(cores)) is None or number <= 0):
            raise RequirementError(task, f"cpu_cores {cores!r} must be a positive number such as 2 or 0.5")
        exclusive = options.get("exclusive", False)
        if not isinstance(exclusive, bool):
            raise RequirementError(task, f"exclusive {exclusive!r} must be True or False")
        model, choices = _models(task, options.get("model"))
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
            model_choices=choices,
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
    def from_header(cls, header: object, task: str = "(unnamed)") -> Requirement:
        """Inverse of ``to_header``; raises ``RequirementError`` naming *task* and the field."""
        if not isinstance(header, Mapping):
            raise RequirementError(task, f"header 'taskmesh' is {shown(header)}, not a mapping of requirement fields")
        read = HeaderFields(task, header)
        profile = read.profile("profile", Profile.IO_BOUND)
        fallback = read.profile("fallback", None)
        requirement = cls(
            profile=profile,
            vram_mib=read.whole("vram_mib", None, minimum=1, unit=" of MiB"),
            min_compute_capability=read.compute_capability(),
            cpu_cores=read.positive_number("cpu_cores"),
            cpu_threads=read.whole("cpu_threads", 1, minimum=1),
            memory_mib=read.whole("memory_mib", None, minimum=1, unit=" of MiB"),
            gpus=read.whole("gpus", 1 if profile.uses_gpu else 0, minimum=1 if profile.uses_gpu else 0),
            exclusive=read.flag("exclusive"),
            fallback=fallback,
            model=read.name("model"),
            model_choices=read.names("model_choices"),
            priority=read.priority(),
        )
        if not profile.uses_gpu and (requirement.gpus or requirement.vram_mib or requirement.min_compute_capability):
            raise RequirementError(
                task, f"header 'taskmesh' asks for GPU resources on profile {profile.queue!r}, which runs on no GPU"
            )
        if fallback is profile:
            raise RequirementError(task, f"header 'taskmesh': fallback {fallback.queue!r} is the task's own profile")
        return requirement

    def with_model(self, name: str) -> Requirement:
        """This requirement with the one model admission chose of its ``model_choices``."""
        return dataclasses.replace(self, model=name, model_choices=())

    def as_fallback(self) -> Requirement:
        """What the task needs when sent to its fallback profile: on a CPU profile, no GPU at all."""
        if self.fallback is None:
            return self
        if self.fallback.uses_gpu:
            return dataclasses.replace(self, profile=self.fallback, fallback=None)
        return dataclasses.replace(self, profile=self.fallback, fallback=None, vram_mib=None,
                                   min_compute_capability=None, gpus=0, exclusive=False)


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


def _models(task: str, given: Any) -> tuple[str | None, tuple[str, ...]]:
    """``model="a"`` or ``model=["a", "b"]`` (degrade: the first that fits, warm ones first)."""
    if given is None:
        return None, ()
    names = [given] if isinstance(given, str) else given
    if not isinstance(names, list | tuple) or not names or len(set(names)) != len(names) or not all(
            isinstance(name, str) and name.strip() for name in names):
        raise RequirementError(task, f"model {given!r} must be a non-empty name such as 'whisper-small', or a "
                                     "list of distinct names, preferred first, such as ['qwen2.5:14b', 'qwen2.5:7b']")
    return names[0], tuple(names) if len(names) > 1 else ()


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
