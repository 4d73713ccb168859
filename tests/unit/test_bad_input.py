"""SPEC §10: every misuse gets a clear, specific error at the earliest point.

One test per misuse; each asserts the exception type *and* that the message
names the task (or the offending object). The last group checks that a bad
task never takes the engine or its sibling tasks down.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from asyncflow import (
    AsyncioExecutionBackend,
    LocalExecutionBackend,
    NoopExecutionBackend,
    WorkflowEngine,
)

LIVENESS = 20.0


@pytest.fixture
async def engines() -> AsyncIterator[Callable[..., Any]]:
    made: list[WorkflowEngine] = []

    async def make(backend: Any = None, **kwargs: Any) -> WorkflowEngine:
        engine = await WorkflowEngine.create(
            backend=NoopExecutionBackend() if backend is None else backend, **kwargs
        )
        made.append(engine)
        return engine

    yield make
    for engine in made:
        await asyncio.wait_for(engine.shutdown(timeout=5), LIVENESS)


@pytest.fixture
async def flow(engines) -> WorkflowEngine:
    return await engines()


DECORATORS = ["function_task", "executable_task", "block", "prompt_task"]


# -- decorating ----------------------------------------------------------------


@pytest.mark.parametrize("decorator", DECORATORS)
@pytest.mark.parametrize("thing", [42, "not a function", [print], 3.5], ids=repr)
async def test_decorating_a_non_callable_bare(
    flow: WorkflowEngine, decorator: str, thing: Any
) -> None:
    with pytest.raises(TypeError) as info:
        getattr(flow, decorator)(thing)
    message = str(info.value)
    assert repr(thing) in message
    assert decorator in message


@pytest.mark.parametrize("decorator", ["function_task", "executable_task", "block"])
async def test_decorating_a_non_callable_with_arguments(
    flow: WorkflowEngine, decorator: str
) -> None:
    configured = getattr(flow, decorator)()
    with pytest.raises(TypeError) as info:
        configured(12345)
    assert "12345" in str(info.value)
    assert decorator in str(info.value)
    if decorator != "block":
        with pytest.raises(TypeError) as info:
            getattr(flow, decorator)(backend="default")(12345)
        assert "12345" in str(info.value)


async def test_backend_name_given_positionally_gets_a_hint(
    flow: WorkflowEngine,
) -> None:
    with pytest.raises(TypeError) as info:
        flow.function_task("default")
    assert "'default'" in str(info.value)
    assert "backend=" in str(info.value)


# -- task_description ----------------------------------------------------------


@pytest.mark.parametrize("decorator", ["function_task", "executable_task", "block"])
@pytest.mark.parametrize("bad", [["gpus", 1], "gpus=1", 4], ids=repr)
async def test_non_dict_task_description_default_at_definition(
    flow: WorkflowEngine, decorator: str, bad: Any
) -> None:
    async def simulate_protein(task_description=bad):  # type: ignore[no-untyped-def]
        return "true"

    with pytest.raises(TypeError) as info:
        getattr(flow, decorator)(simulate_protein)
    message = str(info.value)
    assert "simulate_protein" in message
    assert "task_description" in message
    assert type(bad).__name__ in message


@pytest.mark.parametrize("decorator", ["function_task", "executable_task", "block"])
@pytest.mark.parametrize("bad", [["gpus", 1], "gpus=1", 4, ("shell", False)], ids=repr)
async def test_non_dict_task_description_at_call_time(
    flow: WorkflowEngine, decorator: str, bad: Any
) -> None:
    @getattr(flow, decorator)
    async def align_reads() -> str:
        return "true"

    # Raised by the call itself, before any future exists.
    with pytest.raises(TypeError) as info:
        align_reads(task_description=bad)
    message = str(info.value)
    assert "align_reads" in message
    assert "task_description" in message
    assert type(bad).__name__ in message
    # The engine is unharmed.
    assert await align_reads(task_description={}) is not None


# -- executable bodies ---------------------------------------------------------


@pytest.mark.parametrize(
    "backend",
    [NoopExecutionBackend, lambda: LocalExecutionBackend(ThreadPoolExecutor(2))],
    ids=["noop", "threads"],
)
@pytest.mark.parametrize(
    "bad", [0, None, b"ls", [], ["ls", 1], ("ls", b"-l"), "", "  \n "], ids=repr
)
async def test_executable_body_returning_a_non_command(
    engines, backend: Callable[[], Any], bad: Any
) -> None:
    flow = await engines(backend())

    @flow.executable_task
    async def make_command() -> Any:
        return bad

    fut = make_command()
    await asyncio.wait([fut], timeout=LIVENESS)
    assert fut.state == "FAILED"
    error = fut.exception()
    assert type(error) is ValueError
    assert "make_command" in str(error)
    assert repr(bad) in str(error)


# -- backends ---------------------------------------------------------------------


async def test_unknown_backend_name_lists_the_known_ones(engines) -> None:
    flow = await engines([NoopExecutionBackend(name="cpu"), NoopExecutionBackend("io")])
    for decorator in ("function_task", "executable_task", "prompt_task"):
        with pytest.raises(ValueError, match="'gpu'") as info:

            @getattr(flow, decorator)(backend="gpu")
            async def train_model() -> None:
                return None

        message = str(info.value)
        assert "'cpu'" in message
        assert "'io'" in message


async def test_duplicate_backend_names(engines) -> None:
    with pytest.raises(ValueError, match="'hpc'"):
        await engines([NoopExecutionBackend("hpc"), NoopExecutionBackend("hpc")])
    # Default names clash as well.
    with pytest.raises(ValueError, match="'default'"):
        await engines([NoopExecutionBackend(), AsyncioExecutionBackend()])


@pytest.mark.parametrize(
    "make_thing",
    [
        object,
        lambda: "threads",
        lambda: ThreadPoolExecutor(1),  # a common mistake: the bare executor
        lambda: LocalExecutionBackend,  # the class, not an instance
        lambda: [NoopExecutionBackend(), 42],
    ],
    ids=["object", "str", "executor", "class", "list-item"],
)
async def test_non_backend_object(engines, make_thing: Callable[[], Any]) -> None:
    thing = make_thing()
    offending = thing[-1] if isinstance(thing, list) else thing
    try:
        with pytest.raises(TypeError) as info:
            await engines(thing)
        assert repr(offending) in str(info.value)
    finally:
        if isinstance(thing, ThreadPoolExecutor):
            thing.shutdown()


async def test_local_backend_rejects_a_non_executor() -> None:
    with pytest.raises(TypeError, match="dict"):
        LocalExecutionBackend({"workers": 4})  # type: ignore[arg-type]


# -- engine lifecycle --------------------------------------------------------------


async def test_task_called_after_shutdown(engines) -> None:
    flow = await engines()

    @flow.function_task
    async def late_task() -> None:
        return None

    await flow.shutdown()
    with pytest.raises(RuntimeError) as info:
        late_task()
    assert "late_task" in str(info.value)
    assert "shut down" in str(info.value)


def test_engine_created_outside_a_running_loop() -> None:
    with pytest.raises(RuntimeError) as info:
        WorkflowEngine()
    message = str(info.value)
    assert "WorkflowEngine.create" in message
    assert "asyncio.run" in message
    assert "await" in message


async def test_engine_constructed_directly_inside_a_loop() -> None:
    with pytest.raises(RuntimeError) as info:
        WorkflowEngine([NoopExecutionBackend()])
    assert "WorkflowEngine.create" in str(info.value)


async def test_future_from_another_engine_as_dependency(engines) -> None:
    first = await engines(AsyncioExecutionBackend())
    second = await engines(AsyncioExecutionBackend())

    @first.function_task
    async def upstream() -> int:
        return 1

    @second.function_task
    async def downstream(*args: Any, **kwargs: Any) -> None:
        return None

    foreign = upstream()
    for args, kwargs in (
        ((foreign,), {}),
        ((), {"data": foreign}),
        (([1, foreign],), {}),
        ((), {"inputs": {"a": foreign}}),
    ):
        with pytest.raises(ValueError, match="another") as info:
            downstream(*args, **kwargs)
        message = str(info.value)
        assert "downstream" in message
        assert "upstream" in message
        assert foreign.uid in message
    # The failed calls left nothing behind: both engines still work.
    assert await upstream() == 1
    assert await downstream(1) is None


# -- a bad task never takes the engine or other tasks down ---------------------------

BAD_TASK_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    from asyncflow import (AsyncioExecutionBackend, LocalExecutionBackend,
                           WorkflowEngine)

    backend_name, error_name, where = sys.argv[1:4]


    class FatalError(BaseException):
        pass


    def make_error():
        return {
            "SystemExit": lambda: SystemExit(3),
            "KeyboardInterrupt": KeyboardInterrupt,
            "BaseException": lambda: FatalError("fatal"),
        }[error_name]()


    def describe(fut):
        if not fut.done():
            return [str(fut.state), None]
        if fut.cancelled():
            return [str(fut.state), "cancelled"]
        error = fut.exception()
        return [str(fut.state), None if error is None else f"{type(error).__name__}: {error}"]


    async def main():
        # One worker: the pool runs tasks first come, first served.
        backend = {
            "threads": lambda: LocalExecutionBackend(ThreadPoolExecutor(1)),
            "processes": lambda: LocalExecutionBackend(ProcessPoolExecutor(1)),
            "asyncio": AsyncioExecutionBackend,
        }[backend_name]()
        async with await WorkflowEngine.create(backend=backend) as flow:
            if where == "async-function":
                @flow.function_task
                async def bad_task():
                    raise make_error()
            elif where == "sync-function":
                @flow.function_task
                def bad_task():
                    raise make_error()
            elif where == "async-executable-body":
                @flow.executable_task
                async def bad_task():
                    raise make_error()
            elif where == "sync-executable-body":
                @flow.executable_task
                def bad_task():
                    raise make_error()
            elif where == "block":
                @flow.block
                async def bad_task():
                    raise make_error()

            @flow.function_task
            def sync_sibling():
                return "sync"

            @flow.function_task
            async def async_sibling():
                return "async"

            @flow.executable_task
            async def command_sibling():
                return "echo command"

            @flow.function_task
            def later_task():
                return "later"

            # The bad task and its siblings are released in the same batch.
            bad = bad_task()
            siblings = [sync_sibling(), async_sibling(), command_sibling()]
            await asyncio.wait(siblings, timeout=10)
            # A task submitted afterwards to the same (FIFO) worker: once it
            # is done, the bad task's outcome has been reported too.
            later = later_task()
            await asyncio.wait([later], timeout=10)
            for _ in range(5):
                await asyncio.sleep(0)
            print("REPORT", json.dumps({
                "bad": describe(bad),
                "siblings": [describe(s) for s in siblings],
                "later": describe(later),
            }), flush=True)


    asyncio.run(main())
    print("EXITED NORMALLY", flush=True)
    """
)

ERRORS = ["SystemExit", "KeyboardInterrupt", "BaseException"]


def bad_task_cases() -> list[Any]:
    cases = []
    for error in ERRORS:
        for backend in ("threads", "processes", "asyncio"):
            for where in ("async-function", "sync-function"):
                cases.append(pytest.param(backend, error, where))
        for where in ("async-executable-body", "sync-executable-body", "block"):
            cases.append(pytest.param("threads", error, where))
    return cases


@pytest.fixture(scope="module")
def bad_task_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bad-task") / "bad_task.py"
    path.write_text(BAD_TASK_SCRIPT)
    return path


@pytest.mark.parametrize(("backend", "error", "where"), bad_task_cases())
def test_a_bad_task_fails_alone(
    bad_task_script: Path, backend: str, error: str, where: str
) -> None:
    # A separate interpreter: a KeyboardInterrupt escaping the engine must
    # not abort the test session itself.
    proc = subprocess.run(
        [sys.executable, str(bad_task_script), backend, error, where],
        capture_output=True,
        text=True,
        timeout=LIVENESS * 2,
        check=False,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},
    )
    assert "EXITED NORMALLY" in proc.stdout, (proc.returncode, proc.stderr[-3000:])
    assert proc.returncode == 0
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("REPORT ")]
    report = json.loads(line[len("REPORT ") :])
    state, message = report["bad"]
    assert state == "FAILED", report
    assert message is not None
    assert "bad_task" in message, message  # the task is named
    assert error.replace("BaseException", "FatalError") in message
    assert report["siblings"] == [["DONE", None]] * 3, report
    assert report["later"] == ["DONE", None], report


async def test_a_task_killing_its_worker_does_not_break_the_backend(engines) -> None:
    flow = await engines(LocalExecutionBackend(ProcessPoolExecutor(2)))

    @flow.function_task
    def crash_worker() -> None:
        os._exit(3)

    @flow.function_task
    def later_task(x: int) -> int:
        return x

    bad = crash_worker()
    await asyncio.wait([bad], timeout=LIVENESS)
    assert bad.state == "FAILED"
    assert "crash_worker" in str(bad.exception())
    later = later_task(7)
    await asyncio.wait([later], timeout=LIVENESS)
    assert later.state == "DONE", later.exception()
    assert later.result() == 7
