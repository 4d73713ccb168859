"""Task definitions, task futures and their states.

A :class:`TaskFuture` is both what the user awaits and the engine's per-task
record: one object per task call, with slots only, so that registering a task
allocates as little as possible.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backends.base import ExecutionBackend
    from .engine import WorkflowEngine

__all__ = ["TaskDefinition", "TaskFuture", "TaskKind", "TaskState"]


class TaskState(str, enum.Enum):
    """Lifecycle of a task or block; compares equal to its plain string."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return self.value.__format__(spec)

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED})


class TaskKind(str, enum.Enum):
    """What a task's body produces and how a backend runs it."""

    FUNCTION = "function"
    """The body is the work; its return value is the result."""
    EXECUTABLE = "executable"
    """The body returns a command line; the backend runs it."""
    PROMPT = "prompt"
    """The body returns a prompt; an AI backend answers it."""
    BLOCK = "block"
    """The body orchestrates other tasks on the engine's event loop."""

    def __str__(self) -> str:
        return self.value


class TaskDefinition:
    """What a decorator captured: shared by every call of one task."""

    __slots__ = (
        "backend",
        "description",
        "function",
        "is_async",
        "kind",
        "name",
        "options",
    )

    def __init__(
        self,
        function: Callable[..., Any],
        kind: TaskKind,
        description: Mapping[str, Any],
        backend: ExecutionBackend | None,
        options: Mapping[str, Any],
    ) -> None:
        self.function = function
        self.kind = kind
        self.name: str = getattr(function, "__name__", type(function).__name__)
        self.is_async = inspect.iscoroutinefunction(function)
        self.description: dict[str, Any] = dict(description)
        self.backend = backend
        self.options: dict[str, Any] = dict(options)


class TaskFuture(asyncio.Future):  # type: ignore[type-arg]
    """The future a task or block call returns.

    It is an :class:`asyncio.Future`, so it can be awaited, gathered, waited
    on and given done-callbacks. ``state`` tells which lifecycle stage the task
    is in; it is already terminal when any done-callback runs.

    Backends read ``kind``, ``function``, ``args``, ``kwargs``, ``command``
    and ``task_description``; everything else is the engine's.
    """

    __slots__ = (
        "_block",
        "_command",
        "_definition",
        "_dependents",
        "_deps",
        "_description",
        "_engine",
        "_handle",
        "_members",
        "_waiting",
        "args",
        "kwargs",
        "name",
        "state",
        "uid",
        "workflow_id",
    )

    uid: str
    name: str
    state: TaskState
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    workflow_id: str | None
    _engine: WorkflowEngine
    _definition: TaskDefinition
    _description: dict[str, Any]
    _deps: list[TaskFuture] | None
    _dependents: list[TaskFuture] | None
    _waiting: int
    _block: TaskFuture | None
    _members: set[TaskFuture] | None
    _command: Any
    _handle: Any

    @property
    def kind(self) -> TaskKind:
        return self._definition.kind

    @property
    def function(self) -> Callable[..., Any]:
        """The task's body, as written by the user."""
        return self._definition.function

    @property
    def is_async(self) -> bool:
        return self._definition.is_async

    @property
    def task_description(self) -> dict[str, Any]:
        """Backend resource hints: definition defaults merged with call-time keys."""
        return self._description

    @property
    def command(self) -> Any:
        """The command (executable tasks) or prompt (prompt tasks) the body returned."""
        return self._command

    @property
    def dependencies(self) -> tuple[TaskFuture, ...]:
        """The futures this task waits for (empty once it has finished)."""
        return tuple(self._deps or ())

    def cancel(self, msg: Any | None = None) -> bool:
        """Cancel the task: locally if PENDING, in its backend if RUNNING.

        Returns ``True`` when the task was not finished yet; it is then
        CANCELLED, whatever the backend does with the request.
        """
        if self.state in _TERMINAL:
            return False
        self._engine._scheduler.cancel(self, msg)
        return True

    def __repr__(self) -> str:
        return f"<TaskFuture {self.uid} {self.name!r} {self.state.value}>"
