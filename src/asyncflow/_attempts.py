"""Attempts: checkpoint restore, timeouts and retries, one attempt at a time.

A task's timeout starts when its attempt starts running (the backend says
so, or it is submitted to a backend that cannot tell). A failed attempt is
retried if its options allow; after a timeout, the retry waits until the
timed-out attempt has really stopped, so two attempts of one call never run
at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
from typing import Any

from ._graph import (
    _PREPARING,
    BLOCK,
    DONE,
    FAILED,
    FUNCTION,
    RUNNING,
    Graph,
    _resolve,
    log,
)
from .errors import ResourceError, TaskTimeoutError
from .tasks import TaskFuture

#: Seconds (at least) a retry waits for a timed-out attempt to stop.
STOP_WAIT = 5.0


def _running(handle: Any) -> bool:
    """Whether an attempt's handle (asyncio or concurrent future) is unfinished."""
    return (
        isinstance(handle, (asyncio.Future, concurrent.futures.Future))
        and not handle.done()
    )


class Attempts(Graph):
    """Restore, timeouts and retries on top of the graph."""

    def _restore(self, task: TaskFuture) -> bool:
        """Settle the task from the checkpoint if it ran before; else note its key."""
        store = self.store
        assert store is not None
        definition = task._definition
        if not definition.options.cache or self._engine.dry_run:
            return False
        given = None
        if (
            task._deps is not None
            and definition.kind is FUNCTION
            and (definition.backend or self.default_backend).passes_futures
        ):
            # Its arguments still hold its dependencies' futures (their values
            # are here by now): the key is made of the values.
            given = task.args, task.kwargs
            try:
                task.args = tuple([_resolve(a) for a in given[0]])
                task.kwargs = {k: _resolve(v) for k, v in given[1].items()}
            except Exception:  # a value that could not be fetched: its backend says so
                task.args, task.kwargs = given
                return False
        try:
            try:
                key = store.key_for(task)
            finally:
                if given is not None:
                    task.args, task.kwargs = given
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
            if task._timer is not None:
                task._timer.cancel()
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
            or isinstance(error, ResourceError)  # it could never start
            or self.closing
        ):
            self._finish(task, FAILED, error)
            return
        if task._timer is not None:
            task._timer.cancel()
            task._timer = None
        if self.observers.active:
            started = task.started_at
            ended = task.finished_at  # noted by a worker thread, if any
            if ended is None or started is None or ended < started:
                ended = time.time()
            self._event(
                "retried",
                task,
                ended,
                error=error,
                duration=ended - started if started is not None else None,
            )
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
            self._retry_when_stopped(task, stopping, delay)
        elif delay > 0:
            task._timer = self._loop.call_later(delay, self._retry, task)
        else:
            self._retry(task)

    def _retry_when_stopped(self, task: TaskFuture, handle: Any, delay: float) -> None:
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
        if task._command is _PREPARING and (  # timed out in its body: again
            not self._prepare(task) or (self.store is not None and self._restore(task))
        ):
            return
        backend = task._definition.backend or self.default_backend
        if task._definition.reliability is not None and not backend.reports_start:
            self._arm_timeout(task)
        self._submit(backend, [task])

    # -- provided by _dispatch ---------------------------------------------------

    def _submit(self, backend: Any, tasks: list[TaskFuture]) -> None:
        """Hand a batch of tasks to one backend."""
        raise NotImplementedError

    def _start_block(self, block: TaskFuture) -> None:
        """Run a block's body on the loop."""
        raise NotImplementedError

    def _prepare(self, task: TaskFuture) -> bool:
        """Evaluate a command body; True once the command is ready."""
        raise NotImplementedError

    def _flush_if_ready(self) -> None:
        """Flush the ready tasks unless a flush is under way."""
        raise NotImplementedError
