"""Run ``async def`` bodies directly on the engine's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Sequence
from concurrent.futures import Future
from functools import partial
from typing import Any

from ..tasks import TaskFuture, TaskKind, TaskState
from ._pool import DaemonThreadPool
from ._subprocess import SubprocessRunner
from .base import ExecutionBackend, TaskReporter, log_started

__all__ = ["AsyncioExecutionBackend"]


def _started_then_call(reporter: TaskReporter, task: TaskFuture, attempt: int) -> Any:
    task.started_at = time.time()
    if task._definition.reliability is not None:
        reporter.started_threadsafe(task, attempt)
    return task._definition.function(*task.args, **task.kwargs)


class AsyncioExecutionBackend(ExecutionBackend):
    """The fastest path for I/O-bound work (HTTP calls, LLM requests, ...).

    ``async def`` bodies run as asyncio tasks on the engine's own loop, so
    they must not block; plain ``def`` bodies run in a pool of daemon
    threads (``max_threads``, default as ``ThreadPoolExecutor``), so that a
    body stuck in a blocking call cannot keep the program alive after
    shutdown. Executable tasks run as subprocesses, at most
    ``max_subprocesses`` at once (default: the number of CPUs).
    """

    kinds = frozenset({TaskKind.FUNCTION, TaskKind.EXECUTABLE})
    reports_start = True

    def __init__(
        self,
        name: str = "default",
        *,
        max_subprocesses: int | None = None,
        max_threads: int | None = None,
    ) -> None:
        super().__init__(name)
        self._subprocesses = SubprocessRunner(max_subprocesses or os.cpu_count() or 1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._max_threads = max_threads
        self._threads: DaemonThreadPool | None = None  # made on first use

    async def attach(self, reporter: TaskReporter) -> None:
        await super().attach(reporter)
        self._loop = asyncio.get_running_loop()
        self._subprocesses.bind(reporter)

    def submit(self, tasks: Sequence[TaskFuture]) -> None:
        loop = self._loop
        assert loop is not None
        for task in tasks:
            if task._definition.kind is TaskKind.EXECUTABLE:
                self._subprocesses.submit(task)
            else:
                task._handle = loop.create_task(self._run(task, task.attempts))

    async def _run(self, task: TaskFuture, attempt: int) -> None:
        definition = task._definition
        reporter = self.reporter
        log_started(task)
        pending: Future[Any] | None = None
        try:
            if definition.is_async:
                reporter.started(task, attempt)
                value = await definition.function(*task.args, **task.kwargs)
            else:
                if self._threads is None:
                    self._threads = DaemonThreadPool(
                        self._max_threads, thread_name_prefix=f"asyncflow-{self.name}"
                    )
                call = partial(_started_then_call, reporter, task, attempt)
                pending = self._threads.submit(call)
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
                reporter.failed(
                    task,
                    RuntimeError(
                        f"the body of task {task.name!r} ({task.uid}) raised "
                        "CancelledError of its own"
                    ),
                )
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
        self._subprocesses.kill_all()

    async def shutdown(self) -> None:
        await self._subprocesses.shutdown()
        if self._threads is not None:
            # Daemon threads: one stuck in a blocking call is left behind and
            # does not keep the program from exiting.
            self._threads.shutdown(wait=False, cancel_futures=True)
