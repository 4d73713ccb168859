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
from typing import Any

import pytest

from asyncflow import (
    AsyncioExecutionBackend,
    LocalExecutionBackend,
    TaskEvent,
    WorkflowEngine,
)
from asyncflow.errors import DependencyFailureError
from asyncflow.events import EVENT_KINDS, FINAL_KINDS
from asyncflow.observers import trace as trace_module
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


def as_written(event: TaskEvent) -> dict[str, Any]:
    """What a trace line should say of a subscriber's event: its fields,
    errors as text, times and durations to the microsecond (see below)."""
    error = event.error
    if isinstance(error, BaseException):
        error = f"{type(error).__name__}: {error}"
    written = event._asdict()
    written.update(error=error, dependencies=list(event.dependencies))
    return written


def assert_same_events(read: list[dict[str, Any]], seen: list[TaskEvent]) -> None:
    assert len(read) == len(seen)
    for got, event in zip(read, seen, strict=True):
        want = as_written(event)
        assert set(got) == set(TaskEvent._fields)
        # Written as whole microseconds: at most 1 us off (plus float noise).
        assert abs(float(got.pop("time")) - float(want.pop("time"))) < 2e-6
        got_duration, want_duration = got.pop("duration"), want.pop("duration")
        if want_duration is None:
            assert got_duration is None
        else:
            assert abs(float(got_duration) - float(want_duration)) < 2e-6
        assert got == want


async def test_the_trace_holds_every_event_the_subscribers_see(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small lines, so that the run spreads over many of them, each with its
    # own mix of columns (shared names, lists of them, left-out ones).
    monkeypatch.setattr(trace_module, "LINE_EVENTS", 5)
    trace = tmp_path / "run.jsonl"
    seen: list[TaskEvent] = []
    calls = [0]
    async with await WorkflowEngine.create(
        backend=AsyncioExecutionBackend(), trace=trace
    ) as flow:
        flow.subscribe(seen.append)

        @flow.function_task(retries=1)
        async def flaky(x: int) -> int:
            calls[0] += 1
            if calls[0] == 1:
                raise OSError("flaky disk")
            return x

        @flow.function_task
        async def add(a: int, b: int) -> int:
            return a + b

        @flow.function_task
        async def broken() -> None:
            raise KeyError("missing")

        @flow.function_task
        async def forever() -> None:
            await asyncio.Event().wait()

        @flow.block
        async def campaign(n: int) -> int:
            return await add(flaky(n), n)

        async with flow.workflow_scope("wf-trace"):
            assert await add(flaky(1), 2) == 3
            assert await campaign(4) == 8
        failing = broken()
        skipped = add(failing, 1)
        stuck = forever()
        with pytest.raises(KeyError):
            await failing
        with pytest.raises(DependencyFailureError):
            await skipped
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck
    header, events = read_trace(trace)
    assert header["format"] == "asyncflow-trace"
    assert header["version"] == 2
    assert header["engine"] == flow.uid
    assert_same_events(events, seen)
    kinds = {e["kind"] for e in events}
    assert kinds >= {"created", "ready", "retried", "done", "failed", "cancelled"}
    assert any(e["parent"] for e in events)
    assert any(e["dependencies"] for e in events)
    assert any(e["workflow_id"] == "wf-trace" for e in events)
    retried = [e for e in events if e["kind"] == "retried"]
    assert [(e["attempt"], e["error"]) for e in retried] == [(1, "OSError: flaky disk")]
    final = [e for e in events if e["name"] == "flaky" and e["kind"] == "done"]
    assert [e["attempt"] for e in final] == [2, 1]
    # Columns, at most LINE_EVENTS events a line.
    lines = [json.loads(line) for line in trace.read_text().splitlines()[1:]]
    assert len(lines) > 1
    assert all(0 < len(line["kind"]) <= 5 for line in lines)
    assert sum(len(line["kind"]) for line in lines) == len(events)


async def test_a_trace_of_thousands_of_tasks_reads_back_whole(tmp_path: Path) -> None:
    trace = tmp_path / "run.jsonl"
    seen: list[TaskEvent] = []
    async with await WorkflowEngine.create(
        backend=LocalExecutionBackend(), trace=trace
    ) as flow:
        flow.subscribe(seen.append)

        @flow.function_task
        def noop(i: int) -> int:
            return i

        assert await asyncio.gather(*(noop(i) for i in range(3000))) == list(
            range(3000)
        )
    _, events = read_trace(trace)
    assert_same_events(events, seen)
    assert sum(e["kind"] == "done" for e in events) == 3000
    assert (
        len(trace.read_text().splitlines()) > 1 + 5 * 3000 // trace_module.LINE_EVENTS
    )


async def test_restored_tasks_are_traced(tmp_path: Path) -> None:
    db = tmp_path / "run.db"
    for run in range(2):
        trace = tmp_path / f"run{run}.jsonl"
        seen: list[TaskEvent] = []
        async with await WorkflowEngine.create(
            backend=AsyncioExecutionBackend(), checkpoint=db, trace=trace
        ) as flow:
            flow.subscribe(seen.append)

            @flow.function_task
            async def square(x: int) -> int:
                return x * x

            assert await square(3) == 9
        _, events = read_trace(trace)
        assert_same_events(events, seen)
    assert [e["kind"] for e in events] == ["created", "ready", "restored"]


def test_read_trace_reads_version_1(tmp_path: Path) -> None:
    trace = tmp_path / "old.jsonl"
    event = {
        "uid": "task.000001",
        "name": "square",
        "backend": "default",
        "workflow_id": None,
        "kind": "done",
        "time": 1750000000.25,
        "attempt": 1,
        "duration": 0.5,
        "error": None,
        "parent": None,
        "dependencies": [],
        "kind_of_task": None,
    }
    header = {"format": "asyncflow-trace", "version": 1, "started": 1750000000.0}
    trace.write_text(f"{json.dumps(header)}\n{json.dumps(event)}\n")
    assert read_trace(trace) == (header, [event])


async def test_read_trace_skips_a_cut_off_last_line(tmp_path: Path) -> None:
    trace = tmp_path / "run.jsonl"
    async with await WorkflowEngine.create(
        backend=AsyncioExecutionBackend(), trace=trace
    ) as flow:

        @flow.function_task
        async def one() -> int:
            return 1

        assert await one() == 1
    whole = read_trace(trace)
    text = trace.read_text()
    with open(trace, "a", encoding="utf-8") as file:
        file.write(text.splitlines()[-1][:20])  # a write cut short by a crash
    assert read_trace(trace) == whole


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
    header = '{"format": "asyncflow-trace", "version": %s}\n'
    newer = tmp_path / "newer.jsonl"
    newer.write_text(header % 3)
    with pytest.raises(ValueError, match="version 3"):
        read_trace(newer)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(
        header % 2 + '{"kind": ["created", "ready"], "time": [1], "uid": ["a"], '
        '"attempt": [0, 0]}\n'
    )
    with pytest.raises(ValueError, match="line 2"):
        read_trace(broken)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        read_trace(empty)


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
