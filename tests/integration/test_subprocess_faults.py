"""SPEC §11 "never orphan" for executable tasks: stopping a command leaves
nothing of it running, however the stop is asked for.

The commands below ignore SIGTERM (and so do their children), so only the
SIGKILL that follows the grace period ends them. Order is kept with PID files
and psutil, never with timing; the bounds are liveness checks.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from asyncflow import (
    ExecutableError,
    TaskFuture,
    WorkflowEngine,
)
from asyncflow.backends._subprocess import SubprocessRunner

from ..conftest import EXE_BACKENDS as BACKENDS
from ..processes import alive, carrying, kill_alive, wait_until

LIVENESS = 20.0


@pytest.fixture
def marked() -> Iterator[dict[str, str]]:
    """An environment mark for commands; what still carries it at teardown
    (a failed test) is killed, grandchildren included."""
    mark = {"AF_TEST_MARK": uuid.uuid4().hex}
    yield mark
    kill_alive(carrying(mark))


def stubborn(directory: Path, name: str) -> str:
    """A shell command that ignores SIGTERM, with a child that does too;
    it writes its PID to ``directory/name.pid`` once the child runs."""
    tmp = directory / f"{name}.tmp"
    return (
        f"trap '' TERM; sleep 60 & echo $$ > {tmp} && mv {tmp} "
        f"{directory / name}.pid; wait"
    )


async def started_group(directory: Path, name: str, reaper: list[Any]) -> list[Any]:
    """The live processes of the command that wrote ``name.pid``: its shell
    and its sleep (registered with the reaper)."""
    pid_file = directory / f"{name}.pid"
    await wait_until(pid_file.exists, f"command {name} to start")
    leader = int(pid_file.read_text())

    def members() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) == leader:
                    found.append(proc)
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
        return found

    await wait_until(lambda: len(members()) == 2, f"command {name}'s sleep to start")
    procs = members()
    reaper.extend(procs)
    return procs


def survivors(procs: list[psutil.Process]) -> list[int]:
    return [p.pid for p in procs if alive(p)]


def runner_of(flow: WorkflowEngine) -> SubprocessRunner:
    runner = flow.backend._subprocesses  # type: ignore[attr-defined]
    assert isinstance(runner, SubprocessRunner)
    return runner


# -- shutdown ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("cancels", [0, 1, 2])
async def test_shutdown_returns_only_once_stubborn_groups_are_gone(
    make_flow, reaper, marked, tmp_path: Path, backend: str, cancels: int
) -> None:
    flow = await make_flow(backend, 2)

    @flow.executable_task
    async def hold(name: str) -> str:
        return stubborn(tmp_path, name)

    futs = [hold(name, task_description={"env": marked}) for name in ("a", "b")]
    procs = [
        p for name in ("a", "b") for p in await started_group(tmp_path, name, reaper)
    ]
    runners = [fut._handle for fut in futs]
    for _ in range(cancels):
        # The task first (as a user would), then its runner again and again:
        # none of it may cut the SIGTERM, grace, SIGKILL sequence short.
        futs[0].cancel()
        for runner in runners:
            runner.cancel()
        await asyncio.sleep(0)

    await asyncio.wait_for(flow.shutdown(), LIVENESS)

    # Gone when shutdown returns: no waiting here.
    assert survivors(procs) == []
    assert not carrying(marked)
    assert all(fut.cancelled() for fut in futs)
    assert all(runner.done() for runner in runners)


async def test_runner_ends_only_once_its_group_is_gone(
    make_flow, reaper, marked, tmp_path: Path
) -> None:
    flow = await make_flow("asyncio", 1)

    @flow.executable_task
    async def hold() -> str:
        return stubborn(tmp_path, "a")

    fut = hold(task_description={"env": marked})
    procs = await started_group(tmp_path, "a", reaper)
    runner = fut._handle
    assert isinstance(runner, asyncio.Task)
    assert fut.cancel()
    # Cancelled again and again during the grace period.
    while not runner.done():
        runner.cancel()
        await asyncio.wait([runner], timeout=0.1)
    assert survivors(procs) == []
    assert not carrying(marked)


async def test_a_retry_starts_only_once_the_timed_out_attempt_is_gone(
    make_flow, reaper, tmp_path: Path
) -> None:
    # The first attempt ignores SIGTERM and outlives its timeout; the second
    # reports whether anything of the first is still running.
    script = (
        "import os, signal, subprocess, sys, time\n"
        "import psutil\n"
        "record = sys.argv[1]\n"
        "if not os.path.exists(record):\n"
        "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "    child = subprocess.Popen(['sleep', '60'])\n"
        "    with open(record + '.tmp', 'w') as f:\n"
        "        f.write(f'{os.getpid()} {child.pid}')\n"
        "    os.rename(record + '.tmp', record)\n"
        "    time.sleep(60)\n"
        "pids = [int(p) for p in open(record).read().split()]\n"
        "def running(pid):\n"
        "    try:\n"
        "        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE\n"
        "    except psutil.NoSuchProcess:\n"
        "        return False\n"
        "print('overlap' if any(running(p) for p in pids) else 'alone')\n"
    )
    record = tmp_path / "first-attempt"
    flow = await make_flow("threads", 2)

    @flow.executable_task(timeout=1, retries=1)
    async def check() -> list[str]:
        return [sys.executable, "-c", script, str(record)]

    fut = check()
    await wait_until(record.exists, "the first attempt to start")
    reaper.extend(psutil.Process(int(p)) for p in record.read_text().split())
    assert await asyncio.wait_for(fut, LIVENESS) == "alone\n"
    assert fut.attempts == 2


# -- kill_all ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", list(BACKENDS))
async def test_kill_all_sigkills_every_group_without_grace(
    make_flow, reaper, marked, tmp_path: Path, backend: str
) -> None:
    flow = await make_flow(backend, 3)
    runner = runner_of(flow)
    # With an hour of grace, only kill_all can end these within the test.
    runner.grace = 3600

    @flow.executable_task
    async def hold(name: str) -> str:
        return stubborn(tmp_path, name)

    futs = [hold(name, task_description={"env": marked}) for name in "abc"]
    procs = [p for name in "abc" for p in await started_group(tmp_path, name, reaper)]
    # One of them is already being terminated, in its (long) grace period.
    assert futs[2].cancel()

    runner.kill_all()

    for fut in futs[:2]:
        await asyncio.wait([fut], timeout=LIVENESS)
        error = fut.exception()
        assert isinstance(error, ExecutableError)
        assert error.exit_code == -9
    await wait_until(lambda: not survivors(procs), "every group to be killed")
    await wait_until(lambda: not runner._running, "every runner to end")
    assert not carrying(marked)
    await asyncio.wait_for(flow.shutdown(), LIVENESS)


async def test_nothing_starts_after_kill_all(
    make_flow, reaper, marked, tmp_path: Path
) -> None:
    flow = await make_flow("asyncio", 1)
    runner = runner_of(flow)
    runner.grace = 3600

    @flow.executable_task
    async def hold(name: str) -> str:
        return stubborn(tmp_path, name)

    first = hold("a", task_description={"env": marked})
    queued = hold("b", task_description={"env": marked})
    procs = await started_group(tmp_path, "a", reaper)
    runner.kill_all()
    await asyncio.wait([first], timeout=LIVENESS)
    error = first.exception()
    assert isinstance(error, ExecutableError)
    assert error.exit_code == -9
    await wait_until(lambda: not survivors(procs), "the group to be killed")
    await wait_until(lambda: not runner._running, "the runner to end")
    assert queued.state == "RUNNING"  # still queued: it never started
    assert not (tmp_path / "b.pid").exists()
    await asyncio.wait_for(flow.shutdown(), LIVENESS)
    assert queued.cancelled()
    assert not carrying(marked)


# -- slots ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", list(BACKENDS))
async def test_a_command_cancelled_before_it_starts_frees_its_slot(
    make_flow, backend: str
) -> None:
    flow = await make_flow(backend, 1)
    futs: list[TaskFuture] = []

    @flow.executable_task
    async def cancelled_at_once() -> str:
        # Runs before the command's runner takes its first step.
        asyncio.get_running_loop().call_soon(futs[0].cancel)
        return "sleep 60"

    @flow.executable_task
    async def afterwards() -> str:
        return "echo afterwards"

    futs.append(cancelled_at_once())
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(futs[0], LIVENESS)
    assert await asyncio.wait_for(afterwards(), LIVENESS) == "afterwards\n"
