"""Finding the user's app from ``-A``, as ``celery -A`` does (the current directory first)."""

from __future__ import annotations

import os
import sys
from typing import Any

import click
from celery.app.utils import find_app


def load_app(path: str) -> Any:
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return find_app(path)


def app_path(ctx: click.Context) -> str | None:
    return ctx.meta.get("taskmesh.app")
