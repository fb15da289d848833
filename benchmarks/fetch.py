"""What the worker's fetch (``taskmesh/worker/fetch.py``) costs against kombu's ``BRPOP``,
side by side on one Redis of its own: drain rate under load, the wait a message sent to an
idle consumer adds, and what an idle consumer spends (its CPU, Redis commands per second).

The producer sends with plain kombu, and in the last row also pushes the wake token a
taskmesh app's producer pushes after each send (``state/fetch_wake.py``). A kombu consumer
in this process with ``drain_events``, the loop of a gevent, thread or solo
worker; every message is acknowledged. ``python -m benchmarks.fetch [--messages N]``
prints one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import threading
import time
from typing import Any

import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.transport.redis import Transport as KombuTransport

from benchmarks.harness import machine
from taskmesh.run.stack import free_port, redis_command, wait_for_redis
from taskmesh.state.fetch_wake import wake
from taskmesh.worker.fetch import Transport as FetchTransport

QUEUE = Queue("bench-fetch", Exchange("bench-fetch", type="direct"), routing_key="bench-fetch")
#: name → (the consumer's transport, whether the producer wakes it after each send as a taskmesh app does)
TRANSPORTS = {"kombu BRPOP": (KombuTransport, False), "taskmesh fetch, plain producer": (FetchTransport, False),
              "taskmesh fetch, taskmesh producer": (FetchTransport, True)}


def commands(client: redis.Redis) -> int:
    return sum(v["calls"] for v in client.info("commandstats").values())


def measure(url: str, transport: Any, woken: bool, messages: int, idle_s: float, probes: int) -> dict[str, Any]:
    client = redis.Redis.from_url(url)
    client.flushdb()
    got: list[float] = []
    with Connection(url) as producer_conn, Connection(url, transport=transport) as conn:
        producer = Producer(producer_conn)

        def send(n: int) -> None:
            producer.publish({"sent": time.time(), "n": n}, exchange=QUEUE.exchange, routing_key="bench-fetch",
                             declare=[QUEUE], serializer="json")
            if woken:
                wake(client, QUEUE.name)

        def on_message(body: dict, message: Any) -> None:
            got.append(time.time() - body["sent"])
            message.ack()

        Consumer(conn, [QUEUE], callbacks=[on_message]).consume()
        start = time.perf_counter()
        for n in range(messages):
            send(n)
        send_s = time.perf_counter() - start
        start = time.perf_counter()
        while len(got) < messages:
            conn.drain_events(timeout=5)
        drain_s = time.perf_counter() - start
        # idle: nothing to take for idle_s
        cpu, before, wall = time.process_time(), commands(client), time.perf_counter()
        deadline = time.monotonic() + idle_s
        while time.monotonic() < deadline:
            try:
                conn.drain_events(timeout=deadline - time.monotonic())
            except TimeoutError:
                break
        wall = time.perf_counter() - wall
        idle = {"cpu_percent": round(100 * (time.process_time() - cpu) / wall, 2),
                "redis_commands_per_s": round((commands(client) - before) / wall, 1)}
        # one message at a time to an idle consumer: from its send to its callback
        del got[:]
        with Connection(url) as probe_conn:
            probe = Producer(probe_conn)

            def probing() -> None:
                for n in range(probes):
                    time.sleep(0.2 + (n % 7) * 0.013)  # idle between, at varied phases of the idle wait
                    probe.publish({"sent": time.time(), "n": n}, exchange=QUEUE.exchange,
                                  routing_key="bench-fetch", serializer="json")
                    if woken:
                        wake(client, QUEUE.name)

            sender = threading.Thread(target=probing)
            sender.start()
            while len(got) < probes:
                try:
                    conn.drain_events(timeout=1)
                except TimeoutError:
                    continue
            sender.join()
        latencies = list(got)
    return {"send_msgs_per_s": round(messages / send_s), "drain_msgs_per_s": round(messages / drain_s), "idle": idle,
            "idle_latency_ms": _latency(latencies)}


def _latency(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {"median": round(statistics.median(ms), 2), "max": round(max(ms), 2)} if ms else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--idle-s", type=float, default=5.0)
    parser.add_argument("--probes", type=int, default=30)
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        port = free_port()
        server = subprocess.Popen(redis_command(port, folder), stdout=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        try:
            wait_for_redis(url, timeout=30)
            results = {name: measure(url, cls, woken, args.messages, args.idle_s, args.probes)
                       for name, (cls, woken) in TRANSPORTS.items()}
        finally:
            server.terminate()
            server.wait(20)
    print(json.dumps({"machine": dataclasses.asdict(machine()), "args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
