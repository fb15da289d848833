"""The hardware/config file, its validation, and the environment overrides.

One YAML file (``config/hardware/<name>.yaml``) says what the machine has and how
each queue is run; every section is optional and what is absent is detected. The
file format of the original design (``hardware.cpu.cores``, ``hardware.gpu.memory_gb``,
``task_groups.<name>.threads`` ...) loads unchanged, so teams can bring theirs.

Validation is strict and specific: an unknown key names the closest valid one, a
bad value names the file, the dotted key and the fix. A config that is wrong should
stop a deploy, not silently size a worker pool to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .gpu import parse_simulated_spec
from .profiles import QUEUES, Profile
from .requirements import REQUIREMENT_OPTIONS
from .sizes import SizeError, parse_mib

SELECT_ENV = ("TASKMESH_HARDWARE", "HARDWARE_CONFIG")
POOLS = ("prefork", "threads", "solo", "gevent")


@dataclasses.dataclass(frozen=True)
class QueueConfig:
    max_depth: int | None = None
    concurrency: int | None = None
    pool: str | None = None
    fallback_depth: int = 0  # a queue is saturated for fallback when deeper than this and nothing admits
    alert_depth: int | None = None  # alert when more than this many tasks wait
    alert_age_s: float | None = None  # alert when the oldest waiting task is older than this
    max_concurrency: int | None = None  # the rebalancer may grow the pool up to this (gevent: 4x by default)


@dataclasses.dataclass(frozen=True)
class RebalanceConfig:
    interval_s: float = 5.0  # how often beat runs taskmesh.rebalance
    mixed_home: str | None = "gpu"  # what mixed workers serve when no queue needs them more
    hysteresis: float = 1.5  # a mixed worker moves only for this many times more expected work
    target_drain_s: float = 60.0  # scaling hints: replicas to drain what waits within this


@dataclasses.dataclass(frozen=True)
class AdmissionConfig:
    reservation_ttl_s: float = 15.0  # a dead worker's reservations (and messages) are reclaimed after this
    safety_margin_mib: int = 512  # kept free on every GPU beyond what tasks declare
    max_memory_percent: float = 90.0  # CPU workers pause intake above this host memory use ...
    max_load_per_thread: float = 4.0  # ... or above this 1-minute load average per CPU thread
    on_infeasible: str = "raise"  # raise | warn: what apply_async does when no known hardware fits
    registry_memory_s: float = 86400.0  # hardware seen this recently counts as existing
    queue_full_wait_s: float = 0.0  # apply_async waits this long for room before raising QueueFull
    visibility_timeout_s: float | None = None  # Redis redelivery timeout; None: derived from time limits


@dataclasses.dataclass(frozen=True)
class TaskGroup:
    threads: int = 1
    memory_mib: int | None = None
    max_instances: int | None = None
    cpu_cores: float | None = None


@dataclasses.dataclass(frozen=True)
class Config:
    """Resolved configuration; ``None`` means "detect it"."""

    source: str = "(built-in defaults)"
    default_profile: Profile = Profile.IO_BOUND
    cpu_cores: int | None = None
    cpu_threads: int | None = None
    cpu_max_concurrent_tasks: int | None = None
    gpu_count: int | None = None
    gpu_model: str | None = None
    gpu_memory_mib: int | None = None
    slots_per_gpu: int = 1
    simulate_gpus: str | None = None
    memory_total_mib: int | None = None
    task_groups: Mapping[str, TaskGroup] = dataclasses.field(default_factory=dict)
    queues: Mapping[str, QueueConfig] = dataclasses.field(
        default_factory=lambda: {q: QueueConfig() for q in QUEUES}
    )
    tasks: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    admission: AdmissionConfig = AdmissionConfig()
    rebalance: RebalanceConfig = RebalanceConfig()

    def queue(self, name: str) -> QueueConfig:
        return self.queues.get(name, QueueConfig())


# --- value checkers: each returns the converted value or raises ValueError(fix) ---


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{value!r} is not a whole number >= 1")
    return value


def _positive_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{value!r} is not a positive number")
    return float(value)


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{value!r} is not a non-empty string")
    return value


def _gib(value: Any) -> int:
    if isinstance(value, str):
        try:
            return parse_mib(value)
        except SizeError as exc:
            raise ValueError(str(exc)) from None
    return round(_positive_number(value) * 1024)


def _pool(value: Any) -> str:
    if value not in POOLS:
        raise ValueError(f"{value!r} is not a pool; use one of {', '.join(POOLS)}")
    return value


def _profile(value: Any) -> Profile:
    return Profile.parse(value)


def _simulate(value: Any) -> str:
    parse_simulated_spec(_text(value), source="simulate")
    return value


def _optional_int(value: Any) -> int | None:
    return None if value is None else _positive_int(value)


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a whole number >= 0")
    return value


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{value!r} is not a number of seconds >= 0")
    return float(value)


def _percent(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 100:
        raise ValueError(f"{value!r} is not a percentage in (0, 100]")
    return float(value)


def _mib(value: Any) -> int:
    try:
        return 0 if value == 0 else parse_mib(value)
    except SizeError as exc:
        raise ValueError(str(exc)) from None


def _infeasible(value: Any) -> str:
    if value not in ("raise", "warn"):
        raise ValueError(f"{value!r} is not 'raise' or 'warn'")
    return value


_Schema = Mapping[str, "Callable[[Any], Any] | _Schema"]
_QUEUE_SCHEMA = {
    "max_depth": _optional_int,
    "concurrency": _optional_int,
    "pool": _pool,
    "fallback_depth": _count,
    "alert_depth": _optional_int,
    "alert_age_s": _seconds,
    "max_concurrency": _optional_int,
}


def _home(value: Any) -> str | None:
    if value in (None, "none"):
        return None
    if value not in ("gpu", "cpu_intensive", "cpu_light"):
        raise ValueError(f"{value!r} is not a queue mixed workers can serve; use gpu, cpu_intensive, cpu_light or none")
    return value


_REBALANCE_SCHEMA = {
    "interval_s": _positive_number,
    "mixed_home": _home,
    "hysteresis": _positive_number,
    "target_drain_s": _positive_number,
}
_ADMISSION_SCHEMA = {
    "reservation_ttl_s": _seconds,
    "safety_margin": _mib,
    "max_memory_percent": _percent,
    "max_load_per_thread": _positive_number,
    "on_infeasible": _infeasible,
    "registry_memory_s": _seconds,
    "queue_full_wait_s": _seconds,
    "visibility_timeout_s": _positive_number,
}
_GROUP_SCHEMA = {
    "threads": _positive_int,
    "memory_mb": _positive_int,
    "max_instances": _positive_int,
    "cpu_cores": _positive_number,
}
SCHEMA: _Schema = {
    "default_profile": _profile,
    "hardware": {
        "cpu": {"cores": _positive_int, "threads": _positive_int, "max_concurrent_tasks": _positive_int},
        "gpu": {
            "count": lambda v: 0 if v == 0 else _positive_int(v),
            "model": _text,
            "memory_gb": _gib,
            "slots_per_gpu": _positive_int,
            "simulate": _simulate,
        },
        "memory": {"total_gb": _gib},
    },
    "task_groups": {"*": _GROUP_SCHEMA},
    "queues": {q: _QUEUE_SCHEMA for q in QUEUES},
    "tasks": {"*": {option: (lambda v: v) for option in REQUIREMENT_OPTIONS + ("priority",)}},
    "admission": _ADMISSION_SCHEMA,
    "rebalance": _REBALANCE_SCHEMA,
}

#: environment variable → (dotted key, converter); applied over the file.
ENV_OVERRIDES: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "TASKMESH_GPU_SLOTS": ("hardware.gpu.slots_per_gpu", _positive_int),
    "TASKMESH_CPU_CONCURRENCY": ("queues.cpu_intensive.concurrency", _positive_int),
    "TASKMESH_IO_CONCURRENCY": ("queues.cpu_light.concurrency", _positive_int),
    "TASKMESH_MIXED_CONCURRENCY": ("queues.mixed.concurrency", _positive_int),
    "TASKMESH_GPU_POOL": ("queues.gpu.pool", _pool),
    "TASKMESH_DEFAULT_PROFILE": ("default_profile", _profile),
    "TASKMESH_RESERVATION_TTL_S": ("admission.reservation_ttl_s", _seconds),
    "TASKMESH_ON_INFEASIBLE": ("admission.on_infeasible", _infeasible),
    "TASKMESH_REBALANCE_INTERVAL_S": ("rebalance.interval_s", _positive_number),
    "TASKMESH_VISIBILITY_TIMEOUT_S": ("admission.visibility_timeout_s", _positive_number),
}
#: every queue threshold too: TASKMESH_QUEUE_<QUEUE>_<KEY>, e.g. TASKMESH_QUEUE_GPU_MAX_DEPTH=500
QUEUE_ENV_PREFIX = "TASKMESH_QUEUE_"
ENV_OVERRIDES.update({
    f"{QUEUE_ENV_PREFIX}{queue.upper()}_{key.upper()}": (f"queues.{queue}.{key}", convert)
    for queue in QUEUES for key, convert in _QUEUE_SCHEMA.items()
})


def _check(source: str, data: Any, schema: _Schema, path: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(source, path or None, f"expected a mapping, found {type(data).__name__}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        rule = schema.get("*", schema.get(str(key)))
        if rule is None:
            close = difflib.get_close_matches(str(key), list(schema), n=1)
            fix = f"did you mean {close[0]!r}?" if close else f"valid keys here: {', '.join(schema)}"
            raise ConfigError(source, dotted, "unknown key", fix)
        if callable(rule):
            try:
                out[str(key)] = rule(value)
            except (ValueError, ConfigError) as exc:
                raise ConfigError(source, dotted, str(exc)) from None
        else:
            out[str(key)] = _check(source, value, rule, dotted)
    return out


def find_config_file(selection: str | os.PathLike[str] | None = None) -> Path | None:
    """Resolve *selection* (a path or a name), else ``TASKMESH_HARDWARE``/``HARDWARE_CONFIG``."""
    env_name = next((v for v in SELECT_ENV if os.environ.get(v)), None)
    chosen = selection or (os.environ[env_name] if env_name else None)
    origin = "hardware=" if selection else (env_name or "")
    if not chosen:
        default = Path.cwd() / "config" / "hardware" / "default.yaml"
        return default if default.is_file() else None
    text = os.fspath(chosen)
    if text.endswith((".yaml", ".yml")) or os.sep in text:
        path = Path(text)
        if not path.is_file():
            raise ConfigError(origin, None, f"config file {text!r} does not exist", "give an existing path")
        return path
    dirs = [Path.cwd() / "config" / "hardware"]
    if os.environ.get("TASKMESH_CONFIG_DIR"):
        dirs.insert(0, Path(os.environ["TASKMESH_CONFIG_DIR"]))
    for directory in dirs:
        if (directory / f"{text}.yaml").is_file():
            return directory / f"{text}.yaml"
    raise ConfigError(
        origin,
        None,
        f"no hardware config named {text!r} in {', '.join(map(str, dirs))}",
        f"create {dirs[-1] / (text + '.yaml')} or set TASKMESH_CONFIG_DIR",
    )


def load_config(selection: str | os.PathLike[str] | None = None) -> Config:
    """Read, validate and resolve the config file, then apply environment overrides."""
    path = find_config_file(selection)
    source, raw = "(built-in defaults)", {}
    if path is not None:
        source = str(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown line"
            raise ConfigError(
                source, None, f"malformed YAML at {line}: {exc.problem}", "fix the YAML syntax there"
            ) from None
    data = _check(source, raw, SCHEMA, "")
    for env in os.environ:
        if env.startswith(QUEUE_ENV_PREFIX) and env not in ENV_OVERRIDES:  # a typo would be ignored silently
            close = difflib.get_close_matches(env, [e for e in ENV_OVERRIDES if e.startswith(QUEUE_ENV_PREFIX)], n=1)
            fix = f"did you mean {close[0]}?" if close else f"use {QUEUE_ENV_PREFIX}<QUEUE>_<KEY> with a key of queues"
            raise ConfigError(env, None, "unknown queue setting", fix)
    for env, (dotted, convert) in ENV_OVERRIDES.items():
        if os.environ.get(env) is None:
            continue
        raw_value = os.environ[env]
        try:
            value = convert(yaml.safe_load(raw_value) if raw_value.strip() else raw_value)
        except ValueError as exc:
            raise ConfigError(env, None, str(exc), f"set {env} to a valid value for {dotted}") from None
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return _resolve(source, data)


def _resolve(source: str, data: Mapping[str, Any]) -> Config:
    hardware = data.get("hardware", {})
    cpu, gpu, memory = hardware.get("cpu", {}), hardware.get("gpu", {}), hardware.get("memory", {})
    groups = {
        name: TaskGroup(
            threads=g.get("threads", 1),
            memory_mib=g.get("memory_mb"),
            max_instances=g.get("max_instances"),
            cpu_cores=g.get("cpu_cores"),
        )
        for name, g in data.get("task_groups", {}).items()
    }
    queues = {q: QueueConfig(**data.get("queues", {}).get(q, {})) for q in QUEUES}
    admission = dict(data.get("admission", {}))
    if "safety_margin" in admission:
        admission["safety_margin_mib"] = admission.pop("safety_margin")
    return Config(
        source=source,
        default_profile=data.get("default_profile", Profile.IO_BOUND),
        cpu_cores=cpu.get("cores"),
        cpu_threads=cpu.get("threads"),
        cpu_max_concurrent_tasks=cpu.get("max_concurrent_tasks"),
        gpu_count=gpu.get("count"),
        gpu_model=gpu.get("model"),
        gpu_memory_mib=gpu.get("memory_gb"),
        slots_per_gpu=gpu.get("slots_per_gpu", 1),
        simulate_gpus=gpu.get("simulate"),
        memory_total_mib=memory.get("total_gb"),
        task_groups=groups,
        queues=queues,
        tasks=data.get("tasks", {}),
        admission=AdmissionConfig(**admission),
        rebalance=RebalanceConfig(**data.get("rebalance", {})),
    )
