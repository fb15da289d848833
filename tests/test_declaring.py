"""Declaring what a task needs: sizes, profiles, priorities, and errors at import."""

from __future__ import annotations

import pytest

from taskmesh import Priority, Profile, Requirement, RequirementError, create_app
from taskmesh.core.sizes import SizeError, parse_mib


@pytest.mark.parametrize(
    ("text", "mib"),
    [("6GiB", 6144), ("512MiB", 512), ("6GB", 5723), ("512MB", 489), (6144, 6144), ("1.5GiB", 1536), ("2 gib", 2048)],
)
def test_sizes_are_read_in_mib(text, mib):
    assert parse_mib(text) == mib


@pytest.mark.parametrize("bad", ["6 GiBs", -1, 0, "", "GiB", "six GiB", True, None, "-3GiB"])
def test_garbled_sizes_say_how_to_write_one(bad):
    with pytest.raises(SizeError, match="write it like '6GiB'"):
        parse_mib(bad)


@pytest.mark.parametrize(
    ("spelling", "queue"),
    [("gpu", "gpu"), ("gpu_intensive", "gpu"), ("cpu_intensive", "cpu_intensive"), ("cpu_light", "cpu_light"),
     ("io", "cpu_light"), ("io_bound", "cpu_light"), ("mixed", "mixed"), (Profile.MIXED, "mixed")],
)
def test_profile_spellings_map_to_queues(spelling, queue):
    assert Profile.parse(spelling).queue == queue


def test_member_names_match_the_design():
    assert [p.name for p in Profile] == ["GPU_INTENSIVE", "CPU_INTENSIVE", "IO_BOUND", "MIXED"]
    assert [p.queue for p in Profile] == ["gpu", "cpu_intensive", "cpu_light", "mixed"]


@pytest.fixture
def app():
    return create_app("declaring")


def declare(app, name="myapp.tasks.transcribe", **options):
    @app.task(name=name, shared=False, **options)
    def transcribe(path):
        return path

    return transcribe


def test_a_full_gpu_declaration_becomes_a_frozen_requirement(app):
    task = declare(app, profile="gpu", vram="6GiB", min_compute_capability="8.0", model="whisper-small",
                   cpu_threads=2, memory="2GiB", exclusive=True, fallback="cpu")
    req = task.requirement
    assert req == Requirement(profile=Profile.GPU_INTENSIVE, vram_mib=6144, min_compute_capability=(8, 0),
                              cpu_threads=2, memory_mib=2048, gpus=1, exclusive=True,
                              fallback=Profile.CPU_INTENSIVE, model="whisper-small")
    with pytest.raises(AttributeError):
        req.vram_mib = 1  # frozen
    assert Requirement.from_header(req.to_header()) == req


def test_a_task_without_a_profile_takes_the_default(app):
    assert declare(app).requirement.profile is Profile.IO_BOUND


def test_the_default_profile_is_configurable(monkeypatch):
    monkeypatch.setenv("TASKMESH_DEFAULT_PROFILE", "cpu_intensive")
    app = create_app("declaring-default")
    assert declare(app).requirement.profile is Profile.CPU_INTENSIVE
    assert app.conf.task_default_queue == "cpu_intensive"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"profile": "gpu_big"}, r"task 'myapp.tasks.transcribe': unknown profile 'gpu_big'; use one of .*"),
        ({"profile": "gpu", "vram": "6 GiBs"}, r"task 'myapp.tasks.transcribe': vram: '6 GiBs' has an unknown unit"),
        ({"profile": "gpu", "vram": -1}, r"task 'myapp.tasks.transcribe': vram: -1 is not a positive size"),
        ({"profile": "cpu_light", "vram": "6GiB"},
         r"task 'myapp.tasks.transcribe': vram is set but profile 'cpu_light' runs on no GPU; use profile='gpu'"),
        ({"profile": "mixed", "fallback": "quantum"},
         r"task 'myapp.tasks.transcribe': fallback: unknown profile 'quantum'"),
        ({"profile": "gpu", "min_compute_capability": "eight"}, r"write it like '8.0'"),
        ({"profile": "cpu_intensive", "cpu_threads": 0}, r"cpu_threads 0 must be a whole number >= 1"),
        ({"priority": 11}, r"priority 11 is not valid; use taskmesh.Priority"),
        ({"urgency": 7}, r"urgency 7 is not valid; use a whole number 1-5"),
        ({"profile": "gpu", "fallback": "gpu_intensive"}, r"is the task's own profile"),
        ({"profile": "gpu", "gpus": 0}, r"gpus=0 on profile 'gpu'; a GPU task needs gpus >= 1, or use a CPU profile"),
        ({"profile": "cpu", "cpu_cores": 10**400}, r"cpu_cores 1000.* must be a positive number"),
    ],
)
def test_bad_declarations_fail_at_import_naming_the_task(app, options, message):
    with pytest.raises(RequirementError, match=message):
        declare(app, **options)


def test_priorities_follow_redis_steps_and_the_one_to_five_scale(app):
    assert [int(p) for p in Priority] == [0, 3, 6, 9]
    assert Priority.parse("critical") == 0 and Priority.parse(Priority.LOW) == 9 and Priority.parse(4) == 4
    assert [Priority.from_urgency(n) for n in (5, 4, 3, 2, 1)] == [
        Priority.CRITICAL, Priority.HIGH, Priority.NORMAL, Priority.LOW, Priority.LOW]
    assert declare(app, "t.urgent", urgency=5).requirement.priority == 0
    assert declare(app, "t.high", priority=Priority.HIGH).requirement.priority == 3
    assert declare(app, "t.low", priority="low").requirement.priority == 9
    assert app.conf.task_default_priority == Priority.NORMAL


def test_visibility_timeout_covers_the_longest_time_limit(caplog):
    app = create_app("vt")

    @app.task(profile="gpu", time_limit=7200, shared=False)
    def long_job():
        return None

    @app.task(profile="cpu_intensive", shared=False)
    def unbounded():
        return None

    with caplog.at_level("WARNING"):
        app.finalize()
    assert app.conf.broker_transport_options["visibility_timeout"] == 2 * 7200 + 300
    assert app.conf.result_backend_transport_options["visibility_timeout"] == 2 * 7200 + 300
    assert any("without time_limit" in r.message and "unbounded" in r.message for r in caplog.records)


def test_an_explicit_short_visibility_timeout_is_kept_with_a_warning(caplog):
    app = create_app("vt2", broker_transport_options={"visibility_timeout": 600})

    @app.task(profile="gpu", time_limit=3600, shared=False)
    def long_job():
        return None

    with caplog.at_level("WARNING"):
        app.finalize()
    assert app.conf.broker_transport_options["visibility_timeout"] == 600
    assert any("long_job" in r.message and "delivered again" in r.message for r in caplog.records)
