"""Run tasks in a local thread pool or process pool."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
import threading
from collections.abc import Callable, Generator, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from time import perf_counter as _perf_counter
from time import time as _time
from typing import Any, Literal

from .._signals import exit_past_stuck_threads
from ..errors import WorkerLostError
from ..resources import (
    SHORT_TASK,
    Capacity,
    Gate,
    Grant,
    Held,
    detect_cpus,
    reset_current,
    set_current,
)
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


def _drain_in_thread(
    task: TaskFuture,
    attempt: int,
    grant: Grant,
    reporter: TaskReporter,
    coroutines: _Coroutines,
    stops: set[TaskFuture],
    gate: Gate,
) -> None:
    """Run an admitted task, then, in the same worker, each next one the gate
    admits with what it gave back: a busy pool drains the queue without a
    hand-over per task."""
    held: Held | None = None
    while True:
        began = _perf_counter()
        ran = 1
        # The task, and the chunk held with it, run in its slot with its
        # grant: entered once for all of them.
        token = set_current(grant)
        pinned = _pin(grant.cpu_ids)
        try:
            together: list[tuple[TaskFuture, int]] = []
            if held is not None and task._definition.is_async:
                together.append((task, attempt))
            else:
                _run_in_thread(task, attempt, reporter, coroutines, stops)
            if held is not None:
                while True:
                    try:
                        extra, extra_attempt = held.popleft()
                    except IndexError:
                        break
                    if extra._definition.is_async:
                        # Short async bodies share one turn of the worker's loop.
                        together.append((extra, extra_attempt))
                    else:
                        _run_in_thread(
                            extra, extra_attempt, reporter, coroutines, stops
                        )
                    ran += 1
                gate.unhold(held)
                if together:
                    _run_together(together, reporter, coroutines, stops)
        except BaseException:
            # A bug of ours: never keep the slot (the crash is logged).
            gate.release(grant, "fn")
            raise
        finally:
            if pinned is not None:
                _unpin(pinned)
            reset_current(token)
        # Only calls that ran short are taken several at a time, and only
        # calls of the same definition: a worker never holds long work that
        # an idle one could have run. Never calls with a timeout: theirs
        # would count while they wait behind the others of their chunk.
        definition = task._definition
        short = (
            definition
            if definition.reliability is None
            and _perf_counter() - began < SHORT_TASK * ran
            else None
        )
        # The chunk ran in the first task's slot: give that back once.
        following = gate.release(grant, "fn", keep="fn", short=short)
        if following is None:
            return
        (task, attempt, grant), held = following


def _run_together(
    tasks: list[tuple[TaskFuture, int]],
    reporter: TaskReporter,
    coroutines: _Coroutines,
    stops: set[TaskFuture],
) -> None:
    """Run short ``async def`` bodies side by side on the worker's loop: one
    ``run_until_complete`` for all instead of one each. The caller has
    entered their grant (each task's context is a copy of its own)."""
    loop = _worker_loop()
    report = reporter.report_threadsafe
    running: list[asyncio.Task[Any]] = []
    for task, attempt in tasks:
        begun = _begin(task, attempt, reporter, stops)
        if begun is False:
            continue
        handle = begun
        definition = task._definition
        try:
            runner = loop.create_task(
                _guarded(definition.function(*task.args, **task.kwargs))
            )
        except BaseException as exc:  # the call itself raised
            stops.discard(task)
            task.finished_at = _time()
            report(task, False, exc, attempt)
            if handle is not None:
                handle.set_result(None)
            continue
        coroutines[task] = (loop, runner)
        if (  # cancelled, timed out or shut down before it was registered
            task in stops
            or task.state is not _RUNNING
            or task.attempts != attempt
            or task._engine._scheduler.closing
        ):
            runner.cancel()
        # Each outcome is reported as soon as it is in, not with the last.
        runner.add_done_callback(
            functools.partial(
                _ended_together, task, attempt, handle, report, coroutines, stops
            )
        )
        running.append(runner)
    if running:
        loop.run_until_complete(asyncio.wait(running))


async def _guarded(body: Any) -> tuple[bool, Any]:
    """``(True, value)`` or ``(False, error)``: SystemExit or
    KeyboardInterrupt from one body must not stop the others' loop turn."""
    try:
        return True, await body
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        return False, exc


def _ended_together(
    task: TaskFuture,
    attempt: int,
    handle: Future[None] | None,
    report: Callable[[TaskFuture, bool, object, int | None], None],
    coroutines: _Coroutines,
    stops: set[TaskFuture],
    runner: asyncio.Task[Any],
) -> None:
    coroutines.pop(task, None)
    stops.discard(task)
    if task.attempts == attempt:
        task.finished_at = _time()
        if runner.cancelled():
            report(task, False, asyncio.CancelledError(), attempt)
        else:
            error = runner.exception()
            if error is None:
                ok, value = runner.result()
                report(task, ok, value, attempt)
            else:
                report(task, False, error, attempt)
    elif not runner.cancelled():
        runner.exception()  # an abandoned attempt: retrieved, not logged
    if handle is not None:
        handle.set_result(None)


def _pin(cpu_ids: tuple[int, ...]) -> set[int] | None:
    """Pin the calling thread to ``cpu_ids`` (when CPU pinning is on);
    returns the CPUs it ran on before, for :func:`_unpin`."""
    if not cpu_ids:
        return None
    try:
        thread = threading.get_native_id()
        before = os.sched_getaffinity(thread)
        os.sched_setaffinity(thread, cpu_ids)
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return None
    return before


def _unpin(before: set[int]) -> None:
    try:
        os.sched_setaffinity(threading.get_native_id(), before)
    except OSError:  # pragma: no cover
        pass


def _run_in_thread(
    task: TaskFuture,
    attempt: int,
    reporter: TaskReporter,
    coroutines: _Coroutines,
    stops: set[TaskFuture],
) -> None:
    handle = _begin(task, attempt, reporter, stops)
    if handle is False:
        return
    try:
        _body_in_thread(task, attempt, reporter.report_threadsafe, coroutines, stops)
    finally:
        if handle is not None:
            handle.set_result(None)


def _begin(
    task: TaskFuture, attempt: int, reporter: TaskReporter, stops: set[TaskFuture]
) -> Future[None] | Literal[False] | None:
    """Start an attempt's work in this thread: ``False`` when it must not run
    (cancelled, retried or shut down while it waited), else its handle."""
    if (
        task.state is not _RUNNING
        or task.attempts != attempt
        or task._engine._scheduler.closing
    ):
        stops.discard(task)
        return False
    log_started(task)
    # Reported at once only when a timeout must start; otherwise the engine
    # reads the time when the outcome arrives.
    task.started_at = _time()
    if task._definition.reliability is None:
        return None
    # Done when this attempt's work is over: a retry after a timeout waits
    # for it (two attempts of one call never run at once).
    handle: Future[None] = Future()
    task._handle = handle
    handle.set_running_or_notify_cancel()
    reporter.started_threadsafe(task, attempt)
    return handle


def _body_in_thread(
    task: TaskFuture,
    attempt: int,
    report: Callable[[TaskFuture, bool, object, int | None], None],
    coroutines: _Coroutines,
    stops: set[TaskFuture],
) -> None:
    definition = task._definition
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


def _process_pool_type() -> tuple[type[Executor], ...]:
    """``(ProcessPoolExecutor,)`` once its module is loaded, else ``()``: no
    process pool can exist before, and loading it costs multiprocessing."""
    module = sys.modules.get("concurrent.futures.process")
    return () if module is None else (module.ProcessPoolExecutor,)


class _Unpicklable(TypeError):
    """What a process-pool task could not send across the process boundary."""


def _call_in_process(payload: bytes) -> bytes:
    import cloudpickle

    function, is_async, args, kwargs, uid, name, grant = cloudpickle.loads(payload)
    if log.isEnabledFor(logging.DEBUG):  # a forked worker inherits the handler
        log.debug("started %s in process %d", uid, os.getpid())
    token = set_current(grant)
    pinned = _pin(grant.cpu_ids)
    try:
        if is_async:
            value = _worker_loop().run_until_complete(function(*args, **kwargs))
        else:
            value = function(*args, **kwargs)
    finally:
        if pinned is not None:
            _unpin(pinned)
        reset_current(token)
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
    import cloudpickle

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

    Resources (docs/resources.md): ``cpus`` (default: the CPUs this process
    may use, or the pool's worker count if larger, so that tasks declaring
    nothing run one per worker), ``gpus`` (a count, device ids, or detected
    from ``CUDA_VISIBLE_DEVICES`` / ``nvidia-smi``), ``memory`` (bytes or
    ``"256GiB"``; default the machine's) and ``custom`` counts are what the
    backend hands out; a task starts only when all it asks for is free, in
    priority order. ``pin_cpus=True`` pins each task to its own CPUs.
    """

    kinds = frozenset({TaskKind.FUNCTION, TaskKind.EXECUTABLE})
    reports_start = True
    honours_resources = True

    def __init__(
        self,
        executor: Executor | None = None,
        name: str = "default",
        *,
        shutdown_timeout: float = 5.0,
        cpus: int | None = None,
        gpus: int | Sequence[str] | str | None = None,
        memory: int | str | None = None,
        custom: Mapping[str, int] | None = None,
        pin_cpus: bool = False,
    ) -> None:
        super().__init__(name)
        process_pool = _process_pool_type()
        if executor is None:
            executor = DaemonThreadPool(thread_name_prefix=f"asyncflow-{name}")
        elif not isinstance(
            executor, (ThreadPoolExecutor, DaemonThreadPool, *process_pool)
        ):
            raise TypeError(
                "LocalExecutionBackend needs a ThreadPoolExecutor or a "
                f"ProcessPoolExecutor, got {type(executor).__name__}"
            )
        self.executor: Executor = executor
        self.processes = isinstance(executor, process_pool)
        self.max_workers: int = getattr(executor, "_max_workers", None) or (
            os.cpu_count() or 1
        )
        self.shutdown_timeout = shutdown_timeout
        #: What this backend hands out to tasks (docs/resources.md).
        self.capacity = Capacity(
            cpus,
            gpus,
            memory,
            custom,
            default_cpus=max(detect_cpus(), self.max_workers),
            pin_cpus=pin_cpus,
        )
        self._gate = Gate(
            self.capacity,
            {"fn": self.max_workers, "exec": self.max_workers},
            self._start,
            name,
            dropped=self._stops_forget,
        )
        self._loop_thread: int | None = None
        self._subprocesses = SubprocessRunner(
            self.max_workers, on_end=self._executable_ended
        )
        # async bodies running in worker threads, for cancel()
        self._coroutines: _Coroutines = {}
        # Cancels that found no coroutine yet: its worker checks here.
        self._stops: set[TaskFuture] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        # Process pools: tasks in a worker, and tasks whose worker was
        # killed to stop another task.
        self._in_flight: dict[Future[Any], tuple[TaskFuture, int, Grant]] = {}
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
        self._loop_thread = threading.get_ident()

    def submit(self, tasks: Sequence[TaskFuture]) -> None:
        if len(tasks) > 1 and any(t._definition.priority for t in tasks):
            tasks = sorted(tasks, key=_by_priority)
        for task, error in self._gate.offer(tasks):
            self.reporter.failed(task, error)

    def _start(self, task: TaskFuture, attempt: int, grant: Grant) -> None:
        """Start an admitted task (any thread: the one that freed room)."""
        if task._definition.kind is TaskKind.EXECUTABLE or self.processes:
            if threading.get_ident() != self._loop_thread:
                loop = self._loop
                assert loop is not None
                try:
                    loop.call_soon_threadsafe(self._start_on_loop, task, attempt, grant)
                except RuntimeError:  # the loop is closed: nothing runs any more
                    pass
                return
            self._start_on_loop(task, attempt, grant)
            return
        try:
            worker = self.executor.submit(
                _drain_in_thread,
                task,
                attempt,
                grant,
                self.reporter,
                self._coroutines,
                self._stops,
                self._gate,
            )
            worker.add_done_callback(_log_crash)
        except Exception as exc:
            self._gate.release(grant, "fn")
            self._report_threadsafe(task, exc, attempt)

    def _report_threadsafe(
        self, task: TaskFuture, error: BaseException, attempt: int
    ) -> None:
        if threading.get_ident() == self._loop_thread:
            self.reporter.failed(task, error)
        else:
            self.reporter.report_threadsafe(task, False, error, attempt)

    def _start_on_loop(self, task: TaskFuture, attempt: int, grant: Grant) -> None:
        if task._definition.kind is TaskKind.EXECUTABLE:
            placed = task._definition.resources is not None
            try:
                self._subprocesses.submit(
                    task,
                    grant,
                    grant.environment(self.capacity.manages_gpus) if placed else None,
                )
            except Exception as exc:
                self._gate.release(grant, "exec")
                self.reporter.failed(task, exc)
            return
        self._start_process(task, attempt, grant)

    def _stops_forget(self, task: TaskFuture) -> None:
        self._stops.discard(task)

    def _executable_ended(self, grant: Grant) -> None:
        self._gate.release(grant, "exec")

    # -- process pools --------------------------------------------------------
    # At most one task per worker is handed to the executor (the gate's "fn"
    # lane has max_workers slots), so that a task handed over is running: its
    # timeout counts running time, and a task to stop is known to be in a
    # worker, which is killed.

    def _start_process(self, task: TaskFuture, attempt: int, grant: Grant) -> None:
        import cloudpickle

        reporter = self.reporter
        if self._closed or task.state is not _RUNNING or task.attempts != attempt:
            self._gate.release(grant, "fn")
            return
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
                    grant,
                )
            )
        except Exception as exc:
            self._gate.release(grant, "fn")
            reporter.failed(task, _pickling_error(task, exc))
            return
        if getattr(self.executor, "_broken", False):
            self._replace_pool(
                "a worker process died and broke the pool; started a new one"
            )
        try:
            future = self.executor.submit(_call_in_process, payload)
        except Exception as exc:
            self._gate.release(grant, "fn")
            reporter.failed(task, exc)
            return
        task._handle = future
        self._in_flight[future] = (task, attempt, grant)
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
        from concurrent.futures.process import BrokenProcessPool

        import cloudpickle

        entry = self._in_flight.pop(future, None)
        if entry is None:
            return
        task, attempt, grant = entry
        error = None if future.cancelled() else future.exception()
        lost = future.cancelled() or isinstance(error, BrokenProcessPool)
        if future in self._victims:
            self._victims.discard(future)
            if lost:
                # Its worker was killed to stop another task: run it again,
                # ahead of the tasks waiting.
                self._gate.release(grant, "fn")
                if task.state is _RUNNING and task.attempts == attempt:
                    self._gate.offer([task], front=True)
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
        self._gate.release(grant, "fn")

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
        from concurrent.futures import ProcessPoolExecutor

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
        definition = task._definition
        if definition.kind is TaskKind.EXECUTABLE:
            self._subprocesses.cancel(task)
            return
        handle = task._handle
        if self.processes:
            if isinstance(handle, Future):
                if handle.cancel():
                    return
                if handle in self._in_flight and not handle.done():
                    self._kill_pool(handle)
            return
        # Threads: a task still waiting ends at once when a worker takes it
        # (and gives its resources back then); a plain body cannot be stopped.
        if not definition.is_async:
            return
        running = self._coroutines.get(task)
        if running is None:  # not started, or not registered yet
            # Forgotten when it starts, when the gate drops it, or at shutdown.
            self._stops.add(task)
        else:  # an async body: cancel it in its thread
            loop, runner = running
            try:
                loop.call_soon_threadsafe(runner.cancel)
            except RuntimeError:  # the worker's loop is already closed
                pass

    def kill(self) -> None:
        self._closed = True
        self._gate.close()
        self._subprocesses.kill_all()
        if self.processes:
            self._kill_pool(None)

    async def shutdown(self) -> None:
        self._closed = True
        self._gate.close()
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
            if manager is None and not (
                workers or stopped or getattr(executor, "_threads", None)
            ):
                join()  # no worker was ever started: nothing to wait for
            else:
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


def _log_crash(worker: Future[None]) -> None:
    error = None if worker.cancelled() else worker.exception()
    if error is not None:  # a bug of ours: say so rather than hang quietly
        log.error("a worker of the thread pool failed", exc_info=error)


def _by_priority(task: TaskFuture) -> int:
    return -task._definition.priority


def _kill(processes: list[Any]) -> int:
    alive = [p for p in processes if p.is_alive()]
    for process in alive:
        process.kill()
    return len(alive)


#: RADICAL AsyncFlow's earlier name for :class:`LocalExecutionBackend`, still
#: used by its published pages: ``await ConcurrentExecutionBackend(
#: ThreadPoolExecutor())`` works unchanged.
ConcurrentExecutionBackend = LocalExecutionBackend
