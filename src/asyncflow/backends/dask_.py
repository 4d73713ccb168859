"""Run tasks on a ``dask.distributed`` cluster, keeping their values there.

:class:`DaskExecutionBackend` hands each task to Dask with ``client.submit``.
A task's value stays on the worker that computed it: a dependent on the same
cluster receives the dependency's Dask future, so the value moves from
worker to worker, and it comes into this process only when someone waits
for the task (or a task elsewhere, or the checkpoint, needs it). A chain of
tasks on the cluster is handed over whole, as Dask users do by hand, while
states, failure propagation, retries and timeouts stay the engine's.

The module-level functions prefixed ``_run``/``_stop`` run in the workers:
the workers import this module, so asyncflow must be installed there too.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from types import SimpleNamespace
from typing import Any, cast

try:
    import distributed
    from distributed.scheduler import KilledWorker
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "DaskExecutionBackend needs dask.distributed: "
        "pip install 'asyncflow-workflows[dask]'"
    ) from exc

from ..errors import ResourceError, WorkerLostError
from ..tasks import TaskFuture, TaskKind, TaskState
from ._subprocess import REAP_BOUND, TERMINATE_GRACE, ProcessGroups, run_command
from .base import REMOTE, ExecutionBackend, TaskReporter

__all__ = ["DaskExecutionBackend"]

log = logging.getLogger("asyncflow.backends.dask")

_RUNNING = TaskState.RUNNING
_DONE = TaskState.DONE
_TERMINAL = frozenset({TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED})
_FUNCTION = TaskKind.FUNCTION
_future_done = asyncio.Future.done
_future_result = asyncio.Future.result

#: Seconds a worker waits for a stopped attempt to end before saying it
#: still runs (a plain function in a thread cannot be interrupted).
STOP_BOUND = TERMINATE_GRACE + REAP_BOUND
#: Seconds the values waited for are collected, while other tasks still run,
#: before they are fetched together; and how many make a batch at once.
_WANTED_WINDOW = 0.02
_WANTED_BATCH = 1024
#: How many stop requests for attempts not (yet) running a worker remembers.
_STOPPED_LIMIT = 4096


# -- in the workers ---------------------------------------------------------------


class _Attempt:
    """One attempt running in this worker process, for :func:`_stop_attempts`."""

    __slots__ = ("ended", "groups", "loop", "runner", "stop")

    def __init__(self) -> None:
        self.ended = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.runner: asyncio.Task[Any] | None = None
        self.groups: ProcessGroups | None = None
        self.stop = False


_attempts: dict[str, _Attempt] = {}
_stopped: OrderedDict[str, None] = OrderedDict()
_lock = threading.Lock()
_threads = threading.local()


def _thread_loop() -> asyncio.AbstractEventLoop:
    """This worker thread's own event loop, for ``async def`` bodies and
    commands: blocking code in them never stalls the worker's own loop."""
    loop: asyncio.AbstractEventLoop | None = getattr(_threads, "loop", None)
    if loop is None or loop.is_closed():
        loop = _threads.loop = asyncio.new_event_loop()
    return loop


class _Stopped(Exception):
    """An attempt stopped on the engine's request (its result is not used)."""


def _begin(key: str) -> _Attempt:
    with _lock:
        if key in _stopped:
            del _stopped[key]
            raise _Stopped(f"{key} was stopped before it started")
        attempt = _attempts[key] = _Attempt()
    return attempt


def _end(key: str, attempt: _Attempt) -> None:
    with _lock:
        if _attempts.get(key) is attempt:
            del _attempts[key]
    attempt.ended.set()


def _run_coroutine(attempt: _Attempt, coroutine: Any) -> Any:
    loop = _thread_loop()
    runner = loop.create_task(coroutine)
    with _lock:
        attempt.loop, attempt.runner = loop, runner
        if attempt.stop:
            runner.cancel()
    try:
        return loop.run_until_complete(runner)
    except asyncio.CancelledError:
        raise _Stopped("stopped on the engine's request") from None


def _current_key() -> str:
    # Taken from the worker rather than passed as an argument: Dask may take
    # a string argument equal to a key for that key's value.
    return str(distributed.get_worker().get_current_task())


def _announce(topic: str | None, key: str) -> None:
    if topic is not None:
        distributed.get_worker().log_event(topic, (key, time.time()))


def _protect(exc: BaseException) -> Exception:
    """SystemExit & co. from a body must not take the worker down."""
    return RuntimeError(f"the task raised {exc!r}")


def _run_function(
    function: Callable[..., Any],
    is_async: bool,
    topic: str | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    frozen: tuple[Any, ...],
) -> Any:
    """A function task's body, in a worker thread."""
    key = _current_key()
    attempt = _begin(key)
    try:
        _announce(topic, key)
        for where in frozen:  # sets Dask would not look into: see _remote_args
            if isinstance(where, int):
                args = (*args[:where], frozenset(args[where]), *args[where + 1 :])
            else:
                kwargs = {**kwargs, where: frozenset(kwargs[where])}
        if is_async:
            return _run_coroutine(attempt, function(*args, **kwargs))
        return function(*args, **kwargs)
    except Exception:
        raise
    except BaseException as exc:
        raise _protect(exc) from exc
    finally:
        _end(key, attempt)


def _run_command(spec: Any, topic: str | None) -> str:
    """An executable task's command, in a worker thread's event loop: its
    stdout, or :class:`~asyncflow.ExecutableError`."""
    key = _current_key()
    attempt = _begin(key)
    try:
        _announce(topic, key)
        attempt.groups = groups = ProcessGroups()
        return cast(
            str,
            _run_coroutine(
                attempt, run_command(cast(TaskFuture, spec), TERMINATE_GRACE, groups)
            ),
        )
    finally:
        _end(key, attempt)


async def _stop_attempts(bounds: dict[str, float], kill: bool) -> list[str]:
    """Stop these attempts where they run in this worker process; return
    the keys of those still running after their bound (seconds)."""
    waiting: list[tuple[str, _Attempt]] = []
    with _lock:
        for key in bounds:
            attempt = _attempts.get(key)
            if attempt is None:
                # Not started here (yet): if it comes, it stops at once.
                _stopped[key] = None
                while len(_stopped) > _STOPPED_LIMIT:
                    _stopped.popitem(last=False)
                continue
            attempt.stop = True
            if kill and attempt.groups is not None:
                attempt.groups.kill_all()
            if attempt.runner is not None and attempt.loop is not None:
                try:
                    attempt.loop.call_soon_threadsafe(attempt.runner.cancel)
                except RuntimeError:  # its loop is closed: it has ended
                    pass
            waiting.append((key, attempt))
    if not waiting:
        return []

    def wait() -> list[str]:
        start = time.monotonic()
        return [
            key
            for key, attempt in waiting
            if not attempt.ended.wait(max(0.0, start + bounds[key] - time.monotonic()))
        ]

    return await asyncio.get_running_loop().run_in_executor(None, wait)


class _CommandSpec:
    """What running a command reads of its task, picklable for a worker."""

    def __init__(self, task: TaskFuture) -> None:
        engine = task._engine
        self.command = task.command
        self.task_description = dict(task.task_description)
        self.name = task.name
        self.uid = task.uid
        self.attempts = task.attempts
        self._key = task._key
        self._definition = SimpleNamespace(capture_stdio=task._definition.capture_stdio)
        self._engine = SimpleNamespace(
            work_dir=engine.work_dir, uid=engine.uid, run_id=engine.run_id
        )


# -- in the engine's process ------------------------------------------------------


def _remote_args(
    task: TaskFuture, client: Any
) -> tuple[tuple[Any, ...], dict[str, Any], tuple[Any, ...]]:
    """The task's arguments for ``client.submit``: a dependency that ran on
    this client as its Dask future (the value stays on the cluster), any
    other one as its value; and where frozensets holding futures must be
    rebuilt on the worker (Dask resolves futures inside lists, tuples, sets
    and dicts only)."""
    frozen: list[Any] = []

    def convert(value: Any, where: Any) -> Any:
        kind = type(value)
        if kind is TaskFuture:
            return _dependency(value, client)
        if kind in (list, tuple, set):
            if any(type(v) is TaskFuture for v in value):
                return kind(
                    _dependency(v, client) if type(v) is TaskFuture else v
                    for v in value
                )
        elif kind is dict:
            if any(type(v) is TaskFuture for v in value.values()):
                return {
                    k: _dependency(v, client) if type(v) is TaskFuture else v
                    for k, v in value.items()
                }
        elif kind is frozenset and any(type(v) is TaskFuture for v in value):
            frozen.append(where)
            return [
                _dependency(v, client) if type(v) is TaskFuture else v for v in value
            ]
        return value

    args = tuple([convert(a, i) for i, a in enumerate(task.args)])
    kwargs = {k: convert(v, k) for k, v in task.kwargs.items()}
    return args, kwargs, tuple(frozen)


def _dependency(dep: TaskFuture, client: Any) -> Any:
    remote = dep._remote
    if remote is not None and remote.client is client:
        return remote
    return _future_result(dep)


def _worker_lost(task: TaskFuture, error: KilledWorker) -> WorkerLostError:
    lost = WorkerLostError(
        f"the Dask workers running task {task.name!r} ({task.uid}) died while "
        f"it ran, {error.allowed_failures + 1} time(s) (Dask gives up after "
        "distributed.scheduler.allowed-failures); the task is not run again"
    )
    lost.__cause__ = error
    return lost


def _unfetchable(task: TaskFuture, why: str) -> RuntimeError:
    return RuntimeError(
        f"the result of task {task.name!r} ({task.uid}) stayed on the Dask "
        f"cluster and can no longer be fetched: {why}. Await the results you "
        "need before the engine shuts down (inside `async with`)"
    )


def _declared(name: str, backend: str) -> str:
    return f"the workers of Dask backend {backend!r} (none declares {name!r})"


class _Workers:
    """What the cluster's workers offer, as last seen: per resource, the
    most one worker declares; threads and memory limit of the largest."""

    def __init__(self, identity: Mapping[str, Any]) -> None:
        workers = list((identity.get("workers") or {}).values())
        self.count = len(workers)
        self.resources: dict[str, float] = {}
        for worker in workers:
            for name, amount in (worker.get("resources") or {}).items():
                self.resources[name] = max(self.resources.get(name, 0), amount)
        self.threads = max((int(w.get("nthreads") or 0) for w in workers), default=0)
        self.memory = max((int(w.get("memory_limit") or 0) for w in workers), default=0)


class DaskExecutionBackend(ExecutionBackend):
    """Runs function and executable tasks on a ``dask.distributed`` cluster.

    Give it one of:

    - ``client``: an existing :class:`distributed.Client`, synchronous or
      created with ``asynchronous=True`` on the engine's event loop; it is
      left running at shutdown;
    - ``address``: a scheduler address (``"tcp://host:8786"``); the backend
      connects a client of its own and closes it at shutdown (the cluster
      keeps running);
    - keyword arguments for :class:`distributed.LocalCluster`
      (``n_workers=2, processes=True, threads_per_worker=1, ...``): the
      backend starts that cluster (scheduler and dashboard on 127.0.0.1
      unless told otherwise) and closes it at shutdown.

    Function bodies run in worker threads (``async def`` ones on an event
    loop of that thread); executable tasks run their command as a subprocess
    of the worker, with ``env``, ``cwd`` and ``shell`` from the task
    description, in a process group of its own that is killed when the task
    is cancelled or times out. Bodies, arguments and results travel with
    Dask's serialization (cloudpickle for closures and lambdas); the workers
    need asyncflow installed.

    A task's value stays on the worker that computed it: a dependent on this
    backend gets it there, and it is fetched into this process only when
    someone waits for the task's future. ``values_fetched`` counts the
    values fetched. After shutdown, a value never fetched is gone: waiting
    for it raises ``RuntimeError``.

    Retries and timeouts are the engine's (Dask's own ``retries`` are not
    used). A worker that dies mid-task has its task rescheduled by Dask;
    when Dask gives up (``distributed.scheduler.allowed-failures``) the task
    fails with :class:`~asyncflow.WorkerLostError`.

    Per task, ``priority`` and ``resources`` map onto Dask's ``priority=``
    and ``resources=`` (see docs/backends.md for the table), and
    ``task_description={"workers": [...], "allow_other_workers": True}``
    onto the same arguments of ``client.submit``.
    """

    kinds = frozenset({TaskKind.FUNCTION, TaskKind.EXECUTABLE})
    reports_start = True
    passes_futures = True
    honours_resources = True

    def __init__(
        self,
        client: Any = None,
        *,
        address: str | None = None,
        name: str = "dask",
        shutdown_timeout: float = 10.0,
        **cluster_kwargs: Any,
    ) -> None:
        super().__init__(name)
        if client is not None and not isinstance(client, distributed.Client):
            raise TypeError(
                "DaskExecutionBackend takes a distributed.Client, got "
                f"{type(client).__name__}; for a scheduler address write "
                "address=..."
            )
        given = [
            what
            for what, value in (
                ("a client", client),
                ("address=", address),
                ("LocalCluster arguments", cluster_kwargs or None),
            )
            if value is not None
        ]
        if len(given) > 1:
            raise TypeError(
                f"DaskExecutionBackend takes one of a client, address= or "
                f"LocalCluster arguments, got {' and '.join(given)}"
            )
        self._client: Any = client
        self._address = address
        self._cluster_kwargs = dict(cluster_kwargs)
        self._cluster: Any = None
        #: Whether shutdown closes the client (one the backend made).
        self._owns_client = client is None
        self.shutdown_timeout = shutdown_timeout
        #: How many task values were fetched into this process.
        self.values_fetched = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._prefix = ""
        self._topic = ""
        # Attempts handed to Dask whose outcome is not reported yet, by key.
        self._inflight: dict[
            str, tuple[TaskFuture, int, asyncio.Future[None] | None]
        ] = {}
        # Attempts that ended, from the client's loop to the engine's; values
        # being fetched with the news (client's loop only).
        self._ended: deque[tuple[Any, TaskFuture, str, Any, Any]] = deque()
        self._ended_scheduled = False
        self._wanted: list[tuple[Any, TaskFuture]] = []
        self._gathering: set[asyncio.Future[None]] = set()
        self._wanted_timer: asyncio.TimerHandle | None = None
        # Running tasks someone waits for (engine's loop; read on the client's).
        self._waited: set[TaskFuture] = set()
        # Tasks whose placement must be checked against a fresh view of the
        # workers first; while any waits, later tasks queue behind them.
        self._queue: list[TaskFuture] = []
        self._workers: _Workers | None = None
        self._warned: set[str] = set()
        # Batched client calls: values to fetch, futures to cancel, attempts
        # to stop in the workers.
        self._to_fetch: dict[TaskFuture, None] = {}
        self._fetching: set[TaskFuture] = set()
        self._to_cancel: list[Any] = []
        self._to_stop: dict[str, tuple[asyncio.Future[None] | None, float]] = {}
        # Attempts asked to stop whose workers have not answered yet.
        self._stopping: set[str] = set()
        self._batch_scheduled = False
        self._jobs: set[asyncio.Task[Any]] = set()

    # -- the client and the cluster ------------------------------------------------

    @property
    def client(self) -> Any:
        """The :class:`distributed.Client` tasks are submitted through."""
        if self._client is None:
            raise RuntimeError(
                f"backend {self.name!r} has no client until the engine starts it"
            )
        return self._client

    @property
    def cluster(self) -> Any:
        """The :class:`distributed.LocalCluster` the backend started, or None."""
        return self._cluster

    @property
    def dashboard_link(self) -> str | None:
        """The address of Dask's dashboard for the cluster, when it has one."""
        try:
            return cast(str, self.client.dashboard_link)
        except Exception:
            return None

    async def attach(self, reporter: TaskReporter) -> None:
        await super().attach(reporter)
        self._loop = loop = asyncio.get_running_loop()
        try:
            await self._connect()
            client = self._client
            self._client_loop = client.loop.asyncio_loop
            if self._client_loop is not loop and not self._client_loop.is_running():
                raise RuntimeError(
                    f"backend {self.name!r}: the Dask client's event loop is not "
                    "running; create an asynchronous Client inside the "
                    "asyncio.run that runs the engine, or pass a synchronous one"
                )
            self._prefix = f"{id(self):x}{time.time_ns() & 0xFFFFFFFF:x}"
            self._topic = f"asyncflow-started-{self._prefix}"
            client.subscribe_topic(self._topic, self._on_started)
            await self._refresh_workers()
        except BaseException:
            await self._close_own()
            raise
        log.info(
            "backend %r: Dask cluster at %s (dashboard: %s)",
            self.name,
            getattr(client.scheduler, "address", "?"),
            self.dashboard_link,
        )

    async def _connect(self) -> None:
        client = self._client
        if client is None:
            if self._address is not None:
                self._client = await asyncio.to_thread(
                    distributed.Client, self._address, set_as_default=False
                )
            else:
                # Dask binds the scheduler to 127.0.0.1 already; its HTTP
                # servers (dashboard, health) would listen everywhere.
                options = {
                    "dashboard_address": "127.0.0.1:0",
                    "worker_dashboard_address": "127.0.0.1:0",
                    **self._cluster_kwargs,
                }
                self._cluster = await asyncio.to_thread(
                    distributed.LocalCluster, **options
                )
                self._client = await asyncio.to_thread(
                    distributed.Client, self._cluster, set_as_default=False
                )
        elif client.status == "newly-created" and client.asynchronous:
            await client
        elif client.status not in ("running", "connecting"):
            raise RuntimeError(
                f"backend {self.name!r}: the Dask client is {client.status}; "
                "pass a running client"
            )

    async def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Await a client method on the client's event loop (its own thread,
        for a synchronous client)."""
        if self._client_loop is self._loop:
            return await method(*args, **kwargs)

        async def call() -> Any:
            return await method(*args, **kwargs)

        assert self._client_loop is not None
        return await asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(call(), self._client_loop)
        )

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        assert self._loop is not None
        job = self._loop.create_task(coroutine)
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)
        return job

    async def _refresh_workers(self) -> _Workers:
        identity = await self._call(self.client.scheduler.identity)
        self._workers = workers = _Workers(identity)
        return workers

    # -- submission ------------------------------------------------------------------

    def submit(self, tasks: Sequence[TaskFuture]) -> None:
        reporter = self.reporter
        for task in tasks:
            if task.state is not _RUNNING:  # settled meanwhile (upstream failed)
                continue
            try:
                if self._queue or not self._placeable(task):
                    self._queue.append(task)
                    if len(self._queue) == 1:
                        self._spawn(self._drain_queue())
                else:
                    self._send(task)
            except Exception as exc:
                reporter.failed(task, exc)

    def _placeable(self, task: TaskFuture) -> bool:
        """Whether the task's resources are known to fit a worker as last
        seen (a task that declares none always is)."""
        request = task.resources
        if request is None:
            return True
        workers = self._workers
        if workers is None or workers.count == 0:
            return False
        try:
            self._dask_resources(task, request, workers)
        except ResourceError:
            return False
        return True

    async def _drain_queue(self) -> None:
        """Submit queued tasks in order, after a fresh look at the workers."""
        reporter = self.reporter
        workers: _Workers | None
        try:
            workers = await self._refresh_workers()
        except Exception as exc:
            log.warning("backend %r: cannot see the Dask workers (%s)", self.name, exc)
            workers = self._workers
        while self._queue:
            task = self._queue.pop(0)
            if task.state is not _RUNNING or self._closed:
                continue
            try:
                self._send(task, workers)
            except Exception as exc:
                reporter.failed(task, exc)

    def _send(self, task: TaskFuture, workers: _Workers | None = None) -> None:
        client = self._client
        attempt = task.attempts
        definition = task._definition
        key = f"{task.name}-{self._prefix}-{task.uid.rpartition('.')[2]}-{attempt}"
        topic = None
        if (
            definition.reliability is not None
            or task._engine._scheduler.observers.active
        ):
            topic = self._topic
        options = self._placement(task, workers or self._workers)
        if definition.kind is _FUNCTION:
            if task._deps is not None:
                args, kwargs, frozen = _remote_args(task, client)
            else:
                args, kwargs, frozen = task.args, task.kwargs, ()
            future = client.submit(
                _run_function,
                definition.function,
                definition.is_async,
                topic,
                args,
                kwargs,
                frozen,
                key=key,
                pure=False,
                **options,
            )
        else:
            future = client.submit(
                _run_command,
                _CommandSpec(task),
                topic,
                key=key,
                pure=False,
                **options,
            )
        task._remote = future
        handle = None
        if definition.reliability is not None:
            # Done once this attempt has surely ended: a retry waits for it.
            assert self._loop is not None
            handle = task._handle = self._loop.create_future()
        self._inflight[key] = (task, attempt, handle)
        if task._callbacks:  # awaited already (later waiters come by fetch)
            self._waited.add(task)
        if not _watch(future, self._on_state):
            future.add_done_callback(self._on_future)

    def _placement(self, task: TaskFuture, workers: _Workers | None) -> dict[str, Any]:
        options: dict[str, Any] = {}
        priority = task.priority
        if priority:
            options["priority"] = priority
        description = task.task_description
        if "workers" in description:
            options["workers"] = description["workers"]
        if "allow_other_workers" in description:
            options["allow_other_workers"] = bool(description["allow_other_workers"])
        request = task.resources
        if request is not None:
            resources = self._dask_resources(task, request, workers)
            if resources:
                options["resources"] = resources
        return options

    def _dask_resources(
        self, task: TaskFuture, request: Any, workers: _Workers | None
    ) -> dict[str, float]:
        """Dask's ``resources=`` for a request; ResourceError when no worker
        could ever run it (when no worker is connected, nothing is judged)."""
        wanted: dict[str, float] = {}
        declared = workers.resources if workers is not None else {}
        judged = workers is not None and workers.count > 0

        def need(resource: str, dask_name: str, amount: int) -> None:
            have = declared.get(dask_name)
            if judged and (have is None or have < amount):
                where = _declared(dask_name, self.name)
                if have is not None:
                    where = f"each worker of Dask backend {self.name!r}"
                error = ResourceError(resource, amount, int(have or 0), where)
                error.args = (
                    f"task {task.name!r} ({task.uid}) asks for {amount} "
                    f"{resource} but no worker of Dask backend {self.name!r} "
                    f"declares that much {dask_name!r} (the most one declares: "
                    f"{have or 0}); start workers with --resources "
                    f"{dask_name}={amount}, or lower the request",
                )
                raise error
            wanted[dask_name] = amount

        cpus = int(request.cpus or 0)
        if "CPU" in declared:
            need("cpus", "CPU", cpus)
        elif cpus > 1:
            threads = workers.threads if workers is not None else 0
            if judged and cpus > threads:
                raise ResourceError(
                    "cpus", cpus, threads, f"each worker of Dask backend {self.name!r}"
                )
            self._warn_once(
                "cpus",
                "the Dask workers declare no 'CPU' resource: cpus=%d is not "
                "reserved, every task takes one worker thread (start workers "
                "with --resources CPU=N to have it honoured)",
                cpus,
            )
        gpus = int(request.gpus or 0)
        if gpus:
            need("gpus", "GPU", gpus)
        memory = int(request.memory or 0)
        if memory:
            if "MEMORY" in declared:
                need("memory", "MEMORY", memory)
            elif judged and workers is not None and 0 < workers.memory < memory:
                raise ResourceError(
                    "memory",
                    memory,
                    workers.memory,
                    f"the largest worker of Dask backend {self.name!r}",
                )
            else:
                self._warn_once(
                    "memory",
                    "the Dask workers declare no 'MEMORY' resource: memory "
                    "requests are checked against their memory limit but not "
                    "reserved (start workers with --resources MEMORY=bytes)",
                )
        for resource, amount in (request.custom or {}).items():
            if amount:
                need(resource, resource, amount)
        return wanted

    def _warn_once(self, topic: str, message: str, *args: Any) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            log.warning("backend %r: " + message, self.name, *args)

    # -- outcomes ----------------------------------------------------------------------

    def _on_future(self, future: Any) -> None:
        """A Dask future ended (Dask's callback thread): where the Dask
        version does not let :func:`_watch` tell us directly."""
        entry = self._inflight.get(future.key)
        if entry is not None:
            self._push((future.key, entry[0], future.status, _UNKNOWN, _UNKNOWN))

    def _on_state(self, key: Any, status: str, error: Any) -> None:
        """A Dask future ended (on the client's event loop). Kept short: with
        a local cluster, that loop also runs the scheduler. A value someone
        already waits for (or the checkpoint needs) is fetched at once, and
        comes with the news."""
        entry = self._inflight.get(key)
        if entry is None:
            return  # cancelled by us
        task = entry[0]
        if status == "finished" and (
            task in self._waited or task._key is not None or task._callbacks
        ):
            wanted = self._wanted
            wanted.append((key, task))
            loop = self._client_loop
            assert loop is not None
            if len(wanted) >= min(len(self._waited), _WANTED_BATCH):
                # No other awaited task is on its way (or enough are here):
                # fetch now.
                if self._wanted_timer is not None:
                    self._wanted_timer.cancel()
                    self._wanted_timer = None
                loop.call_soon(self._fetch_wanted)
            elif self._wanted_timer is None:
                # More awaited tasks run: fetch the values that come
                # meanwhile with this one, in one round trip.
                self._wanted_timer = loop.call_later(_WANTED_WINDOW, self._fetch_wanted)
            return
        self._push((key, task, status, error, _UNKNOWN))

    def _fetch_wanted(self) -> None:
        self._wanted_timer = None
        if not self._wanted:
            return
        wanted, self._wanted = self._wanted, []
        job = asyncio.ensure_future(self._gather_wanted(wanted))
        self._gathering.add(job)
        job.add_done_callback(self._gathering.discard)

    async def _gather_wanted(self, wanted: list[tuple[Any, TaskFuture]]) -> None:
        """On the client's loop: fetch values that are waited for, then
        report them finished with their values."""
        values: list[Any] | None
        try:
            values = await self._client.gather([task._remote for _, task in wanted])
        except Exception:  # each is fetched (and its error told) when awaited
            values = None
        for i, (key, task) in enumerate(wanted):
            value = _UNKNOWN if values is None else values[i]
            self._push((key, task, "finished", None, value))

    def _push(self, ended: tuple[Any, TaskFuture, str, Any, Any]) -> None:
        """Hand an ended attempt to the engine's loop (any thread)."""
        self._ended.append(ended)
        if not self._ended_scheduled:
            self._ended_scheduled = True
            self._threadsafe(self._take_ended)

    def _take_ended(self) -> None:
        """Report the attempts that ended (engine's loop, in batches)."""
        self._ended_scheduled = False
        report = self.reporter.report_threadsafe
        ended = self._ended
        while ended:
            key, task, status, error, value = ended.popleft()
            self._waited.discard(task)
            entry = self._inflight.pop(key, None)
            if entry is None:
                # Stopped by us, or reported already (ahead of a dependent):
                # a value that came is still delivered.
                if value is not _UNKNOWN and task.state is _DONE:
                    self.values_fetched += 1
                    self.reporter.fetched(task, True, value)
                continue
            _, attempt, handle = entry
            _settle_handle(handle)
            if status in ("finished", "lost"):  # a lost value is computed again
                self._ahead_of(task)
                if value is _UNKNOWN:
                    report(task, True, REMOTE, attempt)
                else:
                    self.values_fetched += 1
                    report(task, True, value, attempt)
            elif status == "error":
                if self._caused_upstream(task):
                    continue
                if error is _UNKNOWN:
                    self._spawn(self._report_error(task, attempt, task._remote))
                else:
                    report(task, False, self._error(task, error), attempt)
            else:
                report(
                    task,
                    False,
                    RuntimeError(
                        f"Dask cancelled task {task.name!r} ({task.uid}) on its "
                        "own (was the cluster restarted?)"
                    ),
                    attempt,
                )

    def _ahead_of(self, task: TaskFuture) -> None:
        """Report upstream tasks on this cluster that finished but whose own
        report is still to come, so that the engine sees dependencies end
        before their dependents (the callbacks may come in any order)."""
        report = self.reporter.report_threadsafe
        pending = [task]
        found: list[tuple[TaskFuture, int]] = []
        while pending:
            deps = pending.pop()._deps
            for dep in deps or ():
                remote = dep._remote
                if dep.state in _TERMINAL or remote is None:
                    continue
                if remote.status != "finished":
                    continue
                entry = self._inflight.pop(remote.key, None)
                if entry is not None:
                    found.append((dep, entry[1]))
                    pending.append(dep)
        for dep, attempt in reversed(found):
            report(dep, True, REMOTE, attempt)

    def _caused_upstream(self, task: TaskFuture) -> bool:
        """Whether the task erred only because a dependency on this cluster
        did: the engine settles it from that dependency's failure."""
        for dep in task._deps or ():
            remote = dep._remote
            if (
                dep.state is not _DONE
                and remote is not None
                and remote.status in ("error", "cancelled")
            ):
                return True
        return False

    def _threadsafe(self, callback: Callable[..., Any], *args: Any) -> None:
        loop = self._loop
        assert loop is not None
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is listening
            pass

    async def _report_error(self, task: TaskFuture, attempt: int, future: Any) -> None:
        try:
            error = await self._call(future.exception)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc
        self.reporter.report_threadsafe(task, False, self._error(task, error), attempt)

    @staticmethod
    def _error(task: TaskFuture, error: Any) -> BaseException:
        if isinstance(error, KilledWorker):
            return _worker_lost(task, error)
        if isinstance(error, _Stopped):
            return RuntimeError(f"task {task.name!r} ({task.uid}) was stopped")
        if not isinstance(error, BaseException):
            return RuntimeError(f"task {task.name!r} failed on Dask: {error!r}")
        return error

    def _on_started(self, event: Any) -> None:
        """A worker began an attempt (the event of ``_announce``)."""
        try:
            key, when = event[1]
        except (TypeError, ValueError):
            return
        entry = self._inflight.get(key)
        if entry is None:
            return
        task, attempt, _ = entry
        if task.attempts != attempt:
            return
        task.started_at = when
        if task._definition.reliability is not None:
            self.reporter.started_threadsafe(task, attempt)

    # -- values ------------------------------------------------------------------------

    def fetch(self, task: TaskFuture) -> None:
        if task.state is not _DONE:
            # Still running: its value comes with the news that it ended.
            if task.state is _RUNNING and not self._closed:
                self._waited.add(task)
            return
        if task in self._fetching or task in self._to_fetch:
            return
        if self._closed:
            self.reporter.fetched(
                task, False, _unfetchable(task, f"backend {self.name!r} has shut down")
            )
            return
        self._to_fetch[task] = None
        self._schedule_batch()

    async def _fetch(self, tasks: list[TaskFuture]) -> None:
        self._fetching.update(tasks)
        try:
            try:
                values = await self._call(
                    self._client.gather, [t._remote for t in tasks]
                )
                outcomes = [(True, v) for v in values]
            except asyncio.CancelledError:
                raise
            except Exception:
                # One value could not come: find out which, one by one.
                outcomes = []
                for task in tasks:
                    try:
                        outcomes.append(
                            (True, await self._call(self._client.gather, task._remote))
                        )
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        outcomes.append((False, _unfetchable(task, repr(exc))))
        except asyncio.CancelledError:
            for task in tasks:
                self.reporter.fetched(
                    task, False, _unfetchable(task, "the fetch was interrupted")
                )
            raise
        finally:
            self._fetching.difference_update(tasks)
            if self._to_fetch:  # asked for meanwhile: the next batch
                self._schedule_batch()
        for task, (ok, value) in zip(tasks, outcomes, strict=True):
            if ok:
                self.values_fetched += 1
            self.reporter.fetched(task, ok, value)

    # -- cancellation and shutdown -----------------------------------------------------

    def cancel(self, task: TaskFuture) -> None:
        self._waited.discard(task)
        future = task._remote
        if future is None or self._closed:
            return  # not handed to Dask yet (the queue skips it), or all stopped
        self._inflight.pop(future.key, None)
        self._to_cancel.append(future)
        # The workers stop the attempt and say whether it has ended. A plain
        # function in a thread cannot be interrupted: it is waited for only
        # when a retry must not overlap it.
        handle = task._handle
        if not isinstance(handle, asyncio.Future):
            handle = None
        definition = task._definition
        stoppable = definition.kind is not _FUNCTION or definition.is_async
        bound = STOP_BOUND if stoppable or handle is not None else 0.0
        self._to_stop[future.key] = (handle, bound)
        self._schedule_batch()

    def _schedule_batch(self) -> None:
        if not self._batch_scheduled:
            self._batch_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._run_batch)

    def _run_batch(self) -> None:
        self._batch_scheduled = False
        # One fetch at a time: what is asked for meanwhile goes in the next
        # one, so that many small values cost few round trips.
        if self._to_fetch and not self._fetching:
            tasks = list(self._to_fetch)
            self._to_fetch.clear()
            self._spawn(self._fetch(tasks))
        if self._to_cancel or self._to_stop:
            futures, self._to_cancel = self._to_cancel, []
            stops, self._to_stop = self._to_stop, {}
            self._spawn(self._stop(futures, stops))

    async def _stop(
        self,
        futures: list[Any],
        stops: dict[str, tuple[asyncio.Future[None] | None, float]],
        kill: bool = False,
    ) -> None:
        self._stopping.update(stops)
        try:
            if futures:
                await self._call(self._client.cancel, futures)
            if stops:
                bounds = {key: bound for key, (_, bound) in stops.items()}
                running = await self._call(
                    self._client.run, _stop_attempts, bounds, kill
                )
                still = set()
                for keys in (running or {}).values():
                    still.update(keys)
                for key, (handle, _) in stops.items():
                    if key not in still:
                        _settle_handle(handle)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not self._closed:
                log.warning(
                    "backend %r: stopping %d task(s) on Dask failed: %s",
                    self.name,
                    len(futures) or len(stops),
                    exc,
                )
        finally:
            if not kill:
                self._stopping.difference_update(stops)

    async def _wanted_fetched(self) -> None:
        """Wait for the values being fetched with their news, and report
        them (a checkpoint records them before it closes)."""

        async def fetched() -> None:
            while self._wanted or self._gathering:
                if self._gathering:
                    await asyncio.wait(list(self._gathering))
                else:
                    await asyncio.sleep(0)

        await self._call(fetched)
        self._take_ended()
        await asyncio.sleep(0)  # the engine takes the reports

    def kill(self) -> None:
        if self._client is None:
            return
        # Commands being stopped get SIGKILL now, not at the end of their grace.
        stopping: dict[str, tuple[asyncio.Future[None] | None, float]] = {
            key: (None, 0.0) for key in self._stopping
        }
        if stopping:
            self._spawn(self._stop([], stopping, kill=True))
        if self._inflight:
            self._spawn(self._stop_left(kill=True))

    def _stop_left(self, kill: bool = False) -> Coroutine[Any, Any, None]:
        """Stop every attempt still handed to Dask."""
        left = [(key, task) for key, (task, _, _) in self._inflight.items()]
        self._inflight.clear()
        futures = [t._remote for _, t in left if t._remote is not None]
        return self._stop(futures, {key: (None, STOP_BOUND) for key, _ in left}, kill)

    async def shutdown(self) -> None:
        self._closed = True
        self._queue.clear()
        self._waited.clear()
        for task in list(self._to_fetch):
            self.reporter.fetched(
                task, False, _unfetchable(task, f"backend {self.name!r} has shut down")
            )
        self._to_fetch.clear()
        if self._client is not None:
            # Whatever is still handed to Dask is stopped (the engine asked
            # for the running tasks already; this catches the rest).
            if self._inflight:
                self._spawn(self._stop_left())
            self._run_batch()
            self._spawn(self._wanted_fetched())
            jobs = list(self._jobs)
            if jobs:
                _, pending = await asyncio.wait(jobs, timeout=self.shutdown_timeout)
                for job in pending:
                    job.cancel()
                if pending:
                    log.warning(
                        "backend %r: %d Dask call(s) still unanswered after "
                        "%.1fs; abandoned",
                        self.name,
                        len(pending),
                        self.shutdown_timeout,
                    )
            try:
                self._client.unsubscribe_topic(self._topic)
            except Exception:
                pass
            for key, callback in list(_watching.items()):
                if callback == self._on_state:
                    _watching.pop(key, None)
        await self._close_own()
        log.info("backend %r shut down", self.name)

    async def _close_own(self) -> None:
        client, cluster = self._client, self._cluster
        if self._owns_client and client is not None:
            try:
                await asyncio.wait_for(
                    asyncio.to_thread(client.close), self.shutdown_timeout
                )
            except Exception as exc:
                log.warning("backend %r: closing the Dask client: %s", self.name, exc)
        if cluster is not None:
            self._cluster = None
            try:
                await asyncio.wait_for(
                    asyncio.to_thread(cluster.close), self.shutdown_timeout
                )
            except Exception as exc:
                log.warning("backend %r: closing the Dask cluster: %s", self.name, exc)


#: An error still to be asked of Dask (see DaskExecutionBackend._on_future).
_UNKNOWN: Any = object()

# Dask tells a future's outcome to its FutureState, shared by the futures of
# one key; a public done-callback costs a coroutine and a thread hop per
# future, which shows in throughput. A FutureState of this subclass also
# tells the backend, from the client's event loop. Where the Dask version
# differs, the backends use done-callbacks instead.
_watching: dict[Any, Callable[[Any, str, Any], None]] = {}
_FutureState: Any = getattr(distributed.client, "FutureState", None)


def _watched_class() -> Any:
    if _FutureState is None or not all(
        callable(getattr(_FutureState, name, None))
        for name in ("finish", "set_error", "cancel")
    ):
        return None  # pragma: no cover - another Dask version

    class Watched(_FutureState):  # type: ignore[misc]
        __slots__ = ()

        def finish(self, *args: Any, **kwargs: Any) -> None:
            super().finish(*args, **kwargs)
            _notify(self)

        def set_error(self, *args: Any, **kwargs: Any) -> None:
            super().set_error(*args, **kwargs)
            _notify(self)

        def cancel(self, *args: Any, **kwargs: Any) -> None:
            super().cancel(*args, **kwargs)
            _notify(self)

    return Watched


_Watched: Any = _watched_class()


def _notify(state: Any) -> None:
    callback = _watching.pop(state.key, None)
    if callback is not None:
        callback(state.key, state.status, state.exception)


def _watch(future: Any, callback: Callable[[Any, str, Any], None]) -> bool:
    """Have ``callback(key, status, exception)`` called once the Dask
    future ends; False where this Dask version does not allow it."""
    state: Any = getattr(future, "_state", None)
    if _Watched is None or type(state) is not _FutureState:
        return False
    _watching[future.key] = callback
    state.__class__ = _Watched
    if state.status != "pending":  # it ended before it was watched
        _notify(state)
    return True


def _settle_handle(handle: Any) -> None:
    if isinstance(handle, asyncio.Future) and not handle.done():
        handle.set_result(None)
