"""Run ``async def`` bodies directly on the engine's event loop."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from functools import partial

from ..tasks import TaskFuture, TaskKind
from ._subprocess import SubprocessRunner
from .base import ExecutionBackend, TaskReporter, log_started

__all__ = ["AsyncioExecutionBackend"]


class AsyncioExecutionBackend(ExecutionBackend):
    """The fastest path for I/O-bound work (HTTP calls, LLM requests, ...).

    ``async def`` bodies run as asyncio tasks on the engine's own loop, so
    they must not block; plain ``def`` bodies run in the loop's default
    thread pool. Executable tasks run as subprocesses, at most
    ``max_subprocesses`` at once (default: the number of CPUs).
    """

    kinds = frozenset({TaskKind.FUNCTION, TaskKind.EXECUTABLE})

    def __init__(
        self, name: str = "default", *, max_subprocesses: int | None = None
    ) -> None:
        super().__init__(name)
        self._subprocesses = SubprocessRunner(max_subprocesses or os.cpu_count() or 1)
        self._loop: asyncio.AbstractEventLoop | None = None

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
        try:
            if definition.is_async:
                value = await definition.function(*task.args, **task.kwargs)
            else:
                call = partial(definition.function, *task.args, **task.kwargs)
                value = await asyncio.get_running_loop().run_in_executor(None, call)
        except asyncio.CancelledError:
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

    async def shutdown(self) -> None:
        await self._subprocesses.shutdown()
