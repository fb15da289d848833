"""The ``taskmesh`` command, also reachable as ``celery -A app taskmesh ...``.

Each subcommand is thin: it imports the app, asks the planning and stack modules
what to do, and reports errors as one line naming the thing and the fix (exit 2).
"""

from __future__ import annotations

import json
import os
import select
import shlex
import sys
from pathlib import Path
from typing import Any

import click
from kombu.utils.imports import symbol_by_name

from taskmesh.app.loading import app_path, load_app
from taskmesh.core.config import Config, load_config
from taskmesh.core.errors import TaskmeshError
from taskmesh.core.nodes import group_of
from taskmesh.core.submit import runs_here
from taskmesh.hardware.inventory import Inventory, detect, local_record
from taskmesh.run.stack import DEFAULT_DATA_DIR, Stack, StackError, StackOptions, free_port
from taskmesh.run.workers import GROUP_PROFILES, PlanError, plan_workers
from taskmesh.state.registry import Registry

DEMO_APP = "taskmesh.run.demo"
DEMO_GPUS = "1x24GiB,cc=8.9"


def config_and_inventory(app: Any | None) -> tuple[Config, Inventory]:
    config = getattr(app, "taskmesh_config", None) or load_config()
    inventory = app.inventory() if hasattr(app, "inventory") else detect(config)
    return config, inventory


def _plan(app: Any, profile: str, gpu_pool: str | None) -> list[Any]:
    config, inventory = config_and_inventory(app)
    return plan_workers(config, inventory, profile, app.tasks.values(), gpu_pool)


@click.command()
@click.option("--profile", type=click.Choice(GROUP_PROFILES + ("all", "gpu_intensive", "io", "io_bound")),
              default="all", show_default=True, help="Which worker groups to start.")
@click.option("--gpu-pool", type=click.Choice(["prefork", "threads", "solo"]), default=None,
              help="Pool of GPU workers (default prefork; solo hides the worker during a task).")
@click.option("--dry-run", is_flag=True, help="Print the exact commands and exit.")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--logdir", type=click.Path(path_type=Path), default=None,
              help="Write each worker's output to DIR/<group>.log instead of this terminal.")
@click.pass_context
def worker(ctx: click.Context, profile: str, gpu_pool: str | None, dry_run: bool, loglevel: str,
           logdir: Path | None) -> None:
    """Start typed worker groups sized from this machine's hardware."""
    from taskmesh.run.supervisor import ProcessSpec, Supervisor

    path = app_path(ctx)
    if not path:
        raise click.UsageError("worker needs the app: taskmesh -A myapp.tasks worker --profile gpu")
    app = load_app(path)
    group = "gpu" if profile in ("gpu_intensive",) else "cpu_light" if profile in ("io", "io_bound") else profile
    specs = _plan(app, group, gpu_pool)
    if dry_run:
        for spec in specs:
            env = " ".join(f"{k}={shlex.quote(v)}" for k, v in spec.env)
            click.echo(f"{env + ' ' if env else ''}{shlex.join(spec.argv(path, loglevel))}")
        return
    supervisor = Supervisor(logdir=logdir)
    supervisor.install_signal_handlers()
    try:
        for spec in specs:
            proc = supervisor.add(ProcessSpec(spec.group, spec.argv(path, loglevel), spec.environ()))
            click.echo(f"taskmesh: started {spec.nodename} ({spec.pool} x{spec.concurrency}) pid {proc.pid}",
                       err=True)
        watch_gpus = group in ("gpu", "all")
        supervise(supervisor, app, path, loglevel, gpu_pool, {s.group for s in specs} if watch_gpus else None)
    finally:
        supervisor.stop()


GPU_WATCH_S = 5.0


def supervise(supervisor: Any, app: Any, path: str, loglevel: str, gpu_pool: str | None,
              gpu_groups: set[str] | None, env: dict[str, str] | None = None) -> None:
    """Supervise until a signal; with *gpu_groups*, start a worker group for each GPU that appears."""
    from taskmesh.hardware.providers import provider_from_env
    from taskmesh.run.supervisor import ProcessSpec

    while not supervisor.stopping:
        supervisor.wait(timeout=GPU_WATCH_S)
        if gpu_groups is None or supervisor.stopping:
            continue
        config = app.taskmesh_config
        try:
            inventory = detect(config, provider_from_env(config.simulate_gpus, control=app.redis()))
        except Exception as exc:  # a broker that is down must not stop supervision
            click.echo(f"taskmesh: could not look for new GPUs: {exc}", err=True)
            continue
        for spec in plan_workers(config, inventory, "all", app.tasks.values(), gpu_pool):
            if spec.queue == "gpu" and spec.group not in gpu_groups:
                gpu_groups.add(spec.group)
                proc = supervisor.add(ProcessSpec(spec.group, spec.argv(path, loglevel), spec.environ(env)))
                click.echo(f"taskmesh: new GPU found; started {spec.nodename} pid {proc.pid}", err=True)


@click.command()
@click.option("--demo", is_flag=True, help="Run the built-in mixed demo workload to completion, then stop.")
@click.option("--broker", default=None, help="Use this broker instead of starting redis-server.")
@click.option("--redis-port", type=int, default=None, help="Port of the Redis started here (default 6379; "
              "a free one with --demo).")
@click.option("--flower/--no-flower", default=True, show_default=True)
@click.option("--flower-port", type=int, default=None, help="Default 5555 (a free one with --demo).")
@click.option("--flower-auth", default=None, envvar="FLOWER_BASIC_AUTH",
              help="user:password for Flower (default: generated and kept in credentials.env); the environment "
              "variable FLOWER_BASIC_AUTH keeps it out of ps.")
@click.option("--exporter-port", type=int, default=None, help="Prometheus exporter port (default 9808; a free one "
              "with --demo).")
@click.option("--beat/--no-beat", default=True, show_default=True)
@click.option("--gpu-pool", type=click.Choice(["prefork", "threads", "solo"]), default=None)
@click.option("--logdir", type=click.Path(path_type=Path), default=None)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of the Redis started here: its append-only file (default ./.taskmesh/redis; "
              "a throwaway one with --demo).")
@click.option("--json", "as_json", is_flag=True, help="With --demo: print the summary as JSON too.")
@click.pass_context
def up(ctx: click.Context, demo: bool, broker: str | None, redis_port: int | None, flower: bool,
       flower_port: int | None, flower_auth: str | None, exporter_port: int | None, beat: bool,
       gpu_pool: str | None, logdir: Path | None, data_dir: Path | None, as_json: bool) -> None:
    """Start Redis, the worker groups, beat and Flower on this machine."""
    path = app_path(ctx)
    if demo:
        if path and path != DEMO_APP:
            raise click.UsageError(f"--demo runs the built-in app {DEMO_APP}; drop -A {path}")
        path = DEMO_APP
        if not os.environ.get("TASKMESH_SIMULATE_GPUS") and not detect(load_config()).gpus:
            os.environ["TASKMESH_SIMULATE_GPUS"] = DEMO_GPUS
            click.echo(f"taskmesh: no GPU found; simulating {DEMO_GPUS} for the demo", err=True)
    if not path:
        raise click.UsageError("up needs the app: taskmesh -A myapp.tasks up (or taskmesh up --demo)")
    if data_dir is not None and broker:
        raise click.UsageError("--data-dir is for the Redis that up starts; with --broker, drop it")
    options = StackOptions(
        app_path=path,
        broker=broker,
        redis_port=redis_port or (free_port() if demo else 6379),
        flower=flower,
        flower_port=flower_port or (free_port() if demo else 5555),
        flower_auth=flower_auth,
        exporter_port=exporter_port or (free_port() if demo else 9808),
        beat=beat,
        logdir=logdir,
        data_dir=data_dir or (None if demo else DEFAULT_DATA_DIR),
    )
    stack = Stack(options)
    stack.supervisor.install_signal_handlers()
    try:
        stack.start_broker()
        app = load_app(path)
        stack.start_services(_plan(app, "all", gpu_pool))
        stack.wait_until_ready(app)
        click.echo(stack.describe())
        if demo:
            from taskmesh.run.demo import format_summary, run_workload

            summary = run_workload()
            click.echo(format_summary(summary))
            if as_json:
                click.echo(json.dumps(summary))
            ended = f"demo finished: {summary['total']['succeeded']} succeeded, {summary['total']['failed']} failed; "
            _keep_flower_up(stack, flower)
        else:
            click.echo("taskmesh: up; Ctrl-C stops everything", err=True)
            groups = {group_of(name) for name in stack.nodenames}
            supervise(stack.supervisor, app, path, options.loglevel, gpu_pool, groups, stack.env)
            ended = ""
    finally:
        stack.stop()
    click.echo(f"taskmesh: {ended}stack stopped; its logs are kept in {stack.logdir}", err=True)


def _keep_flower_up(stack: Stack, flower: bool) -> None:
    """On a terminal, leave Flower up to look at the demo's tasks until Enter or Ctrl-C."""
    if not flower:
        return
    if not sys.stdin.isatty():
        click.echo("taskmesh: stdin is not a terminal, so Flower is not kept up; stopping", err=True)
        return
    click.echo("taskmesh: Flower stays up at the address above; press Enter (or Ctrl-C) to stop", err=True)
    while not stack.supervisor.stopping:
        if select.select([sys.stdin], [], [], 0.5)[0]:
            sys.stdin.readline()
            return


@click.command()
@click.pass_context
def doctor(ctx: click.Context) -> None:
    """Print the hardware inventory, the resolved config, each task checked against this
    machine, and the worker plan."""
    path = app_path(ctx)
    app = load_app(path) if path else None
    config, inventory = config_and_inventory(app)
    click.echo(f"config: {config.source}")
    for line in inventory.describe():
        click.echo(line)
    click.echo(f"default profile: {config.default_profile.queue}; GPU slots per GPU: {config.slots_per_gpu}")
    for name, queue in config.queues.items():
        depth = "unlimited" if queue.max_depth is None else queue.max_depth
        size = "planned" if queue.concurrency is None else queue.concurrency
        click.echo(f"queue {name}: max_depth {depth}, concurrency {size}, pool {queue.pool or 'default'}")
    if app is None:
        click.echo("tasks: give the app (taskmesh -A myapp.tasks doctor) to check each task against this machine")
        return
    here = Registry.summarise([local_record(inventory)])
    for name, task in sorted(app.tasks.items()):
        requirement = getattr(task, "requirement", None)
        if requirement is None or name.startswith("celery."):
            continue
        problem = runs_here(requirement, here, config.admission.safety_margin_mib)
        verdict = f"cannot run on this machine: {problem}" if problem else "fits this machine"
        click.echo(f"task {name} → {requirement.profile.queue} {requirement.to_header()}: {verdict}")
    for spec in plan_workers(config, inventory, "all", app.tasks.values()):
        click.echo(f"worker {spec.nodename}: {spec.queue} {spec.pool} x{spec.concurrency}")


@click.command()
@click.pass_context
def rebalance(ctx: click.Context) -> None:
    """Run one rebalance now (beat runs it every interval) and print what it decided, as JSON."""
    from taskmesh.app.rebalance import rebalance as run

    path = app_path(ctx)
    if not path:
        raise click.UsageError("rebalance needs the app: taskmesh -A myapp.tasks rebalance")
    click.echo(json.dumps(run(load_app(path)), indent=2))


COMMANDS = (worker, up, doctor, rebalance)
#: Commands whose modules pull in rich, prometheus-client or the benchmarks: imported
#: only when run, because Celery imports this module for every ``celery`` command.
LAZY_COMMANDS = {
    "status": "taskmesh.observe.top:status",
    "top": "taskmesh.observe.top:top",
    "exporter": "taskmesh.observe.exporter:exporter",
    "dlq": "taskmesh.cli_dlq:dlq",
    "batch": "taskmesh.cli_batch:batch",
    "secrets": "taskmesh.cli_secrets:secrets",
    "bench": "benchmarks.command:bench",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_COMMANDS:
            try:
                return symbol_by_name(LAZY_COMMANDS[name])
            except ModuleNotFoundError as exc:
                if exc.name != "benchmarks":
                    raise
                raise click.UsageError("taskmesh bench runs from a source checkout (the benchmarks are not in the "
                                       "installed package): cd into it and run scripts/bench") from None
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup)
@click.option("-A", "--app", "app", default=None, help="The Celery app, e.g. myapp.tasks.")
@click.option("--hardware", default=None, help="Hardware config name or path (env TASKMESH_HARDWARE).")
@click.pass_context
def cli(ctx: click.Context, app: str | None, hardware: str | None) -> None:
    """taskmesh: resource-aware Celery."""
    if hardware:
        os.environ["TASKMESH_HARDWARE"] = hardware
    ctx.meta["taskmesh.app"] = app


@click.group(name="taskmesh", cls=LazyGroup)
@click.pass_context
def celery_command(ctx: click.Context) -> None:
    """taskmesh commands inside ``celery -A app taskmesh ...``."""
    ctx.meta["taskmesh.app"] = ctx.find_root().params.get("app")


for _command in COMMANDS:
    cli.add_command(_command)
    celery_command.add_command(_command)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (TaskmeshError, PlanError, StackError) as exc:
        click.echo(f"taskmesh: error: {exc}", err=True)
        sys.exit(2)
