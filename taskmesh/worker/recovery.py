"""Recovery: messages left unacknowledged are delivered again now, through kombu's own
``restore_by_tag``, rather than after Redis's visibility timeout (an hour or more for
long GPU tasks).

The registry says which workers stopped announcing while holding messages (their
delivery tags); one process at a time (a short Redis lock) puts back those still in
kombu's ``unacked`` hash and forgets the rest. A live worker whose broker connection
dropped while Redis was down puts back its own held messages the same way.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable
from typing import Any

import redis

from taskmesh.state.keys import JANITOR
from taskmesh.state.registry import Registry

log = logging.getLogger(__name__)


def reclaim_dead_workers(app: Any, registry: Registry, client: redis.Redis) -> int:
    """Give back the messages of workers that died holding them; returns how many."""
    dead = registry.dead_holding_messages()
    if not dead or not client.set(JANITOR, socket.gethostname(), nx=True, ex=10):
        return 0
    restored = 0
    try:
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            for key, tags in dead.items():
                restored += put_back(channel, tags)
                registry.forget_inflight(key)
                log.warning("worker %s died holding %d message(s); delivered them again", key, len(tags))
    finally:
        client.delete(JANITOR)
    return restored


def put_back(channel: Any, tags: Iterable[str]) -> int:
    """Put the messages still unacknowledged under *tags* back at the front of their queues; how many.

    kombu's restore is one transaction per tag, so a message another process put back
    first, or one that was acknowledged, is left alone.
    """
    restored = 0
    for tag in tags:
        if channel.client.hexists(channel.unacked_key, tag):
            channel.qos.restore_by_tag(tag, client=channel.client, leftmost=False)
            restored += 1
    return restored
