"""The engine loop's CPU time per task, watched and not: a steadier figure
than throughput on a shared machine.

Runs W1 (10,000 no-op tasks on 4 threads) in this process, several times
per configuration with the configurations interleaved, and prints for each
the median throughput and the least CPU time the engine's loop thread (this
thread) spent per task. CPU time of one thread moves far less with the
machine's load than wall time does, so differences of a microsecond per
task show; the suite's ratios (``run.py``) stay the figures of record.

    .venv/bin/python benchmarks/loop_cost.py            # def bodies
    .venv/bin/python benchmarks/loop_cost.py --async    # async def bodies
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from asyncflow import LocalExecutionBackend, WorkflowEngine

CONFIGURATIONS = ("plain", "null", "trace", "progress")


class NullObserver:
    """Takes the engine's records and does nothing: what recording costs."""

    flat = True

    def records(self, flat: list[Any]) -> None:
        return None


async def one_run(configuration: str, tasks: int, bodies: str, scratch: Path) -> Any:
    backend = await LocalExecutionBackend(ThreadPoolExecutor(4))
    flow = await WorkflowEngine.create(
        backend=backend,
        trace=scratch / "trace.jsonl" if configuration == "trace" else None,
        progress=configuration == "progress",
    )
    if configuration == "null":
        flow._scheduler.observers.add(NullObserver())
    if bodies == "async":

        @flow.function_task
        async def noop() -> None:
            return None

    else:

        @flow.function_task
        def noop() -> None:
            return None

    await asyncio.gather(*[noop() for _ in range(200)])  # threads started
    started, cpu = time.perf_counter(), time.thread_time()
    await asyncio.gather(*[noop() for _ in range(tasks)])
    wall, cpu = time.perf_counter() - started, time.thread_time() - cpu
    await flow.shutdown()
    return tasks / wall, cpu / tasks * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--async", dest="bodies", action="store_const", const="async")
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    bodies = args.bodies or "def"
    results: dict[str, list[Any]] = {c: [] for c in CONFIGURATIONS}
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(args.runs):
            for configuration in CONFIGURATIONS:
                results[configuration].append(
                    await one_run(configuration, args.tasks, bodies, Path(scratch))
                )
    plain_rate = statistics.median(rate for rate, _ in results["plain"])
    plain_cpu = min(cpu for _, cpu in results["plain"])
    print(f"W1, {args.tasks:,} no-op {bodies} tasks, {args.runs} runs each")
    for configuration, runs in results.items():
        rate = statistics.median(r for r, _ in runs)
        cpu = min(c for _, c in runs)
        print(
            f"{configuration:9} {rate:9,.0f} tasks/s ({rate / plain_rate:.2f}x)   "
            f"loop CPU {cpu:5.2f} µs/task (+{cpu - plain_cpu:.2f})"
        )


if __name__ == "__main__":
    asyncio.run(main())
