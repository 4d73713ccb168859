"""The run trace: every task event as one JSON line.

File format (version 1): a first line ``{"format": "asyncflow-trace",
"version": 1, "engine": <uid>, "run_id": ..., "started": <epoch s>,
"backends": [...]}``, then one line per :class:`~asyncflow.TaskEvent`, whose
keys are the event's field names (``error`` as ``"Type: message"``,
``dependencies`` as a list of uids). Lines are buffered and written every
:data:`FLUSH_EVERY` seconds and at shutdown, so a crashed run's trace is
readable up to the last write.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from ..events import FINAL_KINDS, Record, backend_name
from ._lines import LinesFile

__all__ = ["FLUSH_EVERY", "FORMAT", "VERSION", "TraceWriter", "read_trace"]

log = logging.getLogger("asyncflow.trace")

FORMAT = "asyncflow-trace"
VERSION = 1
#: Seconds between writes of the buffered lines.
FLUSH_EVERY = 2.0

_encode = json.JSONEncoder(default=str, ensure_ascii=False).encode

# One line per event; its keys are TaskEvent's fields, the values JSON already.
_HEAD = '{"uid": "%s", "name": %s, "backend": %s, "workflow_id": %s, '
_LINE = '%s"kind": "%s", "time": %.6f, "attempt": %d, "duration": %s, "error": %s, %s}'
_CREATED = '"parent": %s, "dependencies": %s, "kind_of_task": "%s"'
_NOT_CREATED = '"parent": null, "dependencies": [], "kind_of_task": null'


class TraceWriter:
    """An observer writing the events of one engine to a JSON-lines file."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        loop: asyncio.AbstractEventLoop,
        header: dict[str, Any],
    ) -> None:
        self.path = Path(path)
        first = {"format": FORMAT, "version": VERSION, "started": time.time()}
        first.update(header)
        self._out = LinesFile(self.path, loop, first, FLUSH_EVERY, "trace")
        self._lines = self._out.lines
        # JSON of the names, backends and workflow ids seen so far.
        self._strings: dict[str, str] = {}
        self._described: dict[Any, tuple[str, str]] = {}
        # The encoded constant fields of the tasks not yet finished.
        self._heads: dict[Any, str] = {}

    def records(self, batch: list[Record]) -> None:
        """Encode a batch of the scheduler's records (the fast path).

        A task's constant fields are encoded once, as the head of each of
        its lines (JSON objects have no key order).
        """
        heads = self._heads
        lines = self._lines
        for kind, when, task, attempt, duration, error, extra in batch:
            head = heads.get(task)
            if head is None:
                head = heads[task] = self._head(task)
            if extra is None:
                tail = _NOT_CREATED
            else:
                tail = _CREATED % (
                    "null" if extra[0] is None else _encode(extra[0]),
                    _encode(list(extra[1])) if extra[1] else "[]",
                    extra[2],
                )
            if kind in FINAL_KINDS:
                del heads[task]
            lines.append(
                _LINE
                % (
                    head,
                    kind,
                    when,
                    attempt,
                    "null" if duration is None else f"{duration:.6f}",
                    "null" if error is None else _encode(_error_text(error)),
                    tail,
                )
            )

    def _head(self, task: Any) -> str:
        described = self._described.get(task._definition)
        if described is None:
            described = self._described[task._definition] = self._describe(task)
        workflow = task.workflow_id
        return _HEAD % (
            task.uid,
            described[0],
            described[1],
            "null" if workflow is None else self._json(workflow),
        )

    def _describe(self, task: Any) -> tuple[str, str]:
        """The JSON of a task definition's name and backend name."""
        backend = backend_name(task)
        return (
            self._json(task.name),
            "null" if backend is None else self._json(backend),
        )

    def _json(self, text: str) -> str:
        encoded = self._strings.get(text)
        if encoded is None:
            encoded = self._strings[text] = _encode(text)
        return encoded

    def flush(self) -> None:
        self._out.flush()

    def close(self) -> None:
        self._out.close()


def _error_text(error: Any) -> str:
    try:
        text = str(error)
    except Exception:
        text = "<a message that cannot be shown>"
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {text}"
    return text


def read_trace(
    path: str | os.PathLike[str],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The header and the events of a trace file (a cut-off last line, from a
    crashed run, is skipped)."""
    header: dict[str, Any] | None = None
    events: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # the last line of a run that died mid-write
            if header is None:
                if record.get("format") != FORMAT:
                    raise ValueError(
                        f"{path} is not an asyncflow trace (line {number} has no "
                        f"format {FORMAT!r})"
                    )
                header = record
            else:
                events.append(record)
    if header is None:
        raise ValueError(f"{path} is empty: not an asyncflow trace")
    return header, events
