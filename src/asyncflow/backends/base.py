"""The execution-backend interface.

A backend receives batches of ready tasks and reports each outcome by event,
through the :class:`TaskReporter` the engine hands it when it is attached.
The engine never polls a backend.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Sequence
from typing import Protocol

from ..tasks import TaskFuture, TaskKind

__all__ = ["REMOTE", "ExecutionBackend", "TaskReporter", "log_started"]

#: The result a backend reports for a task whose value it keeps where the
#: task ran (``task._remote`` is its handle on it): the task is DONE at once,
#: and the engine asks the backend's ``fetch`` for the value only when
#: someone needs it here.
REMOTE: object = object()

_log = logging.getLogger("asyncflow.backends")


def log_started(task: TaskFuture, where: str = "") -> None:
    """Log (at DEBUG) that a task's work begins; call it from any thread."""
    if _log.isEnabledFor(logging.DEBUG):
        _log.debug(
            "started %s %r (attempt %d)%s", task.uid, task.name, task.attempts, where
        )


def cancelled_itself(task: TaskFuture, what: str = "the body of task") -> RuntimeError:
    """The error that fails an attempt whose own code raised CancelledError
    (not a cancel of the engine's, which settles the task or moves the
    attempt on first)."""
    return RuntimeError(
        f"{what} {task.name!r} ({task.uid}) raised CancelledError of its own"
    )


class TaskReporter(Protocol):
    """How a backend tells the engine what happened to a task.

    ``succeeded``/``failed`` must be called on the engine's event-loop
    thread. ``report_threadsafe`` may be called from any thread; reports are
    delivered to the loop in batches. Reports about tasks that are already
    finished (for instance cancelled meanwhile) are ignored.

    A task may be handed to a backend more than once (retries after a failure
    or a timeout); ``task.attempts`` numbers the hand-overs. A backend should
    drop the outcome of an attempt the engine has moved past, by comparing
    ``task.attempts`` with its value when the attempt was submitted.
    """

    def started(self, task: TaskFuture, attempt: int) -> None:
        """The attempt's work begins now (loop thread); its timeout starts."""

    def started_threadsafe(self, task: TaskFuture, attempt: int) -> None:
        """:meth:`started`, callable from any thread."""

    def succeeded(self, task: TaskFuture, result: object) -> None: ...

    def failed(self, task: TaskFuture, error: BaseException) -> None: ...

    def fetched(self, task: TaskFuture, ok: bool, value: object) -> None:
        """The value of a task reported as ``REMOTE`` is here (``ok``), or
        ``value`` is the exception saying why it cannot come (loop thread)."""

    def report_threadsafe(
        self, task: TaskFuture, ok: bool, value: object, attempt: int | None = None
    ) -> None:
        """``ok=True``: ``value`` is the result; otherwise it is the exception.
        ``attempt`` (the attempt the work belongs to) lets the engine drop the
        outcome of an attempt it has moved past; give it when you know it."""


class ExecutionBackend(abc.ABC):
    """Base class of execution backends.

    Lifecycle: the engine calls :meth:`attach` once (from
    ``WorkflowEngine.create``), then :meth:`submit` for each batch of ready
    tasks and :meth:`cancel` for running tasks the user cancels, and finally
    :meth:`shutdown`, which must stop running work and release resources.
    """

    #: True when the backend calls ``reporter.started`` as each attempt's
    #: work really begins (after any queueing of its own); a task's timeout
    #: then counts running time only. Otherwise it starts at submission.
    reports_start: bool = False

    #: True when the backend admits tasks by their ``resources=`` (and places
    #: them); otherwise it logs one warning the first time such a task comes.
    honours_resources: bool = False

    #: True when the backend takes a function task's dependencies as the
    #: :class:`TaskFuture` objects themselves (in ``args``/``kwargs``), so that
    #: it can pass values it keeps (``task._remote``) without fetching them.
    #: It may then also be handed a function task whose dependencies still run
    #: on it; it must start the task only once they have succeeded.
    passes_futures: bool = False

    #: True when the backend finishes function tasks without running them
    #: (``NoopExecutionBackend(eager=True)``): with no observers, checkpoint
    #: or command body ahead of it, such a task whose dependencies have
    #: succeeded is settled DONE with ``DRY_RUN_RESULT`` during its call, and
    #: never reaches :meth:`submit`.
    completes_at_call: bool = False

    #: Task kinds this backend can run; others fail with NotImplementedError.
    kinds: frozenset[TaskKind] = frozenset(
        {TaskKind.FUNCTION, TaskKind.EXECUTABLE, TaskKind.PROMPT}
    )

    def __init__(self, name: str = "default") -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"backend name must be a non-empty string, got {name!r}")
        self.name = name
        self._reporter: TaskReporter | None = None

    @property
    def reporter(self) -> TaskReporter:
        if self._reporter is None:
            raise RuntimeError(
                f"backend {self.name!r} is not attached to a WorkflowEngine"
            )
        return self._reporter

    async def attach(self, reporter: TaskReporter) -> None:
        """Bind the backend to one engine; start whatever it needs."""
        if self._reporter is not None:
            raise RuntimeError(
                f"backend {self.name!r} is already attached to a WorkflowEngine; "
                "create one backend object per engine"
            )
        self._reporter = reporter

    @abc.abstractmethod
    def submit(self, tasks: Sequence[TaskFuture]) -> None:
        """Start the given tasks. Must not block; called on the loop thread."""

    @abc.abstractmethod
    def cancel(self, task: TaskFuture) -> None:
        """Stop a running task's work as far as possible (best effort)."""

    def fetch(self, task: TaskFuture) -> None:
        """Bring the value of a task it reported with the result :data:`REMOTE`
        into this process, then call ``reporter.fetched(task, ok, value)``.
        Asked also while such a task still runs, when someone starts waiting
        for it. Only backends that report such results are asked."""
        raise NotImplementedError(f"backend {self.name!r} keeps no task values")

    def kill(self) -> None:  # noqa: B027 - optional: most backends hold no processes
        """Stop all running work at once, without grace (a second Ctrl-C).

        Called on the loop thread while :meth:`shutdown` may be under way;
        processes are killed with SIGKILL. The default does nothing.
        """

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Stop all work and release threads, processes and connections."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
