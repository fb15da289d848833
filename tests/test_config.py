"""The hardware/config file: formats that must load, and errors that name file, key and fix."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from taskmesh import ConfigError, create_app
from taskmesh.core.config import load_config
from taskmesh.hardware.inventory import detect
from taskmesh.hardware.simulated import SimulatedProvider
from taskmesh.run.workers import plan_workers

from .conftest import ROOT


def write(tmp_path, text, name="hw.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_the_original_design_format_loads_as_is():
    config = load_config(ROOT / "config" / "hardware" / "seed-example.yaml")
    assert (config.cpu_cores, config.cpu_threads, config.cpu_max_concurrent_tasks) == (24, 48, 8)
    assert (config.gpu_count, config.gpu_model, config.gpu_memory_mib) == (1, "NVIDIA GeForce RTX 4090", 24 * 1024)
    assert config.memory_total_mib == round(125.26 * 1024)
    group = config.task_groups["cpu_task"]
    assert (group.threads, group.memory_mib, group.max_instances, group.cpu_cores) == (4, 4096, 8, 2.0)


def test_the_shipped_default_loads_and_every_section_is_optional(tmp_path):
    assert load_config(ROOT / "config" / "hardware" / "default.yaml").queue("cpu_light").concurrency == 100
    assert load_config(write(tmp_path, "{}\n")).slots_per_gpu == 1


def test_selected_by_name_from_either_environment_variable(tmp_path, monkeypatch):
    (tmp_path / "lab.yaml").write_text("hardware: {gpu: {slots_per_gpu: 3}}\n")
    monkeypatch.setenv("TASKMESH_CONFIG_DIR", str(tmp_path))
    monkeypatch.setenv("HARDWARE_CONFIG", "lab")
    assert load_config().slots_per_gpu == 3
    monkeypatch.setenv("TASKMESH_HARDWARE", "nowhere")
    with pytest.raises(ConfigError, match="TASKMESH_HARDWARE: no hardware config named 'nowhere'"):
        load_config()


def test_environment_overrides_win_over_the_file(tmp_path, monkeypatch):
    path = write(tmp_path, "hardware: {gpu: {slots_per_gpu: 1}}\nqueues: {cpu_light: {concurrency: 10}}\n")
    monkeypatch.setenv("TASKMESH_GPU_SLOTS", "3")
    monkeypatch.setenv("TASKMESH_CPU_CONCURRENCY", "2")
    monkeypatch.setenv("TASKMESH_IO_CONCURRENCY", "50")
    config = load_config(path)
    assert config.slots_per_gpu == 3
    assert config.queue("cpu_intensive").concurrency == 2
    assert config.queue("cpu_light").concurrency == 50
    monkeypatch.setenv("TASKMESH_GPU_SLOTS", "many")
    with pytest.raises(ConfigError, match="TASKMESH_GPU_SLOTS: 'many' is not a whole number"):
        load_config(path)


def test_every_queue_threshold_has_an_environment_override_checked_like_the_file(tmp_path, monkeypatch):
    path = write(tmp_path, "queues: {gpu: {max_depth: 10, alert_age_s: 60}}\n")
    monkeypatch.setenv("TASKMESH_QUEUE_GPU_MAX_DEPTH", "500")
    monkeypatch.setenv("TASKMESH_QUEUE_CPU_INTENSIVE_FALLBACK_DEPTH", "20")
    monkeypatch.setenv("TASKMESH_QUEUE_MIXED_ALERT_AGE_S", "90")
    config = load_config(path)
    assert (config.queue("gpu").max_depth, config.queue("gpu").alert_age_s) == (500, 60)
    assert config.queue("cpu_intensive").fallback_depth == 20 and config.queue("mixed").alert_age_s == 90
    monkeypatch.setenv("TASKMESH_QUEUE_GPU_MAX_DEPTH", "-3")
    with pytest.raises(ConfigError, match="TASKMESH_QUEUE_GPU_MAX_DEPTH: -3 is not a whole number"):
        load_config(path)
    monkeypatch.setenv("TASKMESH_QUEUE_GPU_MAX_DEPTH", "500")
    monkeypatch.setenv("TASKMESH_QUEUE_GPU_MAX_DEPHT", "500")
    with pytest.raises(ConfigError, match="TASKMESH_QUEUE_GPU_MAX_DEPHT: unknown queue setting; did you mean "
                                          "TASKMESH_QUEUE_GPU_MAX_DEPTH"):
        load_config(path)


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    path = write(tmp_path, "hardware:\n  cpu:\n    cores: [4\n  gpu: {}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "line 4" in str(err.value)


def test_an_unknown_key_names_the_closest_valid_one(tmp_path):
    path = write(tmp_path, "hardware:\n  gpu:\n    slot_per_gpu: 2\n")
    expected = r"hw.yaml: hardware.gpu.slot_per_gpu: unknown key; did you mean 'slots_per_gpu'"
    with pytest.raises(ConfigError, match=expected):
        load_config(path)
    path = write(tmp_path, "queues:\n  cpu_intensiv:\n    max_depth: 5\n")
    with pytest.raises(ConfigError, match=r"queues.cpu_intensiv: unknown key; did you mean 'cpu_intensive'"):
        load_config(path)


def test_an_unknown_key_with_a_line_break_is_named_on_one_line(tmp_path):
    """Found by the hypothesis test: the key was printed raw, so the one-line error had two."""
    path = write(tmp_path, 'admission:\n  "\\n": 1\n')
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "admission.'\\n': unknown key" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hardware: {cpu: {cores: -2}}", r"hardware.cpu.cores: -2 is not a whole number >= 1"),
        ("queues: {gpu: {pool: fork}}", r"queues.gpu.pool: 'fork' is not a pool; use one of prefork"),
        ("default_profile: turbo", r"default_profile: unknown profile 'turbo'"),
        ("hardware: {gpu: {simulate: lots}}", r"hardware.gpu.simulate: .*'lots' is not a GPU spec"),
        ("tasks: {myapp.t: {vrm: 4GiB}}", r"tasks.myapp.t.vrm: unknown key; did you mean 'vram'"),
        ("hardware: [1, 2]", r"hardware: expected a mapping"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text + "\n"))


def test_per_task_overrides_win_and_are_validated_with_the_file_named(tmp_path):
    path = write(tmp_path, "tasks:\n  cfg.render: {vram: 8GiB}\n  cfg.bad: {vram: 6 GiBs}\n")
    app = create_app("cfg", hardware=str(path))

    @app.task(name="cfg.render", profile="gpu", vram="4GiB", shared=False)
    def render():
        return None

    assert render.requirement.vram_mib == 8192
    with pytest.raises(ConfigError, match=r"hw.yaml: tasks.cfg.bad: vram: '6 GiBs' has an unknown unit"):
        @app.task(name="cfg.bad", profile="gpu", shared=False)
        def bad():
            return None


@pytest.mark.parametrize("spec", ["garbage", "2x", "x24GiB", "0x24GiB", "2x24GiB,cc=high", "1x8GiB,color=red", ""])
def test_a_garbled_simulated_gpu_spec_is_refused(spec):
    with pytest.raises(ConfigError, match=r"TASKMESH_SIMULATE_GPUS: .*write it like '2x24GiB'|only cc="):
        SimulatedProvider(spec)


def test_simulated_gpus_have_distinct_stable_uuids():
    first = SimulatedProvider("1x80GiB,cc=9.0;1x24GiB,cc=8.9").snapshot()
    again = SimulatedProvider("1x80GiB,cc=9.0;1x24GiB,cc=8.9").snapshot()
    assert [g.uuid for g in first] == [g.uuid for g in again]
    assert len({g.uuid for g in first}) == 2
    assert [(g.memory_total_mib, g.compute_capability) for g in first] == [(81920, (9, 0)), (24576, (8, 9))]


def test_cpu_threads_are_never_oversubscribed_across_groups(tmp_path):
    path = write(tmp_path, "hardware: {cpu: {cores: 8, threads: 16}}\nqueues: {mixed: {concurrency: 2}}\n")
    app = create_app("budget", hardware=str(path))

    @app.task(name="budget.heavy", profile="cpu_intensive", cpu_threads=4, shared=False)
    def heavy():
        return None

    config = app.taskmesh_config
    specs = plan_workers(config, detect(config, SimulatedProvider("2x24GiB")), "all", [heavy])
    by_group = {s.group: s for s in specs}
    assert by_group["cpu"].concurrency == 3  # (16 threads - 2 mixed) // 4 threads per task
    assert dict(by_group["cpu"].env)["OMP_NUM_THREADS"] == "4"
    assert by_group["cpu"].concurrency * 4 + by_group["mixed"].concurrency <= 16
    assert [s.group for s in specs] == ["gpu0", "gpu1", "cpu", "io", "mixed"]


def test_doctor_prints_inventory_and_exits_nonzero_on_a_bad_config(tmp_path):
    env = {"TASKMESH_SIMULATE_GPUS": "1x80GiB,cc=9.0;1x24GiB,cc=8.9", "PATH": "/usr/bin:/bin"}
    good = subprocess.run([sys.executable, "-m", "taskmesh", "doctor"], env=env, cwd=tmp_path,
                          capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert "GPU 0 Simulated GPU 80GiB cc=9.0" in good.stdout and "GPU 1 Simulated GPU 24GiB cc=8.9" in good.stdout
    bad = write(tmp_path, "hardware:\n  gpu:\n    slot_per_gpu: 2\n")
    result = subprocess.run([sys.executable, "-m", "taskmesh", "--hardware", str(bad), "doctor"], env=env,
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2
    assert "hardware.gpu.slot_per_gpu: unknown key; did you mean 'slots_per_gpu'" in result.stderr
    garbage = subprocess.run([sys.executable, "-m", "taskmesh", "doctor"], cwd=tmp_path, capture_output=True,
                             text=True, env={**env, "TASKMESH_SIMULATE_GPUS": "garbage"})
    assert garbage.returncode == 2
    assert "TASKMESH_SIMULATE_GPUS: 'garbage' is not a GPU spec; write it like '2x24GiB'" in garbage.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("admission: {reservation_ttl_s: 0}", r"hw.yaml: admission.reservation_ttl_s: 0 is below 6 s \(3 worker "
                                              r"heartbeats of 2 s\).*use 15 \(the default\) or at least 6$"),
        ("admission: {reservation_ttl_s: 4}", r"hw.yaml: admission.reservation_ttl_s: 4 is below 6 s"),
        ("admission: {registry_memory_s: 0}", r"hw.yaml: admission.registry_memory_s: 0 is not a positive number "
                                              r"of seconds.*use 86400 \(a day, the default\)$"),
        ("admission: {registry_memory_s: 10}", r"hw.yaml: admission.registry_memory_s: 10 is shorter than "
                                               r"reservation_ttl_s \(15 s\).*; use 86400"),
        ("rebalance: {interval_s: 0.001}", r"hw.yaml: rebalance.interval_s: 0.001 is below 0.5 s.*use 5 \(the "
                                           r"default\) or at least 0.5$"),
    ],
)
def test_dangerous_timings_are_refused_naming_the_key_and_a_safe_value(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(write(tmp_path, text + "\n"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("env", "value", "message"),
    [
        ("TASKMESH_RESERVATION_TTL_S", "1", r"TASKMESH_RESERVATION_TTL_S: 1 is below 6 s.*; set "
                                            r"TASKMESH_RESERVATION_TTL_S to a valid value for admission"),
        ("TASKMESH_REBALANCE_INTERVAL_S", "0.001", r"TASKMESH_REBALANCE_INTERVAL_S: 0.001 is below 0.5 s"),
    ],
)
def test_dangerous_timings_from_the_environment_are_refused_too(tmp_path, monkeypatch, env, value, message):
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, "{}\n"))


def test_an_override_for_a_task_the_app_does_not_have_is_named_with_the_closest_task(tmp_path, caplog):
    path = write(tmp_path, "tasks:\n  cfg.rendr: {vram: 8GiB}\n  cfg.render: {vram: 6GiB}\n  other.app.job: {}\n")
    app = create_app("cfg", hardware=str(path))

    @app.task(name="cfg.render", profile="gpu", vram="4GiB", shared=False)
    def render():
        return None

    with caplog.at_level("WARNING", logger="taskmesh.app.celery_app"):
        app.finalize()
    warnings = [r.getMessage() for r in caplog.records if r.name == "taskmesh.app.celery_app"]
    assert warnings == [
        f"{path}: tasks.cfg.rendr: no task of this app has this name, so the override changes nothing; "
        "did you mean 'cfg.render'?",
        f"{path}: tasks.other.app.job: no task of this app has this name, so the override changes nothing; "
        "name a task this app registers (taskmesh doctor lists them)",
    ]
    assert render.requirement.vram_mib == 6144
