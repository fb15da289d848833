"""Resource profiles and priorities: the vocabulary a task is declared in.

A profile names the kind of hardware a task wants and, one to one, the queue it
lands on. Queues are typed by profile rather than by task so that a worker group can
be tuned for one resource (exclusive GPU slots, prefork on cores, gevent for I/O).

Priorities follow Redis, the broker taskmesh runs on: 0 is the highest and kombu
keeps one list per step of ``[0, 3, 6, 9]``, so the four named levels are exactly
those steps and never collapse into one list. Plain integers keep Celery's meaning
(0-9, 0 first) so retries and code written for plain Celery behave as before; the
original design's 1-5 scale (5 urgent) is spelled ``urgency=`` to stay unambiguous.

RabbitMQ runs the *highest* number first (a queue declared with ``x-max-priority``):
taskmesh keeps its own scale everywhere and turns it over only on the wire to and from
a RabbitMQ broker (``amqp_priority``), so CRITICAL runs before LOW on both brokers.
"""

from __future__ import annotations

import enum


class Profile(enum.StrEnum):
    """What a task needs; the value is the queue it is routed to."""

    GPU_INTENSIVE = "gpu"
    CPU_INTENSIVE = "cpu_intensive"
    IO_BOUND = "cpu_light"
    MIXED = "mixed"

    @property
    def queue(self) -> str:
        return self.value

    @property
    def uses_gpu(self) -> bool:
        return self in (Profile.GPU_INTENSIVE, Profile.MIXED)

    @classmethod
    def parse(cls, value: object) -> Profile:
        """Accept a member or any spelling users write; raise ``ValueError`` naming them all."""
        if isinstance(value, Profile):
            return value
        if isinstance(value, str) and value.strip().lower() in PROFILE_NAMES:
            return PROFILE_NAMES[value.strip().lower()]
        raise ValueError(
            f"unknown profile {value!r}; use one of {', '.join(sorted(PROFILE_NAMES))}"
        )


PROFILE_NAMES: dict[str, Profile] = {
    "gpu": Profile.GPU_INTENSIVE,
    "gpu_intensive": Profile.GPU_INTENSIVE,
    "cpu": Profile.CPU_INTENSIVE,
    "cpu_intensive": Profile.CPU_INTENSIVE,
    "cpu_light": Profile.IO_BOUND,
    "io": Profile.IO_BOUND,
    "io_bound": Profile.IO_BOUND,
    "mixed": Profile.MIXED,
}
QUEUES: tuple[str, ...] = tuple(p.queue for p in Profile)


class Priority(enum.IntEnum):
    """Named priorities, valued as Redis priority steps (lower runs first)."""

    CRITICAL = 0
    HIGH = 3
    NORMAL = 6
    LOW = 9

    @classmethod
    def parse(cls, value: object) -> int:
        """A member, its name, or a Celery integer 0-9 → the integer Celery sends."""
        if isinstance(value, Priority):
            return int(value)
        if isinstance(value, str) and value.strip().upper() in cls.__members__:
            return int(cls[value.strip().upper()])
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 9:
            return value
        raise ValueError(
            f"priority {value!r} is not valid; use taskmesh.Priority "
            "(CRITICAL, HIGH, NORMAL, LOW), its name, a Celery priority 0-9 (0 first), "
            "or urgency=1..5 for the 1-5 scale where 5 is urgent"
        )

    @classmethod
    def from_urgency(cls, urgency: object) -> Priority:
        """The original design's 1-5 scale, 5 most urgent."""
        if isinstance(urgency, int) and not isinstance(urgency, bool) and 1 <= urgency <= 5:
            return _URGENCY[urgency]
        raise ValueError(f"urgency {urgency!r} is not valid; use a whole number 1-5 (5 is urgent)")


MAX_PRIORITY = 9  # Celery's range, and the x-max-priority taskmesh declares its queues with


def amqp_priority(priority: int) -> int:
    """A taskmesh priority as RabbitMQ orders it, and back: the mapping is its own inverse."""
    return MAX_PRIORITY - max(0, min(MAX_PRIORITY, int(priority)))


_URGENCY = {
    5: Priority.CRITICAL,
    4: Priority.HIGH,
    3: Priority.NORMAL,
    2: Priority.LOW,
    1: Priority.LOW,
}
