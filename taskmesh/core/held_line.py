"""The held-line policy: which held messages may start, given the gate's answers.

Strict head of line: messages start in arrival order, and the first that must wait
stops the line, so a large task cannot be starved by small ones that keep fitting
around it. Pure: the worker passes its line and a function that asks the gate (and
starts the message when the answer is yes).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def start_in_order(line: collections.deque[T], admit: Callable[[T], bool]) -> list[T]:
    """Pop and return what *admit* started, from the front, up to the first it refused."""
    started = []
    while line and admit(line[0]):
        started.append(line.popleft())
    return started
