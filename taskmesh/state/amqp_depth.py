"""What waits in a RabbitMQ queue: its depth from a passive ``queue_declare``.

RabbitMQ answers a passive declare with the queue's ready message count, without
creating or changing the queue; a queue nobody declared yet answers 404, which closes
the channel: it holds nothing, and the next queue is asked on a new channel. RabbitMQ
tells AMQP clients neither the unacknowledged count (the management API does) nor a
message's age without taking it, so ``in_flight`` is 0, ``by_priority`` is empty, and
the age is only that of messages live workers hold back (``Registry.held_since``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["amqp_waiting"]


def amqp_waiting(app: Any, queues: Iterable[str]) -> dict[str, int]:
    """Ready messages in each of *queues* on *app*'s (AMQP) broker; 0 for one never declared."""
    waiting: dict[str, int] = {}
    with app.connection_for_read() as conn:
        channel = conn.channel()
        try:
            for queue in dict.fromkeys(queues):
                try:
                    waiting[queue] = int(channel.queue_declare(queue=queue, passive=True).message_count)
                except conn.channel_errors:  # NOT_FOUND: nothing was ever sent there
                    waiting[queue] = 0
                    channel = conn.channel()
        finally:
            channel.close()
    return waiting
