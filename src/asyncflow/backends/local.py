"""Run tasks in a local thread pool or process pool."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from typing import Any

import cloudpickle

from ..errors import WorkerLostError
from ..tasks import TaskFuture, TaskKind, TaskState
from ._pool import DaemonThreadPool
from ._subprocess import SubprocessRunner
from .base import ExecutionBackend, TaskReporter, log_started

__all__ = ["LocalExecutionBackend"]

log = logging.getLogger("asyncflow.backends.local")

_RUNNING = TaskState.RUNNING


class _ThreadLoop:
    """A worker thread's long-lived event loop, closed when the thread ends."""

    __slots__ = ("loop",)

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def __del__(self) -> None:
        self.loop.close()


_local = threading.local()


def _worker_loop() -> asyncio.AbstractEventLoop:
    try:
        holder: _ThreadLoop = _local.holder
    except AttributeError:
        holder = _local.holder = _ThreadLoop()
    return holder.loop


_Coroutines = dict[TaskFuture, tuple[asyncio.AbstractEventLoop, "asyncio.Task[Any]"]]


def _call_in_thread(
    task: TaskFuture, attempt: int, report: Callable[..., None], coroutines: _Coroutines
) -> None:
    if (
        task.state is not _RUNNING
        or task.attempts != attempt
        or task._engine._scheduler.closing
    ):  # cancelled, retried or shut down while queued
        return
    log_started(task)
    definition = task._definition
    try:
        if definition.is_async:
            loop = _worker_loop()
            runner = loop.create_task(definition.function(*task.args, **task.kwargs))
            # Registered for cancel(); checked again after, since a cancel may
            # have come between the state check above and this line.
            coroutines[task] = (loop, runner)
            try:
                if task.state is not _RUNNING or task.attempts != attempt:
                    runner.cancel()
                value = loop.run_until_complete(runner)
            finally:
                coroutines.pop(task, None)
        else:
            value = definition.function(*task.args, **task.kwargs)
    except BaseException as exc:  # a bad body must not kill the worker thread
        if task.attempts == attempt:
            report(task, False, exc)
    else:
        if task.attempts == attempt:  # else: an attempt the engine gave up on
            report(task, True, value)


def _call_in_process(payload: bytes) -> Any:
    function, is_async, args, kwargs, uid = cloudpickle.loads(payload)
    if log.isEnabledFor(logging.DEBUG):  # a forked worker inherits the handler
        log.debug("started %s in process %d", uid, os.getpid())
    if is_async:
        return _worker_loop().run_until_complete(function(*args, **kwargs))
    return function(*args, **kwargs)


def _process_done(
    task: TaskFuture, attempt: int, report: Callable[..., None], future: Future[Any]
) -> None:
    if future.cancelled() or task.attempts != attempt:
        return
    error = future.exception()
    if error is None:
        report(task, True, future.result())
        return
    if isinstance(error, BrokenProcessPool):
        lost = WorkerLostError(
            f"a worker process died abruptly (killed by a signal, os._exit() or a "
            f"crash) while task {task.name!r} ({task.uid}) was running or queued "
            "in its pool; later tasks run in a new pool"
        )
        lost.__cause__ = error
        error = lost
    report(task, False, error)


class LocalExecutionBackend(ExecutionBackend):
    """Runs function tasks in a ``ThreadPoolExecutor`` or ``ProcessPoolExecutor``.

    ``async def`` bodies run on a long-lived event loop inside the worker, so
    blocking code in them never stalls the engine. In a process pool the body
    and its arguments travel with cloudpickle, so closures and lambdas defined
    in ``__main__`` work. Executable tasks run as asyncio subprocesses, at most
    as many at once as the executor has workers.

    Without an executor, a pool of daemon threads (as many as a default
    ``ThreadPoolExecutor``) is used, so that a task stuck in a blocking call
    cannot keep the program alive after shutdown.

    The backend owns the executor: shutting the backend down shuts it down.
    Work still running after ``shutdown_timeout`` seconds is abandoned (thread
    pools: a blocking call cannot be interrupted; the non-daemon threads of a
    ``ThreadPoolExecutor`` still delay interpreter exit) or killed (process
    pools).
    """

    kinds = frozenset({TaskKind.FUNCTION, TaskKind.EXECUTABLE})

    def __init__(
        self,
        executor: Executor | None = None,
        name: str = "default",
        *,
        shutdown_timeout: float = 5.0,
    ) -> None:
        super().__init__(name)
        if executor is None:
            executor = DaemonThreadPool(thread_name_prefix=f"asyncflow-{name}")
        elif not isinstance(
            executor, (ThreadPoolExecutor, ProcessPoolExecutor, DaemonThreadPool)
        ):
            raise TypeError(
                "LocalExecutionBackend needs a ThreadPoolExecutor or a "
                f"ProcessPoolExecutor, got {type(executor).__name__}"
            )
        self.executor: Executor = executor
        self.processes = isinstance(executor, ProcessPoolExecutor)
        self.max_workers: int = getattr(executor, "_max_workers", None) or (
            os.cpu_count() or 1
        )
        self.shutdown_timeout = shutdown_timeout
        self._subprocesses = SubprocessRunner(self.max_workers)
        # async bodies running in worker threads, for cancel()
        self._coroutines: _Coroutines = {}
        #: Set when shutdown gave up on non-daemon threads still running.
        self.abandoned_threads = False

    def __await__(self) -> Generator[Any, None, LocalExecutionBackend]:
        """``await LocalExecutionBackend(...)`` is accepted for compatibility."""
        if False:  # pragma: no cover - makes this a generator
            yield
        return self

    async def attach(self, reporter: TaskReporter) -> None:
        await super().attach(reporter)
        self._subprocesses.bind(reporter)

    def submit(self, tasks: Sequence[TaskFuture]) -> None:
        reporter = self.reporter
        report = reporter.report_threadsafe
        submit = self.executor.submit if not self.processes else None
        for task in tasks:
            try:
                if task._definition.kind is TaskKind.EXECUTABLE:
                    self._subprocesses.submit(task)
                elif self.processes:
                    self._submit_to_process(task, report)
                else:
                    task._handle = submit(  # type: ignore[misc]
                        _call_in_thread, task, task.attempts, report, self._coroutines
                    )
            except Exception as exc:
                reporter.failed(task, exc)

    def _submit_to_process(self, task: TaskFuture, report: Callable[..., None]) -> None:
        definition = task._definition
        payload = cloudpickle.dumps(
            (definition.function, definition.is_async, task.args, task.kwargs, task.uid)
        )
        if getattr(self.executor, "_broken", False):
            self._replace_pool()
        future = self.executor.submit(_call_in_process, payload)
        task._handle = future
        future.add_done_callback(partial(_process_done, task, task.attempts, report))

    def _replace_pool(self) -> None:
        broken = self.executor
        self.executor = ProcessPoolExecutor(
            max_workers=self.max_workers,
            mp_context=getattr(broken, "_mp_context", None),
            initializer=getattr(broken, "_initializer", None),
            initargs=getattr(broken, "_initargs", ()),
        )
        broken.shutdown(wait=False, cancel_futures=True)
        log.warning(
            "backend %r: a worker process died and broke the pool; started a new one",
            self.name,
        )

    def cancel(self, task: TaskFuture) -> None:
        handle = task._handle
        if isinstance(handle, Future):
            if not handle.cancel():  # already running in a worker
                running = self._coroutines.get(task)
                if running is not None:
                    loop, runner = running
                    try:
                        loop.call_soon_threadsafe(runner.cancel)
                    except RuntimeError:  # the worker's loop is already closed
                        pass
        else:
            self._subprocesses.cancel(task)

    async def shutdown(self) -> None:
        await self._subprocesses.shutdown()
        executor = self.executor
        # Read before shutdown(wait=False), which forgets both.
        workers = list((getattr(executor, "_processes", None) or {}).values())
        manager = getattr(executor, "_executor_manager_thread", None)
        executor.shutdown(wait=False, cancel_futures=True)

        def join() -> None:
            if manager is not None:
                manager.join()
            for worker in workers:
                worker.join()
            executor.shutdown(wait=True)

        try:
            await asyncio.wait_for(_in_daemon_thread(join), self.shutdown_timeout)
        except asyncio.TimeoutError:
            if self.processes:
                killed = _kill(workers)
                log.warning(
                    "backend %r: %d worker process(es) still busy after %.1fs; killed",
                    self.name,
                    killed,
                    self.shutdown_timeout,
                )
            else:
                log.warning(
                    "backend %r: work still running in threads after %.1fs was "
                    "abandoned (a blocking call in a thread cannot be interrupted)",
                    self.name,
                    self.shutdown_timeout,
                )
                # Python joins a ThreadPoolExecutor's threads at exit.
                self.abandoned_threads = isinstance(executor, ThreadPoolExecutor)
        log.info("backend %r shut down", self.name)


def _in_daemon_thread(function: Callable[[], None]) -> asyncio.Future[None]:
    """Run a blocking join without tying up a thread pool of the loop's own."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def run() -> None:
        function()
        try:
            loop.call_soon_threadsafe(_set_done, done)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    threading.Thread(target=run, name="asyncflow-pool-join", daemon=True).start()
    return done


def _set_done(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


def _kill(processes: list[Any]) -> int:
    alive = [p for p in processes if p.is_alive()]
    for process in alive:
        process.kill()
    return len(alive)
