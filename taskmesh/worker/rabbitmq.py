"""What a worker does differently when its broker is RabbitMQ rather than Redis.

kombu's Redis transport keeps a delivered message in its ``unacked`` hash, and taskmesh
puts messages back itself (``restore_by_tag``, ``recovery``) and hands held ones back
before the visibility timeout would deliver them twice. RabbitMQ keeps every
unacknowledged message itself: it delivers it again when the channel closes (a
SIGKILLed worker's connection included), and ``reject(requeue=True)`` puts it back at
its place in the queue. So on RabbitMQ a held message is given back by a requeueing
reject, and nothing is restored at reconnect or reclaimed from a dead worker.

Priorities arrive turned over (``core.profiles.amqp_priority``, RabbitMQ runs the
highest first): ``turn_priority`` turns a message's back as it arrives, so the held line,
batching and Celery's retries see taskmesh's scale, and ``wire_priority`` turns it over
again for a message the worker publishes itself.
"""

from __future__ import annotations

from typing import Any

from taskmesh.core.profiles import amqp_priority

TURNED = "_taskmesh_priority_turned"


def is_redis_channel(channel: Any) -> bool:
    """Whether *channel* is kombu's Redis channel, whose unacked hash taskmesh restores from."""
    return hasattr(getattr(channel, "qos", None), "restore_by_tag")


def turn_priority(message: Any) -> None:
    """A message delivered by RabbitMQ: its priority on taskmesh's scale (once per message)."""
    if is_redis_channel(message.channel) or getattr(message, TURNED, False):
        return
    setattr(message, TURNED, True)
    if message.properties.get("priority") is not None:
        message.properties["priority"] = amqp_priority(message.properties["priority"])


def wire_priority(message: Any, priority: Any) -> Any:
    """*priority* (taskmesh's scale) as *message*'s broker orders it, for a publish."""
    if priority is None or is_redis_channel(message.channel):
        return priority
    return amqp_priority(priority)
