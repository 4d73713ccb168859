"""Shared fixtures: an engine on each backend, always shut down."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest

from asyncflow import (
    AsyncioExecutionBackend,
    ExecutionBackend,
    LocalExecutionBackend,
    NoopExecutionBackend,
    WorkflowEngine,
)

from .processes import kill_alive

BACKENDS: dict[str, Callable[[], ExecutionBackend]] = {
    "noop": NoopExecutionBackend,
    "threads": lambda: LocalExecutionBackend(ThreadPoolExecutor(4)),
    "processes": lambda: LocalExecutionBackend(ProcessPoolExecutor(2)),
    "asyncio": AsyncioExecutionBackend,
}
#: Backends that really run function bodies.
RUNNING_BACKENDS = ["threads", "processes", "asyncio"]
#: Backends whose bodies share this process's memory (events, closures).
IN_PROCESS_BACKENDS = ["threads", "asyncio"]


@pytest.fixture(scope="session")
def checkpoint_key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("asyncflow-key")


@pytest.fixture(autouse=True)
def checkpoint_key_file(
    checkpoint_key_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Checkpoint keys live in a scratch directory, never in the real home.

    Child processes the tests start inherit the variable.
    """
    path = checkpoint_key_dir / "checkpoint.key"
    monkeypatch.setenv("ASYNCFLOW_KEY_FILE", str(path))
    return path


@pytest.fixture
async def make_engine() -> AsyncIterator[Callable[..., object]]:
    """Create engines by backend name; every one is shut down after the test."""
    engines: list[WorkflowEngine] = []

    async def make(backend: str = "threads", **kwargs: object) -> WorkflowEngine:
        engine = await WorkflowEngine.create(backend=BACKENDS[backend](), **kwargs)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.shutdown()


@pytest.fixture(params=RUNNING_BACKENDS)
async def flow(request: pytest.FixtureRequest, make_engine) -> WorkflowEngine:
    """An engine on each backend that runs bodies."""
    return await make_engine(request.param)


@pytest.fixture(params=IN_PROCESS_BACKENDS)
async def local_flow(request: pytest.FixtureRequest, make_engine) -> WorkflowEngine:
    """An engine whose task bodies run in this process (threads or the loop)."""
    return await make_engine(request.param)


@pytest.fixture
def reaper() -> Iterator[list[psutil.Process]]:
    """Processes to kill at teardown if they are still alive (test failed)."""
    procs: list[psutil.Process] = []
    yield procs
    kill_alive(procs)


#: Backends for executable tasks, by name, with a number of command slots.
EXE_BACKENDS: dict[str, Callable[[int], ExecutionBackend]] = {
    "threads": lambda n: LocalExecutionBackend(ThreadPoolExecutor(n)),
    "asyncio": lambda n: AsyncioExecutionBackend(max_subprocesses=n),
}


@pytest.fixture
async def make_flow() -> AsyncIterator[Callable[..., Any]]:
    """Engines for executable tasks: ``await make_flow("threads", slots)``;
    each is shut down (bounded) at teardown."""
    made: list[WorkflowEngine] = []

    async def make(backend: str, workers: int = 4) -> WorkflowEngine:
        flow = await WorkflowEngine.create(backend=EXE_BACKENDS[backend](workers))
        made.append(flow)
        return flow

    yield make
    for flow in made:
        await asyncio.wait_for(flow.shutdown(timeout=5), 20.0)
