"""Task lifecycle events: what the engine tells observers.

The scheduler records a :class:`TaskEvent` at every step of a task's life and
hands them, in batches once per loop iteration, to the engine's observers:
the trace file, the progress display, telemetry and the callables given to
:meth:`WorkflowEngine.subscribe <asyncflow.WorkflowEngine.subscribe>`. With
no observer, nothing is recorded.

An observer that raises is detached and reported once; it never affects the
run. A synchronous observer runs on the engine's loop and must be quick; an
``async def`` observer runs in a task of its own, fed through a bounded
queue, so a slow one only falls behind (and is detached, with a warning, if
it falls more than :data:`ASYNC_BACKLOG` events behind).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

__all__ = ["ASYNC_BACKLOG", "EVENT_KINDS", "RECORD_SIZE", "TaskEvent"]

log = logging.getLogger("asyncflow.events")

#: Every ``TaskEvent.kind``, in the order a task can go through them.
EVENT_KINDS = (
    "created",
    "ready",
    "submitted",
    "started",
    "retried",
    "done",
    "failed",
    "cancelled",
    "restored",
)
#: The kinds that end a task: exactly one of them per task.
FINAL_KINDS = frozenset({"done", "failed", "cancelled", "restored"})

#: What an observer may raise and be detached for: anything but the signals
#: that end the program (CancelledError included: it is not ours).
_OBSERVER_FAULTS = (Exception, asyncio.CancelledError)

#: Events an ``async def`` observer may fall behind before it is detached.
ASYNC_BACKLOG = 100_000


class TaskEvent(NamedTuple):
    """One step in a task's life.

    ``kind`` is one of :data:`EVENT_KINDS`. ``time`` is the epoch second it
    happened. ``attempt`` is the attempt the event belongs to (0 before the
    first). ``duration`` is the running time of the attempt that ended the
    task (``done``, ``failed``; ``cancelled`` when it had started), and for
    ``retried`` that of the failed attempt. ``error`` is the exception
    (``failed``, ``retried``; the message for ``cancelled``). ``created``
    carries ``dependencies`` (uids) and ``parent`` (the uid of the block the
    task was called in); ``kind_of_task`` is ``function``, ``executable``,
    ``prompt`` or ``block``.
    """

    kind: str
    time: float
    uid: str
    name: str
    backend: str | None = None
    workflow_id: str | None = None
    attempt: int = 0
    duration: float | None = None
    error: BaseException | str | None = None
    parent: str | None = None
    dependencies: tuple[str, ...] = ()
    kind_of_task: str | None = None


Observer = Callable[[TaskEvent], Any]

#: What the scheduler records on its hot path, cheaper to make than a
#: TaskEvent: (kind, time, task, attempt, duration, error, extra), where
#: ``extra`` is (parent uid, dependency uids, kind of task, dependency
#: futures) on ``created``, else None.
Record = tuple[str, float, Any, int, "float | None", Any, Any]

#: The scheduler appends the fields of each :data:`Record` to one flat list
#: (:attr:`Observers.pending`), event after event, rather than a tuple per
#: event: recording then leaves no object for the garbage collector to
#: track. ``RECORD_SIZE`` items make one event.
RECORD_SIZE = 7


def backend_name(task: Any) -> str | None:
    """The name of the backend a task runs on (None for a block)."""
    definition = task._definition
    if definition.kind.value == "block":
        return None
    backend = definition.backend or task._engine._scheduler.default_backend
    return str(backend.name)


def to_event(record: Record) -> TaskEvent:
    """The :class:`TaskEvent` of a hot-path record."""
    kind, when, task, attempt, duration, error, extra = record
    parent, dependencies, kind_of_task = extra[:3] if extra else (None, (), None)
    return TaskEvent(
        kind,
        when,
        task.uid,
        task.name,
        backend_name(task),
        task.workflow_id,
        attempt,
        duration,
        error,
        parent,
        dependencies,
        kind_of_task,
    )


class Observers:
    """The engine's observers and the delivery of event batches to them.

    Built-in observers with a ``records(batch)`` method take the scheduler's
    records as they are: a list of :data:`Record` tuples, or, for those
    whose ``flat`` attribute is true, the flat list itself (see
    :data:`RECORD_SIZE`; it must not be changed, other observers read it
    too). User subscribers get :class:`TaskEvent` objects, made once per
    batch for all of them.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._flat: list[Any] = []
        self._raw: list[Any] = []
        self._sync: list[Observer] = []
        self._async: list[_AsyncObserver] = []
        #: The fields of the events recorded since the last delivery, flat.
        self.pending: list[Any] = []
        self._scheduled = False
        #: Whether anyone listens: the scheduler records events only then.
        self.active = False

    def _changed(self) -> None:
        self.active = bool(self._flat or self._raw or self._sync or self._async)

    def add(self, observer: Any) -> Callable[[], None]:
        if callable(getattr(observer, "records", None)):
            raw = self._flat if getattr(observer, "flat", False) else self._raw
            raw.append(observer)
            self._changed()

            def remove_raw() -> None:
                if observer in raw:
                    raw.remove(observer)
                    self._changed()

            return remove_raw
        if not callable(observer):
            raise TypeError(
                f"subscribe() takes a callable receiving TaskEvent records, got "
                f"{type(observer).__name__}"
            )
        if inspect.iscoroutinefunction(observer) or inspect.iscoroutinefunction(
            getattr(observer, "__call__", None)  # noqa: B004 - async __call__
        ):
            wrapped = _AsyncObserver(self, observer)
            self._async.append(wrapped)
            self._changed()

            def remove_async() -> None:
                self._detach(wrapped)

            return remove_async
        self._sync.append(observer)
        self._changed()

        def remove() -> None:
            if observer in self._sync:
                self._sync.remove(observer)
                self._changed()

        return remove

    def schedule(self) -> None:
        """Deliver the pending records at the next turn of the loop."""
        self._scheduled = True
        try:
            self._loop.call_soon(self.deliver)
        except RuntimeError:  # the loop is closed: deliver now
            self.deliver()

    def deliver(self) -> None:
        self._scheduled = False
        flat, self.pending = self.pending, []
        if not flat:
            return
        self._feed(self._flat, flat)
        if not (self._raw or self._sync or self._async):
            return
        batch: list[Record] = list(zip(*[iter(flat)] * RECORD_SIZE, strict=True))
        self._feed(self._raw, batch)
        if not (self._sync or self._async):
            return
        events = [to_event(record) for record in batch]
        for subscriber in list(self._sync):
            try:
                for event in events:
                    subscriber(event)
            except _OBSERVER_FAULTS:
                self._sync.remove(subscriber)
                self._changed()
                log.warning(
                    "event subscriber %r raised and was detached; the run goes on",
                    subscriber,
                    exc_info=True,
                )
        for wrapped in list(self._async):
            wrapped.feed(events)

    def _feed(self, observers: list[Any], batch: list[Any]) -> None:
        """Hand ``batch`` to each built-in observer of ``observers``."""
        for observer in list(observers):
            try:
                observer.records(batch)
            except _OBSERVER_FAULTS:
                observers.remove(observer)
                self._changed()
                log.warning(
                    "%r raised and was detached; the run goes on",
                    observer,
                    exc_info=True,
                )

    def _detach(self, wrapped: _AsyncObserver) -> None:
        if wrapped in self._async:
            self._async.remove(wrapped)
            self._changed()
        wrapped.stop()

    async def drain(self, timeout: float) -> None:
        """Deliver what is pending, let async observers catch up (bounded),
        then stop them: the engine has shut down."""
        self.deliver()
        waits = [self._loop.create_task(w.idle()) for w in self._async]
        if waits:
            _, late = await asyncio.wait(waits, timeout=timeout)
            for wait in late:
                wait.cancel()
        for wrapped in list(self._async):
            self._detach(wrapped)


class _AsyncObserver:
    def __init__(
        self,
        owner: Observers,
        callback: Callable[[TaskEvent], Awaitable[Any]],
    ) -> None:
        self._owner = owner
        self._callback = callback
        self._name = repr(callback)
        self._queue: deque[TaskEvent] = deque()
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._stopped = False
        self._task = owner._loop.create_task(self._run())

    def feed(self, batch: list[TaskEvent]) -> None:
        if len(self._queue) + len(batch) > ASYNC_BACKLOG:
            log.warning(
                "event subscriber %s fell %d events behind and was detached; the "
                "run goes on",
                self._name,
                ASYNC_BACKLOG,
            )
            self._owner._detach(self)
            return
        self._queue.extend(batch)
        self._drained.clear()
        self._wake.set()

    async def _run(self) -> None:
        queue = self._queue
        while True:
            await self._wake.wait()
            self._wake.clear()
            while queue:
                event = queue.popleft()
                try:
                    await self._callback(event)
                except _OBSERVER_FAULTS:
                    if self._stopped:
                        return  # our own stop() cancelled it
                    log.warning(
                        "event subscriber %s raised and was detached; the run goes on",
                        self._name,
                        exc_info=True,
                    )
                    self._owner._detach(self)
                    return
            self._drained.set()

    async def idle(self) -> None:
        await self._drained.wait()

    def stop(self) -> None:
        self._stopped = True
        self._queue.clear()
        self._drained.set()
        self._task.cancel()
