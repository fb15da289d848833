"""Memory sizes as users write them, normalised to whole MiB.

Everything inside taskmesh counts memory in MiB (NVML reports bytes, psutil bytes,
the seed YAML GB): one unit for the ledger avoids a whole class of mix-ups. Decimal
units (GB) and binary units (GiB) are both accepted because users write both; a
requirement is rounded *up* so that a request is never under-reserved.
"""

from __future__ import annotations

import math
import re

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>[a-zA-Z]*)\s*$")
HOW_TO_WRITE = "write it like '6GiB', '512MiB', '6GB' or a whole number of MiB such as 6144"


class SizeError(ValueError):
    """A size that cannot be read; the message says how to write one."""


def parse_mib(value: object) -> int:
    """Return *value* in MiB: ``"6GiB"`` → 6144, ``"512MB"`` → 489, ``6144`` → 6144."""
    if isinstance(value, bool):
        raise SizeError(f"{value!r} is not a size; {HOW_TO_WRITE}")
    if isinstance(value, int):
        if value <= 0:
            raise SizeError(f"{value!r} is not a positive size; {HOW_TO_WRITE}")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value <= 0:
            raise SizeError(f"{value!r} is not a positive size; {HOW_TO_WRITE}")
        return math.ceil(value)
    if not isinstance(value, str):
        raise SizeError(f"{value!r} is not a size; {HOW_TO_WRITE}")
    match = _SIZE.match(value)
    if match is None:
        raise SizeError(f"{value!r} is not a size; {HOW_TO_WRITE}")
    number = float(match["num"])
    unit = match["unit"].lower() or "mib"
    if unit not in _UNITS:
        raise SizeError(f"{value!r} has an unknown unit {match['unit']!r}; {HOW_TO_WRITE}")
    if number <= 0 or not math.isfinite(number * _UNITS[unit]):
        raise SizeError(f"{value!r} is not a positive size; {HOW_TO_WRITE}")
    return math.ceil(number * _UNITS[unit] / 2**20)


def format_mib(mib: int | float) -> str:
    """Render MiB the way people read GPU memory: ``24576`` → ``"24GiB"``."""
    if mib >= 1024 and mib % 1024 == 0:
        return f"{int(mib) // 1024}GiB"
    if mib >= 1024:
        return f"{mib / 1024:.1f}GiB"
    return f"{int(mib)}MiB"
