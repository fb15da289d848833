"""Reading the fields of a ``taskmesh`` message header, each checked as ``to_header`` writes it.

A header comes off the wire: ``send_task(headers=...)``, a producer in another language,
a hand-edited message. Every field is checked for the exact type and range that
``Requirement.to_header`` writes, and a field that fails names itself, what it holds and
the fix in a ``RequirementError``: the worker refuses that one message with that line
instead of crashing on it (and restarting into it again).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from taskmesh.core.errors import RequirementError
from taskmesh.core.profiles import Profile


def finite_number(value: object) -> float | None:
    """*value* as a finite float, or ``None`` (not a number, a bool, NaN, infinite, too large)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def shown(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


@dataclasses.dataclass(frozen=True)
class HeaderFields:
    """Reads one field of a ``taskmesh`` header, or raises naming it and the fix."""

    task: str
    header: Mapping[str, Any]

    def _bad(self, field: str, expected: str) -> RequirementError:
        return RequirementError(
            self.task, f"header field taskmesh.{field} is {shown(self.header[field])}; expected {expected}"
        )

    def profile(self, field: str, default: Profile | None) -> Profile | None:
        value = self.header.get(field)
        if value is None:
            return default
        try:
            return Profile.parse(value)
        except ValueError as exc:
            raise RequirementError(self.task, f"header field taskmesh.{field}: {exc}") from None

    def whole(self, field: str, default: int | None, minimum: int, unit: str = "") -> int | None:
        value = self.header.get(field)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self._bad(field, f"a whole number{unit} >= {minimum}")
        return value

    def positive_number(self, field: str) -> float | None:
        value = self.header.get(field)
        if value is None:
            return None
        number = finite_number(value)
        if number is None or number <= 0:
            raise self._bad(field, "a positive number such as 2 or 0.5")
        return number

    def compute_capability(self) -> tuple[int, int] | None:
        value = self.header.get("min_compute_capability")
        if value is None:
            return None
        if (not isinstance(value, (list, tuple)) or len(value) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value)):
            raise self._bad("min_compute_capability", "[major, minor] such as [8, 0]")
        return (value[0], value[1])

    def flag(self, field: str) -> bool:
        value = self.header.get(field, False)
        if not isinstance(value, bool):
            raise self._bad(field, "true or false")
        return value

    def name(self, field: str) -> str | None:
        value = self.header.get(field)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise self._bad(field, "a non-empty name")
        return value

    def names(self, field: str) -> tuple[str, ...]:
        value = self.header.get(field) or []
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise self._bad(field, "a list of non-empty names")
        return tuple(value)

    def priority(self) -> int | None:
        value = self.header.get("priority")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 9:
            raise self._bad("priority", "a Celery priority 0-9")
        return value
