"""The deployment files: compose/docker-compose.yml and deploy/k8s/ are valid (the compose
spec's JSON schema, Kubernetes' own schemas, offline), every command they run is a real
taskmesh or celery command line that the worker plan also makes, and their secrets work:
``taskmesh secrets`` writes an ACL that a real redis-server accepts and that refuses
anyone without the password, and the image's entrypoint hands secrets over by environment."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import warnings
from typing import Any

import click
import jsonschema
import kubernetes_validate
import pytest
import redis
import yaml

from taskmesh.core.config import load_config
from taskmesh.core.nodes import kind_of
from taskmesh.hardware.inventory import detect
from taskmesh.observe.metrics import METRICS
from taskmesh.run.stack import free_port
from taskmesh.run.workers import plan_workers

from .conftest import ROOT, anonymous_reply
from .test_metrics import metric_names

COMPOSE = ROOT / "compose" / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"
IMAGE = "taskmesh-worker:latest"
DEMO = "taskmesh.run.demo"
K8S_VERSION = "1.30"
#: the fields of KEDA's ScaledObject these manifests use, as KEDA's CRD types them
SCALED_OBJECT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["type", "metadata"],
                    "properties": {"type": {"const": "prometheus"}, "metadata": {
                        "type": "object", "required": ["serverAddress", "query", "threshold"],
                        "additionalProperties": {"type": "string"}}}}},
            },
        },
    },
}


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def manifests() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def interpolate(value: str) -> str:
    """Compose's ``${NAME:-default}`` with nothing set: the default."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def commands() -> list[tuple[str, list[str]]]:
    """Every command run from the taskmesh image: compose services and Kubernetes containers."""
    found = [(f"compose {name}", [interpolate(a) for a in service["command"]])
             for name, service in compose()["services"].items() if service.get("image") == IMAGE]
    dockerfile = (ROOT / "compose" / "Dockerfile").read_text()
    found.append(("Dockerfile CMD", json.loads(re.search(r"^CMD (.+)$", dockerfile, re.M).group(1))))
    for doc in manifests():
        if doc["kind"] in ("Deployment", "StatefulSet"):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                if container["image"] == IMAGE:
                    found.append((f"k8s {doc['metadata']['name']}", container["args"]))
    return found


def parse(group: click.Group, argv: list[str], obj: Any = None) -> tuple[str, dict[str, Any], list[str]]:
    """Parse *argv* with the real click group and its subcommand, as running it would, without
    running it: (subcommand, its parameters, its unparsed arguments)."""
    ctx = group.make_context(group.name or "cli", list(argv))
    ctx.obj = obj(ctx) if obj else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # click 8.2's protected_args
        name, command, rest = group.resolve_command(ctx, [*ctx.protected_args, *ctx.args])
    sub = command.make_context(name, rest, parent=ctx)
    return name, sub.params, sub.args


def parse_command(argv: list[str]) -> tuple[str, dict[str, Any], list[str]]:
    if argv[0] == "taskmesh":
        from taskmesh.cli import cli

        return parse(cli, argv[1:])
    assert argv[0] == "celery", argv
    from celery.bin.base import CLIContext
    from celery.bin.celery import celery

    from taskmesh.app.loading import load_app

    name, params, rest = parse(celery, argv[1:], lambda ctx: CLIContext(
        app=load_app(ctx.params["app"]), no_color=True, workdir=None, quiet=True))
    if name == "flower":  # Flower parses its own options with tornado's parser
        import flower.options  # noqa: F401  (defines them)
        from tornado.options import options

        options.parse_command_line(["flower", *rest], final=False)
    return name, params, rest


def test_every_command_is_a_real_taskmesh_or_celery_command_line_for_the_planned_workers(monkeypatch):
    monkeypatch.setenv("TASKMESH_SIMULATE_GPUS", "2x24GiB")
    from taskmesh.run import demo

    config = load_config()
    planned = {(kind_of(s.group), s.queue, s.pool)
               for s in plan_workers(config, detect(config), "all", demo.app.tasks.values())}
    found = commands()
    assert len(found) >= 14, found  # compose: 5 workers, beat, flower, exporter; k8s: 4 workers, 3 more
    seen = set()
    for where, argv in found:
        assert "-A" not in argv or argv[argv.index("-A") + 1] == DEMO, where
        name, params, _ = parse_command(argv)
        seen.add(name)
        if name == "worker":
            group = params["hostname"].split("@")[0]
            (queue,) = params["queues"]
            assert (kind_of(group), queue, argv[argv.index("-P") + 1]) in planned, (where, planned)
            assert params["concurrency"] >= 1
    assert seen == {"worker", "beat", "flower", "exporter", "doctor"}


def test_a_command_the_real_parser_refuses_fails_the_check():
    with pytest.raises(click.UsageError, match="No such option"):
        parse_command(["celery", "-A", DEMO, "worker", "--queue-name", "gpu"])
    with pytest.raises(click.UsageError, match="'io' is not one of"):
        parse_command(["celery", "-A", DEMO, "worker", "-P", "io"])
    with pytest.raises(click.UsageError):
        parse_command(["taskmesh", "-A", DEMO, "exporter", "--port", "0"])


def test_the_compose_file_is_valid_against_the_compose_spec(tmp_path):
    check = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
    done = subprocess.run([*check, str(COMPOSE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("stop_grace_period:", "stop_grace:"))
    assert subprocess.run([*check, str(broken)], capture_output=True, text=True).returncode == 1


def test_the_compose_stack_mounts_files_that_exist_and_publishes_on_loopback_only():
    services = compose()["services"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), (name, volume)
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
    assert "ports" not in services["redis"] and "ports" not in services["exporter"]
    assert "--aclfile" in services["redis"]["command"] and "yes" in services["redis"]["command"]  # AOF on
    config = yaml.safe_load((COMPOSE.parent / "prometheus" / "prometheus-compose.yml").read_text())
    assert config["scrape_configs"][0]["static_configs"][0]["targets"] == ["exporter:9808"]
    assert config["rule_files"] == ["alerts.yml"]


def test_each_gpu_worker_reserves_its_own_gpu_and_shutdown_waits_for_the_longest_task():
    from taskmesh.run import demo

    # the demo's own tasks: shared tasks of test apps imported earlier in this process join every app
    longest = max(t.time_limit or 0 for name, t in demo.app.tasks.items() if name.startswith(demo.__name__))
    assert longest > 0
    services = compose()["services"]
    gpu_services = {n: s for n, s in services.items() if "-Q" in s.get("command", []) and
                    s["command"][s["command"].index("-Q") + 1] == "gpu"}
    assert len(gpu_services) >= 2
    for name, service in gpu_services.items():
        group = service["command"][service["command"].index("-n") + 1].split("@")[0]
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["device_ids"] == [group.removeprefix("gpu")] and device["capabilities"] == ["gpu"], name
    grace = {"15m": 900}[compose()["x-taskmesh"]["stop_grace_period"]]
    assert grace > longest
    workers = [d for d in manifests() if d["kind"] == "Deployment" and "worker" in d["metadata"]["name"]]
    assert {d["metadata"]["name"] for d in workers} >= {f"taskmesh-worker-{g}" for g in ("gpu", "cpu", "io", "mixed")}
    for doc in workers:
        pod = doc["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] > longest, doc["metadata"]["name"]
        (container,) = pod["containers"]
        gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
        serves_gpu = container["args"][container["args"].index("-Q") + 1] == "gpu"
        assert gpus == (1 if serves_gpu else None), doc["metadata"]["name"]


def test_the_kubernetes_manifests_validate_offline_and_keda_scales_on_taskmesh_queue_depth():
    docs = manifests()
    scaled = [d for d in docs if d["kind"] == "ScaledObject"]
    for doc in docs:
        if doc["kind"] == "ScaledObject":
            jsonschema.validate(doc, SCALED_OBJECT)
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert {s["spec"]["scaleTargetRef"]["name"] for s in scaled} == {
        "taskmesh-worker-gpu", "taskmesh-worker-cpu", "taskmesh-worker-io"}
    for obj in scaled:
        target = deployments[obj["spec"]["scaleTargetRef"]["name"]]
        args = target["spec"]["template"]["spec"]["containers"][0]["args"]
        (trigger,) = obj["spec"]["triggers"]
        query = trigger["metadata"]["query"]
        assert metric_names(query) == {"taskmesh_queue_waiting", "taskmesh_queue_in_flight"} <= set(METRICS)
        assert f'"{args[args.index("-Q") + 1]}' in query  # the queue the target serves
        assert trigger["metadata"]["threshold"] == args[args.index("-c") + 1]  # one pod's slots


def test_a_manifest_with_a_misspelt_field_fails_validation():
    doc = next(d for d in manifests() if d["kind"] == "Deployment")
    doc["spec"]["template"]["spec"]["terminationGracePeriod"] = 900
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    scaled = next(d for d in manifests() if d["kind"] == "ScaledObject")
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 1  # KEDA wants a string
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, SCALED_OBJECT)


def test_taskmesh_secrets_make_an_acl_redis_accepts_and_the_entrypoint_passes_them_by_environment(tmp_path):
    folder = tmp_path / "secrets"
    done = subprocess.run([sys.executable, "-m", "taskmesh", "secrets", str(folder)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert folder.stat().st_mode & 0o077 == 0  # only its owner can list or open what is inside
    url = (folder / "broker_url").read_text()
    password = url.split(":")[2].split("@")[0]
    assert url == f"redis://taskmesh:{password}@redis:6379/0"
    assert password not in (folder / "redis-users.acl").read_text()  # only its hash
    # the compose service's own redis-server arguments, on loopback, with the ACL file it mounts
    argv = [interpolate(a) for a in compose()["services"]["redis"]["command"]]
    argv[argv.index("/run/secrets/redis_acl")] = str(folder / "redis-users.acl")
    port = free_port()
    server = subprocess.Popen([shutil.which("redis-server") or "redis-server", *argv[1:], "--port", str(port),
                               "--bind", "127.0.0.1", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        local = url.replace("@redis:6379", f"@127.0.0.1:{port}")
        deadline = time.monotonic() + 10
        while True:
            try:
                assert redis.Redis.from_url(local).ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline and server.poll() is None, "redis-server refused the ACL file"
                time.sleep(0.05)
        assert anonymous_reply(port, "FLUSHALL").startswith(b"-NOAUTH ")
    finally:
        server.terminate()
        server.wait(10)
    shown = subprocess.run(
        ["sh", str(ROOT / "compose" / "entrypoint.sh"), sys.executable, "-c",
         "import os; print(os.environ['TASKMESH_BROKER_URL'], 'TASKMESH_BROKER_URL_FILE' in os.environ)"],
        env={"PATH": "/usr/bin:/bin", "TASKMESH_BROKER_URL_FILE": str(folder / "broker_url")},
        capture_output=True, text=True, timeout=30)
    assert shown.stdout.split() == [url, "False"], shown.stderr
    missing = subprocess.run(["sh", str(ROOT / "compose" / "entrypoint.sh"), "true"],
                             env={"PATH": "/usr/bin:/bin", "X_FILE": str(tmp_path / "absent")},
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 2 and "X_FILE names" in missing.stderr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (Debian: apt-get install "
                    "prometheus)")
def test_keda_s_queries_add_waiting_and_in_flight_over_each_group_s_queues(tmp_path):
    """Evaluated by Prometheus's own engine: the gpu query counts the need queues too, and a
    fleet with nothing exported yet reads 0 (KEDA takes an empty result as an error)."""
    series = {("waiting", "gpu"): 3, ("waiting", "gpu.40960MiB"): 2, ("in_flight", "gpu"): 1,
              ("waiting", "cpu_intensive"): 5, ("in_flight", "cpu_intensive"): 2, ("waiting", "cpu_light"): 7,
              ("in_flight", "cpu_light"): 0, ("waiting", "mixed"): 50}
    expected = {"taskmesh-worker-gpu": 6, "taskmesh-worker-cpu": 7, "taskmesh-worker-io": 7}
    queries = {d["metadata"]["name"]: d["spec"]["triggers"][0]["metadata"]["query"]
               for d in manifests() if d["kind"] == "ScaledObject"}
    assert set(queries) == set(expected)
    cases = {"rule_files": [], "tests": [
        {"interval": "1m",
         "input_series": [{"series": f'taskmesh_queue_{kind}{{queue="{queue}"}}', "values": str(value)}
                          for (kind, queue), value in series.items()],
         "promql_expr_test": [{"expr": q, "eval_time": "0m", "exp_samples": [{"labels": "{}", "value": expected[n]}]}
                              for n, q in queries.items()]},
        {"interval": "1m", "input_series": [{"series": "up", "values": "1"}],
         "promql_expr_test": [{"expr": q, "eval_time": "0m", "exp_samples": [{"labels": "{}", "value": 0}]}
                              for q in queries.values()]},
    ]}
    (tmp_path / "keda_test.yml").write_text(yaml.safe_dump(cases))
    done = subprocess.run(["promtool", "test", "rules", "keda_test.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    checked = subprocess.run(["promtool", "check", "config", "prometheus-compose.yml"],
                             cwd=COMPOSE.parent / "prometheus", capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
