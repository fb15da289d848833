"""Finding the user's app from ``-A``, as ``celery -A`` does (the current directory first).

A mistake here is the first thing a new user meets, so it is one line naming the
module, what went wrong and where, and the fix — never the import machinery's
traceback (``python -c "import <module>"`` shows that, and the line says so).
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

import click
from celery.app.utils import find_app

from taskmesh.core.errors import AppLoadError, TaskmeshError


def load_app(path: str) -> Any:
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module = path.split(":", 1)[0]
    try:
        return find_app(path)
    except TaskmeshError:
        raise
    except ModuleNotFoundError as exc:
        if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
            raise AppLoadError(
                f"-A {path}: no module named {exc.name!r} in {os.getcwd()} or on PYTHONPATH; run taskmesh from "
                "the directory that holds it, or add that directory to PYTHONPATH"
            ) from None
        raise AppLoadError(f"-A {path}: {_where(exc)} it imports {exc.name!r}, which is not installed; "
                           f"install it in this environment ({sys.executable})") from None
    except Exception as exc:  # the user's module raised while being imported
        raise AppLoadError(f"-A {path}: importing it raised {type(exc).__name__}: {exc} {_where(exc)}; fix the "
                           f'module (python -c "import {module}" shows the traceback)') from None


def _where(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "importlib" not in f.filename]
    user = [f for f in frames if "site-packages" not in f.filename] or frames
    return f"at {user[-1].filename}:{user[-1].lineno}" if user else ""


def app_path(ctx: click.Context) -> str | None:
    return ctx.meta.get("taskmesh.app")
