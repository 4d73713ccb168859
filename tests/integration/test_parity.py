"""SPEC §8: workflow scopes, call-time workflow ids, captured stdio."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from asyncflow import ExecutableError, WorkflowEngine


async def test_workflow_scope_tags_tasks_and_blocks(make_engine) -> None:
    flow = await make_engine("asyncio")

    @flow.function_task
    async def work() -> None:
        pass

    @flow.block
    async def pipeline() -> list[str | None]:
        inner = work()
        await inner
        return [inner.workflow_id]

    outside = work()
    async with flow.workflow_scope() as auto:
        tagged = work()
        explicit = work(workflow_id="override")
        blk = pipeline()
        async with flow.workflow_scope("nested") as nested:
            deeper = work()
    after = work()

    assert re.fullmatch(r"wf-[0-9a-f]{8}", auto)
    assert nested == "nested"
    assert outside.workflow_id is None
    assert after.workflow_id is None
    assert tagged.workflow_id == auto
    assert explicit.workflow_id == "override"
    assert deeper.workflow_id == "nested"
    assert blk.workflow_id == auto
    assert await blk == [auto]  # tasks of a block inherit its workflow id
    await asyncio.gather(outside, tagged, explicit, deeper, after)


async def test_workflow_scopes_are_per_engine(make_engine) -> None:
    first = await make_engine("noop")
    second = await make_engine("noop")

    @second.function_task
    async def other() -> None:
        pass

    async with first.workflow_scope("only-first"):
        fut = other()
    assert fut.workflow_id is None
    await fut


async def test_capture_stdio_writes_files_under_work_dir(
    make_engine, tmp_path: Path
) -> None:
    flow = await make_engine("threads", work_dir=tmp_path, uid="campaign-1")

    @flow.executable_task(capture_stdio=True)
    async def shout(word: str) -> str:
        return f"echo {word}; echo warn-{word} >&2"

    @flow.executable_task(capture_stdio=True)
    async def broken() -> str:
        return "echo partial; echo oops >&2; exit 4"

    fut = shout("hello")
    path = Path(await fut)
    assert path == tmp_path / "campaign-1" / f"{fut.uid}-{flow.run_id}.out"
    assert path.read_text() == "hello\n"
    assert path.with_suffix(".err").read_text() == "warn-hello\n"

    with pytest.raises(ExecutableError, match="code 4") as info:
        await broken()
    assert info.value.stdout == "partial\n"
    assert info.value.stderr == "oops\n"


async def test_capture_stdio_only_for_executables(make_engine) -> None:
    flow = await make_engine("noop")
    with pytest.raises(TypeError, match="executable_task"):
        flow.function_task(capture_stdio=True)
    assert isinstance(flow, WorkflowEngine)
