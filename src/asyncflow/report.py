"""The run report: a Gantt chart, concurrency over time and a summary of a run.

:func:`render_report` reads a run trace (see :mod:`asyncflow.observers.trace`)
and writes either a self-contained HTML page (charts drawn as inline SVG, no
scripts, no external resources: it works offline and can be mailed around)
or a PNG image of :data:`PNG_SIZE` pixels drawn with matplotlib (extra
``matplotlib``). :func:`summarize` gives the numbers the report shows.

Everything comes from the trace alone. The trace does not say which worker
ran a task, so the attempts of each backend are packed greedily into lanes
in which no two attempts overlap: the number of lanes in use at a moment is
the number of attempts running then. Past :data:`MAX_ROWS` lanes, several
lanes share one drawn row.
"""

from __future__ import annotations

import heapq
import html
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .observers.trace import read_trace

__all__ = [
    "MAX_ROWS",
    "PNG_SIZE",
    "Attempt",
    "RunSummary",
    "TaskRecord",
    "render_report",
    "summarize",
]

#: Width and height in pixels of a PNG report.
PNG_SIZE = (1600, 1000)
_PNG_DPI = 100
#: The most rows a Gantt chart draws; more lanes than this share rows.
MAX_ROWS = 300
#: Final states, in the order the report lists them.
STATES = ("done", "failed", "cancelled", "restored", "unfinished")
#: How many of the slowest tasks the report lists.
SLOWEST = 10

_HTML_SUFFIXES = (".html", ".htm")
_PNG_SUFFIXES = (".png",)

# Bar colours by the outcome of an attempt; "retried" is an attempt that failed
# and was run again, "unfinished" one still running when the trace ends.
_COLOURS = {
    "done": "#2f9e64",
    "failed": "#d64541",
    "cancelled": "#8d96a3",
    "retried": "#f0a030",
    "unfinished": "#6a5acd",
    "restored": "#3b82c4",
}
# The lighter tint of the waiting segment before an attempt started.
_WAIT_COLOURS = {
    "done": "#a9d8bf",
    "failed": "#efb0ae",
    "cancelled": "#cfd4da",
    "retried": "#f8d49c",
    "unfinished": "#c4bdef",
    "restored": "#b1cdea",
}
_OUTCOME_LABELS = {
    "done": "done",
    "failed": "failed",
    "cancelled": "cancelled",
    "retried": "failed attempt, retried",
    "unfinished": "unfinished (trace ends)",
}


# -- the model --------------------------------------------------------------


@dataclass
class Attempt:
    """One run of a task: from its ``started`` event to the event ending it.

    Times are seconds since the run's first event. ``outcome`` is ``done``,
    ``failed``, ``cancelled``, ``retried`` (failed and run again) or
    ``unfinished`` (still running when the trace ends). ``waited_from`` is
    when the task could have started this attempt at the earliest it is
    known: its creation for the first attempt, the retry for a later one.
    """

    task: TaskRecord
    number: int
    start: float
    end: float = math.nan
    outcome: str = "unfinished"
    waited_from: float | None = None

    @property
    def duration(self) -> float:
        return max(0.0, self.end - self.start)


@dataclass
class TaskRecord:
    """A task or block as the trace tells it (times in seconds since the
    run's first event)."""

    uid: str
    name: str
    backend: str | None = None
    kind_of_task: str | None = None
    parent: str | None = None
    workflow_id: str | None = None
    dependencies: tuple[str, ...] = ()
    created: float | None = None
    ready: float | None = None
    #: ``done``, ``failed``, ``cancelled``, ``restored`` or ``unfinished``.
    state: str = "unfinished"
    #: When the final event came (None while unfinished).
    end: float | None = None
    error: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    #: The errors of the attempts that were retried.
    retry_errors: list[str] = field(default_factory=list)

    @property
    def is_block(self) -> bool:
        return self.kind_of_task == "block" or (
            self.kind_of_task is None and self.uid.startswith("block.")
        )

    @property
    def running_time(self) -> float:
        """Seconds spent running, all attempts together."""
        return sum(a.duration for a in self.attempts)

    @property
    def first_start(self) -> float | None:
        return self.attempts[0].start if self.attempts else None

    @property
    def waited(self) -> float | None:
        """Seconds from creation to the first start (dependencies, queue)."""
        if self.created is None or not self.attempts:
            return None
        return max(0.0, self.attempts[0].start - self.created)


@dataclass
class RunSummary:
    """What a run's report shows; see :func:`summarize`."""

    header: dict[str, Any]
    #: Every task and block, in the order they were created.
    tasks: list[TaskRecord]
    #: Epoch second of the first event: the report's time zero.
    start: float
    #: Seconds from the first event to the last.
    wall_time: float
    #: Tasks and blocks per final state (every state of :data:`STATES`).
    totals: dict[str, int]
    #: The chain that ended last: each task is the dependency of the next
    #: that finished last, back from the task (not block) that finished last.
    critical_path: list[TaskRecord]
    #: From the start of the path's first task to the end of its last.
    critical_path_length: float
    #: The tasks (not blocks) with the longest running time, longest first.
    slowest: list[TaskRecord]
    #: Every task or block that ended FAILED, in the order they ended.
    failures: list[TaskRecord]
    #: Attempts that failed and were run again.
    retries: int
    #: The most attempts of tasks (not blocks) running at once.
    peak_concurrency: int

    @property
    def attempts(self) -> list[Attempt]:
        return [a for t in self.tasks for a in t.attempts]


def summarize(trace: str | os.PathLike[str]) -> RunSummary:
    """Read a trace file and compute what its report shows."""
    header, events = read_trace(trace)
    return _summarize(header, events)


def _summarize(header: dict[str, Any], events: Sequence[dict[str, Any]]) -> RunSummary:
    times = [float(e["time"]) for e in events if _is_number(e.get("time"))]
    if times:
        t0, t_last = min(times), max(times)
    else:
        t0 = float(header.get("started", 0.0) or 0.0)
        t_last = t0
    tasks: dict[str, TaskRecord] = {}
    running: dict[str, Attempt] = {}
    eligible: dict[str, float] = {}

    for event in events:
        uid = str(event.get("uid", ""))
        kind = event.get("kind")
        if not uid or not _is_number(event.get("time")):
            continue
        t = float(event["time"]) - t0
        task = tasks.get(uid)
        if task is None:
            task = tasks[uid] = TaskRecord(uid=uid, name=str(event.get("name", uid)))
        if event.get("backend") is not None and task.backend is None:
            task.backend = str(event["backend"])
        if kind == "created":
            task.name = str(event.get("name", task.name))
            task.created = t
            task.kind_of_task = event.get("kind_of_task") or task.kind_of_task
            task.parent = event.get("parent")
            task.workflow_id = event.get("workflow_id")
            task.dependencies = tuple(str(d) for d in event.get("dependencies") or ())
            eligible[uid] = t
        elif kind == "ready":
            if task.ready is None:
                task.ready = t
            eligible.setdefault(uid, t)
        elif kind == "started":
            current = running.pop(uid, None)
            if current is not None:  # a start without an end: cut it here
                current.end, current.outcome = t, "unfinished"
            attempt = Attempt(
                task,
                int(event.get("attempt") or len(task.attempts) + 1),
                t,
                waited_from=eligible.pop(uid, None),
            )
            task.attempts.append(attempt)
            running[uid] = attempt
        elif kind == "retried":
            _close(task, running.pop(uid, None), event, t, "retried")
            task.retry_errors.append(str(event.get("error") or "unknown error"))
            eligible[uid] = t
        elif kind in ("done", "failed", "cancelled"):
            _close(task, running.pop(uid, None), event, t, str(kind))
            task.state, task.end = str(kind), t
            if event.get("error") is not None:
                task.error = str(event["error"])
        elif kind == "restored":
            task.state, task.end = "restored", t
    end = t_last - t0
    for attempt in running.values():
        attempt.end, attempt.outcome = max(end, attempt.start), "unfinished"

    ordered = sorted(
        tasks.values(),
        key=lambda r: r.created if r.created is not None else math.inf,
    )
    totals = dict.fromkeys(STATES, 0)
    for record in ordered:
        totals[record.state] = totals.get(record.state, 0) + 1
    path = _critical_path(tasks, ordered)
    if path:
        first = path[0].first_start
        begin = first if first is not None else (path[0].end or 0.0)
        length = max(0.0, (path[-1].end or 0.0) - begin)
    else:
        length = 0.0
    work = [r for r in ordered if not r.is_block and r.attempts]
    slowest = sorted(work, key=lambda r: r.running_time, reverse=True)[:SLOWEST]
    failures = sorted(
        (r for r in ordered if r.state == "failed"), key=lambda r: r.end or 0.0
    )
    levels = _concurrency([a for r in work for a in r.attempts])
    return RunSummary(
        header=header,
        tasks=ordered,
        start=t0,
        wall_time=end,
        totals=totals,
        critical_path=path,
        critical_path_length=length,
        slowest=slowest,
        failures=failures,
        retries=sum(len(r.retry_errors) for r in ordered),
        peak_concurrency=max((level for _, level in levels), default=0),
    )


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _close(
    task: TaskRecord,
    attempt: Attempt | None,
    event: dict[str, Any],
    t: float,
    outcome: str,
) -> None:
    duration = event.get("duration")
    if attempt is None:
        # No ``started`` seen (a backend that does not report it): the
        # duration still places the attempt.
        if not isinstance(duration, (int, float)) or duration <= 0:
            return
        attempt = Attempt(task, int(event.get("attempt") or 1), t - float(duration))
        task.attempts.append(attempt)
    attempt.end = max(t, attempt.start)
    attempt.outcome = outcome


def _critical_path(
    tasks: dict[str, TaskRecord], ordered: list[TaskRecord]
) -> list[TaskRecord]:
    ended = [r for r in ordered if r.end is not None]
    candidates = [r for r in ended if not r.is_block] or ended
    if not candidates:
        return []
    # max() keeps the first of equal ends; prefer the one created last.
    current = max(reversed(candidates), key=lambda r: r.end or 0.0)
    path = [current]
    seen = {current.uid}
    while True:
        upstream = [
            tasks[uid]
            for uid in current.dependencies
            if uid in tasks and uid not in seen and tasks[uid].end is not None
        ]
        if not upstream:
            break
        current = max(upstream, key=lambda r: r.end or 0.0)
        path.append(current)
        seen.add(current.uid)
    path.reverse()
    return path


def _concurrency(attempts: Iterable[Attempt]) -> list[tuple[float, int]]:
    """(time, attempts running from then on) at every change, in time order."""
    changes: list[tuple[float, int]] = []
    for a in attempts:
        changes.append((a.start, 1))
        changes.append((max(a.end, a.start), -1))
    changes.sort()  # at equal times, ends (-1) before starts
    levels: list[tuple[float, int]] = []
    level = 0
    for t, delta in changes:
        level += delta
        if levels and levels[-1][0] == t:
            levels[-1] = (t, level)
        else:
            levels.append((t, level))
    return levels


# -- lanes ------------------------------------------------------------------


@dataclass
class _Band:
    label: str
    lanes: int
    first_row: int = 0
    rows: int = 0


@dataclass
class _Layout:
    bands: list[_Band]
    rows: int
    #: Lanes per drawn row (1 unless there are more than MAX_ROWS lanes).
    per_row: int
    #: Drawn row of every attempt, by id().
    row_of: dict[int, int]


def _layout(summary: RunSummary, max_rows: int = MAX_ROWS) -> _Layout:
    """Pack each backend's attempts into non-overlapping lanes."""
    groups: dict[tuple[bool, str], list[Attempt]] = {}
    for name in summary.header.get("backends") or ():
        groups[(False, str(name))] = []
    for record in summary.tasks:
        if not record.attempts:
            continue
        key = (True, "blocks") if record.is_block else (False, record.backend or "?")
        groups.setdefault(key, []).extend(record.attempts)
    keys = sorted(groups, key=lambda k: k[0])  # blocks last, stable otherwise
    lanes_of: dict[tuple[bool, str], dict[int, int]] = {}
    lane_count: dict[tuple[bool, str], int] = {}
    for key in keys:
        free: list[tuple[float, int]] = []  # (free from, lane)
        count = 0
        placed: dict[int, int] = {}
        for a in sorted(groups[key], key=lambda a: (a.start, a.end)):
            if free and free[0][0] <= a.start:
                _, lane = heapq.heappop(free)
            else:
                lane, count = count, count + 1
            placed[id(a)] = lane
            heapq.heappush(free, (max(a.end, a.start), lane))
        lanes_of[key], lane_count[key] = placed, count
    used = [k for k in keys if lane_count[k]]
    total = sum(lane_count[k] for k in used)
    per_row = max(1, math.ceil(total / max_rows))
    bands: list[_Band] = []
    row_of: dict[int, int] = {}
    row = 0
    for key in used:
        band = _Band(key[1], lane_count[key], first_row=row)
        band.rows = math.ceil(band.lanes / per_row)
        for attempt_id, lane in lanes_of[key].items():
            row_of[attempt_id] = row + lane // per_row
        row += band.rows
        bands.append(band)
    return _Layout(bands, row, per_row, row_of)


# -- formatting -------------------------------------------------------------


def _seconds(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    if value >= 100:
        return f"{value:,.0f} s"
    if value >= 1:
        return f"{value:.2f} s"
    if value >= 0.001:
        return f"{value:.3f} s"
    return f"{value:.2g} s"


def _ticks(high: float, count: int = 8) -> tuple[list[float], int]:
    """Round tick values from 0 to ``high`` and the decimals to print them."""
    if high <= 0:
        return [0.0], 0
    raw = high / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return [i * step for i in range(int(high / step + 1e-9) + 1)], decimals


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _count(number: int, word: str) -> str:
    return f"{number:,} {word}{'' if number == 1 else 's'}"


def _title_line(summary: RunSummary) -> str:
    totals = summary.totals
    items = sum(totals.values())
    parts = [f"{totals[s]:,} {s}" for s in STATES if totals.get(s)]
    line = _count(items, "task") + (f" ({', '.join(parts)})" if parts else "")
    if summary.retries:
        line += ", " + _count(summary.retries, "retried attempt")
    return f"{line} · wall time {_seconds(summary.wall_time)}"


def _error_groups(records: Iterable[TaskRecord]) -> list[tuple[str, list[TaskRecord]]]:
    """Failures by error, the task's own uid blanked out so that the same
    error of many tasks is one group; largest group first."""
    groups: dict[str, list[TaskRecord]] = {}
    for record in records:
        key = (record.error or "unknown error").replace(record.uid, "…")
        groups.setdefault(key, []).append(record)
    return sorted(groups.items(), key=lambda item: -len(item[1]))


# -- entry point --------------------------------------------------------------


def render_report(
    trace: str | os.PathLike[str], output: str | os.PathLike[str]
) -> Path:
    """Write the report of the run recorded in ``trace`` to ``output``.

    The suffix of ``output`` picks the format: ``.html`` or ``.htm`` for a
    self-contained page, ``.png`` for an image of :data:`PNG_SIZE` pixels
    (needs matplotlib: ``pip install 'asyncflow[matplotlib]'``). Returns the
    path written.
    """
    path = Path(output)
    suffix = path.suffix.lower()
    accepted = ", ".join(_HTML_SUFFIXES + _PNG_SUFFIXES)
    if suffix not in _HTML_SUFFIXES + _PNG_SUFFIXES:
        raise ValueError(
            f"cannot tell the report format from {str(output)!r}: the output "
            f"file must end in one of {accepted}"
        )
    if suffix in _PNG_SUFFIXES:
        _require_matplotlib()  # before reading a possibly large trace
    summary = summarize(trace)
    if suffix in _PNG_SUFFIXES:
        _render_png(summary, path)
    else:
        page = _render_html(summary, Path(trace).name)
        path.write_text(page, encoding="utf-8")
    return path


# -- HTML -------------------------------------------------------------------

_E = html.escape

_SVG_WIDTH = 1200
_LEFT = 160
_RIGHT = 24
_PLOT_WIDTH = _SVG_WIDTH - _LEFT - _RIGHT
#: Above this many bars, bars carry no tooltip and are drawn as one path per
#: colour, which keeps the page small and quick to draw.
_TOOLTIP_BARS = 3000
#: The most bars given a name label inside them.
_BAR_LABELS = 30

_CSS = """
body{margin:0;background:#f4f5f7;color:#1d2430;
font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif}
main{max-width:1240px;margin:0 auto;padding:20px 20px 40px}
h1{font-size:24px;margin:0 0 4px}
h2{font-size:18px;margin:28px 0 8px}
.meta{color:#5b6472;margin:0 0 16px}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:8px 14px;
min-width:110px}
.card .v{font-size:22px;font-weight:600}
.card .k{color:#5b6472;font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.chart{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:8px;
overflow-x:auto}
.chart svg{display:block;max-width:100%;height:auto}
.legend{margin:0 0 6px;color:#3a4350}
.legend span{display:inline-block;margin-right:14px;white-space:nowrap}
.legend i{display:inline-block;width:12px;height:12px;border-radius:2px;
vertical-align:-1px;margin-right:5px}
.legend i.wait{height:4px;vertical-align:3px}
.legend i.crit{background:#fff;border:2px solid #111;width:9px;height:9px}
.note{color:#5b6472;font-size:13px;margin:6px 0 0}
table{border-collapse:collapse;background:#fff;border:1px solid #dde1e7;
font-size:13px;min-width:360px}
th,td{padding:4px 10px;border-bottom:1px solid #eceef2;text-align:left;
vertical-align:top}
th{background:#f0f2f5;font-weight:600}
td.n{text-align:right;font-variant-numeric:tabular-nums}
td.err{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;
word-break:break-word;max-width:720px}
.sw{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px}
footer{margin-top:32px;color:#7a8391;font-size:12px}
"""


def _render_html(summary: RunSummary, trace_name: str) -> str:
    from . import __version__

    header = summary.header
    run_id = str(header.get("run_id") or "?")
    started = header.get("started", summary.start)
    when = (
        datetime.fromtimestamp(float(started), tz=timezone.utc).strftime(
            "%Y-%m-%d %H:%M:%S UTC"
        )
        if _is_number(started)
        else "?"
    )
    backends = ", ".join(str(b) for b in header.get("backends") or ()) or "?"
    layout = _layout(summary)
    critical = {id(a) for r in summary.critical_path for a in r.attempts}
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>AsyncFlow run report: {_E(run_id)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        "<main>",
        "<h1>AsyncFlow run report</h1>",
        f'<p class="meta">Run <b>{_E(run_id)}</b> of engine '
        f"{_E(str(header.get('engine') or '?'))} · backends {_E(backends)} · "
        f"started {_E(when)} · trace {_E(trace_name)}</p>",
        _cards(summary),
        "<h2>Timeline</h2>",
        _legend(),
        '<div class="chart">',
        _gantt_svg(summary, layout, critical),
        "</div>",
        _gantt_note(summary, layout),
        "<h2>Concurrency</h2>",
        '<div class="chart">',
        _concurrency_svg(summary),
        "</div>",
        '<p class="note">Attempts of tasks running at each moment (blocks not '
        "counted).</p>",
        "<h2>Totals</h2>",
        _totals_table(summary),
        "<h2>Critical path</h2>",
        _critical_table(summary),
        "<h2>Slowest tasks</h2>",
        _slowest_table(summary),
        "<h2>Failures</h2>",
        _failures_table(summary),
    ]
    if summary.retries:
        parts += ["<h2>Retried attempts</h2>", _retries_table(summary)]
    parts += [
        f"<footer>Made by asyncflow {_E(__version__)} from the trace alone; the "
        "page has no scripts and loads nothing from the network.</footer>",
        "</main>",
        "</body>",
        "</html>",
        "",
    ]
    return "\n".join(parts)


def _cards(summary: RunSummary) -> str:
    totals = summary.totals
    cards = [
        ("wall time", _seconds(summary.wall_time), "wall"),
        ("tasks", f"{sum(totals.values()):,}", "tasks"),
        *[(s, f"{totals[s]:,}", s) for s in STATES if totals[s] or s == "failed"],
        ("retried attempts", f"{summary.retries:,}", "retries"),
        ("peak running", f"{summary.peak_concurrency:,}", "peak"),
        ("critical path", _seconds(summary.critical_path_length), "critical"),
    ]
    body = "".join(
        f'<div class="card" data-card="{key}"><div class="v">{_E(value)}</div>'
        f'<div class="k">{_E(label)}</div></div>'
        for label, value, key in cards
    )
    return f'<section class="cards">{body}</section>'


def _legend() -> str:
    items = [
        f'<span><i style="background:{_COLOURS[k]}"></i>{_E(label)}</span>'
        for k, label in _OUTCOME_LABELS.items()
    ]
    items.append(
        f'<span><i class="wait" style="background:{_WAIT_COLOURS["done"]}"></i>'
        "waiting (dependencies, queue, retry delay)</span>"
    )
    items.append('<span><i class="crit"></i>critical path</span>')
    return f'<p class="legend">{"".join(items)}</p>'


def _gantt_note(summary: RunSummary, layout: _Layout) -> str:
    lanes = sum(b.lanes for b in layout.bands)
    text = (
        f"One bar per attempt, {len(summary.attempts):,} in all, packed into "
        f"{lanes:,} lane{'s' if lanes != 1 else ''} (per backend) so that bars in "
        "a lane never overlap: the trace does not name workers, and the lanes in "
        "use at a moment are the attempts running then."
    )
    if layout.per_row > 1:
        text += f" Each row shows {layout.per_row} lanes."
    never = sum(1 for r in summary.tasks if not r.attempts)
    if never:
        text += (
            f" {never:,} task{'s' if never != 1 else ''} never ran (restored, or "
            "failed or cancelled before starting) and have no bar."
        )
    return f'<p class="note">{_E(text)}</p>'


def _f(value: float) -> str:
    """A coordinate: short, no trailing zeros."""
    text = f"{value:.1f}"
    return text[:-2] if text.endswith(".0") else text


def _time_axis(
    parts: list[str], span: float, top: float, bottom: float, scale: float
) -> None:
    ticks, decimals = _ticks(span)
    for tick in ticks:
        x = _f(_LEFT + tick * scale)
        parts.append(
            f'<line x1="{x}" x2="{x}" y1="{_f(top)}" y2="{_f(bottom)}" '
            'stroke="#e6e9ee"/>'
        )
        parts.append(
            f'<text x="{x}" y="{_f(bottom + 14)}" text-anchor="middle">'
            f"{tick:.{decimals}f}</text>"
        )
    parts.append(
        f'<line x1="{_LEFT}" x2="{_LEFT + _PLOT_WIDTH}" y1="{_f(bottom)}" '
        f'y2="{_f(bottom)}" stroke="#9aa3af"/>'
    )


def _gantt_svg(summary: RunSummary, layout: _Layout, critical: set[int]) -> str:
    span = summary.wall_time if summary.wall_time > 0 else 1.0
    scale = _PLOT_WIDTH / span
    rows = max(layout.rows, 1)
    row_h = max(2.0, min(20.0, 640.0 / rows))
    top = 8.0
    plot_h = rows * row_h
    bottom = top + plot_h
    height = bottom + 38
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_SVG_WIDTH}" '
        f'height="{_f(height)}" viewBox="0 0 {_SVG_WIDTH} {_f(height)}" '
        'font-family="system-ui,Helvetica,Arial,sans-serif" font-size="11" '
        'fill="#3a4350" role="img" aria-label="Gantt chart of the task attempts">'
    ]
    # Bands: alternate shading, a name and a lane count in the margin.
    for index, band in enumerate(layout.bands):
        y = top + band.first_row * row_h
        h = band.rows * row_h
        if index % 2:
            parts.append(
                f'<rect x="{_LEFT}" y="{_f(y)}" width="{_PLOT_WIDTH}" '
                f'height="{_f(h)}" fill="#f5f7fa"/>'
            )
        if index:
            parts.append(
                f'<line x1="4" x2="{_LEFT + _PLOT_WIDTH}" y1="{_f(y)}" '
                f'y2="{_f(y)}" stroke="#b8c0cc"/>'
            )
        lanes = f"{band.lanes:,} lane{'s' if band.lanes != 1 else ''}"
        middle = y + h / 2
        if h >= 28:
            parts.append(
                f'<text x="8" y="{_f(middle - 2)}" font-weight="600">'
                f"{_E(_short(band.label, 22))}</text>"
                f'<text x="8" y="{_f(middle + 12)}" fill="#6b7380">{lanes}</text>'
            )
        elif h >= 9:
            parts.append(
                f'<text x="8" y="{_f(middle + 4)}"><tspan font-weight="600">'
                f"{_E(_short(band.label, 14))}</tspan> · {lanes}</text>"
            )
    _time_axis(parts, span, top, bottom, scale)
    parts.append(
        f'<text x="{_LEFT + _PLOT_WIDTH / 2:.0f}" y="{_f(bottom + 32)}" '
        'text-anchor="middle" fill="#5b6472">seconds since the first event</text>'
    )
    if not layout.bands:
        parts.append(
            f'<text x="{_LEFT + _PLOT_WIDTH / 2:.0f}" y="{_f(top + plot_h / 2 + 4)}" '
            'text-anchor="middle">no task ran</text>'
        )
    attempts = [a for a in summary.attempts if id(a) in layout.row_of]
    min_w = 0.6
    bar_h = row_h * (0.8 if row_h >= 4 else 1.0)
    wait_h = max(1.0, row_h * 0.22)

    def row_y(a: Attempt) -> float:
        return top + layout.row_of[id(a)] * row_h + row_h / 2

    # Waiting segments first, under the bars; one path per colour.
    waits: dict[str, list[str]] = {}
    for a in attempts:
        if a.waited_from is None or a.start - a.waited_from <= 0:
            continue
        x = _LEFT + a.waited_from * scale
        w = (a.start - a.waited_from) * scale
        if w < 0.5:
            continue
        y = row_y(a) - wait_h / 2
        waits.setdefault(a.outcome, []).append(
            f"M{_f(x)} {_f(y)}h{_f(w)}v{_f(wait_h)}h{_f(-w)}z"
        )
    for outcome, segments in waits.items():
        parts.append(f'<path fill="{_WAIT_COLOURS[outcome]}" d="{"".join(segments)}"/>')
    opacity = ' fill-opacity="0.75"' if layout.per_row > 1 else ""
    if len(attempts) <= _TOOLTIP_BARS:
        for a in attempts:
            x = _LEFT + a.start * scale
            w = max(min_w, a.duration * scale)
            y = row_y(a) - bar_h / 2
            tip = (
                f"{a.task.name} ({a.task.uid}) attempt {a.number}: {a.outcome}, "
                f"{_seconds(a.duration)} from {a.start:.3f} s"
            )
            parts.append(
                f'<rect x="{_f(x)}" y="{_f(y)}" width="{_f(w)}" height="{_f(bar_h)}" '
                f'fill="{_COLOURS[a.outcome]}"{opacity}><title>{_E(tip)}</title></rect>'
            )
    else:
        bars: dict[str, list[str]] = {}
        for a in attempts:
            x = _LEFT + a.start * scale
            w = max(min_w, a.duration * scale)
            y = row_y(a) - bar_h / 2
            bars.setdefault(a.outcome, []).append(
                f"M{_f(x)} {_f(y)}h{_f(w)}v{_f(bar_h)}h{_f(-w)}z"
            )
        for outcome, segments in bars.items():
            parts.append(
                f'<path fill="{_COLOURS[outcome]}"{opacity} d="{"".join(segments)}"/>'
            )
    # The critical path, outlined.
    for a in attempts:
        if id(a) in critical:
            x = _LEFT + a.start * scale
            w = max(min_w, a.duration * scale)
            y = row_y(a) - bar_h / 2
            parts.append(
                f'<rect x="{_f(x)}" y="{_f(y)}" width="{_f(w)}" height="{_f(bar_h)}" '
                'fill="none" stroke="#111" stroke-width="1.4"/>'
            )
    # A few labels: the widest bars whose name fits inside them.
    if row_h >= 13 and layout.per_row == 1:
        fitting = [
            a
            for a in attempts
            if a.duration * scale >= len(_short(a.task.name, 24)) * 6.2 + 8
        ]
        fitting.sort(key=lambda a: a.duration, reverse=True)
        per_name: Counter[str] = Counter()
        labelled = []
        for a in fitting:
            if per_name[a.task.name] < 2:
                per_name[a.task.name] += 1
                labelled.append(a)
        for a in labelled[:_BAR_LABELS]:
            parts.append(
                f'<text x="{_f(_LEFT + a.start * scale + 4)}" '
                f'y="{_f(row_y(a) + 4)}" fill="#fff">'
                f"{_E(_short(a.task.name, 24))}</text>"
            )
    parts.append("</svg>")
    return "\n".join(parts)


def _concurrency_svg(summary: RunSummary) -> str:
    span = summary.wall_time if summary.wall_time > 0 else 1.0
    scale = _PLOT_WIDTH / span
    top, plot_h = 10.0, 170.0
    bottom = top + plot_h
    height = bottom + 38
    levels = _concurrency(
        a for r in summary.tasks if not r.is_block for a in r.attempts
    )
    peak = max((level for _, level in levels), default=0)
    y_ticks, _ = _ticks(max(peak, 1), 4)
    y_ticks = [t for t in y_ticks if t == int(t)] or [0.0]
    y_max = max(float(peak), y_ticks[-1], 1.0)

    def y_of(level: float) -> float:
        return bottom - level / y_max * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_SVG_WIDTH}" '
        f'height="{_f(height)}" viewBox="0 0 {_SVG_WIDTH} {_f(height)}" '
        'font-family="system-ui,Helvetica,Arial,sans-serif" font-size="11" '
        'fill="#3a4350" role="img" aria-label="Running tasks over time">'
    ]
    _time_axis(parts, span, top, bottom, scale)
    for tick in y_ticks:
        y = _f(y_of(tick))
        parts.append(
            f'<line x1="{_LEFT}" x2="{_LEFT + _PLOT_WIDTH}" y1="{y}" y2="{y}" '
            'stroke="#eef0f3"/>'
            f'<text x="{_LEFT - 6}" y="{_f(y_of(tick) + 4)}" text-anchor="end">'
            f"{int(tick):,}</text>"
        )
    parts.append(
        f'<text x="14" y="{_f(top + plot_h / 2)}" transform="rotate(-90 14 '
        f'{_f(top + plot_h / 2)})" text-anchor="middle" fill="#5b6472">'
        "running tasks</text>"
    )
    parts.append(
        f'<text x="{_LEFT + _PLOT_WIDTH / 2:.0f}" y="{_f(bottom + 32)}" '
        'text-anchor="middle" fill="#5b6472">seconds since the first event</text>'
    )
    # A step line; changes within one half-pixel column are merged into a
    # vertical stroke covering their range, so 20,000 changes stay small.
    d = [f"M{_LEFT} {_f(y_of(0))}"]
    column: float | None = None
    low = high = last = 0
    previous = 0
    for t, level in levels:
        x = round((_LEFT + t * scale) * 2) / 2
        if x != column:
            if column is not None:
                d.append(_step(column, previous, low, high, last, y_of))
                previous = last
            column, low, high = x, min(previous, level), max(previous, level)
        low, high, last = min(low, level), max(high, level), level
    if column is not None:
        d.append(_step(column, previous, low, high, last, y_of))
    d.append(f"H{_LEFT + _PLOT_WIDTH}")
    line = "".join(d)
    parts.append(
        f'<path d="{line}V{_f(y_of(0))}H{_LEFT}z" fill="#dbe7f6" stroke="none"/>'
    )
    parts.append(f'<path d="{line}" fill="none" stroke="#2f6db5" stroke-width="1.3"/>')
    parts.append(
        f'<text x="{_LEFT + _PLOT_WIDTH - 4}" y="{_f(top + 12)}" text-anchor="end">'
        f"peak {peak:,} running</text>"
    )
    parts.append("</svg>")
    return "\n".join(parts)


def _step(
    x: float,
    previous: int,
    low: int,
    high: int,
    last: int,
    y_of: Callable[[float], float],
) -> str:
    if low == min(previous, last) and high == max(previous, last):
        return f"H{_f(x)}V{_f(y_of(last))}"
    return f"H{_f(x)}V{_f(y_of(high))}V{_f(y_of(low))}V{_f(y_of(last))}"


def _table(head: Sequence[str], rows: Iterable[str], cls: str) -> str:
    cells = "".join(f"<th>{_E(h)}</th>" for h in head)
    return (
        f'<table class="{cls}"><thead><tr>{cells}</tr></thead><tbody>'
        + "".join(rows)
        + "</tbody></table>"
    )


def _state_cell(state: str) -> str:
    colour = _COLOURS.get(state, "#999")
    return f'<td><span class="sw" style="background:{colour}"></span>{_E(state)}</td>'


def _totals_table(summary: RunSummary) -> str:
    rows = [
        f"<tr>{_state_cell(s)}"
        f'<td class="n" data-state="{s}">{summary.totals[s]:,}</td></tr>'
        for s in STATES
    ]
    blocks = sum(1 for r in summary.tasks if r.is_block)
    total = sum(summary.totals.values())
    rows.append(f'<tr><th>all</th><td class="n" data-state="total">{total:,}</td></tr>')
    table = _table(("final state", "tasks"), rows, "totals")
    extra = (
        f'<p class="note">Counts include {blocks:,} block'
        f"{'s' if blocks != 1 else ''}.</p>"
        if blocks
        else ""
    )
    return table + extra


def _task_cells(record: TaskRecord) -> str:
    return (
        f"<td>{_E(record.name)}</td><td>{_E(record.uid)}</td>"
        f"<td>{_E(record.backend or ('block' if record.is_block else '-'))}</td>"
    )


def _critical_table(summary: RunSummary) -> str:
    path = summary.critical_path
    if not path:
        return '<p class="note">No task finished: there is no critical path.</p>'
    intro = (
        f"<p>{len(path):,} task{'s' if len(path) != 1 else ''} spanning "
        f'<b data-critical-length="{summary.critical_path_length:.6f}">'
        f"{_seconds(summary.critical_path_length)}</b> "
        f"(running {_seconds(sum(r.running_time for r in path))} of it), "
        "from the start of the first to the end of the last. Each task is the "
        "dependency of the next that finished last.</p>"
    )
    shown: list[tuple[int, TaskRecord] | None] = list(enumerate(path, 1))
    if len(path) > 40:
        shown = [*shown[:20], None, *shown[-20:]]
    rows = []
    for item in shown:
        if item is None:
            rows.append(
                f'<tr><td colspan="8">… {len(path) - 40:,} more tasks …</td></tr>'
            )
            continue
        step, record = item
        rows.append(
            f'<tr class="crit" data-uid="{_E(record.uid)}"><td class="n">{step}</td>'
            f"{_task_cells(record)}{_state_cell(record.state)}"
            f'<td class="n">{_seconds(record.first_start)}</td>'
            f'<td class="n">{_seconds(record.end)}</td>'
            f'<td class="n">{_seconds(record.running_time)}</td></tr>'
        )
    return intro + _table(
        ("#", "task", "uid", "backend", "state", "started at", "ended at", "ran"),
        rows,
        "critical",
    )


def _slowest_table(summary: RunSummary) -> str:
    if not summary.slowest:
        return '<p class="note">No task ran.</p>'
    rows = [
        f"<tr>{_task_cells(r)}{_state_cell(r.state)}"
        f'<td class="n">{len(r.attempts)}</td>'
        f'<td class="n">{_seconds(r.running_time)}</td>'
        f'<td class="n">{_seconds(r.waited)}</td></tr>'
        for r in summary.slowest
    ]
    return _table(
        ("task", "uid", "backend", "state", "attempts", "ran", "waited before"),
        rows,
        "slowest",
    )


def _examples(records: Sequence[TaskRecord], limit: int = 5) -> str:
    names = ", ".join(f"{r.name} ({r.uid})" for r in records[:limit])
    if len(records) > limit:
        names += f" and {len(records) - limit:,} more"
    return _E(names)


def _failures_table(summary: RunSummary) -> str:
    failures = summary.failures
    if not failures:
        return '<p class="note">No task failed.</p>'
    if len(failures) <= 20:
        rows = [
            f"<tr>{_task_cells(r)}<td class='n'>{len(r.attempts)}</td>"
            f'<td class="n">{_seconds(r.end)}</td>'
            f'<td class="err">{_E(r.error or "unknown error")}</td></tr>'
            for r in failures
        ]
        return _table(
            ("task", "uid", "backend", "attempts", "failed at", "error"),
            rows,
            "failures",
        )
    groups = _error_groups(failures)
    intro = (
        f"<p>{len(failures):,} failures, {len(groups):,} distinct error"
        f"{'s' if len(groups) != 1 else ''} (a task's own uid is shown as …).</p>"
    )
    shown = groups[:50]
    rows = [
        f'<tr><td class="n">{len(records):,}</td><td class="err">{_E(error)}</td>'
        f"<td>{_examples(records)}</td></tr>"
        for error, records in shown
    ]
    if len(groups) > len(shown):
        rest = sum(len(records) for _, records in groups[len(shown) :])
        rows.append(
            f'<tr><td class="n">{rest:,}</td><td colspan="2">'
            f"{len(groups) - len(shown):,} other errors</td></tr>"
        )
    return intro + _table(("tasks", "error", "for example"), rows, "failures")


def _retries_table(summary: RunSummary) -> str:
    counts: Counter[str] = Counter()
    tasks: dict[str, list[TaskRecord]] = {}
    for record in summary.tasks:
        for error in record.retry_errors:
            key = error.replace(record.uid, "…")
            counts[key] += 1
            if record not in tasks.setdefault(key, []):
                tasks[key].append(record)
    rows = [
        f'<tr><td class="n">{count:,}</td><td class="err">{_E(error)}</td>'
        f"<td>{_examples(tasks[error])}</td></tr>"
        for error, count in counts.most_common(30)
    ]
    return _table(("attempts", "error", "tasks"), rows, "retries")


# -- PNG --------------------------------------------------------------------


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "a PNG report needs matplotlib: pip install 'asyncflow[matplotlib]' "
            "(or write an .html report, which needs nothing)"
        ) from exc


def _render_png(summary: RunSummary, path: Path) -> None:
    _require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    width, height = PNG_SIZE
    figure = Figure(figsize=(width / _PNG_DPI, height / _PNG_DPI), dpi=_PNG_DPI)
    FigureCanvasAgg(figure)  # the Agg backend, without touching pyplot
    figure.subplots_adjust(left=0.1, right=0.98, top=0.87, bottom=0.06, hspace=0.18)
    grid = figure.add_gridspec(2, 1, height_ratios=(3, 1))
    gantt = figure.add_subplot(grid[0])
    running = figure.add_subplot(grid[1], sharex=gantt)
    run_id = summary.header.get("run_id") or "?"
    figure.suptitle(
        f"AsyncFlow run {run_id}: {_title_line(summary)}",
        fontsize=14,
        fontweight="bold",
        y=0.975,
    )
    path_text = (
        f"critical path: {_count(len(summary.critical_path), 'task')}, "
        f"{_seconds(summary.critical_path_length)} · peak "
        f"{summary.peak_concurrency:,} running"
    )
    figure.text(0.5, 0.935, path_text, ha="center", fontsize=11, color="#3a4350")

    span = summary.wall_time if summary.wall_time > 0 else 1.0
    layout = _layout(summary)
    critical = {id(a) for r in summary.critical_path for a in r.attempts}
    min_w = span / 1400
    bar_h = 0.8 if layout.rows <= 150 else 1.0
    bars: dict[str, list[list[tuple[float, float]]]] = {}
    waits: dict[str, list[list[tuple[float, float]]]] = {}
    outlines: list[list[tuple[float, float]]] = []

    def box(x0: float, x1: float, y: float, h: float) -> list[tuple[float, float]]:
        return [(x0, y - h / 2), (x1, y - h / 2), (x1, y + h / 2), (x0, y + h / 2)]

    for a in summary.attempts:
        row = layout.row_of.get(id(a))
        if row is None:
            continue
        x1 = max(a.end, a.start + min_w)
        bars.setdefault(a.outcome, []).append(box(a.start, x1, row, bar_h))
        if a.waited_from is not None and a.start - a.waited_from > min_w:
            waits.setdefault(a.outcome, []).append(
                box(a.waited_from, a.start, row, bar_h * 0.25)
            )
        if id(a) in critical:
            outlines.append(box(a.start, x1, row, bar_h))
    for outcome, polygons in waits.items():
        gantt.add_collection(
            PolyCollection(
                polygons, facecolors=_WAIT_COLOURS[outcome], linewidths=0, zorder=1
            )
        )
    alpha = 0.75 if layout.per_row > 1 else 1.0
    for outcome, polygons in bars.items():
        gantt.add_collection(
            PolyCollection(
                polygons,
                facecolors=_COLOURS[outcome],
                linewidths=0,
                alpha=alpha,
                zorder=2,
            )
        )
    if outlines:
        gantt.add_collection(
            PolyCollection(
                outlines, facecolors="none", edgecolors="#111", linewidths=1.2, zorder=3
            )
        )
    rows = max(layout.rows, 1)
    gantt.set_xlim(0, span)
    gantt.set_ylim(rows - 0.5, -0.5)
    ticks, labels = [], []
    for index, band in enumerate(layout.bands):
        if index:
            gantt.axhline(band.first_row - 0.5, color="#9aa3af", linewidth=0.8)
        if index % 2:
            gantt.axhspan(
                band.first_row - 0.5,
                band.first_row + band.rows - 0.5,
                color="#f2f4f7",
                zorder=0,
            )
        ticks.append(band.first_row + (band.rows - 1) / 2)
        labels.append(
            f"{_short(band.label, 18)}\n{band.lanes:,} lane"
            + ("s" if band.lanes != 1 else "")
        )
    gantt.set_yticks(ticks, labels)
    gantt.tick_params(axis="y", length=0, labelsize=10)
    gantt.tick_params(axis="x", labelbottom=False)
    gantt.grid(axis="x", color="#e6e9ee", linewidth=0.8, zorder=0)
    gantt.set_axisbelow(True)
    if not layout.bands:
        gantt.text(0.5, 0.5, "no task ran", ha="center", transform=gantt.transAxes)
    lane_note = "tasks by backend, packed into lanes"
    if layout.per_row > 1:
        lane_note += f" ({layout.per_row} lanes per row)"
    gantt.set_ylabel(lane_note, fontsize=10)
    handles = [
        Patch(facecolor=_COLOURS[k], label=label)
        for k, label in _OUTCOME_LABELS.items()
    ]
    handles.append(Patch(facecolor=_WAIT_COLOURS["done"], label="waiting"))
    handles.append(
        Patch(facecolor="none", edgecolor="#111", linewidth=1.2, label="critical path")
    )
    gantt.legend(
        handles=handles,
        loc="lower left",
        bbox_to_anchor=(0.0, 1.005),
        ncol=len(handles),
        frameon=False,
        fontsize=9.5,
        handlelength=1.4,
        borderaxespad=0.2,
    )

    levels = _concurrency(
        a for r in summary.tasks if not r.is_block for a in r.attempts
    )
    xs = [0.0] + [t for t, _ in levels] + [span]
    ys = [0] + [level for _, level in levels]
    ys.append(ys[-1])
    running.fill_between(xs, ys, step="post", color="#dbe7f6", linewidth=0)
    running.step(xs, ys, where="post", color="#2f6db5", linewidth=1.2)
    running.set_ylim(0, max(summary.peak_concurrency, 1) * 1.1)
    running.set_ylabel("running tasks", fontsize=10)
    running.set_xlabel("seconds since the first event", fontsize=10)
    running.grid(color="#e6e9ee", linewidth=0.8)
    running.set_axisbelow(True)
    running.yaxis.set_major_locator(MaxNLocator(integer=True))
    figure.savefig(path, dpi=_PNG_DPI, format="png", facecolor="white")
