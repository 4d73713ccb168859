"""SPEC §3 dependencies and §5 failure/cancellation propagation."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from asyncflow import DependencyFailureError, TaskFuture, WorkflowEngine


async def test_futures_anywhere_in_arguments_are_resolved(flow: WorkflowEngine) -> None:
    @flow.function_task
    async def value(x: Any) -> Any:
        return x

    @flow.function_task
    async def inspect_args(*args: Any, **kwargs: Any) -> list[Any]:
        found = [a for a in args if isinstance(a, asyncio.Future)]
        for container in (*args, *kwargs.values()):
            items = container.values() if isinstance(container, dict) else container
            if isinstance(container, (list, tuple, set, dict)):
                found += [i for i in items if isinstance(i, asyncio.Future)]
        assert not found, f"the body received futures: {found}"
        return [args, kwargs]

    args, kwargs = await inspect_args(
        value(1),
        [value(2), 3],
        (value(4),),
        {value(5)},
        named=value(6),
        mapping={"k": value(7), "plain": 8},
    )
    assert args == (1, [2, 3], (4,), {5})
    assert kwargs == {"named": 6, "mapping": {"k": 7, "plain": 8}}


async def test_dependencies_are_recorded_once(make_engine) -> None:
    flow = await make_engine("noop")

    @flow.function_task
    async def source() -> int:
        return 1

    @flow.function_task
    async def sink(*args: Any, **kwargs: Any) -> None:
        pass

    a, b = source(), source()
    fut = sink(a, a, [a, b], x=b, y={"z": a})
    assert fut.dependencies == (a, b)
    await fut


async def test_nested_containers_are_not_searched(make_engine) -> None:
    flow = await make_engine("asyncio")

    @flow.function_task
    async def source() -> int:
        return 1

    @flow.function_task
    async def sink(arg: Any) -> Any:
        return arg

    inner = source()
    fut = sink([[inner]])
    assert fut.dependencies == ()
    result = await fut
    assert result[0][0] is inner
    await inner


async def test_plain_values_pass_through_uncopied(local_flow: WorkflowEngine) -> None:
    @local_flow.function_task
    async def source() -> int:
        return 1

    @local_flow.function_task
    async def identity(plain: list[int], mixed: list[Any], dep: int) -> tuple[Any, Any]:
        return plain, mixed

    plain = [1, 2, 3]
    mixed = [source(), 5]
    got_plain, got_mixed = await identity(plain, mixed, source())
    assert got_plain is plain
    assert got_mixed == [1, 5]
    assert mixed[1] == 5
    assert isinstance(mixed[0], TaskFuture)


async def test_depending_on_finished_futures(flow: WorkflowEngine) -> None:
    @flow.function_task
    async def one() -> int:
        return 1

    @flow.function_task
    async def add(x: int, y: int) -> int:
        return x + y

    first = one()
    await first
    assert await add(first, first) == 2


async def test_fan_in_over_many_futures(make_engine) -> None:
    flow = await make_engine("threads")

    @flow.function_task
    def square(i: int) -> int:
        return i * i

    @flow.function_task
    def total(values: list[int]) -> int:
        return sum(values)

    assert await total([square(i) for i in range(2000)]) == sum(
        i * i for i in range(2000)
    )


async def test_task_description_is_merged_and_never_passed(make_engine) -> None:
    flow = await make_engine("threads")
    seen: dict[str, Any] = {}

    @flow.function_task
    async def sized(x: int, task_description: dict[str, Any] | None = None) -> int:
        seen["body"] = task_description
        return x

    @flow.function_task
    async def configured(task_description={"ranks": 4, "gpus": 1}) -> None:  # noqa: B006
        seen["default"] = task_description

    fut = sized(1, task_description={"ranks": 2}, workflow_id="wf-1")
    assert fut.task_description == {"ranks": 2}
    assert fut.workflow_id == "wf-1"
    assert await fut == 1
    assert seen["body"] is None

    other = configured(task_description={"gpus": 2})
    assert other.task_description == {"ranks": 4, "gpus": 2}
    await other
    assert seen["default"] == {"ranks": 4, "gpus": 1}  # the body's own default
    assert configured().task_description == {"ranks": 4, "gpus": 1}


async def test_failure_skips_dependents_and_keeps_the_root_cause(
    flow: WorkflowEngine,
) -> None:
    @flow.function_task
    async def broken() -> None:
        raise ZeroDivisionError("bad denominator")

    @flow.function_task
    async def fine() -> int:
        return 2

    @flow.function_task
    async def combine(a: Any, b: Any) -> None:
        raise AssertionError("must never run")

    @flow.function_task
    async def after(x: Any) -> None:
        raise AssertionError("must never run")

    root = broken()
    independent = fine()
    middle = combine(root, independent)
    last = after(middle)
    with pytest.raises(DependencyFailureError) as info:
        await last
    assert await independent == 2
    assert middle.state == "FAILED"
    assert last.state == "FAILED"
    error = info.value
    assert error.failed_dependencies == ["combine"]
    assert isinstance(error.root_cause, ZeroDivisionError)
    assert error.__cause__ is error.root_cause
    assert error.root_cause is root.exception()
    assert "bad denominator" in str(error)
    assert middle.exception().failed_dependencies == ["broken"]


async def test_long_failure_chain_keeps_root_cause(make_engine) -> None:
    flow = await make_engine("threads")

    @flow.function_task
    def first() -> int:
        raise KeyError("origin")

    @flow.function_task
    def step(x: int) -> int:
        return x + 1

    chain = [first()]
    for _ in range(999):
        chain.append(step(chain[-1]))
    with pytest.raises(DependencyFailureError) as info:
        await chain[-1]
    assert all(f.state == "FAILED" for f in chain)
    assert isinstance(info.value.root_cause, KeyError)
    assert info.value.root_cause is chain[0].exception()


async def test_cancelled_dependency_cancels_dependents(make_engine) -> None:
    flow = await make_engine("threads")
    gate = threading.Event()
    ran: list[str] = []

    @flow.function_task
    def slow() -> int:
        gate.wait(30)
        return 1

    @flow.function_task
    def child(x: int) -> int:
        ran.append("child")
        return x

    parent = slow()
    kid = child(parent)
    grandchild = child(kid)
    parent.cancel()
    gate.set()
    for fut in (parent, kid, grandchild):
        with pytest.raises(asyncio.CancelledError):
            await fut
        assert fut.state == "CANCELLED"
    assert ran == []
    # Registering against an already-cancelled future cancels at once.
    assert child(parent).state == "CANCELLED"


async def test_registering_against_a_failed_future_fails_at_once(make_engine) -> None:
    flow = await make_engine("asyncio")

    @flow.function_task
    async def broken() -> None:
        raise ValueError("x")

    @flow.function_task
    async def child(x: Any) -> None:
        pass

    bad = broken()
    with pytest.raises(ValueError, match="x"):
        await bad
    late = child(bad)
    assert late.state == "FAILED"
    assert isinstance(late.exception(), DependencyFailureError)


async def test_several_failed_dependencies_are_all_named(make_engine) -> None:
    flow = await make_engine("asyncio")

    @flow.function_task
    async def broken(tag: str) -> None:
        raise ValueError(tag)

    @flow.function_task
    async def join(*parts: Any) -> None:
        pass

    a, b = broken("a"), broken("b")
    await asyncio.gather(a, b, return_exceptions=True)
    fut = join(a, b)
    with pytest.raises(DependencyFailureError) as info:
        await fut
    assert info.value.failed_dependencies == ["broken", "broken"]


async def test_diamond_runs_each_task_once(flow: WorkflowEngine) -> None:
    @flow.function_task
    async def top() -> int:
        return 1

    @flow.function_task
    async def left(x: int) -> int:
        return x + 10

    @flow.function_task
    async def right(x: int) -> int:
        return x + 100

    @flow.function_task
    async def bottom(a: int, b: int) -> int:
        return a + b

    t = top()
    assert await bottom(left(t), right(t)) == 112


async def test_finished_tasks_release_their_arguments(
    local_flow: WorkflowEngine,
) -> None:
    flow = local_flow
    import gc
    import weakref

    class Blob:
        pass

    @flow.function_task
    def make() -> Blob:
        return Blob()

    @flow.function_task
    def size_of(blob: Blob) -> int:
        return 1

    first = make()
    result = size_of(first)
    assert await result == 1
    ref = weakref.ref(first.result())
    del first
    gc.collect()
    assert ref() is None, "a finished task still holds its resolved arguments"
    assert result.args == ()


async def test_calls_without_keywords_do_not_share_their_kwargs(make_engine) -> None:
    """A backend may write into a waiting task's kwargs: no other call sees it."""
    flow = await make_engine("asyncio")

    @flow.function_task
    async def show(**kwargs: Any) -> dict[str, Any]:
        return kwargs

    first, second = show(), show()
    first.kwargs["tag"] = "first"
    assert second.kwargs == {}
    assert await asyncio.gather(first, second) == [{"tag": "first"}, {}]
