"""Holding models warm in the process that runs the tasks (a prefork child: CUDA lives there).

Each pool process keeps the models it loaded until one is evicted, so a model is loaded
once per process and counted once per process in the ledger. Admission (in the worker's
main process) decides what a run may do and says it in the ``taskmesh_warm`` header: the
task's reservation id, the model memory that reservation carries because the model was
not warm (``claim``), and the idle models to unload first (``evict``). Here, around the
task body:

* evict: unloader, then ``torch.cuda.empty_cache()``, then the model's reservation is
  moved to the task that needed the memory (one Lua step, ``state.models.move``);
* load: the loader runs; on success the claim moves from the task's reservation to the
  model's own long-lived one, so the pool's total never changes; on failure the task
  fails with ``ModelLoadError`` and the claim goes when the task's reservation does;
* each step is written to the worker's model hash, which the heartbeat refreshes and
  the reports read (the GPU's state: loading, ready, busy, unloading).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from taskmesh.app.models import DeclaredModel, declared_models, set_current
from taskmesh.core.claims import gpu_pool
from taskmesh.core.errors import ModelLoadError
from taskmesh.core.headers import GPUS_HEADER, WARM_HEADER
from taskmesh.core.models import BUSY, IDLE, LOADING, READY, UNLOADING, model_reservation
from taskmesh.state.models import ModelStore


@dataclasses.dataclass
class Loaded:
    obj: Any
    declared: DeclaredModel
    pool: str | None
    reservation: str
    adopted_from: str  # the task reservation its memory came from (the heartbeat counts it once)
    loaded_at: float
    last_used: float
    tasks: int = 0


_loaded: dict[str, Loaded] = {}  # this process's warm models
_loading = threading.Lock()
_stores: dict[int, ModelStore] = {}


def _store(app: Any) -> ModelStore:
    if id(app) not in _stores:
        _stores[id(app)] = ModelStore(app.redis(), ttl_s=app.taskmesh_config.admission.reservation_ttl_s)
    return _stores[id(app)]


def _publish(store: ModelStore, node: str, state: str, task: str | None = None, pool: str | None = None,
             loading: str | None = None) -> None:
    models = {name: {"vram_mib": m.declared.spec.vram_mib, "pool": m.pool, "reservation": m.reservation,
                     "adopted_from": m.adopted_from, "loaded_at": m.loaded_at, "last_used": m.last_used,
                     "tasks": m.tasks, "never_evict": m.declared.spec.never_evict}
              for name, m in _loaded.items()}
    store.hold(node, os.getpid(), {"state": state, "since": time.time(), "task": task, "pool": pool,
                                   "loading": loading, "models": models})


def _empty_cache() -> None:
    torch = sys.modules.get("torch")  # a loader that used CUDA imported it; importing it here would cost seconds
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _unload(store: ModelStore, node: str, name: str, task_reservation: str, amount: int) -> None:
    loaded = _loaded.get(name)
    if loaded is None:
        return
    _publish(store, node, UNLOADING, pool=loaded.pool)
    try:
        if loaded.declared.unload is not None:
            loaded.declared.unload(loaded.obj)
    finally:
        del _loaded[name]
        loaded.obj = None
        _empty_cache()
        if loaded.pool is not None:  # only now is its memory free: it passes to the task that evicted it
            store.move(loaded.pool, loaded.reservation, task_reservation, amount, drop=True)
        _publish(store, node, READY if _loaded else IDLE)


def _load(store: ModelStore, node: str, declared: DeclaredModel, pool: str | None, warm: dict[str, Any],
          task_id: str) -> Loaded:
    spec = declared.spec
    _publish(store, node, LOADING, task_id, pool, loading=spec.name)
    started = time.monotonic()
    try:
        obj = declared.loader()
    except Exception as exc:
        _publish(store, node, READY if _loaded else IDLE)
        raise ModelLoadError(f"model {spec.name!r} failed to load: {type(exc).__name__}: {exc} "
                             f"(its loader raised; nothing stays reserved for it)") from exc
    seconds = time.monotonic() - started
    store.record_load(spec.name, seconds, spec.load_s)
    reservation = model_reservation(node, os.getpid(), spec.name)
    if pool is not None:  # the claim the task carried becomes the model's own reservation; admitted as
        # warm but not held by this process (another pool process holds it), it is counted anyway: it is in use
        store.move(pool, warm["reservation"] if warm.get("claim") else "", reservation, spec.vram_mib)
    now = time.time()
    loaded = Loaded(obj, declared, pool, reservation, warm["reservation"], now, now)
    _loaded[spec.name] = loaded
    return loaded


def run_warm(task: Any, body: Callable[[], Any]) -> Any:
    """Run *body* for *task* with its model loaded (and what must be evicted, unloaded)."""
    request = task.request
    warm = getattr(request, WARM_HEADER, None)
    if not isinstance(warm, dict):
        return body()  # not admitted for a warm model (called directly, an older worker)
    store = _store(task.app)
    node = request.hostname
    gpus = getattr(request, GPUS_HEADER, None) or []
    pool = gpu_pool(gpus[0]) if gpus else None
    for name, amount in warm.get("evict") or ():
        _unload(store, node, name, warm["reservation"], amount)
    chosen = warm.get("model") or task.requirement.model  # of model=[...], the one admission chose
    declared = declared_models(task.app).get(chosen or "")
    if declared is None:
        return body()
    with _loading:  # a threads pool's slots share one process's models: one load each
        loaded = _loaded.get(declared.spec.name)
        if loaded is None:
            loaded = _load(store, node, declared, pool, warm, request.id)
        elif warm.get("claim") and pool is not None:  # it was warm here after all: the claim is not needed
            store.move(pool, warm["reservation"], "", warm["claim"])
    _publish(store, node, BUSY, request.id, pool)
    set_current(loaded.obj, declared.spec.name)
    try:
        return body()
    finally:
        set_current(None)
        loaded.last_used = time.time()
        loaded.tasks += 1
        _publish(store, node, READY)
