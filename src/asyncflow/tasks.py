"""Task definitions, task futures and their states.

A :class:`TaskFuture` is both what the user awaits and the engine's per-task
record: one object per task call, with slots only, so that registering a task
allocates as little as possible.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .resources import Request

if TYPE_CHECKING:
    from .backends.base import ExecutionBackend
    from .engine import WorkflowEngine

__all__ = ["TaskDefinition", "TaskFuture", "TaskKind", "TaskOptions", "TaskState"]


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


class TaskOptions:
    """Per-task settings: retries, timeout, result caching, resources and
    priority."""

    __slots__ = (
        "cache",
        "cache_key",
        "priority",
        "resources",
        "retries",
        "retry_backoff",
        "retry_delay",
        "retry_on",
        "timeout",
        "version",
    )

    def __init__(
        self,
        retries: int = 0,
        retry_delay: float = 0.0,
        retry_backoff: float = 2.0,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = Exception,
        timeout: float | None = None,
        cache: bool = True,
        cache_key: Callable[..., Any] | None = None,
        version: str | None = None,
        resources: Mapping[str, Any] | Request | None = None,
        priority: int = 0,
    ) -> None:
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        if retry_delay < 0 or retry_backoff < 1:
            raise ValueError(
                "retry_delay must be >= 0 and retry_backoff >= 1, got "
                f"{retry_delay!r} and {retry_backoff!r}"
            )
        kinds = retry_on if isinstance(retry_on, tuple) else (retry_on,)
        if not kinds or not all(
            isinstance(k, type) and issubclass(k, BaseException) for k in kinds
        ):
            raise TypeError(
                f"retry_on must be an exception type or a tuple of them, got {retry_on!r}"
            )
        if timeout is not None and not timeout > 0:
            raise ValueError(
                f"timeout must be a positive number of seconds, got {timeout!r}"
            )
        self.retries = retries
        self.retry_delay = float(retry_delay)
        self.retry_backoff = float(retry_backoff)
        self.retry_on: tuple[type[BaseException], ...] = kinds
        if cache_key is not None and not callable(cache_key):
            raise TypeError(
                "cache_key must be a callable taking the task's arguments, got "
                f"{type(cache_key).__name__}"
            )
        if version is not None and not isinstance(version, str):
            raise TypeError(f"version must be a str, got {type(version).__name__}")
        self.timeout = timeout
        self.cache = bool(cache)
        #: Called with the task's resolved arguments; its return value stands
        #: for the arguments in the cache key.
        self.cache_key = cache_key
        #: Stands for the body's code (and what it reads) in the cache key.
        self.version = version
        #: What the task needs (None: the default, one cpu); see resources.py.
        self.resources = Request.parse(resources)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise TypeError(f"priority must be an int, got {type(priority).__name__}")
        #: Among ready tasks waiting for a backend, higher starts first.
        self.priority = priority

    def replace(self, **changes: Any) -> TaskOptions:
        current = {name: getattr(self, name) for name in self.__slots__}
        current.update(changes)
        return TaskOptions(**current)

    def delay_before(self, attempt: int) -> float:
        """Seconds to wait before attempt number ``attempt`` (2, 3, ...)."""
        return self.retry_delay * self.retry_backoff ** (attempt - 2)


DEFAULT_OPTIONS = TaskOptions()


def task_name(function: Callable[..., Any]) -> str:
    """A task's name: the function's, seen through functools.partial."""
    while isinstance(function, functools.partial):
        function = function.func
    name = getattr(function, "__name__", None)
    return name if isinstance(name, str) else type(function).__name__


class TaskDefinition:
    """What a decorator captured: shared by every call of one task."""

    __slots__ = (
        "_code_hash",
        "backend",
        "capture_stdio",
        "description",
        "function",
        "is_async",
        "kind",
        "name",
        "options",
        "priority",
        "reliability",
        "resources",
    )

    def __init__(
        self,
        function: Callable[..., Any],
        kind: TaskKind,
        description: Mapping[str, Any],
        backend: ExecutionBackend | None,
        options: TaskOptions = DEFAULT_OPTIONS,
        capture_stdio: bool = False,
    ) -> None:
        self.function = function
        self.kind = kind
        self.name: str = task_name(function)
        self.is_async = inspect.iscoroutinefunction(function)
        self.description: dict[str, Any] = dict(description)
        self.backend = backend
        self.options = options
        # None on the hot path when there is nothing to retry or time out.
        self.reliability: TaskOptions | None = (
            None if options.retries == 0 and options.timeout is None else options
        )
        self._code_hash: str | None = None
        self.capture_stdio = capture_stdio
        self.resources: Request | None = options.resources
        self.priority: int = options.priority

    def with_options(self, options: TaskOptions) -> TaskDefinition:
        derived = TaskDefinition(
            self.function,
            self.kind,
            self.description,
            self.backend,
            options,
            self.capture_stdio,
        )
        derived._code_hash = self._code_hash
        return derived


class TaskFuture(asyncio.Future):  # type: ignore[type-arg]
    """The future a task or block call returns.

    It is an :class:`asyncio.Future`, so it can be awaited, gathered, waited
    on and given done-callbacks. ``state`` tells which lifecycle stage the task
    is in; it is already terminal when any done-callback runs.

    Backends read ``kind``, ``function``, ``args``, ``kwargs``, ``command``
    and ``task_description``; everything else is the engine's.

    A task that ran on a cluster backend (Dask) may finish with its value
    left on the cluster: ``state`` is ``DONE`` at once and dependents on
    that cluster receive the value there, but the value comes into this
    process only when someone waits for it (``await``, ``asyncio.gather``,
    ``asyncio.wait``, ``add_done_callback``); ``done()`` is ``True`` from
    then on.
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
        "_key",
        "_members",
        "_remote",
        "_seq",
        "_timer",
        "_uid",
        "_waiting",
        "args",
        "attempts",
        "finished_at",
        "kwargs",
        "name",
        "restored",
        "started_at",
        "state",
        "submitted_at",
        "workflow_id",
    )

    name: str
    state: TaskState
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    workflow_id: str | None
    attempts: int
    """The number of the task's current attempt: 1, then 2, 3, ... for retries
    (already the next one while a retry waits for its delay)."""
    restored: bool
    """True when the result came from the engine's checkpoint, not a run."""
    submitted_at: float | None
    """Epoch seconds when the (current) attempt was handed to its backend."""
    started_at: float | None
    """Epoch seconds when the (current) attempt started running."""
    finished_at: float | None
    """Epoch seconds when the task reached its final state."""
    _engine: WorkflowEngine
    _definition: TaskDefinition
    _description: dict[str, Any]
    _deps: Sequence[TaskFuture] | None
    #: One dependent task, or a list of them (most tasks have one or none).
    _dependents: TaskFuture | list[TaskFuture] | None
    _waiting: int
    _block: TaskFuture | None
    _members: set[TaskFuture] | None
    _seq: int
    _command: Any
    _handle: Any
    _timer: asyncio.TimerHandle | None
    _key: str | None
    _remote: Any
    """The backend's handle on the value it keeps (a Dask future), or None."""

    _uid: str | None
    """The uid, once made: it is made from ``_seq`` when first asked for."""

    @property
    def uid(self) -> str:
        """The task's id in its engine: ``task.000001``, ``block.000002``, ..."""
        uid = self._uid
        if uid is None:
            kind = "block" if self._definition.kind is TaskKind.BLOCK else "task"
            uid = self._uid = f"{kind}.{self._seq:06d}"
        return uid

    @uid.setter
    def uid(self, value: str) -> None:
        self._uid = value

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
    def resources(self) -> Request | None:
        """What the task asked for (``None``: nothing declared, one cpu)."""
        return self._definition.resources

    @property
    def priority(self) -> int:
        """Among ready tasks waiting for their backend, higher starts first."""
        return self._definition.priority

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

    def add_done_callback(
        self, fn: Callable[[TaskFuture], object], /, *, context: Any = None
    ) -> None:
        """As :meth:`asyncio.Future.add_done_callback`; waiting for a task
        whose value is (or will be) left on its cluster fetches that value."""
        try:
            remote = self._remote
        except AttributeError:  # a future made outside an engine
            remote = None
        if remote is not None and not _future_done(self):
            self._engine._scheduler.fetch(self)
        _add_done_callback(self, fn, context=context)

    def result(self) -> Any:
        """As :meth:`asyncio.Future.result`. A task whose value is still on
        its cluster raises :class:`asyncio.InvalidStateError` (and its value
        is fetched): await the future instead."""
        if not _future_done(self) and self.state is _DONE and self._remote is not None:
            self._engine._scheduler.fetch(self)
            if not _future_done(self):
                raise asyncio.InvalidStateError(
                    f"the result of task {self.name!r} ({self.uid}) is still on "
                    "the cluster that ran it: await the future (or gather or "
                    "wait for it) to fetch it"
                )
        return _future_result(self)

    def set_result(self, result: Any, /) -> None:
        raise RuntimeError(_SETTLED_BY_ENGINE.format(self=self, what="set_result"))

    def set_exception(self, exception: Any, /) -> None:
        raise RuntimeError(_SETTLED_BY_ENGINE.format(self=self, what="set_exception"))

    def __repr__(self) -> str:
        return f"<TaskFuture {self.uid} {self.name!r} {self.state.value}>"


_DONE = TaskState.DONE
_future_done = asyncio.Future.done
_future_result = asyncio.Future.result
_add_done_callback = asyncio.Future.add_done_callback

_SETTLED_BY_ENGINE = (
    "{what}() on the future of task {self.name!r} ({self.uid}): task futures are "
    "settled by the engine when their work ends; to stop a task, call "
    ".cancel(); to give a value to later tasks, return it from the task body"
)
