"""The workloads that fit ``dask.distributed``: W1, W2, W3 and W6.

One in-process worker (``LocalCluster(processes=False)``) with 4 threads (8
for W3), so tasks run on a thread pool as on the other systems; the
scheduler talks to it in-process and its HTTP servers bind 127.0.0.1 only.
Each task is one ``client.submit``; futures passed as arguments are
dependencies. Dask has no dry-run mode (W4) and no way to run ``async def``
bodies as tasks (W5), so those are not run here. The same cluster
(:data:`CLUSTER`) and task bodies run our ``DaskExecutionBackend`` in
``asyncflow_dask.py``.

    python -m benchmarks.workloads.dask_ --workload W1 --size 10000
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dask.distributed import Client, LocalCluster

from ._common import Probe, main, map_reduce_result, tree_reduce

SYSTEM = "dask"
THREADS = 4
EXEC_CONCURRENCY = 8

#: The cluster every Dask run starts (``LocalCluster`` arguments).
CLUSTER: dict[str, Any] = {
    "n_workers": 1,
    "threads_per_worker": THREADS,
    "processes": False,
    # Its HTTP servers (dashboard, health) start even without bokeh and
    # would bind every interface; keep them on the loopback.
    "dashboard_address": "127.0.0.1:0",
    "worker_dashboard_address": "127.0.0.1:0",
    "silence_logs": logging.ERROR,
}


@contextmanager
def _client(threads: int = THREADS) -> Iterator[Client]:
    cluster = LocalCluster(**{**CLUSTER, "threads_per_worker": threads})
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def noop(i: int) -> None:
    return None


def step(previous: object) -> object:
    return previous


def square(i: int) -> int:
    return i * i


def add(a: int, b: int) -> int:
    return a + b


def true() -> str:
    return subprocess.run(
        ["/bin/true"], stdin=subprocess.DEVNULL, capture_output=True, check=True
    ).stdout.decode()


def wide(size: int, variant: str) -> dict[str, Any]:
    """W1: independent no-op tasks on a thread pool."""
    probe = Probe()
    with _client() as client:
        probe.start()
        futures = [client.submit(noop, i, pure=False) for i in range(size)]
        client.gather(futures)
        probe.stop()
    return probe.result(tasks=size)


def chain(size: int, variant: str) -> dict[str, Any]:
    """W2: each task depends on the previous one; reported per hop."""
    probe = Probe()
    with _client() as client:
        probe.start()
        last = client.submit(step, None, pure=False)
        for _ in range(size - 1):
            last = client.submit(step, last, pure=False)
        last.result()
        probe.stop()
    return probe.result(tasks=size)


def execs(size: int, variant: str) -> dict[str, Any]:
    """W3: ``/bin/true`` via ``subprocess.run`` on 8 worker threads."""
    probe = Probe()
    with _client(EXEC_CONCURRENCY) as client:
        probe.start()
        futures = [client.submit(true, pure=False) for _ in range(size)]
        client.gather(futures)
        probe.stop()
    return probe.result(tasks=size)


def map_reduce(size: int, variant: str) -> dict[str, Any]:
    """W6: ``size`` map tasks, then a binary tree of pairwise reductions."""
    probe = Probe()
    with _client() as client:
        probe.start()
        root = tree_reduce(
            [client.submit(square, i, pure=False) for i in range(size)],
            lambda a, b: client.submit(add, a, b, pure=False),
        )
        total = root.result()
        probe.stop()
    return map_reduce_result(total, size, probe)


WORKLOADS = {"W1": wide, "W2": chain, "W3": execs, "W6": map_reduce}

if __name__ == "__main__":
    main(SYSTEM, WORKLOADS)
