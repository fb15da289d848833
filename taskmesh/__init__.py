"""taskmesh: resource-aware Celery. Declare what a task needs; it lands where it fits."""

from .app import TaskmeshCelery, TaskmeshTask, create_app
from .errors import ConfigError, InfeasibleRequirement, QueueFull, RequirementError, TaskmeshError
from .gpu import GpuInfo, GpuProvider, NvmlProvider, SimulatedProvider
from .profiles import Priority, Profile
from .requirements import Requirement

__all__ = [
    "ConfigError",
    "GpuInfo",
    "GpuProvider",
    "InfeasibleRequirement",
    "NvmlProvider",
    "Priority",
    "Profile",
    "QueueFull",
    "Requirement",
    "RequirementError",
    "SimulatedProvider",
    "TaskmeshCelery",
    "TaskmeshError",
    "TaskmeshTask",
    "create_app",
]
__version__ = "0.1.0"
