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
from typing import IO, Any

from ..events import Record
from ..tasks import TaskKind

__all__ = ["FLUSH_EVERY", "FORMAT", "VERSION", "TraceWriter", "read_trace"]

log = logging.getLogger("asyncflow.trace")

FORMAT = "asyncflow-trace"
VERSION = 1
#: Seconds between writes of the buffered lines.
FLUSH_EVERY = 2.0

_encode = json.JSONEncoder(default=str, ensure_ascii=False).encode

# One line per event, in TaskEvent's field order; the values are JSON already.
_LINE = (
    '{"kind": "%s", "time": %r, "uid": "%s", "name": %s, "backend": %s, '
    '"workflow_id": %s, "attempt": %d, "duration": %s, "error": %s, '
    '"parent": %s, "dependencies": %s, "kind_of_task": %s}'
)


class TraceWriter:
    """An observer writing the events of one engine to a JSON-lines file."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        loop: asyncio.AbstractEventLoop,
        header: dict[str, Any],
    ) -> None:
        self.path = Path(path)
        self._loop = loop
        self._lines: list[str] = []
        # JSON of the names, backends and workflow ids seen so far.
        self._strings: dict[str, str] = {}
        self._described: dict[Any, tuple[str, str]] = {}
        # Truncate: a trace describes one run.
        self._file: IO[str] | None = open(  # noqa: SIM115 - closed by close()
            self.path, "w", encoding="utf-8"
        )
        first = {"format": FORMAT, "version": VERSION, "started": time.time()}
        first.update(header)
        self._file.write(_encode(first) + "\n")
        self._file.flush()
        self._timer: asyncio.TimerHandle | None = loop.call_later(
            FLUSH_EVERY, self._tick
        )

    def records(self, batch: list[Record]) -> None:
        """Encode a batch of the scheduler's records (the fast path)."""
        described = self._described
        lines = self._lines
        line = _LINE
        for kind, when, task, attempt, duration, error, extra in batch:
            definition = task._definition
            task_json = described.get(definition)
            if task_json is None:
                task_json = described[definition] = self._describe(task)
            workflow = task.workflow_id
            if extra is None:
                created = _NOT_CREATED
            else:
                created = (
                    "null" if extra[0] is None else _encode(extra[0]),
                    _encode(list(extra[1])) if extra[1] else "[]",
                    f'"{extra[2]}"',
                )
            lines.append(
                line
                % (
                    kind,
                    when,
                    task.uid,
                    task_json[0],
                    task_json[1],
                    "null" if workflow is None else self._json(workflow),
                    attempt,
                    "null" if duration is None else repr(duration),
                    "null" if error is None else _encode(_error_text(error)),
                    *created,
                )
            )

    def _describe(self, task: Any) -> tuple[str, str]:
        """The JSON of a task definition's name and backend name."""
        definition = task._definition
        backend = definition.backend
        if backend is None and definition.kind is not TaskKind.BLOCK:
            backend = task._engine._scheduler.default_backend
        return (
            self._json(task.name),
            "null" if backend is None else self._json(backend.name),
        )

    def _json(self, text: str) -> str:
        encoded = self._strings.get(text)
        if encoded is None:
            encoded = self._strings[text] = _encode(text)
        return encoded

    def _tick(self) -> None:
        self.flush()
        if self._file is not None:
            self._timer = self._loop.call_later(FLUSH_EVERY, self._tick)

    def flush(self) -> None:
        if not self._lines or self._file is None:
            return
        lines, self._lines = self._lines, []
        try:
            self._file.write("\n".join(lines) + "\n")
            self._file.flush()
        except OSError as exc:
            log.warning(
                "trace %s cannot be written (%s); tracing stops, the run goes on",
                self.path,
                exc,
            )
            self._close_file()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
        self._close_file()

    def _close_file(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None


_NOT_CREATED = ("null", "[]", "null")


def _error_text(error: Any) -> str:
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}"
    return str(error)


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
