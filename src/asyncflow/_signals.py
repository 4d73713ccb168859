"""SIGINT/SIGTERM: shut every engine on the loop down, then exit as asked.

One hub per event loop, shared by all engines on it, so several engines never
overwrite each other's handlers. After the engines have stopped their work,
the signal's usual effect follows: the previous handler if the program had one,
otherwise ``KeyboardInterrupt`` (SIGINT) or ``SystemExit(128 + signum)``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
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
        # Queue the exit first, then settle every future in this same step:
        # the program's own tasks resume only after the exit is on its way.
        self.loop.call_soon(_exit_as_signalled, sig, previous)
        for engine in engines:
            engine._settle_all()


def _exit_as_signalled(sig: int, previous: Any) -> None:
    if callable(previous) and previous is not signal.default_int_handler:
        signal.raise_signal(sig)
    elif sig == signal.SIGINT:
        raise KeyboardInterrupt
    else:
        raise SystemExit(128 + sig)


def _forget_handlers_in_child() -> None:
    # A forked child (a process-pool worker) inherits the loop's signal
    # wakeup fd: a signal sent to the child would be written to the parent's
    # socket and read there as the parent's own. Give the child the defaults.
    if not any(hub.previous for hub in _hubs.values()):
        return
    _hubs.clear()
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except ValueError:  # forked from a thread other than the main one
        pass


os.register_at_fork(after_in_child=_forget_handlers_in_child)


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
