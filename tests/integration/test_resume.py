"""A workflow killed with SIGKILL resumes without re-running finished tasks."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import asyncio, os, sys, time, uuid
    from concurrent.futures import ThreadPoolExecutor
    from asyncflow import LocalExecutionBackend, WorkflowEngine

    markers, db, release = sys.argv[1:4]

    async def main():
        backend = LocalExecutionBackend(ThreadPoolExecutor(4))
        async with await WorkflowEngine.create(backend=backend, checkpoint=db) as flow:

            @flow.function_task
            def simulate(i):
                # Tasks 6 and up wait for the release file (never in run 1).
                while i >= 6 and not os.path.exists(release):
                    time.sleep(0.02)
                # The run's name is read from argv here, not from a global:
                # a global the body reads is part of its cache key.
                with open(os.path.join(markers, f"{i}-{sys.argv[4]}-{uuid.uuid4().hex}"), "w"):
                    pass
                return i * i

            @flow.function_task
            def total(values):
                with open(os.path.join(markers, f"total-{sys.argv[4]}-{uuid.uuid4().hex}"), "w"):
                    pass
                return sum(values)

            @flow.executable_task
            async def report(value):
                return f"echo total={value}"

            print((await report(total([simulate(i) for i in range(12)]))).strip())

    asyncio.run(main())
    """
)


def _stored_simulations(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            row = conn.execute(
                "SELECT COUNT(*) FROM asyncflow_results WHERE task = 'simulate'"
            ).fetchone()
            return int(row[0])
    except sqlite3.Error:
        return 0


@pytest.mark.slow
def test_sigkill_then_rerun_skips_every_finished_task(tmp_path: Path) -> None:
    script = tmp_path / "campaign.py"
    script.write_text(SCRIPT)
    markers = tmp_path / "markers"
    markers.mkdir()
    db = tmp_path / "run.db"
    release = tmp_path / "release"

    def command(run: str, database: Path = db) -> list[str]:
        return [
            sys.executable,
            str(script),
            str(markers),
            str(database),
            str(release),
            run,
        ]

    first = subprocess.Popen(command("first"), stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while _stored_simulations(db) < 6:
            assert first.poll() is None, "the first run ended on its own"
            assert time.monotonic() < deadline, "the first run stored no results"
            time.sleep(0.02)
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.communicate(timeout=30)
    assert first.returncode == -signal.SIGKILL

    ran_first = Counter(p.name.split("-")[0] for p in markers.iterdir())
    assert ran_first == Counter({str(i): 1 for i in range(6)})

    release.touch()
    second = subprocess.run(
        command("second"), capture_output=True, text=True, timeout=120
    )
    assert second.returncode == 0, second.stderr
    runs = Counter(p.name.split("-")[0] for p in markers.iterdir())
    # No finished task ran twice; every other task ran exactly once.
    assert runs == Counter({**{str(i): 1 for i in range(12)}, "total": 1})
    second_run = {
        p.name.split("-")[0] for p in markers.iterdir() if "-second-" in p.name
    }
    assert second_run == {*(str(i) for i in range(6, 12)), "total"}

    fresh = subprocess.run(
        command("fresh", tmp_path / "fresh.db"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert fresh.returncode == 0, fresh.stderr
    assert second.stdout == fresh.stdout == f"total={sum(i * i for i in range(12))}\n"


CTRL_C_SCRIPT = textwrap.dedent(
    """
    import asyncio, os, sys, time
    from concurrent.futures import ThreadPoolExecutor
    from asyncflow import LocalExecutionBackend, WorkflowEngine

    runs, db, hold = sys.argv[1:4]
    QUICK = 6

    async def main():
        backend = LocalExecutionBackend(ThreadPoolExecutor(4))
        async with await WorkflowEngine.create(backend=backend, checkpoint=db) as flow:

            @flow.function_task
            def simulate(i):
                # While the hold file exists, tasks past the first few finish
                # only once a shutdown is under way: their results arrive
                # during it. The run's name comes from the environment, which
                # the task's checkpoint key does not cover.
                while i >= QUICK and os.path.exists(hold) and not flow.is_shut_down:
                    time.sleep(0.01)
                with open(runs, "a") as log:
                    log.write(f"{i} {os.environ['CAMPAIGN_RUN']}\\n")
                return i * i

            @flow.function_task
            def total(values):
                return sum(values)

            print(await total([simulate(i) for i in range(24)]))

    asyncio.run(main())
    """
)


def _runs(log: Path) -> list[tuple[str, str]]:
    if not log.exists():
        return []
    lines = log.read_text().splitlines()
    return [(i, run) for i, run in (line.split() for line in lines)]


def test_ctrl_c_then_rerun_skips_every_finished_task(tmp_path: Path) -> None:
    """SIGINT stops a checkpointed run; the next run of the same program runs
    only what the first did not finish, including the tasks whose results
    arrived while the first run was shutting down."""
    script = tmp_path / "campaign.py"
    script.write_text(CTRL_C_SCRIPT)
    log = tmp_path / "runs.log"
    db = tmp_path / "run.db"
    hold = tmp_path / "hold"
    hold.touch()

    def start(run: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, str(script), str(log), str(db), str(hold)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "CAMPAIGN_RUN": run},
        )

    first = start("first")
    try:
        deadline = time.monotonic() + 60
        while len(_runs(log)) < 6:
            assert first.poll() is None, "the first run ended on its own"
            assert time.monotonic() < deadline, "the first run finished no task"
            time.sleep(0.02)
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode in (-signal.SIGINT, 128 + signal.SIGINT), err
    ran_first = {int(i) for i, _ in _runs(log)}
    # The held tasks that had a worker finished during the shutdown.
    assert set(range(6)) < ran_first < set(range(24)), ran_first

    hold.unlink()
    second = start("second")
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert out == f"{sum(i * i for i in range(24))}\n"
    runs = Counter(int(i) for i, _ in _runs(log))
    # Every task ran exactly once over the two runs.
    assert runs == Counter(range(24)), runs
    ran_second = {int(i) for i, run in _runs(log) if run == "second"}
    assert ran_second == set(range(24)) - ran_first
