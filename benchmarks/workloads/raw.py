"""Raw baselines: each workload with no framework at all, the machine's limit.

Plain asyncio at the same concurrency as the frameworks: a 4-thread
``ThreadPoolExecutor`` through ``loop.run_in_executor``, 8 concurrent
``asyncio.create_subprocess_exec`` calls, asyncio tasks on the loop, and for
the dry-run DAG (W4) one ``asyncio.Future`` per node released by
done-callbacks when its dependencies finish.

    python -m benchmarks.workloads.raw --workload W1 --size 10000
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ._common import PAUSE, Probe, main, map_reduce_result, tree_reduce

SYSTEM = "raw"
THREADS = 4
EXEC_CONCURRENCY = 8
WIDTH = 100


def noop() -> None:
    return None


def step(previous: object) -> object:
    return previous


def square(i: int) -> int:
    return i * i


def add(a: int, b: int) -> int:
    return a + b


async def wide(size: int, variant: str) -> dict[str, Any]:
    """W1: ``size`` independent ``run_in_executor`` calls, gathered."""
    probe = Probe()
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(THREADS) as pool:
        probe.start()
        await asyncio.gather(*[loop.run_in_executor(pool, noop) for _ in range(size)])
        probe.stop()
    return probe.result(tasks=size)


async def chain(size: int, variant: str) -> dict[str, Any]:
    """W2: ``size`` sequential round trips (to the pool, or to a new task)."""
    probe = Probe()
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(THREADS) as pool:
        probe.start()
        value: object = None
        if variant == "asyncio":

            async def astep(previous: object) -> object:
                return previous

            for _ in range(size):
                value = await loop.create_task(astep(value))
        else:
            for _ in range(size):
                value = await loop.run_in_executor(pool, step, value)
        probe.stop()
    return probe.result(tasks=size)


async def execs(size: int, variant: str) -> dict[str, Any]:
    """W3: ``/bin/true`` through ``create_subprocess_exec``, 8 at a time."""
    probe = Probe()
    slots = asyncio.Semaphore(EXEC_CONCURRENCY)

    async def true() -> bytes:
        async with slots:
            proc = await asyncio.create_subprocess_exec(
                "/bin/true",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, _ = await proc.communicate()
            if proc.returncode:
                raise RuntimeError(f"/bin/true exited with {proc.returncode}")
            return out

    probe.start()
    await asyncio.gather(*[true() for _ in range(size)])
    probe.stop()
    return probe.result(tasks=size)


async def layered(size: int, variant: str) -> dict[str, Any]:
    """W4: the dry-run DAG's bookkeeping alone, with futures and callbacks."""
    probe = Probe()
    loop = asyncio.get_running_loop()

    def node(*upstream: asyncio.Future[None]) -> asyncio.Future[None]:
        future: asyncio.Future[None] = loop.create_future()
        if not upstream:
            loop.call_soon(future.set_result, None)
            return future
        waiting = [len(upstream)]

        def release(_: asyncio.Future[None]) -> None:
            waiting[0] -= 1
            if not waiting[0]:
                future.set_result(None)

        for dependency in upstream:
            dependency.add_done_callback(release)
        return future

    probe.start()
    layer = [node() for _ in range(WIDTH)]
    for _ in range(size // WIDTH - 1):
        layer = [node(layer[j], layer[(j + 1) % WIDTH]) for j in range(WIDTH)]
    await asyncio.gather(*layer)
    probe.stop()
    return probe.result(tasks=size // WIDTH * WIDTH)


async def io_bound(size: int, variant: str) -> dict[str, Any]:
    """W5: ``size`` coroutines each awaiting ``asyncio.sleep(0.05)``, gathered."""
    probe = Probe()

    async def wait() -> None:
        await asyncio.sleep(PAUSE)

    probe.start()
    await asyncio.gather(*[wait() for _ in range(size)])
    probe.stop()
    return probe.result(tasks=size)


async def map_reduce(size: int, variant: str) -> dict[str, Any]:
    """W6: maps in the pool; each reduction an asyncio task awaiting its pair."""
    probe = Probe()
    loop = asyncio.get_running_loop()

    async def reduce(a: Awaitable[int], b: Awaitable[int]) -> int:
        return await loop.run_in_executor(pool, add, await a, await b)

    with ThreadPoolExecutor(THREADS) as pool:
        probe.start()
        root = tree_reduce(
            [loop.run_in_executor(pool, square, i) for i in range(size)],
            lambda a, b: loop.create_task(reduce(a, b)),
        )
        total = await root
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
