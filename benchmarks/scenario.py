"""What every scenario hands back: parameters, figures, a table, targets and notes.

Targets are reported, never asserted: a benchmark that fails a build on a slow
machine measures the machine. Figures are ratios against a baseline run side by side
in the same run wherever there is one, so that a busy machine slows both sides.
"""

from __future__ import annotations

import dataclasses
import operator
from pathlib import Path
from typing import Any

_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


@dataclasses.dataclass(frozen=True)
class Target:
    metric: str
    goal: str  # e.g. ">= 2.5"
    value: float | None

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        op, threshold = self.goal.split()
        return bool(_OPS[op](self.value, float(threshold)))

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "goal": self.goal, "value": self.value, "met": self.met}


@dataclasses.dataclass
class Result:
    name: str
    title: str
    status: str = "ok"  # ok | skipped | failed
    reason: str | None = None  # why skipped or failed
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    targets: list[Target] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0  # how long the scenario itself took

    def target(self, metric: str, goal: str) -> None:
        self.targets.append(Target(metric, goal, self.metrics.get(metric)))

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["targets"] = [t.to_json() for t in self.targets]
        return data


@dataclasses.dataclass
class Context:
    out: Path
    smoke: bool
    results: dict[str, Result] = dataclasses.field(default_factory=dict)

    def logdir(self, *parts: str) -> Path:
        path = self.out.joinpath("logs", *parts)
        path.mkdir(parents=True, exist_ok=True)
        return path


def ratio(numerator: float | None, denominator: float | None, digits: int = 3) -> float | None:
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, digits)
