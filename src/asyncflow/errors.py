"""Exceptions raised by asyncflow."""

from __future__ import annotations

import signal
from collections.abc import Sequence
from typing import Any

__all__ = [
    "AsyncFlowError",
    "CheckpointError",
    "DependencyFailureError",
    "ExecutableError",
    "ResourceError",
    "TaskTimeoutError",
    "WorkerLostError",
]

_STDERR_TAIL_LINES = 10


class AsyncFlowError(Exception):
    """Base class of the errors asyncflow raises on its own behalf."""


class DependencyFailureError(AsyncFlowError):
    """A task did not run because a task it depends on failed.

    ``failed_dependencies`` names the upstream tasks that had failed when the
    task was given up; ``root_cause`` (also ``__cause__``) is the exception
    that started the chain, however many hops upstream it was raised.
    """

    def __init__(
        self,
        message: str,
        failed_dependencies: Sequence[str] | None = None,
        root_cause: BaseException | None = None,
    ) -> None:
        super().__init__(message)
        self.failed_dependencies: list[str] = list(failed_dependencies or ())
        self.root_cause = root_cause
        if root_cause is not None:
            self.__cause__ = root_cause


class ExecutableError(AsyncFlowError, RuntimeError):
    """An executable task's command exited with a non-zero status.

    A negative ``exit_code`` means the process was killed by that signal.
    """

    def __init__(
        self,
        task_name: str,
        command: str | Sequence[str],
        exit_code: int,
        stdout: str,
        stderr: str,
    ) -> None:
        self.task_name = task_name
        self.command = command
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(self._describe())

    def _describe(self) -> str:
        if self.exit_code < 0:
            try:
                how = f"was killed by {signal.Signals(-self.exit_code).name}"
            except ValueError:
                how = f"was killed by signal {-self.exit_code}"
        else:
            how = f"exited with code {self.exit_code}"
        message = f"executable task {self.task_name!r} {how}: {self.command!r}"
        tail = self.stderr.rstrip().splitlines()[-_STDERR_TAIL_LINES:]
        if tail:
            message += "\nstderr (last lines):\n" + "\n".join(tail)
        return message

    def __reduce__(self) -> tuple[object, ...]:
        return (
            type(self),
            (self.task_name, self.command, self.exit_code, self.stdout, self.stderr),
        )


class TaskTimeoutError(AsyncFlowError, TimeoutError):
    """A task attempt ran longer than its ``timeout``; its work was stopped."""

    def __init__(
        self, task_name: str, timeout: float, attempt: int = 1, detail: str = ""
    ) -> None:
        self.task_name = task_name
        self.timeout = timeout
        self.attempt = attempt
        self.detail = detail
        super().__init__(
            f"task {task_name!r} timed out after {timeout:g}s (attempt {attempt})"
            + (f"; {detail}" if detail else "")
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (
            type(self),
            (self.task_name, self.timeout, self.attempt, self.detail),
        )


class WorkerLostError(AsyncFlowError, RuntimeError):
    """The worker process running (or holding) a task died abruptly."""


class ResourceError(AsyncFlowError, ValueError):
    """A task asked for more of a resource than its backend can ever give.

    ``resource`` names it (``"cpus"``, ``"gpus"``, ``"memory"`` or a custom
    name), ``requested`` is the amount asked and ``capacity`` the backend's.
    """

    def __init__(
        self, resource: str, requested: int, capacity: int, where: str = ""
    ) -> None:
        self.resource = resource
        self.requested = requested
        self.capacity = capacity
        unit = " bytes of" if resource == "memory" else ""
        setting = (
            f"{resource}=..."
            if resource in ("cpus", "gpus", "memory")
            else f"custom={{{resource!r}: ...}}"
        )
        self.where = where
        super().__init__(
            f"the task asks for {requested}{unit} {resource} but "
            f"{where or 'its backend'} has {capacity} in all: it could never "
            "start; lower the request or give the backend more (its "
            f"{setting} keyword)"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            type(self),
            (self.resource, self.requested, self.capacity, self.where),
        )


class CheckpointError(AsyncFlowError):
    """A checkpoint file cannot be used (corrupt, foreign or incompatible)."""
