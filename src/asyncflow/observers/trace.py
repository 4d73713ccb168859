"""The run trace: every task event, in JSON lines.

File format, version 2 (docs/observability.md has the details): a first
line ``{"format": "asyncflow-trace", "version": 2, "started": <epoch s>,
"engine": <uid>, "run_id": ..., "backends": [...]}``, then lines that each
hold a run of consecutive events as columns keyed by the
:class:`~asyncflow.TaskEvent` field names::

    {"kind": ["created", "ready", ...], "time": [<epoch µs>, ...],
     "uid": [...], "attempt": [...], "duration": [...], "error": [...],
     "name": ..., "backend": ..., "workflow_id": ..., "parent": ...,
     "dependencies": ..., "kind_of_task": ...}

``kind``, ``time`` (integer microseconds since the epoch), ``uid`` and
``attempt`` have one entry per event. ``duration`` (integer microseconds)
and ``error`` have one entry per event of a kind in :data:`ENDING_KINDS`.
The fields a task keeps for its whole life (:data:`CREATED_FIELDS`) have one
entry per ``created`` event. A column whose entries are all null (or, for
``dependencies``, all empty) is left out; one of :data:`CREATED_FIELDS`
whose entries are all the same non-null value (not ``dependencies``) is
that single value.

Columns cost far less to write than one object per event (version 1): the
writer makes them with C-level passes over the scheduler's records. Events
are buffered and written every :data:`FLUSH_EVERY` seconds and at shutdown
(a full line of :data:`LINE_EVENTS` events is encoded at once), so a
crashed run's trace is readable up to the last write. :func:`read_trace`
reads versions 1 (one event per line) and 2, and gives one dictionary per
event either way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from itertools import compress
from operator import attrgetter
from pathlib import Path
from typing import Any

from ..events import EVENT_KINDS, RECORD_SIZE, backend_name
from ._lines import LinesFile

__all__ = [
    "CREATED_FIELDS",
    "ENDING_KINDS",
    "FLUSH_EVERY",
    "FORMAT",
    "LINE_EVENTS",
    "VERSION",
    "TraceWriter",
    "read_trace",
]

log = logging.getLogger("asyncflow.trace")

FORMAT = "asyncflow-trace"
#: The version this module writes; :func:`read_trace` reads 1 and 2.
VERSION = 2
#: Seconds between writes of the buffered events.
FLUSH_EVERY = 2.0
#: The most events one line holds.
LINE_EVENTS = 1024
#: The kinds whose events have an entry in the ``duration`` and ``error``
#: columns.
ENDING_KINDS = frozenset({"done", "failed", "cancelled", "restored", "retried"})
#: The fields a line holds once per ``created`` event.
CREATED_FIELDS = (
    "name",
    "backend",
    "workflow_id",
    "parent",
    "dependencies",
    "kind_of_task",
)

_encode = json.JSONEncoder(
    default=str, ensure_ascii=False, check_circular=False, separators=(",", ":")
).encode
_uid = attrgetter("uid")
_made_uid = attrgetter("_uid")
_name = attrgetter("name")
_workflow = attrgetter("workflow_id")
_definition = attrgetter("_definition")
_micro = (1e6).__mul__
_ending = ENDING_KINDS.__contains__
#: Each event kind as JSON text.
_QUOTED_KIND = {kind: json.dumps(kind) for kind in EVENT_KINDS}


def _join_ints(values: Any) -> str:
    """Integers as the inside of a JSON list (JSON's C encoder is the
    quickest at this)."""
    return _encode(list(values))[1:-1]


# A record's fields, in the scheduler's flat list.
_KIND, _TIME, _TASK, _ATTEMPT, _DURATION, _ERROR, _EXTRA = range(RECORD_SIZE)


class TraceWriter:
    """An observer writing the events of one engine to a trace file."""

    #: Reads the scheduler's flat record list (see :mod:`asyncflow.events`).
    flat = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        loop: asyncio.AbstractEventLoop,
        header: dict[str, Any],
    ) -> None:
        self.path = Path(path)
        first = {"format": FORMAT, "version": VERSION, "started": time.time()}
        first.update(header)
        # Records not yet encoded (fewer than a line's worth), flat.
        self._pending: list[Any] = []
        # The backend name of each task definition seen so far.
        self._backends: dict[Any, str | None] = {}
        self._out = LinesFile(
            self.path, loop, first, FLUSH_EVERY, "trace", before_write=self._encode_all
        )

    def records(self, flat: list[Any]) -> None:
        """Take a batch of the scheduler's records: full lines are encoded
        now, the rest at the next write."""
        pending = self._pending
        if pending:
            pending += flat
            flat = pending
        size = LINE_EVENTS * RECORD_SIZE
        if len(flat) < size:
            if flat is not pending:
                self._pending = flat[:]
            return
        whole = len(flat) - len(flat) % size
        lines = self._out.lines
        for start in range(0, whole, size):
            lines.append(self._line(flat, start, start + size))
        self._pending = flat[whole:]

    def _encode_all(self) -> None:
        flat = self._pending
        if flat:
            size = LINE_EVENTS * RECORD_SIZE
            lines = self._out.lines
            for start in range(0, len(flat), size):
                lines.append(self._line(flat, start, min(start + size, len(flat))))
            self._pending = []

    def _line(self, flat: list[Any], start: int, end: int) -> str:
        """The line of the records in ``flat[start:end]``, made with C-level
        passes over them (Python code runs per error only). The columns
        every line has are joined as text; the others go through JSON."""
        kinds = flat[start + _KIND : end : RECORD_SIZE]
        tasks = flat[start + _TASK : end : RECORD_SIZE]
        uids = list(map(_made_uid, tasks))
        if None in uids:  # a task created while nothing watched
            uids = list(map(_uid, tasks))
        uid_text = '","'.join(uids)
        if (
            uid_text.count('"') != 2 * len(uids) - 2
            or "\\" in uid_text
            or not uid_text.isprintable()
        ):  # not a uid the engine made: let JSON quote it
            uid_text = _encode(uids)[2:-2]
        attempts = flat[start + _ATTEMPT : end : RECORD_SIZE]
        attempt_text = _join_ints(attempts)
        head = (
            f'{{"kind":[{",".join(map(_QUOTED_KIND.__getitem__, kinds))}],'
            f'"time":[{_join_ints(map(int, map(_micro, flat[start + _TIME : end : RECORD_SIZE])))}],'
            f'"uid":["{uid_text}"],"attempt":[{attempt_text}]'
        )
        rest: dict[str, Any] = {}
        count = len(kinds)
        durations = flat[start + _DURATION : end : RECORD_SIZE]
        errors = flat[start + _ERROR : end : RECORD_SIZE]
        if durations.count(None) != count or errors.count(None) != count:
            ending = list(map(_ending, kinds))
            durations = list(compress(durations, ending))
            if None not in durations:
                head += f',"duration":[{_join_ints(map(int, map(_micro, durations)))}]'
            elif durations.count(None) != len(durations):
                rest["duration"] = [
                    None if d is None else int(d * 1e6) for d in durations
                ]
            errors = list(compress(errors, ending))
            if errors.count(None) != len(errors):
                rest["error"] = [None if e is None else _error_text(e) for e in errors]
        extras = flat[start + _EXTRA : end : RECORD_SIZE]
        if extras.count(None) != count:
            self._created(rest, list(compress(tasks, extras)), extras)
        if not rest:
            return head + "}"
        return f"{head},{_encode(rest)[1:]}"

    def _created(
        self, line: dict[str, Any], tasks: list[Any], extras: list[Any]
    ) -> None:
        """The columns of the ``created`` events of a line."""
        parents, dependencies, kinds_of_task, _ = zip(
            *compress(extras, extras), strict=True
        )
        definitions = list(map(_definition, tasks))
        backends = self._backends
        if not backends.keys() >= set(definitions):
            for definition, task in zip(definitions, tasks, strict=True):
                if definition not in backends:
                    backends[definition] = backend_name(task)
        _column(line, "name", list(map(_name, tasks)))
        _column(line, "backend", list(map(backends.__getitem__, definitions)))
        _column(line, "workflow_id", list(map(_workflow, tasks)))
        _column(line, "parent", list(parents))
        if any(dependencies):
            line["dependencies"] = dependencies
        _column(line, "kind_of_task", list(kinds_of_task))

    def flush(self) -> None:
        self._out.flush()

    def close(self) -> None:
        self._out.close()


def _column(line: dict[str, Any], field: str, values: list[Any]) -> None:
    """Add a created-event column: left out when all null, one value when
    all share it, else the list."""
    first = values[0]
    if values.count(first) == len(values):
        if first is not None:
            line[field] = first
    else:
        line[field] = values


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
    """The header and the events of a trace file.

    Each event is a dictionary keyed by the :class:`~asyncflow.TaskEvent`
    field names, ``time`` and ``duration`` in seconds, in the order the
    events happened. A cut-off last line, from a crashed run, is skipped.
    Reads versions 1 and 2 of the format; raises ValueError for anything
    else.
    """
    header: dict[str, Any] | None = None
    events: list[dict[str, Any]] = []
    # uid -> (name, backend, workflow_id), from the created events (version 2).
    tasks: dict[str, tuple[Any, Any, Any]] = {}
    version: Any = VERSION
    with open(path, encoding="utf-8") as file:
        for number, text in enumerate(file, 1):
            text = text.strip()
            if not text:
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                continue  # the last line of a run that died mid-write
            if header is None:
                if not isinstance(record, dict) or record.get("format") != FORMAT:
                    raise ValueError(
                        f"{path} is not an asyncflow trace (line {number} has no "
                        f"format {FORMAT!r})"
                    )
                version = record.get("version")
                if version not in (1, 2):
                    raise ValueError(
                        f"{path} is an asyncflow trace of version {version!r}; "
                        f"this asyncflow reads versions 1 and {VERSION}"
                    )
                header = record
            elif version == 1:
                events.append(record)
            else:
                try:
                    events += _events_of(record, tasks)
                except (KeyError, TypeError, ValueError, AttributeError):
                    raise ValueError(
                        f"{path}, line {number}: not a line of a version-2 trace"
                    ) from None
    if header is None:
        raise ValueError(f"{path} is empty: not an asyncflow trace")
    return header, events


def _entries(line: dict[str, Any], field: str, count: int) -> list[Any]:
    """A column of ``count`` entries (spread if left out or shared)."""
    if field not in line:
        return [[] if field == "dependencies" else None] * count
    values = line[field]
    if not isinstance(values, list):
        if field == "dependencies":
            raise ValueError("dependencies is not a list")
        return [values] * count
    if len(values) != count:
        raise ValueError(f"{field} has {len(values)} entries, not {count}")
    return values


def _events_of(
    line: dict[str, Any], tasks: dict[str, tuple[Any, Any, Any]]
) -> list[dict[str, Any]]:
    """The events of one line of a version-2 trace."""
    kinds: list[str] = line["kind"]
    count = len(kinds)
    times = _entries(line, "time", count)
    uids = _entries(line, "uid", count)
    attempts = _entries(line, "attempt", count)
    ending = sum(kind in ENDING_KINDS for kind in kinds)
    durations = iter(_entries(line, "duration", ending))
    errors = iter(_entries(line, "error", ending))
    created = kinds.count("created")
    about = zip(
        *(_entries(line, field, created) for field in CREATED_FIELDS), strict=True
    )
    events = []
    for kind, when, uid, attempt in zip(kinds, times, uids, attempts, strict=True):
        duration = error = None
        if kind in ENDING_KINDS:
            duration = next(durations)
            error = next(errors)
        if kind == "created":
            name, backend, workflow_id, parent, dependencies, kind_of_task = next(about)
            tasks[uid] = (name, backend, workflow_id)
        else:
            name, backend, workflow_id = tasks.get(uid, (None, None, None))
            parent, dependencies, kind_of_task = None, [], None
        events.append(
            {
                "kind": kind,
                "time": when / 1e6,
                "uid": uid,
                "name": name,
                "backend": backend,
                "workflow_id": workflow_id,
                "attempt": attempt,
                "duration": None if duration is None else duration / 1e6,
                "error": error,
                "parent": parent,
                "dependencies": list(dependencies),
                "kind_of_task": kind_of_task,
            }
        )
    return events
