"""Retries, timeouts, checkpoints and faults (SPEC §9)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest

from asyncflow import (
    CheckpointError,
    DependencyFailureError,
    ExecutableError,
    TaskOptions,
    TaskTimeoutError,
    WorkflowEngine,
)
from asyncflow.checkpoint import CheckpointStore


class Flaky:
    """Fails the first ``failures`` calls, then returns the call count."""

    def __init__(self, failures: int, error: type[Exception] = ConnectionError) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self) -> int:
        with self.lock:
            self.calls += 1
            calls = self.calls
        if calls <= self.failures:
            raise self.error(f"flaky call {calls}")
        return calls


async def test_retries_until_success_and_counts_attempts(
    local_flow: WorkflowEngine, caplog: pytest.LogCaptureFixture
) -> None:
    flaky = Flaky(2)

    @local_flow.function_task(retries=3)
    async def fetch() -> int:
        return flaky()

    @local_flow.function_task
    async def consume(x: int) -> int:
        return x * 10

    with caplog.at_level(logging.WARNING, logger="asyncflow"):
        fut = fetch()
        assert await consume(fut) == 30
    assert fut.attempts == 3
    assert flaky.calls == 3
    retries_logged = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries_logged) == 2
    assert "fetch" in retries_logged[0].getMessage()


async def test_exhausted_retries_fail_with_the_last_error(
    local_flow: WorkflowEngine,
) -> None:
    flaky = Flaky(10)

    @local_flow.function_task(retries=2)
    def fetch() -> int:
        return flaky()

    @local_flow.function_task
    def consume(x: int) -> int:
        raise AssertionError("must not run")

    fut = fetch()
    downstream = consume(fut)
    with pytest.raises(ConnectionError, match="flaky call 3"):
        await fut
    assert fut.attempts == 3
    assert flaky.calls == 3
    with pytest.raises(DependencyFailureError):
        await downstream


async def test_retry_on_limits_which_errors_are_retried(
    local_flow: WorkflowEngine,
) -> None:
    flaky = Flaky(1, error=KeyError)

    @local_flow.function_task(retries=5, retry_on=(ConnectionError, TimeoutError))
    def fetch() -> int:
        return flaky()

    with pytest.raises(KeyError):
        await fetch()
    assert flaky.calls == 1


async def test_retry_delay_and_backoff_schedule() -> None:
    options = TaskOptions(retries=4, retry_delay=0.5, retry_backoff=3)
    assert [options.delay_before(n) for n in (2, 3, 4, 5)] == [0.5, 1.5, 4.5, 13.5]
    with pytest.raises(ValueError, match="retries"):
        TaskOptions(retries=-1)
    with pytest.raises(TypeError, match="retry_on"):
        TaskOptions(retry_on=42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        TaskOptions(timeout=0)


async def test_retry_waits_its_delay(make_engine) -> None:
    flow = await make_engine("asyncio")
    flaky = Flaky(1)

    @flow.function_task(retries=1, retry_delay=0.2)
    async def fetch() -> int:
        return flaky()

    fut = fetch()
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await fut == 2
    # Not a speed assertion: the retry must not come before its delay.
    assert loop.time() - started >= 0.2


async def test_options_override_at_call_time(local_flow: WorkflowEngine) -> None:
    flaky = Flaky(1)

    @local_flow.function_task
    def fetch() -> int:
        return flaky()

    with pytest.raises(ConnectionError):
        await fetch()
    assert await fetch.options(retries=1)() == 2  # one more failure was allowed for
    assert fetch.options(retries=1).__name__ == "fetch"


async def test_timeout_fails_the_task_and_stops_the_coroutine(
    local_flow: WorkflowEngine,
) -> None:
    stopped = threading.Event()

    @local_flow.function_task(timeout=0.2)
    async def hang() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            stopped.set()
            raise

    fut = hang()
    with pytest.raises(TaskTimeoutError, match=r"'hang' timed out after 0.2s") as info:
        await fut
    assert info.value.timeout == 0.2
    assert fut.state == "FAILED"
    assert await asyncio.to_thread(stopped.wait, 20)


async def test_timeout_then_retry_succeeds(local_flow: WorkflowEngine) -> None:
    attempts: list[int] = []

    @local_flow.function_task(timeout=0.2, retries=2)
    async def sometimes_slow() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            await asyncio.sleep(60)
        return "fast"

    fut = sometimes_slow()
    assert await fut == "fast"
    assert fut.attempts == 2


async def test_timed_out_executable_is_killed_with_its_group(
    make_engine, tmp_path: Path
) -> None:
    flow = await make_engine("threads")
    pid_file = tmp_path / "pids"

    @flow.executable_task(timeout=1)
    async def stuck() -> str:
        return f"sleep 60 & echo $! >> {pid_file}; echo $$ >> {pid_file}; wait"

    with pytest.raises(TaskTimeoutError):
        await stuck()
    pids = [int(p) for p in pid_file.read_text().split()]
    assert len(pids) == 2
    assert await asyncio.to_thread(_all_gone, pids, 20)


def _all_gone(pids: list[int], timeout: float) -> bool:
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return all(p.status() == psutil.STATUS_ZOMBIE for p in alive)


async def test_block_retries(make_engine) -> None:
    flow = await make_engine("asyncio")
    flaky = Flaky(1)

    @flow.function_task
    async def step() -> int:
        return flaky()

    @flow.block(retries=1)
    async def pipeline() -> int:
        return await step()

    fut = pipeline()
    assert await fut == 2
    assert fut.attempts == 2


async def test_executable_killed_by_signal_names_it(make_engine) -> None:
    flow = await make_engine("asyncio")

    @flow.executable_task
    async def suicide() -> str:
        return "kill -KILL $$"

    with pytest.raises(ExecutableError, match="SIGKILL") as info:
        await suicide()
    assert info.value.exit_code == -9


async def test_exception_in_done_callback_leaves_engine_working(
    make_engine,
) -> None:
    flow = await make_engine("threads")
    loop = asyncio.get_running_loop()
    reported: list[Any] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))

    @flow.function_task
    def one() -> int:
        return 1

    def bad_callback(fut: Any) -> None:
        raise RuntimeError("callback bug")

    fut = one()
    fut.add_done_callback(bad_callback)
    assert await fut == 1
    await asyncio.sleep(0)
    assert await one() == 1
    assert any("callback bug" in str(c.get("exception")) for c in reported)


# -- checkpoint --------------------------------------------------------------


async def _run_campaign(
    path: Path, ran: list[str], inputs: list[int], **engine: Any
) -> list[int]:
    async with await WorkflowEngine.create(checkpoint=path, **engine) as flow:

        @flow.function_task
        def simulate(x: int) -> int:
            ran.append(f"simulate {x}")
            return x * x

        @flow.function_task
        def total(values: list[int]) -> int:
            ran.append("total")
            return sum(values)

        @flow.executable_task
        async def label(n: int) -> str:
            return f"echo run-{n}"

        sims = [simulate(x) for x in inputs]
        out: list[int] = [await total(sims)]
        text = await label(out[0])
        ran.append(f"label {text.strip()}")
        futs = [*sims]
        assert all(f.state == "DONE" for f in futs)
        out.append(sum(f.restored for f in futs))
        return out


async def test_checkpoint_skips_finished_tasks(tmp_path: Path) -> None:
    db = tmp_path / "run.db"
    first: list[str] = []
    assert await _run_campaign(db, first, [1, 2, 3]) == [14, 0]
    assert sorted(first) == [
        "label run-14",
        "simulate 1",
        "simulate 2",
        "simulate 3",
        "total",
    ]

    again: list[str] = []
    assert await _run_campaign(db, again, [1, 2, 3]) == [14, 3]
    assert again == ["label run-14"]  # the label body is evaluated, not run

    changed: list[str] = []
    assert await _run_campaign(db, changed, [1, 2, 4]) == [21, 2]
    assert sorted(changed) == ["label run-21", "simulate 4", "total"]


async def test_checkpoint_stores_one_row_per_result(tmp_path: Path) -> None:
    db = tmp_path / "run.db"
    await _run_campaign(db, [], [5, 6])
    store = CheckpointStore(db)
    try:
        assert store.count() == 4  # two simulations, the total, the label
    finally:
        store.close()
    with sqlite3.connect(db) as conn:
        meta = dict(conn.execute("SELECT key, value FROM asyncflow_meta"))
        assert meta["format"] == "asyncflow-checkpoint"
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_cache_false_and_unpicklable_results_are_not_stored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "run.db"
    calls: list[str] = []
    for _ in range(2):
        async with await WorkflowEngine.create(checkpoint=db) as flow:

            @flow.function_task(cache=False)
            def volatile() -> int:
                calls.append("volatile")
                return 1

            @flow.function_task
            def make_lock() -> Any:
                calls.append("lock")
                return threading.Lock()

            with caplog.at_level(logging.WARNING, logger="asyncflow"):
                await volatile()
                await make_lock()
    assert calls == ["volatile", "lock"] * 2
    assert any("cannot be pickled" in r.getMessage() for r in caplog.records)


async def test_code_change_invalidates_the_cache(tmp_path: Path) -> None:
    db = tmp_path / "run.db"
    results = []
    for factor in (2, 3):
        namespace: dict[str, Any] = {}
        source = f"def scale(x):\n    return x * {factor}\n"
        path = tmp_path / f"scale_{factor}.py"
        path.write_text(source)
        exec(compile(source, str(path), "exec"), namespace)
        async with await WorkflowEngine.create(checkpoint=db) as flow:
            results.append(await flow.function_task(namespace["scale"])(10))
    assert results == [20, 30]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"this is not a database at all" * 100, "not a usable asyncflow checkpoint"),
        (None, "was not written by asyncflow"),
    ],
)
async def test_corrupt_or_foreign_checkpoint_is_refused(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    db = tmp_path / "run.db"
    if content is None:
        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TABLE asyncflow_meta (key TEXT, value TEXT)")
            conn.execute(
                "INSERT INTO asyncflow_meta VALUES ('format', 'something-else')"
            )
    else:
        db.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        await WorkflowEngine.create(checkpoint=db)


async def test_other_sqlite_file_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE users (id INTEGER)")
    with pytest.raises(CheckpointError, match="not a usable asyncflow checkpoint"):
        await WorkflowEngine.create(checkpoint=db)


async def test_dry_run_never_writes_placeholders(tmp_path: Path) -> None:
    db = tmp_path / "run.db"
    async with await WorkflowEngine.create(dry_run=True, checkpoint=db) as flow:

        @flow.function_task
        async def work() -> int:
            return 1

        await work()
    store = CheckpointStore(db)
    try:
        assert store.count() == 0
    finally:
        store.close()


async def test_timed_out_block_cancels_its_members(make_engine) -> None:
    flow = await make_engine("asyncio")
    members = []

    @flow.function_task
    async def forever() -> None:
        await asyncio.sleep(60)

    @flow.block(timeout=0.2)
    async def pipeline() -> None:
        members.append(forever())
        await members[-1]

    with pytest.raises(TaskTimeoutError, match="pipeline"):
        await pipeline()
    assert [m.state for m in members] == ["CANCELLED"]


async def test_a_failing_submit_is_retried() -> None:
    from asyncflow import AsyncioExecutionBackend, TaskFuture

    class FlakySubmit(AsyncioExecutionBackend):
        refusals = 1

        def submit(self, tasks: list[TaskFuture]) -> None:  # type: ignore[override]
            if self.refusals:
                self.refusals -= 1
                raise ConnectionError("scheduler busy")
            super().submit(tasks)

    async with await WorkflowEngine.create(backend=FlakySubmit()) as flow:

        @flow.function_task(retries=1, retry_on=ConnectionError)
        async def job() -> str:
            return "ran"

        fut = job()
        assert await fut == "ran"
        assert fut.attempts == 2
