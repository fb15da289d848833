"""Tasks that fail for good go to the dead-letter store, and ``taskmesh dlq`` lists, requeues
and purges them; a task that kills its process every time is retried a bounded number of
times (Celery's ``task_retry_on_worker_lost``, on by default) instead of for ever."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from celery.exceptions import WorkerLostError

from taskmesh.state.keys import COUNTERS

from .conftest import ROOT, bind, wait_for_workers

APP = "tests.apps.poison_app"


@pytest.fixture
def poison(broker_url: str):
    from tests.apps import poison_app

    return bind(poison_app, broker_url)


def dlq(broker_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "taskmesh", "-A", APP, "dlq", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=60, env={**os.environ, "TASKMESH_BROKER_URL": broker_url})


def runs(broker, task_id: str) -> int:
    return [r.decode() for r in broker.lrange("test:poison-runs", 0, -1)].count(task_id)


def start_worker(processes, app) -> None:
    processes.celery_worker(APP, "-Q", "cpu_intensive", "-c", "1", "-n", "poison@%h")
    wait_for_workers(app, [f"poison@{os.uname().nodename}"])


@pytest.mark.slow
def test_a_task_that_fails_is_dead_lettered_then_requeued_with_its_id_and_purged(poison, broker, broker_url,
                                                                                 processes):
    start_worker(processes, poison.app)
    result = poison.fails_until_fixed.delay("ciao")
    with pytest.raises(RuntimeError, match="cannot handle 'ciao' yet"):
        result.get(timeout=60)
    listed = json.loads(dlq(broker_url, "list", "--json").stdout)
    assert [(e["id"], e["task"], e["args"], e["queue"]) for e in listed] == [
        (result.id, "tests.apps.poison_app.fails_until_fixed", ["ciao"], "cpu_intensive")]
    assert listed[0]["why"] == "RuntimeError: cannot handle 'ciao' yet"
    assert result.id in dlq(broker_url, "list").stdout
    assert int(broker.hget(COUNTERS, "dead_lettered")) == 1

    broker.set("test:poison-fixed", 1)  # the operator fixes the cause, then sends it again
    done = dlq(broker_url, "requeue", result.id)
    assert done.returncode == 0 and "requeued 1" in done.stdout, done.stderr
    deadline = time.monotonic() + 60
    while (meta := poison.app.backend.get_task_meta(result.id, cache=False))["status"] != "SUCCESS":
        assert time.monotonic() < deadline, meta  # the caller's id now carries the new outcome
        time.sleep(0.1)
    assert meta["result"] == "CIAO" and runs(broker, result.id) == 2
    assert json.loads(dlq(broker_url, "list", "--json").stdout) == []

    broker.delete("test:poison-fixed")
    second = poison.fails_until_fixed.delay("again")
    with pytest.raises(RuntimeError):
        second.get(timeout=60)
    assert dlq(broker_url, "purge", "--all").stdout.strip() == "purged 1"
    assert dlq(broker_url, "list").stdout.strip() == "dead letters: none"
    bad = dlq(broker_url, "purge")
    assert bad.returncode == 2 and "--all" in bad.stderr


@pytest.mark.slow
def test_a_task_that_kills_its_process_every_time_runs_a_bounded_number_of_times(poison, broker, broker_url,
                                                                                 processes):
    start_worker(processes, poison.app)
    result = poison.kills_its_process.delay()
    with pytest.raises(WorkerLostError):
        result.get(timeout=120)
    time.sleep(2.0)  # one more retry would have run by now (default_retry_delay=0)
    assert runs(broker, result.id) == 3  # the first run and max_retries=2 retries, then no more
    (entry,) = json.loads(dlq(broker_url, "list", "--json").stdout)
    assert entry["id"] == result.id and entry["why"].startswith("WorkerLostError") and entry["retries"] == 2
    wait_for_workers(poison.app, [f"poison@{os.uname().nodename}"])  # the worker itself is still there
