"""The progress display of ``WorkflowEngine.create(progress=True)``.

Plain mode (stderr is not a terminal: pytest captures it here), the live rich
mode on a console forced to be a terminal, the summary line, the retry
WARNINGs it stands in for, and failures inside the display.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from asyncflow import LocalExecutionBackend, TaskEvent, WorkflowEngine
from asyncflow.observers import progress
from asyncflow.observers.progress import RETRY_MESSAGE, ProgressDisplay

#: Bound on every wait for something the display draws (never a speed check).
PATIENCE = 30.0

SUMMARY = re.compile(
    r"finished in \S+: (?P<done>\d+) done, (?P<failed>\d+) failed, "
    r"(?P<cancelled>\d+) cancelled, (?P<restored>\d+) restored; "
    r"(?P<retries>\d+) retries"
)
STATUS = re.compile(
    r"\[\S+\]: (?P<pending>\d+) pending, (?P<running>\d+) running, "
    r"(?P<done>\d+) done, (?P<failed>\d+) failed, (?P<cancelled>\d+) cancelled, "
    r"(?P<restored>\d+) restored; (?P<retries>\d+) retries; \S+ tasks/s; ETA \S+"
)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def summaries(text: str) -> list[dict[str, int]]:
    return [
        {key: int(value) for key, value in found.groupdict().items()}
        for found in SUMMARY.finditer(text)
    ]


def summary_of(text: str) -> dict[str, int]:
    found = summaries(text)
    assert len(found) == 1, f"expected one summary line in:\n{text}"
    return found[0]


def fake_engine(uid: str) -> Any:
    """What a display needs of an engine: its loop and uid."""
    return SimpleNamespace(loop=asyncio.get_running_loop(), uid=uid)


def threads() -> LocalExecutionBackend:
    return LocalExecutionBackend(ThreadPoolExecutor(4))


@pytest.fixture(autouse=True)
def no_display_left() -> Iterator[None]:
    """Every test leaves no live panel and no retry filter behind."""
    yield
    assert progress._live_owner is None
    scheduler_log = logging.getLogger("asyncflow.scheduler")
    assert not [
        f for f in scheduler_log.filters if isinstance(f, progress._RetryFilter)
    ]


class Flaky:
    """Fails its first ``failures`` calls (threads share it)."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self) -> int:
        with self.lock:
            self.calls += 1
            if self.calls <= self.failures:
                raise ConnectionError(f"flaky call {self.calls}")
            return self.calls


def squares(flow: WorkflowEngine, n: int) -> list[Any]:
    @flow.function_task
    def square(x: int) -> int:
        return x * x

    return [square(i) for i in range(n)]


# -- plain mode ---------------------------------------------------------------


async def test_plain_summary_counts_every_final_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "run.db"
    # Run 1 stores three results; run 2 restores them.
    async with await WorkflowEngine.create(backend=threads(), checkpoint=db) as flow:
        assert await asyncio.gather(*squares(flow, 3)) == [0, 1, 4]
    capsys.readouterr()

    flaky = Flaky(1)
    gate = threading.Event()
    async with await WorkflowEngine.create(
        backend=threads(), checkpoint=db, progress=True
    ) as flow:
        restored = squares(flow, 3)

        @flow.function_task
        def add_one(x: int) -> int:
            return x + 1

        @flow.function_task(retries=2)
        def fetch() -> int:
            return flaky()

        @flow.function_task
        def explode() -> None:
            raise ValueError("kaboom")

        @flow.function_task
        def wait_for_gate() -> int:
            gate.wait(PATIENCE)
            return 7

        held = wait_for_gate()
        never = add_one(held)
        assert never.cancel()
        gate.set()
        assert await asyncio.gather(*restored) == [0, 1, 4]
        assert await fetch() == 2
        with pytest.raises(ValueError, match="kaboom"):
            await explode()
        assert await add_one(held) == 8
        assert never.cancelled()

    err = capsys.readouterr().err
    assert summary_of(err) == {
        "done": 3,  # fetch, wait_for_gate, add_one(held)
        "failed": 1,
        "cancelled": 1,
        "restored": 3,
        "retries": 1,
    }
    assert flow.uid in err
    # No live display codes when stderr is not a terminal.
    assert "\x1b[" not in err


async def test_plain_mode_prints_periodic_lines(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(progress, "PLAIN_EVERY", 0.02)
    release = threading.Event()
    async with await WorkflowEngine.create(backend=threads(), progress=True) as flow:

        @flow.function_task
        def hold() -> str:
            release.wait(PATIENCE)
            return "held"

        @flow.function_task
        def quick(i: int) -> int:
            return i

        assert await asyncio.gather(*(quick(i) for i in range(5))) == list(range(5))
        held = hold()
        seen = ""
        deadline = asyncio.get_running_loop().time() + PATIENCE
        # Wait for a line that shows the five done and the held task running.
        while asyncio.get_running_loop().time() < deadline:
            seen += capsys.readouterr().err
            lines = [m.groupdict() for m in STATUS.finditer(seen)]
            if any(line["done"] == "5" and line["running"] == "1" for line in lines):
                break
            await asyncio.sleep(0.01)
        release.set()
        assert await held == "held"
    seen += capsys.readouterr().err
    lines = [m.groupdict() for m in STATUS.finditer(seen)]
    assert any(line["done"] == "5" and line["running"] == "1" for line in lines), seen
    assert all(line["failed"] == "0" for line in lines)
    assert summary_of(seen)["done"] == 6


# -- retries ------------------------------------------------------------------


async def test_retry_warnings_are_suppressed_while_progress_is_on(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    def retry_records() -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records
            if isinstance(r.msg, str) and r.msg.startswith(RETRY_MESSAGE)
        ]

    caplog.set_level(logging.WARNING, logger="asyncflow")
    flaky = Flaky(2)
    async with await WorkflowEngine.create(backend=threads(), progress=True) as flow:

        @flow.function_task(retries=3)
        def fetch() -> int:
            return flaky()

        assert await fetch() == 3
    assert retry_records() == []
    assert summary_of(capsys.readouterr().err)["retries"] == 2

    # The engine shut down: the WARNINGs are back.
    again = Flaky(1)
    async with await WorkflowEngine.create(backend=threads()) as flow:

        @flow.function_task(retries=1)
        def fetch_again() -> int:
            return again()

        assert await fetch_again() == 2
    assert len(retry_records()) == 1
    assert "fetch_again" in retry_records()[0].getMessage()


async def test_an_engine_without_progress_on_another_loop_keeps_its_warnings(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """The filter covers the display's own loop only."""
    caplog.set_level(logging.WARNING, logger="asyncflow")

    async def other_run() -> int:
        flaky = Flaky(1)
        async with await WorkflowEngine.create(backend=threads()) as flow:

            @flow.function_task(retries=1)
            def elsewhere() -> int:
                return flaky()

            return int(await elsewhere())

    async with await WorkflowEngine.create(backend=threads(), progress=True):
        result = await asyncio.to_thread(asyncio.run, other_run())
    assert result == 2
    messages = [r.getMessage() for r in caplog.records]
    assert any("elsewhere" in m and "retrying" in m for m in messages), messages


# -- live mode ----------------------------------------------------------------


def last_frame(text: str) -> dict[str, Any]:
    """The counts and running task lines of the last panel drawn in ``text``."""
    plain = ANSI.sub("", text).replace("\r", "")
    lines = plain.split("\n")
    headers = [
        i for i, line in enumerate(lines) if line.split()[:2] == ["pending", "running"]
    ]
    if not headers:
        return {}
    at = headers[-1]
    names = lines[at].split()
    values = lines[at + 1].split()
    counts = dict(zip(names, map(int, values), strict=True))
    running = []
    for line in lines[at + 2 :]:
        if "(" not in line or line.split()[:1] in (["pending"], ["asyncflow"]):
            break
        running.append(line.replace("longest running", "").strip())
    return {"counts": counts, "running": running}


# With timeout=, the engine reports the start at once; without, the start
# may come with the outcome and the task runs from its submission.
@pytest.mark.parametrize(
    "options", [{}, {"timeout": 2 * PATIENCE}], ids=["submitted", "started"]
)
async def test_live_display_shows_counts_and_longest_running_task(
    monkeypatch: pytest.MonkeyPatch, options: dict[str, Any]
) -> None:
    from rich.console import Console

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120, color_system=None)
    monkeypatch.setattr(progress, "CONSOLE", console)
    monkeypatch.setattr(progress, "REFRESH_EVERY", 0.02)
    release = threading.Event()
    flaky = Flaky(1)
    async with await WorkflowEngine.create(backend=threads(), progress=True) as flow:

        @flow.function_task(**options)
        def long_haul() -> str:
            release.wait(PATIENCE)
            return "hauled"

        @flow.function_task(retries=1)
        def fetch() -> int:
            return flaky()

        @flow.function_task
        def quick(i: int) -> int:
            return i

        assert await asyncio.gather(*(quick(i) for i in range(3))) == [0, 1, 2]
        assert await fetch() == 2
        hauled = long_haul()
        frame: dict[str, Any] = {}
        deadline = asyncio.get_running_loop().time() + PATIENCE
        while asyncio.get_running_loop().time() < deadline:
            frame = last_frame(screen.getvalue())
            if frame and frame["counts"]["running"] == 1 and frame["running"]:
                break
            await asyncio.sleep(0.01)
        release.set()
        assert await hauled == "hauled"

    assert frame["counts"] == {
        "pending": 0,
        "running": 1,
        "done": 4,
        "failed": 0,
        "cancelled": 0,
        "restored": 0,
        "retries": 1,
    }
    assert len(frame["running"]) == 1
    assert frame["running"][0].startswith("long_haul (task.")
    text = ANSI.sub("", screen.getvalue())
    assert flow.uid in text
    assert "tasks/s" in text
    assert "ETA" in text
    assert summary_of(text)["done"] == 5


async def test_only_one_live_panel_at_a_time(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from rich.console import Console

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120, color_system=None)
    monkeypatch.setattr(progress, "CONSOLE", console)
    first = await WorkflowEngine.create(backend=threads(), progress=True)
    second = await WorkflowEngine.create(backend=threads(), progress=True)
    try:
        assert await asyncio.gather(*squares(first, 4), *squares(second, 2)) == [
            0,
            1,
            4,
            9,
            0,
            1,
        ]
    finally:
        await second.shutdown()
        await first.shutdown()
    # The first draws the panel; the second prints plain lines meanwhile.
    assert summary_of(ANSI.sub("", screen.getvalue()))["done"] == 4
    assert summary_of(capsys.readouterr().err)["done"] == 2


async def test_without_rich_the_display_falls_back_to_plain_lines(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "rich.console", None)  # import fails
    monkeypatch.setattr(progress, "_told_no_rich", False)
    monkeypatch.setattr(progress, "CONSOLE", object())  # a terminal is wanted
    caplog.set_level(logging.INFO, logger="asyncflow.progress")
    display = ProgressDisplay(fake_engine("no-rich"))
    assert display.mode == "plain"
    display.close()
    assert display.mode == "closed"
    said = [r for r in caplog.records if r.name == "asyncflow.progress"]
    assert len(said) == 1
    assert said[0].levelno == logging.INFO
    assert "rich" in said[0].getMessage()
    assert summary_of(capsys.readouterr().err) == dict.fromkeys(
        ("done", "failed", "cancelled", "restored", "retries"), 0
    )


# -- failures and the end ------------------------------------------------------


async def test_a_failing_observer_never_breaks_the_run(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def broken(self: ProgressDisplay, *args: Any) -> None:
        raise RuntimeError("display bug")

    monkeypatch.setattr(ProgressDisplay, "records", broken)
    monkeypatch.setattr(ProgressDisplay, "__call__", broken)
    caplog.set_level(logging.WARNING, logger="asyncflow")
    async with await WorkflowEngine.create(backend=threads(), progress=True) as flow:
        assert await asyncio.gather(*squares(flow, 5)) == [0, 1, 4, 9, 16]
    assert any("detached" in r.getMessage() for r in caplog.records)
    assert "finished in" in capsys.readouterr().err


async def test_a_failing_drawing_never_breaks_the_run(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def broken(self: ProgressDisplay) -> str:
        raise RuntimeError("drawing bug")

    monkeypatch.setattr(progress, "PLAIN_EVERY", 0.01)
    monkeypatch.setattr(ProgressDisplay, "status_line", broken)
    caplog.set_level(logging.WARNING, logger="asyncflow")
    async with await WorkflowEngine.create(backend=threads(), progress=True) as flow:
        assert await asyncio.gather(*squares(flow, 3)) == [0, 1, 4]
        while not any("failed to draw" in r.getMessage() for r in caplog.records):
            await asyncio.sleep(0.01)
        assert await asyncio.gather(*squares(flow, 2)) == [0, 1]
    drawing = [r for r in caplog.records if "failed to draw" in r.getMessage()]
    assert len(drawing) == 1  # reported once; the display stops drawing
    assert summary_of(capsys.readouterr().err)["done"] == 5


async def test_close_is_idempotent_and_never_raises(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from rich.console import Console

    console = Console(file=io.StringIO(), force_terminal=True, color_system=None)
    display = ProgressDisplay(fake_engine("twice"), console=console)
    assert display.mode == "live"
    display.close()
    display.close()
    assert display.mode == "closed"
    assert summary_of(ANSI.sub("", console.file.getvalue()))  # type: ignore[attr-defined]

    def broken(self: ProgressDisplay) -> str:
        raise RuntimeError("summary bug")

    monkeypatch.setattr(ProgressDisplay, "summary_line", broken)
    caplog.set_level(logging.WARNING, logger="asyncflow.progress")
    plain = ProgressDisplay(fake_engine("broken"))
    plain.close()  # logs, does not raise
    plain.close()
    assert [r.getMessage() for r in caplog.records] == [
        "progress display failed to close"
    ]
    capsys.readouterr()


SCRIPT = textwrap.dedent(
    """
    import asyncio
    from asyncflow import LocalExecutionBackend, TaskEvent, WorkflowEngine

    async def main(n):
        async with await WorkflowEngine.create(
            backend=LocalExecutionBackend(), progress=True
        ) as flow:
            @flow.function_task
            def double(x):
                return 2 * x

            return sum(await asyncio.gather(*(double(i) for i in range(n))))

    async def many():
        engines = [
            await WorkflowEngine.create(backend=LocalExecutionBackend(), progress=True)
            for _ in range(3)
        ]
        for flow in engines:
            await flow.shutdown()

    print(asyncio.run(main(10)), asyncio.run(main(20)))
    asyncio.run(many())
    """
)


def test_asyncio_run_in_a_script_with_many_engines(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["90", "380"]
    done_counts = [found["done"] for found in summaries(done.stderr)]
    assert done_counts == [10, 20, 0, 0, 0], done.stderr
    assert "Traceback" not in done.stderr


# -- the batch path -------------------------------------------------------------


class _Task(SimpleNamespace):
    """A stand-in for a TaskFuture: hashed by identity, as records key them."""

    __hash__ = object.__hash__
    __eq__ = object.__eq__


def _lifecycles(seed: int, tasks: int) -> list[tuple[str, float, Any]]:
    """Interleaved lifecycles, some with retries and some never started."""
    import random

    rng = random.Random(seed)
    steps = []
    for n in range(tasks):
        task = _Task(uid=f"task.{n:06d}", name=f"t{n}")
        path = ["submitted", "started"] * (1 + (rng.random() < 0.2))
        path = [*path[:2], "retried", *path[2:]] if len(path) == 4 else path
        if rng.random() < 0.1:
            path = path[:1]  # submitted only: still waiting at the end
        elif rng.random() < 0.8:
            path.append(rng.choice(["done", "failed", "cancelled"]))
        steps.append([(kind, task) for kind in path])
    events: list[tuple[str, float, Any]] = []
    clock = 0.0
    while any(steps):
        lifecycle = rng.choice([s for s in steps if s])
        kind, task = lifecycle.pop(0)
        clock += 1.0
        events.append((kind, clock, task))
    return events


@pytest.mark.parametrize("seed", range(8))
async def test_batches_of_records_count_as_events_one_by_one(seed: int) -> None:
    """The C-level batch path of ``records`` ends where taking the same
    events one at a time does: counts, running tasks and their order."""
    import random

    events = _lifecycles(seed, 60)
    one_by_one = ProgressDisplay(fake_engine("one"))
    batched = ProgressDisplay(fake_engine("batched"))
    try:
        rng = random.Random(seed)
        start = 0
        while start < len(events):
            end = start + rng.randint(1, 25)
            flat: list[Any] = []
            for kind, when, task in events[start:end]:
                flat += (kind, when, task, 1, None, None, None)
                one_by_one(TaskEvent(kind, when, task.uid, task.name))
            batched.records(flat)
            start = end
        assert batched.counts == one_by_one.counts
        assert batched.state_counts() == one_by_one.state_counts()
        running = [(name, uid) for name, uid, _ in batched.longest_running(100)]
        assert running == [(n, u) for n, u, _ in one_by_one.longest_running(100)]
        assert running  # some tasks are still running or waiting at the end
    finally:
        one_by_one.close()
        batched.close()
