"""The worker's fetch (``taskmesh/worker/fetch.py``) against a real Redis, with kombu's own
producer, QoS and restore: the record is written with the pop, is the one kombu writes, and
kombu's ack, reject and visibility restore still work on it."""

from __future__ import annotations

import json
import socket

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue

from taskmesh.state.fetch_wake import wake, wake_key
from taskmesh.state.keys import UNACKED
from taskmesh.state.registry import Registry
from taskmesh.worker.fetch import Channel, Transport, hold_fetched_in

QUEUE = Queue("fetched", Exchange("fetched", type="direct"), routing_key="fetched")


@pytest.fixture
def consumer_conn(broker_url):
    with Connection(broker_url, transport=Transport, transport_options={"visibility_timeout": 3600}) as conn:
        yield conn


def publish(broker_url: str, body: dict, priority: int | None = None) -> None:
    with Connection(broker_url) as conn:  # a producer is plain kombu
        Producer(conn).publish(body, exchange=QUEUE.exchange, routing_key="fetched", declare=[QUEUE],
                               priority=priority, serializer="json")


def fetch_sent(conn: Connection, broker: redis.Redis) -> Channel:
    """A consumer's channel that sent its fetch, which Redis has run; nothing of the reply read."""
    channel = conn.default_channel
    channel.connection.cycle.on_poll_start()
    for _ in range(200):
        if not broker.llen("fetched"):
            break
        channel.connection.cycle.on_poll_start()
    return channel


def test_a_fetch_records_the_message_as_kombu_does_before_its_reply_is_read(broker_url, broker, consumer_conn):
    publish(broker_url, {"n": 1})
    raw = broker.lindex("fetched", 0)
    got = []
    Consumer(consumer_conn, [QUEUE], callbacks=[lambda body, message: got.append(message)]).consume()
    fetch_sent(consumer_conn, broker)
    assert not broker.llen("fetched") and not got
    tag = json.loads(raw)["properties"]["delivery_tag"]
    record = json.loads(broker.hget(UNACKED, tag))
    assert record == [json.loads(raw), "fetched", "fetched"]  # QoS.append's dumps([message._raw, EX, RK])
    assert broker.zscore("unacked_index", tag) is not None
    consumer_conn.drain_events(timeout=5)
    assert [m.payload for m in got] == [{"n": 1}] and json.loads(broker.hget(UNACKED, tag)) == record
    got[0].ack()
    assert not broker.hlen(UNACKED) and not broker.zcard("unacked_index")


def test_priority_lists_are_taken_in_brpops_order(broker_url, broker, consumer_conn):
    publish(broker_url, {"n": "low"}, priority=9)
    publish(broker_url, {"n": "high"}, priority=0)
    got = []
    Consumer(consumer_conn, [QUEUE], callbacks=[lambda body, message: (got.append(body), message.ack())]).consume()
    while len(got) < 2:
        consumer_conn.drain_events(timeout=5)
    assert got == [{"n": "high"}, {"n": "low"}]  # kombu's step 0 list first, as BRPOP watches it


def test_a_rejected_message_goes_back_and_an_expired_one_is_restored(broker_url, broker):
    options = {"visibility_timeout": 0}
    with Connection(broker_url, transport=Transport, transport_options=options) as conn:
        publish(broker_url, {"n": 1})
        got = []
        Consumer(conn, [QUEUE], callbacks=[lambda body, message: got.append(message)]).consume()
        conn.drain_events(timeout=5)
        got[0].reject(requeue=True)
        assert broker.llen("fetched") == 1 and not broker.hlen(UNACKED)
        conn.drain_events(timeout=5)  # taken again, left unacknowledged past the (zero) visibility timeout
        assert broker.hlen(UNACKED) == 1 and not broker.llen("fetched")
        conn.default_channel.qos.restore_visible(interval=1)
        assert broker.llen("fetched") == 1 and not broker.hlen(UNACKED)


def test_a_reply_the_channel_can_no_longer_take_is_given_back_to_the_head_of_its_list(broker_url, broker,
                                                                                      consumer_conn):
    publish(broker_url, {"n": 1})
    publish(broker_url, {"n": 2})
    got = []
    Consumer(consumer_conn, [QUEUE], callbacks=[lambda body, message: got.append(message)]).consume()
    consumer_conn.default_channel.basic_qos(0, 2, False)
    consumer_conn.drain_events(timeout=5)
    channel = fetch_sent(consumer_conn, broker)  # n=2 is recorded, its reply on the way
    channel.basic_qos(0, 1, False)  # and the prefetch shrinks (Celery's QoS.decrement_eventually)
    with pytest.raises(socket.timeout):
        consumer_conn.drain_events(timeout=0.2)
    assert [m.payload for m in got] == [{"n": 1}]
    assert json.loads(broker.lindex("fetched", -1))["body"]  # back where it is popped next
    assert broker.hlen(UNACKED) == 1  # only n=1, which the consumer holds
    got[0].ack()
    consumer_conn.drain_events(timeout=5)
    assert [m.payload for m in got] == [{"n": 1}, {"n": 2}]


def test_an_idle_channel_waits_in_redis_between_fetches_and_does_not_spin(broker_url, broker, consumer_conn):
    Consumer(consumer_conn, [QUEUE], callbacks=[lambda body, message: None]).consume()
    def waits() -> int:
        return broker.info("commandstats").get("cmdstat_blpop", {}).get("calls", 0)

    before = waits()
    with pytest.raises(socket.timeout):
        consumer_conn.drain_events(timeout=0.5)
    # one wait of fetch_idle_s in Redis after each empty fetch; a busy loop would make thousands
    assert 1 <= waits() - before <= 0.5 / Channel.fetch_idle_s + 2


def test_a_queue_consumed_without_acks_leaves_nothing_unacknowledged(broker_url, broker, consumer_conn):
    """Found by tests/test_fencing.py: a worker's pidbox replies (mingle, inspect) are consumed
    with no_ack, which kombu never records; a record written for one would never be removed."""
    publish(broker_url, {"n": 1})
    got = []
    Consumer(consumer_conn, [QUEUE], no_ack=True, callbacks=[lambda body, message: got.append(body)]).consume()
    consumer_conn.drain_events(timeout=5)
    assert got == [{"n": 1}] and not broker.hlen(UNACKED) and not broker.zcard("unacked_index")


def test_a_taskmesh_send_ends_an_idle_workers_wait_at_once(broker_url, broker):
    """The idle wait is set to 30 s: a message that only the timeout would bring could not arrive
    within the 10 s drain below; the wake token a taskmesh producer pushes brings it."""
    with Connection(broker_url, transport=Transport, transport_options={"fetch_idle_s": 30}) as conn:
        got = []
        Consumer(conn, [QUEUE], callbacks=[lambda body, message: (got.append(body), message.ack())]).consume()
        with pytest.raises(socket.timeout):
            conn.drain_events(timeout=0.5)  # nothing to take: the channel now waits in Redis
        publish(broker_url, {"n": 1})
        wake(broker, QUEUE.name)
        conn.drain_events(timeout=10)
        assert got == [{"n": 1}]


def test_every_send_of_a_taskmesh_app_pushes_one_wake_token_for_its_queue(broker, gpu_app):
    broker.delete(wake_key("cpu_light"))
    for _ in range(3):
        gpu_app.app.send_task("tests.apps.elsewhere.some_task", queue="cpu_light")
    assert broker.lrange(wake_key("cpu_light"), 0, -1) == [b"1"]  # trimmed to one: a busy queue grows nothing
    assert 0 < broker.ttl(wake_key("cpu_light")) <= 60


def test_a_fetch_adds_what_it_records_to_its_workers_held_set_in_the_same_step(broker_url, broker, consumer_conn):
    held_set, told = Registry(broker).held_set("w@host#1"), []
    publish(broker_url, {"n": 1})
    tag = json.loads(broker.lindex("fetched", 0))["properties"]["delivery_tag"]
    hold_fetched_in(held_set, told.append)
    try:
        Consumer(consumer_conn, [QUEUE], callbacks=[lambda body, message: message.ack()]).consume()
        fetch_sent(consumer_conn, broker)
        assert broker.smembers(held_set) == {tag.encode()} and broker.hexists(UNACKED, tag) and told == []
        consumer_conn.drain_events(timeout=5)
        assert told == [tag]
    finally:
        hold_fetched_in(None)


def test_a_fetched_tag_needs_no_second_write_and_one_that_never_arrives_is_gone_a_beat_later(broker):
    registry = Registry(broker)
    registry.fetched("arrives")
    registry.fetched("refused")  # fetched, never offered to the controller
    registry.holding("w@host#1", "arrives")
    assert not broker.exists(registry.held_set("w@host#1"))  # the fetch's script wrote it, not holding
    registry.holding("w@host#1", "unfetched")  # e.g. over a broker whose fetch adds nothing
    assert broker.smembers(registry.held_set("w@host#1")) == {b"unfetched"}
    assert registry.take_added() == {"arrives", "unfetched"}
    assert registry.take_added() == {"refused"}  # a whole beat without arriving: not held, gone next
    assert registry.take_added() == set()
