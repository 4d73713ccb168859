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

    markers, db, release, run = sys.argv[1:5]

    async def main():
        backend = LocalExecutionBackend(ThreadPoolExecutor(4))
        async with await WorkflowEngine.create(backend=backend, checkpoint=db) as flow:

            @flow.function_task
            def simulate(i):
                # Tasks 6 and up wait for the release file (never in run 1).
                while i >= 6 and not os.path.exists(release):
                    time.sleep(0.02)
                with open(os.path.join(markers, f"{i}-{run}-{uuid.uuid4().hex}"), "w"):
                    pass
                return i * i

            @flow.function_task
            def total(values):
                with open(os.path.join(markers, f"total-{run}-{uuid.uuid4().hex}"), "w"):
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
