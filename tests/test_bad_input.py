"""The bad-input campaign, the cases no other test holds (RELIABILITY.md lists them all):
a user's mistake is one line naming the thing and the fix, never a traceback; a bad message
never stops the worker, its neighbours still run, and nothing queued is lost.

Message cases share one real worker on a Redis of this module's own; each sends its bad
input, then a neighbour task that must run, and checks that the worker kept its pid.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery.exceptions import NotRegistered
from kombu.exceptions import EncodeError

from benchmarks.harness import LocalRedis
from taskmesh.core.errors import MessageRefused
from taskmesh.state.dead_letters import dead_letters
from tests.apps import chaos_app
from tests.chaos.rig import Rig
from tests.test_bad_messages import worker_pid
from tests.test_first_hour import taskmesh, user_project

CHAOS = "tests.apps.chaos_app"


@pytest.fixture(scope="module")
def rig(tmp_path_factory) -> Iterator[Rig]:
    with LocalRedis() as server, Rig(server.url, tmp_path_factory.mktemp("bad-input")) as rig:
        rig.celery_worker("bad", "cpu_intensive", "-c", "2")
        rig.pid = worker_pid(rig.app.app, "bad@chaos")
        yield rig


def neighbour_runs_and_worker_lives(rig: Rig) -> None:
    assert chaos_app.measure.delay([1, 2]).get(timeout=60) == 6
    assert worker_pid(rig.app.app, "bad@chaos") == rig.pid
    assert "Unrecoverable" not in rig.log("bad")


def test_a_message_naming_a_task_nobody_has_fails_its_caller_naming_the_task(rig):
    result = rig.app.app.send_task("tests.apps.chaos_app.no_such_task", queue="cpu_intensive")
    with pytest.raises(NotRegistered, match="no_such_task"):
        result.get(timeout=60)
    neighbour_runs_and_worker_lives(rig)
    (line,) = [line for line in rig.log("bad").splitlines() if "no_such_task" in line]  # not Celery's 16 lines
    assert f"(id {result.id}), which this worker does not have" in line and "import the module" in line
    assert "KeyError" not in rig.log("bad")


def test_an_oversized_argument_runs_and_holds_up_no_neighbour(rig):
    assert chaos_app.measure.delay("x" * (16 << 20)).get(timeout=120) == (16 << 20) + 2  # 16 MiB of JSON
    neighbour_runs_and_worker_lives(rig)


@pytest.mark.parametrize("value", [object(), {1, 2}, len], ids=["object", "set", "function"])
def test_an_argument_json_cannot_carry_is_refused_at_send_and_nothing_is_queued(rig, value):
    before = rig.client.llen("cpu_intensive")
    with pytest.raises(EncodeError, match="not JSON serializable"):
        chaos_app.measure.delay(value)
    assert rig.client.llen("cpu_intensive") == before
    neighbour_runs_and_worker_lives(rig)


@pytest.mark.parametrize("kwargs, says", [({"nope": 1}, "unexpected keyword argument 'nope'"),
                                           ({}, "missing 1 required positional argument: 'value'")],
                         ids=["unknown-kwarg", "missing-arg"])
def test_arguments_that_do_not_fit_the_task_fail_that_task_only(rig, kwargs, says):
    result = rig.app.app.send_task(chaos_app.measure.name, kwargs=kwargs, queue="cpu_intensive")
    with pytest.raises(TypeError, match=says):
        result.get(timeout=60)
    neighbour_runs_and_worker_lives(rig)


def _envelope(rig: Rig, task_id: str, **headers) -> str:
    """A Celery protocol-2 message for ``measure([0])`` as kombu puts it on the list, *headers* merged."""
    rig.app.app.send_task(chaos_app.measure.name, args=([0],), queue="later", task_id=task_id)
    (key,) = [key for key in rig.client.scan_iter("later*") if rig.client.type(key) == b"list"]  # its priority list
    raw = json.loads(rig.client.rpop(key))
    raw["headers"].update(headers)
    return json.dumps(raw)


@pytest.mark.parametrize("headers, says", [
    ({"eta": "not a date"}, "its header 'eta' is str 'not a date', not an ISO 8601 date and time"),
    ({"expires": "soon"}, "its header 'expires' is str 'soon', not an ISO 8601 date and time"),
    ({"timelimit": ["a", "b"]}, "its header 'timelimit' is list ['a', 'b'], not Celery's [soft, hard] in seconds"),
    ({"retries": "many"}, "its header 'retries' is str 'many', not a count >= 0"),
], ids=["eta", "expires", "timelimit", "retries"])
def test_a_message_with_a_garbled_celery_header_is_refused_and_dead_lettered(rig, headers, says):
    """Before: a garbled timelimit ended the worker ("Unrecoverable error", restored, again at
    every restart), a garbled eta or expires was discarded with a traceback and no trace kept."""
    task_id = uuid.uuid4().hex
    rig.client.lpush("cpu_intensive", _envelope(rig, task_id, **headers))
    with pytest.raises(MessageRefused, match=re.escape(says)):
        rig.app.app.AsyncResult(task_id).get(timeout=60)
    assert task_id in {entry.get("task_id") or entry.get("id") for entry in dead_letters(rig.client)}
    (line,) = [line for line in rig.log("bad").splitlines() if task_id in line]
    assert says in line and "Fix:" in line
    neighbour_runs_and_worker_lives(rig)


@pytest.mark.parametrize("env, says", [
    ({"TASKMESH_GPU_SLOTS": "abc"}, "TASKMESH_GPU_SLOTS: 'abc' is not a whole number >= 1"),
    ({"TASKMESH_SIMULATE_GPUS": "lots"}, "TASKMESH_SIMULATE_GPUS: 'lots' is not a GPU spec; write it like"),
    ({"TASKMESH_CPU_CONCURRENCY": "-1"}, "TASKMESH_CPU_CONCURRENCY: -1 is not a whole number >= 1"),
    ({"TASKMESH_ON_INFEASIBLE": "maybe"}, "TASKMESH_ON_INFEASIBLE"),
    ({"TASKMESH_VISIBILITY_TIMEOUT_S": "-5"}, "TASKMESH_VISIBILITY_TIMEOUT_S"),
    ({"TASKMESH_QUEUE_GPU_MAX_DEPTH": "many"}, "TASKMESH_QUEUE_GPU_MAX_DEPTH"),
    ({"TASKMESH_HARDWARE": "/no/such/hardware.yaml"}, "/no/such/hardware.yaml"),
    ({"TASKMESH_BROKER_URL": "redsi://127.0.0.1:6379/0"}, "'redsi://127.0.0.1:6379/0' is not a Redis URL"),
    ({"TASKMESH_BROKER_URL": "redis://127.0.0.1:1/0"}, "cannot read the broker at redis://127.0.0.1:1/0"),
], ids=["gpu-slots", "simulate-gpus", "cpu-concurrency", "on-infeasible", "visibility-timeout", "max-depth",
        "hardware-file", "broker-scheme-typo", "broker-port-typo"])
def test_a_bad_environment_value_is_one_line_naming_it_and_the_command_exits(tmp_path, env, says):
    command = ("status",) if "TASKMESH_BROKER_URL" in env else ("worker", "--dry-run")
    done = taskmesh(Path(tmp_path), "-A", CHAOS, *command, env=env)
    assert done.returncode == (1 if "Connection refused" in done.stderr else 2), done  # 1: a broker that is down
    assert done.stderr.count("\n") == 1 and says in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("args, says", [
    (("worker", "--profile", "gpuu"), "Invalid value for '--profile': 'gpuu' is not one of 'gpu'"),
    (("worker", "--profile", "gpu", "--gpu-pool", "gevent"), "'gevent' is not one of 'prefork', 'threads', 'solo'"),
    (("worker", "--profile", "gpu"), "no GPUs found"),
], ids=["unknown-profile", "gpu-on-gevent", "gpu-without-gpus"])
def test_a_bad_worker_command_line_names_the_fix_and_exits_2(tmp_path, args, says):
    done = taskmesh(Path(tmp_path), "-A", CHAOS, *args, "--dry-run", env={"TASKMESH_SIMULATE_GPUS": ""})
    assert done.returncode == 2, done
    assert says in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("declaration, says", [
    ('profile="tpu"', "unknown profile 'tpu'"),
    ('profile="gpu", vram="lots"', "'lots'"),
    ('profile="cpu_intensive", vram="4GiB"', "cpu_intensive"),
], ids=["unknown-profile", "unreadable-vram", "vram-on-cpu"])
def test_a_task_declared_with_bad_requirements_is_one_line_naming_the_task_at_import(tmp_path, declaration, says):
    project = user_project(tmp_path, tasks=f"from taskmesh import create_app\napp = create_app('myapp')\n\n"
                                           f"@app.task({declaration})\ndef resize(path): ...\n")
    done = taskmesh(project, "-A", "myapp.tasks", "doctor")
    assert done.returncode == 2, done
    assert done.stderr.count("\n") == 1 and "resize" in done.stderr and says in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
