"""The held-line policy: which held messages may start, given the gate's answers.

The head of the line (the oldest held message) is always asked first. While it waits
for memory, messages behind it that fit *now* may start in the gap — backfill — so one
large task no longer idles every other slot on its GPU. Two bounds keep that honest:

- **the head's predicted start** (``core.forecast``, with ``predict_head_start``): where
  the worker has learned how long its tasks run, a message starts in the gap only if it
  is predicted to end before the head would fit anyway (or before the head has waited
  ``max_head_wait_s``, whichever is later), or if it fits beside the head then; so a
  large task is not starved however long the running ones take;
- **an age limit**, where a run time is not known yet: once the head has waited
  ``max_head_wait_s``, nothing unpredicted is backfilled until it runs, so small ones
  that keep fitting around it cannot starve it (the memory they free is left for the head);
- **priorities win**: a message never starts ahead of a waiting message of higher
  priority (a lower Celery number: ``Priority.CRITICAL`` is 0, ``LOW`` 9), so a
  CRITICAL task is never overtaken by a LOW one.

With a ``lookahead`` of N, a worker also keeps up to N messages that would fit but find
no free pool slot, and the head is one of the candidates too while it has waited less
than the age limit: when a slot frees, the rule picks among all of them (best_fit: the
largest that fits) rather than starting the oldest. It packs closer (README "Backfill"
has the figures) at the price of a worker holding N messages another worker could run.

Among the messages allowed, the *rule* says which to try first: ``best_fit`` the
largest (the one that fits leaves the least memory idle; the default, see README
"Backfill" for the figures), ``smallest_fit`` the smallest, ``first_fit`` the oldest,
``strict`` none (head of line only). Only the ``backfill_window`` messages right behind
the head are considered, which bounds the gate's work per pass and how many messages a
worker holds unacknowledged.

Pure: the worker's controller and the fleet simulator (``benchmarks/simulate.py``) pass
their line, a function that asks the gate (and starts the message when the answer is
yes), and how to read a message's arrival, size and priority.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
from collections.abc import Callable
from typing import TypeVar

from taskmesh.core.forecast import Forecast, Plan

T = TypeVar("T")

RULES = ("best_fit", "first_fit", "smallest_fit", "strict")


@dataclasses.dataclass(frozen=True)
class LinePolicy:
    """How a worker's held line moves (``admission.backfill``, ``max_head_wait_s``, ``backfill_window``,
    ``lookahead``, ``predict_head_start``)."""

    rule: str = "best_fit"
    max_head_wait_s: float = 30.0
    backfill_window: int = 8
    lookahead: int = 0
    predict_head_start: bool = True

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"{self.rule!r} is not a backfill rule; use one of {', '.join(RULES)}")
        if not 0 <= self.lookahead <= self.backfill_window:
            raise ValueError(f"lookahead {self.lookahead} must lie within 0 and backfill_window "
                             f"({self.backfill_window})")

    def looks_ahead(self, head_waited_s: float) -> bool:
        """Is the head itself one of the candidates (rather than started first when it fits)?"""
        return self.lookahead > 0 and self.rule != "strict" and head_waited_s < self.max_head_wait_s

    def backfills(self, head_waited_s: float, predicted: bool = False) -> bool:
        """May messages behind a head that has waited *head_waited_s* start now (past the age
        limit too if its start can be *predicted*: ``predicts``)?"""
        return self.rule != "strict" and self.backfill_window > 0 and (
            predicted or head_waited_s < self.max_head_wait_s)

    def takes_more(self, held: int, head_waited_s: float, predicted: bool = False) -> bool:
        """Should a worker holding *held* messages keep taking new ones? Only while they could
        be backfilled: with the window full, or the head past its limit, intake pauses."""
        return held == 0 or (self.backfills(head_waited_s, predicted) and held <= self.backfill_window)


def predicts(policy: LinePolicy, forecast: Forecast[T] | None, head_size: float, now: float) -> bool:
    """Can the head's start be predicted, so that backfill goes on past its age limit?"""
    return forecast is not None and policy.predict_head_start and Plan(forecast, head_size, now).known


def start_in_order(line: collections.deque[T], admit: Callable[[T], bool], slots: float = math.inf) -> list[T]:
    """Pop and return what *admit* started, from the front, up to the first it refused
    (and no more than *slots*)."""
    started = []
    while line and len(started) < slots and admit(line[0]):
        started.append(line.popleft())
    return started


def start_from_line(line: collections.deque[T], admit: Callable[[T], bool], now: float, policy: LinePolicy,
                    since: Callable[[T], float], size: Callable[[T], float],
                    priority: Callable[[T], int], slots: float = math.inf,
                    forecast: Callable[[], Forecast[T] | None] | None = None) -> list[T]:
    """Remove from *line* and return what *admit* started: the head first, in order, then —
    while the head waits — what fits behind it and does not delay the head past its bound
    (its predicted start, or its age limit). *forecast* is called, once, only when something
    waits behind the head, after the in-order starts: what it returns must count them.

    *since* gives a message's arrival (the same clock as *now*), *size* what it claims
    (for the fit rules), *priority* its Celery priority (lower first); at most *slots*
    start (the worker's free pool slots: a held message is not counted by its prefetch
    once it starts, so nothing else stops a line from overfilling the pool). Each message is
    asked at most once per call: what the gate refused stays refused while the messages
    started meanwhile only take more room.
    """
    ahead = bool(line) and policy.looks_ahead(now - since(line[0]))
    started = [] if ahead else start_in_order(line, admit, slots)
    if not line or len(started) >= slots:
        return started
    known = forecast() if forecast is not None and policy.predict_head_start and not ahead and len(line) > 1 \
        else None
    plan = Plan(known, size(line[0]), now) if known is not None else None
    if not policy.backfills(now - since(line[0]), predicted=plan is not None and plan.known):
        return started
    window = list(itertools.islice(line, 0 if ahead else 1, 1 + policy.backfill_window))
    refused: set[int] = set()
    age_limit = since(line[0]) + policy.max_head_wait_s
    while line:
        candidates = _allowed(line[0], window, refused, priority, head_first=not ahead)
        if plan is not None:
            candidates = [item for item in candidates if plan.allows(item, size(item), age_limit)]
        if policy.rule == "best_fit":
            candidates.sort(key=size, reverse=True)  # stable: the older of two equal sizes first
        elif policy.rule == "smallest_fit":
            candidates.sort(key=size)
        for item in candidates:
            if admit(item):
                _remove(window, item)
                _remove(line, item)
                started.append(item)
                if plan is not None:
                    plan.started(item, size(item))
                if len(started) >= slots:
                    return started
                break  # priorities may now allow another: look again
            refused.add(id(item))
        else:
            return started
    return started


def _allowed(head: T, window: list[T], refused: set[int], priority: Callable[[T], int],
             head_first: bool = True) -> list[T]:
    """Messages of *window* not refused yet and of no lower priority than any still waiting ahead of them
    (the head among them unless *head_first*: it was asked already)."""
    allowed, most_urgent = [], priority(head) if head_first else math.inf
    for item in window:
        urgency = priority(item)
        if urgency <= most_urgent and id(item) not in refused:
            allowed.append(item)
        most_urgent = min(most_urgent, urgency)
    return allowed


def _remove(items: collections.deque[T] | list[T], item: T) -> None:
    """Remove *item* itself (not an equal one: two held messages may compare equal)."""
    del items[next(i for i, other in enumerate(items) if other is item)]
