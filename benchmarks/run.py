#!/usr/bin/env python3
"""Run the side-by-side benchmark suite: our library, its peers, raw baselines.

    python3 benchmarks/run.py                 # everything (make bench)
    python3 benchmarks/run.py --only W1,W4    # some workloads
    python3 benchmarks/run.py --group "W4 checkpoint" --systems asyncflow
    python3 benchmarks/run.py --reps 3        # fewer repetitions
    python3 benchmarks/run.py --quick         # tiny sizes, our library only

The full suite builds ``benchmarks/.venv`` (our package installed editable
plus the pinned peers), then runs every case in a fresh process, interleaving
the systems (A B C A B C ...) so that slow drifts of a noisy machine hit
every system alike. It prints a table of medians, writes
``benchmarks/results/latest.json`` and ``benchmarks/RESULTS.md``.

``--quick`` needs no peer environment: it runs tiny sizes of every workload
on our library with the current interpreter and writes
``benchmarks/results/quick.json`` (or ``--out``), nothing else.

Only the standard library is used here, so any Python 3.10+ can run it.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
VENV = BENCH / ".venv"
RESULTS = BENCH / "results"

PEERS = (
    "radical-asyncflow==0.6.0",
    "parsl==2026.10.26",
    "dask[distributed]==2026.8.0",
)
#: Distributions whose versions the results record.
VERSIONED = (
    "asyncflow-workflows",
    "radical.asyncflow",
    "parsl",
    "dask",
    "distributed",
    "cloudpickle",
)

OURS = "asyncflow"
SYSTEM_NAMES = {
    "asyncflow": "AsyncFlow (ours)",
    "raw": "raw baseline",
    "parsl": "Parsl",
    "radical": "RADICAL AsyncFlow",
    "dask": "Dask distributed",
}
MODULES = {
    "asyncflow": "asyncflow_",
    "raw": "raw",
    "parsl": "parsl_",
    "radical": "radical",
    "dask": "dask_",
}
SYSTEMS = tuple(MODULES)
DASK_OURS = "AsyncFlow (ours), DaskExecutionBackend"

TASKS_PER_S = "tasks/s"
US_PER_HOP = "µs/hop"
#: Milliseconds per operation: the median of the operations of one run.
MS_EACH = "ms"
HIGHER_IS_BETTER = {TASKS_PER_S: True, US_PER_HOP: False, MS_EACH: False}


@dataclass(frozen=True)
class Case:
    """One system running one workload at one size."""

    system: str
    size: int
    variant: str = ""
    #: Size in --quick mode; None keeps the case out of quick runs.
    quick: int | None = None
    #: Repetitions, when fewer than the suite's (a slow peer at full size).
    reps: int | None = None
    label: str = ""
    note: str = ""

    @property
    def name(self) -> str:
        return self.label or SYSTEM_NAMES[self.system]


@dataclass(frozen=True)
class Group:
    """A table section: one workload (and backend), several systems side by side.

    The first case is ours and is the reference of the ratios.
    """

    key: str
    workload: str
    title: str
    metric: str
    cases: tuple[Case, ...]


GROUPS: tuple[Group, ...] = (
    Group(
        "W1",
        "W1",
        "wide: 10,000 independent no-op function tasks, 4 threads",
        TASKS_PER_S,
        (
            Case("asyncflow", 10_000, quick=200),
            Case("asyncflow", 10_000, "def", 200, label="AsyncFlow (ours), def bodies"),
            Case("raw", 10_000, note="run_in_executor"),
            Case("parsl", 10_000),
            Case("radical", 10_000, reps=3, note="3 reps (about 40 s a run)"),
            Case("dask", 5_000, note="5,000 tasks (10,000 take ~15 s)"),
        ),
    ),
    Group(
        "W1 observed",
        "W1",
        "the same 10,000 no-op tasks watched: a trace file, a progress "
        "display (stderr to a file), and neither; async def bodies as in W1, "
        "then def bodies",
        TASKS_PER_S,
        (
            Case("asyncflow", 10_000, "", 200, label="AsyncFlow (ours), plain"),
            Case(
                "asyncflow",
                10_000,
                "trace",
                200,
                label="AsyncFlow (ours), trace",
                note="every event written to a JSON-lines file",
            ),
            Case(
                "asyncflow",
                10_000,
                "progress",
                200,
                label="AsyncFlow (ours), progress",
                note="plain-line mode (stderr is not a terminal)",
            ),
            Case("asyncflow", 10_000, "def", 200, label="AsyncFlow (ours), def, plain"),
            Case(
                "asyncflow",
                10_000,
                "def-trace",
                200,
                label="AsyncFlow (ours), def, trace",
                note="every event written to a JSON-lines file",
            ),
            Case(
                "asyncflow",
                10_000,
                "def-progress",
                200,
                label="AsyncFlow (ours), def, progress",
                note="plain-line mode (stderr is not a terminal)",
            ),
        ),
    ),
    Group(
        "W1 resources",
        "W1",
        "the same 10,000 no-op def tasks, with and without resources= "
        "(1 cpu, 1 MiB, 1 of a custom resource) declared on every task",
        TASKS_PER_S,
        (
            Case("asyncflow", 10_000, "def", 200, label="AsyncFlow (ours), plain"),
            Case(
                "asyncflow",
                10_000,
                "def-resources",
                200,
                label="AsyncFlow (ours), resources",
                note="every task admitted against cpus, memory and a custom count",
            ),
        ),
    ),
    Group(
        "W2 threads",
        "W2",
        "chain: 1,000 tasks each depending on the previous, 4 threads",
        US_PER_HOP,
        (
            Case("asyncflow", 1_000, "threads", 50),
            Case(
                "asyncflow",
                1_000,
                "threads-def",
                50,
                label="AsyncFlow (ours), def bodies",
            ),
            Case("raw", 1_000, "threads", note="sequential run_in_executor"),
            Case("parsl", 1_000),
            Case("radical", 200, "threads", note="200 hops (~22 ms each)"),
            Case("dask", 500, note="500 hops"),
        ),
    ),
    Group(
        "W2 asyncio",
        "W2",
        "chain of 1,000 on our asyncio-native backend",
        US_PER_HOP,
        (
            Case("asyncflow", 1_000, "asyncio", 50),
            Case("raw", 1_000, "asyncio", note="sequential create_task + await"),
        ),
    ),
    Group(
        "W2 dry-run",
        "W2",
        "chain of 1,000 in a dry run",
        US_PER_HOP,
        (
            Case("asyncflow", 1_000, "dry", 50),
            Case("radical", 200, "dry", note="200 hops (~10 ms each)"),
        ),
    ),
    Group(
        "W3",
        "W3",
        "exec: 1,000 /bin/true executable tasks, 8 at a time",
        TASKS_PER_S,
        (
            Case(
                "asyncflow", 1_000, quick=20, note="default settings (no shell needed)"
            ),
            Case("raw", 1_000, note="create_subprocess_exec, semaphore of 8"),
            Case("parsl", 1_000, note="bash_app: always via /bin/bash -c"),
            Case("radical", 1_000, note="8 calls in flight (no backend limit)"),
            Case("dask", 1_000, note="subprocess.run on 8 threads"),
        ),
    ),
    Group(
        "W4 100k",
        "W4",
        "layered DAG, dry run: layers of 100, each task on 2 of the layer above",
        TASKS_PER_S,
        (
            Case(
                "asyncflow",
                100_000,
                quick=2_000,
                note="the whole graph registered, then run",
            ),
            Case(
                "asyncflow",
                100_000,
                "eager",
                quick=2_000,
                label="AsyncFlow (ours), eager=True",
                note="NoopExecutionBackend(eager=True): a task ends at its call",
            ),
            Case("raw", 100_000, note="futures + done-callbacks"),
            Case("radical", 100_000),
            Case("parsl", 100_000, reps=3, note="no dry run: no-op apps, 4 threads"),
        ),
    ),
    Group(
        "W4 1M",
        "W4",
        "the same layered DAG with 1,000,000 tasks",
        TASKS_PER_S,
        (
            Case(
                "asyncflow",
                1_000_000,
                quick=10_000,
                note="the whole graph registered, then run",
            ),
            Case(
                "asyncflow",
                1_000_000,
                "eager",
                quick=10_000,
                reps=3,
                label="AsyncFlow (ours), eager=True",
                note="NoopExecutionBackend(eager=True): a task ends at its call",
            ),
            Case("raw", 1_000_000, reps=3, note="futures + done-callbacks"),
        ),
    ),
    Group(
        "W4 checkpoint",
        "W4",
        "the layered DAG of 100,000 tasks run for real on 4 threads, with a "
        "checkpoint file and without (wall includes shutdown)",
        TASKS_PER_S,
        (
            Case(
                "asyncflow",
                100_000,
                "threads-checkpoint",
                2_000,
                label="AsyncFlow (ours), checkpoint",
                note="every result keyed, signed and written to SQLite",
            ),
            Case(
                "asyncflow",
                100_000,
                "threads",
                2_000,
                label="AsyncFlow (ours), no checkpoint",
            ),
        ),
    ),
    Group(
        "W5",
        "W5",
        "I/O-bound: 10,000 tasks each awaiting asyncio.sleep(0.05)",
        TASKS_PER_S,
        (
            Case("asyncflow", 10_000, quick=200, note="asyncio-native backend"),
            Case("raw", 10_000, note="asyncio.gather"),
            Case("parsl", 2_000, note="2,000 tasks, time.sleep on 100 threads"),
            Case("radical", 1_000, note="1,000 tasks, asyncio.run on 100 threads"),
        ),
    ),
    Group(
        "W6",
        "W6",
        "map-reduce: 10,000 maps + binary-tree reduce (19,999 tasks), 4 threads",
        TASKS_PER_S,
        (
            Case("asyncflow", 10_000, quick=200),
            Case("asyncflow", 10_000, "def", 200, label="AsyncFlow (ours), def bodies"),
            Case("raw", 10_000, note="run_in_executor + a task per reduction"),
            Case("parsl", 10_000),
            Case("radical", 2_000, note="2,000 maps (3,999 tasks)"),
            Case("dask", 2_000, note="2,000 maps (3,999 tasks)"),
        ),
    ),
    # Our DaskExecutionBackend beside raw Dask on the same cluster shape
    # (one in-process worker, 4 threads) with the same task bodies.
    Group(
        "W1 dask",
        "W1",
        "wide on Dask: 5,000 no-op tasks, each result fetched",
        TASKS_PER_S,
        (
            Case("asyncflow", 5_000, "dask", 50, label=DASK_OURS),
            Case("dask", 5_000, note="client.submit, then client.gather"),
        ),
    ),
    Group(
        "W2 dask",
        "W2",
        "chain on Dask: 500 tasks each taking the previous one's future",
        US_PER_HOP,
        (
            Case("asyncflow", 500, "dask", 20, label=DASK_OURS),
            Case("dask", 500, note="client.submit with the previous future"),
        ),
    ),
    Group(
        "W6 dask",
        "W6",
        "map-reduce on Dask: 2,000 maps + binary-tree reduce (3,999 tasks)",
        TASKS_PER_S,
        (
            Case("asyncflow", 2_000, "dask", 50, label=DASK_OURS),
            Case("dask", 2_000, note="Dask's own futures"),
        ),
    ),
    # Start-up: what a program pays before its first task.
    Group(
        "S import",
        "S",
        'python -c "import asyncflow": a fresh interpreter, bytecode compiled; '
        "median of 20 starts per run",
        MS_EACH,
        (
            Case("asyncflow", 20, "import", label="AsyncFlow (ours)"),
            Case(
                "asyncflow",
                20,
                "import-asyncio",
                label="Python + asyncio alone",
                note='python -c "import asyncio": the floor under ours',
            ),
            Case(
                "asyncflow",
                20,
                "import-python",
                label="Python alone",
                note='python -c "pass"',
            ),
        ),
    ),
    Group(
        "S engine",
        "S",
        "engine create + shutdown, empty: `async with await "
        "WorkflowEngine.create(): pass`, default thread backend; median of "
        "2,000 in one process",
        MS_EACH,
        (Case("asyncflow", 2_000, "engine", label="AsyncFlow (ours)"),),
    ),
)
WORKLOADS = ("W1", "W2", "W3", "W4", "W5", "W6", "S")


# -- running one case -----------------------------------------------------------


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_once(
    python: str,
    group: Group,
    case: Case,
    size: int,
    timeout: float,
    code: Path | None = None,
) -> dict[str, Any]:
    """Run one case in a fresh process (in a scratch directory) and parse it.

    ``code``, when given, holds a snapshot of our package that shadows the
    editable install, so that every run of a suite measures the same code.
    """
    command = [
        python,
        "-m",
        f"benchmarks.workloads.{MODULES[case.system]}",
        "--workload",
        group.workload,
        "--size",
        str(size),
        "--variant",
        case.variant,
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(code) if code else "", str(REPO), env.get("PYTHONPATH")])
    )
    for name in ("RADICAL_LOG_LVL", "ASYNCFLOW_LOG_LVL"):
        env.pop(name, None)
    scratch = tempfile.mkdtemp(prefix="asyncflow-bench-")
    record: dict[str, Any] = {"ok": False}
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            started = time.perf_counter()
            proc = subprocess.Popen(
                command,
                cwd=scratch,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
            watchdog = threading.Timer(timeout, _kill_group, (proc.pid,))
            watchdog.start()
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            finally:
                watchdog.cancel()
            proc.returncode = os.waitstatus_to_exitcode(status)
            elapsed = time.perf_counter() - started
            out.seek(0)
            err.seek(0)
            stdout = out.read().decode(errors="replace")
            stderr = err.read().decode(errors="replace")
        for line in reversed(stdout.splitlines()):
            if line.startswith("{"):
                try:
                    record = {**json.loads(line), "ok": True}
                except json.JSONDecodeError:
                    continue
                break
        if proc.returncode != 0:
            record["ok"] = False
        if not record["ok"]:
            killed = proc.returncode == -signal.SIGKILL
            reason = f"killed after {timeout:.0f} s" if killed else "failed"
            record["error"] = (
                f"{reason} (exit {proc.returncode}): {stderr.strip()[-2000:]}"
            )
        record.update(
            exit_code=proc.returncode,
            process_s=elapsed,
            parent_maxrss_mb=usage.ru_maxrss / 1024,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return record


# -- metrics and summaries -------------------------------------------------------


def metric_of(metric: str, run: dict[str, Any]) -> float:
    if metric == MS_EACH:
        return float(run.get("op_median_s", run["wall_s"] / run["tasks"]) * 1e3)
    if metric == US_PER_HOP:
        return float(run["wall_s"] / run["tasks"] * 1e6)
    return float(run["tasks"] / run["wall_s"])


def kb_per_task(run: dict[str, Any]) -> float:
    return float((run["peak_rss_mb"] - run["rss_before_mb"]) * 1024 / run["tasks"])


def _spread(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "min": None, "max": None}
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def summarize(group: Group, case: Case, runs: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in runs if r.get("ok")]
    return {
        "group": group.key,
        "workload": group.workload,
        "system": case.system,
        "name": case.name,
        "variant": case.variant,
        "size": good[0]["size"] if good else None,
        "tasks": good[0]["tasks"] if good else None,
        "note": case.note,
        "metric": group.metric,
        "higher_is_better": HIGHER_IS_BETTER[group.metric],
        "reps": len(runs),
        "ok_reps": len(good),
        "value": _spread([metric_of(group.metric, r) for r in good]),
        "wall_s": _spread([r["wall_s"] for r in good]),
        "peak_rss_mb": _spread([r["peak_rss_mb"] for r in good]),
        "kb_per_task": _spread([kb_per_task(r) for r in good]),
        # Optional modules a start-up run found loaded (S rows only).
        "extras": _spread([len(r["extras"]) for r in good if "extras" in r]),
        "runs": runs,
    }


def add_ratios(cases: list[dict[str, Any]]) -> None:
    """ratio = ours / this system, on the group's metric (medians)."""
    by_group: dict[str, list[dict[str, Any]]] = {}
    for c in cases:
        by_group.setdefault(c["group"], []).append(c)
    for members in by_group.values():
        ours = members[0]["value"]["median"]
        for c in members:
            theirs = c["value"]["median"]
            c["ratio_ours_over_this"] = (
                ours / theirs if ours is not None and theirs else None
            )


# -- targets -------------------------------------------------------------------------


@dataclass
class Target:
    key: str
    text: str
    check: Callable[
        [Callable[[str, str, str], float | None]], tuple[float | None, bool]
    ]
    shown: Callable[[float], str] = field(default=lambda v: f"{v:.2f}")


def _at_least(limit: float) -> Callable[[float | None], tuple[float | None, bool]]:
    return lambda v: (v, v is not None and v >= limit)


def _at_most(limit: float) -> Callable[[float | None], tuple[float | None, bool]]:
    return lambda v: (v, v is not None and v <= limit)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _times(v: float) -> str:
    return f"{v:.2f}x"


def _share_of(
    group: str, variant: str, base: str, floor: float
) -> Callable[[Callable[[str, str, str], float | None]], tuple[float | None, bool]]:
    """Our ``variant`` of ``group`` is at least ``floor`` of our ``base`` one."""
    return lambda q: _at_least(floor)(
        _ratio(q(group, "asyncflow", variant), q(group, "asyncflow", base))
    )


def _sum_or_none(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else sum(v or 0 for v in values)


def _min_or_none(values: list[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else min(values)  # type: ignore[type-var]


TARGETS: tuple[Target, ...] = (
    Target(
        "W1",
        "W1 throughput >= 2x Parsl",
        lambda q: _at_least(2)(_ratio(q("W1", "asyncflow", ""), q("W1", "parsl", ""))),
        _times,
    ),
    Target(
        "W1",
        "W1 throughput >= 40x RADICAL AsyncFlow",
        lambda q: _at_least(40)(
            _ratio(q("W1", "asyncflow", ""), q("W1", "radical", ""))
        ),
        _times,
    ),
    Target(
        "W1",
        "W1 throughput >= 60% of the raw baseline",
        lambda q: _at_least(0.6)(_ratio(q("W1", "asyncflow", ""), q("W1", "raw", ""))),
        _times,
    ),
    Target(
        "W2",
        "W2 threads: per hop <= 1.5x the raw executor round trip",
        lambda q: _at_most(1.5)(
            _ratio(
                q("W2 threads", "asyncflow", "threads"),
                q("W2 threads", "raw", "threads"),
            )
        ),
        _times,
    ),
    # Performance round two (async bodies are the seed's style).
    Target(
        "W1",
        "W1 async def bodies: >= 2x the raw run_in_executor baseline",
        lambda q: _at_least(2)(_ratio(q("W1", "asyncflow", ""), q("W1", "raw", ""))),
        _times,
    ),
    Target(
        "W1",
        "W1 def bodies: >= 150,000 tasks/s",
        lambda q: _at_least(150_000)(q("W1", "asyncflow", "def")),
        lambda v: f"{v:,.0f} tasks/s",
    ),
    Target(
        "W2",
        "W2 threads: per hop <= 1.0x the raw executor round trip",
        lambda q: _at_most(1.0)(
            _ratio(
                q("W2 threads", "asyncflow", "threads"),
                q("W2 threads", "raw", "threads"),
            )
        ),
        _times,
    ),
    *(
        Target(
            "W4",
            f"W4 1M dry run{label}: >= 200,000 tasks/s",
            lambda q, v=variant: _at_least(200_000)(q("W4 1M", "asyncflow", v)),
            lambda v: f"{v:,.0f} tasks/s",
        )
        for variant, label in (("", ""), ("eager", ", eager=True"))
    ),
    *(
        Target(
            "W4",
            f"W4 1M dry run{label}: peak RSS <= 400 MiB",
            lambda q, v=variant: _at_most(400)(
                q("W4 1M", "asyncflow", v, "peak_rss_mb")
            ),
            lambda v: f"{v:,.0f} MiB",
        )
        for variant, label in (("", ""), ("eager", ", eager=True"))
    ),
    Target(
        "W4",
        "W4 100k: memory per task <= 0.35 KiB",
        lambda q: _at_most(0.35)(q("W4 100k", "asyncflow", "", "kb_per_task")),
        lambda v: f"{v:.2f} KiB",
    ),
    Target(
        "W6",
        "W6 map-reduce on threads: >= 2x the raw baseline",
        lambda q: _at_least(2)(_ratio(q("W6", "asyncflow", ""), q("W6", "raw", ""))),
        _times,
    ),
    Target(
        "W2",
        "W2 asyncio-native: <= 20 µs per hop",
        lambda q: _at_most(20)(q("W2 asyncio", "asyncflow", "asyncio")),
        lambda v: f"{v:.1f} µs",
    ),
    Target(
        "W2",
        "W2 dry run: <= 20 µs per hop",
        lambda q: _at_most(20)(q("W2 dry-run", "asyncflow", "dry")),
        lambda v: f"{v:.1f} µs",
    ),
    Target(
        "W3",
        "W3 rate >= 80% of raw subprocesses at the same concurrency",
        lambda q: _at_least(0.8)(_ratio(q("W3", "asyncflow", ""), q("W3", "raw", ""))),
        _times,
    ),
    Target(
        "W4",
        "W4 100k: throughput >= 8x RADICAL AsyncFlow",
        lambda q: _at_least(8)(
            _ratio(q("W4 100k", "asyncflow", ""), q("W4 100k", "radical", ""))
        ),
        _times,
    ),
    Target(
        "W4",
        "W4 100k: memory per task <= 1/3 of RADICAL AsyncFlow's",
        lambda q: _at_most(1 / 3)(
            _ratio(
                q("W4 100k", "asyncflow", "", "kb_per_task"),
                q("W4 100k", "radical", "", "kb_per_task"),
            )
        ),
        _times,
    ),
    Target(
        "W4",
        "W4 1M: >= 50,000 tasks/s",
        lambda q: _at_least(50_000)(q("W4 1M", "asyncflow", "")),
        lambda v: f"{v:,.0f} tasks/s",
    ),
    Target(
        "W4",
        "W4 1M: peak RSS <= 1.5 GB (1,430 MiB)",
        lambda q: _at_most(1.5e9 / 2**20)(q("W4 1M", "asyncflow", "", "peak_rss_mb")),
        lambda v: f"{v:,.0f} MiB",
    ),
    *(
        Target(
            "W1",
            f"W1{label} with {what}: throughput >= {floor:.0%} of the same run without",
            _share_of("W1 observed", f"{prefix}{watch}", prefix[:-1], floor),
            _times,
        )
        for watch, what, floor in (
            ("trace", "a trace file", 0.9),
            ("progress", "progress on", 0.85),
        )
        for prefix, label in (("", ""), ("def-", " def bodies"))
    ),
    Target(
        "W1",
        "W1 with resources on every task: throughput >= 87% of the same run "
        "without (at most 15% more time)",
        _share_of("W1 resources", "def-resources", "def", 1 / 1.15),
        _times,
    ),
    Target(
        "W4",
        "W4 checkpoint: throughput >= 90% of the same run without one",
        _share_of("W4 checkpoint", "threads-checkpoint", "threads", 0.9),
        _times,
    ),
    Target(
        "W5",
        "W5: all 10,000 finish within 0.5 s wall",
        lambda q: _at_most(0.5)(q("W5", "asyncflow", "", "wall_s")),
        lambda v: f"{v:.3f} s",
    ),
    Target(
        "W6",
        "W6: ahead of every peer (lowest ours/peer throughput ratio > 1)",
        lambda q: (lambda v: (v, v is not None and v > 1))(
            _min_or_none(
                [
                    _ratio(q("W6", "asyncflow", ""), q("W6", peer, ""))
                    for peer in ("parsl", "radical", "dask")
                ]
            )
        ),
        _times,
    ),
    Target(
        "S",
        'python -c "import asyncflow" <= 35 ms',
        lambda q: _at_most(35)(q("S import", "asyncflow", "import")),
        lambda v: f"{v:.1f} ms",
    ),
    Target(
        "S",
        "no optional extra (dask, rich, matplotlib, opentelemetry, httpx, "
        "rhapsody, ...) nor cloudpickle, multiprocessing or sqlite3 loaded by "
        "import asyncflow or by a default engine",
        lambda q: _at_most(0)(
            _sum_or_none(
                [
                    q("S import", "asyncflow", "import", "extras"),
                    q("S engine", "asyncflow", "engine", "extras"),
                ]
            )
        ),
        lambda v: f"{v:.0f} loaded",
    ),
    Target(
        "S",
        "engine create + shutdown, empty, default backend: <= 2 ms",
        lambda q: _at_most(2)(q("S engine", "asyncflow", "engine")),
        lambda v: f"{v:.2f} ms",
    ),
    Target(
        "W1",
        "W1 on Dask: our overhead over raw client.submit <= 1.2x (raw's "
        "throughput / ours)",
        lambda q: _at_most(1.2)(
            _ratio(q("W1 dask", "dask", ""), q("W1 dask", "asyncflow", "dask"))
        ),
        _times,
    ),
    Target(
        "W2",
        "W2 on Dask: our time per hop <= 1.2x raw Dask's chain of futures",
        lambda q: _at_most(1.2)(
            _ratio(q("W2 dask", "asyncflow", "dask"), q("W2 dask", "dask", ""))
        ),
        _times,
    ),
)


def evaluate_targets(
    cases: list[dict[str, Any]], workloads: set[str]
) -> list[dict[str, Any]]:
    index = {(c["group"], c["system"], c["variant"]): c for c in cases}

    def query(
        group: str, system: str, variant: str, what: str = "value"
    ) -> float | None:
        case = index.get((group, system, variant))
        value = case[what]["median"] if case else None
        return None if value is None else float(value)

    results = []
    for target in TARGETS:
        if target.key not in workloads:
            continue
        value, met = target.check(query)
        results.append(
            {
                "workload": target.key,
                "target": target.text,
                "value": value,
                "shown": "n/a" if value is None else target.shown(value),
                "met": met if value is not None else None,
            }
        )
    return results


# -- machine description and environment -------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


_VERSIONS_SNIPPET = """
import json, platform, sys
from importlib.metadata import PackageNotFoundError, version
found = {}
for name in %r:
    try:
        found[name] = version(name)
    except PackageNotFoundError:
        pass
print(json.dumps({"python": sys.version.split()[0],
                  "implementation": platform.python_implementation(),
                  "packages": found}))
"""


def describe_machine(python: str) -> dict[str, Any]:
    probe = subprocess.run(
        [python, "-c", _VERSIONS_SNIPPET % (VERSIONED,)],
        capture_output=True,
        text=True,
        check=True,
    )
    env = json.loads(probe.stdout)
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "os": platform.platform(),
        "python": f"{env['implementation']} {env['python']}",
        "packages": env["packages"],
        "load_average_at_start": os.getloadavg(),
    }


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "--no-optional-locks", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def snapshot_package(into: Path) -> Path:
    """Copy src/asyncflow aside; runs import it ahead of the editable install."""
    shutil.copytree(
        REPO / "src" / "asyncflow",
        into / "asyncflow",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return into


def source_state(code: Path | None = None) -> dict[str, Any]:
    """Which code was measured: the commit, local edits, a digest of it."""
    status = _git("status", "--porcelain", "--", "src")
    return {
        "commit": _git("rev-parse", "--short", "HEAD"),
        "src_modified": None if status is None else bool(status),
        "src_sha256": _digest(code or REPO / "src"),
    }


def _stamp_wanted() -> dict[str, Any]:
    pyproject = (REPO / "pyproject.toml").read_bytes()
    return {"peers": list(PEERS), "pyproject": hashlib.sha256(pyproject).hexdigest()}


def ensure_venv(base_python: str) -> str:
    """Create/refresh benchmarks/.venv: ours (editable) + the pinned peers."""
    python = VENV / "bin" / "python"
    stamp = VENV / ".bench-installed.json"
    wanted = _stamp_wanted()
    if python.exists() and stamp.exists():
        try:
            if json.loads(stamp.read_text()) == wanted:
                return str(python)
        except json.JSONDecodeError:
            pass
    if not python.exists():
        print(f"creating {VENV} ...", flush=True)
        subprocess.run([base_python, "-m", "venv", str(VENV)], check=True)
    print("installing asyncflow (editable) and the pinned peers ...", flush=True)
    pip = [
        str(python),
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "-e", str(REPO), *PEERS], check=True)
    stamp.write_text(json.dumps(wanted))
    return str(python)


# -- output ---------------------------------------------------------------------------


def _num(value: float | None, metric: str = "") -> str:
    if value is None:
        return "n/a"
    if metric == US_PER_HOP or value < 100:
        return f"{value:,.1f}" if value >= 10 else f"{value:,.2f}"
    return f"{value:,.0f}"


def _secs(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _ratio_text(case: dict[str, Any], first: bool) -> str:
    if first:
        return "-"
    ratio = case["ratio_ours_over_this"]
    return "n/a" if ratio is None else f"{ratio:.3g}"


def _rows(cases: list[dict[str, Any]]) -> list[tuple[dict[str, Any], list[str]]]:
    """(group header info, cells) for each case, groups in suite order."""
    out = []
    seen: set[str] = set()
    for case in cases:
        first = case["group"] not in seen
        seen.add(case["group"])
        v = case["value"]
        reps = f"{case['ok_reps']}/{case['reps']}"
        cells = [
            case["name"],
            f"{case['size']:,}" if case["size"] else "n/a",
            reps,
            _num(v["median"], case["metric"]),
            f"{_num(v['min'], case['metric'])} .. {_num(v['max'], case['metric'])}",
            _secs(case["wall_s"]["median"]),
            _num(case["peak_rss_mb"]["median"]),
            _ratio_text(case, first),
            case["note"],
        ]
        out.append((case, cells))
    return out


HEADERS = [
    "system",
    "size",
    "ok/reps",
    "median",
    "min .. max",
    "wall s",
    "peak RSS MiB",
    "ours/this",
    "note",
]


def _group_heading(case: dict[str, Any], groups: dict[str, Group]) -> str:
    group = groups[case["group"]]
    better = "higher" if HIGHER_IS_BETTER[group.metric] else "lower"
    return f"{group.key} — {group.title} [{group.metric}, {better} is better]"


def print_table(cases: list[dict[str, Any]], targets: list[dict[str, Any]]) -> None:
    groups = {g.key: g for g in GROUPS}
    rows = _rows(cases)
    widths = [len(h) for h in HEADERS]
    for _, cells in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, cells, strict=True)]
    line = "  ".join(h.ljust(w) for h, w in zip(HEADERS, widths, strict=True))
    current = None
    for case, cells in rows:
        if case["group"] != current:
            current = case["group"]
            print()
            print(_group_heading(case, groups))
            print(line)
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)))
    if targets:
        print("\nTargets (on medians):")
        for t in targets:
            verdict = {True: "met", False: "NOT MET", None: "n/a"}[t["met"]]
            print(f"  [{verdict:>7}] {t['target']}: {t['shown']}")


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    groups = {g.key: g for g in GROUPS}
    m = report["machine"]
    lines = [
        "# Benchmark results",
        "",
        "Written by `make bench` (`benchmarks/run.py`); see `benchmarks/README.md`",
        "for what each workload measures and how the ratios are computed.",
        "",
        f"- Date: {report['created']}",
        f"- CPU: {m['cpu_model']}, {m['cores']} cores",
        f"- Memory: {m['memory_gib']:.1f} GiB" if m["memory_gib"] else "- Memory: ?",
        f"- OS: {m['os']}",
        f"- Python: {m['python']}",
        "- Packages: "
        + ", ".join(f"{k} {v}" for k, v in sorted(m["packages"].items())),
        f"- Load average at start / end: {_load(m['load_average_at_start'])} / "
        f"{_load(m.get('load_average_at_end'))}",
        f"- Repetitions: {report['reps']} per case (fewer where the table says), "
        "each in a fresh process, systems interleaved; medians, with min .. max.",
        f"- Total time: {report['elapsed_s'] / 60:.1f} min",
        f"- Code measured: {_source_text(report.get('source'))}",
        "",
        "The machine is shared and noisy: compare systems within one table (they",
        "ran interleaved), not across runs. `ours/this` divides our median by",
        "this system's on the section's metric: above 1 is better for tasks/s,",
        "below 1 is better for µs/hop. Peers sized down run fewer tasks; their",
        "throughput or per-hop figures are still comparable (and, where a peer",
        "slows down as the graph grows, flattering to it).",
        "",
        "## Targets",
        "",
        "| workload | target | measured | verdict |",
        "| --- | --- | --- | --- |",
    ]
    for t in report["targets"]:
        verdict = {True: "met", False: "**not met**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['workload']} | {t['target']} | {t['shown']} | {verdict} |")
    lines += ["", "## Results", ""]
    current = None
    for case, cells in _rows(report["cases"]):
        if case["group"] != current:
            current = case["group"]
            lines += [
                "",
                f"### {_group_heading(case, groups)}",
                "",
                "| " + " | ".join(HEADERS) + " |",
                "|" + " --- |" * len(HEADERS),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    w4 = [c for c in report["cases"] if c["group"] == "W4 100k"]
    if w4:
        lines += [
            "",
            "Memory per task in W4 100k ((peak RSS - RSS before the graph) / tasks):",
            "",
        ]
        lines += [
            f"- {c['name']}: {_num(c['kb_per_task']['median'])} KiB/task" for c in w4
        ]
    failures = [
        (c["name"], c["group"], r.get("error", ""))
        for c in report["cases"]
        for r in c["runs"]
        if not r.get("ok")
    ]
    if failures:
        lines += ["", "## Failed runs", ""]
        lines += [
            f"- {g} / {n}: {e.splitlines()[-1] if e else '?'}" for n, g, e in failures
        ]
    path.write_text("\n".join(lines) + "\n")


def _source_text(source: dict[str, Any] | None) -> str:
    if not source:
        return "?"
    text = f"commit {source['commit'] or '?'}"
    if source["src_modified"]:
        text += " with uncommitted changes in src/"
    text += f" (src digest {source['src_sha256']})"
    if source.get("src_changed_since"):
        text += "; src/ was edited while the suite ran (the runs used the snapshot)"
    return text


def _load(values: Sequence[float] | None) -> str:
    return "?" if not values else ", ".join(f"{v:.2f}" for v in values)


# -- main -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes, our library only, current interpreter, 1 rep",
    )
    parser.add_argument("--only", help="comma-separated workloads, e.g. W1,W4")
    parser.add_argument(
        "--group",
        help='comma-separated table sections, e.g. "W4 checkpoint" (instead of --only)',
    )
    parser.add_argument("--reps", type=int, help="repetitions per case (default 5)")
    parser.add_argument(
        "--systems",
        help=f"comma-separated subset of {','.join(SYSTEMS)} (default: all)",
    )
    parser.add_argument("--python", help="interpreter for the runs (skips the venv)")
    parser.add_argument(
        "--base-python",
        default="python3",
        help="interpreter that creates benchmarks/.venv (default: python3)",
    )
    parser.add_argument("--out", type=Path, help="where to write the JSON results")
    parser.add_argument(
        "--timeout", type=float, default=600, help="seconds before a run is killed"
    )
    args = parser.parse_args(argv)

    workloads = set(WORKLOADS)
    if args.only:
        workloads = {w.strip().upper() for w in args.only.split(",") if w.strip()}
        unknown = workloads - set(WORKLOADS)
        if unknown:
            parser.error(f"unknown workload(s) {sorted(unknown)}; known: {WORKLOADS}")
    systems = set(SYSTEMS)
    if args.systems:
        systems = {s.strip() for s in args.systems.split(",") if s.strip()}
        if systems - set(SYSTEMS):
            parser.error(f"unknown system(s) {sorted(systems - set(SYSTEMS))}")
    if args.quick:
        systems &= {OURS}
    reps = args.reps or (1 if args.quick else 5)
    if reps < 1:
        parser.error("--reps must be at least 1")

    if args.python:
        # Runs start in scratch directories: a relative path would not resolve.
        python = os.path.abspath(args.python) if os.sep in args.python else args.python
    elif args.quick:
        python = sys.executable
    else:
        python = ensure_venv(args.base_python)

    sections = {g.key for g in GROUPS}
    if args.group:
        sections = {k.strip() for k in args.group.split(",") if k.strip()}
        if sections - {g.key for g in GROUPS}:
            parser.error(
                f"unknown section(s) {sorted(sections - {g.key for g in GROUPS})}"
            )
        workloads = {g.workload for g in GROUPS if g.key in sections}
    plan: list[tuple[Group, list[tuple[Case, int, int]]]] = []
    for group in GROUPS:
        if group.workload not in workloads or group.key not in sections:
            continue
        chosen = []
        for case in group.cases:
            if case.system not in systems:
                continue
            size = case.quick if args.quick else case.size
            if size is None:
                continue
            chosen.append((case, size, min(reps, case.reps or reps)))
        if chosen and chosen[0][0].system == OURS:
            plan.append((group, chosen))

    machine = describe_machine(python)
    snapshot = Path(tempfile.mkdtemp(prefix="asyncflow-bench-code-"))
    try:
        code = snapshot_package(snapshot)
        source = source_state(code)
        return _run_suite(
            args, plan, reps, python, machine, source, code, workloads, systems
        )
    finally:
        shutil.rmtree(snapshot, ignore_errors=True)


def _run_suite(
    args: argparse.Namespace,
    plan: list[tuple[Group, list[tuple[Case, int, int]]]],
    reps: int,
    python: str,
    machine: dict[str, Any],
    source: dict[str, Any],
    code: Path,
    workloads: set[str],
    systems: set[str],
) -> int:
    started = time.perf_counter()
    mode = "quick" if args.quick else "full"
    print(
        f"AsyncFlow benchmark suite ({mode}): {len(plan)} section(s), "
        f"{reps} rep(s), python {machine['python']}, {machine['cores']} cores",
        flush=True,
    )
    cases: list[dict[str, Any]] = []
    for group, chosen in plan:
        runs: list[list[dict[str, Any]]] = [[] for _ in chosen]
        for rep in range(max(n for _, _, n in chosen)):
            for i, (case, size, n) in enumerate(chosen):
                if rep >= n:
                    continue
                record = run_once(python, group, case, size, args.timeout, code)
                runs[i].append(record)
                shown = (
                    f"{_num(metric_of(group.metric, record), group.metric)} "
                    f"{group.metric}, {record['wall_s']:.3f} s, "
                    f"{record['peak_rss_mb']:.0f} MiB"
                    if record.get("ok")
                    else "FAILED: " + record.get("error", "?").splitlines()[0][:200]
                )
                print(
                    f"  {group.key:<11} rep {rep + 1}/{n}  {case.name:<30} "
                    f"{size:>9,}  {shown}",
                    flush=True,
                )
        cases += [
            summarize(group, case, r)
            for (case, _, _), r in zip(chosen, runs, strict=True)
        ]
    add_ratios(cases)
    targets = evaluate_targets(cases, workloads) if not args.quick else []
    machine["load_average_at_end"] = os.getloadavg()
    source["src_changed_since"] = source_state()["src_sha256"] != source["src_sha256"]
    report = {
        "schema": 1,
        "mode": mode,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "elapsed_s": time.perf_counter() - started,
        "reps": reps,
        "workloads": sorted(workloads),
        "machine": machine,
        "source": source,
        "cases": cases,
        "targets": targets,
    }
    print_table(cases, targets)

    out = args.out or RESULTS / ("quick.json" if args.quick else "latest.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {out}")
    if not args.quick and workloads == set(WORKLOADS) and systems == set(SYSTEMS):
        write_markdown(BENCH / "RESULTS.md", report)
        print(f"wrote {BENCH / 'RESULTS.md'}")
    failed = sum(1 for c in cases for r in c["runs"] if not r.get("ok"))
    if failed:
        print(f"{failed} run(s) failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
