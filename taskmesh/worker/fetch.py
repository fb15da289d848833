"""A worker's Redis transport: a message is taken off its list and recorded as
unacknowledged in one step, so it is never only in a dying process.

kombu's Redis transport takes a message with ``BRPOP`` (Redis removes it from the list as
it writes the reply) and records it in its ``unacked`` hash only after reading that reply,
in a second round trip (``QoS.append``). A worker SIGKILLed in between — long on a busy
gevent worker, where the reply waits behind running greenlets — took the message with it:
in no list, not in ``unacked``, so neither the orphan sweep nor the visibility timeout could
give it back (issue 11, the chaos suite's last loss).

Here the pop is ``lua/fetch.lua``: it pops the first message of the lists ``BRPOP`` would
watch, in the same order (``_brpop_start``'s priority steps and queue cycle), and in the same
script writes kombu's own record (``[message, exchange, routing_key]`` in ``unacked``, the
client's ``time()`` in ``unacked_index``), so a dead worker's message is always in Redis:
still queued, or unacknowledged (where dead-worker recovery, the orphan sweep and kombu's
``restore_visible`` find it). ``QoS.append`` then keeps the message locally and does not write
the record a second time; ack, reject and restore are kombu's, on the same keys. Where the
worker's registry lives in the same Redis (``hold_fetched_in``), the script also adds the
delivery tag to the worker's in-flight set, which the admission step would otherwise add in
a round trip of its own as the message arrives (``Registry.holding``): with the pop, the
record and the holder in one step, a worker killed at any moment leaves each message it took
where dead-worker recovery finds it at once, and a message costs one round trip fewer again.

A script cannot block. When every list is empty the channel waits in Redis itself, a
``BLPOP`` on its queues' wake lists (``state/fetch_wake.py``) and ``FETCH_IDLE``, for at
most ``fetch_idle_s`` (a transport option, 0.05 s by default), then fetches again: kombu's
poller (the event loop of a prefork worker, ``drain_events`` of a gevent, thread or solo
one) keeps waiting on the socket as before, without a busy loop. A taskmesh producer pushes
a wake token after each send, which ends the wait at once; a message from a producer that
pushes none (plain kombu or Celery) waits for the timeout, which an idle Redis ends on its
10 Hz timer: up to about 0.15 s (``benchmarks/fetch.py`` has both). Under load every fetch
takes a message and none waits, and a message costs one round trip fewer than kombu's pop
and record. A reply kombu would leave unread
(the prefetch shrank meanwhile) is read and its message put back at the head of its list
(``lua/unfetch.lua``), so a recorded message never sits unannounced in a live worker's
socket, where the orphan sweep would deliver it a second time.

The channel's short commands (ack, publish, event) share one client over a pool that makes
a greenlet or thread wait for a free connection, where kombu's fails the command: a gevent
worker's slots outnumber the pool's ``max_connections``, and an ack that failed so left its
message to run again.

Used by every worker of a taskmesh app with a ``redis://`` or ``rediss://`` broker
(``use_for_redis``, called by the admission step): kombu's ``redis`` and ``rediss`` names
resolve to this transport in that process, so the broker URL, TLS and every option stay
kombu's. Producers, RabbitMQ and Sentinel brokers keep kombu's own transport.
"""

from __future__ import annotations

from collections.abc import Callable
from time import monotonic, time
from typing import Any

import redis
from kombu import transport as kombu_transports
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads
from redis.exceptions import NoScriptError

from taskmesh.state.client import lua
from taskmesh.state.fetch_wake import wake_key
from taskmesh.state.keys import FETCH_IDLE

Empty = kombu_redis.Empty
FETCH, UNFETCH = lua("fetch"), lua("unfetch")
POOL_WAIT_S = 30  # a command waits this long for a free connection before it fails as kombu's would at once
__all__ = ["Channel", "Transport", "hold_fetched_in", "use_for_redis"]
#: the in-flight set of the worker in this process, and what to tell when a fetch added a tag to it
_holder: tuple[str, Callable[[str], None]] | None = None


class QoS(kombu_redis.QoS):
    def append(self, message: Any, delivery_tag: str) -> None:
        transport = self.channel.connection
        if transport is not None and transport.recorded == delivery_tag:  # fetch.lua wrote it with the pop
            transport.recorded = None
            virtual.QoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)


class Channel(kombu_redis.Channel):
    QoS = QoS
    fetch_idle_s = 0.05
    from_transport_options = (*kombu_redis.Channel.from_transport_options, "fetch_idle_s")
    _fetching: list[str] | None = None  # the lists of the fetch in flight; None: the idle wait
    _fetching_for: Callable[[str], None] | None = None  # told each tag that fetch added to its holder's set
    _idle = False  # the last fetch found nothing: wait before the next
    _shared_client: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._unrecorded: set[str] = set()  # queues consumed with no_ack (pidbox replies): kombu records none
        super().__init__(*args, **kwargs)
        self._fetch_sha = self.client.script_load(FETCH)
        self._unfetch = self.client.register_script(UNFETCH)

    def _create_client(self, asynchronous: bool = False) -> Any:
        """One client for the channel's short commands (publish, event, ack): kombu builds a new
        ``redis.Redis`` for each, which costs more than the command (a fifth of a gevent
        worker's time per no-op task). A client over the channel's pool is safe to share
        between threads and greenlets; a new pool (after a reconnect) gets a new client."""
        if asynchronous:
            return super()._create_client(asynchronous=True)
        client = self._shared_client
        if client is None or client.connection_pool is not self.pool:
            client = self._shared_client = super()._create_client()
        return client

    def _get_pool(self, asynchronous: bool = False) -> Any:
        """A pool that makes a greenlet or thread wait for a free connection. kombu's fails the
        command when ``max_connections`` are in use: on a gevent or threads worker with more
        slots than that, tasks that end together lost their acks ("Couldn't ack ... Too many
        connections") and ran again after the visibility timeout. The fetch's own (async) pool
        holds one connection and stays kombu's."""
        if asynchronous:
            return super()._get_pool(asynchronous=True)
        params = self._connparams()
        self.keyprefix_fanout = self.keyprefix_fanout.format(db=params["db"])
        return redis.BlockingConnectionPool(timeout=POOL_WAIT_S, **params)

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        (self._unrecorded.add if no_ack else self._unrecorded.discard)(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def _prefixed(self, keys: list[str]) -> list[str]:
        return [f"{self.global_keyprefix}{key}" for key in keys]

    def _brpop_start(self, timeout: Any = None) -> None:
        if not self.ack_emulation:
            return super()._brpop_start(timeout)
        connection = self.client.connection
        if self._idle:
            self._fetching = None
            wake = [wake_key(queue) for queue in self.active_queues]  # a taskmesh producer's send ends the wait
            connection.send_command("BLPOP", *self._prefixed([*wake, FETCH_IDLE]), self.fetch_idle_s)
        else:
            queues = self._queue_cycle.consume(len(self.active_queues))
            if not queues:
                return
            pairs = [(self._q_for_pri(queue, pri), int(queue not in self._unrecorded))
                     for pri in self.priority_steps for queue in queues]
            lists = [key for key, _ in pairs]
            keys = self._prefixed([self.unacked_key, self.unacked_index_key, *lists])
            self._fetching, holder = lists, _holder
            if holder is not None:
                keys.append(holder[0])  # taskmesh's own key, never prefixed (state/keys.py)
            self._fetching_for = holder and holder[1]
            connection.send_command("EVALSHA", self._fetch_sha, len(keys), *keys, repr(time()), len(lists),
                                    *(record for _, record in pairs))
        self._in_poll = connection
        self._brpop_sent_at = monotonic()

    def _brpop_read(self, **options: Any) -> bool:
        if not self.ack_emulation:
            return super()._brpop_read(**options)
        try:
            lists, self._idle = self._fetching, False
            try:
                reply = self.client.parse_response(self.client.connection, "EVALSHA" if lists else "BLPOP",
                                                   **options)
            except NoScriptError:  # Redis restarted, its scripts gone: load it again, fetch at once
                self._fetch_sha = self.client.script_load(FETCH)
                raise Empty() from None
            except self.connection_errors:
                self.client.connection.disconnect()  # the next poll reconnects, as kombu's BRPOP read does
                raise
            if lists is None:
                raise Empty()
            if not reply:
                self._idle = True
                raise Empty()
            number, item, recorded = reply
            self._hand_over(lists[int(number) - 1], item, bool(recorded), self._fetching_for)
            return True
        finally:
            self._in_poll = None
            self._fetching = self._fetching_for = None
            self._flush_brpop_reauth()

    def _hand_over(self, key: str, item: bytes, recorded: bool, held: Callable[[str], None] | None) -> None:
        """Hand one fetched message to its consumer, as ``_brpop_read`` does; a record kombu's
        QoS never took (its consumer failed to read the message first) goes, as the pop did."""
        queue = key.rsplit(self.sep, 1)[0]
        self._queue_cycle.rotate(queue)
        payload = loads(bytes_to_str(item))
        tag = payload["properties"]["delivery_tag"] if recorded else None
        if tag is not None and held is not None:
            held(tag)  # before anything else: what the worker no longer holds leaves its set at the next beat
        if not self.qos.can_consume():
            self._give_back(key, item, tag)
            return
        transport = self.connection
        transport.recorded = tag
        try:
            transport._deliver(payload, queue)
        except Exception:
            if tag is not None and transport.recorded == tag:
                self.qos._remove_from_indices(tag).execute()
            raise
        finally:
            transport.recorded = None

    def _give_back(self, key: str, item: bytes, tag: str | None) -> None:
        keys = self._prefixed([self.unacked_key, self.unacked_index_key, key])
        with self.conn_or_acquire() as client:
            self._unfetch(keys=keys, args=[tag or "", item, int(tag is not None)], client=client)


class Poller(kombu_redis.MultiChannelPoller):
    """kombu's poller, except that a fetch reply is read, not paused unread (see the module)."""

    def _pause_brpop(self, channel: Any, fileno: int) -> None:
        if isinstance(channel, Channel) and channel._fetching is not None and channel._in_poll:
            try:
                # envelope's guard included; a script does not block: its reply is there or nearly
                channel.handlers["BRPOP"]()
            except Empty:
                pass
            return
        super()._pause_brpop(channel, fileno)


class Transport(kombu_redis.Transport):
    Channel = Channel
    recorded: str | None = None  # the delivery tag fetch.lua recorded, while it is being delivered

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cycle = Poller()


def hold_fetched_in(key: str | None, on_held: Callable[[str], None] | None = None) -> None:
    """Have this process's fetches add each tag they record to the Redis set *key* (the
    worker's in-flight set, in the broker's Redis) and call *on_held* with it; ``None``: no more."""
    global _holder
    _holder = (key, on_held or (lambda tag: None)) if key else None


def use_for_redis() -> None:
    """Make kombu's ``redis`` and ``rediss`` transports this one, in this (worker) process."""
    for name in ("redis", "rediss"):
        kombu_transports.TRANSPORT_ALIASES[name] = f"{__name__}:Transport"
        kombu_transports._transport_cache.pop(name, None)
