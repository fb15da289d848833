"""Giving PyTorch's cached GPU memory back after a taskmesh GPU task, so NVML shows it free.

Admission trusts NVML's "free"; a cache kept by an idle pool process would otherwise
look like memory in use and hold the next task back. Connected once per app and
only for that app's GPU and mixed tasks: nothing process-global that a user did not
ask for.
"""

from __future__ import annotations

import sys
from typing import Any

from celery import signals

from taskmesh.core.profiles import Profile

GPU_PROFILES = (Profile.GPU_INTENSIVE, Profile.MIXED)


def connect_empty_cache(app: Any) -> None:
    def empty_cache(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not app:
            return
        requirement = getattr(sender, "requirement", None)
        if requirement is None or requirement.profile not in GPU_PROFILES:
            return
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    signals.task_postrun.connect(empty_cache, weak=False, dispatch_uid=f"taskmesh-empty-cache-{id(app)}")
