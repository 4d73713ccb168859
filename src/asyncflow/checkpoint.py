"""Resumable runs: task results kept in a local SQLite file.

A task's key is a SHA-256 over its kind, its name, a hash of its code and a
stable encoding of its resolved arguments (executable and prompt tasks: of
the command or prompt their body returned and the task description keys
that change what runs). A re-run of the same script finds every result that
was stored before and skips those tasks.

File format (version 1), two tables::

    asyncflow_meta(key TEXT PRIMARY KEY, value TEXT)
        format = 'asyncflow-checkpoint', version = '1', created = <unix time>
    asyncflow_results(key TEXT PRIMARY KEY, task TEXT, kind TEXT,
                      stored_at REAL, result BLOB)
        result = pickle (protocol 5) of the task's return value

The file is in WAL mode and every result is its own transaction, so a crash
(even ``kill -9``) loses at most the results not yet committed.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import marshal
import os
import pickle
import sqlite3
import struct
import time
from pathlib import Path, PurePath
from typing import Any

import cloudpickle

from .errors import CheckpointError
from .tasks import TaskDefinition, TaskFuture, TaskKind

__all__ = ["FORMAT", "VERSION", "CheckpointStore", "task_key"]

log = logging.getLogger("asyncflow.checkpoint")

FORMAT = "asyncflow-checkpoint"
VERSION = "1"
#: Task description keys that change what an executable task runs.
COMMAND_KEYS = ("shell", "env", "cwd")


class Uncacheable(Exception):
    """An argument has no stable encoding."""


def code_hash(definition: TaskDefinition) -> str:
    """Hash of the task body's source (or bytecode when there is no source)."""
    if definition._code_hash is None:
        function = definition.function
        try:
            material = inspect.getsource(function).encode()
        except (OSError, TypeError):
            code = getattr(function, "__code__", None)
            material = (
                marshal.dumps(code.co_code) + repr(code.co_consts).encode()
                if code is not None
                else getattr(function, "__qualname__", repr(function)).encode()
            )
        definition._code_hash = hashlib.sha256(material).hexdigest()
    return definition._code_hash


def _pickled(value: Any) -> bytes:
    """pickle, or cloudpickle for what pickle cannot do (lambdas, locals)."""
    try:
        return pickle.dumps(value, protocol=5)
    except Exception:
        return bytes(cloudpickle.dumps(value, protocol=5))


def _encode(value: Any, out: list[bytes]) -> None:
    kind = type(value)
    if value is None or kind is bool:
        out.append(b"N" if value is None else (b"T" if value else b"F"))
    elif kind is int:
        out.append(b"i" + str(value).encode() + b";")
    elif kind is float:
        out.append(b"f" + struct.pack("<d", value))
    elif kind is str:
        data = value.encode("utf-8", "surrogatepass")
        out.append(b"s" + struct.pack("<Q", len(data)) + data)
    elif kind is bytes:
        out.append(b"b" + struct.pack("<Q", len(value)) + value)
    elif kind is list or kind is tuple:
        out.append((b"l" if kind is list else b"t") + struct.pack("<Q", len(value)))
        for item in value:
            _encode(item, out)
    elif kind is dict:
        items = sorted(_encoded(k) + _encoded(v) for k, v in value.items())
        out.append(b"d" + struct.pack("<Q", len(items)) + b"".join(items))
    elif kind is set or kind is frozenset:
        items = sorted(_encoded(v) for v in value)
        out.append(b"S" + struct.pack("<Q", len(items)) + b"".join(items))
    elif isinstance(value, PurePath):
        out.append(b"p" + _encoded(str(value)))
    else:
        try:
            data = _pickled(value)
        except Exception as exc:
            raise Uncacheable(f"{kind.__name__} argument: {exc}") from None
        out.append(b"o" + struct.pack("<Q", len(data)) + data)


def _encoded(value: Any) -> bytes:
    out: list[bytes] = []
    _encode(value, out)
    return b"".join(out)


def task_key(task: TaskFuture) -> str:
    """The task's cache key; raises :class:`Uncacheable` if it has none."""
    definition = task._definition
    digest = hashlib.sha256(b"asyncflow-key-1")
    digest.update(f"{definition.kind}\0{definition.name}\0".encode())
    digest.update(code_hash(definition).encode())
    if definition.kind is TaskKind.FUNCTION:
        digest.update(_encoded(task.args))
        digest.update(_encoded(task.kwargs))
    else:
        digest.update(_encoded(task.command))
        description = task.task_description
        digest.update(_encoded({k: description.get(k) for k in COMMAND_KEYS}))
    return digest.hexdigest()


class CheckpointStore:
    """The results of one workflow's finished tasks, in a SQLite file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._conn = self._open(self.path)
        self._warned: set[str] = set()

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        fresh = not path.exists() or path.stat().st_size == 0
        try:
            conn = sqlite3.connect(str(path), isolation_level=None)
        except sqlite3.Error as exc:
            raise CheckpointError(f"cannot open checkpoint file {path}: {exc}") from exc
        try:
            if fresh:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(
                    "CREATE TABLE asyncflow_meta (key TEXT PRIMARY KEY, value TEXT)"
                )
                conn.execute(
                    "CREATE TABLE asyncflow_results (key TEXT PRIMARY KEY, "
                    "task TEXT NOT NULL, kind TEXT NOT NULL, stored_at REAL NOT NULL, "
                    "result BLOB NOT NULL)"
                )
                conn.executemany(
                    "INSERT INTO asyncflow_meta VALUES (?, ?)",
                    [
                        ("format", FORMAT),
                        ("version", VERSION),
                        ("created", str(time.time())),
                    ],
                )
            else:
                conn.execute("PRAGMA journal_mode=WAL")
                meta = dict(conn.execute("SELECT key, value FROM asyncflow_meta"))
                if meta.get("format") != FORMAT:
                    raise CheckpointError(
                        f"{path} was not written by asyncflow (format "
                        f"{meta.get('format')!r}); refusing to reuse it: choose "
                        "another checkpoint path"
                    )
                if meta.get("version") != VERSION:
                    raise CheckpointError(
                        f"{path} is an asyncflow checkpoint of version "
                        f"{meta.get('version')!r}; this asyncflow reads version "
                        f"{VERSION}: delete it or choose another path"
                    )
                conn.execute("SELECT key, result FROM asyncflow_results LIMIT 1")
            conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise CheckpointError(
                f"{path} is not a usable asyncflow checkpoint ({exc}); refusing "
                "to reuse it: delete it or choose another checkpoint path"
            ) from exc
        except CheckpointError:
            conn.close()
            raise
        return conn

    def lookup(self, key: str) -> tuple[bool, Any]:
        row = self._conn.execute(
            "SELECT result FROM asyncflow_results WHERE key = ?", (key,)
        ).fetchone()
        if row is None:
            return False, None
        try:
            return True, pickle.loads(row[0])
        except Exception as exc:
            log.warning(
                "checkpoint entry %s cannot be loaded (%s); recomputing", key, exc
            )
            return False, None

    def store(self, key: str, task: TaskFuture, value: Any) -> None:
        try:
            blob = _pickled(value)
        except Exception as exc:
            self._warn_once(
                task.name,
                "result of task %r (%s) cannot be pickled (%s); it is not "
                "checkpointed and will be recomputed on a re-run",
                task.name,
                task.uid,
                exc,
            )
            return
        self._conn.execute(
            "INSERT OR REPLACE INTO asyncflow_results VALUES (?, ?, ?, ?, ?)",
            (key, task.name, str(task.kind), time.time(), blob),
        )

    def count(self) -> int:
        row = self._conn.execute("SELECT COUNT(*) FROM asyncflow_results").fetchone()
        return int(row[0])

    def _warn_once(self, name: str, message: str, *args: Any) -> None:
        if name not in self._warned:
            self._warned.add(name)
            log.warning(message, *args)

    def key_for(self, task: TaskFuture) -> str | None:
        """The task's key, or None (warned once per task) if it has none."""
        try:
            return task_key(task)
        except Uncacheable as exc:
            self._warn_once(
                task.name,
                "task %r has an argument without a stable encoding (%s); its "
                "results are not checkpointed",
                task.name,
                exc,
            )
            return None

    def close(self) -> None:
        self._conn.close()
