"""The exceptions taskmesh raises: each one names the thing at fault and the fix."""

from __future__ import annotations


class TaskmeshError(Exception):
    """Base of every error taskmesh raises on purpose."""


class RequirementError(TaskmeshError, ValueError):
    """A task declared resources that cannot be read; raised at import, naming the task."""

    def __init__(self, task: str, problem: str) -> None:
        self.task = task
        super().__init__(f"task {task!r}: {problem}")


class ConfigError(TaskmeshError, ValueError):
    """A hardware/config file or environment variable that cannot be used."""

    def __init__(self, source: str, key: str | None, problem: str, fix: str | None = None) -> None:
        self.source, self.key, self.problem, self.fix = source, key, problem, fix
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {problem}" + (f"; {fix}" if fix else ""))


class QueueFull(TaskmeshError):
    """A queue is at its ``max_depth``; nothing was sent."""


class InfeasibleRequirement(TaskmeshError):
    """No hardware known to the registry can ever run the task; nothing was sent."""


class AppLoadError(TaskmeshError):
    """The app named by ``-A`` could not be imported; says why, where, and the fix."""


class MessageRefused(TaskmeshError):
    """A worker refused a message it cannot run safely (its ``taskmesh`` header or its body
    cannot be read); the task did not run. Stored as the task's result, so ``.get()`` says why."""


class ModelLoadError(TaskmeshError):
    """A task's declared model could not be loaded (its loader raised, or its memory could not
    be reserved); the task failed, and nothing stays reserved for the model."""


class ModelDeclarationError(TaskmeshError, ValueError):
    """``@app.model(...)`` was given something that cannot be used; raised at import, naming the model."""

    def __init__(self, model: str, problem: str) -> None:
        self.model = model
        super().__init__(f"model {model!r}: {problem}")
