"""SIGINT/SIGTERM: shut every engine on the loop down, then exit as asked.

One hub per event loop, shared by all engines on it, so several engines never
overwrite each other's handlers. The first signal starts a graceful shutdown
of every engine; a second one while it is under way kills their running work
and lets the exit proceed at once. Then the signal has its usual effect: the
handler the program had before (installed with ``signal.signal`` or
``loop.add_signal_handler``), otherwise ``KeyboardInterrupt`` (SIGINT) or
``SystemExit(128 + signum)``.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures.thread
import contextlib
import logging
import os
import signal
import sys
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from .engine import WorkflowEngine

log = logging.getLogger("asyncflow.signals")

SIGNALS = (signal.SIGINT, signal.SIGTERM)

# Keyed by id(loop) and holding hubs weakly: the loop owns its hub (through
# the signal handlers it keeps, and the shutdown task a signal starts), so
# nothing global keeps a finished run's loop alive. A live hub references
# its loop, so the id cannot be reused while the entry exists.
_hubs: weakref.WeakValueDictionary[int, _SignalHub] = weakref.WeakValueDictionary()


class _LoopHandler(NamedTuple):
    """A handler the program added with ``loop.add_signal_handler``."""

    callback: Callable[..., object]
    args: tuple[Any, ...]


def _loop_handler(loop: asyncio.AbstractEventLoop, sig: int) -> _LoopHandler | None:
    # asyncio keeps these in a private dict (unix_events). Another loop
    # implementation may not have it: the program's handler is then lost to
    # us, and the signal falls back to its default once the engines stop.
    handlers = getattr(loop, "_signal_handlers", None)
    handle = handlers.get(sig) if isinstance(handlers, dict) else None
    callback = getattr(handle, "_callback", None)
    if not callable(callback) or getattr(handle, "_cancelled", False):
        return None
    return _LoopHandler(callback, tuple(getattr(handle, "_args", None) or ()))


def _of_a_finished_run(handler: Any) -> bool:
    """Whether ``handler`` is the SIGINT handler of an ``asyncio.Runner.run``
    call that has returned (the engine was shut down in a later ``run`` of
    the same runner, as pytest-asyncio does): restoring it would leave a
    handler that keeps that runner and its loop alive. ``remove_signal_handler``
    has put the default back already."""
    runner = getattr(asyncio, "Runner", None)  # Python 3.11+
    owner = getattr(getattr(handler, "func", None), "__self__", None)
    if runner is None or not isinstance(owner, runner):
        return False
    main_task = getattr(handler, "keywords", {}).get("main_task")
    return main_task is None or bool(main_task.done())


def _dispatched_by_a_loop(handler: Any) -> bool:
    # With a loop handler in place, the signal module holds only asyncio's
    # no-op function; the real handler lives in the loop.
    return getattr(handler, "__module__", None) == "asyncio.unix_events"


class _SignalHub:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.engines: set[WorkflowEngine] = set()
        #: What each signal we took over did before (None: its default).
        self.previous: dict[int, Any] = {}
        #: The engines a signal is shutting down, once one arrived.
        self.stopping: list[WorkflowEngine] | None = None
        #: Set by a second signal: stop waiting for the graceful shutdown.
        self._hurry: asyncio.Future[None] = loop.create_future()
        # asyncio keeps only weak references to tasks.
        self._shutting_down: asyncio.Task[None] | None = None
        #: The signal shutting the engines down, and what it did before.
        self._signal: int | None = None
        self._signal_previous: Any = None

    def add(self, engine: WorkflowEngine) -> None:
        if self.stopping is not None:
            # The program is going down on a signal: so does this engine.
            engine._on_call_after_signal = self._exit_now
            engine._begin_shutdown(settle=False)
            self.stopping.append(engine)
            return
        if not self.engines:
            self.install()
        self.engines.add(engine)

    def discard(self, engine: WorkflowEngine) -> None:
        if engine in self.engines:
            self.engines.discard(engine)
            if not self.engines:
                self.uninstall()

    def install(self) -> None:
        for sig in SIGNALS:
            previous: Any = signal.getsignal(sig)
            if previous is signal.SIG_IGN:  # e.g. a background job: respect it
                continue
            if _dispatched_by_a_loop(previous):
                previous = _loop_handler(self.loop, sig)
            try:
                self.loop.add_signal_handler(sig, self._on_signal, sig)
            except (NotImplementedError, RuntimeError, ValueError):
                continue
            self.previous[sig] = previous

    def uninstall(self) -> dict[int, Any]:
        previous, self.previous = self.previous, {}
        for sig, handler in previous.items():
            current = _loop_handler(self.loop, sig)
            if current is not None and current.callback != self._on_signal:
                continue  # the program put its own handler in since: keep it
            try:
                if isinstance(handler, _LoopHandler):
                    self.loop.add_signal_handler(sig, handler.callback, *handler.args)
                else:
                    self.loop.remove_signal_handler(sig)
                    if handler is not None and not _of_a_finished_run(handler):
                        signal.signal(sig, handler)
            except (RuntimeError, ValueError):  # loop closed or not main thread
                pass
        return previous

    def _on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if self.stopping is not None:
            log.warning(
                "received %s during the shutdown: killing the running work of "
                "%d workflow engine(s) and exiting now",
                name,
                len(self.stopping),
            )
            for engine in self.stopping:
                engine._kill_running()
            if not self._hurry.done():
                self._hurry.set_result(None)
            return
        self.stopping = list(self.engines)
        self.engines.clear()
        self._signal = sig
        self._signal_previous = self.previous.get(sig)
        for engine in self.stopping:
            engine._on_call_after_signal = self._exit_now
        log.warning(
            "received %s: shutting down %d workflow engine(s) (a second Ctrl-C "
            "or SIGTERM kills their running work and exits at once)",
            name,
            len(self.stopping),
        )
        self._shutting_down = self.loop.create_task(self._shut_down(sig, self.stopping))

    def _exit_now(self) -> None:
        """The program called a task while a signal shuts its engines down
        (its coroutine runs on between loop turns): end it here as the
        signal would, when the program has no handler of its own for it
        (that one is called once the shutdown is done)."""
        sig = self._signal
        if sig is not None and not _is_own_handler(self._signal_previous):
            _exit_as_signalled(sig, None)

    async def _shut_down(self, sig: int, engines: list[WorkflowEngine]) -> None:
        hurry = self._hurry
        try:
            # The list grows if an engine is created meanwhile (see add()).
            while not hurry.done():
                pending = [
                    task
                    for task in (
                        engine._begin_shutdown(settle=False) for engine in engines
                    )
                    if not task.done()
                ]
                if not pending:
                    break
                await asyncio.wait(
                    [*pending, hurry], return_when=asyncio.FIRST_COMPLETED
                )
        except asyncio.CancelledError:
            # asyncio.run cancels this when the program's main ended first
            # (it raised, or returned): every future still ends.
            for engine in engines:
                engine._settle_all()
            raise
        finally:
            # Also when asyncio.run cancels this (the program's main returned
            # meanwhile). From here on an engine created by the program's
            # clean-up gets a hub of its own, and signals reach the program's
            # own handlers again.
            if _hubs.get(id(self.loop)) is self:
                del _hubs[id(self.loop)]
            previous = self.uninstall().get(sig)
        # After a second signal, what is still shutting down is left to the
        # program's exit (asyncio.run cancels every task left), except
        # threads: a thread in a blocking call would hold the exit up.
        cut_short = any(
            not engine._begin_shutdown(settle=False).done() for engine in engines
        )
        if not _is_own_handler(previous) and (
            cut_short or any(engine._abandoned_threads for engine in engines)
        ):
            _exit_without_joining(128 + sig)
        # Queue the exit first, then settle every future in this same step:
        # the program's own tasks resume only after the exit is on its way.
        self.loop.call_soon(_exit_as_signalled, sig, previous)
        for engine in engines:
            engine._settle_all()


def _exit_without_joining(code: int) -> None:
    """Make interpreter exit skip joining threads still running work.

    A ``ThreadPoolExecutor`` thread is joined at exit, so a call that never
    returns would keep a signalled program alive for good. The hook runs when
    the interpreter starts waiting for threads, after the program's own
    clean-up, and ends the process with the signal's exit status.
    """
    _at_thread_exit(lambda: _leave_now(code))


def exit_past_stuck_threads(threads: list[threading.Thread]) -> None:
    """Let a normally ending program exit although ``threads`` (abandoned by a
    shutdown, stuck in blocking calls) still run.

    Past the shutdown bound nothing will stop them, and the interpreter would
    wait for them for good. The hook runs when the interpreter starts waiting
    for threads: it takes the stuck ones off the lists it waits on, so the
    program exits with its own status. Where that is not possible (Python
    3.13+ tracks threads in C), the process ends there with status 1 after an
    uncaught exception, else 0.
    """

    def leave() -> None:
        stuck = [thread for thread in threads if thread.is_alive()]
        if stuck and not _stop_waiting_for(stuck):
            failed = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
            _leave_now(1 if failed is not None else 0)

    _at_thread_exit(leave)


def _stop_waiting_for(stuck: list[threading.Thread]) -> bool:
    """Take ``stuck`` off what interpreter exit joins (Python <= 3.12)."""
    locks = getattr(threading, "_shutdown_locks", None)
    guard = getattr(threading, "_shutdown_locks_lock", None)
    if locks is None or guard is None:
        return False
    with guard:
        for thread in stuck:
            locks.discard(getattr(thread, "_tstate_lock", None))
    # concurrent.futures joins its workers in an exit hook of its own, which
    # runs after this one.
    queues = getattr(concurrent.futures.thread, "_threads_queues", None)
    if queues is not None:
        for thread in stuck:
            queues.pop(thread, None)
    log.warning(
        "%d thread(s) stuck in blocking calls were abandoned; exiting without them",
        len(stuck),
    )
    return True


def _at_thread_exit(hook: Any) -> None:
    register = getattr(threading, "_register_atexit", None)
    if register is None:  # pragma: no cover - all supported Pythons have it
        return
    with contextlib.suppress(RuntimeError):
        register(hook)


def _leave_now(code: int) -> None:
    log.warning("threads still running were abandoned; exiting")
    # os._exit skips the exit functions, which would come after the
    # threads: run them now (a checkpoint writes the results it holds).
    run_exit_functions = getattr(atexit, "_run_exitfuncs", None)
    if run_exit_functions is not None:
        run_exit_functions()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _is_own_handler(previous: Any) -> bool:
    """Whether the program had installed a handler of its own (asyncio.run's
    SIGINT handler, which turns Ctrl-C into KeyboardInterrupt, is not)."""
    if isinstance(previous, _LoopHandler):
        return True
    runner = getattr(asyncio, "Runner", None)  # Python 3.11+
    # asyncio.Runner installs functools.partial(self._on_sigint, ...).
    owner = getattr(getattr(previous, "func", previous), "__self__", None)
    return (
        callable(previous)
        and previous is not signal.default_int_handler
        and not (runner is not None and isinstance(owner, runner))
    )


def _exit_as_signalled(sig: int, previous: Any) -> None:
    if isinstance(previous, _LoopHandler):
        # Called here rather than through the loop's signal dispatch, which
        # would run it after the program's tasks resume, or never if they end.
        previous.callback(*previous.args)
    elif _is_own_handler(previous):
        signal.raise_signal(sig)
    elif sig == signal.SIGINT:
        raise KeyboardInterrupt
    else:
        raise SystemExit(128 + sig)


# The signal mask of the forking thread while a fork is in progress, if we
# blocked SIGINT/SIGTERM for it.
_mask_before_fork: set[int | signal.Signals] | None = None


def _block_signals_for_fork() -> None:
    # A forked child (a process-pool worker) inherits the parent loop's
    # signal wakeup fd: a signal reaching the child before it resets its
    # handlers would be written to the parent's socket and read there as the
    # parent's own. Keep the signals pending across the fork instead.
    global _mask_before_fork
    if any(hub.previous for hub in list(_hubs.values())):
        _mask_before_fork = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)


def _unblock_signals_in_parent() -> None:
    global _mask_before_fork
    if _mask_before_fork is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, _mask_before_fork)
        _mask_before_fork = None


def _forget_handlers_in_child() -> None:
    # The child has no running loop yet: it gets the default dispositions
    # back, then whatever arrived during the fork is delivered to it.
    global _mask_before_fork
    _hubs.clear()
    try:
        signal.set_wakeup_fd(-1)
        for sig, default in (
            (signal.SIGINT, signal.default_int_handler),
            (signal.SIGTERM, signal.SIG_DFL),
        ):
            if _dispatched_by_a_loop(signal.getsignal(sig)):
                signal.signal(sig, default)
    except ValueError:  # forked from a thread other than the main one
        pass
    if _mask_before_fork is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, _mask_before_fork)
        _mask_before_fork = None


os.register_at_fork(
    before=_block_signals_for_fork,
    after_in_parent=_unblock_signals_in_parent,
    after_in_child=_forget_handlers_in_child,
)


def register(engine: WorkflowEngine, loop: asyncio.AbstractEventLoop) -> bool:
    """Route SIGINT/SIGTERM to ``engine``; False where signals can't be handled."""
    if threading.current_thread() is not threading.main_thread():
        return False
    hub = _hubs.get(id(loop))
    if hub is None:
        hub = _hubs[id(loop)] = _SignalHub(loop)
    hub.add(engine)
    return True


def unregister(engine: WorkflowEngine, loop: asyncio.AbstractEventLoop) -> None:
    hub = _hubs.get(id(loop))
    if hub is not None:
        hub.discard(engine)
