"""The config file's schema: every key, its checker, and the environment overrides.

Each checker returns the converted value or raises ``ValueError`` with the fix;
``check`` walks a loaded file against ``SCHEMA`` and names the file, the dotted key
and the closest valid key on any mistake.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from typing import Any

from taskmesh.core.errors import ConfigError
from taskmesh.core.gpus import parse_simulated_spec
from taskmesh.core.header_fields import finite_number
from taskmesh.core.held_line import RULES
from taskmesh.core.profiles import QUEUES, Profile
from taskmesh.core.requirements import REQUIREMENT_OPTIONS
from taskmesh.core.sizes import SizeError, parse_mib

POOLS = ("prefork", "threads", "solo", "gevent")
HEARTBEAT_S = 2.0  # how often a worker announces itself and refreshes its reservations (worker/heartbeat.py)
MIN_TTL_S = 3 * HEARTBEAT_S  # a reservation outlives two late heartbeats, so one slow beat gives nothing away
MIN_REBALANCE_INTERVAL_S = 0.5


# --- value checkers: each returns the converted value or raises ValueError(fix) ---


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{value!r} is not a whole number >= 1")
    return value


def _positive_number(value: Any) -> float:
    number = finite_number(value)
    if number is None or number <= 0:
        raise ValueError(f"{value!r} is not a positive number")
    return number


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
    mib = _positive_number(value) * 1024
    if not math.isfinite(mib):
        raise ValueError(f"{value!r} GB is more memory than can be counted")
    return round(mib)


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
    number = finite_number(value)
    if number is None or number < 0:
        raise ValueError(f"{value!r} is not a number of seconds >= 0")
    return number


def _ttl(value: Any) -> float:
    seconds = _seconds(value)
    if seconds < MIN_TTL_S:
        raise ValueError(
            f"{value!r} is below {MIN_TTL_S:g} s (3 worker heartbeats of {HEARTBEAT_S:g} s): a live worker's "
            f"reservations and messages would be given away between its heartbeats; use 15 (the default) "
            f"or at least {MIN_TTL_S:g}"
        )
    return seconds


def _memory_s(value: Any) -> float:
    number = finite_number(value)
    if number is None or number <= 0:
        raise ValueError(
            f"{value!r} is not a positive number of seconds: with nothing remembered, no GPU counts as existing "
            "and every feasibility check at submit is skipped; use 86400 (a day, the default)"
        )
    return number


def _interval(value: Any) -> float:
    seconds = _positive_number(value)
    if seconds < MIN_REBALANCE_INTERVAL_S:
        raise ValueError(
            f"{value!r} is below {MIN_REBALANCE_INTERVAL_S:g} s: every run reads all queues and the registry, and "
            f"runs that close together load Redis and move consumers before the last move shows; use 5 "
            f"(the default) or at least {MIN_REBALANCE_INTERVAL_S:g}"
        )
    return seconds


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


def _backfill(value: Any) -> str:
    if value not in RULES:
        raise ValueError(f"{value!r} is not a backfill rule; use one of {', '.join(RULES)} (best_fit, the default, "
                         "packs GPUs closest; strict never starts a message ahead of the head of the line)")
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


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true or false")
    return value


def _home(value: Any) -> str | None:
    if value in (None, "none"):
        return None
    if value not in ("gpu", "cpu_intensive", "cpu_light"):
        raise ValueError(f"{value!r} is not a queue mixed workers can serve; use gpu, cpu_intensive, cpu_light or none")
    return value


_REBALANCE_SCHEMA = {
    "interval_s": _interval,
    "mixed_home": _home,
    "hysteresis": _positive_number,
    "target_drain_s": _positive_number,
}
_ADMISSION_SCHEMA = {
    "reservation_ttl_s": _ttl,
    "dead_after_s": _positive_number,
    "safety_margin": _mib,
    "max_memory_percent": _percent,
    "max_load_per_thread": _positive_number,
    "on_infeasible": _infeasible,
    "registry_memory_s": _memory_s,
    "queue_full_wait_s": _seconds,
    "visibility_timeout_s": _positive_number,
    "backfill": _backfill,
    "max_head_wait_s": _seconds,
    "backfill_window": _count,
    "lookahead": _count,
    "predict_head_start": _flag,
    "affinity": _flag,
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
    "models": {"*": {"load_s": _positive_number, "never_evict": _flag}},
}

#: environment variable → (dotted key, converter); applied over the file.
ENV_OVERRIDES: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "TASKMESH_GPU_SLOTS": ("hardware.gpu.slots_per_gpu", _positive_int),
    "TASKMESH_CPU_CONCURRENCY": ("queues.cpu_intensive.concurrency", _positive_int),
    "TASKMESH_IO_CONCURRENCY": ("queues.cpu_light.concurrency", _positive_int),
    "TASKMESH_MIXED_CONCURRENCY": ("queues.mixed.concurrency", _positive_int),
    "TASKMESH_GPU_POOL": ("queues.gpu.pool", _pool),
    "TASKMESH_DEFAULT_PROFILE": ("default_profile", _profile),
    "TASKMESH_RESERVATION_TTL_S": ("admission.reservation_ttl_s", _ttl),
    "TASKMESH_DEAD_AFTER_S": ("admission.dead_after_s", _positive_number),
    "TASKMESH_ON_INFEASIBLE": ("admission.on_infeasible", _infeasible),
    "TASKMESH_REBALANCE_INTERVAL_S": ("rebalance.interval_s", _interval),
    "TASKMESH_VISIBILITY_TIMEOUT_S": ("admission.visibility_timeout_s", _positive_number),
    "TASKMESH_BACKFILL": ("admission.backfill", _backfill),
    "TASKMESH_MAX_HEAD_WAIT_S": ("admission.max_head_wait_s", _seconds),
    "TASKMESH_BACKFILL_WINDOW": ("admission.backfill_window", _count),
    "TASKMESH_LOOKAHEAD": ("admission.lookahead", _count),
    "TASKMESH_PREDICT_HEAD_START": ("admission.predict_head_start", _flag),
    "TASKMESH_AFFINITY": ("admission.affinity", _flag),
}
#: every queue threshold too: TASKMESH_QUEUE_<QUEUE>_<KEY>, e.g. TASKMESH_QUEUE_GPU_MAX_DEPTH=500
QUEUE_ENV_PREFIX = "TASKMESH_QUEUE_"
ENV_OVERRIDES.update({
    f"{QUEUE_ENV_PREFIX}{queue.upper()}_{key.upper()}": (f"queues.{queue}.{key}", convert)
    for queue in QUEUES for key, convert in _QUEUE_SCHEMA.items()
})


def check(source: str, data: Any, schema: _Schema, path: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(source, path or None, f"expected a mapping, found {type(data).__name__}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        shown = str(key) if str(key).isprintable() else repr(str(key))  # the error stays one line
        dotted = f"{path}.{shown}" if path else shown
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
            out[str(key)] = check(source, value, rule, dotted)
    return out
