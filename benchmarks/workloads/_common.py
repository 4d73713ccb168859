"""What every system's workload module shares: the CLI, the clock, memory probes.

A workload function builds its system (engine, executor, cluster), calls
:meth:`Probe.start` right before the first task is created and
:meth:`Probe.stop` once the last result is in, then tears the system down.
Only the span between ``start`` and ``stop`` is the workload's wall time;
set-up and tear-down are reported separately.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

__all__ = [
    "PAUSE",
    "Probe",
    "current_rss_mb",
    "main",
    "map_reduce_result",
    "peak_rss_mb",
    "tree_reduce",
]

T = TypeVar("T")

#: Seconds each I/O-bound task (W5) awaits.
PAUSE = 0.05

_PAGE = os.sysconf("SC_PAGE_SIZE")


def chain_of(step: Callable[[Any], T], size: int) -> T:
    """W2's graph, the same on every system: ``size`` calls of ``step``,
    each given the previous call's future (the first, None); the last."""
    last = step(None)
    for _ in range(size - 1):
        last = step(last)
    return last


def tree_reduce(leaves: Sequence[T], combine: Callable[[T, T], T]) -> T:
    """W6's reduction graph, the same on every system: pair neighbours level
    by level (an odd one out moves up unchanged) down to a single root."""
    level = list(leaves)
    while len(level) > 1:
        paired = [combine(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def map_reduce_result(total: int, size: int, probe: Probe) -> dict[str, Any]:
    """Check W6's sum of squares and report its ``2 * size - 1`` tasks."""
    if total != sum(i * i for i in range(size)):
        raise AssertionError(f"map-reduce returned {total}")
    return probe.result(tasks=2 * size - 1)


def current_rss_mb() -> float:
    """Resident set size right now (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Probe:
    """Times the workload proper and notes the memory it starts from."""

    def __init__(self) -> None:
        self.created = time.perf_counter()
        self.started: float | None = None
        self.stopped: float | None = None
        self.rss_before_mb = 0.0

    def start(self) -> None:
        self.rss_before_mb = current_rss_mb()
        self.started = time.perf_counter()

    def stop(self) -> None:
        self.stopped = time.perf_counter()

    def result(self, tasks: int, **extra: Any) -> dict[str, Any]:
        if self.started is None or self.stopped is None:
            raise RuntimeError("the workload never called Probe.start()/stop()")
        return {
            "tasks": tasks,
            "wall_s": self.stopped - self.started,
            "setup_s": self.started - self.created,
            "rss_before_mb": self.rss_before_mb,
            "teardown_end": time.perf_counter(),
            "stopped": self.stopped,
            **extra,
        }


Workload = Callable[[int, str], Any]


def main(
    system: str, workloads: dict[str, Workload], argv: list[str] | None = None
) -> None:
    """Run one workload once and print one JSON line describing the run."""
    parser = argparse.ArgumentParser(
        description=f"Run one benchmark workload on {system} and print one JSON line."
    )
    parser.add_argument("--workload", required=True, choices=sorted(workloads))
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--variant", default="")
    args = parser.parse_args(argv)

    run = workloads[args.workload]
    outcome = run(args.size, args.variant)
    if inspect.iscoroutine(outcome):
        outcome = asyncio.run(outcome)
    outcome["teardown_s"] = outcome.pop("teardown_end") - outcome.pop("stopped")
    record = {
        "system": system,
        "workload": args.workload,
        "variant": args.variant,
        "size": args.size,
        **outcome,
        "peak_rss_mb": peak_rss_mb(),
        "python": sys.version.split()[0],
    }
    sys.stdout.flush()
    print(json.dumps(record), flush=True)
