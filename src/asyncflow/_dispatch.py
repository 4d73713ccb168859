"""Dispatch: the ready queue, command bodies, blocks, and backend reports.

One loop callback per iteration hands the ready tasks to their backends in
batches; worker threads report through an inbox drained by one
``call_soon_threadsafe``. Nothing polls. :class:`Scheduler` is also the
backends' :class:`~asyncflow.backends.base.TaskReporter`.
"""

from __future__ import annotations

import asyncio
import weakref
from time import time as _time
from typing import TYPE_CHECKING, Any

from ._attempts import Attempts
from ._graph import (
    _PREPARING,
    BLOCK,
    CANCELLED,
    DONE,
    EXECUTABLE,
    FAILED,
    FUNCTION,
    PENDING,
    RUNNING,
    _future_done,
    _resolve,
    log,
)
from .backends.base import cancelled_itself
from .tasks import TaskFuture

if TYPE_CHECKING:
    from .backends.base import ExecutionBackend

#: The ``ok`` of a thread-safe report that an attempt has started.
_STARTED: Any = object()


class Scheduler(Attempts):
    """The engine's scheduler: graph, attempts and dispatch in one object."""

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
        for task in batch:
            if task.state is not PENDING:  # cancelled while queued
                continue
            if self._hold_after is not None and task._seq > self._hold_after:
                # Called after a command body that is still being evaluated:
                # it starts only once that body is done (call order).
                self._held.append(task)
                continue
            definition = task._definition
            kind = definition.kind
            backend = definition.backend or default
            if task._deps is not None:
                if backend.passes_futures and kind is FUNCTION:
                    if not self._passable(task, backend):
                        continue
                else:
                    try:
                        args = tuple([_resolve(a) for a in task.args])
                        kwargs = task.kwargs
                        if kwargs:
                            kwargs = {k: _resolve(v) for k, v in kwargs.items()}
                    except asyncio.InvalidStateError:
                        # A dependency's value is still on the cluster that
                        # computed it: fetch it first.
                        self._fetch_first(task)
                        continue
                    except Exception as exc:  # that value could not be fetched
                        self._finish(task, FAILED, exc)
                        continue
                    task.args = args
                    task.kwargs = kwargs
            task.state = RUNNING
            task.attempts = 1
            if kind is BLOCK:
                self._start_block(task)
                continue
            if kind not in backend.kinds:
                self._finish(task, FAILED, self._unsupported(task, backend))
                continue
            if definition.resources is not None and not backend.honours_resources:
                _warn_unhonoured(backend, task)
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
            self._submit(backend, tasks)

    def _passable(self, task: TaskFuture, backend: ExecutionBackend) -> bool:
        """Whether a function task can go now to a backend that takes its
        dependencies as futures; if not, it comes back when it can."""
        deps = task._deps
        assert deps is not None
        default = self.default_backend
        if task._waiting:
            # Handed over ahead of its dependencies (_chainable): only once
            # each unfinished one is with that backend too.
            for dep in deps:
                state = dep.state
                if state is RUNNING:
                    continue
                if state is not DONE or (
                    dep._remote is not None
                    and not _future_done(dep)
                    and (dep._definition.backend or default) is not backend
                ):
                    return False  # it is released as usual when they end
            if self.observers.active:
                self._event("ready", task)
            return True
        # Values kept by another backend come here first; with a checkpoint,
        # every value does (the task's key is made of them).
        keyed = self.store is not None
        missing = [
            dep
            for dep in deps
            if dep._remote is not None
            and not _future_done(dep)
            and (keyed or (dep._definition.backend or default) is not backend)
        ]
        if missing:
            self._fetch_first(task, missing)
            return False
        return True

    def _fetch_first(
        self, task: TaskFuture, missing: list[TaskFuture] | None = None
    ) -> None:
        """Dispatch ``task`` again once the dependency values it needs,
        still on the cluster that computed them, have been fetched."""
        if missing is None:
            missing = [d for d in task._deps or () if not _future_done(d)]
        left = len(missing)

        def arrived(_: object) -> None:
            nonlocal left
            left -= 1
            if left == 0 and task.state is PENDING:
                self._enqueue(task)

        for dep in missing:
            dep.add_done_callback(arrived)  # which fetches the value

    def _submit(self, backend: ExecutionBackend, tasks: list[TaskFuture]) -> None:
        now = _time()
        observers = self.observers
        if observers.active:
            pending = observers.pending
            for task in tasks:
                task.submitted_at = now
                pending += ("submitted", now, task, task.attempts, None, None, None)
            if not observers._scheduled:
                observers.schedule()
        else:
            for task in tasks:
                task.submitted_at = now
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
        if definition.reliability is not None:
            self._arm_timeout(task)  # a body that never returns times out too
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
        # Tasks the body calls (and awaits) take its place in call order, so
        # they are not held back behind it.
        self.preparing_var.set(task)
        attempt = task.attempts
        try:
            command = await body
        except asyncio.CancelledError:
            if task.state is RUNNING and task.attempts == attempt and not self.closing:
                # Not our cancel (that settles the task or moves the attempt
                # on first): the body raised it itself.
                self._attempt_failed(task, cancelled_itself(task))
                self._flush_if_ready()
            return
        except BaseException as exc:  # SystemExit & co. fail only this task
            self._finish(task, FAILED, exc)
            return
        if task.state is not RUNNING or self.closing:
            return
        task._handle = None
        if task._timer is not None:
            # The body's own time is up: the command's starts when it does.
            task._timer.cancel()
            task._timer = None
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
        block.submitted_at = block.started_at = now = _time()
        if self.observers.active:
            self._event("started", block, now)
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

    # -- TaskReporter ---------------------------------------------------------

    def started(self, task: TaskFuture, attempt: int) -> None:
        if task.state is not RUNNING or task.attempts != attempt:
            return
        started = _start_time(task)
        if self.observers.active:
            self._event("started", task, started)
        if task._definition.reliability is not None:
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

    def report_threadsafe(
        self, task: TaskFuture, ok: bool, value: object, attempt: int | None = None
    ) -> None:
        self._inbox.append((task, ok, value, attempt))
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
        try:
            while inbox:
                report = inbox.popleft()
                try:
                    self._take(*report)
                except Exception as exc:  # one bad report must not strand the rest
                    log.error("report on %s could not be taken", report[0].uid)
                    self._finish(report[0], FAILED, exc)
        finally:
            if inbox and not self._drain_scheduled:
                self._drain_scheduled = True
                self._loop.call_soon(self._drain)
        self._flush_if_ready()

    def _take(self, task: TaskFuture, ok: Any, value: Any, attempt: int | None) -> None:
        if ok is _STARTED:
            self.started(task, value)
            return
        if attempt is not None and attempt != task.attempts:
            return  # the engine moved past that attempt (it timed out)
        observers = self.observers
        if (
            observers.active
            and task.state is RUNNING
            and task._definition.reliability is None
        ):
            # The worker noted the start time without a report of its own:
            # the started event goes out now, with that time (as started()
            # records it, inlined: once per task).
            observers.pending += (
                "started",
                _start_time(task),
                task,
                task.attempts,
                None,
                None,
                None,
            )
            if not observers._scheduled:
                observers.schedule()
        if ok is True:
            self._finish(task, DONE, value)
        elif not self.closing:  # else: work stopped by the shutdown (CANCELLED)
            if isinstance(value, asyncio.CancelledError):
                value = RuntimeError(f"task {task.name!r} was cancelled in its worker")
            self._attempt_failed(task, value)

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


def _start_time(task: TaskFuture) -> float:
    """When the current attempt started: the time its worker noted, else
    now (noted on the task)."""
    started = task.started_at
    submitted = task.submitted_at
    if started is None or (submitted is not None and started < submitted):
        # Not yet noted by the worker for this attempt.
        task.started_at = started = _time()
    return started


def _warn_unhonoured(backend: ExecutionBackend, task: TaskFuture) -> None:
    """Say once per backend that it runs tasks without their resources."""
    if backend in _WARNED:
        return
    _WARNED.add(backend)
    log.warning(
        "backend %r does not admit tasks by resources: %r (%s) and later tasks "
        "that declare resources= run there without them being reserved",
        backend.name,
        task.name,
        task.uid,
    )


_WARNED: weakref.WeakSet[ExecutionBackend] = weakref.WeakSet()
