"""The task graph as Mermaid and DOT (SPEC §9): ``create(graph=True)`` and
``flow.graph(format)``.

The rendered text is parsed back into nodes (uid, name, enclosing block,
state) and edges and compared with what the run did; whole strings are not
snapshotted. Where Graphviz's ``dot`` is installed it checks the DOT syntax.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from asyncflow import TaskEvent, TaskFuture, WorkflowEngine
from asyncflow.graph import STATE_COLORS, STATES, GraphRecorder, render

DOT = shutil.which("dot")

#: uid -> (name, enclosing block uid, state)
Nodes = dict[str, tuple[str, "str | None", str]]
Edges = set[tuple[str, str]]


def parse_mermaid(text: str) -> tuple[Nodes, Edges]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    assert lines[0] == "flowchart TD"
    by_id: dict[str, tuple[str, str, str | None]] = {}  # id -> uid, name, parent
    classes: dict[str, str] = {}
    defined: set[str] = set()
    edges: set[tuple[str, str]] = set()
    blocks: list[str | None] = [None]  # the uid of each open block
    for line in lines[1:]:
        if m := re.fullmatch(r"classDef (\w+) fill:(#[0-9a-f]{6}),.*", line):
            assert STATE_COLORS[m[1]] == m[2]
            defined.add(m[1])
        elif m := re.fullmatch(r'subgraph (\w+)\["(.*)"\]', line):
            blocks.append(None)  # filled in by the block's own node
        elif line == "end":
            blocks.pop()
        elif m := re.fullmatch(r'(\w+)\[\["(.*) \((.*)\)"\]\]', line):
            assert blocks[-1] is None, "a subgraph holds one block node"
            blocks[-1] = m[3]
            by_id[m[1]] = (m[3], m[2], blocks[-2])
        elif m := re.fullmatch(r'(\w+)\["(.*) \((.*)\)"\]', line):
            by_id[m[1]] = (m[3], m[2], blocks[-1])
        elif m := re.fullmatch(r"(\w+) --> (\w+)", line):
            edges.add((m[1], m[2]))
        elif m := re.fullmatch(r"class ([\w,]+) (\w+)", line):
            for ident in m[1].split(","):
                assert ident not in classes, f"{ident} has two states"
                classes[ident] = m[2]
        else:
            raise AssertionError(f"unexpected Mermaid line: {line!r}")
    assert blocks == [None], "unbalanced subgraph/end"
    assert defined == set(STATES)
    assert set(classes) == set(by_id), "every node gets exactly one state class"
    nodes = {
        uid: (name, parent, classes[ident])
        for ident, (uid, name, parent) in by_id.items()
    }
    return nodes, {(by_id[a][0], by_id[b][0]) for a, b in edges}


def parse_dot(text: str) -> tuple[Nodes, Edges]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    assert lines[0] == "digraph asyncflow {"
    assert lines[-1] == "}"
    state_of = {colour: state for state, colour in STATE_COLORS.items()}
    nodes: Nodes = {}
    edges: set[tuple[str, str]] = set()
    blocks: list[str | None] = [None]
    for line in lines[1:-1]:
        if line.startswith(("rankdir=", "node [", "label=", "style=")):
            continue
        if re.fullmatch(r'subgraph "cluster_\w+" \{', line):
            blocks.append(None)
        elif line == "}":
            blocks.pop()
        elif m := re.fullmatch(
            r'"([^"]+)" \[label="(.*) \((.*)\)", fillcolor="(#\w+)", '
            r'tooltip="(\w+)"(, shape=component)?\];',
            line,
        ):
            uid, name, label_uid, colour, tooltip, block = m.groups()
            assert uid == label_uid
            assert state_of[colour] == tooltip
            if block:
                assert blocks[-1] is None
                blocks[-1] = uid
                parent = blocks[-2]
            else:
                parent = blocks[-1]
            nodes[uid] = (name, parent, tooltip)
        elif m := re.fullmatch(r'"([^"]+)" -> "([^"]+)";', line):
            edges.add((m[1], m[2]))
        else:
            raise AssertionError(f"unexpected DOT line: {line!r}")
    assert blocks == [None], "unbalanced clusters"
    return nodes, edges


def check_dot_syntax(text: str) -> None:
    if DOT is None:
        return  # Graphviz is not installed: the parse above is the check
    done = subprocess.run(
        [DOT, "-Tsvg"], input=text, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "<svg" in done.stdout


async def test_graph_shows_tasks_blocks_dependencies_and_states(make_engine) -> None:
    flow = await make_engine("threads", graph=True)
    members: dict[str, list[TaskFuture]] = {"outer": [], "inner": []}

    @flow.function_task
    def source() -> int:
        return 1

    @flow.function_task
    def double(x: int) -> int:
        return 2 * x

    @flow.function_task
    def explode(x: int) -> int:
        raise ValueError("boom")

    @flow.function_task
    def after(x: int) -> int:
        return x

    @flow.function_task
    async def stuck() -> None:
        await asyncio.sleep(60)

    @flow.block
    async def inner(x: int) -> int:
        fut = double(x)
        members["inner"].append(fut)
        return await fut

    @flow.block
    async def outer(x: int) -> int:
        y = double(x)
        z = inner(y)
        members["outer"] += [y, z]
        return await z

    src = source()
    top = outer(src)
    bad = explode(src)
    downstream = after(bad)
    waiting = stuck()
    blocked = after(waiting)
    await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.gather(top, bad, downstream, waiting, blocked, return_exceptions=True)

    (y, z), (w,) = members["outer"], members["inner"]
    expected: Nodes = {
        src.uid: ("source", None, "done"),
        top.uid: ("outer", None, "done"),
        y.uid: ("double", top.uid, "done"),
        z.uid: ("inner", top.uid, "done"),
        w.uid: ("double", z.uid, "done"),
        bad.uid: ("explode", None, "failed"),
        downstream.uid: ("after", None, "failed"),
        waiting.uid: ("stuck", None, "cancelled"),
        blocked.uid: ("after", None, "cancelled"),
    }
    expected_edges = {
        (src.uid, top.uid),
        (src.uid, bad.uid),
        (bad.uid, downstream.uid),
        (waiting.uid, blocked.uid),
        (y.uid, z.uid),
    }
    mermaid = flow.graph()
    assert flow.graph("mermaid") == mermaid
    assert parse_mermaid(mermaid) == (expected, expected_edges)
    dot = flow.graph("dot")
    assert parse_dot(dot) == (expected, expected_edges)
    check_dot_syntax(dot)


async def test_graph_follows_tasks_while_they_run(make_engine) -> None:
    flow = await make_engine("asyncio", graph=True)
    release = asyncio.Event()

    @flow.function_task
    async def gate() -> int:
        await release.wait()
        return 1

    @flow.function_task
    async def use(x: int) -> int:
        return x

    first = gate()
    second = use(first)
    while first.state != "RUNNING":
        await asyncio.sleep(0.01)
    await asyncio.sleep(0)  # events reach observers once per loop iteration
    nodes, edges = parse_mermaid(flow.graph())
    assert nodes == {
        first.uid: ("gate", None, "running"),
        second.uid: ("use", None, "pending"),
    }
    assert edges == {(first.uid, second.uid)}
    release.set()
    await second
    nodes, _ = parse_mermaid(flow.graph())
    assert {state for _, _, state in nodes.values()} == {"done"}


async def test_restored_tasks_have_their_own_state(tmp_path: Path) -> None:
    async def run() -> tuple[str, str, str]:
        async with await WorkflowEngine.create(
            checkpoint=tmp_path / "run.db", graph=True
        ) as flow:

            @flow.function_task
            def square(x: int) -> int:
                return x * x

            fut = square(3)
            await fut
        return fut.uid, flow.graph(), flow.graph("dot")

    await run()
    uid, mermaid, dot = await run()
    assert parse_mermaid(mermaid) == ({uid: ("square", None, "restored")}, set())
    assert parse_dot(dot) == ({uid: ("square", None, "restored")}, set())


async def test_graph_needs_graph_true(make_engine) -> None:
    flow = await make_engine("noop")
    with pytest.raises(RuntimeError, match=r"graph=True"):
        flow.graph()


async def test_unknown_format_names_the_known_ones(make_engine) -> None:
    flow = await make_engine("noop", graph=True)
    with pytest.raises(ValueError, match=r"'svg'.*'mermaid'.*'dot'"):
        flow.graph("svg")


def recorder_with(names: dict[str, str], parents: dict[str, str] | None = None) -> Any:
    recorder = GraphRecorder()
    parents = parents or {}
    for uid, name in names.items():
        kind = "block" if uid.startswith("block.") else "function"
        recorder(
            TaskEvent(
                "created",
                time.time(),
                uid,
                name,
                parent=parents.get(uid),
                kind_of_task=kind,
            )
        )
        recorder(TaskEvent("done", time.time(), uid, name))
    return recorder


TRICKY = 'say "hi" [x] {y} (z) #1 <b> & `c` | back\\slash\nnext line\r\ttab end'
#: TRICKY as a label shows it: each line break kept, other control characters
#: as spaces.
SHOWN = TRICKY.replace("\r", "\n").replace("\t", " ")


def test_labels_are_escaped_for_mermaid() -> None:
    recorder = recorder_with(
        {"block.000001": TRICKY, "task.000002": TRICKY}, {"task.000002": "block.000001"}
    )
    text = render(recorder, "mermaid")
    nodes, _ = parse_mermaid(text)  # one line per node: no raw newline
    entities = {
        "#quot;": '"',
        "#35;": "#",
        "#38;": "&",
        "#lt;": "<",
        "#gt;": ">",
        "#96;": "`",
    }
    for name, _, _ in nodes.values():
        assert '"' not in name
        assert "\n" not in name
        decoded = re.sub(r"#\w+;", lambda m: entities[m[0]], name.replace("<br>", "\n"))
        assert decoded == SHOWN
    assert nodes["task.000002"][1] == "block.000001"
    title = re.search(r'subgraph \w+\["(.*)"\]', text)
    assert title is not None
    assert '"' not in title[1]


def test_labels_are_escaped_for_dot() -> None:
    recorder = recorder_with(
        {"block.000001": TRICKY, "task.000002": TRICKY}, {"task.000002": "block.000001"}
    )
    text = render(recorder, "dot")
    for line in text.splitlines():
        if "label=" in line:
            label = re.search(r'label="((?:[^"\\]|\\.)*)"', line)
            assert label is not None, line
            unescaped = re.sub(
                r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], label[1]
            )
            assert unescaped in {f"{SHOWN} (block.000001)", f"{SHOWN} (task.000002)"}
    check_dot_syntax(text)


def test_recorder_is_cheap_and_keeps_the_latest_state() -> None:
    recorder = GraphRecorder()
    uid = "task.000001"
    for kind in ("created", "ready", "submitted", "started", "retried", "started"):
        recorder(TaskEvent(kind, 0.0, uid, "flaky", kind_of_task="function"))
    assert [n.state for n in recorder.nodes] == ["running"]
    recorder(TaskEvent("failed", 0.0, uid, "flaky"))
    recorder.close()
    assert [(n.uid, n.name, n.kind, n.parent, n.state) for n in recorder.nodes] == [
        (uid, "flaky", "function", None, "failed")
    ]
    # An event of a task created before the recorder listened still shows it.
    recorder(TaskEvent("done", 0.0, "task.000009", "late"))
    assert recorder.nodes[-1].state == "done"
    assert recorder.edges == []
