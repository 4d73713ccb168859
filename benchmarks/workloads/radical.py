"""The workloads on RADICAL AsyncFlow (PyPI ``radical-asyncflow``).

Its API has the same shape as ours, so the workload code matches
``asyncflow_`` line for line, with two differences imposed by the library:

- it has no asyncio-native backend, so W5 runs its ``async def`` bodies on a
  100-thread ``LocalExecutionBackend`` (each body in ``asyncio.run`` on a
  worker thread), the closest equivalent;
- its backend starts every ready executable task at once, so W3 bounds the
  concurrency to 8 in user code: at most 8 task calls are in flight.

    python -m benchmarks.workloads.radical --workload W1 --size 2000
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from radical.asyncflow import LocalExecutionBackend, WorkflowEngine

from ._common import PAUSE, Probe, chain_of, main, map_reduce_result, tree_reduce

SYSTEM = "radical-asyncflow"
THREADS = 4
IO_THREADS = 100
EXEC_CONCURRENCY = 8
WIDTH = 100
#: Run the command directly (argv), as the raw baseline does.
NO_SHELL = {"shell": False}


async def _engine(variant: str, threads: int = THREADS) -> Any:
    if variant == "dry":
        return await WorkflowEngine.create(dry_run=True)
    backend = await LocalExecutionBackend(ThreadPoolExecutor(threads))
    return await WorkflowEngine.create(backend=backend)


async def wide(size: int, variant: str) -> dict[str, Any]:
    """W1: independent no-op tasks on a thread pool."""
    probe = Probe()
    flow = await _engine("threads")

    @flow.function_task
    async def noop() -> None:
        return None

    probe.start()
    await asyncio.gather(*[noop() for _ in range(size)])
    probe.stop()
    await flow.shutdown()
    return probe.result(tasks=size)


async def chain(size: int, variant: str) -> dict[str, Any]:
    """W2: each task depends on the previous one; reported per hop."""
    probe = Probe()
    flow = await _engine(variant)

    @flow.function_task
    async def step(previous: object) -> object:
        return previous

    probe.start()
    await chain_of(step, size)
    probe.stop()
    await flow.shutdown()
    return probe.result(tasks=size)


async def execs(size: int, variant: str) -> dict[str, Any]:
    """W3: ``/bin/true`` executable tasks, 8 in flight, without a shell."""
    probe = Probe()
    flow = await _engine("threads")

    @flow.executable_task
    async def true(task_description: dict[str, Any] = NO_SHELL) -> str:
        return "/bin/true"

    window = asyncio.Semaphore(EXEC_CONCURRENCY)

    async def bounded() -> None:
        async with window:
            await true()

    probe.start()
    await asyncio.gather(*[bounded() for _ in range(size)])
    probe.stop()
    await flow.shutdown()
    return probe.result(tasks=size)


async def layered(size: int, variant: str) -> dict[str, Any]:
    """W4: dry run of layers of 100 tasks, each on 2 tasks of the layer above."""
    probe = Probe()
    flow = await _engine("dry")

    @flow.function_task
    async def node(*upstream: object) -> None:
        return None

    probe.start()
    layer = [node() for _ in range(WIDTH)]
    for _ in range(size // WIDTH - 1):
        layer = [node(layer[j], layer[(j + 1) % WIDTH]) for j in range(WIDTH)]
    await asyncio.gather(*layer)
    probe.stop()
    await flow.shutdown()
    return probe.result(tasks=size // WIDTH * WIDTH)


async def io_bound(size: int, variant: str) -> dict[str, Any]:
    """W5: tasks that each await ``asyncio.sleep(0.05)``, on 100 threads."""
    probe = Probe()
    flow = await _engine("threads", IO_THREADS)

    @flow.function_task
    async def wait() -> None:
        await asyncio.sleep(PAUSE)

    probe.start()
    await asyncio.gather(*[wait() for _ in range(size)])
    probe.stop()
    await flow.shutdown()
    return probe.result(tasks=size)


async def map_reduce(size: int, variant: str) -> dict[str, Any]:
    """W6: ``size`` map tasks, then a binary tree of pairwise reductions."""
    probe = Probe()
    flow = await _engine("threads")

    @flow.function_task
    async def square(i: int) -> int:
        return i * i

    @flow.function_task
    async def add(a: int, b: int) -> int:
        return a + b

    probe.start()
    root = tree_reduce([square(i) for i in range(size)], lambda a, b: add(a, b))
    total = await root
    probe.stop()
    await flow.shutdown()
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
