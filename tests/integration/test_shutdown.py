"""SPEC §2: shutting an engine down.

Every test here orders events with markers (threading events, PID files),
never with sleeps, and never asserts on speed: bounds such as
``asyncio.wait_for(..., 20)`` are liveness checks ("it does not hang"), far
above what a healthy run needs. Every process a test starts is recorded and
killed at teardown, whether the test passed or not.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest

from asyncflow import (
    AsyncioExecutionBackend,
    ExecutionBackend,
    LocalExecutionBackend,
    NoopExecutionBackend,
    TaskFuture,
    WorkflowEngine,
)

from ..processes import alive, carrying, group_of, wait_until

#: Generous liveness bound for anything that must merely "finish".
LIVENESS = 20.0

# -- helpers -------------------------------------------------------------------


async def wait_gone(
    procs: list[psutil.Process], what: str, bound: float = LIVENESS
) -> None:
    await wait_until(lambda: not any(alive(p) for p in procs), what, bound)


def pid_files_ready(directory: Path, count: int) -> bool:
    return len(list(directory.glob("*.pid"))) >= count


def processes_from(directory: Path) -> list[psutil.Process]:
    """The processes whose PIDs were written to ``directory``, with their groups."""
    procs: dict[int, psutil.Process] = {}
    for path in sorted(directory.glob("*.pid")):
        pid = int(path.read_text())
        try:
            procs.setdefault(pid, psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
        for member in group_of(pid):
            procs.setdefault(member.pid, member)
    return list(procs.values())


def sleeps_in_group(leader: int) -> int:
    count = 0
    for proc in group_of(leader):
        try:
            count += proc.name() == "sleep"
        except psutil.NoSuchProcess:
            pass
    return count


def write_pid(directory: Path, name: str) -> str:
    """Shell snippet writing the shell's PID atomically to ``directory/name.pid``."""
    tmp = directory / f"{name}.tmp"
    return f"echo $$ > {tmp} && mv {tmp} {directory / name}.pid"


@pytest.fixture
def gates() -> Iterator[list[threading.Event]]:
    """Events that stuck thread bodies wait on; all released at teardown."""
    events: list[threading.Event] = []
    yield events
    for event in events:
        event.set()


@pytest.fixture
def stop() -> Iterator[threading.Event]:
    """Ends every idle() body at teardown, whatever shutdown did to it."""
    event = threading.Event()
    yield event
    event.set()


async def idle(stop: threading.Event) -> None:
    """A long-running but cancellable async body (it never ends by itself
    during a test; the teardown ends it if shutdown failed to)."""
    while not stop.is_set():
        await asyncio.sleep(0.01)


@pytest.fixture
def marked() -> Iterator[dict[str, str]]:
    """An environment mark for commands; whatever carries it is killed at
    teardown (grandchildren included, even those no PID file recorded)."""
    mark = {"AF_TEST_MARK": uuid.uuid4().hex}
    yield mark
    for _ in range(50):  # a live shell may fork while we kill: repeat
        procs = carrying(mark)
        if not procs:
            break
        for proc in procs:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.05)


@pytest.fixture
async def engines() -> AsyncIterator[Callable[..., Any]]:
    """Create engines; every one is shut down at teardown (bounded)."""
    made: list[WorkflowEngine] = []

    async def make(backend: Any = None, **kwargs: Any) -> WorkflowEngine:
        engine = await WorkflowEngine.create(backend=backend, **kwargs)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        await asyncio.wait_for(engine.shutdown(timeout=5), LIVENESS)


def threads_backend(workers: int = 4, **kwargs: Any) -> LocalExecutionBackend:
    return LocalExecutionBackend(ThreadPoolExecutor(workers), **kwargs)


EXE_BACKENDS: dict[str, Callable[[], ExecutionBackend]] = {
    "threads": lambda: threads_backend(4),
    "asyncio": lambda: AsyncioExecutionBackend(max_subprocesses=4),
}


async def assert_cancelled(fut: TaskFuture) -> None:
    assert fut.state == "CANCELLED", fut
    assert fut.cancelled()
    with pytest.raises(asyncio.CancelledError):
        await fut


# -- idempotence and the context manager ------------------------------------------


async def test_shutdown_twice_is_harmless(engines) -> None:
    flow = await engines(threads_backend())

    @flow.function_task
    def double(x: int) -> int:
        return 2 * x

    assert await double(21) == 42
    assert not flow.is_shut_down
    await asyncio.wait_for(flow.shutdown(), LIVENESS)
    assert flow.is_shut_down
    await asyncio.wait_for(flow.shutdown(), LIVENESS)
    assert flow.is_shut_down
    with pytest.raises(RuntimeError, match="double"):
        double(1)


async def test_concurrent_shutdowns_all_return_after_the_work_stopped(
    engines, gates, stop
) -> None:
    gate = threading.Event()
    gates.append(gate)
    started = threading.Event()
    flow = await engines(threads_backend(2, shutdown_timeout=0.5))

    @flow.function_task
    async def long_running() -> None:
        started.set()
        await idle(stop)

    fut = long_running()
    await wait_until(started.is_set, "the task to start")
    shutdowns = [asyncio.ensure_future(flow.shutdown()) for _ in range(5)]
    await asyncio.wait_for(asyncio.gather(*shutdowns), LIVENESS)
    # None of the concurrent callers returned before the work was settled.
    await assert_cancelled(fut)
    assert flow.is_shut_down


async def test_async_with_waits_for_unawaited_tasks_on_normal_exit(stop) -> None:
    started = threading.Event()
    pending: list[TaskFuture] = []
    seen_while_exiting: list[bool] = []
    async with await WorkflowEngine.create(
        backend=threads_backend(2, shutdown_timeout=0.5)
    ) as flow:

        @flow.function_task
        async def long_running() -> str:
            started.set()
            await idle(stop)
            return "finished"

        @flow.function_task
        def after(x: str) -> str:
            return x + " and after"

        first = long_running()
        pending += [first, after(first)]
        await wait_until(started.is_set, "the task to start")

        def release() -> None:
            # Runs once the block below has been left: the exit is waiting.
            seen_while_exiting.append(flow.is_shut_down)
            stop.set()

        asyncio.get_running_loop().call_soon(release)
    assert seen_while_exiting == [False]
    assert flow.is_shut_down
    assert [f.state for f in pending] == ["DONE", "DONE"]
    assert pending[1].result() == "finished and after"
    with pytest.raises(RuntimeError, match="long_running"):
        long_running()


async def test_explicit_shutdown_warns_about_the_tasks_it_cancels(
    stop, caplog: pytest.LogCaptureFixture
) -> None:
    flow = await WorkflowEngine.create(backend=threads_backend(2, shutdown_timeout=0.5))

    @flow.function_task
    async def long_running(i: int) -> None:
        await idle(stop)

    futures = [long_running(i) for i in range(7)]
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="asyncflow"):
        await flow.shutdown()
    for fut in futures:
        await assert_cancelled(fut)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    cancelled = [m for m in warnings if "7 unfinished task(s)" in m]
    assert len(cancelled) == 1, warnings
    assert "long_running (task.000001)" in cancelled[0]
    assert "and 2 more" in cancelled[0]


async def test_async_with_shuts_down_on_exception_and_does_not_swallow_it(stop) -> None:
    started = threading.Event()
    holder: dict[str, Any] = {}

    class Boom(Exception):
        pass

    async def user_code() -> None:
        async with await WorkflowEngine.create(
            backend=threads_backend(2, shutdown_timeout=0.5)
        ) as flow:
            holder["flow"] = flow

            @flow.function_task
            async def long_running() -> None:
                started.set()
                await idle(stop)

            holder["fut"] = long_running()
            await wait_until(started.is_set, "the task to start")
            raise Boom("user code failed")

    with pytest.raises(Boom):
        await user_code()
    assert holder["flow"].is_shut_down
    await assert_cancelled(holder["fut"])


# -- what shutdown does to unfinished work -----------------------------------


async def test_unfinished_tasks_and_blocks_end_cancelled(
    engines, marked, tmp_path, stop
) -> None:
    started = threading.Event()
    flow = await engines(threads_backend(1, shutdown_timeout=0.5))

    @flow.function_task
    def quick() -> str:
        return "done before shutdown"

    @flow.function_task
    async def long_running() -> None:
        started.set()
        await idle(stop)

    @flow.function_task
    def queued_in_pool() -> None:  # the single worker is busy
        return None

    @flow.function_task
    def dependent(x: object) -> object:
        return x

    @flow.executable_task
    async def command() -> str:
        return f"{write_pid(tmp_path, 'exe')}; sleep 60"

    @flow.block
    async def block() -> object:
        return await dependent(long_running())

    finished = quick()
    assert await finished == "done before shutdown"
    running = long_running()
    await wait_until(started.is_set, "the thread task to start")
    queued = queued_in_pool()
    waiting = dependent(running)
    blk = block()
    exe = command(task_description={"env": marked})
    await wait_until(lambda: pid_files_ready(tmp_path, 1), "the command to start")
    assert blk.state == "RUNNING"

    await asyncio.wait_for(flow.shutdown(), LIVENESS)

    assert finished.state == "DONE"
    assert finished.result() == "done before shutdown"
    for fut in (running, queued, waiting, blk, exe):
        await assert_cancelled(fut)


async def test_work_queued_in_the_pool_never_runs_after_shutdown(
    engines, gates
) -> None:
    gate = threading.Event()
    gates.append(gate)
    started = threading.Event()
    queued_ran = threading.Event()
    flow = await engines(threads_backend(1, shutdown_timeout=0.5))

    @flow.function_task
    def stuck() -> None:  # occupies the only worker until the test says so
        started.set()
        gate.wait()

    @flow.function_task
    def queued_in_pool() -> None:
        queued_ran.set()

    blocker = stuck()
    await wait_until(started.is_set, "the worker to be busy")
    queued = [queued_in_pool() for _ in range(5)]
    await asyncio.wait_for(flow.shutdown(), LIVENESS)
    for fut in [blocker, *queued]:
        await assert_cancelled(fut)
    # Free the worker: it must find nothing left to run.
    gate.set()
    await asyncio.to_thread(flow.backend.executor.shutdown, wait=True)
    assert not queued_ran.is_set(), "a task queued in the pool ran after shutdown"


class _OnShutdownLog(logging.Handler):
    """Runs ``action`` (on the engine's loop thread) when the engine logs
    that it is shutting down, i.e. after shutdown began and before it stops
    the running tasks."""

    def __init__(self, action: Callable[[], None]) -> None:
        super().__init__(logging.INFO)
        self.action = action

    def emit(self, record: logging.LogRecord) -> None:
        if "shutting down" in record.getMessage():
            self.action()


async def test_no_queued_task_starts_once_shutdown_began(engines) -> None:
    # Deterministic version of a race seen in the suite: the only worker
    # becomes free exactly when shutdown begins, while a task is queued.
    finish = threading.Event()
    started = threading.Event()
    queued_ran = threading.Event()
    executor = ThreadPoolExecutor(1)
    flow = await engines(LocalExecutionBackend(executor, shutdown_timeout=5))

    @flow.function_task
    def first() -> None:
        started.set()
        finish.wait(LIVENESS)

    @flow.function_task
    def queued_in_pool() -> None:
        queued_ran.set()

    def free_the_worker() -> None:
        finish.set()
        # Until the worker has taken the queued item off the pool's queue
        # (bounded: it takes milliseconds).
        deadline = time.monotonic() + 5
        while not executor._work_queue.empty() and time.monotonic() < deadline:
            time.sleep(0.001)

    blocker = first()
    await wait_until(started.is_set, "the worker to be busy")
    queued = queued_in_pool()
    await asyncio.sleep(0)
    hook = _OnShutdownLog(free_the_worker)
    logger = logging.getLogger("asyncflow.engine")
    level = logger.level
    logger.addHandler(hook)
    logger.setLevel(logging.INFO)
    try:
        await asyncio.wait_for(flow.shutdown(), LIVENESS)
    finally:
        logger.removeHandler(hook)
        logger.setLevel(level)
    assert finish.is_set()
    await assert_cancelled(queued)
    assert blocker.state in ("DONE", "CANCELLED")
    assert not queued_ran.is_set(), "a queued task's body ran after shutdown began"


async def test_calling_any_task_after_shutdown_raises_a_clear_error(engines) -> None:
    flow = await engines(NoopExecutionBackend())

    @flow.function_task
    async def fetch_data() -> int:
        return 1

    @flow.executable_task
    async def run_simulation() -> str:
        return "true"

    @flow.block
    async def campaign() -> None:
        return None

    await flow.shutdown()
    for task in (fetch_data, run_simulation, campaign):
        with pytest.raises(RuntimeError) as info:
            task()
        message = str(info.value)
        assert task.__name__ in message
        assert "shut down" in message


async def test_calling_a_task_while_shutdown_is_in_progress_raises(
    engines, gates, stop
) -> None:
    started = threading.Event()
    flow = await engines(threads_backend(2, shutdown_timeout=0.5))

    @flow.function_task
    async def long_running() -> None:
        started.set()
        await idle(stop)

    fut = long_running()
    await wait_until(started.is_set, "the task to start")
    shutting = asyncio.ensure_future(flow.shutdown())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="long_running"):
        long_running()
    await asyncio.wait_for(shutting, LIVENESS)
    await assert_cancelled(fut)


# -- subprocesses ---------------------------------------------------------------


@pytest.mark.parametrize("backend", list(EXE_BACKENDS))
async def test_shutdown_kills_commands_and_their_grandchildren(
    engines, reaper, marked, tmp_path, backend
) -> None:
    flow = await engines(EXE_BACKENDS[backend]())

    @flow.executable_task
    async def simulate(i: int) -> str:
        # Two grandchildren: one in the background, one in the foreground.
        return f"{write_pid(tmp_path, f'sh{i}')}; sleep 60 & sleep 60"

    futs = [simulate(i, task_description={"env": marked}) for i in range(3)]
    await wait_until(lambda: pid_files_ready(tmp_path, 3), "the commands to start")
    # Wait until every shell has started both of its sleeps.
    shells = [psutil.Process(int(p.read_text())) for p in tmp_path.glob("*.pid")]
    await wait_until(
        lambda: all(sleeps_in_group(s.pid) == 2 for s in shells),
        "both sleeps of every command to start",
    )
    procs = processes_from(tmp_path)
    reaper.extend(procs)
    assert sum(p.name() == "sleep" for p in procs) == 6

    await asyncio.wait_for(flow.shutdown(), LIVENESS)

    for fut in futs:
        await assert_cancelled(fut)
    # The shells were reaped before shutdown returned; the grandchildren got
    # the signal before it returned too (allow the kernel to deliver it).
    assert not any(alive(p) for p in shells)
    await wait_gone(procs, "every command process to be gone")
    assert not carrying(marked)


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(EXE_BACKENDS))
async def test_shutdown_right_after_submission_leaves_no_orphan(
    engines, marked, backend
) -> None:
    # Shut down after 0..7 loop iterations, so that some shutdowns land while
    # the subprocess is still being set up. Whatever the moment, nothing the
    # command started may outlive the engine. Every process the commands
    # start carries an environment mark, so none escapes the census.
    for iterations in range(8):
        # A short engine bound: the test is about what is left behind, and
        # a shutdown that waits out its bound has abandoned something.
        flow = await engines(EXE_BACKENDS[backend](), shutdown_timeout=3)

        @flow.executable_task
        async def simulate() -> str:
            return "sleep 60 & sleep 60 & wait"

        futs = [simulate(task_description={"env": marked}) for _ in range(3)]
        for _ in range(iterations):
            await asyncio.sleep(0)
        await asyncio.wait_for(flow.shutdown(), LIVENESS)
        for fut in futs:
            assert fut.state == "CANCELLED"
        # Kill signals were sent before shutdown returned; allow the kernel
        # a moment to deliver them before calling anything an orphan.
        try:
            await wait_until(lambda: not carrying(marked), "no marked process", bound=2)
        except AssertionError:
            survivors = [(p.pid, p.name()) for p in carrying(marked)]
            pytest.fail(
                f"after {iterations} loop iteration(s): orphaned command "
                f"processes {survivors}"
            )


async def test_command_ignoring_sigterm_is_killed(
    engines, reaper, marked, tmp_path
) -> None:
    flow = await engines(threads_backend(2))

    @flow.executable_task
    async def stubborn() -> str:
        # The ignored disposition is inherited by the sleep as well.
        return f"trap '' TERM; {write_pid(tmp_path, 'sh')}; sleep 60"

    fut = stubborn(task_description={"env": marked})
    await wait_until(lambda: pid_files_ready(tmp_path, 1), "the command to start")
    shell = processes_from(tmp_path)[0]
    await wait_until(lambda: sleeps_in_group(shell.pid) == 1, "the sleep to start")
    procs = processes_from(tmp_path)
    reaper.extend(procs)

    await asyncio.wait_for(flow.shutdown(), LIVENESS)

    await assert_cancelled(fut)
    await wait_gone(procs, "the SIGTERM-ignoring command to be killed")
    assert not carrying(marked)


STUBBORN_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path
    from asyncflow import LocalExecutionBackend, WorkflowEngine

    directory = Path(sys.argv[1])

    async def main():
        flow = await WorkflowEngine.create(
            backend=LocalExecutionBackend(ThreadPoolExecutor(2))
        )

        @flow.executable_task
        async def stubborn():
            tmp = directory / "sh.tmp"
            return f"trap '' TERM; echo $$ > {tmp} && mv {tmp} {directory}/sh.pid; " \\
                "sleep 60"

        fut = stubborn()
        while not (directory / "sh.pid").exists():
            await asyncio.sleep(0.01)
        print("READY", flush=True)
        sys.stdin.readline()  # the test has recorded the PIDs
        await flow.shutdown(timeout=0.5)
        print("SHUT DOWN", fut.state, flush=True)

    asyncio.run(main())
    """
)


def test_short_shutdown_timeout_still_leaves_no_process_behind(
    reaper, tmp_path
) -> None:
    def poll(predicate: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + LIVENESS
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.01)

    script = tmp_path / "stubborn.py"
    script.write_text(STUBBORN_SCRIPT)
    directory = tmp_path / "pids"
    directory.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(script), str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    reaper.append(psutil.Process(proc.pid))
    try:
        assert proc.stdout is not None
        assert proc.stdin is not None
        assert proc.stdout.readline().strip() == "READY"
        shell = processes_from(directory)[0]
        poll(lambda: sleeps_in_group(shell.pid) == 1, "the sleep to start")
        procs = processes_from(directory)
        reaper.extend(procs)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=LIVENESS)
        assert proc.returncode == 0, err
        assert "SHUT DOWN CANCELLED" in out
        # The program has exited: nothing may be left running on its behalf.
        survivors = [p.pid for p in procs if alive(p)]
        assert not survivors, f"processes outlived the program: {survivors}"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


# -- stuck threads and busy processes -----------------------------------------


@pytest.mark.parametrize(
    "where", ["backend_timeout", "engine_timeout", "engine_default"]
)
async def test_shutdown_with_a_stuck_thread_returns_within_its_bound(
    engines, gates, caplog, where
) -> None:
    gate = threading.Event()  # never set by the task: it is stuck
    gates.append(gate)
    started = threading.Event()
    if where == "backend_timeout":
        flow = await engines(threads_backend(2, shutdown_timeout=0.5))
    elif where == "engine_default":
        flow = await engines(
            threads_backend(2, shutdown_timeout=60), shutdown_timeout=0.5
        )
    else:
        flow = await engines(threads_backend(2, shutdown_timeout=60))

    @flow.function_task
    def stuck() -> None:
        started.set()
        gate.wait()

    @flow.function_task
    def sibling() -> str:
        return "fine"

    fut = stuck()
    assert await sibling() == "fine"
    await wait_until(started.is_set, "the thread task to block")
    caplog.set_level(logging.WARNING, logger="asyncflow")
    timeout = 0.5 if where == "engine_timeout" else None
    await asyncio.wait_for(flow.shutdown(timeout=timeout), LIVENESS)
    await assert_cancelled(fut)
    # What was abandoned is logged.
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("abandon" in r.getMessage() for r in warnings), [
        r.getMessage() for r in warnings
    ]
    gate.set()


async def test_shutdown_stops_async_bodies_running_in_threads(engines, gates) -> None:
    # Async bodies in a thread pool are cancellable (they run on the
    # worker's own event loop). A fresh pool: each submission starts a thread.
    n = 24
    release = threading.Event()
    gates.append(release)
    started = [threading.Event() for _ in range(n)]
    stopped = [threading.Event() for _ in range(n)]
    flow = await engines(threads_backend(n, shutdown_timeout=0.5))

    @flow.function_task
    async def analyse(i: int) -> None:
        started[i].set()
        try:
            while not release.is_set():
                await asyncio.sleep(0.01)
        finally:
            stopped[i].set()

    futs = [analyse(i) for i in range(n)]
    await wait_until(lambda: all(e.is_set() for e in started), "every body to run")
    await asyncio.wait_for(flow.shutdown(), LIVENESS)
    for fut in futs:
        await assert_cancelled(fut)
    await wait_until(
        lambda: all(e.is_set() for e in stopped),
        "every async body to be cancelled in its thread",
        bound=2,  # they stop within milliseconds of the cancellation
    )


async def test_shutdown_with_a_hanging_backend_returns_and_logs_it(
    engines, caplog
) -> None:
    class HangingBackend(NoopExecutionBackend):
        async def shutdown(self) -> None:
            await asyncio.Event().wait()

    caplog.set_level(logging.WARNING, logger="asyncflow")
    flow = await engines(
        [threads_backend(2), HangingBackend(name="hangs")], shutdown_timeout=0.5
    )
    await asyncio.wait_for(flow.shutdown(), LIVENESS)
    messages = [r.getMessage() for r in caplog.records]
    assert any("hangs" in m and "abandon" in m for m in messages), messages


async def test_process_pool_shutdown_kills_busy_workers(
    engines, reaper, tmp_path
) -> None:
    flow = await engines(
        LocalExecutionBackend(ProcessPoolExecutor(2), shutdown_timeout=0.5)
    )

    @flow.function_task
    def busy(path: str) -> None:
        Path(path).write_text(str(os.getpid()))
        time.sleep(60)

    futs = [busy(str(tmp_path / f"w{i}.pid")) for i in range(2)]
    await wait_until(lambda: pid_files_ready(tmp_path, 2), "both workers to start")
    workers = processes_from(tmp_path)
    reaper.extend(workers)
    assert len({w.pid for w in workers}) == 2
    assert all(alive(w) for w in workers)

    await asyncio.wait_for(flow.shutdown(), LIVENESS)

    for fut in futs:
        await assert_cancelled(fut)
    # shutdown() sent SIGKILL before returning: 2 s is generous.
    await wait_gone(workers, "the busy pool workers to be killed", bound=2)


# -- several engines, released resources -----------------------------------------


async def test_two_engines_on_one_loop_do_not_interfere(
    engines, reaper, marked, tmp_path, stop
) -> None:
    first = await engines(threads_backend(2, shutdown_timeout=0.5))
    second = await engines(AsyncioExecutionBackend())
    release = asyncio.Event()
    started = threading.Event()

    @first.function_task
    async def first_long() -> None:
        started.set()
        await idle(stop)

    @first.executable_task
    async def first_command() -> str:
        return f"{write_pid(tmp_path, 'first')}; sleep 60"

    @second.function_task
    async def second_waits() -> str:
        await release.wait()
        return "second survived"

    @second.function_task
    def second_double(x: int) -> int:
        return 2 * x

    @second.executable_task
    async def second_echo(word: str) -> str:
        return f"echo {word}"

    doomed = [first_long(), first_command(task_description={"env": marked})]
    survivor = second_waits()
    await wait_until(started.is_set, "the first engine's task to start")
    await wait_until(lambda: pid_files_ready(tmp_path, 1), "the first command")
    reaper.extend(processes_from(tmp_path))

    await asyncio.wait_for(first.shutdown(), LIVENESS)

    for fut in doomed:
        await assert_cancelled(fut)
    assert first.is_shut_down
    assert not second.is_shut_down
    assert survivor.state == "RUNNING"
    release.set()
    assert await asyncio.wait_for(survivor, LIVENESS) == "second survived"
    assert await second_double(second_double(5)) == 20
    assert (await second_echo("still-working")).strip() == "still-working"
    # And the other way round: shutting the second one down is independent too.
    await asyncio.wait_for(second.shutdown(), LIVENESS)
    assert second.is_shut_down


async def test_thread_pool_threads_are_released(engines) -> None:
    prefix = f"aftest-{uuid.uuid4().hex[:8]}"
    executor = ThreadPoolExecutor(3, thread_name_prefix=prefix)
    flow = await engines(LocalExecutionBackend(executor))
    barrier = threading.Barrier(3, timeout=LIVENESS)

    @flow.function_task
    def meet() -> str:
        barrier.wait()  # forces all three workers into existence
        return threading.current_thread().name

    names = await asyncio.gather(*(meet() for _ in range(3)))
    assert all(n.startswith(prefix) for n in names)
    pool_threads = [t for t in threading.enumerate() if t.name.startswith(prefix)]
    assert len(pool_threads) == 3

    await asyncio.wait_for(flow.shutdown(), LIVENESS)

    assert not [t.name for t in pool_threads if t.is_alive()]


async def test_default_thread_pool_is_released(engines) -> None:
    before = set(threading.enumerate())
    flow = await engines(None)

    @flow.function_task
    def name() -> str:
        return threading.current_thread().name

    worker = await name()
    spawned = [t for t in threading.enumerate() if t not in before]
    assert any(t.name == worker for t in spawned)

    await asyncio.wait_for(flow.shutdown(), LIVENESS)

    assert not [t.name for t in spawned if t.name == worker and t.is_alive()]


async def test_process_pool_workers_are_released(engines) -> None:
    me = psutil.Process()
    before = {p.pid for p in me.children()}
    flow = await engines(LocalExecutionBackend(ProcessPoolExecutor(2)))

    @flow.function_task
    def pid() -> int:
        return os.getpid()

    worker_pids = set(await asyncio.gather(*(pid() for _ in range(4))))
    workers = [p for p in me.children() if p.pid not in before]
    assert worker_pids <= {w.pid for w in workers}

    await asyncio.wait_for(flow.shutdown(), LIVENESS)

    # Idle workers exit once told to; they must not linger.
    await wait_gone(workers, "the idle pool workers to exit", bound=10)


async def test_process_pool_shutdown_returns_after_its_workers_are_gone(
    engines, reaper, tmp_path
) -> None:
    flow = await engines(LocalExecutionBackend(ProcessPoolExecutor(1)))

    @flow.function_task
    def short_work(path: str) -> None:
        Path(path).write_text(str(os.getpid()))
        time.sleep(2)  # well inside the backend's 5 s shutdown_timeout

    fut = short_work(str(tmp_path / "w.pid"))
    await wait_until(lambda: pid_files_ready(tmp_path, 1), "the worker to start")
    worker = processes_from(tmp_path)[0]
    reaper.append(worker)

    await asyncio.wait_for(flow.shutdown(), LIVENESS)

    await assert_cancelled(fut)
    # Whether it waited for the work or killed it, the worker is gone now.
    assert not alive(worker)
