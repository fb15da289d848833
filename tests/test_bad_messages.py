"""Malformed messages sent at a real worker: each refused with one line naming the task, the
field and the fix, the worker alive (same process), its neighbours' tasks run, nothing queued lost.

Before the fix, the first of these ended the worker ("CRITICAL Unrecoverable error"), and the
restored message ended every restart again.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import time
import uuid
from datetime import datetime
from decimal import Decimal

import pytest
from celery import Celery

from taskmesh.core.errors import MessageRefused
from taskmesh.state.dead_letters import dead_letters

from .conftest import wait_for_workers

HOST = socket.gethostname()
APP = "tests.apps.gpu_app"
TEN_GIB = "tests.apps.gpu_app.ten_gib"
CRUNCH = "tests.apps.gpu_app.crunch"

BAD_HEADERS = [
    ("gpu", "header 'taskmesh' is str 'gpu', not a mapping"),
    (["gpu", 1], "header 'taskmesh' is list ['gpu', 1], not a mapping"),
    ({"profile": "tpu"}, "header field taskmesh.profile: unknown profile 'tpu'"),
    ({"profile": "gpu", "vram_mib": -5}, "header field taskmesh.vram_mib is int -5; expected a whole number of MiB"),
    ({"profile": "gpu", "vram_mib": "lots"}, "header field taskmesh.vram_mib is str 'lots'"),
    ({"profile": "gpu", "min_compute_capability": "abc"}, "taskmesh.min_compute_capability is str 'abc'"),
    ({"profile": "gpu", "gpus": 0}, "header field taskmesh.gpus is int 0; expected a whole number >= 1"),
    ({"profile": "gpu", "gpus": True}, "header field taskmesh.gpus is bool True"),
    ({"profile": "cpu", "vram_mib": 4096}, "asks for GPU resources on profile 'cpu_intensive'"),
    # types JSON cannot carry, which kombu's encoder carries and rebuilds on the worker
    ({"profile": "gpu", "vram_mib": datetime(2026, 1, 1)}, "header field taskmesh.vram_mib is datetime"),
    ({"profile": "gpu", "vram_mib": Decimal("1.5")}, "header field taskmesh.vram_mib is Decimal"),
    ({"profile": "gpu", "model": b"whisper"}, "header field taskmesh.model is bytes"),
    ({"profile": "gpu", "vram_mib": uuid.UUID(int=1)}, "header field taskmesh.vram_mib is UUID"),
    ({"profile": "gpu", "cpu_cores": float("nan")}, "header field taskmesh.cpu_cores is float nan"),
]


def start_worker(processes, tmp_path, queues: str, node: str, **env: str):
    log = tmp_path / f"{node.split('@')[0]}.log"
    proc = processes.start(
        [sys.executable, "-m", "celery", "-A", APP, "worker", "-Q", queues, "-c", "2", "-n", node,
         "--loglevel", "WARNING"],
        env, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    return proc, log


def worker_pid(app, node: str) -> int:
    return app.control.inspect(destination=[node], timeout=5).stats()[node]["pid"]


def counters(app, node: str) -> dict:
    return app.control.inspect(destination=[node], timeout=5).stats()[node]["taskmesh"]["counters"]


@pytest.mark.slow
def test_bad_requirement_headers_are_refused_one_line_each_and_the_worker_lives(gpu_app, broker, processes,
                                                                                tmp_path):
    node = f"bad@{HOST}"
    proc, log = start_worker(processes, tmp_path, "gpu", node, TASKMESH_SIMULATE_GPUS="1x24GiB")
    wait_for_workers(gpu_app.app, [node])
    pid = worker_pid(gpu_app.app, node)
    neighbour = gpu_app.ten_gib.delay(4.0, label="neighbour")  # runs while the bad ones arrive
    deadline = time.monotonic() + 30
    while broker.llen(gpu_app.RUNS) < 1:
        assert time.monotonic() < deadline, "the neighbour task never started"
        time.sleep(0.1)
    # A taskmesh producer stamps its own header for a task it knows; a plain Celery producer (or
    # another version) sends whatever it is given, so the bad headers come from one.
    plain = Celery("bad-producer", broker=gpu_app.app.conf.broker_url, set_as_current=False)
    bad = [gpu_app.app.AsyncResult(plain.send_task(TEN_GIB, (0.1,), queue="gpu", headers={"taskmesh": header}).id)
           for header, _ in BAD_HEADERS]
    with pytest.raises(TypeError, match="not JSON serializable"):  # a set never leaves the producer
        plain.send_task(TEN_GIB, queue="gpu", headers={"taskmesh": {"profile": {"gpu"}}})

    for result, (_, problem) in zip(bad, BAD_HEADERS, strict=True):
        with pytest.raises(MessageRefused) as refused:
            result.get(timeout=60)
        assert problem in str(refused.value) and result.id in str(refused.value)
    assert neighbour.get(timeout=60)["label"] == "neighbour"
    after = gpu_app.ten_gib.delay(0.1, label="after")
    assert after.get(timeout=60)["label"] == "after"

    assert proc.poll() is None and worker_pid(gpu_app.app, node) == pid  # the same worker, never restarted
    assert [r.decode() for r in broker.lrange(gpu_app.RUNS, 0, -1)] == [neighbour.id, after.id]  # no bad one ran
    letters = {entry["task_id"]: entry for entry in dead_letters(broker)}
    assert set(letters) == {r.id for r in bad}
    assert all(entry["task"] == TEN_GIB and entry["queue"] == "gpu" for entry in letters.values())
    assert counters(gpu_app.app, node)["refused"] == len(BAD_HEADERS)
    text = log.read_text()
    lines = [line for line in text.splitlines() if "refused task" in line]
    assert len(lines) == len(BAD_HEADERS)
    for result, (_, problem) in zip(bad, BAD_HEADERS, strict=True):
        (line,) = [line for line in lines if result.id in line]
        assert "ERROR" in line and TEN_GIB in line and problem in line and "Fix: send it with" in line
    assert "Traceback" not in text and "Unrecoverable" not in text


def envelope(broker, gpu_app) -> dict:
    """A message exactly as kombu stores it on a Redis list: sent to a queue nobody consumes, taken back."""
    gpu_app.app.send_task(CRUNCH, (0.1,), queue="parked", priority=0)  # priority 0: the bare list
    return json.loads(broker.rpop("parked"))


def variant(base: dict, **changes) -> str:
    message = json.loads(json.dumps(base))
    message["properties"]["delivery_tag"] = str(uuid.uuid4())
    message["properties"]["delivery_info"] = {"exchange": "", "routing_key": "cpu_intensive"}
    message["headers"]["id"] = str(uuid.uuid4())
    for key, value in changes.items():
        if value is None:
            del message[key]
        elif key == "headers" and isinstance(value, dict):
            message["headers"] = {k: v for k, v in {**message["headers"], **value}.items() if v is not None}
        else:
            message[key] = value
    return json.dumps(message)


def test_raw_malformed_messages_on_the_list_never_stop_the_worker(gpu_app, broker, processes, tmp_path):
    node = f"raw@{HOST}"
    proc, log = start_worker(processes, tmp_path, "cpu_intensive", node, TASKMESH_SIMULATE_GPUS="")
    base = envelope(broker, gpu_app)
    wait_for_workers(gpu_app.app, [node])
    pid = worker_pid(gpu_app.app, node)
    unreadable = [  # kombu cannot make a message of these: dropped with one line each
        "garbage{",
        "[1, 2]",
        variant(base, headers="oops"),
        variant(base, properties="oops"),
        variant(base, body="!!!not base64"),
    ]
    refused = [  # Celery can read these, taskmesh cannot run them: refused, dead-lettered, failed
        variant(base, body="!!!"),  # before: ended every restart too, restored from kombu's unacked hash
        variant(base, body=base64.b64encode(b"not json").decode()),
        variant(base, headers={"id": None}),
        variant(base, headers={"taskmesh": "cpu"}),
    ]
    for raw in unreadable + refused:
        broker.lpush("cpu_intensive", raw)
    refused_ids = [json.loads(raw)["headers"].get("id") for raw in refused]

    after = gpu_app.crunch.delay(0.1, label="after").get(timeout=60)
    assert after["label"] == "after"
    assert proc.poll() is None and worker_pid(gpu_app.app, node) == pid
    assert broker.llen("cpu_intensive") == 0
    deadline = time.monotonic() + 20
    while broker.hlen("unacked"):  # the last task is acknowledged just after its result is stored
        assert time.monotonic() < deadline, "a message stayed unacknowledged: it would come back"
        time.sleep(0.1)
    while len(dead_letters(broker)) < len(refused):
        assert time.monotonic() < deadline, f"dead letters: {dead_letters(broker)}"
        time.sleep(0.2)
    assert {entry["task_id"] for entry in dead_letters(broker)} == set(refused_ids)
    for task_id in filter(None, refused_ids):
        with pytest.raises(MessageRefused):
            gpu_app.app.AsyncResult(task_id).get(timeout=10)
    assert counters(gpu_app.app, node)["unreadable"] == len(unreadable)
    assert counters(gpu_app.app, node)["refused"] == len(refused)
    text = log.read_text()
    assert text.count("not a readable kombu message") == len(unreadable)
    assert "the message has no task id" in text and "its body cannot be read" in text
    assert "its body is bytes b'', not Celery's [args, kwargs, embed]" in text
    assert "Unrecoverable" not in text
