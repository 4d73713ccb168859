"""The built-in demo: a small simulation campaign on the default thread pool.

Fan-out: several Monte-Carlo estimates of pi run in parallel, each seeded by
a command's output. Fan-in: a block aggregates them and writes a report,
which an executable task checksums. Nothing is awaited but the root.
"""

from __future__ import annotations

import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

from .engine import WorkflowEngine
from .tasks import TaskFuture


async def run_demo(
    simulations: int = 6, samples: int = 200_000, out: TextIO = sys.stdout
) -> dict[str, object]:
    """Run the demo workflow, print what ran, and return its results."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="asyncflow-demo-") as tmp:
        result, ran = await _run(Path(tmp), simulations, samples)
    wall = time.perf_counter() - started
    print(f"asyncflow demo: {len(ran)} tasks and blocks", file=out)
    for fut in sorted(ran, key=lambda f: int(f.uid.rsplit(".", 1)[1])):
        print(f"  {fut.uid:<14} {fut.name:<13} {fut.state}", file=out)
    summary = result["summary"]
    assert isinstance(summary, dict)
    print(f"pi estimate : {summary['mean']:.5f} +/- {summary['stdev']:.5f}", file=out)
    print(f"report      : {result['report']}", end="", file=out)
    print(f"sha256      : {result['sha256']}", file=out)
    print(f"wall time   : {wall:.2f} s", file=out)
    return result


async def _run(
    workdir: Path, simulations: int, samples: int
) -> tuple[dict[str, object], list[TaskFuture]]:
    ran: list[TaskFuture] = []
    async with await WorkflowEngine.create() as flow:

        @flow.executable_task
        async def make_seed(index: int) -> str:
            return f"echo {1000 + index * 7919}"

        @flow.function_task
        def simulate(seed_text: str, n: int) -> float:
            rng = random.Random(int(seed_text))
            inside = sum(rng.random() ** 2 + rng.random() ** 2 <= 1.0 for _ in range(n))
            return 4.0 * inside / n

        @flow.function_task
        async def aggregate(*estimates: float) -> dict[str, float]:
            return {
                "mean": statistics.fmean(estimates),
                "stdev": statistics.stdev(estimates),
            }

        @flow.function_task
        async def write_report(summary: dict[str, float], path: str) -> str:
            Path(path).write_text(
                f"pi ~ {summary['mean']:.5f} +/- {summary['stdev']:.5f}\n"
            )
            return path

        @flow.executable_task
        async def checksum(path: str) -> str:
            return f"sha256sum {path}"

        @flow.block
        async def analyse(estimates: list[float]) -> dict[str, object]:
            summary = aggregate(*estimates)
            report = write_report(summary, str(workdir / "report.txt"))
            digest = checksum(report)
            ran.extend([summary, report, digest])
            return {
                "summary": await summary,
                "report": Path(await report).read_text(),
                "sha256": (await digest).split()[0],
            }

        seeds = [make_seed(i) for i in range(simulations)]
        estimates = [simulate(seed, samples) for seed in seeds]
        result_future = analyse(estimates)
        ran.extend(seeds + estimates + [result_future])
        result: dict[str, object] = await result_future
    return result, ran
