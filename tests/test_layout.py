"""The package's shape: layers import only downward, without cycles; Celery's and kombu's
worker internals are touched in the worker layer only; the wheel ships no benchmarks
but does ship the Lua scripts; nothing process-global is installed for other apps."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

from celery import Celery, signals

from taskmesh import create_app

ROOT = Path(__file__).resolve().parent.parent
CHECK = [sys.executable, str(ROOT / "scripts" / "check_imports.py")]


def test_the_import_check_passes_on_the_package_and_fails_on_a_deliberate_cycle(tmp_path: Path) -> None:
    clean = subprocess.run(CHECK, capture_output=True, text=True)
    assert clean.returncode == 0, clean.stdout
    copy = tmp_path / "taskmesh"
    shutil.copytree(ROOT / "taskmesh", copy, ignore=shutil.ignore_patterns("__pycache__"))
    with (copy / "worker" / "strategy.py").open("a") as f:  # strategy ← controller already; close the loop lazily
        f.write("\n\ndef _closes_a_cycle():\n    from taskmesh.worker.controller import RECONCILE_AFTER_S  # noqa\n")
    with (copy / "core" / "sizes.py").open("a") as f:  # and a pure module reaching up into the app layer
        f.write("\nfrom taskmesh.app.routing import route_by_profile  # noqa\n")
    broken = subprocess.run([*CHECK, str(copy)], capture_output=True, text=True)
    assert broken.returncode == 1
    assert "import cycle: taskmesh.worker.controller -> taskmesh.worker.strategy" in broken.stdout
    assert "layering: taskmesh.core.sizes imports taskmesh.app.routing" in broken.stdout


def test_celery_and_kombu_worker_internals_are_touched_only_in_the_worker_layer() -> None:
    internals = re.compile(r"cancel_task_queue|restore_by_tag|unacked_key|reserved_requests|_update_prefetch|"
                           r"strategy\.default|\\x06\\x16")
    where = sorted(
        str(path.relative_to(ROOT / "taskmesh"))
        for path in (ROOT / "taskmesh").rglob("*.py")
        if internals.search(path.read_text())
    )
    assert where, "the pattern must find the worker layer's own uses"
    assert all(p.startswith("worker/") or p in ("state/keys.py", "state/queues.py") for p in where), where


def test_every_redis_client_taskmesh_opens_is_made_by_the_one_factory() -> None:
    """So that each takes the password, ACL user and TLS settings from the app as Celery does."""
    opens = re.compile(r"redis\.(Strict)?Redis\(|Redis\.from_url|ConnectionPool\.from_url")
    where = sorted(
        str(path.relative_to(ROOT / "taskmesh"))
        for path in (ROOT / "taskmesh").rglob("*.py")
        if opens.search(path.read_text())
    )
    assert where == ["state/client.py"], where


def test_the_wheel_has_the_lua_scripts_and_no_benchmark_code(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("taskmesh-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("benchmarks/") or "/bench/" in n]
    assert {"taskmesh/state/lua/reserve_first.lua", "taskmesh/state/lua/move.lua"} <= set(names)
    assert "taskmesh/worker/bootstep.py" in names


def test_the_cuda_cache_hook_runs_once_per_app_and_only_for_its_gpu_tasks(monkeypatch) -> None:
    emptied = []
    cuda = types.SimpleNamespace(is_available=lambda: True, is_initialized=lambda: True,
                                 empty_cache=lambda: emptied.append(1))
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))  # torch is not installed here
    before = len(signals.task_postrun.receivers)
    app = create_app("layout_hook", broker="redis://127.0.0.1:1/0")
    other = create_app("layout_hook_other", broker="redis://127.0.0.1:1/0")
    plain = Celery("layout_plain", set_as_current=False)
    assert len(signals.task_postrun.receivers) == before + 2

    @app.task(profile="gpu", vram="1GiB")
    def on_gpu() -> None: ...

    @app.task(profile="cpu")
    def on_cpu() -> None: ...

    @plain.task
    def plain_task() -> None: ...

    for task in (on_gpu, on_cpu, plain_task):
        signals.task_postrun.send(sender=task, task_id="t", task=task, args=(), kwargs={}, retval=None)
    assert len(emptied) == 1 + 0  # the GPU task of *app*; *other*'s hook ignores it, the rest are not GPU tasks
    del other


def test_redis_replies_are_parsed_by_hiredis() -> None:
    """The dependency that keeps a 64-GPU admission under 1 ms (BENCHMARKS §4): redis-py
    ignores a hiredis older than it accepts and falls back to its Python parser."""
    from redis.utils import HIREDIS_AVAILABLE

    assert HIREDIS_AVAILABLE
