"""Resources and priorities: admission against declared capacities.

Every overlap is measured by the tasks themselves (files they hold while they
run, or counters under a lock), never by timing.
"""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import asyncflow
from asyncflow import (
    AsyncioExecutionBackend,
    ExecutionBackend,
    LocalExecutionBackend,
    ResourceError,
    WorkflowEngine,
    current_resources,
)
from asyncflow.resources import BYPASS_LIMIT, Capacity, Request, detect_gpus

BackendFactory = Callable[..., ExecutionBackend]

KINDS: dict[str, BackendFactory] = {
    "threads": lambda **kw: LocalExecutionBackend(ThreadPoolExecutor(4), **kw),
    "processes": lambda **kw: LocalExecutionBackend(ProcessPoolExecutor(2), **kw),
    "asyncio": lambda **kw: AsyncioExecutionBackend(**kw),
}


@pytest.fixture
async def engines() -> AsyncIterator[Callable[..., Any]]:
    made: list[WorkflowEngine] = []

    async def make(backend: ExecutionBackend) -> WorkflowEngine:
        flow = await WorkflowEngine.create(backend)
        made.append(flow)
        return flow

    yield make
    for flow in made:
        await flow.shutdown()


def _hold(folder: str, name: str, cpus: int) -> int:
    """Mark ``cpus`` as held in ``folder`` while the task runs; return how
    many were held at once at the peak this task saw (itself included)."""
    import os as _os
    import time as _time

    mine = [_os.path.join(folder, f"{name}.{i}") for i in range(cpus)]
    for path in mine:
        with open(path, "w"):
            pass
    peak = len(_os.listdir(folder))
    _time.sleep(0.02)  # widen the window in which an overlap would be seen
    peak = max(peak, len(_os.listdir(folder)))
    for path in mine:
        _os.unlink(path)
    return peak


# -- admission ------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
async def test_two_of_two_cpus_never_overlap(kind: str, engines, tmp_path: Path):
    flow = await engines(KINDS[kind](cpus=2))

    @flow.function_task(resources={"cpus": 2})
    def whole_node(folder: str, name: str) -> int:
        return _hold(folder, name, 2)

    peaks = await asyncio.gather(
        *[whole_node(str(tmp_path), f"t{i}") for i in range(6)]
    )
    # Each task saw exactly its own two marks: no other task ran meanwhile.
    assert peaks == [2] * 6


async def test_executables_count_against_the_same_cpus(engines, tmp_path: Path):
    flow = await engines(KINDS["threads"](cpus=2))

    @flow.function_task(resources={"cpus": 1})
    def python_work(folder: str, name: str) -> int:
        return _hold(folder, name, 1)

    @flow.executable_task(resources={"cpus": 2})
    def command(folder: str, name: str) -> str:
        return (
            f"touch {folder}/{name}.0 {folder}/{name}.1; ls {folder} | wc -l; "
            f"sleep 0.02; ls {folder} | wc -l; rm {folder}/{name}.*"
        )

    calls = []
    for i in range(4):
        calls.append(python_work(str(tmp_path), f"f{i}"))
        calls.append(command(str(tmp_path), f"e{i}"))
    results = await asyncio.gather(*calls)
    for i in range(4):
        assert results[2 * i] <= 2
        counts = [int(n) for n in results[2 * i + 1].split()]
        assert counts == [2, 2], f"a 2-cpu command overlapped other work: {counts}"


@pytest.mark.parametrize("kind", ["threads", "asyncio"])
async def test_custom_resources_limit_concurrency(kind: str, engines):
    flow = await engines(KINDS[kind](custom={"licenses": 2}))
    lock = threading.Lock()
    running = [0]
    peak = [0]
    both = threading.Barrier(2, timeout=10)

    @flow.function_task(resources={"licenses": 1})
    def licensed(i: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        if i < 2:
            both.wait()  # the first two provably run together
        with lock:
            running[0] -= 1
        return current_resources()["licenses"]

    got = await asyncio.gather(*[licensed(i) for i in range(8)])
    assert got == [1] * 8
    assert peak[0] == 2


async def test_memory_is_admitted_against_the_declared_total(engines, tmp_path: Path):
    flow = await engines(KINDS["threads"](memory="1GiB"))

    @flow.function_task(resources={"memory": "600MiB", "cpus": 1})
    def big(folder: str, name: str) -> tuple[int, int]:
        return _hold(folder, name, 1), current_resources()["memory"]

    out = await asyncio.gather(*[big(str(tmp_path), f"b{i}") for i in range(4)])
    # Two of 600 MiB never fit in 1 GiB together: each ran alone.
    assert out == [(1, 600 * 2**20)] * 4

    # 600 MiB + 400 MiB fit together: admission lets them run at once.
    together = threading.Barrier(2, timeout=10)

    @flow.function_task(resources={"memory": "600MiB"})
    def large() -> int:
        together.wait()
        return current_resources()["memory"]

    @flow.function_task(resources={"memory": 400 * 2**20})
    def beside() -> int:
        together.wait()
        return current_resources()["memory"]

    assert await asyncio.gather(large(), beside()) == [600 * 2**20, 400 * 2**20]


@pytest.mark.parametrize("kind", list(KINDS))
async def test_gpu_tasks_get_disjoint_devices(kind: str, engines):
    flow = await engines(KINDS[kind](gpus=["0", "1"], cpus=4))
    barrier = threading.Barrier(2, timeout=10) if kind != "processes" else None

    @flow.function_task(resources={"gpus": 1})
    def on_gpu(i: int) -> list[str]:
        if barrier is not None:
            barrier.wait()  # both hold their device at the same time
        return list(current_resources()["gpus"])

    a, b = await asyncio.gather(on_gpu(0), on_gpu(1))
    assert len(a) == len(b) == 1
    assert set(a).isdisjoint(b)
    assert set(a) | set(b) == {"0", "1"}


async def test_executables_see_exactly_their_devices(engines):
    flow = await engines(KINDS["threads"](gpus=["0", "1", "2", "3"], cpus=4))
    gate = asyncio.Event()

    @flow.executable_task(resources={"gpus": 2, "cpus": 2})
    def two_gpus() -> str:
        return 'echo "$CUDA_VISIBLE_DEVICES $HIP_VISIBLE_DEVICES $OMP_NUM_THREADS"; sleep 0.2'

    @flow.executable_task
    def undeclared() -> str:
        return 'echo "${CUDA_VISIBLE_DEVICES-unset} ${OMP_NUM_THREADS-unset}"'

    @flow.executable_task(resources={"gpus": 1})
    def own_env() -> str:
        return 'echo "$CUDA_VISIBLE_DEVICES"'

    first, second = await asyncio.gather(two_gpus(), two_gpus())
    gate.set()
    devices = []
    for line in (first, second):
        cuda, hip, omp = line.split()
        assert cuda == hip
        assert omp == "2"
        devices.append(set(cuda.split(",")))
    assert len(devices[0]) == len(devices[1]) == 2
    assert devices[0].isdisjoint(devices[1])
    # A task that declares nothing keeps the environment it would have had.
    expected = f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')} "
    expected += os.environ.get("OMP_NUM_THREADS", "unset")
    assert (await undeclared()).split() == expected.split()
    # The task's own env wins over the placement.
    chosen = await own_env(task_description={"env": {"CUDA_VISIBLE_DEVICES": "7"}})
    assert chosen.strip() == "7"


async def test_current_resources_in_a_process_and_outside_tasks(engines):
    assert current_resources() == {}
    flow = await engines(KINDS["processes"](cpus=2, custom={"tokens": 3}))

    @flow.function_task(resources={"cpus": 2, "tokens": 3, "memory": "1KiB"})
    def report() -> dict[str, Any]:
        return current_resources()

    got = await report()
    assert got == {"cpus": 2, "gpus": [], "memory": 1024, "tokens": 3}

    @flow.function_task
    async def plain() -> dict[str, Any]:
        return current_resources()

    assert (await plain())["cpus"] == 1


# -- fairness and priorities ----------------------------------------------------


async def test_large_tasks_are_not_starved_by_a_stream_of_small_ones(engines):
    flow = await engines(KINDS["threads"](cpus=4))
    order: list[str] = []
    lock = threading.Lock()

    @flow.function_task(resources={"cpus": 1})
    def small(i: int) -> None:
        with lock:
            order.append(f"s{i}")
        time.sleep(0.002)  # keeps the node busy: all 4 cpus are rarely free

    @flow.function_task(resources={"cpus": 4})
    def large(i: int) -> None:
        with lock:
            order.append(f"L{i}")

    calls = []
    for i in range(200):
        calls.append(small(i))
        if i % 50 == 10:
            calls.append(large(i))
    await asyncio.gather(*calls)
    assert sum(1 for name in order if name.startswith("L")) == 4
    # Each large task starts before more than BYPASS_LIMIT (8, documented;
    # plus the 4 slots in use when it arrived) of the small tasks called after
    # it have started.
    for i in (10, 60, 110, 160):
        after = [n for n in order[order.index(f"L{i}") :] if n.startswith("s")]
        called_after = [f"s{j}" for j in range(i + 1, 200)]
        overtaken = set(called_after) - set(after)
        assert len(overtaken) <= 8 + 4, (i, len(overtaken))


@pytest.mark.parametrize("kind", ["threads", "processes"])
async def test_priorities_order_starts_on_a_one_slot_backend(kind: str, engines):
    executor = ThreadPoolExecutor(1) if kind == "threads" else ProcessPoolExecutor(1)
    flow = await engines(LocalExecutionBackend(executor))

    @flow.function_task
    def blocker(path: str) -> None:
        import os as _os
        import time as _time

        while not _os.path.exists(path):  # held until every task is queued
            _time.sleep(0.005)

    @flow.function_task
    def step(label: str) -> str:
        return label

    release = Path(os.environ.get("TMPDIR", "/tmp")) / f"af-prio-{os.getpid()}-{kind}"
    release.unlink(missing_ok=True)
    first = blocker(str(release))
    await asyncio.sleep(0)  # the blocker takes the one slot
    starts: list[str] = []
    futures = []
    for p, label in [(0, "a0"), (5, "b5"), (1, "c1"), (5, "d5"), (-3, "e-3")]:
        futures.append(step.options(priority=p)(label))
        await asyncio.sleep(0)  # each call reaches the backend on its own
    # and some in one batch too
    futures += [step.options(priority=p)(label) for p, label in [(1, "f1"), (6, "g6")]]
    for future in futures:
        future.add_done_callback(lambda f: starts.append(f.result()))
    await asyncio.sleep(0.05)
    release.touch()
    await first
    await asyncio.gather(*futures)
    release.unlink()
    assert starts == ["g6", "b5", "d5", "c1", "f1", "a0", "e-3"]


async def test_asyncio_priority_orders_tasks_waiting_for_resources(engines):
    flow = await engines(AsyncioExecutionBackend(cpus=1))
    hold = asyncio.Event()
    starts: list[int] = []

    @flow.function_task
    async def blocker() -> None:
        await hold.wait()

    @flow.function_task
    async def step(p: int) -> None:
        starts.append(p)

    first = blocker()
    await asyncio.sleep(0)
    futures = []
    for p in (1, 3, 2, 3, 0):
        futures.append(step.options(priority=p)(p))
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    hold.set()
    await asyncio.gather(first, *futures)
    assert starts == [3, 3, 2, 1, 0]


# -- requests that cannot be met, and bad values ----------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize(
    ("request_", "resource", "asked", "have"),
    [
        ({"cpus": 3}, "cpus", 3, 2),
        ({"gpus": 2}, "gpus", 2, 1),
        ({"memory": "2GiB"}, "memory", 2 * 2**30, 2**30),
        ({"licenses": 5}, "licenses", 5, 4),
        ({"widgets": 1}, "widgets", 1, 0),
    ],
)
async def test_a_request_that_can_never_fit_fails_at_once(
    kind: str, request_: dict[str, Any], resource: str, asked: int, have: int, engines
):
    flow = await engines(
        KINDS[kind](cpus=2, gpus=["0"], memory="1GiB", custom={"licenses": 4})
    )

    @flow.function_task(resources=request_)
    def never() -> None:
        return None

    with pytest.raises(ResourceError) as caught:
        await never()
    error = caught.value
    assert (error.resource, error.requested, error.capacity) == (resource, asked, have)
    assert resource in str(error)
    assert str(asked) in str(error)
    assert str(have) in str(error)
    assert "backend 'default'" in str(error)

    @flow.function_task
    def fine() -> int:
        return 1

    assert await fine() == 1  # the backend goes on


async def test_an_unmet_executable_request_fails_too(engines):
    flow = await engines(KINDS["asyncio"](gpus=0))

    @flow.executable_task(resources={"gpus": 1})
    def needs_gpu() -> str:
        return "true"

    with pytest.raises(ResourceError, match="1 gpus"):
        await needs_gpu()


@pytest.mark.parametrize(
    ("resources", "error", "match"),
    [
        ({"cpus": -1}, ValueError, "cpus"),
        ({"cpus": 1.5}, TypeError, "cpus"),
        ({"gpus": True}, TypeError, "gpus"),
        ({"memory": "8 parsecs"}, ValueError, "not a size"),
        ({"memory": -5}, ValueError, "memory"),
        ({"memory": [1]}, TypeError, "memory"),
        ({"licenses": "2"}, TypeError, "licenses"),
        ({3: 1}, TypeError, "resource names"),
        ([("cpus", 1)], TypeError, "mapping"),
    ],
)
async def test_bad_values_raise_at_decoration_and_call_time(
    resources: Any, error: type[Exception], match: str, engines
):
    flow = await engines(KINDS["threads"]())
    with pytest.raises(error, match=match):
        flow.function_task(resources=resources)

    @flow.function_task
    def task() -> None:
        return None

    with pytest.raises(error, match=match):
        task.options(resources=resources)


async def test_priority_must_be_an_int_and_blocks_take_neither(engines):
    flow = await engines(KINDS["threads"]())
    with pytest.raises(TypeError, match="priority"):
        flow.function_task(priority="high")
    with pytest.raises(TypeError, match="resources= or priority="):
        flow.block(resources={"cpus": 1})


def test_memory_units():
    parse = Request.parse
    assert parse({"memory": "8GiB"}).memory == 8 * 2**30
    assert parse({"memory": "512MB"}).memory == 512 * 10**6
    assert parse({"memory": "1.5G"}).memory == 1_500_000_000
    assert parse({"memory": 1024}).memory == 1024
    assert parse({"memory": "64 Ki"}).memory == 64 * 1024
    assert parse(None) is None
    request = parse({"gpus": 1, "licenses": 2})
    assert (request.cpus, request.gpus, request.custom) == (1, 1, {"licenses": 2})


# -- detection --------------------------------------------------------------------


def test_gpus_detected_from_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert detect_gpus() == ["2", "3"]
    assert LocalExecutionBackend().capacity.gpus == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert detect_gpus() == []


def test_gpus_detected_from_the_driver_tool(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    tool = tmp_path / "nvidia-smi"
    tool.write_text(
        "#!/bin/sh\n"
        'echo "GPU 0: NVIDIA H200 (UUID: GPU-aaaa)"\n'
        'echo "GPU 1: NVIDIA H200 (UUID: GPU-bbbb)"\n'
    )
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    for name in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert detect_gpus() == ["0", "1"]


def test_default_capacity():
    cpus = len(os.sched_getaffinity(0))
    backend = LocalExecutionBackend(ThreadPoolExecutor(1))
    assert backend.capacity.cpus == cpus
    wide = LocalExecutionBackend(ThreadPoolExecutor(cpus + 8))
    assert wide.capacity.cpus == cpus + 8  # one per worker at least
    assert AsyncioExecutionBackend().capacity.cpus is None
    assert backend.capacity.memory > 0
    capacity = Capacity(gpus=3, custom={"licenses": 2})
    assert capacity.gpus == ["0", "1", "2"]
    with pytest.raises(ValueError, match="twice"):
        Capacity(gpus=["0", "0"])


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs two CPUs and sched_setaffinity",
)
async def test_pinned_tasks_run_on_their_own_cpus(engines):
    flow = await engines(LocalExecutionBackend(ThreadPoolExecutor(2), pin_cpus=True))
    both = threading.Barrier(2, timeout=10)

    @flow.function_task(resources={"cpus": 1})
    def where() -> tuple[list[int], list[int]]:
        both.wait()
        import os as _os

        return (
            sorted(_os.sched_getaffinity(threading.get_native_id())),
            current_resources()["cpu_ids"],
        )

    (a, ga), (b, gb) = await asyncio.gather(where(), where())
    assert a == ga
    assert b == gb
    assert len(a) == len(b) == 1
    assert a != b

    @flow.executable_task(resources={"cpus": 1})
    def pinned_command() -> str:
        return "taskset -pc $$ | sed 's/.*: //'"

    assert (await pinned_command()).strip() in {str(c) for c in os.sched_getaffinity(0)}


# -- resources come back ----------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
async def test_failed_cancelled_and_retried_tasks_give_their_resources_back(
    kind: str, engines, tmp_path: Path
):
    flow = await engines(KINDS[kind](cpus=2))
    marker = tmp_path / "tries"

    @flow.function_task(resources={"cpus": 2})
    def boom() -> None:
        raise RuntimeError("boom")

    @flow.function_task(resources={"cpus": 2}, retries=2)
    def flaky(path: str) -> int:
        import os as _os

        with open(path, "a") as file:
            file.write("x")
        if _os.path.getsize(path) < 3:
            raise OSError("not yet")
        return _os.path.getsize(path)

    @flow.function_task(resources={"cpus": 2})
    def ok(i: int) -> int:
        return i

    with pytest.raises(RuntimeError, match="boom"):
        await boom()
    assert await flaky(str(marker)) == 3
    doomed = [ok(i) for i in range(3)]
    for future in doomed:
        future.cancel()
    assert await asyncio.gather(*[ok(i) for i in range(5)]) == list(range(5))
    assert all(f.cancelled() for f in doomed)


def test_public_names():
    assert asyncflow.ResourceError is ResourceError
    assert asyncflow.current_resources is current_resources
    assert issubclass(ResourceError, asyncflow.AsyncFlowError)
    assert BYPASS_LIMIT == 8  # the documented policy


async def test_a_backend_that_cannot_admit_by_resources_warns_once(
    engines, caplog: pytest.LogCaptureFixture
):
    from asyncflow.backends.base import ExecutionBackend as Base

    class Plain(Base):
        def submit(self, tasks):
            for task in tasks:
                self.reporter.succeeded(task, task.name)

        def cancel(self, task):
            return None

        async def shutdown(self):
            return None

    flow = await engines(Plain())

    @flow.function_task(resources={"gpus": 1})
    def wants_gpu() -> None:
        return None

    with caplog.at_level("WARNING", logger="asyncflow"):
        assert await asyncio.gather(wants_gpu(), wants_gpu()) == ["wants_gpu"] * 2
        await wants_gpu()
    warnings = [r for r in caplog.records if "does not admit tasks" in r.getMessage()]
    assert len(warnings) == 1
    assert "wants_gpu" in warnings[0].getMessage()


async def test_a_worker_stuck_in_a_long_task_never_keeps_waiting_ones_from_others(
    engines,
):
    # Short tasks are handed to a worker several at a time. One of them turns
    # out long (it waits until every other task has run): the tasks taken
    # together with it must run on the other worker meanwhile.
    flow = await engines(LocalExecutionBackend(ThreadPoolExecutor(2)))
    total = 400
    lock = threading.Lock()
    finished = [0]
    everyone_else = threading.Event()

    @flow.function_task
    def short(i: int) -> bool:
        if i == total // 2:
            return everyone_else.wait(timeout=20)
        with lock:
            finished[0] += 1
            if finished[0] == total - 1:
                everyone_else.set()
        return True

    assert all(await asyncio.gather(*[short(i) for i in range(total)]))


class RadicalExecutionBackend:
    """Stands in for RHAPSODY's RADICAL-Pilot backend (not installed here):
    the same class name and task-dict protocol; it records what it is given
    and completes every task."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self._callback: Any = None

    def register_callback(self, func: Any) -> None:
        self._callback = func

    async def submit_tasks(self, tasks: list[dict[str, Any]]) -> None:
        for task in tasks:
            self.received.append(task)
            self._callback({**task, "return_value": task["name"]}, "DONE")

    async def cancel_task(self, uid: str) -> None:
        return None

    async def shutdown(self) -> None:
        return None


async def test_rhapsody_pilot_descriptions_carry_resources_and_priority(engines):
    pilot = RadicalExecutionBackend()
    flow = await engines(asyncflow.RhapsodyBackend(pilot, name="hpc"))
    assert flow.backend.honours_resources

    @flow.function_task(
        resources={"cpus": 8, "gpus": 2, "memory": "3GiB", "licenses": 1},
        priority=4,
    )
    def solve() -> None:
        return None

    @flow.function_task(resources={"cpus": 2})
    def mine() -> None:
        return None

    assert await solve() == "solve"
    assert await mine(task_description={"cores_per_rank": 16}) == "mine"
    first, second = (t["task_backend_specific_kwargs"] for t in pilot.received)
    assert first == {
        "ranks": 1,
        "cores_per_rank": 8,
        "gpus_per_rank": 2,
        "mem_per_rank": 3072,
        "priority": 4,
    }
    assert second == {"ranks": 1, "cores_per_rank": 16}  # the user's key wins


# -- regressions found in review -------------------------------------------------


async def test_a_free_lane_is_never_blocked_by_many_waiting_in_a_full_one(engines):
    release = threading.Event()
    flow = await engines(LocalExecutionBackend(ThreadPoolExecutor(1), cpus=8))

    @flow.function_task
    def blocker() -> None:
        release.wait(20)

    @flow.function_task
    def small(i: int) -> int:
        return i

    @flow.executable_task
    def command() -> str:
        return "echo ran"

    first = blocker()
    smalls = [small(i) for i in range(200)]
    try:
        assert (await asyncio.wait_for(asyncio.shield(done := command()), 10)) == (
            "ran\n"
        )
    finally:
        release.set()
    assert await asyncio.gather(*smalls) == list(range(200))
    await first
    assert done.done()


async def test_a_task_that_fits_passes_many_that_wait_for_a_busy_gpu(engines):
    release = threading.Event()
    flow = await engines(KINDS["threads"](gpus=1, cpus=4))

    @flow.function_task(resources={"gpus": 1})
    def on_gpu(i: int) -> int:
        if i == 0:
            release.wait(20)
        return i

    @flow.function_task
    def cpu_only() -> str:
        return "ran"

    gpu_calls = [on_gpu(i) for i in range(100)]
    try:
        assert await asyncio.wait_for(cpu_only(), 10) == "ran"
    finally:
        release.set()
    assert await asyncio.gather(*gpu_calls) == list(range(100))


async def test_a_higher_priority_task_is_not_stuck_behind_taken_chunks(engines):
    flow = await engines(LocalExecutionBackend(ThreadPoolExecutor(1)))
    running = threading.Event()
    go = threading.Event()
    order: list[str] = []

    @flow.function_task
    def quick(name: str) -> None:
        order.append(name)

    @flow.function_task
    def step(name: str) -> None:
        order.append(name)
        if name == "low1":
            running.set()
            go.wait(10)

    low = [quick("low0")] + [step(f"low{i}") for i in range(1, 21)]
    await asyncio.get_running_loop().run_in_executor(None, running.wait, 10)
    urgent = step.options(priority=10)("urgent")
    await asyncio.sleep(0.2)  # the backend has it
    go.set()
    await asyncio.gather(*low, urgent)
    assert order.index("urgent") == 2


@pytest.mark.parametrize("kind", ["threads", "asyncio"])
async def test_a_request_that_can_never_fit_is_not_retried(kind: str, engines):
    flow = await engines(KINDS[kind](cpus=2))
    calls = []

    @flow.function_task(resources={"cpus": 4}, retries=3, retry_delay=5)
    def never() -> None:
        calls.append(1)

    with pytest.raises(ResourceError):
        await asyncio.wait_for(never(), 4)  # four attempts would take 15 s
    assert calls == []


async def test_detected_gpus_are_hidden_from_commands_that_ask_for_none(
    engines, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    flow = await engines(KINDS["threads"]())

    @flow.executable_task(resources={"cpus": 1})
    def cpu_command() -> str:
        return 'echo "[$CUDA_VISIBLE_DEVICES]"'

    @flow.executable_task(resources={"gpus": 1})
    def gpu_command() -> str:
        return 'echo "[$CUDA_VISIBLE_DEVICES]"'

    assert (await cpu_command()).strip() == "[]"
    assert (await gpu_command()).strip() in {"[0]", "[1]"}
    assert (await cpu_command()).strip() == "[]"


async def test_system_exit_in_one_short_async_body_fails_only_that_task(engines):
    flow = await engines(LocalExecutionBackend(ThreadPoolExecutor(1)))

    @flow.function_task
    async def body(i: int) -> int:
        if i == 20:
            raise SystemExit(3)
        return i

    outcomes = await asyncio.wait_for(
        asyncio.gather(*[body(i) for i in range(60)], return_exceptions=True), 20
    )
    assert isinstance(outcomes[20], RuntimeError)
    assert "SystemExit" in str(outcomes[20])
    assert [o for i, o in enumerate(outcomes) if i != 20] == [
        i for i in range(60) if i != 20
    ]
    assert flow.backend._gate._busy == {"fn": 0, "exec": 0}


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs two CPUs and sched_setaffinity",
)
async def test_a_pinned_task_leaves_its_thread_unpinned(engines):
    flow = await engines(
        LocalExecutionBackend(ThreadPoolExecutor(1), pin_cpus=True, cpus=2)
    )

    @flow.function_task(resources={"cpus": 1})
    def pinned() -> list[int]:
        return sorted(os.sched_getaffinity(threading.get_native_id()))

    @flow.function_task(resources={"cpus": 0})
    def free() -> list[int]:
        return sorted(os.sched_getaffinity(threading.get_native_id()))

    assert len(await pinned()) == 1
    assert await free() == sorted(os.sched_getaffinity(0))


async def test_the_engine_never_sees_a_tasks_grant(engines):
    flow = await engines(KINDS["asyncio"](gpus=["7"], cpus=4))

    @flow.function_task(resources={"gpus": 1, "cpus": 3})
    async def on_gpu() -> str:
        return current_resources()["gpus"][0]

    @flow.block
    async def after(device: str) -> dict[str, Any]:
        return current_resources()

    assert await after(on_gpu()) == {}


async def test_shutdown_with_many_waiting_async_tasks_is_quick_and_clean(
    caplog: pytest.LogCaptureFixture,
):
    flow = await WorkflowEngine.create(LocalExecutionBackend(ThreadPoolExecutor(2)))
    started = threading.Event()

    @flow.function_task
    async def slow(i: int) -> None:
        started.set()
        await asyncio.sleep(30)

    futures = [slow(i) for i in range(20_000)]
    await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
    with caplog.at_level("WARNING", logger="asyncflow"):
        await asyncio.wait_for(flow.shutdown(), 30)
    assert all(f.cancelled() for f in futures)
    assert not [r for r in caplog.records if "failed to cancel" in r.getMessage()]
