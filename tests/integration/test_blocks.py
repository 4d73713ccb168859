"""SPEC §3 blocks: nesting, dependencies between blocks, cancellation."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from asyncflow import DependencyFailureError, WorkflowEngine


async def test_block_result_and_blocks_depending_on_blocks(
    flow: WorkflowEngine,
) -> None:
    @flow.function_task
    async def add(x: int, y: int) -> int:
        return x + y

    @flow.block
    async def pair_sum(a: int, b: int) -> int:
        return await add(add(a, b), 0)

    first = pair_sum(1, 2)
    second = pair_sum(first, 10)  # a block future as a dependency
    assert await add(second, first) == 16
    assert first.state == second.state == "DONE"
    assert first.uid.startswith("block.")


async def test_nested_blocks(flow: WorkflowEngine) -> None:
    @flow.function_task
    async def double(x: int) -> int:
        return 2 * x

    @flow.block
    async def inner(x: int) -> int:
        return await double(x)

    @flow.block
    async def outer(x: int) -> list[int]:
        return list(await asyncio.gather(inner(x), inner(x + 1)))

    assert await outer(3) == [6, 8]
    assert await outer(inner(1)) == [4, 6]  # a block future into a block


async def test_blocks_run_in_parallel(make_engine) -> None:
    flow = await make_engine("asyncio")
    arrived = {"a": asyncio.Event(), "b": asyncio.Event()}

    @flow.block
    async def meet(me: str, other: str) -> str:
        arrived[me].set()
        await asyncio.wait_for(arrived[other].wait(), 20)
        return me

    assert await asyncio.gather(meet("a", "b"), meet("b", "a")) == ["a", "b"]


async def test_cancelling_a_block_cancels_its_unfinished_members(
    make_engine,
) -> None:
    flow = await make_engine("threads")
    gate = threading.Event()
    members: list[Any] = []
    started = asyncio.Event()
    child_started = asyncio.Event()

    @flow.function_task
    def quick() -> int:
        return 1

    @flow.function_task
    def stuck() -> None:
        gate.wait(30)

    @flow.function_task
    def after(x: Any) -> None:
        raise AssertionError("must not run")

    @flow.block
    async def child() -> None:
        members.append(stuck())
        child_started.set()
        await asyncio.sleep(60)

    @flow.block
    async def parent() -> None:
        done = quick()
        await done
        members.append(done)
        running = stuck()
        members.append(running)
        members.append(after(running))
        members.append(child())
        started.set()
        await running

    blk = parent()
    await asyncio.wait_for(started.wait(), 20)
    await asyncio.wait_for(child_started.wait(), 20)
    assert blk.cancel() is True
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await blk
    assert blk.state == "CANCELLED"
    assert members[0].state == "DONE"  # finished members keep their outcome
    assert [m.state for m in members[1:]] == ["CANCELLED"] * (len(members) - 1)


async def test_block_failure_propagates_to_dependents(flow: WorkflowEngine) -> None:
    @flow.block
    async def broken() -> None:
        raise LookupError("inside block")

    @flow.function_task
    async def consumer(x: Any) -> None:
        raise AssertionError("must not run")

    fut = consumer(broken())
    with pytest.raises(DependencyFailureError) as info:
        await fut
    assert isinstance(info.value.root_cause, LookupError)
    assert info.value.failed_dependencies == ["broken"]


async def test_block_awaiting_a_failed_member_fails(flow: WorkflowEngine) -> None:
    @flow.function_task
    async def broken() -> None:
        raise OSError("disk full")

    @flow.block
    async def wrapper() -> None:
        await broken()

    blk = wrapper()
    with pytest.raises(OSError, match="disk full"):
        await blk
    assert blk.state == "FAILED"


async def test_blocks_run_in_dry_run_with_placeholder_results(make_engine) -> None:
    flow = await make_engine("noop")
    ran: list[str] = []

    @flow.function_task
    async def work() -> str:
        ran.append("work")
        return "real"

    @flow.block
    async def orchestrate() -> list[str]:
        ran.append("block")
        return [await work(), await work()]

    from asyncflow import DRY_RUN_RESULT

    assert await orchestrate() == [DRY_RUN_RESULT, DRY_RUN_RESULT]
    assert ran == ["block"]
