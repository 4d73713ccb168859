"""Thread pools drain their backend's queue: a worker runs the next admitted
task itself, short tasks go a few at a time, short ``async def`` bodies share
one turn of the worker's loop. Outcomes must be exactly those of one task at
a time: results, errors, cancellation, timeouts and retries."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from asyncflow import (
    LocalExecutionBackend,
    TaskTimeoutError,
    WorkflowEngine,
    current_resources,
)


@pytest.fixture
async def flow():
    engine = await WorkflowEngine.create(LocalExecutionBackend(ThreadPoolExecutor(2)))
    yield engine
    await engine.shutdown()


@pytest.mark.parametrize("style", ["async", "def"])
async def test_many_short_tasks_keep_every_outcome(flow, style: str):
    if style == "async":

        @flow.function_task
        async def work(i: int) -> int:
            if i % 7 == 3:
                raise ValueError(f"bad {i}")
            return i * i

    else:

        @flow.function_task
        def work(i: int) -> int:
            if i % 7 == 3:
                raise ValueError(f"bad {i}")
            return i * i

    futures = [work(i) for i in range(600)]
    cancelled = futures[500::10]
    for future in cancelled:
        future.cancel()
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    for i, (future, outcome) in enumerate(zip(futures, outcomes, strict=True)):
        if future in cancelled:
            assert isinstance(outcome, asyncio.CancelledError), i
        elif i % 7 == 3:
            assert isinstance(outcome, ValueError), i
            assert str(outcome) == f"bad {i}"
        else:
            assert outcome == i * i, i


async def test_a_long_async_body_among_short_ones_can_be_cancelled(flow):
    started = threading.Event()

    @flow.function_task
    async def short(i: int) -> int:
        return i

    @flow.function_task
    async def long_one() -> None:
        started.set()
        await asyncio.sleep(60)

    calls = [short(i) for i in range(200)]
    stuck = long_one()
    calls += [short(i) for i in range(200, 400)]
    await asyncio.get_running_loop().run_in_executor(None, started.wait, 20)
    stuck.cancel()
    assert await asyncio.gather(*calls) == list(range(400))
    with pytest.raises(asyncio.CancelledError):
        await stuck


async def test_timeouts_and_retries_of_short_async_bodies(flow):
    attempts: dict[int, int] = {}
    # One lock per call, held by its first attempt while it hangs: a second
    # attempt of the same call running meanwhile would find it taken.
    running = {i: threading.Lock() for i in range(300)}
    found_free: dict[int, bool] = {}
    lock = threading.Lock()

    @flow.function_task(timeout=0.5, retries=1)
    async def sometimes_hangs(i: int) -> int:
        with lock:
            attempts[i] = attempts.get(i, 0) + 1
            first = attempts[i] == 1
        if not running[i].acquire(blocking=False):
            found_free[i] = False
            return -1
        try:
            found_free.setdefault(i, True)
            if i % 50 == 0 and first:
                await asyncio.sleep(60)
        finally:
            running[i].release()
        return i

    results = await asyncio.gather(*[sometimes_hangs(i) for i in range(300)])
    assert results == list(range(300))
    assert {i for i, n in attempts.items() if n == 2} == set(range(0, 300, 50))
    assert all(found_free.values())

    @flow.function_task(timeout=0.2)
    async def always_hangs() -> None:
        await asyncio.sleep(60)

    with pytest.raises(TaskTimeoutError):
        await always_hangs()


async def test_each_short_task_sees_its_own_grant():
    backend = LocalExecutionBackend(
        ThreadPoolExecutor(2), gpus=["0", "1"], custom={"tokens": 8}
    )
    async with await WorkflowEngine.create(backend) as flow:

        @flow.function_task(resources={"gpus": 1, "tokens": 2})
        async def on_gpu(i: int) -> tuple[str, dict]:
            return "gpu", current_resources()

        @flow.function_task(resources={"tokens": 3})
        def plain(i: int) -> tuple[str, dict]:
            return "plain", current_resources()

        calls = []
        for i in range(300):
            calls += [on_gpu(i), plain(i)]
        for kind, grant in await asyncio.gather(*calls):
            if kind == "gpu":
                assert grant["tokens"] == 2
                assert len(grant["gpus"]) == 1
                assert grant["gpus"][0] in {"0", "1"}
            else:
                assert grant["tokens"] == 3
                assert grant["gpus"] == []


async def test_a_blocking_body_never_times_out_calls_waiting_beside_it(flow):
    # SPEC §11 (never lie): a call's timeout is its own; one body blocking
    # its worker must not fail, nor re-run, the calls queued with it.
    runs: dict[int, int] = {}
    lock = threading.Lock()

    @flow.function_task(timeout=0.5, retries=1)
    async def body(i: int) -> int:
        with lock:
            runs[i] = runs.get(i, 0) + 1
        if i == 40:
            time.sleep(2)  # blocks its worker thread, not only itself
        return i

    assert await asyncio.gather(*[body(i) for i in range(30)]) == list(range(30))
    outcomes = await asyncio.gather(
        *[body(i) for i in range(30, 300)], return_exceptions=True
    )
    failed = [30 + k for k, o in enumerate(outcomes) if isinstance(o, BaseException)]
    assert failed in ([], [40])
    assert {i for i, n in runs.items() if n > 1} <= {40}
