"""The Prometheus exporter against a real Redis, real workers and a real ``taskmesh exporter``
process, scraped over HTTP the way Prometheus scrapes it; and the shipped dashboard and
alert rules checked against what it exports."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from taskmesh import QueueFull, create_app
from taskmesh.hardware.simulated import SimulatedProvider, SimulationControl
from taskmesh.observe.batch_metrics import BATCH_METRICS
from taskmesh.observe.metrics import (
    ALERTS,
    EVENT_FED,
    KNOWN_COUNTERS,
    METRICS,
    MODEL_SERIES,
    REBALANCE_RUNS,
    TELEMETRY,
)
from taskmesh.run.stack import free_port

from .conftest import ROOT, wait_for_workers

HOST = socket.gethostname()
APP = "tests.apps.gpu_app"
GIB = 1024
DASHBOARD = ROOT / "compose" / "grafana" / "taskmesh-dashboard.json"
ALERT_RULES = ROOT / "compose" / "prometheus" / "alerts.yml"
PROMETHEUS_CONFIG = ROOT / "compose" / "prometheus" / "prometheus.yml"


class Scrape:
    """One scrape of ``/metrics``, parsed with prometheus_client's own parser."""

    def __init__(self, text: str) -> None:
        self.families = list(text_string_to_metric_families(text))
        self.samples = [s for f in self.families for s in f.samples]

    def value(self, metric: str, /, **labels: str) -> float | None:
        """The value of the one sample named *metric* whose labels include *labels*; None if absent."""
        found = [s.value for s in self.samples if s.name == metric and labels.items() <= s.labels.items()]
        assert len(found) <= 1, f"{len(found)} samples of {metric} {labels}"
        return found[0] if found else None

    def labels(self, name: str) -> list[dict[str, str]]:
        return [s.labels for s in self.samples if s.name == name]


def start_exporter(processes, *, env: dict[str, str] | None = None) -> str:
    port = free_port()
    processes.taskmesh("-A", APP, "exporter", "--port", str(port), env=env)
    url = f"http://127.0.0.1:{port}/metrics"
    until(lambda: _get(url) is not None, "the exporter never answered", timeout=30)
    return url


def _get(url: str) -> str | None:
    try:
        response = requests.get(url, timeout=5)
    except requests.ConnectionError:
        return None
    return response.text if response.status_code == 200 else None


def scrape(url: str) -> Scrape:
    text = _get(url)
    assert text is not None, f"{url} did not answer"
    return Scrape(text)


def until(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Poll *check* until it returns something truthy; fail naming *what* otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def scrape_until(url: str, check: Callable[[Scrape], bool], what: str, timeout: float = 30.0) -> Scrape:
    return until(lambda: (lambda s: s if check(s) else None)(scrape(url)), what, timeout)


def start_gpu_worker(processes, app, **env: str) -> str:
    processes.taskmesh("-A", APP, "worker", "--profile", "gpu", "--loglevel", "WARNING",
                       env={"TASKMESH_SIMULATE_GPUS": "1x24GiB", **env})
    node = f"gpu0@{HOST}"
    wait_for_workers(app, [node])
    return node


def test_queue_waiting_counts_every_priority_sub_list(gpu_app, broker, processes):
    url = start_exporter(processes)
    for priority in (0, 0, 0, 3, 3, 9, 9):
        gpu_app.crunch.apply_async((0.1,), priority=priority)
    s = scrape(url)
    assert s.value("taskmesh_queue_waiting", queue="cpu_intensive") == 7
    assert broker.llen("cpu_intensive") == 3  # what an exporter running LLEN would report
    assert [s.value("taskmesh_queue_waiting_by_priority", queue="cpu_intensive", priority=str(p))
            for p in (0, 3, 6, 9)] == [3, 2, 0, 2]
    assert s.value("taskmesh_queue_in_flight", queue="cpu_intensive") == 0
    assert s.value("taskmesh_queue_oldest_age_seconds", queue="cpu_intensive") >= 0
    assert s.value("taskmesh_queue_consumers", queue="cpu_intensive") == 0
    assert s.value("taskmesh_queue_waiting", queue="gpu") == 0
    assert s.value("taskmesh_queue_oldest_age_seconds", queue="gpu") == 0  # nothing waits: 0, not absent
    assert s.value("taskmesh_broker_up") == 1 and s.labels("taskmesh_worker_up") == []


@pytest.mark.slow
def test_a_running_10gib_task_shows_as_reserved_on_a_dcgm_style_gpu_series(gpu_app, broker, processes):
    url = start_exporter(processes)
    node = start_gpu_worker(processes, gpu_app.app)
    (gpu,) = SimulatedProvider("1x24GiB").snapshot()
    labels = {"gpu": "0", "UUID": gpu.uuid, "modelName": gpu.name, "Hostname": HOST}
    result = gpu_app.ten_gib.delay(5)
    # the reservation is the ledger's, written as the task is admitted; the running count is the
    # worker's announced state, a beat later: wait for both
    s = scrape_until(url, lambda s: s.value("taskmesh_gpu_memory_reserved_mib", **labels) == 10 * GIB
                     and s.value("taskmesh_gpu_running_tasks", **labels) == 1,
                     "the 10 GiB reservation and its running task never showed")
    assert not result.ready()  # seen while it runs
    assert s.value("DCGM_FI_DEV_FB_TOTAL", **labels) == 24 * GIB
    assert s.value("DCGM_FI_DEV_FB_FREE", **labels) == 24 * GIB  # a simulated task uses no real memory
    assert s.value("taskmesh_gpu_running_tasks", **labels) == 1
    assert s.value("taskmesh_gpu_healthy", **labels) == 1
    assert s.labels("DCGM_FI_DEV_GPU_TEMP") == []  # simulated: no telemetry, so no sample rather than a 0
    assert s.value("taskmesh_queue_in_flight", queue="gpu") == 1
    assert s.value("taskmesh_queue_consumers", queue="gpu") == 1
    assert s.value("taskmesh_worker_up", group="gpu0", node=node) == 1
    result.get(timeout=60)
    scrape_until(url, lambda s: s.value("taskmesh_gpu_memory_reserved_mib", **labels) == 0,
                 "the reservation was not released")
    SimulationControl(broker).fail(0)
    s = scrape_until(url, lambda s: s.value("taskmesh_gpu_healthy", **labels) == 0, "the failed GPU stayed healthy")
    assert s.value("taskmesh_worker_paused", node=node) == 1


@pytest.mark.slow
def test_a_dead_workers_gpu_is_not_exported_as_current(gpu_app, processes):
    short = {"TASKMESH_RESERVATION_TTL_S": "6"}  # the shortest alive window allowed: its state counts for 18 s
    url = start_exporter(processes, env=short)
    node = f"gpu0@{HOST}"  # a bare celery worker: no supervisor to restart it
    worker = processes.celery_worker(APP, "-Q", "gpu", "-c", "1", "-n", node,
                                     env={"TASKMESH_SIMULATE_GPUS": "1x24GiB", **short})
    wait_for_workers(gpu_app.app, [node])
    scrape_until(url, lambda s: s.value("DCGM_FI_DEV_FB_TOTAL") == 24 * GIB, "the GPU never showed")
    worker.send_signal(signal.SIGKILL)
    s = scrape_until(url, lambda s: s.labels("DCGM_FI_DEV_FB_TOTAL") == [], "the dead worker's GPU stayed", 40)
    assert s.value("taskmesh_worker_up", group="gpu0", node=node) == 0
    assert s.value("taskmesh_queue_consumers", queue="gpu") == 0


def test_fleet_counters_alerts_and_rebalancer_runs_from_redis(tmp_path, broker_url, broker, gpu_app, processes):
    url = start_exporter(processes)
    s = scrape(url)
    assert {s.value(f"taskmesh_{name}_total") for name in KNOWN_COUNTERS} == {0}  # exported before any count
    config = tmp_path / "producer.yaml"
    config.write_text("queues:\n  cpu_intensive:\n    max_depth: 1\n")
    producer = create_app("producer", broker=broker_url, hardware=str(config))

    @producer.task(name="tests.apps.gpu_app.crunch", profile="cpu_intensive", shared=False)
    def crunch(seconds=0.5, label=None):
        return None

    crunch.delay()
    with pytest.raises(QueueFull):
        crunch.delay()
    gpu_app.flexible.delay()  # nothing waits on gpu: it stays there
    gpu_app.flexible.delay()  # gpu is saturated and no GPU can take it: its fallback, cpu_intensive
    broker.hset(ALERTS, "gpu-age", json.dumps({"name": "gpu-age", "queue": "gpu", "kind": "age",
                                               "message": "oldest task waited 40 min", "since": time.time()}))
    broker.lpush(REBALANCE_RUNS, json.dumps({"at": 1700000000.5, "acted": True, "skipped": None, "depths": {},
                                             "decisions": [], "hints": {"gpu0": 2, "cpu": 1}}))
    broker.hincrby("taskmesh:counters", "something-new", 4)
    s = scrape(url)
    assert s.value("taskmesh_queue_full_total") >= 1 and s.value("taskmesh_fallbacks_total") >= 1
    assert s.value("taskmesh_something_new_total") == 4  # a counter the exporter does not know yet
    assert s.value("taskmesh_alert_active", name="gpu-age", queue="gpu", kind="age") == 1
    assert s.value("taskmesh_rebalance_last_run_timestamp_seconds") == 1700000000.5
    assert s.value("taskmesh_rebalance_desired_replicas", group="gpu0") == 2
    broker.hdel(ALERTS, "gpu-age")
    assert scrape(url).labels("taskmesh_alert_active") == []


@pytest.mark.slow
def test_runtime_and_queue_wait_histograms_count_tasks_from_celery_events(gpu_app, processes):
    url = start_exporter(processes)
    processes.celery_worker(APP, "-Q", "cpu_intensive", "-c", "1", "-n", f"crunch@{HOST}")
    wait_for_workers(gpu_app.app, [f"crunch@{HOST}"])
    # the worker's heartbeats reaching the exporter show that it listens to the event stream
    scrape_until(url, lambda s: s.value("taskmesh_exporter_events_total") > 0, "the exporter received no event")
    labels = {"task": "tests.apps.gpu_app.crunch", "queue": "cpu_intensive"}
    before = scrape(url)
    runs_before = before.value("taskmesh_task_runtime_seconds_count", **labels) or 0
    waits_before = before.value("taskmesh_task_queue_wait_seconds_count", **labels) or 0
    for result in [gpu_app.crunch.delay(0.2, label=i) for i in range(3)]:
        result.get(timeout=60)
    s = scrape_until(url, lambda s: s.value("taskmesh_task_runtime_seconds_count", **labels) == runs_before + 3,
                     "the runtime histogram did not count the three tasks")
    assert s.value("taskmesh_task_queue_wait_seconds_count", **labels) == waits_before + 3
    assert s.value("taskmesh_task_runtime_seconds_sum", **labels) >= 3 * 0.2  # each slept 0.2 s
    assert s.value("taskmesh_task_runtime_seconds_bucket", le="+Inf", **labels) == runs_before + 3


def test_task_timings_forget_the_oldest_pending_task_beyond_their_bound(gpu_app):
    from prometheus_client import CollectorRegistry

    from taskmesh.observe.exporter import TaskTimings

    registry = CollectorRegistry()
    timings = TaskTimings(gpu_app.app, registry, max_pending=2)
    name = "tests.apps.gpu_app.crunch"
    for task_id in ("a", "b", "c"):
        timings.on_event({"type": "task-sent", "uuid": task_id, "name": name, "queue": "cpu_intensive",
                          "timestamp": 100.0})
    assert list(timings.pending) == ["b", "c"]  # "a" was forgotten
    timings.on_event({"type": "task-started", "uuid": "b", "timestamp": 101.5})
    timings.on_event({"type": "task-failed", "uuid": "b", "timestamp": 104.0})  # failed: no runtime field
    timings.on_event({"type": "task-started", "uuid": "a", "timestamp": 101.0})
    timings.on_event({"type": "task-succeeded", "uuid": "a", "runtime": 3.0, "timestamp": 104.0})
    labels = {"task": name, "queue": "cpu_intensive"}
    assert registry.get_sample_value("taskmesh_task_queue_wait_seconds_count", labels) == 1
    assert registry.get_sample_value("taskmesh_task_queue_wait_seconds_sum", labels) == 1.5
    assert registry.get_sample_value("taskmesh_task_runtime_seconds_count", labels) == 1  # "a": name unknown
    assert registry.get_sample_value("taskmesh_task_runtime_seconds_sum", labels) == 2.5
    assert list(timings.pending) == ["c"]


def test_exporter_port_in_use_is_a_clear_error(broker_url):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "taskmesh", "-A", APP, "exporter", "--port", str(port)],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"port {port} on 127.0.0.1 is in use; pass --port with a free port" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_broker_the_exporter_cannot_reach_is_a_0_not_a_failed_scrape(processes):
    url = start_exporter(processes, env={"TASKMESH_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"})
    s = scrape(url)
    assert s.value("taskmesh_broker_up") == 0
    assert s.labels("taskmesh_queue_waiting") == []  # no guess at what it could not read


# --- the dashboard and the alert rules ------------------------------------------------------

PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
                "group_right", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers not called as functions, outside
    label matchers, grouping clauses, ranges, strings and Grafana variables."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\$\{[^}]*\}|\$\w+", "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set(re.findall(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:]|\s*\()", expr))
    return {n for n in names if n.lower() not in PROMQL_WORDS}


def sample_names(families: dict[str, tuple[str, str, tuple[str, ...]]]) -> set[str]:
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    return {name + suffix for name, (kind, _, _) in families.items() for suffix in suffixes[kind]}


def dashboard_exprs() -> list[str]:
    def walk(node: Any) -> list[str]:
        if isinstance(node, dict):
            return ([node["expr"]] if isinstance(node.get("expr"), str) else []) + \
                [e for v in node.values() for e in walk(v)]
        return [e for v in node for e in walk(v)] if isinstance(node, list) else []

    return walk(json.loads(DASHBOARD.read_text()))


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERT_RULES.read_text())["groups"] for rule in group["rules"]]


@pytest.mark.slow
def test_every_documented_metric_is_in_a_live_scrape_and_nothing_else(gpu_app, broker, processes):
    url = start_exporter(processes)
    start_gpu_worker(processes, gpu_app.app)
    scrape_until(url, lambda s: s.value("taskmesh_exporter_events_total") > 0, "the exporter received no event")
    gpu_app.ten_gib.delay(0.1).get(timeout=60)
    broker.hset(ALERTS, "a", json.dumps({"name": "a", "queue": "gpu", "kind": "depth", "message": "", "since": 0}))
    broker.lpush(REBALANCE_RUNS, json.dumps({"at": time.time(), "acted": False, "skipped": "idle", "depths": {},
                                             "decisions": [], "hints": {"gpu0": 1}}))
    s = scrape_until(url, lambda s: s.value("taskmesh_task_runtime_seconds_count") == 1, "the task was not timed")
    documented = sample_names({**METRICS, **EVENT_FED, **BATCH_METRICS})
    scraped = {sample.name for sample in s.samples}
    assert scraped <= documented
    models = sample_names({name: METRICS[name] for name in MODEL_SERIES})  # this app declares no model
    # simulated GPUs have no utilisation, temperature or power; batch series come once a batch ran (test_batching)
    assert documented - scraped == set(TELEMETRY) | models | sample_names(BATCH_METRICS)


def test_dashboard_and_alert_rules_read_only_metrics_the_exporter_exports():
    exported = sample_names({**METRICS, **EVENT_FED})
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert all(p.get("targets") for p in panels if p.get("type") != "row"), "a panel without a query"
    exprs = dashboard_exprs() + [rule["expr"] for rule in alert_rules()]
    variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
    used = {m for v in variables for m in re.findall(r"label_values\((\w+)", v.get("definition", ""))}
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric found in {expr!r}"
        used |= names
    assert used <= exported, f"not exported: {sorted(used - exported)}"
    assert {"DCGM_FI_DEV_FB_USED", "taskmesh_gpu_memory_reserved_mib", "taskmesh_task_runtime_seconds_bucket",
            "taskmesh_task_queue_wait_seconds_bucket", "taskmesh_queue_oldest_age_seconds",
            "taskmesh_alert_active", "taskmesh_worker_up"} <= used
    names = {rule["alert"] for rule in alert_rules()}
    assert {"TaskmeshQueueDepthHigh", "TaskmeshQueueOldestAgeHigh", "TaskmeshGpuUnhealthy", "TaskmeshWorkerGroupDown",
            "TaskmeshAdmissionStalled", "TaskmeshQueueWithoutConsumer"} <= names
    scrape_config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert "alerts.yml" in scrape_config["rule_files"]
    assert any("127.0.0.1:9808" in c["targets"] for job in scrape_config["scrape_configs"]
               for c in job["static_configs"])


def test_the_promql_identifier_scan_finds_metrics_and_skips_the_rest():
    expr = ('histogram_quantile(0.95, sum by (le, task) (rate(taskmesh_task_runtime_seconds_bucket'
            '{queue=~"$queue", task!="x"}[$__rate_interval]))) > 1e3 and on() '
            '(increase(taskmesh_admitted_total[10m]) == 0) or vector(0)')
    assert metric_names(expr) == {"taskmesh_task_runtime_seconds_bucket", "taskmesh_admitted_total"}


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (Debian: apt-get install "
                    "prometheus)")
def test_alert_rules_are_valid_and_fire_as_their_unit_tests_expect():
    for argv in (["check", "config", "prometheus.yml"], ["test", "rules", "alerts_test.yml"]):
        done = subprocess.run(["promtool", *argv], cwd=PROMETHEUS_CONFIG.parent, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
