"""Run tasks on backends that speak the RHAPSODY / RADICAL task-dict protocol.

Those backends (RHAPSODY's concurrent, Dask, RADICAL-Pilot and Dragon
backends, for instance) take lists of task dictionaries in ``submit_tasks``
and report ``(task, state)`` through a registered callback. Passing one to
``WorkflowEngine.create`` wraps it in :class:`RhapsodyBackend` automatically.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from ..errors import ExecutableError
from ..tasks import TaskFuture, TaskKind
from .base import ExecutionBackend

__all__ = ["RhapsodyBackend", "TaskDictBackend"]

log = logging.getLogger("asyncflow.backends.rhapsody")


@runtime_checkable
class TaskDictBackend(Protocol):
    """The protocol of RHAPSODY (and RADICAL AsyncFlow) execution backends."""

    def register_callback(self, func: Any) -> None: ...

    async def submit_tasks(self, tasks: list[dict[str, Any]]) -> Any: ...

    async def cancel_task(self, uid: str) -> Any: ...

    async def shutdown(self) -> None: ...


class RhapsodyBackend(ExecutionBackend):
    """Adapts a task-dict backend to asyncflow's :class:`ExecutionBackend`."""

    def __init__(self, inner: TaskDictBackend, name: str | None = None) -> None:
        super().__init__(name or str(getattr(inner, "name", None) or "default"))
        self.inner = inner
        self._tasks: dict[str, tuple[TaskFuture, int]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._jobs: set[asyncio.Task[Any]] = set()
        states = (
            inner.get_task_states_map()
            if hasattr(inner, "get_task_states_map")
            else None
        )
        self._done = str(getattr(states, "DONE", "DONE"))
        self._failed = str(getattr(states, "FAILED", "FAILED"))
        self._cancelled = str(getattr(states, "CANCELED", "CANCELED"))

    async def attach(self, reporter: Any) -> None:
        await super().attach(reporter)
        self._loop = asyncio.get_running_loop()
        self.inner.register_callback(self._on_state)

    def submit(self, tasks: Sequence[TaskFuture]) -> None:
        dicts = []
        for task in tasks:
            self._tasks[task.uid] = (task, task.attempts)
            dicts.append(self._as_dict(task))
        self._spawn(self.inner.submit_tasks(dicts), tasks)

    @staticmethod
    def _as_dict(task: TaskFuture) -> dict[str, Any]:
        kind = task.kind
        description = dict(task.task_description)
        entry: dict[str, Any] = {
            "uid": task.uid,
            "name": task.name,
            "args": task.args,
            "kwargs": task.kwargs,
            "function": None,
            "executable": None,
            "arguments": [],
            "prompt": None,
            "task_backend_specific_kwargs": description,
            "capture_stdio": False,
        }
        if kind is TaskKind.FUNCTION:
            entry["function"] = task.function
        elif kind is TaskKind.EXECUTABLE:
            shell = description.setdefault("shell", True)
            if shell:
                entry["executable"] = task.command
            else:
                argv = shlex.split(task.command)
                entry["executable"], entry["arguments"] = argv[0], argv[1:]
        else:
            entry["prompt"] = task.command
        return entry

    def _spawn(self, coro: Any, tasks: Sequence[TaskFuture]) -> None:
        assert self._loop is not None
        job = self._loop.create_task(coro)
        self._jobs.add(job)

        def done(job: asyncio.Task[Any]) -> None:
            self._jobs.discard(job)
            if not job.cancelled() and job.exception() is not None:
                for task in tasks:
                    self._tasks.pop(task.uid, None)
                    self.reporter.failed(task, job.exception())  # type: ignore[arg-type]

        job.add_done_callback(done)

    def _on_state(self, task: Any, state: Any) -> None:
        record = task if isinstance(task, dict) else task.as_dict()
        state = str(getattr(state, "value", state))
        if state not in (self._done, self._failed, self._cancelled):
            return
        entry = self._tasks.pop(record.get("uid", ""), None)
        if entry is None:
            return
        future, attempt = entry
        if future.attempts != attempt:
            return
        report = self.reporter.report_threadsafe
        if state == self._done:
            if future.kind is TaskKind.FUNCTION:
                report(future, True, record.get("return_value"))
            else:
                report(future, True, record.get("stdout"))
        elif state == self._failed:
            report(future, False, self._error(future, record))
        else:
            report(
                future,
                False,
                RuntimeError(f"backend {self.name!r} cancelled task {future.name!r}"),
            )

    @staticmethod
    def _error(task: TaskFuture, record: dict[str, Any]) -> BaseException:
        error = record.get("exception")
        if isinstance(error, BaseException):
            return error
        if task.kind is TaskKind.EXECUTABLE and record.get("exit_code") is not None:
            return ExecutableError(
                task.name,
                task.command,
                int(record["exit_code"]),
                str(record.get("stdout") or ""),
                str(record.get("stderr") or ""),
            )
        return RuntimeError(
            f"task {task.name!r} failed: {record.get('stderr') or 'no details given'}"
        )

    def cancel(self, task: TaskFuture) -> None:
        if self._tasks.pop(task.uid, None) is not None:
            self._spawn(self.inner.cancel_task(task.uid), ())

    async def shutdown(self) -> None:
        await self.inner.shutdown()
        for job in list(self._jobs):
            job.cancel()
        self._tasks.clear()


def adapt(backend: object) -> ExecutionBackend | None:
    """Wrap a task-dict backend; None when ``backend`` is not one."""
    if isinstance(backend, TaskDictBackend) and not isinstance(
        backend, ExecutionBackend
    ):
        return RhapsodyBackend(backend)
    return None
