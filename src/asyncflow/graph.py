"""The task graph of a run, as Mermaid or Graphviz DOT text.

``WorkflowEngine.create(graph=True)`` subscribes a :class:`GraphRecorder`,
which keeps one node per task and block (its name, kind, enclosing block and
latest state) and one edge per dependency, from the engine's events.
:meth:`WorkflowEngine.graph <asyncflow.WorkflowEngine.graph>` renders it with
:func:`render`: every task is a node labelled ``name (uid)``, coloured by its
state; a block is a box (subgraph / cluster) drawn around the tasks called
while it ran, holding a node of its own that its dependencies point at.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import NamedTuple

from .events import TaskEvent

__all__ = ["FORMATS", "STATES", "STATE_COLORS", "GraphNode", "GraphRecorder", "render"]

#: The output formats :func:`render` knows.
FORMATS = ("mermaid", "dot")
#: Every state a node can be in.
STATES = ("pending", "running", "done", "failed", "cancelled", "restored")
#: Fill colour of each state, in both formats.
STATE_COLORS = {
    "pending": "#e0e0e0",
    "running": "#90caf9",
    "done": "#a5d6a7",
    "failed": "#ef9a9a",
    "cancelled": "#ffe082",
    "restored": "#b2dfdb",
}

# As the future's state: RUNNING from the hand-over to the backend, and
# between the attempts of a retried task.
_STATE_OF_EVENT = {
    "created": "pending",
    "ready": "pending",
    "submitted": "running",
    "started": "running",
    "retried": "running",
    "done": "done",
    "failed": "failed",
    "cancelled": "cancelled",
    "restored": "restored",
}


class GraphNode(NamedTuple):
    """One task or block: ``kind`` is its kind of task (``function``,
    ``executable``, ``prompt``, ``block``; None if never seen created),
    ``parent`` the uid of the block it was called in."""

    uid: str
    name: str
    kind: str | None
    parent: str | None
    state: str


class _Node:
    __slots__ = ("kind", "name", "parent", "state", "uid")

    def __init__(
        self, uid: str, name: str, kind: str | None, parent: str | None
    ) -> None:
        self.uid = uid
        self.name = name
        self.kind = kind
        self.parent = parent
        self.state = "pending"


class GraphRecorder:
    """An event observer that records the task graph (nodes, edges, states)."""

    def __init__(self) -> None:
        self._nodes: dict[str, _Node] = {}
        self._edges: list[tuple[str, str]] = []

    def __call__(self, event: TaskEvent) -> None:
        node = self._nodes.get(event.uid)
        if event.kind == "created":
            if node is None:
                self._nodes[event.uid] = _Node(
                    event.uid, event.name, event.kind_of_task, event.parent
                )
            uid = event.uid
            self._edges.extend((dependency, uid) for dependency in event.dependencies)
            return
        state = _STATE_OF_EVENT.get(event.kind)
        if state is None:
            return
        if node is None:  # created before this recorder listened
            node = self._nodes[event.uid] = _Node(
                event.uid, event.name, event.kind_of_task, event.parent
            )
        node.state = state

    def close(self) -> None:
        """Nothing to release: the graph stays readable after the run."""

    @property
    def nodes(self) -> list[GraphNode]:
        """Every task and block, in the order they were called."""
        return [
            GraphNode(n.uid, n.name, n.kind, n.parent, n.state)
            for n in self._nodes.values()
        ]

    @property
    def edges(self) -> list[tuple[str, str]]:
        """``(dependency uid, dependent uid)`` pairs between recorded tasks."""
        nodes = self._nodes
        return [(a, b) for a, b in self._edges if a in nodes and b in nodes]


def render(recorder: GraphRecorder, format: str) -> str:
    """The recorded graph as ``"mermaid"`` or ``"dot"`` text."""
    if format == "mermaid":
        return _Mermaid(recorder).text()
    if format == "dot":
        return _Dot(recorder).text()
    raise ValueError(
        f"unknown graph format {format!r}: use one of {', '.join(map(repr, FORMATS))}"
    )


class _Layout:
    """What both formats share: node identifiers and the nesting of blocks."""

    def __init__(self, recorder: GraphRecorder) -> None:
        self.nodes = recorder.nodes
        self.edges = recorder.edges
        self.blocks = {node.uid for node in self.nodes if node.kind == "block"}
        # A block is called before its members: a parent recorded later than
        # its member (only from made-up events) is ignored, so nesting can't
        # loop and every node is drawn.
        seen: set[str] = set()
        self.children: dict[str | None, list[GraphNode]] = {}
        for node in self.nodes:
            parent = node.parent if node.parent in seen else None
            self.children.setdefault(parent, []).append(node)
            seen.add(node.uid)
        self.ids: dict[str, str] = {}
        taken: set[str] = set()
        for node in self.nodes:
            ident = self.identifier(node.uid)
            candidate, n = ident, 1
            while candidate in taken:
                n += 1
                candidate = f"{ident}_{n}"
            taken.add(candidate)
            self.ids[node.uid] = candidate

    @staticmethod
    def identifier(uid: str) -> str:
        return "n_" + re.sub(r"\W", "_", uid, flags=re.ASCII)

    def walk(self, parent: str | None = None) -> Iterator[tuple[str, GraphNode]]:
        """("node", node) / ("open", block) / ("close", block) in nesting order."""
        for node in self.children.get(parent, ()):
            if node.uid in self.blocks:
                yield "open", node
                yield from self.walk(node.uid)
                yield "close", node
            else:
                yield "node", node

    def label(self, node: GraphNode) -> str:
        return f"{node.name} ({node.uid})"


class _Mermaid(_Layout):
    def text(self) -> str:
        lines = ["flowchart TD"]
        for state in STATES:
            lines.append(
                f"    classDef {state} fill:{STATE_COLORS[state]},stroke:#555555,"
                "color:#000000"
            )
        depth = 1
        for what, item in self.walk():
            ident = self.ids[item.uid]
            pad = "    " * depth
            if what == "open":
                lines.append(
                    f'{pad}subgraph {ident}_block["{_mermaid_escape(self.label(item))}"]'
                )
                depth += 1
                lines.append(
                    f'{"    " * depth}{ident}[["{_mermaid_escape(self.label(item))}"]]'
                )
            elif what == "close":
                depth -= 1
                lines.append(f"{'    ' * depth}end")
            else:
                lines.append(f'{pad}{ident}["{_mermaid_escape(self.label(item))}"]')
        for source, target in self.edges:
            lines.append(f"    {self.ids[source]} --> {self.ids[target]}")
        by_state: dict[str, list[str]] = {}
        for node in self.nodes:
            by_state.setdefault(node.state, []).append(self.ids[node.uid])
        for state, idents in by_state.items():
            lines.append(f"    class {','.join(idents)} {state}")
        return "\n".join(lines) + "\n"


_MERMAID_ENTITIES = {
    '"': "#quot;",
    "#": "#35;",
    "&": "#38;",
    "<": "#lt;",
    ">": "#gt;",
    "`": "#96;",
}
_MERMAID_SPECIAL = re.compile(r'["#&<>`]|\r\n|[\r\n]|[\x00-\x1f\x7f]')


def _mermaid_escape(text: str) -> str:
    """Text safe inside a quoted Mermaid label: entity codes for the
    characters Mermaid reads, ``<br>`` for line breaks."""

    def replace(match: re.Match[str]) -> str:
        char = match.group()
        if char in ("\r\n", "\r", "\n"):
            return "<br>"
        return _MERMAID_ENTITIES.get(char, " ")

    return _MERMAID_SPECIAL.sub(replace, text)


class _Dot(_Layout):
    def text(self) -> str:
        lines = [
            "digraph asyncflow {",
            "    rankdir=TB;",
            '    node [shape=box, style="rounded,filled", fontname="Helvetica"];',
        ]
        depth = 1
        for what, item in self.walk():
            pad = "    " * depth
            if what == "open":
                lines.append(f'{pad}subgraph "cluster_{self.ids[item.uid]}" {{')
                depth += 1
                inner = "    " * depth
                lines.append(f"{inner}label={_dot_quote(self.label(item))};")
                lines.append(f'{inner}style="rounded,dashed";')
                lines.append(inner + self._node(item, block=True))
            elif what == "close":
                depth -= 1
                lines.append(f"{'    ' * depth}}}")
            else:
                lines.append(pad + self._node(item, block=False))
        for source, target in self.edges:
            lines.append(f"    {_dot_quote(source)} -> {_dot_quote(target)};")
        lines.append("}")
        return "\n".join(lines) + "\n"

    def _node(self, node: GraphNode, *, block: bool) -> str:
        shape = ", shape=component" if block else ""
        return (
            f"{_dot_quote(node.uid)} [label={_dot_quote(self.label(node))}, "
            f'fillcolor="{STATE_COLORS[node.state]}", '
            f"tooltip={_dot_quote(node.state)}{shape}];"
        )


_DOT_SPECIAL = re.compile(r'[\\"]|\r\n|[\r\n]|[\x00-\x1f\x7f]')


def _dot_quote(text: str) -> str:
    """A DOT double-quoted string: backslashes and quotes escaped, line
    breaks as ``\\n``, other control characters as spaces."""

    def replace(match: re.Match[str]) -> str:
        char = match.group()
        if char in ("\\", '"'):
            return "\\" + char
        if char in ("\r\n", "\r", "\n"):
            return "\\n"
        return " "

    return '"' + _DOT_SPECIAL.sub(replace, text) + '"'
