"""Dry runs: the default keeps the state guide's PENDING-at-call promise;
``NoopExecutionBackend(eager=True)`` ends tasks at their call."""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

import pytest

from asyncflow import (
    DRY_RUN_RESULT,
    DependencyFailureError,
    NoopExecutionBackend,
    TaskEvent,
    WorkflowEngine,
)


async def eager_engine(**kwargs: Any) -> WorkflowEngine:
    return await WorkflowEngine.create(
        backend=NoopExecutionBackend(eager=True), **kwargs
    )


class Payload:
    """An argument whose lifetime the tests watch."""


async def test_default_dry_run_task_is_pending_at_its_call() -> None:
    async with await WorkflowEngine.create(dry_run=True) as flow:

        @flow.function_task
        def step(*upstream: object) -> None:
            return None

        first = step()
        second = step(first)
        assert (first.state, second.state) == ("PENDING", "PENDING")
        assert second.dependencies == (first,)
        assert await second == DRY_RUN_RESULT


async def test_eager_task_is_done_at_its_call_and_drops_its_arguments() -> None:
    flow = await eager_engine()
    try:

        @flow.function_task
        def step(*upstream: object) -> None:
            raise AssertionError("a dry run never calls a function body")

        payload = Payload()
        watched = weakref.ref(payload)
        first = step(payload)
        second = step(first, first, payload)
        del payload
        gc.collect()
        assert watched() is None  # nothing kept it
        for future in (first, second):
            assert future.state == "DONE"
            assert future.done()
            assert future.result() == DRY_RUN_RESULT
            assert future.dependencies == ()
            assert future.attempts == 1
            assert future.finished_at is not None
        assert second.cancel() is False
        assert second.uid == "task.000002"
    finally:
        await flow.shutdown()


async def test_eager_graph_is_never_held_in_memory() -> None:
    flow = await eager_engine()
    try:

        @flow.function_task
        def step(*upstream: object) -> None:
            return None

        layer = [step() for _ in range(10)]
        first = weakref.ref(layer[0])
        for _ in range(500):
            layer = [step(layer[i], layer[(i + 1) % 10]) for i in range(10)]
        gc.collect()
        assert first() is None  # the first layer went while the last lives
        assert all(f.state == "DONE" for f in layer)
        assert await asyncio.gather(*layer) == [DRY_RUN_RESULT] * 10
    finally:
        await flow.shutdown()


async def test_eager_task_with_a_failed_dependency_fails_with_its_cause() -> None:
    flow = await eager_engine()
    try:

        @flow.executable_task
        def broken() -> str:
            raise OSError("no such input")

        @flow.function_task
        def after(upstream: object) -> None:
            return None

        failed = broken()
        assert failed.state == "PENDING"  # command bodies are evaluated later
        with pytest.raises(OSError, match="no such input"):
            await failed
        child = after(failed)
        assert child.state == "FAILED"
        with pytest.raises(DependencyFailureError) as caught:
            await child
        assert isinstance(caught.value.root_cause, OSError)
    finally:
        await flow.shutdown()


@pytest.mark.parametrize("body_started", [False, True])
async def test_eager_tasks_wait_for_a_command_body_called_before_them(
    body_started: bool,
) -> None:
    flow = await eager_engine()
    try:
        release = asyncio.Event()
        order: list[str] = []

        @flow.executable_task
        async def command() -> str:
            await release.wait()
            order.append("body")
            return "true"

        @flow.function_task
        def step() -> None:
            return None

        first = command()
        if body_started:
            await asyncio.sleep(0)  # the body starts and waits
        second = step()
        assert second.state == "PENDING"
        second.add_done_callback(lambda _: order.append("step"))
        release.set()
        assert await asyncio.gather(first, second) == [DRY_RUN_RESULT] * 2
        assert order == ["body", "step"]
    finally:
        await flow.shutdown()


async def test_eager_run_that_is_watched_sends_every_event() -> None:
    flow = await eager_engine()
    try:
        events: list[TaskEvent] = []
        flow.subscribe(events.append)

        @flow.function_task
        def step(*upstream: object) -> None:
            return None

        first = step()
        second = step(first)
        assert (first.state, second.state) == ("PENDING", "PENDING")
        await second
        await asyncio.sleep(0)  # events go out once per loop iteration
        for future in (first, second):
            kinds = [e.kind for e in events if e.uid == future.uid]
            assert kinds == ["created", "ready", "submitted", "done"]
    finally:
        await flow.shutdown()


async def test_eager_tasks_called_in_a_block_end_at_their_call() -> None:
    flow = await eager_engine()
    try:

        @flow.function_task
        def step(*upstream: object) -> None:
            return None

        @flow.block
        async def stage() -> list[str]:
            first = step()
            second = step(first)
            return [first.state, second.state]

        assert await stage() == ["DONE", "DONE"]
    finally:
        await flow.shutdown()


@pytest.mark.parametrize("value", [1, "yes", None])
def test_eager_must_be_a_bool(value: object) -> None:
    with pytest.raises(TypeError, match="eager must be True or False"):
        NoopExecutionBackend(eager=value)  # type: ignore[arg-type]
