"""The workloads on Parsl, with its in-process ``ThreadPoolExecutor``.

Parsl apps are plain functions (``@python_app``) or functions returning a
command line (``@bash_app``); futures passed as arguments are dependencies,
so the task graphs are built exactly as on the other systems. Differences the
library imposes, noted in the results:

- no dry-run mode: W4 runs no-op ``python_app`` tasks on the 4-thread pool;
- no asyncio-native path: W5 sleeps in ``time.sleep`` on a 100-thread pool;
- ``bash_app`` always runs its command through ``/bin/bash -c``.

Parsl's per-run file logging is switched off (``initialize_logging=False``)
and its run directory goes to a temporary folder: a favour to Parsl, whose
default DEBUG log file costs it time on every task.

    python -m benchmarks.workloads.parsl_ --workload W1 --size 10000
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import parsl
from parsl import bash_app, python_app
from parsl.config import Config
from parsl.executors import ThreadPoolExecutor

from ._common import PAUSE, Probe, chain_of, main, map_reduce_result, tree_reduce

SYSTEM = "parsl"
THREADS = 4
IO_THREADS = 100
EXEC_CONCURRENCY = 8
WIDTH = 100


@contextmanager
def _loaded(threads: int = THREADS) -> Iterator[None]:
    run_dir = tempfile.mkdtemp(prefix="parsl-bench-")
    config = Config(
        executors=[ThreadPoolExecutor(max_threads=threads, label="threads")],
        run_dir=run_dir,
        initialize_logging=False,
    )
    dfk = parsl.load(config)
    try:
        yield
    finally:
        dfk.cleanup()
        parsl.clear()
        shutil.rmtree(run_dir, ignore_errors=True)


@python_app
def noop() -> None:
    return None


@python_app
def step(previous: object) -> object:
    return previous


@python_app
def node(*upstream: object) -> None:
    return None


@python_app
def wait() -> None:
    time.sleep(PAUSE)


@python_app
def square(i: int) -> int:
    return i * i


@python_app
def add(a: int, b: int) -> int:
    return a + b


@bash_app
def true() -> str:
    return "/bin/true"


def wide(size: int, variant: str) -> dict[str, Any]:
    """W1: independent no-op tasks on a thread pool."""
    probe = Probe()
    with _loaded():
        probe.start()
        futures = [noop() for _ in range(size)]
        for future in futures:
            future.result()
        probe.stop()
    return probe.result(tasks=size)


def chain(size: int, variant: str) -> dict[str, Any]:
    """W2: each task depends on the previous one; reported per hop."""
    probe = Probe()
    with _loaded():
        probe.start()
        chain_of(step, size).result()
        probe.stop()
    return probe.result(tasks=size)


def execs(size: int, variant: str) -> dict[str, Any]:
    """W3: ``/bin/true`` bash apps on an 8-thread pool."""
    probe = Probe()
    with _loaded(EXEC_CONCURRENCY):
        probe.start()
        futures = [true() for _ in range(size)]
        for future in futures:
            future.result()
        probe.stop()
    return probe.result(tasks=size)


def layered(size: int, variant: str) -> dict[str, Any]:
    """W4: layers of 100 no-op tasks, each on 2 tasks of the layer above."""
    probe = Probe()
    with _loaded():
        probe.start()
        layer = [node() for _ in range(WIDTH)]
        for _ in range(size // WIDTH - 1):
            layer = [node(layer[j], layer[(j + 1) % WIDTH]) for j in range(WIDTH)]
        for future in layer:
            future.result()
        probe.stop()
    return probe.result(tasks=size // WIDTH * WIDTH)


def io_bound(size: int, variant: str) -> dict[str, Any]:
    """W5: tasks that each sleep 0.05 s, on a 100-thread pool."""
    probe = Probe()
    with _loaded(IO_THREADS):
        probe.start()
        futures = [wait() for _ in range(size)]
        for future in futures:
            future.result()
        probe.stop()
    return probe.result(tasks=size)


def map_reduce(size: int, variant: str) -> dict[str, Any]:
    """W6: ``size`` map tasks, then a binary tree of pairwise reductions."""
    probe = Probe()
    with _loaded():
        probe.start()
        root = tree_reduce([square(i) for i in range(size)], lambda a, b: add(a, b))
        total = root.result()
        probe.stop()
    return map_reduce_result(total, size, probe)


WORKLOADS = {
    "W1": wide,
    "W2": chain,
    "W3": execs,
    "W4": layered,
    "W5": io_bound,
    "W6": map_reduce,
}

if __name__ == "__main__":
    main(SYSTEM, WORKLOADS)
