"""What waits in kombu's Redis lists: depth, age, the next task names, and the fallback move.

Queue depth is the one count everything uses.

Not ``LLEN queue``, as common exporters and KEDA's Redis scaler do: kombu keeps one list
per priority step (``queue``, ``queue\\x06\\x163``, ``…6``, ``…9`` by default), so a bare
``LLEN`` sees priority 0 only. A message a worker has taken is in no list but in kombu's
``unacked`` hash (tag → JSON ``[payload, exchange, routing_key]``) until acknowledged,
which with late acks is the whole run: that is ``in_flight``, counted by routing key
(the queue name, for taskmesh's direct exchanges), including a dead worker's messages
until kombu restores them. Every key carries the transport's ``global_keyprefix``.

Age comes from the ``taskmesh_enqueued_at`` header. kombu LPUSHes and consumers BRPOP,
so index -1 is the next out and normally the oldest; but ``reject(requeue=True)``
(Celery's answer to a lost worker) LPUSHes a message back at index 0, so both ends are
read. A message a worker holds back until its memory is free is in flight to kombu but
waits all the same: the oldest such per queue, as live workers announce it
(``Registry.held_since``), counts for the age too, so a task held an hour shows its hour.
The lists are read in one MULTI/EXEC round trip and the hash then by HSCAN, so a
message delivered in between can be counted twice for that instant.

On a RabbitMQ broker there are no such lists: ``app_queue_depths`` asks the broker
(``amqp_depth``), and the fallback move does nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time
import types
from collections.abc import Iterable, Mapping
from typing import Any

import redis
from celery import Celery

from taskmesh.core.headers import FALLBACK_HEADER, REQUIREMENT_HEADER, enqueued_at
from taskmesh.state.amqp_depth import amqp_waiting
from taskmesh.state.client import broker_is_redis, lua, state_client
from taskmesh.state.keys import PRIORITY_STEPS, SEP, UNACKED, layout, priority_key
from taskmesh.state.registry import Registry

__all__ = ["QueueDepth", "app_queue_depths", "move_fallbacks", "next_tasks", "queue_depths"]


@dataclasses.dataclass(frozen=True)
class QueueDepth:
    """One queue's depth at one moment."""

    queue: str
    waiting: int  # over every priority sub-list
    in_flight: int  # delivered, not yet acknowledged
    oldest_age_s: float | None  # None when nothing waits or is held, or none of it is stamped
    by_priority: Mapping[int, int] = dataclasses.field(hash=False)  # waiting per priority step


def _enqueued_at(raw: Any) -> float | None:
    """The taskmesh enqueue time of a raw message, or None if absent or malformed."""
    if raw is None:
        return None
    try:
        headers = json.loads(raw)["headers"]
        return enqueued_at(headers) if isinstance(headers, dict) else None
    except (ValueError, TypeError, KeyError, IndexError):
        return None


def _routing_key(raw: Any) -> str | None:
    """The routing key of an ``unacked`` hash value, or None if malformed."""
    try:
        entry = json.loads(raw)
    except (ValueError, TypeError):
        return None
    return entry[2] if isinstance(entry, list) and len(entry) == 3 and isinstance(entry[2], str) else None


def queue_depths(
    client: redis.Redis,
    queues: Iterable[str],
    *,
    priority_steps: Iterable[int] = PRIORITY_STEPS,
    sep: str = SEP,
    keyprefix: str = "",
    unacked_key: str = UNACKED,
    now: float | None = None,
    count_in_flight: bool = True,
    held_since: Mapping[str, float] | None = None,
) -> dict[str, QueueDepth]:
    """Depth of each of *queues*; the options mirror kombu's Redis transport options.

    ``count_in_flight=False`` skips the scan of the unacked hash (producers checking
    ``max_depth`` need only what waits). *held_since*: queue → the enqueue time of the
    oldest message held back by a worker, for the age.
    """
    names = list(dict.fromkeys(queues))
    steps = list(dict.fromkeys(int(step) for step in priority_steps))
    now = time.time() if now is None else now
    with client.pipeline(transaction=True) as pipe:
        for queue in names:
            for step in steps:
                key = priority_key(queue, step, sep, keyprefix)
                pipe.llen(key)
                pipe.lindex(key, -1)  # the next out: normally the oldest
                pipe.lindex(key, 0)  # the last in, or a message requeued behind the others
        replies = iter(pipe.execute())

    waiting: dict[str, dict[int, int]] = {}
    age: dict[str, float | None] = {}
    for queue in names:
        waiting[queue], first = {}, None
        for step in steps:
            length, next_out, last_in = next(replies), next(replies), next(replies)
            waiting[queue][step] = int(length)
            stamps = [s for s in (_enqueued_at(next_out), _enqueued_at(last_in), first) if s is not None]
            first = min(stamps, default=None)
        if (held := (held_since or {}).get(queue)) is not None:
            first = held if first is None else min(first, held)
        age[queue] = None if first is None else max(0.0, now - first)

    in_flight = dict.fromkeys(names, 0)
    for _, raw in client.hscan_iter(keyprefix + unacked_key, count=500) if count_in_flight else ():
        routing_key = _routing_key(raw)
        if routing_key in in_flight:
            in_flight[routing_key] += 1

    return {
        queue: QueueDepth(
            queue=queue,
            waiting=sum(waiting[queue].values()),
            in_flight=in_flight[queue],
            oldest_age_s=age[queue],
            by_priority=types.MappingProxyType(waiting[queue]),
        )
        for queue in names
    }


def next_tasks(
    client: redis.Redis,
    queue: str,
    limit: int,
    *,
    priority_steps: Iterable[int] = PRIORITY_STEPS,
    sep: str = SEP,
    keyprefix: str = "",
    **_: Any,  # the rest of ``layout(app)``
) -> collections.Counter[str]:
    """Task names of up to *limit* messages next out of *queue* (priority 0 first, as
    consumers take them): what the work waiting there is made of, by a bounded sample."""
    with client.pipeline(transaction=False) as pipe:
        for step in dict.fromkeys(int(step) for step in priority_steps):
            pipe.lrange(priority_key(queue, step, sep, keyprefix), -limit, -1)
        lists = pipe.execute()
    names: collections.Counter[str] = collections.Counter()
    for raw in (m for messages in lists for m in reversed(messages)):
        if sum(names.values()) >= limit:
            break
        try:
            name = json.loads(raw)["headers"]["task"]
        except (ValueError, TypeError, KeyError):
            continue
        if isinstance(name, str):
            names[name] += 1
    return names


def app_queue_depths(
    app: Celery,
    queues: Iterable[str] | None = None,
    *,
    client: redis.Redis | None = None,
    count_in_flight: bool = True,
) -> dict[str, QueueDepth]:
    """``queue_depths`` for a Celery app's Redis broker and transport options, with the
    messages its live workers hold back (unless ``count_in_flight=False``). On RabbitMQ:
    what a passive declare tells (``amqp_depth``), the held messages' age included.

    *queues* defaults to the names in ``app.conf.task_queues``. Without *client*, one is
    opened on the broker for this call and closed after it.
    """
    if queues is None:
        queues = [queue.name for queue in app.conf.task_queues or ()]
    if client is not None:
        return _app_depths(app, client, queues, count_in_flight)
    client = state_client(app)
    try:
        return _app_depths(app, client, queues, count_in_flight)
    finally:
        client.close()


def _app_depths(app: Celery, client: redis.Redis, queues: Iterable[str],
                count_in_flight: bool) -> dict[str, QueueDepth]:
    held = None
    if count_in_flight:
        config = getattr(app, "taskmesh_config", None)
        held = Registry(client, alive_s=config.admission.reservation_ttl_s if config else 15.0).held_since()
    if not broker_is_redis(app):
        return _amqp_depths(app, queues, held)
    return queue_depths(client, queues, count_in_flight=count_in_flight, held_since=held, **layout(app))


def _amqp_depths(app: Celery, queues: Iterable[str], held_since: Mapping[str, float] | None) -> dict[str, QueueDepth]:
    now, held = time.time(), held_since or {}
    return {
        queue: QueueDepth(queue=queue, waiting=count, in_flight=0,
                          oldest_age_s=max(0.0, now - held[queue]) if queue in held else None,
                          by_priority=types.MappingProxyType({}))
        for queue, count in amqp_waiting(app, queues).items()
    }


def move_fallbacks(app: Celery, client: redis.Redis, source: str, target: str, limit: int) -> int:
    """Atomically move up to *limit* waiting messages whose task falls back to *target*.

    Each move is ``lua/move.lua``: LREM then LPUSH only if the message is still there,
    so a message a worker took meanwhile is neither lost nor doubled. None on RabbitMQ.
    """
    if not broker_is_redis(app):  # RabbitMQ cannot take a message out of a queue's middle
        return 0
    keys = layout(app)
    move = client.register_script(lua("move"))
    moved = 0
    for step in keys["priority_steps"]:
        source_key = priority_key(source, step, keys["sep"], keys["keyprefix"])
        target_key = priority_key(target, step, keys["sep"], keys["keyprefix"])
        for raw in client.lrange(source_key, 0, -1):  # newest first: the oldest keep their GPU turn
            if moved >= limit:
                return moved
            message = json.loads(raw)
            headers = message.get("headers") or {}
            if (headers.get(REQUIREMENT_HEADER) or {}).get("fallback") != target:
                continue
            headers[FALLBACK_HEADER] = source
            delivery = message.get("properties", {}).get("delivery_info", {})
            delivery.update(exchange=target, routing_key=target)
            moved += int(move(keys=[source_key, target_key], args=[raw, json.dumps(message)]))
    return moved
