"""Queue depth against a real Redis and a real worker: every priority sub-list is counted
(where a bare ``LLEN queue`` is not), delivered-but-unacked messages are in flight, the
oldest waiting message gives the age, and ``global_keyprefix`` is honoured."""

from __future__ import annotations

import json
import time

import pytest
from celery import Celery

from taskmesh import Priority, create_app
from taskmesh.state.queues import QueueDepth, app_queue_depths, next_tasks, queue_depths

QUEUES = ("gpu", "cpu_intensive", "cpu_light", "mixed")


def kombu_count(app, queue: str) -> int:
    """kombu's own count: ``Channel._size``, over every priority sub-list."""
    with app.connection_for_write() as conn:
        return conn.default_channel.queue_declare(queue, passive=True).message_count


def stamp_of(raw: bytes) -> float:
    return json.loads(raw)["headers"]["taskmesh_enqueued_at"]


def poll(probe, until, timeout: float = 60):
    """Call *probe* until *until* holds for its value; fail with the last value after *timeout*."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if until(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still {value!r} after {timeout}s")
        time.sleep(0.05)


def test_waiting_counts_every_priority_sub_list_as_kombu_does_where_llen_does_not(e2e, broker):
    for priority, count in ((Priority.CRITICAL, 2), (Priority.NORMAL, 3), (Priority.LOW, 2)):
        for _ in range(count):
            e2e.on_cpu.apply_async(priority=priority)
    depths = queue_depths(broker, QUEUES)
    cpu = depths["cpu_intensive"]
    assert cpu.waiting == 7 and cpu.in_flight == 0
    assert dict(cpu.by_priority) == {0: 2, 3: 0, 6: 3, 9: 2}
    assert cpu.waiting == kombu_count(e2e.app, "cpu_intensive")
    assert broker.llen("cpu_intensive") == 2 < cpu.waiting  # what LLEN-based exporters report
    assert all(depths[q].waiting == 0 and depths[q].oldest_age_s is None for q in ("gpu", "cpu_light", "mixed"))
    from_app = app_queue_depths(e2e.app)  # the app's own transport options and queues
    assert {q: (d.waiting, d.in_flight, dict(d.by_priority)) for q, d in from_app.items()} == {
        q: (d.waiting, d.in_flight, dict(d.by_priority)) for q, d in depths.items()
    }
    assert hash(cpu) == hash(QueueDepth("cpu_intensive", 7, 0, cpu.oldest_age_s, {}))


@pytest.mark.slow
def test_in_flight_counts_the_task_a_worker_holds_until_it_is_acknowledged(e2e, broker, processes):
    results = [e2e.on_cpu.delay(5)] + [e2e.on_cpu.delay() for _ in range(2)]
    assert queue_depths(broker, ["cpu_intensive"])["cpu_intensive"].waiting == 3
    processes.celery_worker("tests.apps.e2e_app", "-Q", "cpu_intensive", "-P", "prefork", "-c", "1",
                            "-n", "depth@%h")
    held = poll(lambda: queue_depths(broker, ["cpu_intensive"])["cpu_intensive"], lambda d: d.in_flight >= 1)
    assert (held.in_flight, held.waiting) == (1, 2)
    assert not results[0].ready()  # the 5 s task is the one held, not a finished one
    for result in results:
        result.get(timeout=60)
    done = poll(lambda: queue_depths(broker, ["cpu_intensive"])["cpu_intensive"], lambda d: d.in_flight == 0)
    assert (done.in_flight, done.waiting, done.oldest_age_s) == (0, 0, None)


def test_oldest_age_is_the_first_message_even_in_a_lower_priority_list(e2e, broker):
    e2e.on_gpu.apply_async(priority=Priority.LOW)
    first = stamp_of(broker.lindex("gpu\x06\x169", -1))
    time.sleep(1.2)
    e2e.on_gpu.apply_async(priority=Priority.CRITICAL)
    e2e.on_gpu.apply_async(priority=Priority.NORMAL)
    now = time.time()
    gpu = queue_depths(broker, ["gpu"], now=now)["gpu"]
    assert gpu.waiting == 3 and dict(gpu.by_priority) == {0: 1, 3: 0, 6: 1, 9: 1}
    assert gpu.oldest_age_s >= 1.0
    assert gpu.oldest_age_s == pytest.approx(now - first)
    newest = queue_depths(broker, ["gpu"], priority_steps=(0,), now=now)["gpu"]  # the CRITICAL list alone
    assert newest.waiting == 1 and newest.oldest_age_s == pytest.approx(now - stamp_of(broker.lindex("gpu", -1)))
    assert newest.oldest_age_s < gpu.oldest_age_s


def test_a_message_requeued_to_the_back_of_its_list_still_gives_the_age(e2e, broker):
    e2e.on_io.delay()
    first = stamp_of(broker.lindex("cpu_light\x06\x166", -1))
    time.sleep(1.2)
    e2e.on_io.delay()
    e2e.on_io.delay()
    with e2e.app.connection_for_write() as conn:
        message = conn.default_channel.basic_get("cpu_light")  # BRPOP's end: the oldest
        assert message.headers["taskmesh_enqueued_at"] == first
        taken = queue_depths(broker, ["cpu_light"])["cpu_light"]
        assert (taken.waiting, taken.in_flight) == (2, 1)
        message.reject(requeue=True)  # what Celery does for a lost worker: kombu LPUSHes it to index 0
    assert stamp_of(broker.lindex("cpu_light\x06\x166", 0)) == first
    now = time.time()
    io = queue_depths(broker, ["cpu_light"], now=now)["cpu_light"]
    assert (io.waiting, io.in_flight) == (3, 0)
    assert io.oldest_age_s == pytest.approx(now - first) and io.oldest_age_s >= 1.0


def test_global_keyprefix_is_applied_to_every_key(broker_url, broker):
    options = {"global_keyprefix": "tm:", "priority_steps": [0, 3, 6, 9], "visibility_timeout": 3600}
    app = create_app("p", broker=broker_url, broker_transport_options=options)

    @app.task(name="p.work", profile="cpu", time_limit=60, shared=False)
    def work():
        return None

    work.apply_async(priority=Priority.CRITICAL)
    work.apply_async(priority=Priority.LOW)
    work.apply_async(priority=Priority.LOW)
    assert broker.llen("tm:cpu_intensive") == 1 and broker.llen("tm:cpu_intensive\x06\x169") == 2
    with app.connection_for_write() as conn:
        conn.default_channel.basic_get("cpu_intensive")  # the CRITICAL one, into the prefixed unacked hash
        assert broker.hlen("tm:unacked") == 1 and not broker.exists("unacked")
        cpu = app_queue_depths(app)["cpu_intensive"]
        assert (cpu.waiting, cpu.in_flight) == (2, 1) and dict(cpu.by_priority) == {0: 0, 3: 0, 6: 0, 9: 2}
        assert cpu.oldest_age_s is not None
    assert queue_depths(broker, ["cpu_intensive"])["cpu_intensive"].waiting == 0  # without the prefix: nothing


def test_messages_without_the_taskmesh_header_or_malformed_are_counted_not_aged(e2e, broker_url, broker):
    plain = Celery("plain", broker=broker_url, set_as_current=False)
    plain.send_task("unregistered.name", queue="cpu_light")
    plain.send_task("unregistered.name", queue="mixed")
    e2e.on_io.delay()
    stamp = stamp_of(broker.lindex("cpu_light\x06\x166", -1))
    broker.lpush("mixed\x06\x169", b"\xff not json")
    broker.lpush("mixed\x06\x163", json.dumps({"headers": {"taskmesh_enqueued_at": "yesterday"}}))
    broker.hset("unacked", "junk-1", b"not json")
    broker.hset("unacked", "junk-2", json.dumps(["payload", "mixed", "mixed"]))
    now = time.time()
    depths = queue_depths(broker, ["cpu_light", "mixed"], now=now)
    assert depths["cpu_light"].waiting == 2 == kombu_count(e2e.app, "cpu_light")
    assert depths["cpu_light"].oldest_age_s == pytest.approx(now - stamp)  # the stamped message only
    assert (depths["mixed"].waiting, depths["mixed"].in_flight, depths["mixed"].oldest_age_s) == (3, 1, None)
    assert dict(depths["mixed"].by_priority) == {0: 1, 3: 1, 6: 0, 9: 1}


def test_app_queue_depths_refuses_a_broker_that_is_not_redis():
    app = Celery("amqp-app", broker="amqp://user:secret@localhost//", set_as_current=False)
    with pytest.raises(ValueError, match="needs a Redis broker .* or that setting") as info:
        app_queue_depths(app)
    assert "secret" not in str(info.value) and "set TASKMESH_STATE_URL" in str(info.value)


def test_next_tasks_samples_what_waits_in_the_order_consumers_take_it(e2e, broker):
    e2e.on_gpu.apply_async(priority=Priority.LOW)
    e2e.on_io.apply_async(queue="gpu", priority=Priority.NORMAL)
    e2e.on_cpu.apply_async(queue="gpu", priority=Priority.NORMAL)
    e2e.on_cpu.apply_async(queue="gpu", priority=Priority.CRITICAL)
    assert next_tasks(broker, "gpu", 10) == {e2e.on_cpu.name: 2, e2e.on_io.name: 1, e2e.on_gpu.name: 1}
    assert next_tasks(broker, "gpu", 2) == {e2e.on_cpu.name: 1, e2e.on_io.name: 1}  # CRITICAL, then the older NORMAL
    assert next_tasks(broker, "cpu_light", 10) == {}
