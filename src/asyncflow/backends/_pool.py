"""The default backend's thread pool: daemon workers.

``ThreadPoolExecutor`` workers are joined when the interpreter exits, so a
task stuck in a blocking call keeps a finished program alive for as long as
the call lasts, Ctrl-C or not. The engine stops waiting for such a task at
shutdown; this pool's daemon workers let the process exit then too.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

T = TypeVar("T")

_STOP = None


@functools.cache
def _default_max_workers() -> int:
    # ``ThreadPoolExecutor``'s default. ``os.cpu_count()`` reads sysfs on
    # every call: once per process is enough for a default pool size.
    return min(32, (os.cpu_count() or 1) + 4)


class DaemonThreadPool(Executor):
    """A minimal ``Executor`` whose worker threads are daemons."""

    def __init__(
        self, max_workers: int | None = None, thread_name_prefix: str = ""
    ) -> None:
        if max_workers is None:
            max_workers = _default_max_workers()
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self._max_workers = max_workers
        self._prefix = thread_name_prefix or "asyncflow-worker"
        self._queue: queue.SimpleQueue[
            tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]
            | None
        ] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new work after shutdown")
            self._queue.put((future, fn, args, kwargs))
            # Start a worker unless one is idle (never more than the maximum).
            if (
                not self._idle.acquire(blocking=False)
                and len(self._threads) < self._max_workers
            ):
                thread = threading.Thread(
                    target=self._work,
                    name=f"{self._prefix}_{len(self._threads)}",
                    daemon=True,
                )
                thread.start()
                self._threads.append(thread)
        return future

    def _work(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            if item is _STOP:
                return
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del item, future, fn, args, kwargs
            self._idle.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                if cancel_futures:
                    self._cancel_queued()
                for _ in self._threads:
                    self._queue.put(_STOP)
        if wait:
            for thread in self._threads:
                thread.join()

    def _cancel_queued(self) -> None:
        kept: list[None] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                item[0].cancel()
            else:
                kept.append(item)
        for item in kept:
            self._queue.put(item)
