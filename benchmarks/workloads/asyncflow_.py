"""The workloads on our library (``asyncflow``).

Task bodies are ``async def``, the shape RADICAL AsyncFlow requires, unless the
variant ends in ``def`` (plain functions, which our library also accepts).

    python -m benchmarks.workloads.asyncflow_ --workload W1 --size 10000
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from asyncflow import (
    AsyncioExecutionBackend,
    LocalExecutionBackend,
    NoopExecutionBackend,
    WorkflowEngine,
)

from ._common import PAUSE, Probe, chain_of, main, map_reduce_result, tree_reduce
from .asyncflow_dask import on_dask

SYSTEM = "asyncflow"
THREADS = 4
EXEC_CONCURRENCY = 8
WIDTH = 100
#: Run the command directly (argv), as the raw baseline does.


async def _engine(variant: str) -> WorkflowEngine:
    if variant == "dry":
        return await WorkflowEngine.create(dry_run=True)
    if variant == "asyncio":
        return await WorkflowEngine.create(backend=AsyncioExecutionBackend())
    backend = await LocalExecutionBackend(ThreadPoolExecutor(THREADS))
    return await WorkflowEngine.create(backend=backend)


async def wide(size: int, variant: str) -> dict[str, Any]:
    """W1: independent no-op tasks on a thread pool.

    Variants ``trace`` and ``progress`` (``def-trace``, ``def-progress``
    with ``def`` bodies) watch the same run with a trace file (in the run's
    scratch directory) or the progress display; ``def-resources`` declares
    cpus, memory and a custom resource on every task, all admitted by the
    backend.
    """
    probe = Probe()
    watch = variant.removeprefix("def-")
    if watch in ("trace", "progress"):
        backend = await LocalExecutionBackend(ThreadPoolExecutor(THREADS))
        flow = await WorkflowEngine.create(
            backend=backend,
            trace=Path("w1-trace.jsonl").resolve() if watch == "trace" else None,
            progress=watch == "progress",
        )
        variant = variant.removesuffix(watch).removesuffix("-")
    else:
        flow = await _engine("threads")
    if variant == "def-resources":

        @flow.function_task(resources={"cpus": 1, "memory": "1MiB", "slots": 1})
        def noop() -> None:
            return None

        flow.backend.capacity.custom["slots"] = size  # type: ignore[attr-defined]
    elif variant == "def":

        @flow.function_task
        def noop() -> None:
            return None

    else:

        @flow.function_task
        async def noop() -> None:
            return None

    probe.start()
    await asyncio.gather(*[noop() for _ in range(size)])
    probe.stop()
    await flow.shutdown()
    return probe.result(tasks=size)


async def chain(size: int, variant: str) -> dict[str, Any]:
    """W2: each task depends on the previous one; reported per hop."""
    probe = Probe()
    flow = await _engine(variant.removesuffix("-def"))
    if variant.endswith("-def"):

        @flow.function_task
        def step(previous: object) -> object:
            return previous

    else:

        @flow.function_task
        async def step(previous: object) -> object:
            return previous

    probe.start()
    await chain_of(step, size)
    probe.stop()
    await flow.shutdown()
    return probe.result(tasks=size)


async def execs(size: int, variant: str) -> dict[str, Any]:
    """W3: ``/bin/true`` executable tasks, 8 at a time, with default settings.

    A plain command like this one is started without ``sh -c``.
    """
    probe = Probe()
    flow = await WorkflowEngine.create(
        backend=AsyncioExecutionBackend(max_subprocesses=EXEC_CONCURRENCY)
    )

    @flow.executable_task
    async def true() -> str:
        return "/bin/true"

    probe.start()
    await asyncio.gather(*[true() for _ in range(size)])
    probe.stop()
    await flow.shutdown()
    return probe.result(tasks=size)


async def layered(size: int, variant: str) -> dict[str, Any]:
    """W4: dry run of layers of 100 tasks, each on 2 tasks of the layer above.

    Variants ``threads`` and ``threads-checkpoint`` run the same graph for
    real on the thread pool, without and with a checkpoint file: a dry run
    never reads or writes a checkpoint. Their bodies return their index, so
    that every task has a key and a row of its own; their wall time includes
    the shutdown, which writes whatever the checkpoint writer still holds.
    """
    if variant in ("", "eager"):
        return await _layered_dry(size, eager=variant == "eager")
    checkpoint = None
    if variant == "threads-checkpoint":
        # The run's scratch directory, not the user's real key file.
        os.environ.setdefault(
            "ASYNCFLOW_KEY_FILE", str(Path("checkpoint.key").resolve())
        )
        checkpoint = Path("w4-checkpoint.db").resolve()
        checkpoint.unlink(missing_ok=True)
    elif variant != "threads":
        raise ValueError(f"unknown W4 variant {variant!r}")
    probe = Probe()
    backend = await LocalExecutionBackend(ThreadPoolExecutor(THREADS))
    flow = await WorkflowEngine.create(backend=backend, checkpoint=checkpoint)

    @flow.function_task
    def node(index: int, *upstream: object) -> int:
        return index

    probe.start()
    layer = [node(j) for j in range(WIDTH)]
    for i in range(1, size // WIDTH):
        layer = [
            node(i * WIDTH + j, layer[j], layer[(j + 1) % WIDTH]) for j in range(WIDTH)
        ]
    await asyncio.gather(*layer)
    await flow.shutdown()
    probe.stop()
    return probe.result(tasks=size // WIDTH * WIDTH)


async def _layered_dry(size: int, eager: bool = False) -> dict[str, Any]:
    """The dry run; ``eager`` on ``NoopExecutionBackend(eager=True)``, where
    a task whose dependencies are done ends at its call, so the graph is
    never in memory at once. Without it the whole graph is registered
    before the loop runs a task, which measures what a waiting task costs."""
    probe = Probe()
    if eager:
        flow = await WorkflowEngine.create(backend=NoopExecutionBackend(eager=True))
    else:
        flow = await _engine("dry")

    @flow.function_task
    async def node(*upstream: object) -> None:
        return None

    probe.start()
    layer = [node() for _ in range(WIDTH)]
    for _ in range(size // WIDTH - 1):
        layer = [node(layer[j], layer[(j + 1) % WIDTH]) for j in range(WIDTH)]
    await asyncio.gather(*layer)
    probe.stop()
    await flow.shutdown()
    return probe.result(tasks=size // WIDTH * WIDTH)


async def io_bound(size: int, variant: str) -> dict[str, Any]:
    """W5: tasks that each await ``asyncio.sleep(0.05)``, asyncio-native."""
    probe = Probe()
    flow = await _engine("asyncio")

    @flow.function_task
    async def wait() -> None:
        await asyncio.sleep(PAUSE)

    probe.start()
    await asyncio.gather(*[wait() for _ in range(size)])
    probe.stop()
    await flow.shutdown()
    return probe.result(tasks=size)


async def map_reduce(size: int, variant: str) -> dict[str, Any]:
    """W6: ``size`` map tasks, then a binary tree of pairwise reductions."""
    probe = Probe()
    flow = await _engine("threads")
    if variant == "def":

        @flow.function_task
        def square(i: int) -> int:
            return i * i

        @flow.function_task
        def add(a: int, b: int) -> int:
            return a + b

    else:

        @flow.function_task
        async def square(i: int) -> int:
            return i * i

        @flow.function_task
        async def add(a: int, b: int) -> int:
            return a + b

    probe.start()
    root = tree_reduce([square(i) for i in range(size)], lambda a, b: add(a, b))
    total = await root
    probe.stop()
    await flow.shutdown()
    return map_reduce_result(total, size, probe)


#: What ``import asyncflow`` and a default engine must not load: the
#: optional extras, and the heavy modules only some features need (process
#: pools and checkpoints: cloudpickle, multiprocessing, sqlite3).
EXTRAS = (
    "cloudpickle",
    "dask",
    "distributed",
    "httpx",
    "matplotlib",
    "multiprocessing",
    "openai",
    "opentelemetry",
    "rhapsody",
    "rich",
    "sqlite3",
)
#: Start-up variants timing a fresh interpreter running ``python -c CODE``.
STARTS = {
    "import": "import asyncflow",
    "import-asyncio": "import asyncio",
    "import-python": "pass",
}
#: Engines made and shut down before the timed ones (caches, first imports).
ENGINE_WARMUP = 20


def _extras(modules: Iterable[str]) -> list[str]:
    loaded = set(modules)
    return [name for name in EXTRAS if name in loaded]


def startup(size: int, variant: str) -> Any:
    """S: start-up costs, in ms per operation, the median of ``size`` of them.

    ``import``: a fresh ``python -c "import asyncflow"``, interpreter start
    included, with the package's bytecode compiled as an installed one has it
    (one untimed start writes it first); ``import-asyncio`` and
    ``import-python`` time ``import asyncio`` and ``pass`` the same way, the
    floor under ours. ``engine``: ``async with await WorkflowEngine.create():
    pass`` with the default thread backend, repeated in this process.
    ``extras`` lists the modules of :data:`EXTRAS` loaded by then.
    """
    if variant == "engine":
        return _engine_cycles(size)
    code = STARTS.get(variant)
    if code is None:
        raise ValueError(f"unknown S variant {variant!r}")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    command = [sys.executable, "-c", code]
    subprocess.run(command, env=env, check=True)
    times = []
    probe = Probe()
    probe.start()
    for _ in range(size):
        started = time.perf_counter()
        subprocess.run(command, env=env, check=True)
        times.append(time.perf_counter() - started)
    probe.stop()
    listed = subprocess.run(
        [*command[:-1], f"{code}\nimport sys\nprint(*sys.modules)"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return probe.result(
        tasks=size, op_median_s=statistics.median(times), extras=_extras(listed)
    )


async def _engine_cycles(size: int) -> dict[str, Any]:
    probe = Probe()
    for _ in range(ENGINE_WARMUP):
        async with await WorkflowEngine.create():
            pass
    times = []
    probe.start()
    for _ in range(size):
        started = time.perf_counter()
        async with await WorkflowEngine.create():
            pass
        times.append(time.perf_counter() - started)
    probe.stop()
    return probe.result(
        tasks=size, op_median_s=statistics.median(times), extras=_extras(sys.modules)
    )


WORKLOADS = on_dask(
    {
        "W1": wide,
        "W2": chain,
        "W3": execs,
        "W4": layered,
        "W5": io_bound,
        "W6": map_reduce,
        "S": startup,
    }
)

if __name__ == "__main__":
    main(SYSTEM, WORKLOADS)
