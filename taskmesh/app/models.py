"""Declaring models: ``@app.model(name, vram=...)`` over a loader, and ``current_model()``
(with ``current_model_name()``: a task declared ``model=[...]`` runs with whichever fits).

A model is declared once, with its device memory and how to load (and optionally
unload) it; a task declared with ``model=name`` gets the loaded object from
``current_model()``. The config file may override a model's ``load_s`` (the first guess
at its load time) and ``never_evict`` (``models.<name>.*``), as it overrides tasks.
A ``model=`` naming nothing declared stays a plain label, as before warm models.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

from taskmesh.core.errors import ModelDeclarationError
from taskmesh.core.models import ModelSpec
from taskmesh.core.sizes import parse_mib

_current = threading.local()


@dataclasses.dataclass
class DeclaredModel:
    """A model an app can hold warm: its spec, its loader, and its unloader if any."""

    spec: ModelSpec
    loader: Callable[[], Any]
    unload: Callable[[Any], None] | None = None

    def unloader(self, fun: Callable[[Any], None]) -> Callable[[Any], None]:
        """Decorate the function that frees a loaded object (called before its memory is released)."""
        self.unload = fun
        return fun


def declare_model(app: Any, name: str, vram: Any, load_s: float | None = None, never_evict: bool = False,
                  unloader: Callable[[Any], None] | None = None) -> Callable[[Callable[[], Any]], DeclaredModel]:
    """``@app.model(...)``: validated at import, as tasks are, so a bad size breaks the deploy."""
    if not isinstance(name, str) or not name.strip():
        raise ModelDeclarationError(str(name), "a model needs a non-empty name such as 'qwen2.5:7b'")
    try:
        vram_mib = parse_mib(vram)
    except (TypeError, ValueError) as exc:
        raise ModelDeclarationError(name, f"vram {vram!r} cannot be read: {exc}") from None
    if load_s is not None and (isinstance(load_s, bool) or not isinstance(load_s, int | float) or load_s <= 0):
        raise ModelDeclarationError(name, f"load_s {load_s!r} must be a positive number of seconds")
    override = app.taskmesh_config.models.get(name, {})
    spec = ModelSpec(name, vram_mib, override.get("load_s", load_s), override.get("never_evict", never_evict))

    def register(loader: Callable[[], Any]) -> DeclaredModel:
        declared = DeclaredModel(spec, loader, unloader)
        declared_models(app)[name] = declared

        def warm_up() -> None:
            """Nothing: admission reserves the model and the pool process loads it (an exclusive
            batch's ``reload_after`` sends this to load again what was warm)."""

        app.task(name=f"taskmesh.warm.{name}", profile="gpu", model=name, ignore_result=True, shared=False,
                 time_limit=3600)(warm_up)
        return declared

    return register


def declared_models(app: Any) -> dict[str, DeclaredModel]:
    """The app's declared models by name (the worker reads this too)."""
    if getattr(app, "taskmesh_models", None) is None:
        app.taskmesh_models = {}
    return app.taskmesh_models


def current_model() -> Any:
    """The loaded object of the running task's declared model; raises ``LookupError`` outside one."""
    return _running("current_model")[0]


def current_model_name() -> str:
    """Which model the running task got: with ``model=[...]``, the one admission chose."""
    return _running("current_model_name")[1]


def _running(asked: str) -> tuple[Any, str]:
    model = getattr(_current, "model", None)
    if model is None:
        raise LookupError(f"{asked}() is only available inside a task declared with model= "
                          "naming a model declared with @app.model(...)")
    return model


def set_current(obj: Any | None, name: str = "") -> None:
    _current.model = None if obj is None else (obj, name)
