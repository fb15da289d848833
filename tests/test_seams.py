"""Plain Celery at every seam: a task's requirement is found however it is declared
(``@shared_task``, a custom ``base=``) and however it is sent (``send_task`` by name, a
producer that stamps nothing); user routes and beat entries merge with taskmesh's; a plain
``celery worker`` says what it is missing; canvas sends are checked at the caller and never
fail a finished parent; hand-named workers count for the rebalancer; registry records from
another version are read."""

from __future__ import annotations

import json
import logging
import math
import socket
import sys
import time

import pytest
from celery import Celery, chain, chord, group, shared_task

from taskmesh import Priority, QueueFull, create_app
from taskmesh.app.rebalance import groups_seen, rebalance, worker_view
from taskmesh.core.config import load_config
from taskmesh.core.rebalance_policy import QueueView, alerts, assist_moves, pool_sizes, scaling_hints
from taskmesh.core.records import GpuRecord, WorkerRecord
from taskmesh.hardware.providers import provider_from_env
from taskmesh.hardware.simulated import SimulatedProvider
from taskmesh.state.keys import WORKERS
from taskmesh.state.registry import Registry

from .conftest import queue_depth, wait_for_workers

HOST = socket.gethostname()
SEAMS = "tests.apps.seams_app"


def messages(broker, queue: str) -> list[dict]:
    keys = [queue] + [f"{queue}\x06\x16{p}" for p in (3, 6, 9)]
    return [json.loads(raw) for key in keys for raw in broker.lrange(key, 0, -1)]


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.fixture
def seams(broker_url):
    from tests.apps import seams_app

    seams_app.app.conf.broker_url = broker_url
    seams_app.app.conf.result_backend = broker_url
    seams_app.app._submit_policy = None
    return seams_app


def producer(tmp_path, broker_url: str, yaml: str = "", **celery_conf):
    path = tmp_path / "producer.yaml"
    path.write_text(yaml or "{}\n")
    return create_app("producer", broker=broker_url, hardware=str(path), **celery_conf)


# --- declaring: @shared_task and custom bases ---------------------------------------------


def test_shared_task_gets_its_profile_queue_header_and_the_app_is_current(broker_url, broker):
    app = create_app("django-style", broker=broker_url)  # as a project's celery.py does

    @shared_task(name="seams.shared.transcribe", profile="gpu", vram="6GiB", priority="high")
    def transcribe():
        return None

    transcribe.delay()  # the proxy resolves to the current app: the one create_app made
    (message,) = messages(broker, "gpu")
    assert message["headers"]["taskmesh"] == {"profile": "gpu", "vram_mib": 6144, "gpus": 1, "priority": 3}
    assert message["properties"]["priority"] == Priority.HIGH
    assert app.tasks["seams.shared.transcribe"].requirement.vram_mib == 6144
    assert queue_depth(broker, "cpu_light") == 0


def test_a_custom_base_keeps_its_behaviour_and_is_routed_and_stamped(seams, broker):
    assert isinstance(seams.custom_gpu, seams.Audited)
    seams.custom_gpu.delay()
    (message,) = messages(broker, "gpu")
    assert message["headers"]["taskmesh"] == {"profile": "gpu", "vram_mib": 10240, "gpus": 1}


def test_shared_tasks_and_custom_bases_are_admitted_on_a_gpu(seams, broker, processes):
    processes.celery_worker(SEAMS, "-Q", "gpu", "-c", "1", "-n", f"seams-gpu@{HOST}",
                            env={"TASKMESH_SIMULATE_GPUS": "1x24GiB"})
    wait_for_workers(seams.app, [f"seams-gpu@{HOST}"])
    gpu = SimulatedProvider("1x24GiB").snapshot()[0].uuid
    shared = seams.app.tasks["tests.apps.seams_app.shared_gpu"].delay().get(timeout=60)
    custom = seams.custom_gpu.delay().get(timeout=60)
    assert shared["gpu_uuids"] == [gpu] and shared["queue"] == "gpu"
    assert custom["gpu_uuids"] == [gpu] and custom["base"] == "by Audited"


# --- sending: send_task, and producers that stamp nothing ----------------------------------


def test_send_task_by_name_is_routed_stamped_and_prioritised_like_apply_async(broker_url, broker):
    app = create_app("by-name", broker=broker_url)

    @app.task(name="seams.byname.transcribe", profile="gpu", vram="6GiB", shared=False)
    def transcribe():
        return None

    app.send_task("seams.byname.transcribe")  # before anything finalised the app
    app.send_task("seams.byname.transcribe", priority="low")
    app.send_task("somewhere.else.unknown")
    gpu = messages(broker, "gpu")
    assert [m["headers"]["taskmesh"]["vram_mib"] for m in gpu] == [6144, 6144]
    assert broker.llen("gpu\x06\x166") == 1 and broker.llen("gpu\x06\x169") == 1
    (unknown,) = messages(broker, "cpu_light")
    assert unknown["properties"]["priority"] == Priority.NORMAL  # not 0, ahead of every NORMAL task
    assert "taskmesh" not in unknown["headers"]  # not known here: the worker that has it says what it needs


def test_a_worker_admits_a_message_without_header_by_its_registered_task(gpu_app, broker, broker_url, processes):
    processes.taskmesh("-A", "tests.apps.gpu_app", "worker", "--profile", "gpu", "--loglevel", "WARNING",
                       env={"TASKMESH_SIMULATE_GPUS": "1x24GiB"})
    wait_for_workers(gpu_app.app, [f"gpu0@{HOST}"])
    plain = Celery("plain-producer", broker=broker_url, backend=broker_url, set_as_current=False)
    ran = plain.send_task("tests.apps.gpu_app.ten_gib", (0.1,), queue="gpu").get(timeout=60)
    assert ran["gpu_uuids"] == [SimulatedProvider("1x24GiB").snapshot()[0].uuid]
    plain.send_task("tests.apps.gpu_app.forty_gib", queue="gpu")  # can never fit 24 GiB: handed on
    wait_until(lambda: queue_depth(broker, "gpu.40960MiB") == 1, 30, "the 40 GiB task was not handed on")
    assert broker.llen("test:runs") == 1  # only the 10 GiB one ran


# --- routes and beat ------------------------------------------------------------------------


def test_user_routes_come_first_and_profile_routing_still_applies(broker_url, broker, caplog):
    app = create_app("routes", broker=broker_url, task_routes={"seams.routes.report": {"queue": "cpu_intensive"}})

    @app.task(name="seams.routes.transcribe", profile="gpu", vram="6GiB", shared=False)
    def transcribe():
        return None

    @app.task(name="seams.routes.report", profile="io", shared=False)
    def report():
        return None

    @app.task(name="seams.routes.embed", profile="gpu", vram="2GiB", shared=False)
    def embed():
        return None

    with caplog.at_level(logging.WARNING):
        transcribe.delay()
        report.delay()
        app.conf.update(task_routes={"seams.routes.embed": {"queue": "mixed"}})  # Celery rebuilds the table
        embed.delay()
        transcribe.delay()
        report.delay()
    assert [m["headers"]["task"] for m in messages(broker, "gpu")] == ["seams.routes.transcribe"] * 2
    assert [m["headers"]["task"] for m in messages(broker, "cpu_intensive")] == ["seams.routes.report"]
    assert [m["headers"]["task"] for m in messages(broker, "cpu_light")] == ["seams.routes.report"]
    assert [m["headers"]["task"] for m in messages(broker, "mixed")] == ["seams.routes.embed"]
    unchecked = [r.message for r in caplog.records if "queued on" in r.message]
    assert any("seams.routes.embed" in m and "queued on mixed" in m for m in unchecked), unchecked
    assert not any("seams.routes.embed" in m and "queued on gpu" in m for m in unchecked), unchecked


def test_task_routes_set_after_create_app_are_merged_too(broker_url, broker):
    app = create_app("routes-later", broker=broker_url)
    app.conf.task_routes = {"seams.later.report": {"queue": "cpu_intensive"}}

    @app.task(name="seams.later.transcribe", profile="gpu", vram="6GiB", shared=False)
    def transcribe():
        return None

    @app.task(name="seams.later.report", profile="io", shared=False)
    def report():
        return None

    transcribe.delay()
    report.delay()
    assert [m["headers"]["task"] for m in messages(broker, "gpu")] == ["seams.later.transcribe"]
    assert [m["headers"]["task"] for m in messages(broker, "cpu_intensive")] == ["seams.later.report"]


def test_a_beat_schedule_set_after_create_app_keeps_the_rebalancer(seams, broker, processes, tmp_path):
    processes.start([sys.executable, "-m", "celery", "-A", SEAMS, "beat", "-s", str(tmp_path / "schedule"),
                     "--loglevel", "WARNING"], env={"TASKMESH_REBALANCE_INTERVAL_S": "1"})

    def sent() -> set[str]:
        return {m["headers"]["task"] for m in messages(broker, "cpu_light")}

    wait_until(lambda: {"tests.apps.seams_app.tick", "taskmesh.rebalance"} <= sent(), 60,
               "beat did not send both the user's entry and the rebalancer")


# --- a plain `celery worker` --------------------------------------------------------------


@pytest.mark.slow
def test_a_plain_celery_worker_warns_once_about_what_it_is_missing(seams, processes, tmp_path):
    log = tmp_path / "plain.log"
    with log.open("w") as out:
        processes.start([sys.executable, "-m", "celery", "-A", SEAMS, "worker", "-c", "1", "-n", f"plain@{HOST}",
                         "--loglevel", "WARNING"], env={"TASKMESH_SIMULATE_GPUS": ""}, stderr=out, stdout=out)
        processes.start([sys.executable, "-m", "celery", "-A", SEAMS, "worker", "-c", "1", "-Q", "cpu_intensive",
                         "-n", f"typed@{HOST}", "--loglevel", "WARNING"], env={"TASKMESH_SIMULATE_GPUS": ""},
                        stderr=(tmp_path / "typed.log").open("w"))
        wait_for_workers(seams.app, [f"plain@{HOST}", f"typed@{HOST}"])
    lines = [line for line in log.read_text().splitlines() if "taskmesh:" in line and "consumes" in line]
    assert len(lines) == 1, log.read_text()
    assert "cpu_light" in lines[0] and "prefork" in lines[0] and "gevent" in lines[0]
    assert f"taskmesh -A {SEAMS} worker --profile all" in lines[0] and "-Q cpu_light -P gevent" in lines[0]
    if not provider_from_env().snapshot():
        assert "no GPU" in lines[0] and "gpu" in lines[0]
    assert "consumes" not in (tmp_path / "typed.log").read_text()  # a typed worker has nothing missing


# --- canvas ---------------------------------------------------------------------------------


def canvas_app(tmp_path, broker_url, yaml):
    app = producer(tmp_path, broker_url, yaml)

    @app.task(name="seams.canvas.first", profile="cpu_intensive", shared=False)
    def first(label=None):
        return label

    @app.task(name="seams.canvas.later", profile="io", shared=False)
    def later(label=None):
        return label

    return app, first, later


def test_a_chain_or_chord_is_checked_whole_before_anything_is_sent(tmp_path, broker_url, broker):
    app, first, later = canvas_app(tmp_path, broker_url, "queues:\n  cpu_light: {max_depth: 1}\n")
    later.delay("already waiting")
    with pytest.raises(QueueFull, match="cpu_light"):
        chain(first.s(1), later.si(2)).apply_async()
    with pytest.raises(QueueFull, match="cpu_light"):
        first.apply_async((1,), link=later.si(2))
    with pytest.raises(QueueFull, match="cpu_light"):
        chord([first.si(1), first.si(2)], later.si(3)).apply_async()
    assert queue_depth(broker, "cpu_intensive") == 0 and queue_depth(broker, "cpu_light") == 1


def test_a_group_is_sent_whole_or_not_at_all(tmp_path, broker_url, broker, caplog):
    app, first, _ = canvas_app(tmp_path, broker_url, "queues:\n  cpu_intensive: {max_depth: 3}\n")
    first.delay(0)
    first.delay(1)
    with caplog.at_level(logging.WARNING):
        group(first.si(i) for i in range(3)).apply_async()  # room for the first: the group is admitted
    assert queue_depth(broker, "cpu_intensive") == 5
    assert any("group" in r.message and "max_depth" in r.message for r in caplog.records)
    with pytest.raises(QueueFull):
        group(first.si(i) for i in range(3)).apply_async()  # full at the first: nothing sent
    assert queue_depth(broker, "cpu_intensive") == 5


def test_a_full_queue_when_a_chain_step_is_dispatched_does_not_fail_its_finished_parent(seams, broker, processes,
                                                                                          tmp_path):
    log = tmp_path / "worker.log"
    processes.start([sys.executable, "-m", "celery", "-A", SEAMS, "worker", "-Q", "cpu_intensive", "-c", "1",
                     "-n", f"chain@{HOST}", "--loglevel", "WARNING"],
                    env={"TASKMESH_QUEUE_CPU_LIGHT_MAX_DEPTH": "1"}, stderr=log.open("w"))
    seams.tick.delay()  # cpu_light is full for the worker (max_depth 1), not for this producer
    result = chain(seams.step.s(0.2, "first"), seams.tick.si()).apply_async()
    parent = result.parent
    assert parent.get(timeout=60) == "first" and parent.state == "SUCCESS"
    wait_until(lambda: queue_depth(broker, "cpu_light") == 2, 30, "the next step was not sent")
    body = chord([seams.step.si(0.1, "header")], seams.tick.si()).apply_async()
    assert body.parent.get(timeout=60) == ["header"]
    wait_until(lambda: queue_depth(broker, "cpu_light") == 3, 30, "the chord's body was not sent")
    assert body.state == "PENDING"  # waiting to run, not failed with a ChordError
    assert "sent anyway" in log.read_text()


def test_a_retry_is_sent_even_when_its_queue_is_full(seams, processes):
    retried = seams.retry_once.delay()
    seams.step.delay(1.0, "waiting")  # waits while the worker (max_depth 1 for it) sends the retry
    processes.start([sys.executable, "-m", "celery", "-A", SEAMS, "worker", "-Q", "cpu_intensive", "-c", "1",
                     "-n", f"retry@{HOST}", "--loglevel", "WARNING"],
                    env={"TASKMESH_QUEUE_CPU_INTENSIVE_MAX_DEPTH": "1"})
    assert retried.get(timeout=60) == 1  # refused, Celery would reject the task and lose it


# --- hand-named workers ---------------------------------------------------------------------


def record(node: str, queues: tuple[str, ...], threads: int = 8, gpus: tuple[GpuRecord, ...] = ()) -> WorkerRecord:
    return WorkerRecord(node=node, incarnation="i", host="h", queues=queues, gpus=gpus, cpu_threads=threads,
                        memory_total_mib=16384)


def state(pool: str = "prefork", size: int = 1) -> dict:
    return {"pool": {"implementation": pool, "size": size}, "threads_per_task": 1}


def view(name: str, waiting: int) -> QueueView:
    return QueueView(name=name, waiting=waiting, in_flight=0, oldest_age_s=None, mean_runtime_s=1.0,
                     consumers=1, capacity=1)


def test_hand_named_workers_are_grouped_by_the_queues_they_consume():
    config = load_config(None)
    alice = worker_view(record("alice@h", ("cpu_intensive",)), state(size=1))
    blender = worker_view(record("blender@h", ("mixed",)), state(size=1))
    queues = {"cpu_intensive": view("cpu_intensive", 200), "mixed": view("mixed", 0), "gpu": view("gpu", 0),
              "cpu_light": view("cpu_light", 0)}
    grows = [d for d in pool_sizes(queues, [alice], config) if d.action == "grow"]
    assert [d.target for d in grows] == ["alice@h"]
    assert [d.target for d in assist_moves(queues, [blender], config)] == ["blender@h"]
    big = worker_view(record("alice@h", ("cpu_intensive",)), state(size=4))
    hints = scaling_hints(queues, [big], config)
    assert hints["cpu"] == math.ceil(200 / (config.rebalance.target_drain_s * 4))
    gone = record("celery@h2", ("cpu_intensive", "cpu_light", "gpu", "mixed"))
    down = alerts(queues, [alice], config, groups_seen([gone, record("alice@h", ("cpu_intensive",))]))
    assert [d.target for d in down if d.kind == "group_down"] == [f"group_down:{worker_view(gone, {}).group}"]
    assert worker_view(gone, {}).group != "celery"


def test_the_rebalancer_grows_a_hand_named_cpu_worker(gpu_app, broker, processes, tmp_path):
    config = tmp_path / "hw.yaml"
    config.write_text("hardware:\n  cpu: {cores: 4, threads: 4}\n")
    processes.celery_worker("tests.apps.gpu_app", "-Q", "cpu_intensive", "-c", "1", "-n", f"alice@{HOST}",
                            env={"TASKMESH_HARDWARE": str(config)})
    wait_for_workers(gpu_app.app, [f"alice@{HOST}"])
    wait_until(lambda: f"alice@{HOST}" in Registry(broker).states(), 20, "alice never announced its state")
    [gpu_app.crunch.delay(0.5, label=i) for i in range(40)]
    run = rebalance(gpu_app.app)
    assert any(d["action"] == "grow" and d["target"] == f"alice@{HOST}" for d in run["decisions"]), run


# --- records from another version ----------------------------------------------------------


def test_registry_records_with_unknown_or_missing_optional_fields_are_read(gpu_app, broker):
    raw = {"node": "gpu0@newer", "incarnation": "x", "host": "newer", "queues": ["gpu"], "cpu_threads": 8,
           "memory_total_mib": 16384, "last_seen": time.time(), "warm_models": ["whisper"],
           "gpus": [{"uuid": "GPU-1", "index": 0, "name": "H100", "memory_total_mib": 81920,
                     "compute_capability": [9, 0], "healthy": True, "temperature": 40}]}
    older = {k: v for k, v in raw.items() if k not in ("last_seen", "gpus")}
    older["node"], older["last_seen"] = "cpu@older", time.time()
    broker.hset(WORKERS, "gpu0@newer#x", json.dumps(raw))
    broker.hset(WORKERS, "cpu@older#y", json.dumps(older))
    records = {r.node: r for r in Registry(broker).workers()}
    assert records["gpu0@newer"].gpus[0].memory_total_mib == 81920 and records["cpu@older"].gpus == ()
    assert WorkerRecord.from_json(json.dumps({**raw, "last_seen": 5})).last_seen == 5
    gpu_app.forty_gib.delay()  # the producer reads the registry: 80 GiB seen, so 40 GiB is feasible
    assert queue_depth(broker, "gpu") == 1


def test_a_chain_of_groups_whose_chord_header_is_one_group_is_sent(broker_url, broker):
    """Celery turns ``chain(a, group(...), group(...), b)`` into chords whose header is a group
    signature, not a list; the caller's canvas check must walk it (Celery's own
    test_chain_of_two_groups_as_tuple_holds_each_task_once broke on it)."""
    app = create_app("seams-chord-header", broker=broker_url)

    @app.task(profile="cpu")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(profile="cpu")
    def tsum(values: list[int]) -> int:
        return sum(values)

    chain(add.si(1, 0), group(add.s(1), add.s(2)), group(tsum.s(), tsum.s()), tsum.s(), add.s(1)).apply_async()
    assert queue_depth(broker, "cpu_intensive") == 1  # the first step is sent; the rest travels with it
