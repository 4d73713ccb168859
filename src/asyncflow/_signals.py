"""SIGINT/SIGTERM: shut every engine on the loop down, then exit as asked.

One hub per event loop, shared by all engines on it, so several engines never
overwrite each other's handlers. After the engines have stopped their work,
the signal's usual effect follows: the previous handler if the program had one,
otherwise ``KeyboardInterrupt`` (SIGINT) or ``SystemExit(128 + signum)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import WorkflowEngine

log = logging.getLogger("asyncflow.signals")

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _SignalHub] = (
    weakref.WeakKeyDictionary()
)


class _SignalHub:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.engines: set[WorkflowEngine] = set()
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in SIGNALS:
            previous = signal.getsignal(sig)
            if previous is signal.SIG_IGN:  # e.g. a background job: respect it
                continue
            try:
                self.loop.add_signal_handler(sig, self._on_signal, sig)
            except (NotImplementedError, RuntimeError, ValueError):
                continue
            self.previous[sig] = previous

    def uninstall(self) -> dict[int, Any]:
        previous, self.previous = self.previous, {}
        for sig, handler in previous.items():
            try:
                self.loop.remove_signal_handler(sig)
                if handler is not None:
                    signal.signal(sig, handler)
            except (RuntimeError, ValueError):  # loop closed or not main thread
                pass
        return previous

    def _on_signal(self, sig: int) -> None:
        engines = list(self.engines)
        self.engines.clear()
        previous = self.uninstall()
        log.warning(
            "received %s: shutting down %d workflow engine(s)",
            signal.Signals(sig).name,
            len(engines),
        )
        self.loop.create_task(self._shut_down(engines, sig, previous.get(sig)))

    async def _shut_down(
        self, engines: list[WorkflowEngine], sig: int, previous: Any
    ) -> None:
        stopping = [engine._begin_shutdown(settle=False) for engine in engines]
        await asyncio.gather(*stopping, return_exceptions=True)
        if not _is_own_handler(previous) and any(
            engine._abandoned_threads for engine in engines
        ):
            _exit_without_joining(128 + sig)
        # Queue the exit first, then settle every future in this same step:
        # the program's own tasks resume only after the exit is on its way.
        self.loop.call_soon(_exit_as_signalled, sig, previous)
        for engine in engines:
            engine._settle_all()


def _exit_without_joining(code: int) -> None:
    """Make interpreter exit skip joining threads stuck in blocking calls.

    A ``ThreadPoolExecutor`` thread is joined at exit, so a call that never
    returns would keep a signalled program alive for good. The hook runs when
    the interpreter starts waiting for threads, after the program's own
    clean-up, and ends the process with the signal's exit status.
    """
    register = getattr(threading, "_register_atexit", None)
    if register is None:  # pragma: no cover - all supported Pythons have it
        return

    def leave() -> None:
        log.warning("threads stuck in blocking calls were abandoned; exiting")
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)

    with contextlib.suppress(RuntimeError):
        register(leave)


def _is_own_handler(previous: Any) -> bool:
    """Whether the program had installed a handler of its own (asyncio.run's
    SIGINT handler, which turns Ctrl-C into KeyboardInterrupt, is not)."""
    runner = getattr(asyncio, "Runner", None)  # Python 3.11+
    # asyncio.Runner installs functools.partial(self._on_sigint, ...).
    owner = getattr(getattr(previous, "func", previous), "__self__", None)
    return (
        callable(previous)
        and previous is not signal.default_int_handler
        and not (runner is not None and isinstance(owner, runner))
    )


def _exit_as_signalled(sig: int, previous: Any) -> None:
    if _is_own_handler(previous):
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
    if any(hub.previous for hub in _hubs.values()):
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
            handler = signal.getsignal(sig)
            if getattr(handler, "__module__", None) == "asyncio.unix_events":
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
    hub = _hubs.get(loop)
    if hub is None:
        hub = _hubs[loop] = _SignalHub(loop)
    if not hub.engines:
        hub.install()
    hub.engines.add(engine)
    return True


def unregister(engine: WorkflowEngine, loop: asyncio.AbstractEventLoop) -> None:
    hub = _hubs.get(loop)
    if hub is None or engine not in hub.engines:
        return
    hub.engines.discard(engine)
    if not hub.engines:
        hub.uninstall()
