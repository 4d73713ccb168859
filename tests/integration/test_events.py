"""Task lifecycle events: subscribers, timestamps and the trace file."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import pytest

from asyncflow import (
    AsyncioExecutionBackend,
    LocalExecutionBackend,
    TaskEvent,
    WorkflowEngine,
)
from asyncflow.events import EVENT_KINDS, FINAL_KINDS
from asyncflow.observers.trace import read_trace

LIVENESS = 30.0


def by_task(events: list[TaskEvent]) -> dict[str, list[str]]:
    kinds: dict[str, list[str]] = defaultdict(list)
    for event in events:
        kinds[event.uid].append(event.kind)
    return kinds


@pytest.mark.parametrize("backend", ["threads", "processes", "asyncio"])
async def test_a_task_goes_through_every_step_in_order(make_engine, backend) -> None:
    flow = await make_engine(backend)
    seen: list[TaskEvent] = []
    flow.subscribe(seen.append)

    @flow.function_task
    def double(x: int) -> int:
        return 2 * x

    first = double(1)
    second = double(first)
    assert await second == 4
    await asyncio.sleep(0)  # events are delivered once per loop iteration
    kinds = by_task(seen)
    steps = ["created", "ready", "submitted", "started", "done"]
    assert kinds[first.uid] == steps
    assert kinds[second.uid] == steps
    created = next(e for e in seen if e.uid == second.uid and e.kind == "created")
    assert created.dependencies == (first.uid,)
    assert created.kind_of_task == "function"
    done = next(e for e in seen if e.uid == second.uid and e.kind == "done")
    assert done.attempt == 1
    assert done.backend == "default"
    assert done.duration is not None
    assert done.duration >= 0
    assert done.error is None
    for fut in (first, second):
        assert fut.submitted_at is not None
        assert fut.started_at is not None
        assert fut.finished_at is not None
        assert fut.submitted_at <= fut.started_at <= fut.finished_at
    assert {e.kind for e in seen} <= set(EVENT_KINDS)


async def test_failures_retries_cancellations_and_blocks(make_engine) -> None:
    flow = await make_engine("asyncio")
    seen: list[TaskEvent] = []
    flow.subscribe(seen.append)
    calls = [0]

    @flow.function_task(retries=2)
    async def flaky() -> str:
        calls[0] += 1
        if calls[0] < 3:
            raise ValueError(f"try {calls[0]}")
        return "ok"

    @flow.function_task
    async def broken() -> None:
        raise KeyError("missing")

    @flow.function_task
    async def after(x: object) -> None:
        return None

    @flow.function_task
    async def forever() -> None:
        await asyncio.Event().wait()

    @flow.block
    async def campaign() -> str:
        return await flaky()

    block = campaign()
    failing = broken()
    skipped = after(failing)
    stuck = forever()
    assert await block == "ok"
    with pytest.raises(KeyError):
        await failing
    await asyncio.sleep(0)
    stuck.cancel()
    await asyncio.sleep(0)
    await asyncio.sleep(0)

    kinds = by_task(seen)
    flaky_uid = next(e.uid for e in seen if e.name == "flaky")
    retried = [e for e in seen if e.uid == flaky_uid and e.kind == "retried"]
    assert [e.attempt for e in retried] == [1, 2]
    assert [str(e.error) for e in retried] == ["try 1", "try 2"]
    final = [e for e in seen if e.uid == flaky_uid and e.kind in FINAL_KINDS]
    assert [(e.kind, e.attempt) for e in final] == [("done", 3)]
    created = next(e for e in seen if e.uid == flaky_uid and e.kind == "created")
    assert created.parent == block.uid
    assert kinds[block.uid] == ["created", "ready", "started", "done"]
    assert kinds[failing.uid][-1] == "failed"
    failed = next(e for e in seen if e.uid == failing.uid and e.kind == "failed")
    assert isinstance(failed.error, KeyError)
    assert kinds[skipped.uid] == ["created", "failed"]
    assert skipped.exception() is not None  # retrieved: no "never retrieved" log
    assert kinds[stuck.uid][-1] == "cancelled"
    # Exactly one final event per task.
    for uid, steps in kinds.items():
        assert sum(kind in FINAL_KINDS for kind in steps) == 1, (uid, steps)


async def test_restored_tasks_end_with_a_restored_event(tmp_path: Path) -> None:
    db = tmp_path / "run.db"
    for run in range(2):
        seen: list[TaskEvent] = []
        async with await WorkflowEngine.create(
            backend=AsyncioExecutionBackend(), checkpoint=db
        ) as flow:
            flow.subscribe(seen.append)

            @flow.function_task
            async def square(x: int) -> int:
                return x * x

            assert await square(3) == 9
        kinds = [e.kind for e in seen]
        if run == 0:
            assert kinds[-1] == "done"
        else:
            assert kinds == ["created", "ready", "restored"]


async def test_unsubscribe_and_no_events_without_subscribers(make_engine) -> None:
    flow = await make_engine("asyncio")
    seen: list[TaskEvent] = []
    unsubscribe = flow.subscribe(seen.append)

    @flow.function_task
    async def one() -> int:
        return 1

    await one()
    await asyncio.sleep(0)
    count = len(seen)
    assert count > 0
    unsubscribe()
    await one()
    await asyncio.sleep(0)
    assert len(seen) == count
    assert not flow._scheduler.observers.active
    assert flow._scheduler.observers.pending == []


async def test_a_subscriber_that_raises_is_detached_and_the_run_goes_on(
    make_engine, caplog: pytest.LogCaptureFixture
) -> None:
    flow = await make_engine("threads")
    calls = [0]

    def bad(event: TaskEvent) -> None:
        calls[0] += 1
        raise RuntimeError("subscriber bug")

    good: list[TaskEvent] = []
    flow.subscribe(bad)
    flow.subscribe(good.append)

    @flow.function_task
    def work(i: int) -> int:
        return i

    with caplog.at_level(logging.WARNING, logger="asyncflow"):
        assert await asyncio.gather(*(work(i) for i in range(20))) == list(range(20))
        await asyncio.sleep(0)
    assert calls[0] == 1
    assert len([e for e in good if e.kind == "done"]) == 20
    assert any("detached" in r.getMessage() for r in caplog.records)


async def test_a_slow_async_subscriber_never_holds_the_run_back() -> None:
    gate = asyncio.Event()
    received: list[TaskEvent] = []

    async def slow(event: TaskEvent) -> None:
        await gate.wait()
        received.append(event)

    flow = await WorkflowEngine.create(backend=AsyncioExecutionBackend())

    @flow.function_task
    async def work(i: int) -> int:
        return i

    flow.subscribe(slow)
    results = await asyncio.wait_for(
        asyncio.gather(*(work(i) for i in range(50))), LIVENESS
    )
    assert results == list(range(50))
    assert received == []  # the run finished while the subscriber waited
    gate.set()
    await flow.shutdown()
    assert len([e for e in received if e.kind == "done"]) == 50


async def test_subscribe_rejects_what_is_not_callable(make_engine) -> None:
    flow = await make_engine("asyncio")
    with pytest.raises(TypeError, match="callable"):
        flow.subscribe("print")  # type: ignore[arg-type]


# -- the trace file ---------------------------------------------------------------


async def test_the_trace_has_a_header_and_one_line_per_event(tmp_path: Path) -> None:
    trace = tmp_path / "run.jsonl"
    seen: list[TaskEvent] = []
    calls = [0]
    async with await WorkflowEngine.create(
        backend=LocalExecutionBackend(), trace=trace
    ) as flow:
        flow.subscribe(seen.append)

        @flow.function_task(retries=1)
        def flaky(x: int) -> int:
            calls[0] += 1
            if calls[0] == 1:
                raise OSError("flaky disk")
            return x

        @flow.function_task
        def add(a: int, b: int) -> int:
            return a + b

        assert await add(flaky(1), 2) == 3
    header, events = read_trace(trace)
    assert header["format"] == "asyncflow-trace"
    assert header["version"] == 1
    assert header["engine"] == flow.uid
    assert [e["kind"] for e in events] == [e.kind for e in seen]
    assert all(set(e) == set(TaskEvent._fields) for e in events)
    retried = [e for e in events if e["kind"] == "retried"]
    assert len(retried) == 1
    assert retried[0]["error"] == "OSError: flaky disk"
    assert retried[0]["attempt"] == 1
    final = [e for e in events if e["name"] == "flaky" and e["kind"] == "done"]
    assert final[0]["attempt"] == 2
    lines = trace.read_text().splitlines()
    assert len(lines) == 1 + len(events)
    assert all(isinstance(json.loads(line), dict) for line in lines)


def test_a_crashed_run_leaves_a_trace_readable_up_to_the_last_write(
    tmp_path: Path,
) -> None:
    trace = tmp_path / "crash.jsonl"
    script = tmp_path / "crash.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import asyncio, os
            import asyncflow.observers.trace as trace_module
            from asyncflow import WorkflowEngine

            trace_module.FLUSH_EVERY = 0.05

            async def main():
                flow = await WorkflowEngine.create(trace={str(trace)!r})

                @flow.function_task
                def work(i):
                    return i

                await asyncio.gather(*(work(i) for i in range(10)))
                await asyncio.sleep(0.5)  # a few periodic writes
                os._exit(3)  # dies without shutting down

            asyncio.run(main())
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 3, done.stderr
    _, events = read_trace(trace)
    assert len([e for e in events if e["kind"] == "done"]) == 10


def test_read_trace_refuses_what_is_not_a_trace(tmp_path: Path) -> None:
    other = tmp_path / "other.jsonl"
    other.write_text('{"hello": 1}\n')
    with pytest.raises(ValueError, match="not an asyncflow trace"):
        read_trace(other)


async def test_a_subscriber_raising_cancelled_error_is_detached(
    tmp_path: Path,
) -> None:
    trace = tmp_path / "run.jsonl"
    flow = await WorkflowEngine.create(backend=AsyncioExecutionBackend(), trace=trace)
    good: list[TaskEvent] = []

    def bad(event: TaskEvent) -> None:
        raise asyncio.CancelledError

    async def bad_async(event: TaskEvent) -> None:
        raise asyncio.CancelledError

    flow.subscribe(bad)
    flow.subscribe(bad_async)
    flow.subscribe(good.append)

    @flow.function_task
    async def work(i: int) -> int:
        return i

    assert await asyncio.gather(*(work(i) for i in range(5))) == list(range(5))
    await asyncio.wait_for(flow.shutdown(), LIVENESS)
    assert len([e for e in good if e.kind == "done"]) == 5
    observers = flow._scheduler.observers
    assert bad not in observers._sync
    assert observers._async == []
    _, events = read_trace(trace)
    assert len([e for e in events if e["kind"] == "done"]) == 5


async def test_the_trace_survives_undecodable_characters(tmp_path: Path) -> None:
    trace = tmp_path / "run.jsonl"
    name = os.fsdecode(b"/data/donn\xe9es.csv")  # a surrogate escape
    async with await WorkflowEngine.create(
        backend=AsyncioExecutionBackend(), trace=trace
    ) as flow:

        @flow.function_task
        async def parse() -> None:
            raise ValueError(f"cannot parse {name}")

        @flow.function_task
        async def fine() -> int:
            return 1

        with pytest.raises(ValueError, match="cannot parse"):
            await parse()
        assert await fine() == 1
    _, events = read_trace(trace)
    failed = [e for e in events if e["kind"] == "failed"]
    assert len(failed) == 1
    assert "donn" in failed[0]["error"]
    assert len([e for e in events if e["kind"] == "done"]) == 1
