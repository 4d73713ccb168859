"""SPEC §11: timeouts, retries and misuse under real faults.

Timeouts count running time only; at most one attempt of a call runs at any
moment; a timed-out process-pool task kills its worker and the others go on;
tasks called where they cannot run fail at the call; ``async with`` never
drops work silently. Ordering uses events and marker files; the few waits
are liveness bounds or the very durations under test (a timeout must elapse
to be tested), never assertions on speed.
"""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest

import asyncflow
from asyncflow import (
    AsyncioExecutionBackend,
    LocalExecutionBackend,
    TaskTimeoutError,
    WorkflowEngine,
)

from ..processes import alive, wait_until

LIVENESS = 30.0


def run_script(script: Path) -> subprocess.CompletedProcess[str]:
    """Run a test's script in a fresh interpreter (bounded: it must end)."""
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )


def _alive_pid(pid: int) -> bool:
    try:
        return alive(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


# -- the timeout clock counts running time only ----------------------------------


@pytest.mark.parametrize("pool", ["threads", "processes"])
async def test_a_queued_task_does_not_time_out_while_it_waits(
    make_engine, pool: str, tmp_path: Path
) -> None:
    executor = ThreadPoolExecutor(1) if pool == "threads" else ProcessPoolExecutor(1)
    flow = await WorkflowEngine.create(backend=LocalExecutionBackend(executor))
    try:
        gate = tmp_path / "gate"

        @flow.function_task
        def occupy(path: str) -> str:
            while not os.path.exists(path):  # holds the only worker
                time.sleep(0.01)
            return "released"

        @flow.function_task(timeout=0.5)
        def quick() -> str:
            return "ran"

        first = occupy(str(gate))
        queued = quick()
        # Longer than quick's timeout, spent waiting for the worker.
        await asyncio.sleep(1.5)
        assert queued.state == "RUNNING"
        gate.touch()
        assert await asyncio.wait_for(queued, LIVENESS) == "ran"
        assert await first == "released"
    finally:
        await flow.shutdown()


# -- one attempt at a time ------------------------------------------------------


async def test_a_retry_waits_until_the_timed_out_thread_returns(make_engine) -> None:
    flow = await make_engine("threads")
    lock = threading.Lock()
    running = [0]
    most = [0]
    attempts: list[int] = []

    @flow.function_task(timeout=0.3, retries=1)
    def slow_first() -> str:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            attempts.append(len(attempts) + 1)
            mine = len(attempts)
        try:
            if mine == 1:
                time.sleep(1.0)  # a blocking call: cannot be interrupted
            return f"attempt {mine}"
        finally:
            with lock:
                running[0] -= 1

    assert await asyncio.wait_for(slow_first(), LIVENESS) == "attempt 2"
    assert attempts == [1, 2]
    assert most[0] == 1


async def test_a_thread_that_never_stops_is_not_retried_beside_itself(
    make_engine,
) -> None:
    flow = await make_engine("threads")
    release = threading.Event()
    calls: list[int] = []

    @flow.function_task(timeout=0.2, retries=3)
    def stuck() -> None:
        calls.append(1)
        release.wait(LIVENESS)

    try:
        fut = stuck()
        with pytest.raises(TaskTimeoutError, match="not retried") as caught:
            await asyncio.wait_for(fut, LIVENESS)
        assert "two attempts" in str(caught.value)
        assert calls == [1]
    finally:
        release.set()


@pytest.mark.parametrize("backend", ["threads", "asyncio"])
async def test_a_command_slow_to_stop_is_never_run_twice_at_once(
    make_engine, backend: str, tmp_path: Path
) -> None:
    flow = await make_engine(backend)
    lock = tmp_path / "lock"
    log = tmp_path / "log"

    # Each attempt holds a lock directory while it runs; on SIGTERM it takes
    # a while to let go. A retry started before that would find the lock.
    script = textwrap.dedent(
        f"""
        if mkdir {lock} 2>/dev/null; then echo start >> {log}
        else echo overlap >> {log}; exit 3; fi
        trap 'sleep 1; echo stopped >> {log}; rmdir {lock}; exit 1' TERM
        n=$(grep -c start {log})
        if [ "$n" -ge 3 ]; then rmdir {lock}; echo done; exit 0; fi
        sleep 30 & wait
        """
    )

    @flow.executable_task(timeout=0.5, retries=3)
    async def guarded() -> list[str]:
        return ["sh", "-c", script]

    assert (await asyncio.wait_for(guarded(), LIVENESS)).strip() == "done"
    lines = log.read_text().split()
    assert "overlap" not in lines
    assert lines == ["start", "stopped", "start", "stopped", "start"]


async def test_a_timed_out_process_task_kills_its_worker_and_others_go_on(
    tmp_path: Path,
) -> None:
    flow = await WorkflowEngine.create(
        backend=LocalExecutionBackend(ProcessPoolExecutor(2))
    )
    try:

        @flow.function_task(timeout=1.0)
        def hang(path: str) -> None:
            Path(path).write_text(str(os.getpid()))
            time.sleep(600)

        @flow.function_task
        def other(path: str, gate: str) -> int:
            with open(path, "a") as runs:
                runs.write(f"{os.getpid()}\n")
            while not os.path.exists(gate):
                time.sleep(0.01)
            return 42

        runs = tmp_path / "runs"
        gate = tmp_path / "gate"
        hung = hang(str(tmp_path / "hang.pid"))
        survivor = other(str(runs), str(gate))
        with pytest.raises(TaskTimeoutError):
            await asyncio.wait_for(hung, LIVENESS)
        pid = int((tmp_path / "hang.pid").read_text())
        await wait_until(lambda: not _alive_pid(pid), "the hung worker to die")
        gate.touch()
        # Its worker went down with the pool: it ran again in the new one.
        assert await asyncio.wait_for(survivor, LIVENESS) == 42
        assert len(runs.read_text().split()) >= 1

        @flow.function_task
        def after() -> str:
            return "the pool still works"

        assert await asyncio.wait_for(after(), LIVENESS) == "the pool still works"
    finally:
        await flow.shutdown()


def test_a_hung_def_body_on_the_asyncio_backend_does_not_block_exit(
    tmp_path: Path,
) -> None:
    script = tmp_path / "hung.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio, time
            from asyncflow import AsyncioExecutionBackend, WorkflowEngine

            async def main():
                flow = await WorkflowEngine.create(
                    backend=AsyncioExecutionBackend(), shutdown_timeout=0.5
                )

                @flow.function_task
                def stuck():
                    time.sleep(600)

                stuck()
                await asyncio.sleep(0.2)
                await flow.shutdown()
                print("shut down", flush=True)

            asyncio.run(main())
            """
        )
    )
    done = run_script(script)
    assert done.returncode == 0, done.stderr
    assert "shut down" in done.stdout


# -- pickling errors name what could not be pickled ------------------------------


async def test_process_pool_pickling_errors_say_what_and_which_task(
    make_engine,
) -> None:
    flow = await make_engine("processes")
    lock = threading.Lock()

    @flow.function_task
    def takes(x: object) -> str:
        return "unreachable"

    @flow.function_task
    def uses_lock() -> bool:
        return lock.locked()

    @flow.function_task
    def makes_lock() -> object:
        return threading.Lock()

    with pytest.raises(TypeError, match=r"'takes'.*argument 1 \(lock\)"):
        await takes(threading.Lock())
    with pytest.raises(TypeError, match=r"'uses_lock'.*its function"):
        await uses_lock()
    with pytest.raises(TypeError, match=r"result of task 'makes_lock'"):
        await makes_lock()


# -- misuse fails at the call --------------------------------------------------------


async def test_calling_a_task_from_another_thread_raises(make_engine) -> None:
    flow = await make_engine("threads")

    @flow.function_task
    async def work() -> int:
        return 1

    errors: list[BaseException] = []

    def call() -> None:
        try:
            work()
        except BaseException as exc:
            errors.append(exc)

    await asyncio.to_thread(call)
    assert len(errors) == 1
    assert isinstance(errors[0], RuntimeError)
    assert "another thread" in str(errors[0])
    assert "@flow.block" in str(errors[0])
    assert not flow._scheduler.live


async def test_calling_a_task_on_another_event_loop_raises(make_engine) -> None:
    flow = await make_engine("threads")

    @flow.function_task
    async def work() -> int:
        return 1

    async def elsewhere() -> None:
        work()

    def run_other_loop() -> BaseException | None:
        try:
            asyncio.run(elsewhere())
        except BaseException as exc:
            return exc
        return None

    error = await asyncio.to_thread(run_other_loop)
    assert isinstance(error, RuntimeError)
    assert "another event loop" in str(error)


@pytest.mark.parametrize("backend", ["threads", "asyncio"])
async def test_calling_a_task_inside_a_plain_task_body_fails_that_task(
    make_engine, backend: str
) -> None:
    flow = await make_engine(backend)

    @flow.function_task
    async def leaf() -> int:
        return 1

    @flow.function_task
    def orchestrate() -> object:
        return leaf()

    with pytest.raises(RuntimeError, match=r"'leaf'.*@flow.block"):
        await asyncio.wait_for(orchestrate(), LIVENESS)


async def test_block_on_a_plain_function_or_lambda_raises(make_engine) -> None:
    flow = await make_engine("threads")

    def plain() -> None:
        return None

    with pytest.raises(TypeError, match=r"async def.*plain function 'plain'"):
        flow.block(plain)
    with pytest.raises(TypeError, match=r"async def.*a lambda"):
        flow.block(lambda: None)


async def test_a_task_made_from_a_partial_is_named_after_the_function(
    make_engine,
) -> None:
    flow = await make_engine("threads")

    async def scale(x: int, factor: int) -> int:
        return x * factor

    double = flow.function_task(functools.partial(scale, factor=2))
    assert double.__name__ == "scale"
    fut = double(21)
    assert fut.name == "scale"
    assert await fut == 42


def test_the_package_namespace_lists_public_names_only() -> None:
    public = dir(asyncflow)
    assert public == sorted(asyncflow.__all__)
    assert "version" not in public
    assert "PackageNotFoundError" not in public
    assert not any(name in public for name in ("engine", "tasks", "checkpoint"))


def test_the_demo_removes_its_temporary_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io
    import tempfile

    from asyncflow.demo import run_demo

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    out = io.StringIO()
    result = asyncio.run(run_demo(simulations=3, samples=1000, out=out))
    assert "pi ~" in str(result["report"])
    assert "sha256" in out.getvalue()
    assert list(tmp_path.iterdir()) == []


# -- command bodies run in call order -------------------------------------------


@pytest.mark.parametrize("backend", ["threads", "asyncio"])
async def test_an_async_command_body_runs_before_tasks_called_after_it(
    make_engine, backend: str
) -> None:
    flow = await make_engine(backend)
    events: list[str] = []

    @flow.executable_task
    async def command() -> str:
        await asyncio.sleep(0.05)  # a body that suspends, e.g. to look something up
        events.append("body")
        return "echo built"

    @flow.function_task
    def side_effect() -> None:
        events.append("side effect")

    @flow.function_task
    async def earlier() -> None:
        events.append("called earlier")

    first = earlier()
    await asyncio.sleep(0)  # the earlier call is already on its way
    results = await asyncio.wait_for(
        asyncio.gather(first, command(), side_effect()), LIVENESS
    )
    assert results[1].strip() == "built"
    assert events.index("body") < events.index("side effect")


# -- async with never drops work; shutdown says what it cancels -----------------


async def test_async_with_exit_by_exception_cancels_unawaited_tasks() -> None:
    release = threading.Event()
    holder: dict[str, Any] = {}

    async def user_code() -> None:
        async with await WorkflowEngine.create(
            backend=LocalExecutionBackend(shutdown_timeout=0.5)
        ) as flow:

            @flow.function_task
            async def waits() -> None:
                while not release.is_set():
                    await asyncio.sleep(0.01)

            holder["fut"] = waits()
            await asyncio.sleep(0)
            raise ZeroDivisionError

    try:
        with pytest.raises(ZeroDivisionError):
            await user_code()
    finally:
        release.set()
    assert holder["fut"].state == "CANCELLED"


async def test_async_with_waits_for_tasks_called_by_blocks() -> None:
    async with await WorkflowEngine.create(backend=AsyncioExecutionBackend()) as flow:

        @flow.function_task
        async def leaf(i: int) -> int:
            await asyncio.sleep(0.01)
            return i

        @flow.block
        async def fan_out(n: int) -> None:
            for i in range(n):
                leaf(i)  # never awaited by anyone

        outer = fan_out(5)
    assert outer.state == "DONE"
    assert not flow._scheduler.live


# -- results that finish during a shutdown are kept --------------------------------


async def test_a_result_finishing_during_shutdown_is_checkpointed(
    tmp_path: Path,
) -> None:
    db = tmp_path / "run.db"
    gate = threading.Event()
    started = threading.Event()
    flow = await WorkflowEngine.create(
        backend=LocalExecutionBackend(ThreadPoolExecutor(1)), checkpoint=db
    )

    # version= keeps the key when the body changes (the re-run's body below).
    @flow.function_task(version="1")
    def finishes_late(x: int) -> int:
        started.set()
        gate.wait(LIVENESS)
        return x * 2

    fut = finishes_late(21)
    await wait_until(started.is_set, "the task to start")
    stopping = asyncio.ensure_future(flow.shutdown())
    await asyncio.sleep(0)
    assert flow.is_shut_down
    gate.set()  # finishes while the backend shuts down
    await asyncio.wait_for(stopping, LIVENESS)
    assert fut.state == "DONE"
    assert fut.result() == 42

    flow = await WorkflowEngine.create(
        backend=LocalExecutionBackend(ThreadPoolExecutor(1)), checkpoint=db
    )
    try:

        @flow.function_task(version="1")
        def finishes_late(x: int) -> int:
            raise AssertionError("restored, never run again")

        again = finishes_late(21)
        assert await asyncio.wait_for(again, LIVENESS) == 42
        assert again.restored
    finally:
        await flow.shutdown()


@pytest.mark.parametrize(("ending", "status"), [("pass", 0), ("1 / 0", 1)])
def test_a_stuck_thread_of_a_user_pool_does_not_block_exit(
    tmp_path: Path, ending: str, status: int
) -> None:
    script = tmp_path / "stuck.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import asyncio, time
            from concurrent.futures import ThreadPoolExecutor
            from asyncflow import LocalExecutionBackend, WorkflowEngine

            async def main():
                backend = LocalExecutionBackend(
                    ThreadPoolExecutor(1), shutdown_timeout=0.5
                )
                flow = await WorkflowEngine.create(backend=backend)

                @flow.function_task
                def stuck():
                    time.sleep(600)

                stuck()
                await asyncio.sleep(0.2)
                await flow.shutdown()
                print("shut down", flush=True)

            asyncio.run(main())
            {ending}
            """
        )
    )
    done = run_script(script)
    assert done.returncode == status, done.stderr
    assert "shut down" in done.stdout
    assert "abandoned" in done.stderr


def test_shutdown_right_after_an_async_body_was_submitted_stops_it(
    tmp_path: Path,
) -> None:
    # The body may not have reached its worker thread when the shutdown
    # cancels it: the cancel must still reach it there.
    script = tmp_path / "race.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio
            from asyncflow import WorkflowEngine

            async def main():
                for _ in range(10):
                    flow = await WorkflowEngine.create(handle_signals=False)

                    @flow.function_task
                    async def wait_forever():
                        await asyncio.sleep(3600)

                    wait_forever()
                    await asyncio.sleep(0)
                    await flow.shutdown()
                print("all shut down", flush=True)

            asyncio.run(main())
            """
        )
    )
    done = run_script(script)
    assert done.returncode == 0, done.stderr
    assert "all shut down" in done.stdout
    assert "abandoned" not in done.stderr
    assert "running event loop" not in done.stderr


# -- found in review: each once hung a future or lied ----------------------------


@pytest.mark.parametrize("backend", ["threads", "asyncio"])
async def test_a_command_body_may_call_and_await_a_task(make_engine, backend) -> None:
    flow = await make_engine(backend)

    @flow.function_task
    async def word() -> str:
        return "hello"

    @flow.executable_task
    async def build() -> str:
        return f"echo {await word()}"

    assert (await asyncio.wait_for(build(), LIVENESS)).strip() == "hello"


async def test_a_command_body_that_never_returns_times_out_and_is_retried(
    make_engine,
) -> None:
    flow = await make_engine("asyncio")
    calls: list[int] = []

    @flow.executable_task(timeout=0.3, retries=1)
    async def build() -> str:
        calls.append(1)
        if len(calls) == 1:
            await asyncio.Event().wait()  # a lookup that never answers
        return "echo second"

    assert (await asyncio.wait_for(build(), LIVENESS)).strip() == "second"
    assert len(calls) == 2


@pytest.mark.parametrize("kind", ["command body", "asyncio body"])
async def test_a_body_raising_cancelled_error_itself_fails_its_task(
    make_engine, kind: str
) -> None:
    flow = await make_engine("asyncio")

    async def cancelled_inside() -> None:
        inner = asyncio.get_running_loop().create_future()
        inner.cancel()
        await inner

    if kind == "command body":

        @flow.executable_task
        async def task() -> str:
            await cancelled_inside()
            return "echo unreachable"

    else:

        @flow.function_task
        async def task() -> str:
            await cancelled_inside()
            return "unreachable"

    fut = task()
    with pytest.raises(RuntimeError, match="CancelledError of its own"):
        await asyncio.wait_for(fut, LIVENESS)
    assert fut.state == "FAILED"


async def test_a_report_for_an_attempt_the_engine_left_is_dropped(make_engine) -> None:
    flow = await make_engine("threads")
    gate = threading.Event()
    attempts: list[int] = []

    @flow.function_task(timeout=0.2, retries=1)
    def work() -> str:
        attempts.append(len(attempts) + 1)
        if len(attempts) == 1:
            gate.wait(LIVENESS)  # attempt 1 outlives its timeout
        return f"attempt {len(attempts)}"

    fut = work()
    await wait_until(lambda: fut.attempts == 2, "the timeout to move on")
    # A late outcome of attempt 1, as a backend would send it.
    flow._scheduler.report_threadsafe(fut, True, "stale", 1)
    await asyncio.sleep(0.05)
    assert not fut.done()
    gate.set()
    assert await asyncio.wait_for(fut, LIVENESS) == "attempt 2"


async def test_an_error_whose_message_cannot_be_shown_still_propagates(
    make_engine,
) -> None:
    flow = await make_engine("asyncio")

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise AttributeError("no message")

    @flow.function_task
    async def bad() -> None:
        raise Unprintable

    @flow.function_task
    async def after(x: object) -> None:
        return None

    @flow.function_task
    async def unrelated() -> str:
        return "fine"

    failing = bad()
    dependent = after(failing)
    other = unrelated()
    with pytest.raises(Unprintable):
        await failing
    with pytest.raises(asyncflow.DependencyFailureError, match="cannot be shown"):
        await asyncio.wait_for(dependent, LIVENESS)
    late = after(failing)  # called once the failure is known
    with pytest.raises(asyncflow.DependencyFailureError):
        await late
    assert await other == "fine"
    assert not flow._scheduler.live


async def test_task_futures_cannot_be_settled_by_hand(make_engine) -> None:
    flow = await make_engine("asyncio")

    @flow.function_task
    async def one() -> int:
        return 1

    fut = one()
    with pytest.raises(RuntimeError, match="settled by the engine"):
        fut.set_result(41)
    with pytest.raises(RuntimeError, match="settled by the engine"):
        fut.set_exception(ValueError())
    assert await fut == 1


async def test_capture_stdio_is_part_of_the_cache_key(tmp_path: Path) -> None:
    results = []
    for capture in (True, False):
        async with await WorkflowEngine.create(
            checkpoint=tmp_path / "run.db", work_dir=tmp_path, uid="fixed"
        ) as flow:

            @flow.executable_task(capture_stdio=capture)
            async def hello() -> str:
                return "echo hi"

            fut = hello()
            results.append((await fut, fut.restored))
    assert results[1] == ("hi\n", False)  # not the first run's file path


@pytest.mark.parametrize("backend", ["threads", "asyncio"])
async def test_what_a_finished_command_left_running_is_stopped_at_shutdown(
    backend: str,
) -> None:
    from ..conftest import BACKENDS

    async with await WorkflowEngine.create(backend=BACKENDS[backend]()) as flow:

        @flow.executable_task
        async def start_daemon() -> str:
            return "sleep 60 >/dev/null 2>&1 & echo $!"

        pid = int((await start_daemon()).strip())
        assert _alive_pid(pid)
    assert not _alive_pid(pid)  # gone when shutdown returned


async def test_a_failed_create_leaves_nothing_behind(tmp_path: Path) -> None:
    class Refuses(asyncflow.ExecutionBackend):
        async def attach(self, reporter: Any) -> None:
            raise OSError("cluster unreachable")

        def submit(self, tasks: Any) -> None:
            raise AssertionError("never attached")

        def cancel(self, task: Any) -> None:
            return None

        async def shutdown(self) -> None:
            return None

    pool = ThreadPoolExecutor(1)
    first = LocalExecutionBackend(pool, name="local")
    with pytest.raises(OSError, match="cluster unreachable"):
        await WorkflowEngine.create(
            backend=[first, Refuses(name="remote")],
            trace=tmp_path / "run.jsonl",
            checkpoint=tmp_path / "run.db",
        )
    assert pool._shutdown  # the backend attached before the failure
    assert first._closed
    header = (tmp_path / "run.jsonl").read_text().splitlines()
    assert len(header) == 1  # the trace was closed, with its header
