"""Dependency tracking and release: the engine's hot path.

Everything here is synchronous and runs on the engine's loop thread, except
:meth:`Scheduler.report_threadsafe`. A task call registers a future and counts
its unfinished dependencies; each finishing task decrements its dependents'
counts and queues those that reach zero; one loop callback per iteration
hands the queued tasks to their backends in batches. Nothing polls.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import os
from asyncio.events import _get_running_loop
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .errors import DependencyFailureError, TaskTimeoutError
from .tasks import TaskDefinition, TaskFuture, TaskKind, TaskState

if TYPE_CHECKING:
    from .backends.base import ExecutionBackend
    from .checkpoint import CheckpointStore
    from .engine import WorkflowEngine

log = logging.getLogger("asyncflow.scheduler")

PENDING = TaskState.PENDING
RUNNING = TaskState.RUNNING
DONE = TaskState.DONE
FAILED = TaskState.FAILED
CANCELLED = TaskState.CANCELLED
_TERMINAL = frozenset({DONE, FAILED, CANCELLED})

FUNCTION = TaskKind.FUNCTION
EXECUTABLE = TaskKind.EXECUTABLE
PROMPT = TaskKind.PROMPT
BLOCK = TaskKind.BLOCK

_CONTAINERS = frozenset({list, tuple, set, frozenset, dict})
_set_result = asyncio.Future.set_result
_set_exception = asyncio.Future.set_exception
_future_cancel = asyncio.Future.cancel

_NO_KWARGS: dict[str, Any] = {}

#: Marks a task whose executable/prompt body is still being evaluated.
_PREPARING = object()
#: The ``ok`` of a thread-safe report that an attempt has started.
_STARTED: Any = object()


def _scan(value: Any, found: list[TaskFuture]) -> None:
    kind = type(value)
    if kind is TaskFuture:
        found.append(value)
    elif kind in _CONTAINERS:
        for item in value.values() if kind is dict else value:
            if type(item) is TaskFuture:
                found.append(item)


def find_dependencies(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[TaskFuture] | None:
    """Futures among the arguments, one level into list/tuple/set/dict values."""
    found: list[TaskFuture] = []
    for value in args:
        _scan(value, found)
    for value in kwargs.values():
        _scan(value, found)
    if not found:
        return None
    if len(found) > 1:
        found = list(dict.fromkeys(found))
    return found


def _resolve(value: Any) -> Any:
    kind = type(value)
    if kind is TaskFuture:
        return value.result()
    if kind in _CONTAINERS:
        if kind is dict:
            if any(type(v) is TaskFuture for v in value.values()):
                return {
                    k: v.result() if type(v) is TaskFuture else v
                    for k, v in value.items()
                }
        elif any(type(v) is TaskFuture for v in value):
            return kind(v.result() if type(v) is TaskFuture else v for v in value)
    return value


#: Seconds (at least) a retry waits for a timed-out attempt to stop.
STOP_WAIT = 5.0


def _running(handle: Any) -> bool:
    """Whether an attempt's handle (asyncio or concurrent future) is unfinished."""
    return (
        isinstance(handle, (asyncio.Future, concurrent.futures.Future))
        and not handle.done()
    )


def _names(tasks: Iterable[TaskFuture]) -> list[str]:
    return [f"{t.name} ({t.uid})" for t in tasks]


class Scheduler:
    """Per-engine task graph bookkeeping; also the backends' TaskReporter."""

    def __init__(
        self,
        engine: WorkflowEngine,
        loop: asyncio.AbstractEventLoop,
        default_backend: ExecutionBackend,
    ) -> None:
        self._engine = engine
        self._loop = loop
        self.default_backend = default_backend
        self.block_var: contextvars.ContextVar[TaskFuture | None] = (
            contextvars.ContextVar(f"asyncflow.block.{id(self):x}", default=None)
        )
        self.workflow_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
            f"asyncflow.workflow.{id(self):x}", default=None
        )
        self.live: set[TaskFuture] = set()
        self.store: CheckpointStore | None = None
        #: Resolved when ``live`` becomes empty (``async with`` waits on it).
        self.idle: asyncio.Future[None] | None = None
        self._store_warned = False
        self.closing = False
        self._counter = 0
        self._ready: list[TaskFuture] = []
        self._flush_scheduled = False
        self._flushing = False
        self._inbox: deque[tuple[TaskFuture, bool, Any]] = deque()
        self._drain_scheduled = False
        # Command bodies being evaluated, and the tasks called after the
        # earliest of them, which wait for it (bodies run in call order).
        self._preparing: set[TaskFuture] = set()
        self._hold_after: int | None = None
        self._held: list[TaskFuture] = []

    # -- registration -------------------------------------------------------

    def register(
        self, definition: TaskDefinition, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> TaskFuture:
        name = definition.name
        if _get_running_loop() is not self._loop:
            raise RuntimeError(self._wrong_loop(name))
        if self.closing:
            raise RuntimeError(
                f"cannot call task {name!r}: workflow engine {self._engine.uid!r} "
                "has been shut down; create a new engine to run more work"
            )
        description = definition.description
        workflow_id = self.workflow_var.get()
        if kwargs:
            if "task_description" in kwargs:
                extra = kwargs.pop("task_description")
                if extra is not None:
                    if not isinstance(extra, dict):
                        raise TypeError(
                            f"task {name!r}: task_description must be a dict, "
                            f"got {type(extra).__name__}"
                        )
                    description = {**description, **extra}
            if "workflow_id" in kwargs:
                workflow_id = kwargs.pop("workflow_id")
        deps = find_dependencies(args, kwargs) if args or kwargs else None
        if deps is not None:
            for dep in deps:
                if dep._engine is not self._engine:
                    raise ValueError(
                        f"task {name!r} was given the future of {dep.name!r} "
                        f"({dep.uid}) from another WorkflowEngine; dependencies "
                        "must come from the same engine"
                    )

        self._counter += 1
        task = TaskFuture(loop=self._loop)
        task._seq = self._counter
        task.uid = (
            f"{'block' if definition.kind is BLOCK else 'task'}.{self._counter:06d}"
        )
        task.name = name
        task.state = PENDING
        task.args = args
        task.kwargs = kwargs
        task.workflow_id = workflow_id
        task._engine = self._engine
        task._definition = definition
        task._description = description
        task._dependents = None
        task._members = None
        task._handle = None
        task._command = None
        task._deps = deps
        task._waiting = 0
        task._timer = None
        task._key = None
        task.attempts = 0
        task.restored = False
        block = self.block_var.get()
        task._block = block
        if block is not None:
            if block._members is None:
                block._members = set()
            block._members.add(task)
        self.live.add(task)

        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "registered %s %r depends on %s",
                task.uid,
                name,
                _names(deps) if deps else "nothing",
            )

        if deps is None:
            self._release(task)
            return task
        failed = cancelled = None
        for dep in deps:
            state = dep.state
            if state is DONE:
                continue
            if state is FAILED:
                failed = dep
            elif state is CANCELLED:
                cancelled = dep
            else:
                task._waiting += 1
                if dep._dependents is None:
                    dep._dependents = [task]
                else:
                    dep._dependents.append(task)
        if failed is not None:
            self._finish(task, FAILED, self._dependency_error(task, failed))
        elif cancelled is not None:
            self._finish(task, CANCELLED, self._cancel_message(cancelled))
        elif task._waiting == 0:
            self._release(task)
        return task

    def _wrong_loop(self, name: str) -> str:
        where = (
            "in another thread (a plain `def` task body runs in a worker thread)"
            if _get_running_loop() is None
            else "on another event loop (an `async def` body in a thread or "
            "process pool runs on the worker's own loop)"
        )
        return (
            f"cannot call task {name!r} {where}: tasks of workflow engine "
            f"{self._engine.uid!r} are called on the engine's event loop. To "
            "orchestrate tasks from inside a task, make it a @flow.block (an "
            "`async def` that runs on the engine's loop); from another thread, "
            "use asyncio.run_coroutine_threadsafe(...) with a coroutine that "
            "calls the task"
        )

    # -- release and dispatch -----------------------------------------------

    def _release(self, task: TaskFuture) -> None:
        self._ready.append(task)
        if not (self._flush_scheduled or self._flushing):
            try:
                self._loop.call_soon(self._flush)
            except RuntimeError:
                self._ready.remove(task)
                self.live.discard(task)
                raise RuntimeError(
                    f"cannot call task {task.name!r}: the event loop of workflow "
                    f"engine {self._engine.uid!r} is closed; create the engine "
                    "inside the asyncio.run(...) that uses it"
                ) from None
            self._flush_scheduled = True

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._flushing or self.closing:
            return
        self._flushing = True
        try:
            while self._ready:
                batch, self._ready = self._ready, []
                self._dispatch(batch)
        finally:
            self._flushing = False

    def _flush_if_ready(self) -> None:
        if self._ready and not self._flushing:
            self._flush()

    def _dispatch(self, batch: list[TaskFuture]) -> None:
        default = self.default_backend
        groups: dict[ExecutionBackend, list[TaskFuture]] = {}
        debug = log.isEnabledFor(logging.DEBUG)
        for task in batch:
            if task.state is not PENDING:  # cancelled while queued
                continue
            if self._hold_after is not None and task._seq > self._hold_after:
                # Called after a command body that is still being evaluated:
                # it starts only once that body is done (call order).
                self._held.append(task)
                continue
            if task._deps is not None:
                task.args = tuple([_resolve(a) for a in task.args])
                if task.kwargs:
                    task.kwargs = {k: _resolve(v) for k, v in task.kwargs.items()}
            definition = task._definition
            kind = definition.kind
            task.state = RUNNING
            task.attempts = 1
            if kind is BLOCK:
                self._start_block(task)
                if debug:
                    log.debug("started block %s %r", task.uid, task.name)
                continue
            backend = definition.backend or default
            if kind not in backend.kinds:
                self._finish(task, FAILED, self._unsupported(task, backend))
                continue
            if kind is not FUNCTION and not self._prepare(task):
                continue
            if self.store is not None and self._restore(task):
                continue
            if definition.reliability is not None and not backend.reports_start:
                self._arm_timeout(task)
            group = groups.get(backend)
            if group is None:
                groups[backend] = [task]
            else:
                group.append(task)
        for backend, tasks in groups.items():
            self._submit(backend, tasks, debug)

    def _submit(
        self, backend: ExecutionBackend, tasks: list[TaskFuture], debug: bool
    ) -> None:
        if debug:
            for task in tasks:
                log.debug(
                    "submitted %s %r to backend %r", task.uid, task.name, backend.name
                )
        try:
            backend.submit(tasks)
        except Exception as exc:
            log.error(
                "backend %r failed to accept %d task(s)",
                backend.name,
                len(tasks),
                exc_info=True,
            )
            for task in tasks:
                self._attempt_failed(task, exc)

    def _prepare(self, task: TaskFuture) -> bool:
        """Evaluate an executable/prompt body; True once the command is ready."""
        definition = task._definition
        try:
            body = definition.function(*task.args, **task.kwargs)
        except BaseException as exc:  # a bad body must not abort the batch
            self._finish(task, FAILED, exc)
            return False
        if not definition.is_async:
            return self._accept_command(task, body)
        task._command = _PREPARING
        runner = self._loop.create_task(self._finish_preparing(task, body))
        # Cancelled before it started, the runner never awaits the body.
        runner.add_done_callback(lambda _: body.close())
        runner.add_done_callback(lambda _: self._prepared(task))
        task._handle = runner
        self._preparing.add(task)
        if self._hold_after is None or task._seq < self._hold_after:
            self._hold_after = task._seq
        return False

    def _prepared(self, task: TaskFuture) -> None:
        """A command body is done: release what was held behind it."""
        self._preparing.discard(task)
        if task._seq != self._hold_after:
            return
        self._hold_after = min((t._seq for t in self._preparing), default=None)
        if self._held:
            held, self._held = self._held, []
            self._ready.extend(held)
            if not self.closing:
                self._flush_if_ready()

    async def _finish_preparing(self, task: TaskFuture, body: Any) -> None:
        self.block_var.set(task._block)
        self.workflow_var.set(task.workflow_id)
        try:
            command = await body
        except asyncio.CancelledError:
            return
        except BaseException as exc:  # SystemExit & co. fail only this task
            self._finish(task, FAILED, exc)
            return
        if task.state is not RUNNING or self.closing:
            return
        task._handle = None
        if self._accept_command(task, command) and not (
            self.store is not None and self._restore(task)
        ):
            self._resubmit(task)
        self._flush_if_ready()

    def _accept_command(self, task: TaskFuture, command: Any) -> bool:
        kind = task._definition.kind
        if isinstance(command, str):
            ok = bool(command.strip())
        elif kind is EXECUTABLE and type(command) in (list, tuple):
            # An argument list runs without a shell: nothing to quote.
            ok = bool(command) and all(type(a) is str for a in command)
            if ok:
                command = list(command)
        else:
            ok = False
        if not ok:
            what = (
                "command string or argument list (of str)"
                if kind is EXECUTABLE
                else "prompt string"
            )
            self._finish(
                task,
                FAILED,
                ValueError(
                    f"{kind} task {task.name!r} ({task.uid}) must "
                    f"return a non-empty {what}, got {command!r}"
                ),
            )
            return False
        task._command = command
        return True

    @staticmethod
    def _unsupported(task: TaskFuture, backend: ExecutionBackend) -> Exception:
        return NotImplementedError(
            f"backend {backend.name!r} ({type(backend).__name__}) cannot run "
            f"{task.kind} task {task.name!r}; route it to a backend that can with "
            f"@flow.{task.kind}_task(backend=...)"
        )

    def _start_block(self, block: TaskFuture) -> None:
        block._handle = self._loop.create_task(self._run_block(block, block.attempts))
        if block._definition.reliability is not None:
            self._arm_timeout(block)

    async def _run_block(self, block: TaskFuture, attempt: int) -> None:
        self.block_var.set(block)
        self.workflow_var.set(block.workflow_id)
        definition = block._definition
        try:
            if definition.is_async:
                value = await definition.function(*block.args, **block.kwargs)
            else:
                value = definition.function(*block.args, **block.kwargs)
            if type(value) is TaskFuture:  # a block may hand back a member's future
                value = await value
        except asyncio.CancelledError:
            if not self.closing and block.attempts == attempt:
                self._finish(block, CANCELLED, None)
            return
        except BaseException as exc:  # SystemExit & co. fail only this block
            if not self.closing and block.attempts == attempt:
                self._attempt_failed(block, exc)
        else:
            if not self.closing and block.attempts == attempt:
                self._finish(block, DONE, value)
        self._flush_if_ready()

    # -- checkpoint, retries and timeouts -----------------------------------------

    def _restore(self, task: TaskFuture) -> bool:
        """Settle the task from the checkpoint if it ran before; else note its key."""
        store = self.store
        assert store is not None
        definition = task._definition
        if not definition.options.cache or self._engine.dry_run:
            return False
        try:
            key = store.key_for(task)
            if key is None:
                return False
            found, value = store.lookup(key)
        except Exception as exc:  # the store must never take the run down
            self._store_failed(exc)
            return False
        if (
            found
            and definition.capture_stdio
            and not (isinstance(value, str) and os.path.isfile(value))
        ):
            found = False  # its output file is gone: run it again
        if not found:
            task._key = key
            return False
        task.restored = True
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %r restored from the checkpoint", task.uid, task.name)
        self._finish(task, DONE, value)
        return True

    def _store_failed(self, exc: BaseException) -> None:
        if not self._store_warned:
            self._store_warned = True
            store = self.store
            log.warning(
                "checkpoint %s failed (%s: %s); the run goes on without it",
                store.path if store is not None else "?",
                type(exc).__name__,
                exc,
                exc_info=True,
            )

    def _arm_timeout(self, task: TaskFuture) -> None:
        options = task._definition.reliability
        if options is not None and options.timeout is not None:
            task._timer = self._loop.call_later(
                options.timeout, self._timed_out, task, task.attempts
            )

    def _timed_out(self, task: TaskFuture, attempt: int) -> None:
        task._timer = None
        options = task._definition.reliability
        if task.state is not RUNNING or task.attempts != attempt or options is None:
            return
        assert options.timeout is not None
        attempt_handle = task._handle
        self.stop_work(task)
        self._cancel_members(task, f"block {task.name!r} ({task.uid}) timed out")
        self._attempt_failed(
            task, TaskTimeoutError(task.name, options.timeout, attempt), attempt_handle
        )
        self._flush_if_ready()

    def _attempt_failed(
        self, task: TaskFuture, error: BaseException, stopping: Any = None
    ) -> None:
        """Retry the task if its options allow, otherwise settle it FAILED.

        ``stopping`` is the handle of an attempt that was asked to stop
        (timed out): the retry waits until it has really stopped, so that two
        attempts of one call never run at once.
        """
        options = task._definition.reliability
        if (
            options is None
            or task.state is not RUNNING
            or task.attempts > options.retries
            or not isinstance(error, options.retry_on)
            or self.closing
        ):
            self._finish(task, FAILED, error)
            return
        if task._timer is not None:
            task._timer.cancel()
            task._timer = None
        # The next attempt's number is taken now: late reports of this one
        # are stale from here on, and backends drop them.
        task.attempts += 1
        delay = options.delay_before(task.attempts)
        log.warning(
            "task %r (%s) attempt %d of %d failed (%s: %s); retrying in %.3gs",
            task.name,
            task.uid,
            task.attempts - 1,
            options.retries + 1,
            type(error).__name__,
            error,
            delay,
        )
        if stopping is not None and _running(stopping):
            self._retry_when_stopped(task, stopping, delay, error)
        elif delay > 0:
            task._timer = self._loop.call_later(delay, self._retry, task)
        else:
            self._retry(task)

    def _retry_when_stopped(
        self, task: TaskFuture, handle: Any, delay: float, error: BaseException
    ) -> None:
        attempt = task.attempts - 1
        options = task._definition.reliability
        assert options is not None
        # A blocking call in a thread cannot be interrupted: wait for it a
        # while, then give up on the retry rather than run two at once.
        bound = max(options.timeout or 0.0, STOP_WAIT)

        def waiting() -> bool:
            return (
                task.state is RUNNING
                and task.attempts == attempt + 1
                and task._timer is give_up_timer
            )

        def stopped() -> None:
            if waiting():
                give_up_timer.cancel()
                task._timer = self._loop.call_later(delay, self._retry, task)

        def give_up() -> None:
            if waiting():
                task._timer = None
                self._finish(
                    task,
                    FAILED,
                    TaskTimeoutError(
                        task.name,
                        options.timeout or 0.0,
                        attempt,
                        f"not retried: attempt {attempt} was still running "
                        f"{bound:g}s after it was told to stop (a blocking call "
                        "in a thread cannot be interrupted), and two attempts "
                        "of one call never run at once",
                    ),
                )
                self._flush_if_ready()

        give_up_timer = self._loop.call_later(bound, give_up)
        task._timer = give_up_timer
        if isinstance(handle, concurrent.futures.Future):
            loop = self._loop

            def from_thread(_: Any) -> None:
                try:
                    loop.call_soon_threadsafe(stopped)
                except RuntimeError:  # the loop is closed
                    pass

            handle.add_done_callback(from_thread)
        else:
            handle.add_done_callback(lambda _: stopped())

    def _retry(self, task: TaskFuture) -> None:
        task._timer = None
        if task.state is not RUNNING or self.closing:
            return
        if task._definition.kind is BLOCK:
            self._start_block(task)
        else:
            self._resubmit(task)

    def _resubmit(self, task: TaskFuture) -> None:
        """Hand one task to its backend outside a batch (retries, late commands)."""
        backend = task._definition.backend or self.default_backend
        if task._definition.reliability is not None and not backend.reports_start:
            self._arm_timeout(task)
        self._submit(backend, [task], log.isEnabledFor(logging.DEBUG))

    # -- TaskReporter ---------------------------------------------------------

    def started(self, task: TaskFuture, attempt: int) -> None:
        if (
            task.state is RUNNING
            and task.attempts == attempt
            and task._definition.reliability is not None
        ):
            if task._timer is not None:  # started again (its worker was lost)
                task._timer.cancel()
            self._arm_timeout(task)

    def started_threadsafe(self, task: TaskFuture, attempt: int) -> None:
        self.report_threadsafe(task, _STARTED, attempt)

    def succeeded(self, task: TaskFuture, result: object) -> None:
        # Also while shutting down: a finished result is kept (and goes to
        # the checkpoint); nothing new is dispatched then.
        self._finish(task, DONE, result)
        self._flush_if_ready()

    def failed(self, task: TaskFuture, error: BaseException) -> None:
        if not self.closing:
            self._attempt_failed(task, error)
            self._flush_if_ready()

    def report_threadsafe(self, task: TaskFuture, ok: bool, value: object) -> None:
        self._inbox.append((task, ok, value))
        if not self._drain_scheduled:
            self._drain_scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed; nobody is listening
                pass

    def _drain(self) -> None:
        # Reset the flag before draining: a report appended after this point
        # either is drained below or schedules another drain.
        self._drain_scheduled = False
        inbox = self._inbox
        closing = self.closing
        finish = self._finish
        while inbox:
            task, ok, value = inbox.popleft()
            if ok is True:
                finish(task, DONE, value)
            elif ok is _STARTED:
                self.started(task, value)
            elif closing:
                continue  # work stopped by the shutdown: it ends CANCELLED
            else:
                if isinstance(value, asyncio.CancelledError):
                    value = RuntimeError(
                        f"task {task.name!r} was cancelled in its worker"
                    )
                self._attempt_failed(task, value)
        self._flush_if_ready()

    # -- completion and propagation --------------------------------------------

    def _finish(self, task: TaskFuture, state: TaskState, value: Any) -> None:
        """Settle a task and release (DONE) or settle (otherwise) its dependents."""
        if task.state in _TERMINAL:
            return
        debug = log.isEnabledFor(logging.DEBUG)
        self._settle(task, state, value, debug)
        dependents = task._dependents
        if dependents is None:
            return
        task._dependents = None
        if state is DONE:
            for dep in dependents:
                if dep.state is PENDING:
                    dep._waiting -= 1
                    if dep._waiting == 0:
                        # Every caller that can settle a task DONE flushes
                        # the ready list right after.
                        self._ready.append(dep)
            return
        # A failure or cancellation travels down the graph: iteratively, since
        # a chain may be far longer than the recursion limit.
        upstream = [(task, dependents)]
        while upstream:
            task, dependents = upstream.pop()
            if task.state is FAILED:
                # Its error lives on in the dependents' errors: asyncio
                # reports an unretrieved one at the end of the chain.
                task._log_traceback = False
            else:
                message = self._cancel_message(task)
            for dep in dependents:
                if dep.state is not PENDING:
                    continue
                if task.state is FAILED:
                    self._settle(dep, FAILED, self._dependency_error(dep, task), debug)
                else:
                    self._settle(dep, CANCELLED, message, debug)
                if dep._dependents is not None:
                    upstream.append((dep, dep._dependents))
                    dep._dependents = None

    def _settle(
        self, task: TaskFuture, state: TaskState, value: Any, debug: bool
    ) -> None:
        task.state = state
        if task._timer is not None:
            task._timer.cancel()
            task._timer = None
        if state is DONE:
            _set_result(task, value)
            if task._key is not None:
                store = self.store
                if store is not None:
                    try:
                        store.store(task._key, task, value)
                    except Exception as exc:  # never let the store wedge the run
                        self._store_failed(exc)
                task._key = None
        elif state is FAILED:
            if not isinstance(value, Exception) or isinstance(value, StopIteration):
                # SystemExit & co. would tear down whoever awaits the future.
                wrapped = RuntimeError(f"task {task.name!r} raised {value!r}")
                if isinstance(value, BaseException):
                    wrapped.__cause__ = value
                value = wrapped
            _set_exception(task, value)
        else:
            _future_cancel(task, value)
        live = self.live
        live.discard(task)
        if not live and self.idle is not None:
            self.wake_idle()
        block = task._block
        if block is not None:
            task._block = None
            if block._members is not None:
                block._members.discard(task)
        task._deps = None
        task._handle = None
        # Drop the inputs: a finished future must not keep them alive.
        task.args = ()
        task.kwargs = _NO_KWARGS
        if debug:
            if state is FAILED:
                log.debug(
                    "%s %r FAILED", task.uid, task.name, exc_info=task.exception()
                )
            else:
                log.debug("%s %r %s", task.uid, task.name, state.value)

    def _dependency_error(
        self, task: TaskFuture, failed: TaskFuture
    ) -> DependencyFailureError:
        error = failed.exception()
        root = error.root_cause if isinstance(error, DependencyFailureError) else error
        failed_deps = [d for d in task._deps or () if d.state is FAILED] or [failed]
        names = [d.name for d in failed_deps]
        return DependencyFailureError(
            f"task {task.name!r} ({task.uid}) did not run: its dependency "
            f"{', '.join(map(repr, names))} failed ({type(root).__name__}: {root})",
            failed_dependencies=names,
            root_cause=root,
        )

    @staticmethod
    def _cancel_message(dep: TaskFuture) -> str:
        return f"dependency {dep.name!r} ({dep.uid}) was cancelled"

    # -- cancellation and shutdown ----------------------------------------------

    def stop_work(self, task: TaskFuture) -> None:
        """Ask whoever runs a RUNNING task to stop it; its state is unchanged."""
        handle = task._handle
        if task._definition.kind is BLOCK or task._command is _PREPARING:
            if handle is not None:
                handle.cancel()
            return
        backend = task._definition.backend or self.default_backend
        try:
            backend.cancel(task)
        except Exception:
            log.warning(
                "backend %r failed to cancel %s", backend.name, task.uid, exc_info=True
            )

    def cancel(self, task: TaskFuture, msg: Any | None) -> None:
        if task.state is RUNNING:
            self.stop_work(task)
            self._cancel_members(task, msg)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("cancelling %s %r", task.uid, task.name)
        self._finish(task, CANCELLED, msg)

    @staticmethod
    def _cancel_members(block: TaskFuture, msg: Any | None) -> None:
        members = block._members
        if members:
            for member in list(members):
                member.cancel(msg)

    def cancel_all(self, msg: str) -> list[TaskFuture]:
        """Settle every unfinished task as CANCELLED (work already stopped);
        return them in call order."""
        unfinished = sorted(
            (t for t in self.live if t.state not in _TERMINAL), key=lambda t: t._seq
        )
        for task in unfinished:
            self._finish(task, CANCELLED, msg)
        return unfinished

    def wake_idle(self) -> None:
        idle = self.idle
        if idle is not None and not idle.done():
            idle.set_result(None)

    def running(self) -> list[TaskFuture]:
        return [t for t in self.live if t.state is RUNNING]
