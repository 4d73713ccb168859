"""The workflow engine: creation, task decorators, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, cast, overload

from . import _signals
from ._dispatch import Scheduler
from ._log import configure_from_environment
from .backends.base import ExecutionBackend
from .backends.local import LocalExecutionBackend
from .backends.noop import NoopExecutionBackend
from .events import TaskEvent
from .tasks import TaskDefinition, TaskFuture, TaskKind, TaskOptions, task_name

__all__ = ["Task", "TaskDecorator", "WorkflowEngine"]

if TYPE_CHECKING:
    from .observers.otel import Telemetry

log = logging.getLogger("asyncflow.engine")


_CREATE_TOKEN = object()
_BARE: Any = object()  # no function given: the decorator was called with options
_NOT_IN_LOOP = (
    "WorkflowEngine needs a running asyncio event loop: create it with "
    "`flow = await WorkflowEngine.create(...)` inside an async function run by "
    "asyncio.run(...)"
)


def _random_hex(digits: int) -> str:
    """``digits`` random hexadecimal digits (``digits`` even), as the start of
    a ``uuid4().hex`` would give, without importing :mod:`uuid`."""
    return os.urandom(digits // 2).hex()


class WorkflowEngine:
    """Registers tasks, tracks their dependencies and runs them on backends.

    Create one with ``flow = await WorkflowEngine.create(...)`` (or
    ``async with await WorkflowEngine.create(...) as flow:``), decorate
    functions with :meth:`function_task`, :meth:`executable_task`,
    :meth:`block` or :meth:`prompt_task`, call them to get futures, await the
    roots, and :meth:`shutdown` at the end.
    """

    def __init__(
        self,
        backends: Sequence[ExecutionBackend] = (),
        *,
        dry_run: bool = False,
        uid: str | None = None,
        work_dir: str | os.PathLike[str] | None = None,
        shutdown_timeout: float = 30.0,
        _token: object = None,
    ) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(_NOT_IN_LOOP) from None
        if _token is not _CREATE_TOKEN:
            raise RuntimeError(
                "use `flow = await WorkflowEngine.create(...)`: the engine's "
                "backends are started asynchronously"
            )
        self.loop = loop
        self.uid = uid or f"asyncflow.session.{_random_hex(8)}"
        #: Unique to this engine object, even when ``uid`` is fixed: names
        #: what one run writes (captured output of uncached calls).
        self.run_id = _random_hex(12)
        from pathlib import Path

        self.work_dir = Path(work_dir) if work_dir is not None else Path.cwd()
        self.dry_run = dry_run
        self.shutdown_timeout = shutdown_timeout
        self._backends: dict[str, ExecutionBackend] = {b.name: b for b in backends}
        self._scheduler = Scheduler(self, loop, backends[0])
        self._shutdown_task: asyncio.Task[None] | None = None
        self._settled = False
        self._handles_signals = False
        #: Called when the program calls a task after a signal began this
        #: engine's shutdown (see _signals): ends the program as the signal
        #: would.
        self._on_call_after_signal: Callable[[], None] | None = None
        #: Observers the engine made (trace, progress, ...), closed at the end.
        self._builtins: list[Any] = []
        self._graph: Any = None

    # -- creation -------------------------------------------------------------

    @classmethod
    async def create(
        cls,
        backend: ExecutionBackend | Sequence[ExecutionBackend] | None = None,
        dry_run: bool = False,
        uid: str | None = None,
        work_dir: str | os.PathLike[str] | None = None,
        *,
        checkpoint: str | os.PathLike[str] | None = None,
        trace: str | os.PathLike[str] | None = None,
        progress: bool = False,
        graph: bool = False,
        shutdown_timeout: float = 30.0,
        handle_signals: bool = True,
    ) -> WorkflowEngine:
        """Create an engine on the running loop and start its backends.

        ``backend`` is one backend or a list of backends with distinct names;
        the first is the default. Without one, ``dry_run=True`` uses
        :class:`NoopExecutionBackend` and ``dry_run=False`` a thread pool.
        ``checkpoint`` names a SQLite file that keeps every task result, so
        that re-running the same workflow skips the tasks that finished
        before (see :mod:`asyncflow.checkpoint`). ``trace`` names a file that
        receives every task event as a JSON line (see
        :mod:`asyncflow.observers.trace`). ``progress=True`` shows a live
        progress display (extra ``rich``; plain lines when stderr is not a
        terminal) and a summary at the end. ``graph=True`` records the task
        graph for :meth:`graph`. ``shutdown_timeout`` bounds
        :meth:`shutdown`. With ``handle_signals`` (main thread only),
        SIGINT/SIGTERM shut the engine down gracefully.
        """
        configure_from_environment()
        backends = await cls._backends_from(backend, dry_run)
        engine = cls(
            backends,
            dry_run=dry_run,
            uid=uid,
            work_dir=work_dir,
            shutdown_timeout=shutdown_timeout,
            _token=_CREATE_TOKEN,
        )
        try:
            if checkpoint is not None:
                from .checkpoint import CheckpointStore

                # Opening checks the file's integrity: keep the loop free meanwhile.
                engine._scheduler.store = await asyncio.to_thread(
                    CheckpointStore, checkpoint
                )
            if trace is not None:
                from .observers.trace import TraceWriter

                engine._add_builtin(
                    TraceWriter(
                        trace,
                        engine.loop,
                        {
                            "engine": engine.uid,
                            "run_id": engine.run_id,
                            "backends": [b.name for b in backends],
                        },
                    )
                )
            if progress:
                from .observers.progress import ProgressDisplay

                engine._add_builtin(ProgressDisplay(engine))
            if graph:
                from .graph import GraphRecorder

                engine._graph = GraphRecorder()
                engine._add_builtin(engine._graph)
            for b in backends:
                await b.attach(engine._scheduler)
            if handle_signals:
                engine._handles_signals = _signals.register(engine, engine.loop)
        except BaseException:
            # Nothing of a half-made engine may outlive it (a trace file, the
            # progress display's timer and log filter, the store's thread,
            # the backends attached so far).
            engine._close_observers()
            store = engine._scheduler.store
            if store is not None:
                engine._scheduler.store = None
                store.close()
            attached = [b for b in backends if b._reporter is engine._scheduler]
            if attached:
                engine._scheduler.closing = True
                with contextlib.suppress(BaseException):
                    await engine._shutdown_backends(shutdown_timeout)
            raise
        log.info(
            "engine %s started with backend(s) %s",
            engine.uid,
            ", ".join(f"{b.name!r} ({type(b).__name__})" for b in backends),
        )
        return engine

    @staticmethod
    async def _backends_from(
        backend: ExecutionBackend | Sequence[ExecutionBackend] | None, dry_run: bool
    ) -> list[ExecutionBackend]:
        if backend is not None and dry_run:
            log.warning(
                "dry_run=True with an explicit backend: the backend runs tasks as "
                "usual; leave backend out for a dry run"
            )
        if backend is None:
            if dry_run:
                return [NoopExecutionBackend()]
            log.info("no backend given: running tasks in a local thread pool")
            return [LocalExecutionBackend()]
        given: list[ExecutionBackend] = (
            list(backend) if isinstance(backend, (list, tuple)) else [backend]  # type: ignore[list-item]
        )
        if not given:
            raise ValueError("backend list is empty: give at least one backend")
        if not all(isinstance(b, ExecutionBackend) for b in given):
            from .backends.rhapsody import adapt

            given = [adapt(b) or b for b in given]
        names: set[str] = set()
        for b in given:
            if not isinstance(b, ExecutionBackend):
                raise TypeError(
                    f"not an execution backend: {b!r} (expected an asyncflow "
                    "backend such as LocalExecutionBackend, or a RHAPSODY backend)"
                )
            if b.name in names:
                raise ValueError(
                    f"two backends are named {b.name!r}: give each backend a "
                    "distinct name=..."
                )
            names.add(b.name)
        return given

    # -- events -------------------------------------------------------------

    def subscribe(self, callback: Callable[[TaskEvent], Any]) -> Callable[[], None]:
        """Call ``callback`` with every :class:`~asyncflow.TaskEvent` from now on.

        A plain callable runs on the engine's loop, in batches once per loop
        iteration, and must be quick; an ``async def`` one runs in a task of
        its own. One that raises is detached with a WARNING; the run goes on.
        Returns a function that unsubscribes.
        """
        return self._scheduler.observers.add(callback)

    def graph(self, format: str = "mermaid") -> str:
        """The task graph recorded so far, with each task's state, as Mermaid
        (``format="mermaid"``) or Graphviz DOT (``format="dot"``) text.

        Needs ``WorkflowEngine.create(graph=True)``, which records every task
        and dependency from the start (it costs memory per task).
        """
        if self._graph is None:
            raise RuntimeError(
                "this engine does not record its task graph: create it with "
                "`await WorkflowEngine.create(..., graph=True)` to use flow.graph()"
            )
        from .graph import render

        self._scheduler.observers.deliver()  # what happened this loop step too
        return render(self._graph, format)

    async def start_telemetry(
        self,
        resource_poll_interval: float = 5.0,
        checkpoint_interval: float | None = None,
        checkpoint_path: str | os.PathLike[str] | None = None,
        span_processors: Sequence[Any] | None = None,
        metric_readers: Sequence[Any] | None = None,
        resource: Any = None,
        *,
        exporter: Any = None,
        endpoint: str | None = None,
        service_name: str | None = None,
        tracer_provider: Any = None,
    ) -> Telemetry:
        """Export one OpenTelemetry span per task from now on (extra ``otel``).

        The positional parameters are RADICAL AsyncFlow 0.6's, in its order;
        ``exporter`` (``"console"``, ``"memory"``, ``"otlp"``, or a
        ``SpanExporter``), ``endpoint``, ``service_name`` and
        ``tracer_provider`` choose where spans go. See docs/telemetry.md.
        """
        from .observers.otel import start_telemetry

        return await start_telemetry(
            self,
            resource_poll_interval,
            checkpoint_interval,
            checkpoint_path,
            span_processors,
            metric_readers,
            resource,
            exporter=exporter,
            endpoint=endpoint,
            service_name=service_name,
            tracer_provider=tracer_provider,
        )

    def _add_builtin(self, observer: Any) -> Callable[[], None]:
        """Add an observer the engine closes at shutdown; returns its remover."""
        remove = self._scheduler.observers.add(observer)
        self._builtins.append(observer)
        return remove

    def _close_observers(self) -> None:
        try:
            self._scheduler.observers.deliver()
        except Exception:  # deliver() isolates observers; never fail a shutdown
            log.warning("delivering the last events failed", exc_info=True)
        for observer in self._builtins:
            try:
                observer.close()
            except Exception:
                log.warning("observer %r failed to close", observer, exc_info=True)
        self._builtins.clear()

    # -- properties -----------------------------------------------------------

    @property
    def backend(self) -> ExecutionBackend:
        """The default backend (the first one given)."""
        return self._scheduler.default_backend

    @property
    def backends(self) -> Mapping[str, ExecutionBackend]:
        """All backends by name."""
        return dict(self._backends)

    @property
    def is_shut_down(self) -> bool:
        return self._shutdown_task is not None

    @property
    def _abandoned_threads(self) -> bool:
        return any(
            getattr(b, "abandoned_threads", False) for b in self._backends.values()
        )

    # -- decorators ---------------------------------------------------------

    @property
    def function_task(self) -> TaskDecorator:
        """Make a task whose body is the work; its result is the body's return."""
        return TaskDecorator(self, TaskKind.FUNCTION)

    @property
    def executable_task(self) -> TaskDecorator:
        """Make a task whose body returns a command line; the result is its stdout.

        The command runs through the shell unless the task description says
        ``{"shell": False}``; ``env`` (merged over the current environment)
        and ``cwd`` are honoured. A non-zero exit fails the task with
        :class:`~asyncflow.ExecutableError`.
        """
        return TaskDecorator(self, TaskKind.EXECUTABLE)

    @property
    def prompt_task(self) -> TaskDecorator:
        """Make a task whose body returns a prompt for an AI backend."""
        return TaskDecorator(self, TaskKind.PROMPT)

    @property
    def block(self) -> TaskDecorator:
        """Make a block: an ``async def`` that calls tasks; it runs on the loop.

        Tasks created while a block runs are its members: cancelling the
        block cancels those that have not finished.
        """
        return TaskDecorator(self, TaskKind.BLOCK)

    def _backend_named(
        self, name: str | None, kind: TaskKind
    ) -> ExecutionBackend | None:
        if name is None:
            return None
        if not isinstance(name, str):
            raise TypeError(
                f"backend= takes a backend name (str), got {type(name).__name__}"
            )
        try:
            return self._backends[name]
        except KeyError:
            known = ", ".join(repr(n) for n in self._backends)
            raise ValueError(
                f"unknown backend {name!r} for a {kind} task; this engine's "
                f"backends are: {known}"
            ) from None

    # -- shutdown -----------------------------------------------------------

    async def shutdown(
        self, timeout: float | None = None, *, skip_execution_backend: bool = False
    ) -> None:
        """Cancel unfinished work, stop the backends and release their resources.

        Idempotent and safe to call concurrently. Bounded by ``timeout``
        (default: the engine's ``shutdown_timeout``); whatever is still
        running then is abandoned and logged.

        ``skip_execution_backend=True`` (RADICAL AsyncFlow's parameter) ends
        the engine the same way but leaves its backends running: unfinished
        tasks are still cancelled and their work asked to stop, yet no
        backend is shut down, so none is waited for. The backends are
        released from this engine: hand them to another engine, or shut them
        down yourself with ``await backend.shutdown()``. The first call to
        begin the shutdown decides.
        """
        if self._shutdown_task is None:
            self._keep_backends = skip_execution_backend
        task = self._begin_shutdown(timeout)
        await asyncio.shield(task)

    def _begin_shutdown(
        self, timeout: float | None = None, *, settle: bool = True
    ) -> asyncio.Task[None]:
        """Start shutting down (once). ``settle=False`` leaves the unfinished
        futures to the caller's :meth:`_settle_all` (the signal path)."""
        if self._shutdown_task is None:
            self._scheduler.closing = True
            self._scheduler.wake_idle()
            self._shutdown_task = self.loop.create_task(self._shutdown(timeout, settle))
        return self._shutdown_task

    async def _shutdown(self, timeout: float | None, settle: bool) -> None:
        scheduler = self._scheduler
        if self._handles_signals:
            _signals.unregister(self, self.loop)
        log.info("engine %s shutting down", self.uid)
        # Stop the work first and settle the futures last, so that code
        # awaiting them resumes only once nothing is left running.
        for task in scheduler.running():
            scheduler.stop_work(task)
        if getattr(self, "_keep_backends", False):
            self._release_backends()
        else:
            await self._shutdown_backends(
                self.shutdown_timeout if timeout is None else timeout
            )
        # Results that finished while the backends stopped are in the store's
        # queue: write them before the program can exit.
        store = scheduler.store
        if store is not None:
            scheduler.store = None
            try:
                await store.aclose()
            except Exception:
                log.warning("checkpoint %s failed to close", store.path, exc_info=True)
        if settle:
            self._settle_all()
            await scheduler.observers.drain(timeout=5.0)

    def _settle_all(self) -> None:
        scheduler = self._scheduler
        if self._settled:
            return
        self._settled = True
        try:
            cancelled = scheduler.cancel_all(f"workflow engine {self.uid} shut down")
        finally:
            self._close_observers()
        if cancelled:
            shown = ", ".join(f"{t.name} ({t.uid})" for t in cancelled[:5])
            more = f" and {len(cancelled) - 5} more" if len(cancelled) > 5 else ""
            log.warning(
                "engine %s shut down with %d unfinished task(s), now cancelled: "
                "%s%s (await a task's future to wait for it)",
                self.uid,
                len(cancelled),
                shown,
                more,
            )
        else:
            log.info("engine %s shut down", self.uid)

    def _kill_running(self) -> None:
        """Kill all running work at once (a second Ctrl-C during shutdown)."""
        self._begin_shutdown()
        for backend in self._backends.values():
            try:
                backend.kill()
            except Exception:
                log.warning(
                    "backend %r failed to kill its work", backend.name, exc_info=True
                )

    def _release_backends(self) -> None:
        """Detach the backends without shutting them down (they may serve
        another engine); reports still due from their work reach this
        engine's scheduler, which ignores them."""
        for backend in self._backends.values():
            if backend._reporter is self._scheduler:
                backend._reporter = None
        log.info(
            "engine %s left its backend(s) %s running (skip_execution_backend="
            "True); shut them down with `await backend.shutdown()`",
            self.uid,
            ", ".join(repr(name) for name in self._backends),
        )

    async def _shutdown_backends(self, timeout: float) -> None:
        jobs = {self.loop.create_task(b.shutdown()): b for b in self._backends.values()}
        done, pending = await asyncio.wait(jobs, timeout=timeout)
        for job in done:
            if not job.cancelled() and job.exception() is not None:
                log.error(
                    "backend %r failed to shut down",
                    jobs[job].name,
                    exc_info=job.exception(),
                )
        for job in pending:
            job.cancel()
            log.warning(
                "backend %r did not shut down within %.1fs; abandoned it",
                jobs[job].name,
                timeout,
            )

    @contextlib.asynccontextmanager
    async def workflow_scope(self, id: str | None = None) -> AsyncIterator[str]:
        """Tag every task created inside with a workflow id (yielded).

        ``async with flow.workflow_scope() as wid:`` gets an id of the form
        ``wf-xxxxxxxx``; scopes nest, belong to this engine only, and follow
        asyncio's context rules (tasks started inside inherit the scope). A
        call-time ``workflow_id=`` still wins.
        """
        workflow_id = id if id is not None else f"wf-{_random_hex(8)}"
        token = self._scheduler.workflow_var.set(workflow_id)
        try:
            yield workflow_id
        finally:
            self._scheduler.workflow_var.reset(token)

    async def __aenter__(self) -> WorkflowEngine:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            await self._wait_for_tasks()
        await self.shutdown()

    async def _wait_for_tasks(self) -> None:
        """Wait until every task and block called on this engine has finished.

        A shutdown begun elsewhere (a signal, another coroutine) ends the wait
        only once it has settled the futures: on a signal that is after the
        program's exit is under way, so the code after ``async with`` never
        runs as if the block had ended normally.
        """
        scheduler = self._scheduler
        while scheduler.live:
            idle = scheduler.idle = self.loop.create_future()
            try:
                await idle
            finally:
                scheduler.idle = None

    def __repr__(self) -> str:
        state = "shut down" if self.is_shut_down else "running"
        return f"<WorkflowEngine {self.uid} {state}, backends={list(self._backends)}>"


def _describe(function: Callable[..., Any]) -> str:
    if getattr(function, "__name__", None) == "<lambda>":
        return "a lambda"
    return f"plain function {task_name(function)!r}"


def _default_description(function: Callable[..., Any], name: str) -> dict[str, Any]:
    try:
        parameter = inspect.signature(function).parameters.get("task_description")
    except (TypeError, ValueError):
        return {}
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return {}
    default = parameter.default
    if default is None:
        return {}
    if not isinstance(default, dict):
        raise TypeError(
            f"task {name!r}: the default of task_description must be a dict, "
            f"got {type(default).__name__}"
        )
    return default


class Task(Protocol):
    """What a task decorator returns: call it to get a :class:`TaskFuture`."""

    __name__: str
    definition: TaskDefinition

    def __call__(self, *args: Any, **kwargs: Any) -> TaskFuture: ...

    def options(
        self,
        *,
        retries: int = ...,
        retry_delay: float = ...,
        retry_backoff: float = ...,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = ...,
        timeout: float | None = ...,
        cache: bool = ...,
        cache_key: Callable[..., Any] | None = ...,
        version: str | None = ...,
        resources: Mapping[str, Any] | None = ...,
        priority: int = ...,
    ) -> Task:
        """The same task with other settings, for the calls made through what
        this returns: ``fetch.options(timeout=5)(url)``,
        ``train.options(resources={"gpus": 2}, priority=10)(data)``."""
        ...


class TaskDecorator:
    """``@flow.function_task`` and its siblings, bare or with options.

    ``backend`` routes the task to a named backend. ``retries`` re-runs a
    failed attempt (after ``retry_delay`` seconds, multiplied by
    ``retry_backoff`` each time) when its exception is one of ``retry_on``.
    ``timeout`` stops an attempt that runs longer and fails it with
    :class:`~asyncflow.TaskTimeoutError`. ``cache=False`` keeps the task's
    results out of the engine's checkpoint; ``cache_key=`` (a callable over
    the task's arguments) and ``version=`` (a string) replace the arguments
    and the code in its cache key (docs/reliability.md). ``capture_stdio=True``
    (executable tasks) writes the command's stdout and stderr to files
    under ``work_dir/<engine uid>/`` named for the call (its cache key, or
    its uid and the engine's run id), private to the user, and makes the
    stdout file's path the result.
    """

    __slots__ = ("_engine", "_kind")

    def __init__(self, engine: WorkflowEngine, kind: TaskKind) -> None:
        self._engine = engine
        self._kind = kind

    @overload
    def __call__(self, func: Callable[..., Any], /) -> Task: ...
    @overload
    def __call__(
        self,
        /,
        *,
        backend: str | None = None,
        retries: int = 0,
        retry_delay: float = 0.0,
        retry_backoff: float = 2.0,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = Exception,
        timeout: float | None = None,
        cache: bool = True,
        cache_key: Callable[..., Any] | None = None,
        version: str | None = None,
        capture_stdio: bool = False,
        resources: Mapping[str, Any] | None = None,
        priority: int = 0,
    ) -> Callable[[Callable[..., Any]], Task]: ...
    def __call__(
        self,
        func: Any = _BARE,
        /,
        *,
        backend: str | None = None,
        retries: int = 0,
        retry_delay: float = 0.0,
        retry_backoff: float = 2.0,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = Exception,
        timeout: float | None = None,
        cache: bool = True,
        cache_key: Callable[..., Any] | None = None,
        version: str | None = None,
        capture_stdio: bool = False,
        resources: Mapping[str, Any] | None = None,
        priority: int = 0,
    ) -> Task | Callable[[Callable[..., Any]], Task]:
        if backend is not None and self._kind is TaskKind.BLOCK:
            raise TypeError(
                "@flow.block takes no backend=: blocks run on the engine's event "
                "loop; give backend= to the tasks they call"
            )
        target = self._engine._backend_named(backend, self._kind)
        options = TaskOptions(
            retries,
            retry_delay,
            retry_backoff,
            retry_on,
            timeout,
            cache,
            cache_key,
            version,
            resources,
            priority,
        )
        if self._kind is TaskKind.BLOCK and (resources is not None or priority):
            raise TypeError(
                "@flow.block takes no resources= or priority=: blocks run on the "
                "engine's event loop; give them to the tasks they call"
            )
        if capture_stdio and self._kind is not TaskKind.EXECUTABLE:
            raise TypeError("capture_stdio=True applies to @flow.executable_task only")

        def decorate(function: Callable[..., Any]) -> Task:
            return self._make(function, target, options, capture_stdio)

        if func is _BARE:
            return decorate
        return decorate(func)

    def _make(
        self,
        function: Callable[..., Any],
        backend: ExecutionBackend | None,
        options: TaskOptions,
        capture_stdio: bool,
    ) -> Task:
        kind = self._kind
        if not callable(function):
            decorator = "block" if kind is TaskKind.BLOCK else f"{kind}_task"
            hint = (
                " (to choose a backend, write backend=...)"
                if isinstance(function, str)
                else ""
            )
            raise TypeError(
                f"@flow.{decorator} can only decorate a function, got "
                f"{type(function).__name__} {function!r}{hint}"
            )
        if kind is TaskKind.BLOCK and not inspect.iscoroutinefunction(function):
            raise TypeError(
                f"@flow.block needs an `async def` function, got "
                f"{_describe(function)}: a block runs on the engine's event loop "
                "and awaits the tasks it calls; for work in a plain function "
                "use @flow.function_task"
            )
        name = task_name(function)
        description = _default_description(function, name)
        definition = TaskDefinition(
            function, kind, description, backend, options, capture_stdio
        )
        return _task_caller(self._engine, definition)


def _task_caller(engine: WorkflowEngine, definition: TaskDefinition) -> Task:
    register = engine._scheduler.register

    def call(*args: Any, **kwargs: Any) -> TaskFuture:
        return register(definition, args, kwargs)

    def options(**changes: Any) -> Task:
        return _task_caller(
            engine, definition.with_options(definition.options.replace(**changes))
        )

    functools.update_wrapper(call, definition.function)
    call.__name__ = call.__qualname__ = definition.name
    caller = cast(Task, call)
    caller.definition = definition
    caller.options = options  # type: ignore[method-assign]
    return caller
