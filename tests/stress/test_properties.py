"""Random DAGs with failures, cancellations and retries against a reference.

Invariants checked on every example:
- every future ends terminal;
- a task ran if and only if all its dependencies ended DONE (and it was not
  cancelled itself);
- results equal a simple sequential evaluator's;
- no task ran more often than its retries allow;
- a FAILED dependent's root cause is the error of a failed ancestor.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncflow import (
    DRY_RUN_RESULT,
    DependencyFailureError,
    LocalExecutionBackend,
    NoopExecutionBackend,
    Task,
    TaskFuture,
    WorkflowEngine,
)


@dataclass(frozen=True)
class Node:
    deps: tuple[int, ...]
    fails: bool  # fails on every attempt
    flaky: int  # fails this many attempts first
    retries: int
    cancel: bool


class Boom(Exception):
    def __init__(self, node: int) -> None:
        super().__init__(f"node {node} failed")
        self.node = node


@st.composite
def dags(draw: st.DrawFn, max_nodes: int) -> list[Node]:
    n = draw(st.integers(1, max_nodes))
    nodes = []
    for i in range(n):
        deps = (
            draw(st.lists(st.integers(0, i - 1), max_size=3, unique=True)) if i else []
        )
        nodes.append(
            Node(
                deps=tuple(deps),
                fails=draw(st.integers(0, 9)) == 0,
                flaky=draw(st.integers(0, 2)),
                retries=draw(st.integers(0, 2)),
                cancel=draw(st.integers(0, 19)) == 0,
            )
        )
    return nodes


@dataclass
class Expected:
    state: str
    value: int | None = None
    roots: frozenset[int] = frozenset()  # failed ancestors that raised
    runs: int = 0


def reference(nodes: list[Node], bodies_run: bool) -> list[Expected]:
    """Evaluate the DAG sequentially, in index order (a topological order)."""
    cancelled: set[int] = set()
    for i, node in enumerate(nodes):
        if node.cancel or any(d in cancelled for d in node.deps):
            cancelled.add(i)
    out: list[Expected] = []
    for i, node in enumerate(nodes):
        if i in cancelled:
            out.append(Expected("CANCELLED"))
            continue
        failed = [d for d in node.deps if out[d].state == "FAILED"]
        if failed:
            roots = frozenset().union(*(out[d].roots for d in failed))
            out.append(Expected("FAILED", roots=roots))
            continue
        if node.fails or (bodies_run and node.flaky > node.retries):
            out.append(Expected("FAILED", roots=frozenset({i}), runs=node.retries + 1))
        else:
            value = i + sum(out[d].value or 0 for d in node.deps)
            runs = node.flaky + 1 if bodies_run else 1
            out.append(Expected("DONE", value=value, runs=runs))
    return out


async def build_and_run(nodes: list[Node], node: Task) -> list[TaskFuture]:
    """Call ``node`` once per DAG node, cancel the chosen ones, wait for all."""
    futs: list[TaskFuture] = []
    for i, spec in enumerate(nodes):
        call = node.options(retries=spec.retries) if spec.retries else node
        futs.append(call(i, *(futs[d] for d in spec.deps)))
    for i, spec in enumerate(nodes):
        if spec.cancel:
            futs[i].cancel()
    await asyncio.wait(futs)
    return futs


async def run_threads(nodes: list[Node]) -> tuple[list[TaskFuture], Counter[int]]:
    runs: Counter[int] = Counter()
    lock = threading.Lock()
    backend = LocalExecutionBackend(ThreadPoolExecutor(4))
    async with await WorkflowEngine.create(backend=backend) as flow:

        @flow.function_task
        def node(i: int, *values: int) -> int:
            with lock:
                runs[i] += 1
                attempt = runs[i]
            spec = nodes[i]
            if spec.fails or attempt <= spec.flaky:
                raise Boom(i)
            return i + sum(values)

        return await build_and_run(nodes, node), runs


async def run_dry(nodes: list[Node]) -> tuple[list[TaskFuture], Counter[int]]:
    runs: Counter[int] = Counter()
    async with await WorkflowEngine.create(backend=NoopExecutionBackend()) as flow:

        @flow.executable_task
        async def node(i: int, *values: Any) -> str:
            runs[i] += 1
            # An empty command fails the task even in a dry run.
            return "" if nodes[i].fails else f"echo {i}"

        return await build_and_run(nodes, node), runs


def check(
    nodes: list[Node], futs: list[TaskFuture], runs: Counter[int], dry: bool
) -> None:
    expected = reference(nodes, bodies_run=not dry)
    for i, (fut, want) in enumerate(zip(futs, expected, strict=True)):
        assert fut.done(), f"node {i} is not finished"
        assert fut.state == want.state, f"node {i}: {fut.state} != {want.state}"
        deps_done = all(futs[d].state == "DONE" for d in nodes[i].deps)
        ran = runs[i] > 0
        assert ran == (
            deps_done and not nodes[i].cancel and want.state != "CANCELLED"
        ), i
        assert runs[i] <= nodes[i].retries + 1, f"node {i} ran {runs[i]} times"
        if dry:
            if want.state == "DONE":
                assert fut.result() == DRY_RUN_RESULT
            continue
        if want.state == "DONE":
            assert fut.result() == want.value, f"node {i}"
            assert runs[i] == want.runs
            assert fut.attempts == want.runs
        elif want.state == "FAILED":
            error = fut.exception()
            if isinstance(error, DependencyFailureError):
                assert runs[i] == 0
                assert isinstance(error.root_cause, Boom)
                assert error.root_cause.node in want.roots
            else:
                assert isinstance(error, Boom)
                assert error.node == i
                assert runs[i] == want.runs


PROPERTY_SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.slow
@settings(PROPERTY_SETTINGS, max_examples=60)
@given(dags(max_nodes=200))
def test_random_dags_on_threads(nodes: list[Node]) -> None:
    futs, runs = asyncio.run(run_threads(nodes))
    check(nodes, futs, runs, dry=False)


@pytest.mark.slow
@settings(PROPERTY_SETTINGS, max_examples=100)
@given(dags(max_nodes=300))
def test_random_dags_in_dry_run(nodes: list[Node]) -> None:
    futs, runs = asyncio.run(run_dry(nodes))
    check(nodes, futs, runs, dry=True)
