"""The task graph: registration, dependency counts, release and propagation.

Everything here is synchronous and runs on the engine's loop thread. A task
call registers a future and counts its unfinished dependencies; each
finishing task decrements its dependents' counts and queues those that reach
zero; a failure or cancellation travels down the graph. ``_finish`` and
``_settle`` are the only places a task reaches a final state.

The scheduler is one object per engine, its concerns split over three
modules by inheritance (:class:`Graph` here, retries and timeouts in
``_attempts``, dispatch to backends in ``_dispatch``): the hot path then
reads plain attributes of one object, with no indirection between them.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from asyncio.events import _get_running_loop
from collections import deque
from collections.abc import Sequence
from time import time as _time
from typing import TYPE_CHECKING, Any

from .backends.base import REMOTE
from .backends.noop import DRY_RUN_RESULT
from .errors import DependencyFailureError
from .events import Observers
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
#: The event kind of each final state.
_FINAL_KIND = {DONE: "done", FAILED: "failed", CANCELLED: "cancelled"}

FUNCTION = TaskKind.FUNCTION
EXECUTABLE = TaskKind.EXECUTABLE
PROMPT = TaskKind.PROMPT
BLOCK = TaskKind.BLOCK

_CONTAINERS = frozenset({list, tuple, set, frozenset, dict})
_set_result = asyncio.Future.set_result
_set_exception = asyncio.Future.set_exception
_future_cancel = asyncio.Future.cancel
_future_done = asyncio.Future.done
_result = asyncio.Future.result

_NO_KWARGS: dict[str, Any] = {}

#: Marks a task whose executable/prompt body is still being evaluated.
_PREPARING = object()


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
    # asyncio's own result(): InvalidStateError for a value still on a cluster.
    kind = type(value)
    if kind is TaskFuture:
        return _result(value)
    if kind in _CONTAINERS:
        if kind is dict:
            if any(type(v) is TaskFuture for v in value.values()):
                return {
                    k: _result(v) if type(v) is TaskFuture else v
                    for k, v in value.items()
                }
        elif any(type(v) is TaskFuture for v in value):
            return kind(_result(v) if type(v) is TaskFuture else v for v in value)
    return value


def _message(error: BaseException | None) -> str:
    """``str(error)``, even for an exception whose ``__str__`` raises."""
    try:
        return str(error)
    except Exception:
        return f"<{type(error).__name__} with a message that cannot be shown>"


class Graph:
    """Per-engine task graph bookkeeping."""

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
        self.preparing_var: contextvars.ContextVar[TaskFuture | None] = (
            contextvars.ContextVar(f"asyncflow.preparing.{id(self):x}", default=None)
        )
        self.live: set[TaskFuture] = set()
        #: Whether a backend takes dependencies as futures (``passes_futures``):
        #: only then are tasks handed over ahead of running dependencies.
        self.chaining = any(b.passes_futures for b in engine._backends.values())
        self.observers = Observers(loop)
        self._logging: Any = None  # the DEBUG log's observer, once needed
        self.store: CheckpointStore | None = None
        #: Resolved when ``live`` becomes empty (``async with`` waits on it).
        self.idle: asyncio.Future[None] | None = None
        self._store_warned = False
        self.closing = False
        self._counter = 0
        self._ready: list[TaskFuture] = []
        self._flush_scheduled = False
        self._flushing = False
        self._inbox: deque[tuple[TaskFuture, Any, Any, int | None]] = deque()
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
            interrupted = self._engine._on_call_after_signal
            if interrupted is not None:
                interrupted()  # raises KeyboardInterrupt or SystemExit
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
        deps: Sequence[TaskFuture] | None = None
        # Whether every dependency has succeeded with its value here.
        settled = True
        if args or kwargs:
            found: list[TaskFuture] = []
            only_futures = True  # every argument is a future, none in a container
            for value in args:  # find_dependencies, inlined for speed
                kind = type(value)
                if kind is TaskFuture:
                    found.append(value)
                else:
                    only_futures = False
                    if kind in _CONTAINERS:
                        _scan(value, found)
            if kwargs:
                only_futures = False
                for value in kwargs.values():
                    _scan(value, found)
            if found:
                if len(found) > 2:
                    found = list(dict.fromkeys(found))
                elif len(found) == 2 and found[0] is found[1]:
                    del found[1]
                # The arguments themselves when they are the dependencies:
                # no list per task.
                deps = args if only_futures and len(found) == len(args) else found
                engine = self._engine
                for dep in deps:
                    if dep._engine is not engine:
                        raise ValueError(
                            f"task {name!r} was given the future of {dep.name!r} "
                            f"({dep.uid}) from another WorkflowEngine; "
                            "dependencies must come from the same engine"
                        )
                    if settled and not (dep.state is DONE and _future_done(dep)):
                        settled = False

        self._counter += 1
        task = TaskFuture(loop=self._loop)
        task._seq = self._counter
        task._definition = definition
        task._uid = None  # made from _seq when first asked for
        if self._hold_after is not None:
            preparing = self.preparing_var.get()
            if preparing is not None:
                task._uid = task.uid
                task._seq = preparing._seq
        task.name = name
        task.state = PENDING
        task.args = args
        task.kwargs = kwargs
        task.workflow_id = workflow_id
        task._engine = self._engine
        task._description = description
        task._dependents = None
        task._members = None
        task._handle = None
        task._command = None
        task._deps = deps
        task._waiting = 0
        task._timer = None
        task._key = None
        task._remote = None
        task.attempts = 0
        task.restored = False
        task.submitted_at = task.started_at = task.finished_at = None
        block = self.block_var.get()
        task._block = block
        if self._logging is None and log.isEnabledFor(logging.DEBUG):
            self._log_events()
        if (
            definition.kind is FUNCTION
            and (definition.backend or self.default_backend).completes_at_call
            and not self.observers.active
            # Tasks called before it that have not been dispatched (one may
            # be a command body, which runs first) or a body being evaluated
            # keep call order: it ends as usual.
            and not self._ready
            and not self._flushing
            and self._hold_after is None
            and self.store is None
            and settled
        ):
            # A dry run: the task finishes here, before the call returns.
            task.state = DONE
            task.attempts = 1
            task.submitted_at = task.started_at = task.finished_at = _time()
            task.args = ()
            task.kwargs = _NO_KWARGS
            task._deps = task._block = None
            _set_result(task, DRY_RUN_RESULT)
            return task
        self.live.add(task)
        if block is not None:
            if block._members is None:
                block._members = set()
            block._members.add(task)
        observers = self.observers
        if observers.active:
            now = _time()
            task._uid = task.uid  # made once, read from the slot from now on
            extra = (
                block.uid if block is not None else None,
                tuple([d.uid for d in deps]) if deps else (),
                definition.kind._value_,  # cheaper than .value
                deps or (),
            )
            if deps is None:  # created and ready at once: one append for both
                observers.pending += (
                    *("created", now, task, 0, None, None, extra),
                    *("ready", now, task, 0, None, None, None),
                )
                if not observers._scheduled:
                    observers.schedule()
                self._enqueue(task)
                return task
            observers.pending += ("created", now, task, 0, None, None, extra)
            if not observers._scheduled:
                observers.schedule()
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
                dependents = dep._dependents
                if dependents is None:
                    dep._dependents = task
                elif isinstance(dependents, list):
                    dependents.append(task)
                else:
                    dep._dependents = [dependents, task]
        if failed is not None:
            self._finish(task, FAILED, self._dependency_error(task, failed))
        elif cancelled is not None:
            self._finish(task, CANCELLED, self._cancel_message(cancelled))
        elif task._waiting == 0:
            self._release(task)
        elif self.chaining and self._chainable(task, deps):
            # Its unfinished dependencies run on the backend that runs it:
            # dispatch hands it over with their futures (see _passable).
            self._enqueue(task)
        return task

    def _chainable(self, task: TaskFuture, deps: Sequence[TaskFuture]) -> bool:
        """Whether ``task`` may go to its backend before its dependencies end.

        Only function tasks without retries or timeouts, with no checkpoint,
        on a backend that passes futures, whose unfinished dependencies are
        such tasks on the same backend: the backend then orders the work,
        and a failure upstream still settles the task here, with its cause.
        """
        definition = task._definition
        if (
            definition.kind is not FUNCTION
            or definition.reliability is not None
            or self.store is not None
        ):
            return False
        default = self.default_backend
        backend = definition.backend or default
        if not backend.passes_futures:
            return False
        for dep in deps:
            if dep.state is DONE:
                continue
            upstream = dep._definition
            if (
                upstream.kind is not FUNCTION
                or upstream.reliability is not None
                or (upstream.backend or default) is not backend
            ):
                return False
        return True

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

    def _event(
        self,
        kind: str,
        task: TaskFuture,
        when: float | None = None,
        duration: float | None = None,
        error: Any = None,
        extra: Any = None,
    ) -> None:
        observers = self.observers
        observers.pending += (  # flat: see events.RECORD_SIZE
            kind,
            _time() if when is None else when,
            task,
            task.attempts,
            duration,
            error,
            extra,
        )
        if not observers._scheduled:
            observers.schedule()

    def _log_events(self) -> None:
        """Write the DEBUG log from the events, now that DEBUG is on."""
        from .observers.log import LogObserver

        self._logging = LogObserver()
        self.observers.add(self._logging)

    def _release(self, task: TaskFuture) -> None:
        if self.observers.active:
            self._event("ready", task)
        self._enqueue(task)

    def _enqueue(self, task: TaskFuture) -> None:
        """Queue ``task`` for dispatch and make sure a flush is coming."""
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

    # -- completion and propagation --------------------------------------------

    def _finish(self, task: TaskFuture, state: TaskState, value: Any) -> None:
        """Settle a task and release (DONE) or settle (otherwise) its dependents."""
        if task.state in _TERMINAL:
            return
        self._settle(task, state, value)
        dependents = task._dependents
        if dependents is None:
            return
        task._dependents = None
        if type(dependents) is TaskFuture:
            dependents = [dependents]
        if state is DONE:
            for dep in dependents:
                if dep.state is PENDING:
                    dep._waiting -= 1
                    if dep._waiting == 0:
                        # Every caller that can settle a task DONE flushes
                        # the ready list right after.
                        self._ready.append(dep)
                        if self.observers.active:
                            self._event("ready", dep)
            return
        # A failure or cancellation travels down the graph: iteratively, since
        # a chain may be far longer than the recursion limit.
        upstream = [(task, dependents)]
        while upstream:
            task, dependents = upstream.pop()
            if type(dependents) is TaskFuture:
                dependents = [dependents]
            if task.state is FAILED:
                # Its error lives on in the dependents' errors: asyncio
                # reports an unretrieved one at the end of the chain.
                task._log_traceback = False
            else:
                message = self._cancel_message(task)
            for dep in dependents:
                if dep.state is not PENDING:
                    if dep.state is not RUNNING:
                        continue
                    # Handed to its backend ahead of this dependency (a chain
                    # on one cluster, see _chainable): its work stops too.
                    self.stop_work(dep)
                if task.state is FAILED:
                    self._settle(dep, FAILED, self._dependency_error(dep, task))
                else:
                    self._settle(dep, CANCELLED, message)
                if dep._dependents is not None:
                    upstream.append((dep, dep._dependents))
                    dep._dependents = None

    def _settle(self, task: TaskFuture, state: TaskState, value: Any) -> None:
        task.state = state
        ended = task.finished_at
        started = task.started_at
        if ended is None or started is None or ended < started:
            # No end time noted by a worker for this attempt.
            ended = _time()
        task.finished_at = now = ended
        if task._timer is not None:
            task._timer.cancel()
            task._timer = None
        observers = self.observers
        if observers.active:
            observers.pending += (  # as _event does, inlined: once per task
                "restored" if task.restored else _FINAL_KIND[state],
                now,
                task,
                task.attempts,
                now - started if started is not None else None,
                value if state is not DONE else None,
                None,
            )
            if not observers._scheduled:
                observers.schedule()
        if state is DONE:
            if value is REMOTE:
                # Its value stays with the backend until someone waits for it
                # (or the checkpoint must record it).
                if task._key is not None or task._callbacks:
                    self.fetch(task)
            else:
                _set_result(task, value)
                if task._key is not None:
                    self._record(task, value)
        elif state is FAILED:
            if not isinstance(value, Exception) or isinstance(value, StopIteration):
                # SystemExit & co. would tear down whoever awaits the future.
                wrapped = RuntimeError(f"task {task.name!r} raised {value!r}")
                if isinstance(value, BaseException):
                    wrapped.__cause__ = value
                value = wrapped
            _set_exception(task, value)
            task._remote = None
        else:
            _future_cancel(task, value)
            task._remote = None
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

    def _dependency_error(
        self, task: TaskFuture, failed: TaskFuture
    ) -> DependencyFailureError:
        error = failed.exception()
        root = error.root_cause if isinstance(error, DependencyFailureError) else error
        failed_deps = [d for d in task._deps or () if d.state is FAILED] or [failed]
        names = [d.name for d in failed_deps]
        return DependencyFailureError(
            f"task {task.name!r} ({task.uid}) did not run: its dependency "
            f"{', '.join(map(repr, names))} failed ({type(root).__name__}: "
            f"{_message(root)})",
            failed_dependencies=names,
            root_cause=root,
        )

    # -- values kept by a backend -------------------------------------------------

    def fetch(self, task: TaskFuture) -> None:
        """Ask the backend that keeps a task's value (or will, once the task
        has run there) to bring it here; it answers with :meth:`fetched`.
        Asking twice is harmless."""
        backend = task._definition.backend or self.default_backend
        try:
            backend.fetch(task)
        except Exception as exc:
            log.error("backend %r failed to fetch %s", backend.name, task.uid)
            self.fetched(task, False, exc)

    def fetched(self, task: TaskFuture, ok: bool, value: Any) -> None:
        """A backend delivers a kept value (``ok``) or the exception that
        says why it cannot; on the loop thread. Whoever waits for the task
        resumes; a result the checkpoint wants is recorded now."""
        if task.state is not DONE or _future_done(task):
            return
        if ok:
            _set_result(task, value)
            if task._key is not None:
                self._record(task, value)
        else:
            _set_exception(task, value)
            # The task itself succeeded: only a waiter needs to hear of this.
            task._log_traceback = False

    def _record(self, task: TaskFuture, value: Any) -> None:
        """Give a result to the checkpoint (once: the key is dropped)."""
        key = task._key
        task._key = None
        store = self.store
        if store is not None and key is not None:
            try:
                store.store(key, task, value)
            except Exception as exc:  # never let the store wedge the run
                self._store_failed(exc)

    @staticmethod
    def _cancel_message(dep: TaskFuture) -> str:
        return f"dependency {dep.name!r} ({dep.uid}) was cancelled"

    # -- cancellation -----------------------------------------------------------

    def cancel(self, task: TaskFuture, msg: Any | None) -> None:
        if task.state is RUNNING:
            self.stop_work(task)
            self._cancel_members(task, msg)
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

    # -- provided by the subclasses (_attempts, _dispatch) -----------------------

    def _flush(self) -> None:
        """Hand the ready tasks to their backends."""
        raise NotImplementedError

    def stop_work(self, task: TaskFuture) -> None:
        """Ask whoever runs a RUNNING task to stop it."""
        raise NotImplementedError

    def _store_failed(self, exc: BaseException) -> None:
        """Report a checkpoint fault (once) and go on."""
        raise NotImplementedError
