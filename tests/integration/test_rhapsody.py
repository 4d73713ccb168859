"""SPEC §6: RHAPSODY backends plug in unchanged."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from asyncflow import (
    DependencyFailureError,
    ExecutableError,
    RhapsodyBackend,
    WorkflowEngine,
)

rhapsody = pytest.importorskip("rhapsody.backends")


async def _concurrent_backend():
    return await rhapsody.ConcurrentExecutionBackend(ThreadPoolExecutor(4))


async def test_rhapsody_backend_runs_a_workflow() -> None:
    inner = await _concurrent_backend()
    async with await WorkflowEngine.create(backend=inner) as flow:
        assert isinstance(flow.backend, RhapsodyBackend)
        assert flow.backend.inner is inner

        @flow.function_task
        async def square(x: int) -> int:
            return x * x

        @flow.function_task
        def total(values: list[int]) -> int:
            return sum(values)

        @flow.executable_task
        async def shout(n: int) -> str:
            return f"echo total=$(( {n} + 0 ))"

        @flow.executable_task
        async def argv(n: int, task_description={"shell": False}) -> str:  # noqa: B006
            return f"echo literal $HOME {n}"

        result = total([square(i) for i in range(10)])
        assert (await shout(result)).strip() == "total=285"
        assert (await argv(1)).strip() == "literal $HOME 1"


async def test_rhapsody_failures_map_to_asyncflow_errors() -> None:
    async with await WorkflowEngine.create(backend=await _concurrent_backend()) as flow:

        @flow.function_task
        async def broken() -> None:
            raise ValueError("inside rhapsody")

        @flow.function_task
        async def after(x: object) -> None:
            pass

        @flow.executable_task
        async def failing() -> str:
            return "echo out; echo err >&2; exit 3"

        with pytest.raises(DependencyFailureError) as info:
            await after(broken())
        assert isinstance(info.value.root_cause, ValueError)
        with pytest.raises(ExecutableError, match="code 3") as exe:
            await failing()
        assert exe.value.stderr.strip() == "err"


async def test_rhapsody_backend_cancel_and_shutdown() -> None:
    inner = await _concurrent_backend()
    flow = await WorkflowEngine.create(backend=inner)

    gate = threading.Event()

    @flow.function_task
    def slow() -> None:
        gate.wait(30)

    fut = slow()
    await asyncio.sleep(0)
    assert fut.state == "RUNNING"
    assert fut.cancel()
    assert fut.state == "CANCELLED"
    with pytest.raises(asyncio.CancelledError):
        await fut
    # RHAPSODY's concurrent backend joins its pool synchronously on shutdown.
    gate.set()
    await flow.shutdown()


async def test_rhapsody_backend_runs_argument_lists_without_a_shell() -> None:
    async with await WorkflowEngine.create(backend=await _concurrent_backend()) as flow:

        @flow.executable_task
        async def argv(word: str) -> list[str]:
            return ["echo", word, "$HOME", "a;b"]

        assert await argv("two words") == "two words $HOME a;b\n"


async def test_rhapsody_retry_runs_under_a_new_uid() -> None:
    inner = await _concurrent_backend()
    seen: list[str] = []
    submit = inner.submit_tasks

    async def recording(tasks: list[dict]) -> object:
        seen.extend(t["uid"] for t in tasks)
        return await submit(tasks)

    inner.submit_tasks = recording
    async with await WorkflowEngine.create(backend=inner) as flow:
        calls: list[int] = []

        @flow.function_task(retries=1)
        def flaky() -> str:
            calls.append(1)
            if len(calls) == 1:
                raise ValueError("first attempt fails")
            return "ok"

        fut = flaky()
        assert await fut == "ok"
    # The inner backend never sees one uid twice: a late report of an
    # abandoned attempt cannot pass for the current one.
    assert seen == [fut.uid, f"{fut.uid}.2"]
