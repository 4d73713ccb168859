"""SPEC §3/§4: decorators, TaskFuture behaviour, states, cancellation."""

from __future__ import annotations

import asyncio
import inspect
import re
import threading

import pytest

from asyncflow import TaskFuture, TaskState, WorkflowEngine


async def test_decorators_keep_name_doc_and_signature(make_engine) -> None:
    flow = await make_engine("noop")

    async def fetch_data(url: str, retries: int = 3) -> str:
        """Fetch one URL."""
        return url

    for decorate in (
        flow.function_task,
        flow.function_task(),
        flow.executable_task,
        flow.executable_task(),
        flow.block,
        flow.block(),
        flow.prompt_task,
    ):
        task = decorate(fetch_data)
        assert task.__name__ == "fetch_data"
        assert task.__doc__ == "Fetch one URL."
        assert inspect.signature(task) == inspect.signature(fetch_data)


async def test_sync_and_async_bodies(flow: WorkflowEngine) -> None:
    @flow.function_task
    def plain(x: int) -> int:
        return x * 2

    @flow.function_task
    async def coroutine(x: int) -> int:
        await asyncio.sleep(0)
        return x + 1

    assert await coroutine(plain(20)) == 41


async def test_future_is_an_asyncio_future(flow: WorkflowEngine) -> None:
    @flow.function_task
    async def square(x: int) -> int:
        return x * x

    futs = [square(i) for i in range(5)]
    assert all(
        isinstance(f, asyncio.Future) and isinstance(f, TaskFuture) for f in futs
    )
    assert await asyncio.gather(*futs) == [0, 1, 4, 9, 16]
    done, pending = await asyncio.wait([square(5), square(6)])
    assert not pending
    assert sorted(f.result() for f in done) == [25, 36]
    seen = [await f for f in asyncio.as_completed([square(7), square(8)])]
    assert sorted(seen) == [49, 64]
    assert futs[0].exception() is None
    assert not futs[0].cancelled()


async def test_uids_and_names(make_engine) -> None:
    flow = await make_engine("noop")

    @flow.function_task
    async def alpha() -> None:
        pass

    @flow.block
    async def beta() -> None:
        pass

    futs = [alpha(), beta(), alpha()]
    assert [f.name for f in futs] == ["alpha", "beta", "alpha"]
    assert re.fullmatch(r"task\.\d{6}", futs[0].uid)
    assert re.fullmatch(r"block\.\d{6}", futs[1].uid)
    assert len({f.uid for f in futs}) == 3
    assert "alpha" in repr(futs[0])
    assert futs[0].uid in repr(futs[0])
    await asyncio.gather(*futs)


def test_state_enum_compares_as_plain_strings() -> None:
    assert TaskState.PENDING == "PENDING"
    assert str(TaskState.FAILED) == "FAILED"
    assert f"{TaskState.CANCELLED:>10}" == " CANCELLED"
    assert [s.terminal for s in TaskState] == [False, False, True, True, True]


async def test_dependency_free_task_is_submitted_after_one_loop_step(
    local_flow: WorkflowEngine,
) -> None:
    gate = threading.Event()

    @local_flow.function_task
    def blocked() -> int:
        gate.wait(30)
        return 1

    fut = blocked()
    assert fut.state == "PENDING"
    await asyncio.sleep(0)
    assert fut.state == "RUNNING"
    gate.set()
    assert await fut == 1


async def test_noop_task_is_done_after_one_loop_step(make_engine) -> None:
    flow = await make_engine("noop")

    @flow.function_task
    async def quick() -> None:
        pass

    fut = quick()
    await asyncio.sleep(0)
    assert fut.state == "DONE"


async def test_state_is_terminal_inside_done_callbacks(flow: WorkflowEngine) -> None:
    @flow.function_task
    async def good() -> int:
        return 1

    @flow.function_task
    async def bad() -> None:
        raise RuntimeError("no")

    @flow.function_task
    async def waiting(x: int) -> int:
        return x

    seen: dict[str, str] = {}

    def record(fut: TaskFuture) -> None:
        seen[fut.name] = fut.state

    futs = [good(), bad(), waiting(good())]
    futs[2].cancel()
    for fut in futs:
        fut.add_done_callback(record)
    await asyncio.wait(futs)
    await asyncio.sleep(0)
    assert seen == {"good": "DONE", "bad": "FAILED", "waiting": "CANCELLED"}
    assert isinstance(futs[1].exception(), RuntimeError)


async def test_cancel_pending_task_locally_with_message(make_engine) -> None:
    flow = await make_engine("threads")
    gate = threading.Event()
    ran: list[str] = []

    @flow.function_task
    def upstream() -> int:
        gate.wait(30)
        return 1

    @flow.function_task
    def downstream(x: int) -> int:
        ran.append("downstream")
        return x

    up = upstream()
    down = downstream(up)
    assert down.cancel("not needed any more") is True
    assert down.state == "CANCELLED"
    with pytest.raises(asyncio.CancelledError, match="not needed any more"):
        await down
    assert down.cancel() is False
    gate.set()
    assert await up == 1
    assert ran == []


async def test_cancel_running_async_body_stops_it(local_flow: WorkflowEngine) -> None:
    started = threading.Event()
    stopped = threading.Event()

    @local_flow.function_task
    async def long_running() -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            stopped.set()
            raise

    fut = long_running()
    while not started.is_set():
        await asyncio.sleep(0.01)
    assert fut.state == "RUNNING"
    assert fut.cancel() is True
    assert fut.state == "CANCELLED"
    with pytest.raises(asyncio.CancelledError):
        await fut
    assert await asyncio.to_thread(stopped.wait, 20)


async def test_done_task_cannot_be_cancelled(flow: WorkflowEngine) -> None:
    @flow.function_task
    async def one() -> int:
        return 1

    fut = one()
    await fut
    assert fut.cancel() is False
    assert fut.state == "DONE"
    assert fut.result() == 1


async def test_cancelling_an_awaiting_coroutine_cancels_the_task(
    local_flow: WorkflowEngine,
) -> None:
    started = threading.Event()

    @local_flow.function_task
    async def slow() -> None:
        started.set()
        await asyncio.sleep(60)

    fut = slow()
    waiter = asyncio.ensure_future(fut)
    while not started.is_set():
        await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert fut.state == "CANCELLED"
