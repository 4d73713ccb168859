"""The dependency scan and argument resolution, without an engine loop."""

from __future__ import annotations

import asyncio

from asyncflow import TaskFuture
from asyncflow._graph import _resolve, find_dependencies


def _done(value: object) -> TaskFuture:
    loop = asyncio.new_event_loop()
    fut = TaskFuture(loop=loop)
    asyncio.Future.set_result(fut, value)  # as the engine settles it
    loop.close()
    return fut


def test_no_futures_means_no_dependencies() -> None:
    assert find_dependencies((1, "a", [2], {"k": 3}), {"x": (4,)}) is None


def test_futures_are_found_one_level_deep_in_order_without_duplicates() -> None:
    a, b, c, d = (_done(i) for i in range(4))
    found = find_dependencies((a, [b, a], (c,)), {"k": {"x": d}, "again": b})
    assert found == [a, b, c, d]


def test_deeper_nesting_and_container_subclasses_are_not_searched() -> None:
    from collections import OrderedDict

    a = _done(1)
    assert find_dependencies(([[a]], OrderedDict(k=a)), {}) is None


def test_resolve_rebuilds_only_containers_holding_futures() -> None:
    a = _done(5)
    plain = [1, 2]
    assert _resolve(plain) is plain
    assert _resolve(a) == 5
    assert _resolve([a, 1]) == [5, 1]
    assert _resolve((a,)) == (5,)
    assert _resolve({a}) == {5}
    assert _resolve({"k": a, "j": 0}) == {"k": 5, "j": 0}
