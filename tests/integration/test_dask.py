"""SPEC §6/§9: the Dask backend, on a real LocalCluster with worker processes.

One cluster of two worker processes serves the module (started once, torn
down at the end); tests that kill a worker or need other settings start
their own. Progress is observed through marker files written by the task
bodies and commands themselves (the workers share this file system) and
through psutil, never through timing.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

distributed = pytest.importorskip("distributed")
dask = pytest.importorskip("dask")

from asyncflow import (  # noqa: E402
    DaskExecutionBackend,
    DependencyFailureError,
    ExecutableError,
    LocalExecutionBackend,
    TaskTimeoutError,
    WorkerLostError,
    WorkflowEngine,
)

from ..processes import alive, carrying, wait_until  # noqa: E402

LIVENESS = 30.0
MB = 2**20

#: What every cluster the tests start shares: loopback only, quiet logs.
QUIET = {
    "dashboard_address": "127.0.0.1:0",
    "worker_dashboard_address": "127.0.0.1:0",
    "silence_logs": logging.CRITICAL,
}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """Two worker processes of one thread each, declaring one GPU and one
    licence each (resources are abstract counts in Dask)."""
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        resources={"GPU": 1, "licences": 1},
        **QUIET,
    ) as made:
        yield made


@pytest.fixture
async def client(cluster: Any) -> AsyncIterator[Any]:
    made = await asyncio.to_thread(distributed.Client, cluster, set_as_default=False)
    yield made
    await asyncio.to_thread(made.close)


@pytest.fixture
async def make_flow() -> AsyncIterator[Callable[..., Any]]:
    """Engines on the given backends; every one is shut down (bounded)."""
    made: list[WorkflowEngine] = []

    async def make(*backends: Any, **options: Any) -> WorkflowEngine:
        flow = await WorkflowEngine.create(list(backends), **options)
        made.append(flow)
        return flow

    yield make
    for flow in made:
        await asyncio.wait_for(flow.shutdown(timeout=10), LIVENESS)


@pytest.fixture
async def flow(client: Any, make_flow: Callable[..., Any]) -> WorkflowEngine:
    engine: WorkflowEngine = await make_flow(DaskExecutionBackend(client))
    return engine


async def outcome(fut: Any) -> BaseException | None:
    """The task's exception (retrieved), or None; bounded."""
    await asyncio.wait([fut], timeout=LIVENESS)
    assert fut.done(), f"{fut} never finished"
    return None if fut.cancelled() else fut.exception()


def backend_of(flow: WorkflowEngine) -> DaskExecutionBackend:
    backend = flow.backends["dask"]
    assert isinstance(backend, DaskExecutionBackend)
    return backend


# -- dependencies, values, task kinds ---------------------------------------------


async def test_a_graph_runs_on_the_workers_and_values_stay_there(
    flow: WorkflowEngine,
) -> None:
    @flow.function_task
    def where(x: int) -> tuple[int, int]:
        return x + 1, os.getpid()

    @flow.function_task
    def add(*pairs: tuple[int, int]) -> int:
        return sum(value for value, _ in pairs)

    @flow.function_task
    def square(x: int) -> int:
        return x * x

    first = where(1)
    second = where(2)
    total = add(first, second)
    assert await square(total) == 25
    assert total.state == "DONE"
    # Nobody awaited the intermediate tasks: their values never came here.
    assert first.state == second.state == "DONE"
    assert not first.done()
    assert not total.done()
    assert backend_of(flow).values_fetched == 1
    _, pid = await first  # awaiting fetches it now
    assert pid != os.getpid()
    assert backend_of(flow).values_fetched == 2


async def test_task_kinds_closures_lambdas_async_bodies_and_containers(
    flow: WorkflowEngine,
) -> None:
    offset = 10  # captured by the closure and the lambda, shipped with them

    @flow.function_task
    def closure(x: int) -> int:
        return x + offset

    @flow.function_task
    async def async_body(x: int) -> tuple[int, int]:
        await asyncio.sleep(0)
        return x * 2, os.getpid()

    lam = flow.function_task(lambda *xs, k=0: sum(xs) + k)

    @flow.function_task
    def containers(items: list[int], mapping: dict[str, int], frozen: frozenset) -> int:
        return sum(items) + sum(mapping.values()) + sum(frozen)

    doubled, pid = await async_body(closure(1))
    assert (doubled, pid != os.getpid()) == (22, True)
    one, two = closure(0), closure(1)
    assert await lam(one, two, k=closure(2)) == 33
    assert await containers([one, 5], {"a": two}, frozenset({one, 7})) == 43


async def test_executable_tasks_run_on_the_workers(
    flow: WorkflowEngine, tmp_path: Path
) -> None:
    @flow.executable_task
    async def show(word: str) -> str:
        return f'echo "$GREETING {word}" from $PPID; pwd'

    @flow.executable_task
    async def argv(text: str, task_description: Any = None) -> list[str]:
        return ["printf", "%s|", text, "$HOME"]

    @flow.executable_task
    async def failing() -> str:
        return "echo partial; echo broken >&2; exit 3"

    @flow.function_task
    def word() -> str:
        return "world"

    out = await show(
        word(),
        task_description={"env": {"GREETING": "hello"}, "cwd": str(tmp_path)},
    )
    line, cwd = out.splitlines()
    assert line.startswith("hello world from ")
    assert int(line.rsplit(" ", 1)[1]) != os.getpid()  # a worker started it
    assert cwd == str(tmp_path)
    assert await argv("a b") == "a b|$HOME|"

    error = await outcome(failing())
    assert isinstance(error, ExecutableError)
    assert (error.exit_code, error.stdout, error.stderr) == (3, "partial\n", "broken\n")


async def test_a_chain_handed_over_whole_reports_in_order(
    flow: WorkflowEngine,
) -> None:
    seen: list[tuple[str, str]] = []
    flow.subscribe(lambda event: seen.append((event.kind, event.uid)))

    @flow.function_task
    def step(x: int) -> int:
        return x + 1

    chain = [step(0)]
    for _ in range(19):
        chain.append(step(chain[-1]))
    assert await chain[-1] == 20
    await asyncio.sleep(0)  # the subscriber gets the last batch
    uids = [t.uid for t in chain]
    for uid in uids:
        kinds = [kind for kind, u in seen if u == uid]
        assert kinds == ["created", "ready", "submitted", "started", "done"], kinds
    done = [u for kind, u in seen if kind == "done"]
    assert done == uids  # every dependency ended before its dependent
    assert backend_of(flow).values_fetched == 1


# -- failures, retries, timeouts ---------------------------------------------------


async def test_failure_propagates_with_its_root_cause(flow: WorkflowEngine) -> None:
    @flow.function_task
    def boom(x: int) -> int:
        raise ValueError(f"bad input {x}")

    @flow.function_task
    def inc(x: int) -> int:
        return x + 1

    failed = boom(1)
    chain = inc(inc(inc(failed)))  # handed to Dask with the failing future
    unrelated = inc(41)
    error = await outcome(chain)
    assert isinstance(error, DependencyFailureError)
    assert isinstance(error.root_cause, ValueError)
    assert str(error.root_cause) == "bad input 1"
    assert error.failed_dependencies == ["inc"]
    root = await outcome(failed)
    assert isinstance(root, ValueError)
    assert await unrelated == 42
    # A failure upstream: the chain's tasks ended FAILED, not cancelled.
    assert chain.state == "FAILED"


async def test_retries_and_timeouts_are_the_engines(
    flow: WorkflowEngine, tmp_path: Path
) -> None:
    marker = tmp_path / "tried"
    stopped = tmp_path / "stopped"

    @flow.function_task(retries=2)
    def flaky() -> str:
        if not marker.exists():
            marker.write_text("once")
            raise ConnectionError("first attempt fails")
        return "second attempt"

    @flow.function_task(timeout=1.0)
    async def slow() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            stopped.write_text("stopped")
            raise

    fut = flaky()
    assert await fut == "second attempt"
    assert fut.attempts == 2
    late = slow()
    error = await outcome(late)
    assert isinstance(error, TaskTimeoutError)
    await wait_until(stopped.exists, "the timed-out body to be stopped on its worker")


# -- cancellation ----------------------------------------------------------------


async def test_cancelling_a_running_function_stops_it_on_its_worker(
    flow: WorkflowEngine, tmp_path: Path
) -> None:
    started, stopped = tmp_path / "started", tmp_path / "stopped"

    @flow.function_task
    async def waits() -> None:
        started.write_text(str(os.getpid()))
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            stopped.write_text("stopped")
            raise

    @flow.function_task
    def after(x: object) -> str:
        return "never"

    fut = waits()
    dependent = after(fut)
    await wait_until(started.exists, "the body to start on a worker")
    assert fut.state == "RUNNING"
    assert fut.cancel() is True
    assert fut.state == dependent.state == "CANCELLED"
    with pytest.raises(asyncio.CancelledError):
        await fut
    await wait_until(stopped.exists, "the body to be cancelled on its worker")


async def test_cancelling_a_running_executable_kills_its_process_group(
    flow: WorkflowEngine, tmp_path: Path, reaper: list[psutil.Process]
) -> None:
    mark = {"ASYNCFLOW_TEST_MARK": uuid.uuid4().hex}

    @flow.executable_task
    async def long_command() -> str:
        return "sleep 60 & sleep 60"

    fut = long_command(task_description={"env": mark})
    await wait_until(lambda: len(carrying(mark)) >= 3, "the shell and both sleeps")
    procs = carrying(mark)
    reaper.extend(procs)
    assert all(p.pid != os.getpid() and p.ppid() != os.getpid() for p in procs)
    assert fut.cancel() is True
    assert fut.state == "CANCELLED"
    with pytest.raises(asyncio.CancelledError):
        await fut
    await wait_until(lambda: not any(alive(p) for p in procs), "the group to be gone")


async def test_shutdown_with_work_in_flight(
    client: Any, tmp_path: Path, reaper: list[psutil.Process]
) -> None:
    mark = {"ASYNCFLOW_TEST_MARK": uuid.uuid4().hex}
    started = tmp_path / "started"
    flow = await WorkflowEngine.create(DaskExecutionBackend(client))

    @flow.function_task
    async def waits() -> None:
        started.write_text("started")
        await asyncio.sleep(60)

    @flow.executable_task
    async def sleeps() -> str:
        return "sleep 60"

    @flow.function_task
    def later(x: object) -> None:
        return None

    running = [waits(), sleeps(task_description={"env": mark})]
    queued = later(running[0])
    await wait_until(started.exists, "the function to start")
    await wait_until(lambda: bool(carrying(mark)), "the command to start")
    procs = carrying(mark)
    reaper.extend(procs)
    await asyncio.wait_for(flow.shutdown(timeout=15), LIVENESS)
    assert [f.state for f in (*running, queued)] == ["CANCELLED"] * 3
    assert not any(alive(p) for p in procs)
    assert client.status == "running"  # the user's client is left running
    with pytest.raises(RuntimeError, match="shut down"):
        later(1)


# -- engines, clients, routing -----------------------------------------------------


async def test_routing_between_the_cluster_and_a_local_backend(
    client: Any, make_flow: Callable[..., Any]
) -> None:
    flow = await make_flow(
        DaskExecutionBackend(client), LocalExecutionBackend(name="local")
    )

    @flow.function_task
    def remote(x: int) -> tuple[int, int]:
        return x * 10, os.getpid()

    @flow.function_task(backend="local")
    def local(pair: tuple[int, int]) -> tuple[int, int]:
        return pair[0] + 1, os.getpid()

    @flow.function_task
    def back(pair: tuple[int, int]) -> int:
        return pair[0] * 2

    first = remote(1)
    second = local(first)  # needs the value here: it is fetched
    assert await back(second) == 22
    assert (await second)[1] == os.getpid() != (await first)[1]


async def test_an_asynchronous_client_on_the_engines_loop(
    cluster: Any, make_flow: Callable[..., Any]
) -> None:
    async with distributed.Client(
        cluster.scheduler_address, asynchronous=True, set_as_default=False
    ) as client:
        flow = await make_flow(DaskExecutionBackend(client))

        @flow.function_task
        def inc(x: int) -> int:
            return x + 1

        @flow.executable_task
        async def echo(x: int) -> str:
            return f"echo {x}"

        assert await echo(inc(inc(1))) == "3\n"
        await flow.shutdown()
        assert client.status == "running"


async def test_a_scheduler_address(cluster: Any, make_flow: Callable[..., Any]) -> None:
    backend = DaskExecutionBackend(address=cluster.scheduler_address, name="remote")
    flow = await make_flow(backend)

    @flow.function_task
    def inc(x: int) -> int:
        return x + 1

    assert await inc(inc(1)) == 3
    own = backend.client
    await flow.shutdown()
    assert own.status == "closed"  # the client it made; the cluster runs on
    assert cluster.status.name == "running"


async def test_an_owned_cluster_is_closed_at_shutdown(
    make_flow: Callable[..., Any],
) -> None:
    backend = DaskExecutionBackend(n_workers=1, processes=False, **QUIET)
    flow = await make_flow(backend)

    @flow.function_task
    def inc(x: int) -> int:
        return x + 1

    assert await inc(1) == 2
    cluster = backend.cluster
    assert cluster is not None
    assert backend.dashboard_link
    listening = {
        c.laddr.ip
        for c in psutil.Process().net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }
    assert listening <= {"127.0.0.1", "::1"}, listening  # its dashboard too
    kept = inc(2)
    await wait_until(lambda: kept.state == "DONE", "the last task")
    await flow.shutdown()
    assert cluster.status.name == "closed"
    # Its value was never fetched and went with the cluster: awaiting it
    # says so instead of hanging.
    with pytest.raises(RuntimeError, match="stayed on the Dask cluster"):
        await asyncio.wait_for(kept, LIVENESS)


async def test_checkpoint_restores_results_computed_on_the_cluster(
    client: Any, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    checkpoint = tmp_path / "run.db"

    async def workflow() -> tuple[int, list[bool]]:
        async with await WorkflowEngine.create(
            DaskExecutionBackend(client), checkpoint=checkpoint
        ) as flow:

            @flow.function_task
            def load(n: int) -> list[int]:
                (runs / f"load-{uuid.uuid4().hex}").touch()
                return list(range(n))

            @flow.function_task
            def total(values: list[int]) -> int:
                (runs / f"total-{uuid.uuid4().hex}").touch()
                return sum(values)

            loaded = load(10)
            result = total(loaded)
            value = await result
            return value, [loaded.restored, result.restored]

    assert await workflow() == (45, [False, False])
    assert len(list(runs.iterdir())) == 2
    assert await workflow() == (45, [True, True])
    assert len(list(runs.iterdir())) == 2  # nothing ran again


# -- placement ------------------------------------------------------------------------


async def test_resources_priority_and_workers_map_onto_dask(
    flow: WorkflowEngine, client: Any
) -> None:
    @flow.function_task
    def where() -> str:
        return str(distributed.get_worker().address)

    workers = sorted(client.scheduler_info()["workers"])
    pinned = where(task_description={"workers": [workers[1]]})
    assert await pinned == workers[1]
    gpu = where.options(resources={"gpus": 1, "licences": 1}, priority=5)
    assert await gpu() in workers

    @flow.function_task
    def placement() -> tuple[Any, int]:
        from distributed.worker import thread_state

        mine = distributed.get_worker().state.tasks[thread_state.key]
        return mine.resource_restrictions, -mine.priority[0]

    asked = placement.options(resources={"gpus": 1, "licences": 1}, priority=5)
    assert await asked() == ({"GPU": 1, "licences": 1}, 5)
    assert await placement() == (None, 0)
    # Asked of a cluster that can never give it: fails at submit, no hang.
    for request in ({"gpus": 2}, {"tape_drives": 1}):
        error = await outcome(where.options(resources=request)())
        assert type(error).__name__ == "ResourceError", error
        assert "--resources" in str(error)


# -- data locality -------------------------------------------------------------------


async def test_a_large_value_never_comes_to_this_process(
    flow: WorkflowEngine,
) -> None:
    @flow.function_task
    def produce() -> bytes:
        return os.urandom(200 * MB)

    @flow.function_task
    def size(data: bytes) -> int:
        return len(data)

    me = psutil.Process()
    before = me.memory_info().rss
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    made = produce()
    assert await size(made) == 200 * MB
    assert made.state == "DONE"
    assert not made.done()
    assert backend_of(flow).values_fetched == 1  # the size, nothing else
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert me.memory_info().rss - before < 100 * MB
    assert peak_after < max(peak_before, before + 100 * MB)


async def test_values_nobody_holds_are_released_on_the_workers(
    flow: WorkflowEngine, client: Any
) -> None:
    @flow.function_task
    def chunk(i: int) -> bytes:
        return bytes(MB) + bytes([i])

    @flow.function_task
    def grow(data: bytes) -> bytes:
        return data + b"x"

    @flow.function_task
    def length(data: bytes) -> int:
        return len(data)

    def stored() -> int:
        counts = client.run(lambda dask_worker: len(dask_worker.data))
        return int(sum(counts.values()))

    last = length(grow(grow(grow(chunk(1)))))
    assert await last == MB + 4
    gc.collect()
    # Only the awaited result stays: each intermediate went once its
    # dependent had run.
    await wait_until(lambda: stored() == 1, "the intermediates to be released")
    del last
    gc.collect()
    await wait_until(lambda: stored() == 0, "the last value to be released")


# -- workers lost --------------------------------------------------------------------


def _own_cluster(allowed_failures: int) -> Any:
    with dask.config.set({"distributed.scheduler.allowed-failures": allowed_failures}):
        return distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, **QUIET
        )


async def test_a_task_whose_worker_is_killed_is_rescheduled(
    make_flow: Callable[..., Any], tmp_path: Path
) -> None:
    cluster = await asyncio.to_thread(_own_cluster, 3)
    try:
        flow = await make_flow(DaskExecutionBackend(address=cluster.scheduler_address))
        first_pid = tmp_path / "pid"

        @flow.function_task
        def survives() -> int:
            if not first_pid.exists():
                first_pid.write_text(str(os.getpid()))
                import time

                time.sleep(60)  # until its worker is killed
            return os.getpid()

        fut = survives()
        # Written in two steps (create, then write): wait for the number.
        await wait_until(
            lambda: first_pid.exists() and first_pid.read_text().strip() != "",
            "the task to start",
        )
        os.kill(int(first_pid.read_text()), signal.SIGKILL)
        pid = await asyncio.wait_for(fut, LIVENESS)
        assert pid != int(first_pid.read_text())
        assert fut.state == "DONE"
        await flow.shutdown()
    finally:
        await asyncio.to_thread(cluster.close)


async def test_a_task_that_keeps_losing_its_worker_fails_with_worker_lost(
    make_flow: Callable[..., Any],
) -> None:
    cluster = await asyncio.to_thread(_own_cluster, 0)
    try:
        flow = await make_flow(DaskExecutionBackend(address=cluster.scheduler_address))

        @flow.function_task
        def dies() -> None:
            os.kill(os.getpid(), signal.SIGKILL)

        @flow.function_task
        def fine() -> str:
            return "fine"

        error = await outcome(dies())
        assert isinstance(error, WorkerLostError)
        assert await asyncio.wait_for(fine(), LIVENESS) == "fine"
        await flow.shutdown()
    finally:
        await asyncio.to_thread(cluster.close)


# -- the command line ------------------------------------------------------------------


def test_asyncflow_run_backend_dask(tmp_path: Path) -> None:
    script = tmp_path / "flow.py"
    script.write_text(
        textwrap.dedent(
            """
            import os

            async def main(flow):
                @flow.function_task
                def square(x):
                    return x * x, os.getpid()

                value, pid = await square(7)
                print("value", value, pid != os.getpid())
            """
        )
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "asyncflow",
            "run",
            str(script),
            "--backend",
            "dask",
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "value 49 True" in done.stdout
