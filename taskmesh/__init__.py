"""taskmesh: resource-aware Celery. Declare what a task needs; it lands where it fits."""

from taskmesh.app import TaskmeshCelery, TaskmeshTask, create_app
from taskmesh.app.batch_jobs import batch_status, cancel_batch, submit_batch
from taskmesh.app.models import current_model, current_model_name
from taskmesh.core.batching import RetryItem
from taskmesh.core.errors import (
    ConfigError,
    InfeasibleRequirement,
    ModelDeclarationError,
    ModelLoadError,
    QueueFull,
    RequirementError,
    TaskmeshError,
)
from taskmesh.core.gpus import GpuInfo, GpuProvider
from taskmesh.core.profiles import Priority, Profile
from taskmesh.core.requirements import Requirement
from taskmesh.hardware.nvml import NvmlProvider
from taskmesh.hardware.simulated import SimulatedProvider

__all__ = [
    "ConfigError",
    "GpuInfo",
    "GpuProvider",
    "InfeasibleRequirement",
    "ModelDeclarationError",
    "ModelLoadError",
    "NvmlProvider",
    "Priority",
    "Profile",
    "QueueFull",
    "Requirement",
    "RequirementError",
    "RetryItem",
    "SimulatedProvider",
    "TaskmeshCelery",
    "TaskmeshError",
    "TaskmeshTask",
    "batch_status",
    "cancel_batch",
    "create_app",
    "current_model",
    "current_model_name",
    "submit_batch",
]
__version__ = "0.1.0"
