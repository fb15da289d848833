"""Dead-worker recovery: the messages a worker presumed dead held are delivered again now
rather than after Redis's visibility timeout (an hour or more for long GPU tasks).

The registry says which workers have not renewed their lease for ``dead_after_s`` while
holding messages; one process at a time (a short Redis lock) fences each one
(``Registry.fence``: still dead, checked and done in one step), puts back those of its
messages still in kombu's ``unacked`` hash, and records each for the worker to find
(``Registry.given_back``) should it have been alive after all.

A message goes back under a new delivery tag. kombu keys ``unacked`` by the tag, which
it assigns at publish and keeps across restores, so a worker presumed dead that was only
stalled would otherwise, on acknowledging its own copy, delete the entry of the copy
running elsewhere, and a crash of that worker would then lose the message.

A message no worker says it holds — its worker was SIGKILLed as kombu recorded the
delivery, or its task ended while the connection was down so the acknowledgement was lost
— is found by ``reclaim_orphans`` (``state.orphans``) and delivered again the same way,
``dead_after_s`` later.

A live worker whose broker connection dropped while Redis was down puts back its own
held messages with ``put_back`` (kombu could not restore them as the channel closed),
and hands its held line back with ``put_back_line``. ``guard_restore`` keeps kombu's
own restore at close from crashing the worker when Redis is gone.

All of it is for kombu's Redis transport; on RabbitMQ, which redelivers unacknowledged
messages itself, each step does nothing (``rabbitmq``).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterable
from typing import Any

import redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads
from kombu.utils.uuid import uuid

from taskmesh.core.headers import ENQUEUED_AT
from taskmesh.state.client import broker_is_redis
from taskmesh.state.keys import JANITOR
from taskmesh.state.orphans import CANDIDATES, OrphanWatch
from taskmesh.state.registry import Registry
from taskmesh.worker.rabbitmq import is_redis_channel

log = logging.getLogger(__name__)


def reclaim_dead_workers(app: Any, registry: Registry, client: redis.Redis) -> int:
    """Give back the messages of workers presumed dead; returns how many."""
    if not broker_is_redis(app):  # RabbitMQ redelivers a dead worker's messages as its connection closes
        return 0
    dead = registry.dead_holding_messages()
    if not dead or not client.set(JANITOR, socket.gethostname(), nx=True, ex=10):
        return 0
    restored = 0
    try:
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            for key in dead:
                tags = registry.fence(key)
                if not tags:
                    continue  # it renewed its lease meanwhile: alive after all
                again = 0
                for tag in tags:
                    task_id = restore_as_new(channel, tag)
                    if task_id is not None:
                        registry.given_back(key, tag, task_id)
                        again += 1
                restored += again
                log.warning("worker %s has not renewed its lease for over %gs (dead_after_s): presumed dead, "
                            "%d of its message(s) delivered again", key, registry.dead_after_s, again)
    finally:
        client.delete(JANITOR)
    return restored


def reclaim_orphans(app: Any, watch: OrphanWatch) -> int:
    """Deliver again the messages taskmesh stamped that no worker has held for ``dead_after_s``."""
    if not broker_is_redis(app) or not watch.due():  # RabbitMQ keeps and redelivers unacknowledged ones itself
        return 0
    restored = 0
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        old = channel.client.zrangebyscore(channel.unacked_index_key, "-inf", time.time() - watch.dead_after_s,
                                           start=0, num=CANDIDATES)
        held = watch.held()
        unheld = [t for t in (bytes_to_str(t) for t in old) if t not in held]
        due = watch.settle(unheld)
        held = watch.held() if due else held  # once more before restoring: one may have been announced since
        for tag in due:
            payload = channel.client.hget(channel.unacked_key, tag)
            if payload is None or tag in held or not _stamped(payload):
                continue
            task_id = restore_as_new(channel, tag)
            watch.forget(tag)
            if task_id is not None:
                restored += 1
                log.warning("task %s was unacknowledged and held by no worker for over %gs (dead_after_s): "
                            "delivered again", task_id or "?", watch.dead_after_s)
    return restored


def _stamped(payload: bytes) -> bool:
    try:
        message = loads(bytes_to_str(payload))[0]
    except (ValueError, TypeError, IndexError):
        return False
    return ENQUEUED_AT in (message.get("headers") or {})


def restore_as_new(channel: Any, tag: str) -> str | None:
    """kombu's ``QoS.restore_by_tag``, but the message goes back under a fresh delivery tag;
    returns its task id ("" if it has none), ``None`` if it was no longer unacknowledged."""
    qos, found = channel.qos, []

    def restore(pipe: Any) -> None:
        found.clear()  # a retried transaction starts over
        payload = pipe.hget(qos.unacked_key, tag)
        pipe.multi()
        qos._remove_from_indices(tag, pipe)
        if payload:
            message, exchange, routing_key = loads(bytes_to_str(payload))
            message["properties"]["delivery_tag"] = uuid()
            channel._do_restore_message(message, exchange, routing_key, pipe, False)
            found[:] = [str((message.get("headers") or {}).get("id") or "")]

    with channel.conn_or_acquire() as conn:
        conn.transaction(restore, qos.unacked_key)
    return found[0] if found else None
def put_back(channel: Any, tags: Iterable[str]) -> int:
    """Put the messages still unacknowledged under *tags* back at the front of their queues; how many.

    kombu's restore is one transaction per tag, so a message another process put back
    first, or one that was acknowledged, is left alone.
    """
    restored = 0
    if not is_redis_channel(channel):  # RabbitMQ delivered them again as the old channel closed
        return restored
    for tag in tags:
        if channel.client.hexists(channel.unacked_key, tag):
            channel.qos.restore_by_tag(tag, client=channel.client, leftmost=False)
            restored += 1
    return restored


def put_back_line(messages: list[Any]) -> None:
    """Put a worker's held *messages* (unacknowledged, in line order) back at the front of
    their queues in one transaction, the first of the line first to be taken again.

    One by one, a BRPOP already waiting on the queue (the worker's own, while it takes
    messages behind a held head) would take the first put back — the last of the line —
    and put it at the head. A message no longer unacknowledged is left alone.
    """
    if not messages or not is_redis_channel(messages[0].channel):  # RabbitMQ: each is rejected with requeue
        return
    channel = messages[0].channel
    qos, tags = channel.qos, [m.delivery_tag for m in messages]

    def restore(pipe: Any) -> None:
        payloads = [pipe.hget(qos.unacked_key, tag) for tag in tags]
        pipe.multi()
        for tag, payload in reversed(list(zip(tags, payloads, strict=True))):  # each goes to the front
            qos._remove_from_indices(tag, pipe)
            if payload:
                message, exchange, routing_key = loads(bytes_to_str(payload))
                channel._do_restore_message(message, exchange, routing_key, pipe, False)

    with channel.conn_or_acquire() as conn:
        conn.transaction(restore, qos.unacked_key)


def guard_restore(channel: Any) -> None:
    """Let *channel* close without a crash while Redis is down and a ``BRPOP`` is in flight.

    A worker holding a message keeps taking messages behind it (backfill), so its
    channel usually has a ``BRPOP`` waiting. If Redis goes away then, kombu's
    ``Channel.close`` fails on that read first, Celery tears the transport down, and the
    second close's restore of unacknowledged messages asks the dead transport for a new
    connection and raises ``AttributeError`` — which Celery treats as unrecoverable, so
    the worker exits. Nothing can be restored without Redis anyway: the restore is
    skipped with a warning, and the held messages are put back when the consumer
    reconnects (``put_back`` of the tags ``HandBack.let_go`` kept).
    """
    qos = getattr(channel, "qos", None)
    restore = getattr(qos, "restore_unacked", None)
    if restore is None or getattr(restore, "_taskmesh_guarded", False):
        return

    def restore_unacked(client: Any = None) -> Any:
        if client is None and getattr(channel.connection, "client", None) is None:
            log.warning("broker connection gone: %d unacknowledged message(s) not restored now; "
                        "held ones are put back on reconnect", len(qos._delivered))
            qos._delivered.clear()
            return None
        return restore(client)

    restore_unacked._taskmesh_guarded = True  # type: ignore[attr-defined]
    qos.restore_unacked = restore_unacked
