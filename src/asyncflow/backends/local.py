"""Run tasks in a local thread pool or process pool."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from time import time as _time
from typing import Any

import cloudpickle

from .._signals import exit_past_stuck_threads
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
        # At interpreter exit a daemon worker may still be inside it.
        if not self.loop.is_running():
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
    task: TaskFuture,
    attempt: int,
    reporter: TaskReporter,
    coroutines: _Coroutines,
    stops: set[TaskFuture],
) -> None:
    if (
        task.state is not _RUNNING
        or task.attempts != attempt
        or task._engine._scheduler.closing
    ):  # cancelled, retried or shut down while queued
        stops.discard(task)
        return
    log_started(task)
    definition = task._definition
    report = reporter.report_threadsafe
    # Reported at once only when a timeout must start; otherwise the engine
    # reads the time when the outcome arrives.
    task.started_at = _time()
    if definition.reliability is not None:
        reporter.started_threadsafe(task, attempt)
    try:
        if definition.is_async:
            loop = _worker_loop()
            runner = loop.create_task(definition.function(*task.args, **task.kwargs))
            # Registered for cancel(); checked again after, since a cancel may
            # have come between the state check above and this line (it then
            # left its request in ``stops``).
            coroutines[task] = (loop, runner)
            try:
                if (
                    task in stops
                    or task.state is not _RUNNING
                    or task.attempts != attempt
                    or task._engine._scheduler.closing
                ):
                    runner.cancel()
                value = loop.run_until_complete(runner)
            finally:
                coroutines.pop(task, None)
        else:
            value = definition.function(*task.args, **task.kwargs)
    except BaseException as exc:  # a bad body must not kill the worker thread
        stops.discard(task)
        if task.attempts == attempt:
            task.finished_at = _time()
            report(task, False, exc, attempt)
    else:
        stops.discard(task)
        if task.attempts == attempt:  # else: an attempt the engine gave up on
            # When the work ended, not when the loop gets to the report.
            task.finished_at = _time()
            report(task, True, value, attempt)


class _Unpicklable(TypeError):
    """What a process-pool task could not send across the process boundary."""


def _call_in_process(payload: bytes) -> bytes:
    function, is_async, args, kwargs, uid, name = cloudpickle.loads(payload)
    if log.isEnabledFor(logging.DEBUG):  # a forked worker inherits the handler
        log.debug("started %s in process %d", uid, os.getpid())
    if is_async:
        value = _worker_loop().run_until_complete(function(*args, **kwargs))
    else:
        value = function(*args, **kwargs)
    # Pickled here, so that the error can say it was the result.
    try:
        return bytes(cloudpickle.dumps(value))
    except Exception as exc:
        raise _Unpicklable(
            f"the result of task {name!r} ({uid}), a {type(value).__name__}, "
            f"cannot be pickled to send it back from the worker process: {exc}"
        ) from None


def _pickling_error(task: TaskFuture, exc: Exception) -> _Unpicklable:
    """Say which part of a task could not be pickled for a process pool."""
    definition = task._definition
    parts: list[tuple[str, Any]] = [("its function", definition.function)]
    parts += [(f"argument {i + 1}", a) for i, a in enumerate(task.args)]
    parts += [(f"keyword argument {k!r}", v) for k, v in task.kwargs.items()]
    for what, value in parts:
        try:
            cloudpickle.dumps(value)
        except Exception as part_exc:
            return _Unpicklable(
                f"task {task.name!r} ({task.uid}) cannot run in a process pool: "
                f"{what} ({type(value).__name__}) cannot be pickled: {part_exc}"
            )
    return _Unpicklable(
        f"task {task.name!r} ({task.uid}) cannot be pickled for a process pool: {exc}"
    )


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
    reports_start = True

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
        # Cancels that found no coroutine yet: its worker checks here.
        self._stops: set[TaskFuture] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        # Process pools: tasks waiting for a worker, tasks in one, and tasks
        # whose worker was killed to stop another task.
        self._queued: deque[tuple[TaskFuture, int]] = deque()
        self._in_flight: dict[Future[Any], tuple[TaskFuture, int]] = {}
        self._victims: set[Future[Any]] = set()
        # Workers killed to stop a task: shutdown waits until they are gone.
        self._killed: list[Any] = []
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
        self._loop = asyncio.get_running_loop()

    def submit(self, tasks: Sequence[TaskFuture]) -> None:
        reporter = self.reporter
        submit = self.executor.submit if not self.processes else None
        for task in tasks:
            try:
                if task._definition.kind is TaskKind.EXECUTABLE:
                    self._subprocesses.submit(task)
                elif self.processes:
                    self._queued.append((task, task.attempts))
                else:
                    task._handle = submit(  # type: ignore[misc]
                        _call_in_thread,
                        task,
                        task.attempts,
                        reporter,
                        self._coroutines,
                        self._stops,
                    )
            except Exception as exc:
                reporter.failed(task, exc)
        if self._queued:
            self._pump_processes()

    # -- process pools --------------------------------------------------------
    # At most one task per worker is handed to the executor, so that a task
    # handed over is running: its timeout counts running time, and a task to
    # stop is known to be in a worker, which is killed.

    def _pump_processes(self) -> None:
        reporter = self.reporter
        queued = self._queued
        while queued and len(self._in_flight) < self.max_workers and not self._closed:
            task, attempt = queued.popleft()
            if task.state is not _RUNNING or task.attempts != attempt:
                continue
            definition = task._definition
            try:
                payload = cloudpickle.dumps(
                    (
                        definition.function,
                        definition.is_async,
                        task.args,
                        task.kwargs,
                        task.uid,
                        task.name,
                    )
                )
            except Exception as exc:
                reporter.failed(task, _pickling_error(task, exc))
                continue
            if getattr(self.executor, "_broken", False):
                self._replace_pool(
                    "a worker process died and broke the pool; started a new one"
                )
            try:
                future = self.executor.submit(_call_in_process, payload)
            except Exception as exc:
                reporter.failed(task, exc)
                continue
            task._handle = future
            self._in_flight[future] = (task, attempt)
            future.add_done_callback(self._process_done_threadsafe)
            reporter.started(task, attempt)

    def _process_done_threadsafe(self, future: Future[Any]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            loop.call_soon_threadsafe(self._process_done, future)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _process_done(self, future: Future[Any]) -> None:
        entry = self._in_flight.pop(future, None)
        if entry is None:
            return
        task, attempt = entry
        error = None if future.cancelled() else future.exception()
        lost = future.cancelled() or isinstance(error, BrokenProcessPool)
        if future in self._victims:
            self._victims.discard(future)
            if lost:
                # Its worker was killed to stop another task: run it again.
                if task.state is _RUNNING and task.attempts == attempt:
                    self._queued.appendleft((task, attempt))
                self._pump_processes()
                return
        if not future.cancelled() and task.attempts == attempt:
            reporter = self.reporter
            if error is None:
                try:
                    value = cloudpickle.loads(future.result())
                except Exception as exc:
                    reporter.failed(task, exc)
                else:
                    reporter.succeeded(task, value)
            else:
                if isinstance(error, BrokenProcessPool):
                    worker_lost = WorkerLostError(
                        f"a worker process died abruptly (killed by a signal, "
                        f"os._exit() or a crash) while task {task.name!r} "
                        f"({task.uid}) was running in it; later tasks run in a "
                        "new pool"
                    )
                    worker_lost.__cause__ = error
                    error = worker_lost
                reporter.failed(task, error)
        self._pump_processes()

    def _kill_pool(self, target: Future[Any] | None) -> int:
        """Kill the pool's workers (to stop ``target``, or all work) and start a
        new pool; other tasks that were in flight run again there."""
        executor = self.executor
        workers = list((getattr(executor, "_processes", None) or {}).values())
        for future in self._in_flight:
            if future is not target and target is not None and not future.done():
                self._victims.add(future)
        if target is not None:
            self._victims.discard(target)
        killed = _kill(workers)
        self._killed.extend(workers)
        if not self._closed:
            self._replace_pool(
                "killed the worker processes to stop a task; started a new pool"
            )
        return killed

    def _replace_pool(self, why: str) -> None:
        broken = self.executor
        self.executor = ProcessPoolExecutor(
            max_workers=self.max_workers,
            mp_context=getattr(broken, "_mp_context", None),
            initializer=getattr(broken, "_initializer", None),
            initargs=getattr(broken, "_initargs", ()),
        )
        broken.shutdown(wait=False, cancel_futures=True)
        log.warning("backend %r: %s", self.name, why)

    # -- cancellation and shutdown --------------------------------------------

    def cancel(self, task: TaskFuture) -> None:
        handle = task._handle
        if isinstance(handle, Future):
            if handle.cancel():
                return
            if self.processes:
                if handle in self._in_flight and not handle.done():
                    self._kill_pool(handle)
                return
            if handle.done():
                return
            running = self._coroutines.get(task)
            if running is None:  # not registered yet, or a plain body
                self._stops.add(task)
            else:  # an async body: cancel it in its thread
                loop, runner = running
                try:
                    loop.call_soon_threadsafe(runner.cancel)
                except RuntimeError:  # the worker's loop is already closed
                    pass
        else:
            self._subprocesses.cancel(task)

    def kill(self) -> None:
        self._closed = True
        self._queued.clear()
        self._subprocesses.kill_all()
        if self.processes:
            self._kill_pool(None)

    async def shutdown(self) -> None:
        self._closed = True
        self._queued.clear()
        self._stops.clear()
        await self._subprocesses.shutdown()
        executor = self.executor
        # Read before shutdown(wait=False), which forgets both.
        workers = list((getattr(executor, "_processes", None) or {}).values())
        manager = getattr(executor, "_executor_manager_thread", None)
        executor.shutdown(wait=False, cancel_futures=True)
        stopped, self._killed = self._killed, []

        def join() -> None:
            if manager is not None:
                manager.join()
            for worker in workers + stopped:
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
                if self.abandoned_threads:
                    threads = list(getattr(executor, "_threads", ()))
                    exit_past_stuck_threads(threads)
        log.info("backend %r shut down", self.name)


def _in_daemon_thread(function: Callable[[], None]) -> asyncio.Future[None]:
    """Run a blocking join without tying up a thread pool of the loop's own."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def run() -> None:
        error: BaseException | None = None
        try:
            function()
        except BaseException as exc:  # reported to the waiter, not lost here
            error = exc
        try:
            loop.call_soon_threadsafe(_set_done, done, error)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    threading.Thread(target=run, name="asyncflow-pool-join", daemon=True).start()
    return done


def _set_done(done: asyncio.Future[None], error: BaseException | None = None) -> None:
    if not done.done():
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)


def _kill(processes: list[Any]) -> int:
    alive = [p for p in processes if p.is_alive()]
    for process in alive:
        process.kill()
    return len(alive)
