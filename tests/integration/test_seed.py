"""The seed document's promises, sample by sample (typos fixed)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from asyncflow import TaskState, WorkflowEngine

from ..conftest import IN_PROCESS_BACKENDS


async def test_state_table_sample(flow: WorkflowEngine) -> None:
    @flow.function_task
    async def my_task() -> int:
        return 42

    fut = my_task()
    assert fut.state == "PENDING"
    await asyncio.sleep(0)
    assert fut.state in ("RUNNING", "DONE")
    assert await fut == 42
    assert fut.state == "DONE"
    assert str(fut.state) == "DONE"
    assert f"{fut.state}" == "DONE"


async def test_callback_sample_prints_the_right_state(
    flow: WorkflowEngine, capsys: pytest.CaptureFixture[str]
) -> None:
    gate = threading.Event()

    @flow.function_task
    async def task1() -> str:
        return "ok"

    @flow.function_task
    async def task2() -> None:
        raise ValueError("bad input")

    @flow.function_task
    def task3() -> None:
        gate.wait(30)

    seen: list[tuple[str, str]] = []

    # The seed's callback, verbatim.
    def on_done(fut):  # type: ignore[no-untyped-def]
        if fut.cancelled():
            print(f"cancelled — state={fut.state}")
        elif fut.exception():
            print(f"failed: {fut.exception()} — state={fut.state}")
        else:
            print(f"done: {fut.result()} — state={fut.state}")
        seen.append((fut.name, fut.state))

    futs = [task1(), task2(), task3()]
    for fut in futs:
        fut.add_done_callback(on_done)
    futs[2].cancel()
    gate.set()
    await asyncio.wait(futs)
    await asyncio.sleep(0)  # callbacks are scheduled with call_soon

    out = capsys.readouterr().out
    assert "done: ok — state=DONE" in out
    assert "failed: bad input — state=FAILED" in out
    assert "cancelled — state=CANCELLED" in out
    assert sorted(seen) == [
        ("task1", "DONE"),
        ("task2", "FAILED"),
        ("task3", "CANCELLED"),
    ]


async def test_dependency_sample_in_dry_run() -> None:
    asyncflow = await WorkflowEngine.create(dry_run=True)
    try:

        @asyncflow.function_task
        async def task_a() -> None:
            await asyncio.sleep(2)

        @asyncflow.function_task
        async def task_b() -> None:
            await asyncio.sleep(2)

        @asyncflow.function_task
        async def task_c(task_a_fut: object, task_b_fut: object) -> None:
            await asyncio.sleep(2)

        a, b = task_a(), task_b()
        result = task_c(a, b)
        assert set(result.dependencies) == {a, b}
        await result
        assert [f.state for f in (a, b, result)] == ["DONE"] * 3
    finally:
        await asyncflow.shutdown()


@pytest.mark.parametrize("backend", IN_PROCESS_BACKENDS)
async def test_independent_tasks_overlap_and_c_waits(make_engine, backend: str) -> None:
    """a and b each wait until the other has started: only possible in parallel."""
    flow = await make_engine(backend)
    log: list[str] = []
    if backend == "threads":
        barrier = threading.Barrier(2, timeout=20)

        def meet(name: str) -> str:
            log.append(f"{name} start")
            barrier.wait()
            log.append(f"{name} end")
            return name

        @flow.function_task
        def task_a() -> str:
            return meet("a")

        @flow.function_task
        def task_b() -> str:
            return meet("b")

    else:
        started = {"a": asyncio.Event(), "b": asyncio.Event()}

        async def meet_async(name: str, other: str) -> str:
            log.append(f"{name} start")
            started[name].set()
            await asyncio.wait_for(started[other].wait(), 20)
            log.append(f"{name} end")
            return name

        @flow.function_task
        async def task_a() -> str:
            return await meet_async("a", "b")

        @flow.function_task
        async def task_b() -> str:
            return await meet_async("b", "a")

    @flow.function_task
    async def task_c(x: str, y: str) -> str:
        log.append("c")
        return x + y

    assert await task_c(task_a(), task_b()) == "ab"
    assert set(log[:2]) == {"a start", "b start"}
    assert log[-1] == "c"


async def test_awaiting_early_still_works(flow: WorkflowEngine) -> None:
    @flow.function_task
    async def task_a() -> int:
        return 1

    @flow.function_task
    async def task_b() -> int:
        return 2

    # The seed's "slower" pattern gives the same results.
    assert await task_a() == 1
    assert await task_b() == 2


async def test_done_callbacks_need_no_coroutine_per_task(make_engine) -> None:
    flow = await make_engine("threads")
    gate = threading.Event()

    @flow.function_task
    def wait_for_gate(i: int) -> int:
        gate.wait(30)
        return i

    before = len(asyncio.all_tasks())
    results: list[int] = []
    futs = [wait_for_gate(i) for i in range(50)]
    for fut in futs:
        fut.add_done_callback(lambda f: results.append(f.result()))
    await asyncio.sleep(0)
    assert all(f.state == TaskState.RUNNING for f in futs)
    # No asyncio task (background coroutine) per workflow task.
    assert len(asyncio.all_tasks()) - before < 5
    gate.set()
    await asyncio.gather(*futs)
    await asyncio.sleep(0)
    assert sorted(results) == list(range(50))


async def test_try_finally_shutdown_releases_the_pool() -> None:
    flow = await WorkflowEngine.create()
    try:

        @flow.function_task
        def name() -> str:
            return threading.current_thread().name

        worker = await name()
    finally:
        await flow.shutdown()
    assert worker != threading.current_thread().name
    assert not any(t.name == worker and t.is_alive() for t in threading.enumerate())
