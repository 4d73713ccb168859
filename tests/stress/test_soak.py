"""200,000 tasks with random failures: memory returns to its baseline."""

from __future__ import annotations

import asyncio
import gc
import random
import weakref

import psutil
import pytest

from asyncflow import NoopExecutionBackend, TaskFuture, WorkflowEngine

TASKS = 200_000
LAYER = 1_000


async def _campaign(
    flow: WorkflowEngine, tasks: int, seed: int
) -> tuple[int, list[weakref.ref[TaskFuture]]]:
    rng = random.Random(seed)

    @flow.executable_task
    async def step(i: int, *upstream: str) -> str:
        # About 1% of bodies give an empty command: the task fails, and its
        # dependents fail with a DependencyFailureError.
        return "" if rng.random() < 0.01 else f"echo {i}"

    sample: list[weakref.ref[TaskFuture]] = []
    failed = 0
    previous: list[TaskFuture] = []
    for start in range(0, tasks, LAYER):
        layer = [
            step(i, *(previous[(i * 7 + k) % len(previous)] for k in range(2)))
            if previous
            else step(i)
            for i in range(start, start + LAYER)
        ]
        await asyncio.wait(layer)
        failed += sum(f.state == "FAILED" for f in layer)
        sample.append(weakref.ref(layer[0]))
        for fut in layer:
            if fut.state == "FAILED":
                fut.exception()
        previous = layer
    return failed, sample


def _rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


@pytest.mark.slow
async def test_soak_memory_returns_to_baseline() -> None:
    async with await WorkflowEngine.create(backend=NoopExecutionBackend()) as flow:
        await _campaign(flow, 20_000, seed=1)  # warm caches and allocator arenas
        baseline = _rss_mb()
        failed, sample = await _campaign(flow, TASKS, seed=2)
        assert failed > TASKS // 100  # failures really happened and propagated
        assert not flow._scheduler.live  # nothing left registered
        after = _rss_mb()
    assert all(ref() is None for ref in sample), "finished futures are still referenced"
    # 200k retained futures would take well over 100 MB.
    assert after - baseline < 40, f"RSS grew from {baseline:.0f} MB to {after:.0f} MB"
