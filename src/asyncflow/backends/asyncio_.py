"""Run ``async def`` bodies directly on the engine's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from functools import partial
from typing import Any

from ..resources import (
    Capacity,
    Gate,
    Grant,
    reset_current,
    set_current,
)
from ..tasks import TaskFuture, TaskKind, TaskState
from ._pool import DaemonThreadPool
from ._subprocess import SubprocessRunner
from .base import ExecutionBackend, TaskReporter, cancelled_itself, log_started

__all__ = ["AsyncioExecutionBackend"]


def _started_then_call(reporter: TaskReporter, task: TaskFuture, attempt: int) -> Any:
    task.started_at = time.time()
    if task._definition.reliability is not None:
        reporter.started_threadsafe(task, attempt)
    return task._definition.function(*task.args, **task.kwargs)


async def _granted(grant: Grant, body: Any) -> Any:
    """Await ``body`` with ``grant`` as what current_resources() returns."""
    token = set_current(grant)
    try:
        return await body
    finally:
        reset_current(token)


class AsyncioExecutionBackend(ExecutionBackend):
    """The fastest path for I/O-bound work (HTTP calls, LLM requests, ...).

    ``async def`` bodies run as asyncio tasks on the engine's own loop, so
    they must not block; plain ``def`` bodies run in a pool of daemon
    threads (``max_threads``, default as ``ThreadPoolExecutor``), so that a
    body stuck in a blocking call cannot keep the program alive after
    shutdown. Executable tasks run as subprocesses, at most
    ``max_subprocesses`` at once (default: the number of CPUs).

    Resources (docs/resources.md): ``cpus``, ``gpus``, ``memory`` and
    ``custom`` are what the backend hands out, as on
    :class:`~asyncflow.LocalExecutionBackend`; coroutines mostly wait, so
    ``cpus`` is unbounded unless given.
    """

    kinds = frozenset({TaskKind.FUNCTION, TaskKind.EXECUTABLE})
    reports_start = True
    honours_resources = True

    def __init__(
        self,
        name: str = "default",
        *,
        max_subprocesses: int | None = None,
        max_threads: int | None = None,
        cpus: int | None = None,
        gpus: int | Sequence[str] | str | None = None,
        memory: int | str | None = None,
        custom: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__(name)
        limit = max_subprocesses or os.cpu_count() or 1
        self._subprocesses = SubprocessRunner(limit, on_end=self._executable_ended)
        #: What this backend hands out to tasks (docs/resources.md).
        self.capacity = Capacity(cpus, gpus, memory, custom)
        self._gate = Gate(self.capacity, {"fn": None, "exec": limit}, self._start, name)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._max_threads = max_threads
        self._threads: DaemonThreadPool | None = None  # made on first use

    async def attach(self, reporter: TaskReporter) -> None:
        await super().attach(reporter)
        self._loop = asyncio.get_running_loop()
        self._subprocesses.bind(reporter)

    def submit(self, tasks: Sequence[TaskFuture]) -> None:
        if len(tasks) > 1 and any(t._definition.priority for t in tasks):
            tasks = sorted(tasks, key=lambda t: -t._definition.priority)
        for task, error in self._gate.offer(tasks):
            self.reporter.failed(task, error)

    def _start(self, task: TaskFuture, attempt: int, grant: Grant) -> None:
        """Start an admitted task (always on the loop: all work ends there)."""
        if task._definition.kind is TaskKind.EXECUTABLE:
            placed = task._definition.resources is not None
            self._subprocesses.submit(
                task,
                grant,
                grant.environment(self.capacity.manages_gpus) if placed else None,
            )
            return
        loop = self._loop
        assert loop is not None
        runner = loop.create_task(self._run(task, attempt, grant))
        runner.add_done_callback(functools.partial(self._ran, grant))
        task._handle = runner

    def _executable_ended(self, grant: Grant) -> None:
        self._gate.release(grant, "exec")

    def _ran(self, grant: Grant, runner: asyncio.Task[None]) -> None:
        # A callback, not a ``finally``: a runner cancelled before its first
        # step never enters its body, and would keep what it holds.
        self._gate.release(grant, "fn")

    async def _run(self, task: TaskFuture, attempt: int, grant: Grant) -> None:
        definition = task._definition
        reporter = self.reporter
        log_started(task)
        pending: Future[Any] | None = None
        try:
            if definition.is_async:
                reporter.started(task, attempt)
                value = await _granted(
                    grant, definition.function(*task.args, **task.kwargs)
                )
            else:
                if self._threads is None:
                    self._threads = DaemonThreadPool(
                        self._max_threads, thread_name_prefix=f"asyncflow-{self.name}"
                    )
                call = partial(_started_then_call, reporter, task, attempt)
                # In a copy of this task's context where current_resources()
                # sees its grant (the engine's own work never does).
                context = contextvars.copy_context()
                context.run(set_current, grant)
                pending = self._threads.submit(context.run, call)
                try:
                    value = await asyncio.wrap_future(pending)
                finally:
                    if definition.reliability is None and task.started_at:
                        # At the time the thread noted (no report of its own).
                        reporter.started(task, attempt)
        except asyncio.CancelledError:
            if pending is not None and not pending.done():
                # A thread cannot be stopped: the attempt lasts until its body
                # returns (a retry waits for that). Cancelled again, e.g. by
                # asyncio.run at exit, stop waiting.
                with contextlib.suppress(BaseException):
                    await asyncio.wrap_future(pending)
            elif (
                task.state is TaskState.RUNNING
                and task.attempts == attempt
                and not task._engine._scheduler.closing
            ):
                # Not a cancel of ours (that settles the task or moves the
                # attempt on first): the body raised CancelledError itself.
                reporter.failed(task, cancelled_itself(task))
            return
        except BaseException as exc:  # SystemExit & co. fail only this task
            if task.attempts == attempt:
                reporter.failed(task, exc)
        else:
            if task.attempts == attempt:
                reporter.succeeded(task, value)

    def cancel(self, task: TaskFuture) -> None:
        if task._definition.kind is TaskKind.EXECUTABLE:
            self._subprocesses.cancel(task)
        elif isinstance(task._handle, asyncio.Task):
            task._handle.cancel()

    def kill(self) -> None:
        self._gate.close()
        self._subprocesses.kill_all()

    async def shutdown(self) -> None:
        self._gate.close()
        await self._subprocesses.shutdown()
        if self._threads is not None:
            # Daemon threads: one stuck in a blocking call is left behind and
            # does not keep the program from exiting.
            self._threads.shutdown(wait=False, cancel_futures=True)
