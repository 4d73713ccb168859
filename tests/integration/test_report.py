"""SPEC §9: the run report, rendered from a run trace alone.

The main cases render the trace of a real 1,000-task run (a layered graph on
the thread backend, with failures and a retry) to HTML and PNG and check what
the files hold against counts taken from the trace itself. Small hand-written
traces pin down the critical path, escaping and the edge cases. The last case
opens the HTML page in a headless Chromium: required when ``CI`` is set.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from asyncflow import AsyncioExecutionBackend, LocalExecutionBackend, WorkflowEngine
from asyncflow.observers.trace import read_trace
from asyncflow.report import MAX_ROWS, PNG_SIZE, render_report, summarize

LAYERS = 10
WIDTH = 100
#: Steps that raise: late in the graph, so that failures stay a minority.
FAILING = frozenset({805, 850, 905, 960})
FINAL = {"done", "failed", "cancelled", "restored"}
DONE_GREEN = (0x2F, 0x9E, 0x64)


# -- the real run -------------------------------------------------------------


async def _layered_run(trace: Path) -> None:
    rng = random.Random(1234)
    backend = LocalExecutionBackend(ThreadPoolExecutor(4))
    async with await WorkflowEngine.create(
        backend=backend, trace=trace, handle_signals=False
    ) as flow:
        calls = {"flaky": 0}

        @flow.function_task
        def step(*inputs: object, index: int) -> int:
            time.sleep(0.0002 * (index % 5))
            if index in FAILING:
                raise ValueError(f"step {index} got <script>alert({index})</script>")
            return index

        @flow.function_task(retries=2, retry_delay=0.0)
        def flaky() -> str:
            calls["flaky"] += 1
            if calls["flaky"] == 1:
                raise ConnectionError("first try <b>lost</b>")
            return "ok"

        futures: list[Any] = []
        previous: list[Any] = []
        for layer in range(LAYERS):
            # 999 steps and the flaky task: 1,000 tasks.
            count = WIDTH - 1 if layer == LAYERS - 1 else WIDTH
            current = [
                step(
                    *(rng.sample(previous, 2) if previous else []),
                    index=layer * WIDTH + k,
                )
                for k in range(count)
            ]
            futures += current
            previous = current
        futures.append(flaky())
        await asyncio.gather(*futures, return_exceptions=True)


@pytest.fixture(scope="module")
def real_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    trace = tmp_path_factory.mktemp("report") / "run.jsonl"
    asyncio.run(_layered_run(trace))
    return trace


@pytest.fixture(scope="module")
def real_html(real_trace: Path) -> Path:
    return render_report(real_trace, real_trace.with_name("report.html"))


def final_states(trace: Path) -> Counter[str]:
    _, events = read_trace(trace)
    final = {e["uid"]: e["kind"] for e in events if e["kind"] in FINAL}
    uids = {e["uid"] for e in events}
    return Counter(final.get(uid, "unfinished") for uid in uids)


# -- reading what was written -------------------------------------------------

_VOID = {"meta", "br", "hr", "img", "input", "link", "col", "wbr"}


class PageReader(HTMLParser):
    """Checks the tags are balanced and collects what the tests look at."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.tags: Counter[str] = Counter()
        self.cells: dict[str, str] = {}
        self.critical: list[str] = []
        self.svg_titles = 0
        self.text: list[str] = []
        self._cell: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] += 1
        found = dict(attrs)
        if tag == "td" and found.get("data-state"):
            self._cell = found["data-state"]
            self.cells[self._cell] = ""
        if tag == "tr" and found.get("class") == "crit":
            self.critical.append(found.get("data-uid") or "")
        if tag == "title" and "svg" in self.stack:
            self.svg_titles += 1
        if tag not in _VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1:]}")
            if tag in self.stack:
                while self.stack.pop() != tag:
                    pass
            return
        self.stack.pop()
        if tag == "td":
            self._cell = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self.cells[self._cell] += data


def read_page(path: Path) -> PageReader:
    reader = PageReader()
    reader.feed(path.read_text(encoding="utf-8"))
    reader.close()
    assert not reader.problems, reader.problems[:5]
    assert not reader.stack, f"unclosed tags: {reader.stack}"
    return reader


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def colour_census(path: Path) -> tuple[int, float, int]:
    """Distinct colours, share of non-white pixels, pixels near DONE_GREEN."""
    from PIL import Image

    with Image.open(path) as image:
        pixels = image.convert("RGB")
        colours = pixels.getcolors(maxcolors=1 << 24) or []
    total = sum(count for count, _ in colours)
    white = sum(count for count, rgb in colours if min(rgb) >= 250)
    green = sum(
        count
        for count, rgb in colours
        if all(abs(c - g) <= 12 for c, g in zip(rgb, DONE_GREEN, strict=True))
    )
    return len(colours), (total - white) / total, green


# -- hand-written traces --------------------------------------------------------


def write_trace(path: Path, tasks: list[dict[str, Any]]) -> Path:
    """A trace of ``tasks`` (uid, name, deps, created, start, end, state, error),
    times in seconds from a fixed epoch."""
    t0 = 1_750_000_000.0
    header = {
        "format": "asyncflow-trace",
        "version": 1,
        "started": t0,
        "engine": "test",
        "run_id": "handmade",
        "backends": ["default"],
    }
    events: list[dict[str, Any]] = []

    def event(kind: str, t: float, task: dict[str, Any], **extra: Any) -> None:
        record = {
            "kind": kind,
            "time": t0 + t,
            "uid": task["uid"],
            "name": task.get("name", task["uid"]),
            "backend": task.get("backend", "default"),
            "workflow_id": None,
            "attempt": 0,
            "duration": None,
            "error": None,
            "parent": None,
            "dependencies": [],
            "kind_of_task": None,
        }
        record.update(extra)
        events.append(record)

    for task in tasks:
        created = task.get("created", 0.0)
        event(
            "created",
            created,
            task,
            dependencies=task.get("deps", []),
            kind_of_task="function",
        )
        event("ready", created, task)
        if task.get("start") is not None:
            event("started", task["start"], task, attempt=1)
        if task.get("end") is not None:
            ran = task["end"] - task["start"] if task.get("start") is not None else None
            event(
                task.get("state", "done"),
                task["end"],
                task,
                attempt=1,
                duration=ran,
                error=task.get("error"),
            )
    events.sort(key=lambda e: e["time"])
    lines = [json.dumps(header)] + [json.dumps(e) for e in events]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -- the real run, as HTML and PNG -------------------------------------------------


def test_html_report_of_a_real_1000_task_run(real_trace: Path, real_html: Path) -> None:
    assert real_html.is_file()
    page = read_page(real_html)
    expected = final_states(real_trace)
    assert sum(expected.values()) == LAYERS * WIDTH
    assert expected["failed"] >= len(FAILING)
    # The totals table matches the trace, state by state.
    for state in ("done", "failed", "cancelled", "restored", "unfinished"):
        assert page.cells[state].replace(",", "") == str(expected[state]), state
    assert page.cells["total"].replace(",", "") == str(LAYERS * WIDTH)
    # Two inline SVG charts; one tooltip per attempt (the retry makes two).
    assert page.tags["svg"] == 2
    _, events = read_trace(real_trace)
    attempts = sum(1 for e in events if e["kind"] == "started")
    assert page.svg_titles == attempts
    text = " ".join(page.text)
    assert "1,000" in text
    assert "first try <b>lost</b>" in text  # the retried attempt's error
    assert "Critical path" in text
    assert "Slowest tasks" in text
    # Self-contained: nothing to load, nothing to run.
    raw = real_html.read_text(encoding="utf-8")
    assert "<script" not in raw
    assert "http://" not in raw.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in raw


def test_summary_of_a_real_run_is_consistent(real_trace: Path) -> None:
    summary = summarize(real_trace)
    assert summary.totals["failed"] == final_states(real_trace)["failed"]
    assert summary.retries == 1
    flaky = next(t for t in summary.tasks if t.name == "flaky")
    assert [a.outcome for a in flaky.attempts] == ["retried", "done"]
    # The critical path ends with the task that finished last and each task
    # in it is a dependency of the next.
    path = summary.critical_path
    last = max((t for t in summary.tasks if t.end is not None), key=lambda t: t.end)
    assert path[-1].end == last.end
    for before, after in itertools.pairwise(path):
        assert before.uid in after.dependencies
    assert 0 < summary.critical_path_length <= summary.wall_time
    durations = [t.running_time for t in summary.slowest]
    assert len(durations) == 10
    assert durations == sorted(durations, reverse=True)
    assert summary.peak_concurrency >= 1


def test_png_report_of_a_real_1000_task_run(real_trace: Path) -> None:
    pytest.importorskip("matplotlib")
    out = render_report(real_trace, real_trace.with_name("report.png"))
    assert out.is_file()
    assert png_size(out) == PNG_SIZE
    colours, inked, green = colour_census(out)
    assert colours > 50, "the image looks blank"
    assert inked > 0.05
    assert green > 2000, "no bars of finished tasks were drawn"


# -- hand-made cases --------------------------------------------------------------


def test_critical_path_of_a_hand_made_chain(tmp_path: Path) -> None:
    trace = write_trace(
        tmp_path / "chain.jsonl",
        [
            {"uid": "task.000001", "name": "a", "start": 0.0, "end": 1.0},
            {"uid": "task.000002", "name": "b", "deps": ["task.000001"], "start": 1.0, "end": 3.0},
            # The side branch: also after a, also feeding c, but done early.
            {"uid": "task.000003", "name": "side", "deps": ["task.000001"], "start": 1.0, "end": 1.5},
            {"uid": "task.000004", "name": "c", "deps": ["task.000002", "task.000003"], "start": 3.0, "end": 4.0},
            # Independent and short.
            {"uid": "task.000005", "name": "lone", "start": 0.0, "end": 0.5},
        ],
    )  # fmt: skip
    summary = summarize(trace)
    assert [t.name for t in summary.critical_path] == ["a", "b", "c"]
    assert summary.critical_path_length == pytest.approx(4.0)
    assert summary.wall_time == pytest.approx(4.0)
    page = read_page(render_report(trace, tmp_path / "chain.html"))
    assert page.critical == ["task.000001", "task.000002", "task.000004"]


def test_strings_from_the_trace_are_escaped(tmp_path: Path) -> None:
    hostile = "<script>alert('name')</script>"
    trace = write_trace(
        tmp_path / "hostile.jsonl",
        [
            {"uid": "task.000001", "name": hostile, "start": 0.0, "end": 1.0},
            {
                "uid": "task.000002",
                "name": "<b>bold</b>",
                "backend": "<i>gpu</i>",
                "start": 0.5,
                "end": 2.0,
                "state": "failed",
                "error": 'ValueError: <script>alert("error")</script> & <img src=x>',
            },
        ],
    )
    raw = render_report(trace, tmp_path / "hostile.html").read_text(encoding="utf-8")
    for text in ("<script", "<img", "<b>bold", "<i>gpu"):
        assert text not in raw, text
    page = read_page(tmp_path / "hostile.html")
    text = "".join(page.text)
    # Escaped, the strings read back exactly as they were.
    assert hostile in text
    assert '<script>alert("error")</script> & <img src=x>' in text


def test_failures_are_grouped_when_there_are_many(tmp_path: Path) -> None:
    tasks = [
        {
            "uid": f"task.{i:06d}",
            "name": "fetch",
            "start": i * 0.01,
            "end": i * 0.01 + 0.005,
            "state": "failed",
            "error": f"DependencyFailureError: task 'fetch' (task.{i:06d}) did not run",
        }
        for i in range(1, 61)
    ]
    tasks.append(
        {"uid": "task.000061", "name": "x", "start": 0, "end": 1, "state": "failed",
         "error": "OSError: disk full"}
    )  # fmt: skip
    trace = write_trace(tmp_path / "many.jsonl", tasks)
    page = read_page(render_report(trace, tmp_path / "many.html"))
    text = " ".join(page.text)
    assert "61 failures, 2 distinct errors" in text
    assert "did not run" in text
    assert "OSError: disk full" in text
    assert "and 55 more" in text


def test_a_cut_off_trace_shows_unfinished_work(tmp_path: Path) -> None:
    trace = write_trace(
        tmp_path / "cut.jsonl",
        [
            {"uid": "task.000001", "name": "a", "start": 0.0, "end": 1.0},
            {"uid": "task.000002", "name": "b", "start": 0.5},
        ],
    )
    with trace.open("a", encoding="utf-8") as file:
        file.write('{"kind": "done", "ti')  # the run died mid-write
    summary = summarize(trace)
    assert summary.totals["unfinished"] == 1
    unfinished = summary.tasks[1]
    assert [a.outcome for a in unfinished.attempts] == ["unfinished"]
    assert unfinished.attempts[0].end == pytest.approx(1.0)
    read_page(render_report(trace, tmp_path / "cut.html"))


def test_a_trace_without_events(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "empty.jsonl", [])
    page = read_page(render_report(trace, tmp_path / "empty.htm"))
    assert "no task ran" in " ".join(page.text)
    assert page.cells["total"] == "0"
    if _has_matplotlib():
        out = render_report(trace, tmp_path / "empty.PNG")
        assert png_size(out) == PNG_SIZE


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_ten_thousand_tasks_stay_readable(tmp_path: Path) -> None:
    """Every task running at once gives 10,000 lanes: rows are capped."""
    rng = random.Random(5)
    tasks = []
    for i in range(1, 10_001):
        start = rng.uniform(0, 2)
        tasks.append(
            {
                "uid": f"task.{i:06d}",
                "name": f"fetch_{i % 5}",
                "deps": [f"task.{i - 1:06d}"] if i % 100 else [],
                "start": start,
                "end": start + rng.uniform(5, 10),
                "state": "failed" if i % 97 == 0 else "done",
                "error": "TimeoutError: slow" if i % 97 == 0 else None,
            }
        )
    trace = write_trace(tmp_path / "big.jsonl", tasks)
    out = render_report(trace, tmp_path / "big.html")
    page = read_page(out)
    text = " ".join(page.text)
    lanes_per_row = -(-10_000 // MAX_ROWS)
    assert f"Each row shows {lanes_per_row} lanes" in text
    assert page.svg_titles == 0  # no per-bar tooltips at this size
    assert page.tags["text"] < 100  # labels stay sparse
    assert out.stat().st_size < 3_000_000
    assert page.cells["failed"] == str(10_000 // 97)
    if _has_matplotlib():
        png = render_report(trace, tmp_path / "big.png")
        assert png_size(png) == PNG_SIZE
        colours, _, green = colour_census(png)
        assert colours > 50
        assert green > 2000


async def _two_backends_and_a_block(trace: Path) -> None:
    backends = [
        LocalExecutionBackend(ThreadPoolExecutor(2), name="cpu"),
        AsyncioExecutionBackend(name="io"),
    ]
    async with await WorkflowEngine.create(
        backend=backends, trace=trace, handle_signals=False
    ) as flow:

        @flow.function_task(backend="cpu")
        def crunch(x: int) -> int:
            time.sleep(0.01)
            return x * 2

        @flow.function_task(backend="io")
        async def fetch(x: int) -> int:
            await asyncio.sleep(0.01)
            return x

        @flow.block
        async def pipeline(x: int) -> int:
            return await crunch(fetch(x))

        await asyncio.gather(*(pipeline(i) for i in range(6)))


def test_backends_and_blocks_get_lanes_of_their_own(tmp_path: Path) -> None:
    trace = tmp_path / "two.jsonl"
    asyncio.run(_two_backends_and_a_block(trace))
    summary = summarize(trace)
    assert summary.totals["done"] == 18
    # Each block's path is fetch -> crunch: the block is not a task on it.
    assert [t.name for t in summary.critical_path] == ["fetch", "crunch"]
    assert all(not t.is_block for t in summary.slowest)
    page = read_page(render_report(trace, tmp_path / "two.html"))
    text = " ".join(page.text)
    for band in ("cpu", "io", "blocks"):
        assert band in text
    if _has_matplotlib():
        assert png_size(render_report(trace, tmp_path / "two.png")) == PNG_SIZE


def test_the_format_comes_from_the_suffix(tmp_path: Path) -> None:
    trace = write_trace(
        tmp_path / "t.jsonl", [{"uid": "task.000001", "start": 0, "end": 1}]
    )
    for name in ("report.pdf", "report", "report.html.txt"):
        with pytest.raises(ValueError, match=r"\.html, \.htm, \.png"):
            render_report(trace, tmp_path / name)
        assert not (tmp_path / name).exists()
    assert render_report(trace, str(tmp_path / "r.HTML")) == tmp_path / "r.HTML"


def test_png_without_matplotlib_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trace = write_trace(
        tmp_path / "t.jsonl", [{"uid": "task.000001", "start": 0, "end": 1}]
    )
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install 'asyncflow\[matplotlib\]'"):
        render_report(trace, tmp_path / "r.png")
    assert not (tmp_path / "r.png").exists()


# -- in a real browser ---------------------------------------------------------------


def test_the_page_in_a_headless_browser(real_html: Path, tmp_path: Path) -> None:
    """The page renders in Chromium: the screenshot shows the charts and the
    console shows no error. (The page has no script at all; the check guards
    against one creeping in.)"""
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but chromium is not installed (.ci/run installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    shot = tmp_path / "screenshot.png"
    done = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            f"--screenshot={shot}",
            "--window-size=1400,1000",
            real_html.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert shot.is_file(), (
        f"no screenshot (exit {done.returncode}):\n{done.stderr[-3000:]}"
    )
    assert "Uncaught" not in done.stderr, done.stderr[-3000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console
    assert png_size(shot) == (1400, 1000)
    colours, inked, green = colour_census(shot)
    assert colours > 50, "the page looks blank"
    assert inked > 0.05
    assert green > 2000, "the Gantt chart's bars are not on screen"
