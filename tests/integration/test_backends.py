"""SPEC §6 backends: where bodies run, routing, custom backends, crashes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from asyncflow import (
    DRY_RUN_RESULT,
    AsyncioExecutionBackend,
    ExecutionBackend,
    LocalExecutionBackend,
    NoopExecutionBackend,
    TaskFuture,
    WorkerLostError,
    WorkflowEngine,
)
from asyncflow.backends import DRY_RUN_PROMPT_RESULT


async def test_default_backend_is_a_thread_pool() -> None:
    async with await WorkflowEngine.create() as flow:
        assert isinstance(flow.backend, LocalExecutionBackend)
        assert not flow.backend.processes

        @flow.function_task
        def where() -> str:
            return threading.current_thread().name

        assert await where() != threading.current_thread().name


async def test_dry_run_without_backend_runs_nothing() -> None:
    ran: list[str] = []
    async with await WorkflowEngine.create(dry_run=True) as flow:
        assert isinstance(flow.backend, NoopExecutionBackend)

        @flow.function_task
        async def compute() -> int:
            ran.append("compute")
            return 1

        @flow.executable_task
        async def command() -> str:
            ran.append("command body")
            return "exit 3"

        assert await compute() == DRY_RUN_RESULT
        assert await command() == DRY_RUN_RESULT
    assert ran == ["command body"]


async def test_thread_backend_runs_async_bodies_on_a_long_lived_worker_loop(
    make_engine,
) -> None:
    flow = await make_engine("threads")
    main_loop = asyncio.get_running_loop()

    @flow.function_task
    async def loop_identity() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        assert loop is not main_loop
        return threading.get_ident(), id(loop)

    seen = await asyncio.gather(*(loop_identity() for _ in range(40)))
    loops_per_thread: dict[int, set[int]] = {}
    for thread, loop in seen:
        loops_per_thread.setdefault(thread, set()).add(loop)
    assert all(len(loops) == 1 for loops in loops_per_thread.values())


async def test_asyncio_backend_runs_bodies_on_the_engine_loop(make_engine) -> None:
    flow = await make_engine("asyncio")

    @flow.function_task
    async def on_loop() -> bool:
        return asyncio.get_running_loop() is flow.loop

    @flow.function_task
    def sync_body() -> bool:
        return threading.current_thread() is threading.main_thread()

    assert await on_loop() is True
    assert await sync_body() is False  # plain functions go to a thread


async def test_asyncio_backend_runs_ten_thousand_io_tasks(make_engine) -> None:
    flow = await make_engine("asyncio")

    @flow.function_task
    async def io(i: int) -> int:
        await asyncio.sleep(0.01)
        return i

    results = await asyncio.gather(*(io(i) for i in range(10_000)))
    assert results == list(range(10_000))


async def test_process_pool_runs_in_other_processes(make_engine) -> None:
    flow = await make_engine("processes")

    @flow.function_task
    def pid() -> int:
        return os.getpid()

    @flow.function_task
    async def async_pid() -> int:
        await asyncio.sleep(0)
        return os.getpid()

    pids = set(await asyncio.gather(pid(), async_pid(), pid()))
    assert os.getpid() not in pids


def test_closures_and_lambdas_from_main_run_in_processes(tmp_path: Path) -> None:
    script = tmp_path / "main_script.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio
            from concurrent.futures import ProcessPoolExecutor
            from asyncflow import LocalExecutionBackend, WorkflowEngine

            async def main():
                backend = await LocalExecutionBackend(ProcessPoolExecutor(2))
                async with await WorkflowEngine.create(backend=backend) as flow:
                    factor = 7
                    scale = lambda x: x * factor
                    times = flow.function_task(lambda x: scale(x))

                    @flow.function_task
                    async def plus(x, y):
                        return scale(x) + y

                    print(await plus(times(2), 1))

            asyncio.run(main())
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(2 * 7 * 7 + 1)


async def test_routing_by_backend_name(make_engine) -> None:
    gpu = LocalExecutionBackend(ThreadPoolExecutor(1, thread_name_prefix="gpu"), "gpu")
    flow = await WorkflowEngine.create(
        backend=[
            LocalExecutionBackend(ThreadPoolExecutor(2, thread_name_prefix="cpu")),
            gpu,
        ]
    )
    try:

        @flow.function_task
        def on_default() -> str:
            return threading.current_thread().name

        @flow.function_task(backend="gpu")
        def on_gpu() -> str:
            return threading.current_thread().name

        assert (await on_default()).startswith("cpu")
        assert (await on_gpu()).startswith("gpu")
        assert flow.backends["gpu"] is gpu
        with pytest.raises(ValueError, match=r"'tpu'.*'default', 'gpu'"):
            flow.function_task(backend="tpu")
    finally:
        await flow.shutdown()


class RecordingBackend(ExecutionBackend):
    """A minimal third-party backend: runs bodies in its own thread."""

    def __init__(self, name: str = "default") -> None:
        super().__init__(name)
        self.batches: list[int] = []
        self.cancelled: list[str] = []
        self.closed = False

    def submit(self, tasks: Sequence[TaskFuture]) -> None:
        self.batches.append(len(tasks))
        report = self.reporter.report_threadsafe

        def work() -> None:
            for task in tasks:
                try:
                    value = task.function(*task.args, **task.kwargs)
                except Exception as exc:
                    report(task, False, exc)
                else:
                    report(task, True, value)

        threading.Thread(target=work).start()

    def cancel(self, task: TaskFuture) -> None:
        self.cancelled.append(task.uid)

    async def shutdown(self) -> None:
        self.closed = True


async def test_a_custom_backend_plugs_in_and_gets_batches() -> None:
    backend = RecordingBackend()
    flow = await WorkflowEngine.create(backend=backend)

    @flow.function_task
    def inc(x: int) -> int:
        return x + 1

    @flow.function_task
    def fail() -> None:
        raise ArithmeticError("custom")

    results = await asyncio.gather(*(inc(i) for i in range(100)))
    assert results == list(range(1, 101))
    assert backend.batches[0] == 100  # one submit call for the whole fan-out
    with pytest.raises(ArithmeticError):
        await fail()
    await flow.shutdown()
    assert backend.closed


class RefusingBackend(RecordingBackend):
    def submit(self, tasks: Sequence[TaskFuture]) -> None:
        raise ConnectionError("cluster unreachable")


async def test_a_backend_whose_submit_raises_fails_only_its_tasks() -> None:
    flow = await WorkflowEngine.create(
        backend=[AsyncioExecutionBackend(), RefusingBackend("remote")]
    )
    try:

        @flow.function_task(backend="remote")
        async def remote() -> None:
            pass

        @flow.function_task
        async def local() -> str:
            return "fine"

        bad, good = remote(), local()
        with pytest.raises(ConnectionError, match="unreachable"):
            await bad
        assert bad.state == "FAILED"
        assert await good == "fine"
        assert await local() == "fine"
    finally:
        await flow.shutdown()


async def test_prompt_tasks(make_engine) -> None:
    dry = await make_engine("noop")
    local = await make_engine("threads")
    for flow in (dry, local):

        @flow.prompt_task
        async def ask(topic: str) -> str:
            return f"Summarise {topic}"

        @flow.prompt_task
        async def empty() -> str:
            return ""

        fut = ask("asyncio")
        if flow is dry:
            assert await fut == DRY_RUN_PROMPT_RESULT == "Dummy Prompt Output"
            assert fut.command == "Summarise asyncio"
            with pytest.raises(ValueError, match="'empty'"):
                await empty()
        else:
            # Refused before the body is evaluated: no backend here can answer.
            for refused in (fut, empty()):
                with pytest.raises(NotImplementedError, match="prompt task"):
                    await refused


async def test_killed_worker_process_leaves_no_future_unfinished() -> None:
    flow = await WorkflowEngine.create(
        backend=LocalExecutionBackend(ProcessPoolExecutor(2))
    )
    try:

        @flow.function_task
        def die() -> None:
            os._exit(9)

        @flow.function_task
        def work(x: int) -> int:
            return x

        @flow.function_task
        def after(x: Any) -> Any:
            return x

        futs = [die(), *(work(i) for i in range(6))]
        futs.append(after(futs[0]))
        await asyncio.wait(futs, timeout=60)
        assert all(f.done() for f in futs)
        assert futs[0].state == "FAILED"
        assert futs[-1].state == "FAILED"
        assert {f.state for f in futs} <= {"DONE", "FAILED"}
        assert isinstance(futs[0].exception(), WorkerLostError)
        # The backend replaced the broken pool: later tasks run.
        assert await asyncio.gather(*(work(i) for i in range(4))) == [0, 1, 2, 3]
    finally:
        await flow.shutdown()


async def test_a_signal_to_a_pool_worker_does_not_reach_the_engine() -> None:
    """Forked workers must not share the engine's signal wakeup channel."""
    flow = await WorkflowEngine.create(
        backend=LocalExecutionBackend(ProcessPoolExecutor(1))
    )
    try:

        @flow.function_task
        def terminate_myself() -> None:
            import signal

            os.kill(os.getpid(), signal.SIGTERM)

        with pytest.raises(WorkerLostError, match="terminate_myself"):
            await terminate_myself()
        await asyncio.sleep(0.2)  # give a stray wakeup byte time to arrive
        assert not flow.is_shut_down
    finally:
        await flow.shutdown()
