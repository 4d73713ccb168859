"""Dry runs: the default keeps the state guide's PENDING-at-call promise;
``NoopExecutionBackend(eager=True)`` ends tasks at their call."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator

import pytest

from asyncflow import (
    DRY_RUN_RESULT,
    DependencyFailureError,
    NoopExecutionBackend,
    TaskEvent,
    WorkflowEngine,
)
from asyncflow.engine import Task


@pytest.fixture
async def flow() -> AsyncIterator[WorkflowEngine]:
    """An engine on ``NoopExecutionBackend(eager=True)``."""
    engine = await WorkflowEngine.create(backend=NoopExecutionBackend(eager=True))
    yield engine
    await engine.shutdown()


def steps(flow: WorkflowEngine) -> Task:
    """A function task taking any futures, whose body a dry run never calls."""

    @flow.function_task
    def step(*upstream: object) -> None:
        raise AssertionError("a dry run never calls a function body")

    return step


class Payload:
    """An argument whose lifetime the tests watch."""


async def test_default_dry_run_task_is_pending_at_its_call() -> None:
    async with await WorkflowEngine.create(dry_run=True) as flow:
        step = steps(flow)
        first = step()
        second = step(first)
        assert (first.state, second.state) == ("PENDING", "PENDING")
        assert second.dependencies == (first,)
        assert await second == DRY_RUN_RESULT


async def test_eager_task_is_done_at_its_call_and_drops_its_arguments(
    flow: WorkflowEngine,
) -> None:
    step = steps(flow)
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


async def test_eager_graph_is_never_held_in_memory(flow: WorkflowEngine) -> None:
    step = steps(flow)
    layer = [step() for _ in range(10)]
    first = weakref.ref(layer[0])
    for _ in range(500):
        layer = [step(layer[i], layer[(i + 1) % 10]) for i in range(10)]
    gc.collect()
    assert first() is None  # the first layer went while the last lives
    assert all(f.state == "DONE" for f in layer)
    assert await asyncio.gather(*layer) == [DRY_RUN_RESULT] * 10


async def test_eager_task_with_a_failed_dependency_fails_with_its_cause(
    flow: WorkflowEngine,
) -> None:
    @flow.executable_task
    def broken() -> str:
        raise OSError("no such input")

    failed = broken()
    assert failed.state == "PENDING"  # command bodies are evaluated later
    with pytest.raises(OSError, match="no such input"):
        await failed
    child = steps(flow)(failed)
    assert child.state == "FAILED"
    with pytest.raises(DependencyFailureError) as caught:
        await child
    assert isinstance(caught.value.root_cause, OSError)


@pytest.mark.parametrize("body_started", [False, True])
async def test_eager_tasks_wait_for_a_command_body_called_before_them(
    flow: WorkflowEngine, body_started: bool
) -> None:
    release = asyncio.Event()
    order: list[str] = []

    @flow.executable_task
    async def command() -> str:
        await release.wait()
        order.append("body")
        return "true"

    first = command()
    if body_started:
        await asyncio.sleep(0)  # the body starts and waits
    second = steps(flow)()
    assert second.state == "PENDING"
    second.add_done_callback(lambda _: order.append("step"))
    release.set()
    assert await asyncio.gather(first, second) == [DRY_RUN_RESULT] * 2
    assert order == ["body", "step"]


async def test_eager_run_that_is_watched_sends_every_event(
    flow: WorkflowEngine,
) -> None:
    events: list[TaskEvent] = []
    flow.subscribe(events.append)
    step = steps(flow)
    first = step()
    second = step(first)
    assert (first.state, second.state) == ("PENDING", "PENDING")
    await second
    await asyncio.sleep(0)  # events go out once per loop iteration
    for future in (first, second):
        kinds = [e.kind for e in events if e.uid == future.uid]
        assert kinds == ["created", "ready", "submitted", "done"]


async def test_eager_tasks_called_in_a_block_end_at_their_call(
    flow: WorkflowEngine,
) -> None:
    step = steps(flow)

    @flow.block
    async def stage() -> list[str]:
        first = step()
        second = step(first)
        return [first.state, second.state]

    assert await stage() == ["DONE", "DONE"]


@pytest.mark.parametrize("value", [1, "yes", None])
def test_eager_must_be_a_bool(value: object) -> None:
    with pytest.raises(TypeError, match="eager must be True or False"):
        NoopExecutionBackend(eager=value)  # type: ignore[arg-type]
