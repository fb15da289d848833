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
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from taskmesh.core.config_schema import ENV_OVERRIDES, QUEUE_ENV_PREFIX, SCHEMA, check
from taskmesh.core.errors import ConfigError
from taskmesh.core.held_line import LinePolicy
from taskmesh.core.profiles import QUEUES, Profile

SELECT_ENV = ("TASKMESH_HARDWARE", "HARDWARE_CONFIG")


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
    reservation_ttl_s: float = 15.0  # a silent worker's reservations expire after this; its lease counts as lapsed
    dead_after_s: float = 60.0  # a worker silent this long (Redis's clock) is presumed dead: its messages run again
    safety_margin_mib: int = 512  # kept free on every GPU beyond what tasks declare
    max_memory_percent: float = 90.0  # CPU workers pause intake above this host memory use ...
    max_load_per_thread: float = 4.0  # ... or above this 1-minute load average per CPU thread
    on_infeasible: str = "raise"  # raise | warn: what apply_async does when no known hardware fits
    registry_memory_s: float = 86400.0  # hardware seen this recently counts as existing
    queue_full_wait_s: float = 0.0  # apply_async waits this long for room before raising QueueFull
    visibility_timeout_s: float | None = None  # Redis redelivery timeout; None: derived from time limits
    backfill: str = "best_fit"  # which held message starts in a gap behind the waiting head (core.held_line)
    max_head_wait_s: float = 30.0  # once the head has waited this long, nothing unpredicted is backfilled
    backfill_window: int = 8  # how many held messages behind the head may be backfilled (0: none)
    lookahead: int = 0  # messages kept beyond the pool's slots to pick the best fit from (core.held_line)
    predict_head_start: bool = True  # backfill what ends before the head is predicted to fit (core.forecast)
    affinity: bool = True  # a warm model's tasks go to its model queue (core.model_queues); false: any GPU

    def line_policy(self) -> LinePolicy:
        """The held-line policy these settings ask for (the worker and the simulator use it)."""
        return LinePolicy(self.backfill, self.max_head_wait_s, self.backfill_window, self.lookahead,
                          self.predict_head_start)


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
    models: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)  # name → load_s, never_evict
    admission: AdmissionConfig = AdmissionConfig()
    rebalance: RebalanceConfig = RebalanceConfig()

    def queue(self, name: str) -> QueueConfig:
        return self.queues.get(name, QueueConfig())


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
    data = check(source, raw, SCHEMA, "")
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
    ttl = admission.get("reservation_ttl_s", AdmissionConfig.reservation_ttl_s)
    remembered = admission.get("registry_memory_s", AdmissionConfig.registry_memory_s)
    if remembered < ttl:
        raise ConfigError(source, "admission.registry_memory_s", f"{remembered:g} is shorter than reservation_ttl_s "
                          f"({ttl:g} s): live workers' hardware would be forgotten", "use 86400 (a day, the default)")
    window = admission.get("backfill_window", AdmissionConfig.backfill_window)
    if admission.get("lookahead", 0) > window:
        raise ConfigError(source, "admission.lookahead", f"{admission['lookahead']} is more than backfill_window "
                          f"({window}): the held line only looks that far", "use a lookahead of at most "
                          "backfill_window, or raise backfill_window")
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
        models=data.get("models", {}),
        admission=_fenced(source, AdmissionConfig(**admission)),
        rebalance=RebalanceConfig(**data.get("rebalance", {})),
    )


def _fenced(source: str, admission: AdmissionConfig) -> AdmissionConfig:
    """A worker must never be presumed dead while its reservations stand: a stalled worker whose
    messages run elsewhere still holds their memory, and would look free to the new copy."""
    if admission.dead_after_s <= admission.reservation_ttl_s:
        raise ConfigError(
            source, "admission.dead_after_s",
            f"{admission.dead_after_s:g} s is not above admission.reservation_ttl_s "
            f"({admission.reservation_ttl_s:g} s)",
            "set dead_after_s (or TASKMESH_DEAD_AFTER_S) well above the TTL; the default is 60",
        )
    return admission
def unknown_task_overrides(config: Config, registered: Iterable[str]) -> list[ConfigError]:
    """A ``tasks:`` entry naming no registered task overrides nothing: one error per such
    entry, naming the closest registered task."""
    names = sorted(set(registered))
    problems = []
    for name in config.tasks:
        if name in names:
            continue
        close = difflib.get_close_matches(name, names, n=1)
        fix = f"did you mean {close[0]!r}?" if close else "name a task this app registers (taskmesh doctor lists them)"
        problems.append(ConfigError(config.source, f"tasks.{name}", "no task of this app has this name, so the "
                                    "override changes nothing", fix))
    return problems
