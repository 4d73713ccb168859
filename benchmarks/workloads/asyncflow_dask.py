"""W1, W2 and W6 on our ``DaskExecutionBackend``, beside raw Dask.

The backend starts the very cluster the raw Dask rows use (``dask_.CLUSTER``:
one in-process worker with 4 threads) and runs the same plain functions,
with the same arguments; only the way tasks are called differs (our
decorated tasks instead of ``client.submit``). The variants ``dask`` of
``asyncflow_.py`` land here; Dask is imported only then, so that the other
runs' memory figures do not include it.

    python -m benchmarks.workloads.asyncflow_ --workload W1 --size 5000 --variant dask
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from asyncflow import WorkflowEngine

from ._common import Probe, chain_of, map_reduce_result, tree_reduce

Workload = Callable[[int, str], Any]


async def _engine() -> tuple[WorkflowEngine, Any]:
    from asyncflow import DaskExecutionBackend

    from . import dask_

    backend = DaskExecutionBackend(**dask_.CLUSTER)
    return await WorkflowEngine.create(backend=backend), dask_


async def wide(size: int, variant: str) -> dict[str, Any]:
    """W1: independent no-op tasks, every result awaited."""
    probe = Probe()
    flow, dask_ = await _engine()
    noop = flow.function_task(dask_.noop)
    probe.start()
    await asyncio.gather(*[noop(i) for i in range(size)])
    probe.stop()
    await flow.shutdown()
    return probe.result(tasks=size)


async def chain(size: int, variant: str) -> dict[str, Any]:
    """W2: each task takes the previous one's future; only the last is awaited."""
    probe = Probe()
    flow, dask_ = await _engine()
    step = flow.function_task(dask_.step)
    probe.start()
    await chain_of(step, size)
    probe.stop()
    await flow.shutdown()
    return probe.result(tasks=size)


async def map_reduce(size: int, variant: str) -> dict[str, Any]:
    """W6: ``size`` map tasks, then a binary tree of pairwise reductions."""
    probe = Probe()
    flow, dask_ = await _engine()
    square = flow.function_task(dask_.square)
    add = flow.function_task(dask_.add)
    probe.start()
    total = await tree_reduce([square(i) for i in range(size)], add)
    probe.stop()
    await flow.shutdown()
    return map_reduce_result(total, size, probe)


WORKLOADS: dict[str, Callable[[int, str], Coroutine[Any, Any, dict[str, Any]]]] = {
    "W1": wide,
    "W2": chain,
    "W6": map_reduce,
}


def on_dask(workloads: dict[str, Workload]) -> dict[str, Workload]:
    """``workloads`` whose variant ``dask`` runs here instead."""

    def routed(workload: str, default: Workload) -> Workload:
        def run(size: int, variant: str) -> Any:
            if variant == "dask":
                return WORKLOADS[workload](size, variant)
            return default(size, variant)

        return run

    return {
        name: routed(name, run) if name in WORKLOADS else run
        for name, run in workloads.items()
    }
