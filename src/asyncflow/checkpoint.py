"""Resumable runs: task results kept in a local SQLite file.

Keys
    A task's key is a SHA-256 over its kind, its name, its code and its
    resolved arguments (executable and prompt tasks: the command or prompt
    their body returned and the task description keys that change what runs).
    "Its code" is the body's code object, recursively (bytecode, names,
    constants, nested functions; not line numbers), the values its closure
    captured, its defaults and the module globals it reads; a plain function
    it calls is covered the same way. Immutable values (numbers, strings,
    tuples, frozensets, enum members, ...) are covered by value, functions by
    their code, classes and modules by name, everything else (lists, dicts,
    objects) by type only. ``version=`` stands for the code and
    ``cache_key=`` for the arguments. docs/reliability.md says what a key
    does not cover.

File format (version 2), two tables::

    asyncflow_meta(key TEXT PRIMARY KEY, value TEXT)
        format = 'asyncflow-checkpoint', version = '2', created = <unix time>
    asyncflow_results(key TEXT, task TEXT, kind TEXT, stored_at REAL,
                      encoding TEXT, result BLOB, mac BLOB)
        encoding = 'json' (plain data) or 'pickle' (protocol 5)
        mac = HMAC-SHA256 of (key, kind, encoding, result) under this user's
              key file (see :func:`key_file_path`)
        rows are appended; of several rows with one key the last authentic
        one counts, and opening the file deletes the others

Trust
    A row is decoded only if its MAC verifies under the user's secret key, so
    a checkpoint written by anyone else (or edited since) is never unpickled.
    New files are created 0600; a file owned by another user is refused.

Threads
    The constructor opens and checks the file, verifies every row and keeps
    them in memory; lookups are answered from there. One writer thread owns
    the connection afterwards: it commits what :meth:`CheckpointStore.store`
    queued, a batch per transaction, so a locked or failing database never
    blocks or breaks the event loop.
"""

from __future__ import annotations

import asyncio
import atexit
import copyreg
import dataclasses
import enum
import functools
import hashlib
import hmac
import itertools
import json
import logging
import math
import os
import pickle
import queue
import secrets
import site
import sqlite3
import struct
import sys
import sysconfig
import threading
import time
import types
from collections.abc import Callable, Iterable
from pathlib import Path, PurePath
from typing import Any

from .errors import CheckpointError
from .tasks import TaskDefinition, TaskFuture, TaskKind

__all__ = [
    "FORMAT",
    "VERSION",
    "CheckpointStore",
    "Uncacheable",
    "key_file_path",
    "task_key",
]

log = logging.getLogger("asyncflow.checkpoint")

FORMAT = "asyncflow-checkpoint"
VERSION = "2"
#: Task description keys that change what an executable task runs.
COMMAND_KEYS = ("shell", "env", "cwd")
#: Seconds the writer waits for a lock held by another connection.
BUSY_TIMEOUT_S = 5.0
#: Seconds the interpreter-exit flush may take for a store nobody closed.
EXIT_FLUSH_TIMEOUT_S = 10.0
#: Nesting levels an argument may have before it counts as uncacheable.
MAX_ARGUMENT_DEPTH = 200
#: Calls deep the code walk follows helpers before naming them only.
MAX_CODE_DEPTH = 50

KEY_FILE_ENV = "ASYNCFLOW_KEY_FILE"
_KEY_SALT = b"asyncflow-key-2"
_MAC_SALT = b"asyncflow-checkpoint-2"
_SECRET_HEX_DIGITS = 64
_JSON_DEPTH = 100
_SQLITE_BUSY_CODES = (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED

_u64 = struct.Struct("<Q").pack
_i64 = struct.Struct("<q").pack
_f64 = struct.Struct("<d").pack


class Uncacheable(Exception):
    """An argument has no stable encoding."""


# -- argument encoding -------------------------------------------------------------
#
# Every encoding is self-delimiting, so concatenations cannot collide, and
# nothing in it depends on the hash seed: set members and dict items are
# sorted by their own encodings.


def _encode(value: Any, out: list[bytes], depth: int) -> None:
    kind = type(value)
    if value is None:
        out.append(b"N")
    elif kind is bool:
        out.append(b"T" if value else b"F")
    elif kind is int:
        if -(2**63) <= value < 2**63:
            out.append(b"i" + _i64(value))
        else:
            # str(int) is capped at 4300 digits; bytes are not.
            size = (value.bit_length() + 8) // 8
            out.append(b"I" + _u64(size) + value.to_bytes(size, "little", signed=True))
    elif kind is float:
        out.append(b"f" + _f64(value))
    elif kind is str:
        data = value.encode("utf-8", "surrogatepass")
        out.append(b"s" + _u64(len(data)) + data)
    elif kind is bytes:
        out.append(b"b" + _u64(len(value)) + value)
    elif kind is list or kind is tuple:
        if depth >= MAX_ARGUMENT_DEPTH:
            raise _too_deep()
        out.append((b"l" if kind is list else b"t") + _u64(len(value)))
        for item in value:
            _encode(item, out, depth + 1)
    elif kind is dict:
        if depth >= MAX_ARGUMENT_DEPTH:
            raise _too_deep()
        _encode_items(value.items(), out, depth + 1)
    elif kind is set or kind is frozenset:
        if depth >= MAX_ARGUMENT_DEPTH:
            raise _too_deep()
        members = sorted([_encoded(v, depth + 1) for v in value])
        tag = b"S" if kind is set else b"Z"
        out.append(tag + _u64(len(members)) + b"".join(members))
    else:
        _encode_object(value, out, depth)


def _encoded(value: Any, depth: int = 0) -> bytes:
    out: list[bytes] = []
    _encode(value, out, depth)
    return b"".join(out)


def _encode_items(items: Iterable[Any], out: list[bytes], depth: int) -> None:
    pairs = sorted([_encoded(k, depth) + _encoded(v, depth) for k, v in items])
    out.append(b"d" + _u64(len(pairs)) + b"".join(pairs))


def _too_deep() -> Uncacheable:
    return Uncacheable(
        f"an argument is nested more than {MAX_ARGUMENT_DEPTH} levels deep (or "
        "contains itself)"
    )


def _encode_object(value: Any, out: list[bytes], depth: int) -> None:
    """Anything but the exact builtin types: its class and its contents.

    Contents come from what pickle would save (``__reduce_ex__``: the
    ``__getstate__`` / ``__dict__`` / ``__slots__`` values, list and dict
    items), encoded here instead of pickled, because a pickle writes sets and
    dicts in hash order and would change with the hash seed.
    """
    if depth >= MAX_ARGUMENT_DEPTH:
        raise _too_deep()
    depth += 1
    kind = type(value)
    if isinstance(value, type):
        # By name: walking a class's methods on every call would cost much.
        out.append(b"r" + _qualified(value))
    elif isinstance(value, _CALLABLE_TYPES):
        out.append(b"c" + _callable_digest(value))
    elif isinstance(value, PurePath):
        out.append(b"p" + _qualified(kind) + _encoded(str(value)))
    elif kind is bytearray or kind is memoryview or kind is pickle.PickleBuffer:
        data = bytes(value)
        out.append(b"B" + _u64(len(data)) + data)
    elif dataclasses.is_dataclass(value):
        fields = dataclasses.fields(value)
        out.append(b"D" + _qualified(kind) + _u64(len(fields)))
        for field in fields:
            _encode(field.name, out, depth)
            _encode(getattr(value, field.name, _Missing), out, depth)
    else:
        _encode_reduced(value, out, depth)


class _Missing:
    """Stands for a dataclass field that was never set."""


def _encode_reduced(value: Any, out: list[bytes], depth: int) -> None:
    kind = type(value)
    try:
        reducer = copyreg.dispatch_table.get(kind)
        # Protocol 4: 5 would hand out PickleBuffer views of array data.
        reduced = reducer(value) if reducer is not None else value.__reduce_ex__(4)
    except Exception as exc:
        raise Uncacheable(
            f"a {kind.__qualname__} argument has no stable encoding ({exc})"
        ) from None
    if isinstance(reduced, str):  # a module-level singleton, saved by name
        out.append(b"g" + _qualified(kind) + _encoded(reduced))
        return
    if not isinstance(reduced, tuple) or len(reduced) < 2:
        raise Uncacheable(
            f"a {kind.__qualname__} argument has no stable encoding (its "
            f"__reduce_ex__ returned {type(reduced).__name__})"
        )
    constructor, arguments, *rest = reduced
    rest += [None] * (4 - len(rest))
    state, list_items, dict_items, setter = rest[:4]
    out.append(b"R")
    _encode_reference(constructor, out)
    _encode(arguments, out, depth)
    _encode(state, out, depth)
    _encode(None if list_items is None else list(list_items), out, depth)
    if dict_items is None:
        out.append(b"N")
    else:
        _encode_items(dict_items, out, depth)
    _encode_reference(setter, out)


def _encode_reference(target: Any, out: list[bytes]) -> None:
    """A callable that pickle would save by reference, encoded the same way."""
    if target is None:
        out.append(b"N")
    elif isinstance(target, types.FunctionType) and not _is_library(target.__module__):
        out.append(b"c" + _callable_digest(target))
    else:
        out.append(b"r" + _qualified(target))


def _qualname(target: Any) -> str:
    module = getattr(target, "__module__", None)
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    if not isinstance(name, str):
        name = type(target).__qualname__
    return f"{module if isinstance(module, str) else ''}:{name}"


def _qualified(target: Any) -> bytes:
    return _encoded(_qualname(target))


# -- code encoding -----------------------------------------------------------------

_CALLABLE_TYPES = (
    types.FunctionType,
    types.MethodType,
    types.BuiltinFunctionType,
    types.BuiltinMethodType,
    types.CodeType,
    types.ModuleType,
    functools.partial,
    type,
)
#: Immutable standard types worth covering by value when a task reads them.
_IMMUTABLE_BY_NAME = frozenset(
    {
        "datetime:date",
        "datetime:datetime",
        "datetime:time",
        "datetime:timedelta",
        "datetime:timezone",
        "decimal:Decimal",
        "fractions:Fraction",
        "uuid:UUID",
    }
)
_SCALARS = (type(None), bool, int, float, str, bytes)


def _callable_digest(target: Any) -> bytes:
    walker = _CodeWalker()
    walker.callable(target, 0)
    return hashlib.sha256(b"".join(walker.out)).digest()


class _CodeWalker:
    """Encodes a callable by what decides its behaviour.

    Values it captures or reads are covered by value only when they cannot
    change during a run (see :meth:`value`): a list or dict that tasks fill
    as they go would otherwise give the same task a different key depending
    on how far the run had got.
    """

    __slots__ = ("out", "seen")

    def __init__(self) -> None:
        self.out: list[bytes] = []
        # Keeps what it has visited alive, so that no id is reused meanwhile.
        self.seen: dict[int, Any] = {}

    def _visited(self, target: Any) -> bool:
        if id(target) in self.seen:
            self.out.append(b"@" + _qualified(target))
            return True
        self.seen[id(target)] = target
        return False

    def callable(self, target: Any, depth: int) -> None:
        out = self.out
        if depth > MAX_CODE_DEPTH:
            out.append(b"~" + _qualified(target))
        elif isinstance(target, types.FunctionType):
            self.function(target, depth)
        elif isinstance(target, types.MethodType):
            out.append(b"m")
            self.callable(target.__func__, depth + 1)
            self.value(target.__self__, depth + 1)
        elif isinstance(target, functools.partial):
            out.append(b"P")
            self.callable(target.func, depth + 1)
            self.value(target.args, depth + 1)
            self.keywords(target.keywords, depth + 1)
        elif isinstance(target, type):
            self.klass(target, depth)
        elif isinstance(target, types.ModuleType):
            out.append(b"M" + _encoded(target.__name__))
        elif isinstance(target, types.CodeType):
            self.code(target, depth)
        elif isinstance(target, (types.BuiltinFunctionType, types.BuiltinMethodType)):
            out.append(b"b" + _qualified(target))
        else:
            # A callable object: its class (with its __call__) decides.
            out.append(b"O")
            self.klass(type(target), depth + 1)

    def function(self, function: types.FunctionType, depth: int) -> None:
        out = self.out
        if self._visited(function):
            return
        if _is_library(function.__module__):
            # Installed code changes with its version, not between runs.
            out.append(b"L" + _qualified(function))
            return
        code = function.__code__
        out.append(b"F")
        self.code(code, depth)
        cells = function.__closure__ or ()
        out.append(b"c" + _u64(len(cells)))
        for cell in cells:
            try:
                contents = cell.cell_contents
            except ValueError:
                out.append(b"e")
            else:
                self.value(contents, depth + 1)
        self.value(function.__defaults__, depth + 1)
        self.keywords(function.__kwdefaults__, depth + 1)
        namespace = function.__globals__
        names = sorted(n for n in _global_names(code) if n in namespace)
        out.append(b"g" + _u64(len(names)))
        for name in names:
            out.append(_encoded(name))
            self.value(namespace[name], depth + 1)

    def keywords(self, mapping: dict[str, Any] | None, depth: int) -> None:
        items = sorted((mapping or {}).items())
        self.out.append(b"k" + _u64(len(items)))
        for name, value in items:
            self.out.append(_encoded(name))
            self.value(value, depth)

    def code(self, code: types.CodeType, depth: int) -> None:
        # Positions (co_firstlineno, co_linetable) and co_filename are left
        # out: moving a function or its file keeps its key.
        self.out += [
            b"K",
            _encoded(code.co_name),
            _encoded(
                (
                    code.co_argcount,
                    code.co_posonlyargcount,
                    code.co_kwonlyargcount,
                    code.co_flags,
                )
            ),
            _encoded(code.co_code),
            _encoded(code.co_names),
            _encoded(code.co_varnames),
            _encoded(code.co_freevars),
            _encoded(code.co_cellvars),
            _encoded(getattr(code, "co_exceptiontable", b"")),
            b"C" + _u64(len(code.co_consts)),
        ]
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                self.code(const, depth + 1)
            else:
                self.value(const, depth + 1)

    def klass(self, cls: type, depth: int) -> None:
        out = self.out
        if self._visited(cls):
            return
        out.append(b"C" + _qualified(cls))
        if _is_library(cls.__module__) or depth > MAX_CODE_DEPTH:
            return
        # Methods by their code alone: walking what they read could reach a
        # large share of the program for little gain.
        for name, attribute in sorted(vars(cls).items()):
            if isinstance(attribute, (staticmethod, classmethod)):
                attribute = attribute.__func__
            if isinstance(attribute, property):
                accessors = (attribute.fget, attribute.fset, attribute.fdel)
                codes = [
                    f.__code__ for f in accessors if isinstance(f, types.FunctionType)
                ]
            elif isinstance(attribute, types.FunctionType):
                codes = [attribute.__code__]
            elif type(attribute) in _SCALARS and not name.startswith("__"):
                # Dunder data (__slotnames__, ...) is filled in lazily.
                out.append(_encoded(name) + _encoded(attribute))
                continue
            else:
                continue
            out.append(_encoded(name))
            for code in codes:
                self.code(code, depth + 1)

    def value(self, value: Any, depth: int) -> None:
        """A captured or global value: by value when it cannot change."""
        out = self.out
        kind = type(value)
        if kind in _SCALARS or kind is complex:
            out.append(
                _encoded(value) if kind is not complex else _encoded(repr(value))
            )
        elif depth > MAX_CODE_DEPTH:
            out.append(b"?" + _qualified(kind))
        elif isinstance(value, tuple):
            out.append(b"t" + _qualified(kind) + _u64(len(value)))
            for item in value:
                self.value(item, depth + 1)
        elif kind is frozenset:
            members = []
            for item in value:
                walker = _CodeWalker()
                walker.seen = dict(self.seen)
                walker.value(item, depth + 1)
                members.append(b"".join(walker.out))
            members.sort()
            out.append(b"S" + _u64(len(members)) + b"".join(members))
        elif isinstance(value, enum.Enum):
            out.append(b"n" + _qualified(kind) + _encoded(value.name))
        elif isinstance(value, PurePath):
            out.append(b"p" + _encoded(str(value)))
        elif kind is range:
            out.append(b"r" + _encoded((value.start, value.stop, value.step)))
        elif value is Ellipsis or value is NotImplemented:
            out.append(b"." + _encoded(repr(value)))
        elif isinstance(value, _CALLABLE_TYPES):
            self.callable(value, depth)
        elif _is_frozen_dataclass(value):
            fields = dataclasses.fields(value)
            out.append(b"D" + _qualified(kind) + _u64(len(fields)))
            for field in fields:
                out.append(_encoded(field.name))
                self.value(getattr(value, field.name, None), depth + 1)
        elif _qualname(kind) in _IMMUTABLE_BY_NAME:
            out.append(b"v" + _encoded(value))
        else:
            # Mutable or opaque: lists, dicts, sets, objects, loggers, engines.
            out.append(b"?" + _qualified(kind))


def _is_frozen_dataclass(value: Any) -> bool:
    params = getattr(type(value), "__dataclass_params__", None)
    return bool(getattr(params, "frozen", False))


def _global_names(code: types.CodeType) -> set[str]:
    """Every name the code (or code nested in it) looks up or reads off."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


@functools.cache
def _library_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths.get(name) for name in ("stdlib", "platstdlib", "purelib", "platlib")}
    try:
        roots.update(site.getsitepackages())
        roots.add(site.getusersitepackages())
    except AttributeError:  # some virtualenv builds lack these
        pass
    return tuple(
        os.path.realpath(root) + os.sep for root in roots if isinstance(root, str)
    )


@functools.lru_cache(maxsize=4096)
def _is_library(module_name: str | None) -> bool:
    """Whether a module is the standard library's or an installed package's."""
    if not module_name:
        return False
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None)
    if isinstance(path, str):
        return os.path.realpath(path).startswith(_library_roots())
    top = module_name.partition(".")[0]
    return top in sys.builtin_module_names or top in sys.stdlib_module_names


def code_hash(definition: TaskDefinition) -> str:
    """Hash of the task body's code and of what it captures and reads.

    Cached on the definition: a global the body reads is taken as it was
    when the first call of this definition was keyed.
    """
    if definition._code_hash is None:
        walker = _CodeWalker()
        walker.callable(definition.function, 0)
        definition._code_hash = hashlib.sha256(b"".join(walker.out)).hexdigest()
    return definition._code_hash


def task_key(task: TaskFuture) -> str:
    """The task's cache key; raises :class:`Uncacheable` if it has none."""
    definition = task._definition
    options = definition.options
    kind = definition.kind
    try:
        parts = [_key_prefix(definition)]
        if options.cache_key is not None:
            parts.append(b"k")
            _encode(_user_key(task, options.cache_key), parts, 0)
        elif kind is TaskKind.FUNCTION:
            parts.append(b"a")
            _encode(task.args, parts, 0)
            kwargs = task.kwargs
            if kwargs:
                _encode(kwargs, parts, 0)
            else:
                parts.append(_NO_KWARGS)
        else:
            parts.append(b"x")
            _encode(task.command, parts, 0)
        if kind is not TaskKind.FUNCTION:
            description = task.task_description
            _encode({k: description.get(k) for k in COMMAND_KEYS}, parts, 0)
            if kind is TaskKind.PROMPT:
                # Prompt backends read their settings (system prompt, model,
                # sampling) from the description: they change the answer.
                settings = {
                    k: v for k, v in description.items() if k not in COMMAND_KEYS
                }
                if settings:
                    parts.append(b"p")
                    _encode(settings, parts, 0)
    except RecursionError:
        raise Uncacheable(
            "an argument or the code is nested too deeply to encode"
        ) from None
    return hashlib.sha256(b"".join(parts)).hexdigest()


_NO_KWARGS = _encoded({})
# Digests of what every call of a definition shares (kind, name, code), so
# that a call hashes only that and its own arguments.
_prefixes: dict[tuple[TaskKind, str, str | None, str | None, bool], bytes] = {}


def _key_prefix(definition: TaskDefinition) -> bytes:
    version = definition.options.version
    code = code_hash(definition) if version is None else None
    # capture_stdio changes what the result is (a file path, not the output).
    capture = definition.capture_stdio
    entry = (definition.kind, definition.name, version, code, capture)
    prefix = _prefixes.get(entry)
    if prefix is None:
        if len(_prefixes) >= 4096:
            _prefixes.clear()
        material: tuple[str | None, ...] = (
            str(definition.kind),
            definition.name,
            version,
            code,
        )
        if capture:
            material += ("capture_stdio",)
        prefix = hashlib.sha256(_KEY_SALT + _encoded(material)).digest()
        _prefixes[entry] = prefix
    return prefix


def _user_key(task: TaskFuture, cache_key: Callable[..., Any]) -> Any:
    try:
        return cache_key(*task.args, **task.kwargs)
    except Exception as exc:
        raise Uncacheable(
            f"its cache_key callable raised {type(exc).__name__}: {exc}"
        ) from None


# -- result encoding and authentication ------------------------------------------


def _pickled(value: Any) -> bytes:
    """pickle, or cloudpickle for what pickle cannot do (lambdas, locals)."""
    try:
        return pickle.dumps(value, protocol=5)
    except Exception:
        import cloudpickle

        return bytes(cloudpickle.dumps(value, protocol=5))


def _is_plain(value: Any, depth: int) -> bool:
    """Whether JSON gives back an equal value of identical types."""
    kind = type(value)
    if value is None or kind is bool or kind is int or kind is str:
        return True
    if kind is float:
        return math.isfinite(value)
    if depth >= _JSON_DEPTH:
        return False
    if kind is list:
        return all(_is_plain(item, depth + 1) for item in value)
    if kind is dict:
        return all(type(k) is str and _is_plain(v, depth + 1) for k, v in value.items())
    return False


_json = json.JSONEncoder(allow_nan=False, separators=(",", ":"))
_json_string: Callable[[str], str] = json.encoder.encode_basestring_ascii


def _serialized(value: Any) -> tuple[str, bytes]:
    kind = type(value)
    # The scalars first: most results are small, and JSONEncoder.encode is
    # slow for anything but a str.
    if value is None:
        return "json", b"null"
    if kind is bool:
        return "json", b"true" if value else b"false"
    if kind is float and math.isfinite(value):
        return "json", float.__repr__(value).encode()
    if kind is str:
        return "json", _json_string(value).encode()
    if kind is int or _is_plain(value, 0):
        try:
            text = str(value) if kind is int else _json.encode(value)
        except (ValueError, RecursionError):  # ints over the digit limit
            pass
        else:
            return "json", text.encode("ascii")
    return "pickle", _pickled(value)


def _deserialized(encoding: str, payload: bytes) -> Any:
    if encoding == "json":
        return json.loads(payload)
    if encoding == "pickle":
        return pickle.loads(payload)
    raise ValueError(f"unknown encoding {encoding!r}")


class _Keyed:
    """HMAC-SHA256 (RFC 2104) under one key, with the padded key hashed once.

    Copying two hash states per row costs a third of what copying an
    :class:`hmac.HMAC` does, and the writer thread signs every row.
    """

    __slots__ = ("inner", "outer")

    def __init__(self, secret: bytes) -> None:
        if len(secret) > _SHA256_BLOCK:
            secret = hashlib.sha256(secret).digest()
        padded = secret.ljust(_SHA256_BLOCK, b"\0")
        self.inner = hashlib.sha256(bytes(b ^ 0x36 for b in padded))
        self.outer = hashlib.sha256(bytes(b ^ 0x5C for b in padded))

    def digest(self, *parts: bytes) -> bytes:
        inner = self.inner.copy()
        for part in parts:
            inner.update(part)
        outer = self.outer.copy()
        outer.update(inner.digest())
        return outer.digest()


_SHA256_BLOCK = 64


def _mac(keyed: _Keyed, key: str, kind: str, encoding: str, payload: bytes) -> bytes:
    """The MAC of a row: every field it covers, each with its length."""
    fields: list[bytes] = [_MAC_SALT]
    for field in (key.encode(), kind.encode(), encoding.encode()):
        fields += (_u64(len(field)), field)
    fields.append(_u64(len(payload)))
    return keyed.digest(b"".join(fields), payload)


def key_file_path() -> Path:
    """Where this user's checkpoint key lives.

    ``$ASYNCFLOW_KEY_FILE`` if set, else ``$XDG_CONFIG_HOME/asyncflow/
    checkpoint.key``, else ``~/.config/asyncflow/checkpoint.key``.
    """
    explicit = os.environ.get(KEY_FILE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME")
    # The XDG spec says to ignore a relative XDG_CONFIG_HOME.
    root = Path(config) if config and os.path.isabs(config) else Path.home() / ".config"
    return root / "asyncflow" / "checkpoint.key"


def _load_secret(path: Path) -> bytes:
    """The secret in ``path``, made there first if there is none yet."""
    try:
        if not path.parent.is_dir():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(path.parent, 0o700)
        try:
            # O_EXCL: of two processes making the key at once, one wins and
            # the other reads the winner's key.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            try:
                data = (secrets.token_hex(_SECRET_HEX_DIGITS // 2) + "\n").encode()
                while data:
                    data = data[os.write(fd, data) :]
            finally:
                os.close(fd)
        return _read_secret(path)
    except OSError as exc:
        raise CheckpointError(
            f"cannot create or read the checkpoint key file {path} ({exc}); set "
            f"{KEY_FILE_ENV} to a path in a directory you can write"
        ) from exc


def _read_secret(path: Path) -> bytes:
    deadline = time.monotonic() + 2.0
    while True:
        fd = os.open(path, os.O_RDONLY)
        try:
            info = os.fstat(fd)
            _check_owner(
                path,
                info,
                "checkpoint key file",
                f"delete it or set {KEY_FILE_ENV} to a key file of your own",
            )
            if info.st_mode & 0o077:
                raise CheckpointError(
                    f"checkpoint key file {path} can be read by other users (mode "
                    f"{info.st_mode & 0o777:04o}); anyone who reads it can forge "
                    f"checkpoint results: run `chmod 600 {path}`"
                )
            text = os.read(fd, 4096).strip()
        finally:
            os.close(fd)
        if len(text) == _SECRET_HEX_DIGITS:
            try:
                return bytes.fromhex(text.decode("ascii"))
            except ValueError:
                pass
        # A process that just made the file may not have written it yet.
        if time.monotonic() > deadline:
            raise CheckpointError(
                f"checkpoint key file {path} is malformed (expected "
                f"{_SECRET_HEX_DIGITS} hex digits); delete it and a new key is "
                "made (results stored under the old key then run again)"
            )
        time.sleep(0.01)


def _check_owner(path: Path, info: os.stat_result, what: str, instead: str) -> None:
    if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
        raise CheckpointError(
            f"{what} {path} is owned by uid {info.st_uid}, not by you (uid "
            f"{os.geteuid()}); asyncflow only trusts files of your own: {instead}"
        )


# -- the store ---------------------------------------------------------------------

_Row = tuple[str, str, str, float, str, bytes]
_INSERT_ROW = "INSERT INTO asyncflow_results VALUES (?, ?, ?, ?, ?, ?, ?)"
#: Rows per statement: 7 parameters each stays under the 999 parameters
#: older SQLite versions allow in one statement.
_CHUNK = 128
_INSERT_CHUNK = "INSERT INTO asyncflow_results VALUES " + ", ".join(
    ["(?, ?, ?, ?, ?, ?, ?)"] * _CHUNK
)
_KIND_NAMES = {kind: kind.value for kind in TaskKind}


class _Request:
    """Work for the writer thread, run after every row queued before it."""

    __slots__ = ("done", "error", "function", "notify", "result")

    def __init__(
        self,
        function: Callable[[sqlite3.Connection], Any] | None,
        notify: Callable[[], None] | None = None,
    ) -> None:
        self.function = function
        self.notify = notify
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class CheckpointStore:
    """The results of one workflow's finished tasks, in a SQLite file.

    The constructor does blocking I/O and raises :class:`CheckpointError` for
    a file it cannot use. After that nothing raises: :meth:`key_for`,
    :meth:`lookup` and :meth:`store` neither fail nor block, and write errors
    are logged (once) instead of raised.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._keyed = _Keyed(_load_secret(key_file_path()))
        conn = _open(self.path)
        try:
            self._index, rejected = _load_rows(conn, self.path, self._keyed)
        except BaseException:
            conn.close()
            raise
        if rejected:
            log.warning(
                "checkpoint file %s holds %d result(s) that this user's asyncflow "
                "did not write (their authentication code does not match the key "
                "in %s); they are ignored and their tasks run again",
                self.path,
                rejected,
                key_file_path(),
            )
        self._warned: set[str] = set()
        self._queue: queue.SimpleQueue[_Row | _Request] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._submitted = 0
        self._committed = 0  # written by the writer thread only
        self._write_warned = False
        self._pid = os.getpid()
        self._writer = threading.Thread(
            target=self._write_loop,
            args=(conn,),
            name=f"asyncflow-checkpoint {self.path.name}",
            daemon=True,
        )
        self._writer.start()
        _open_stores.add(self)

    # -- the loop side ---------------------------------------------------------------

    def key_for(self, task: TaskFuture) -> str | None:
        """The task's key, or None (warned once per task) if it has none.

        Never raises: a task whose key cannot be computed runs uncached.
        """
        try:
            return task_key(task)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            reason = str(exc) if isinstance(exc, Uncacheable) else repr(exc)
            self._warn_once(
                f"key {getattr(task, 'name', '?')}",
                "task %r has no stable cache key (%s); it runs uncached",
                getattr(task, "name", "?"),
                reason,
            )
            return None

    def lookup(self, key: str) -> tuple[bool, Any]:
        """``(True, result)`` if the file holds a result for ``key``.

        Answered from memory; never touches the database and never raises.
        """
        entry = self._index.get(key)
        if entry is None:
            return False, None
        try:
            return True, _deserialized(*entry)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            self._index.pop(key, None)
            log.warning(
                "checkpoint entry %s in %s cannot be loaded (%s: %s); its task "
                "runs again",
                key,
                self.path,
                type(exc).__name__,
                exc,
            )
            return False, None

    def store(self, key: str, task: TaskFuture, value: Any) -> None:
        """Queue a task's result for writing. Never raises, never blocks.

        The value is encoded now, so changing it afterwards does not change
        what is stored.
        """
        try:
            if self._closed:
                return
            try:
                encoding, payload = _serialized(value)
            except Exception as exc:
                self._warn_once(
                    f"result {task.name}",
                    "result of task %r (%s) cannot be pickled (%s); it is not "
                    "checkpointed and will be recomputed on a re-run",
                    task.name,
                    task.uid,
                    exc,
                )
                return
            kind = _KIND_NAMES[task._definition.kind]
            row = (key, task.name, kind, time.time(), encoding, payload)
            with self._lock:
                self._submitted += 1
            self._queue.put(row)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            log.warning(
                "result of task %r not checkpointed (%s: %s)",
                getattr(task, "name", "?"),
                type(exc).__name__,
                exc,
            )

    def count(self) -> int:
        """How many results the file holds, once everything queued is written.

        Blocks; meant for tests and tools.
        """
        if not self._closed:
            request = _Request(_count_rows)
            self._queue.put(request)
            if request.done.wait(60.0):
                if request.error is not None:
                    raise CheckpointError(
                        f"cannot count the results in {self.path}: {request.error}"
                    ) from request.error
                return int(request.result)
        conn = sqlite3.connect(
            f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S
        )
        try:
            return _count_rows(conn)
        finally:
            conn.close()

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (waiting at most ``timeout`` s) and close.

        Idempotent. A warning says how many results did not make it.
        """
        if not self._begin_close():
            return
        request = _Request(None)
        self._queue.put(request)
        if threading.current_thread() is not self._writer:
            request.done.wait(timeout)
        self._report(request.done.is_set())

    async def aclose(self, timeout: float = 10.0) -> None:
        """:meth:`close` without blocking the event loop."""
        if not self._begin_close():
            return
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not finished.done():
                finished.set_result(None)

        def notify() -> None:
            try:
                loop.call_soon_threadsafe(wake)
            except RuntimeError:  # the loop has closed meanwhile
                pass

        self._queue.put(_Request(None, notify))
        try:
            await asyncio.wait_for(asyncio.shield(finished), timeout)
        except asyncio.TimeoutError:
            pass
        self._report(finished.done())

    def _begin_close(self) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._closed = True
        _open_stores.discard(self)
        return True

    def _report(self, finished: bool) -> None:
        lost = self._submitted - self._committed
        if lost > 0:
            log.warning(
                "%d task result(s) were not stored in checkpoint file %s%s; those "
                "tasks run again on a re-run",
                lost,
                self.path,
                "" if finished else " (still waiting for the database when closing)",
            )

    def _warn_once(self, topic: str, message: str, *args: Any) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            log.warning(message, *args)

    def _flush_at_exit(self) -> None:
        if os.getpid() == self._pid:  # not in a forked child: no writer there
            self.close(EXIT_FLUSH_TIMEOUT_S)

    # -- the writer thread -----------------------------------------------------------

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        unwritten: list[_Row] = []
        stop: _Request | None = None
        try:
            while stop is None:
                batch = [self._queue.get()]
                while True:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                for item in batch:
                    if not isinstance(item, _Request):
                        unwritten.append(item)
                        continue
                    # Everything queued before a request is written first.
                    unwritten = self._write(conn, unwritten)
                    if item.function is None:
                        stop = item
                        break
                    try:
                        item.result = item.function(conn)
                    except BaseException as exc:
                        item.error = exc
                    item.done.set()
                unwritten = self._write(conn, unwritten)
        finally:
            try:
                conn.close()
            except Exception:
                pass
            if stop is not None:
                stop.done.set()
                if stop.notify is not None:
                    stop.notify()

    def _write(self, conn: sqlite3.Connection, rows: list[_Row]) -> list[_Row]:
        """Commit ``rows`` in one transaction; return those worth another try."""
        if not rows:
            return rows
        try:
            self._insert(conn, rows)
        except Exception as exc:
            if _is_busy(exc):
                # Another connection holds the lock: keep them for later.
                self._warn_write(exc)
                return rows
            if len(rows) == 1:
                self._warn_write(exc)
                return []
            # One bad row (too big, say) must not sink the others with it.
            kept: list[_Row] = []
            for row in rows:
                kept += self._write(conn, [row])
            return kept
        self._committed += len(rows)
        return []

    def _insert(self, conn: sqlite3.Connection, rows: list[_Row]) -> None:
        keyed = self._keyed
        records = [
            (
                key,
                task,
                kind,
                at,
                encoding,
                payload,
                _mac(keyed, key, kind, encoding, payload),
            )
            for key, task, kind, at, encoding, payload in rows
        ]
        try:
            conn.execute("BEGIN IMMEDIATE")
            # Rows go in chunks, one statement each: the GIL is released once
            # per chunk instead of once per row, so the event loop, which
            # wants it back all the time, stalls the writer far less.
            whole = len(records) - len(records) % _CHUNK
            for start in range(0, whole, _CHUNK):
                chunk = records[start : start + _CHUNK]
                conn.execute(_INSERT_CHUNK, list(itertools.chain.from_iterable(chunk)))
            conn.executemany(_INSERT_ROW, records[whole:])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise

    def _warn_write(self, exc: BaseException) -> None:
        if not self._write_warned:
            self._write_warned = True
            log.warning(
                "cannot write to checkpoint file %s (%s: %s); the run goes on, "
                "and results that cannot be stored run again on a re-run",
                self.path,
                type(exc).__name__,
                exc,
            )


def _count_rows(conn: sqlite3.Connection) -> int:
    query = "SELECT COUNT(DISTINCT key) FROM asyncflow_results"
    return int(conn.execute(query).fetchone()[0])


def _is_busy(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in _SQLITE_BUSY_CODES
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)


def _create(path: Path) -> bool:
    """Make the file 0600 if it does not exist; True if it is new (or empty)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        info = path.stat()
        _check_owner(path, info, "checkpoint file", "choose another checkpoint path")
        if info.st_size:
            return False
        os.chmod(path, 0o600)
    else:
        os.close(fd)
    # A -wal left by a deleted file of the same name would be replayed into
    # this one.
    for suffix in ("-wal", "-shm"):
        try:
            os.unlink(f"{path}{suffix}")
        except FileNotFoundError:
            pass
    return True


def _open(path: Path) -> sqlite3.Connection:
    try:
        fresh = _create(path)
        conn = sqlite3.connect(
            str(path),
            isolation_level=None,
            check_same_thread=False,  # handed over to the writer thread
            timeout=BUSY_TIMEOUT_S,
        )
    except (OSError, sqlite3.Error) as exc:
        raise CheckpointError(f"cannot open checkpoint file {path}: {exc}") from exc
    try:
        if fresh:
            _initialize(conn)
        else:
            problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise CheckpointError(
                    f"checkpoint file {path} is corrupt ({'; '.join(problems[:3])}); "
                    "delete it or choose another checkpoint path (its tasks run "
                    "again)"
                )
        _check_meta(conn, path)
        conn.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise CheckpointError(
            f"{path} is not a usable asyncflow checkpoint ({exc}); refusing to "
            "reuse it: delete it or choose another checkpoint path"
        ) from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _initialize(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS asyncflow_meta (key TEXT PRIMARY KEY, value TEXT)"
    )
    conn.execute(
        # No index on key: lookups are answered from memory, and appending to
        # a table without one is several times cheaper than a random insert.
        "CREATE TABLE IF NOT EXISTS asyncflow_results (key TEXT NOT NULL, "
        "task TEXT NOT NULL, kind TEXT NOT NULL, stored_at REAL NOT NULL, "
        "encoding TEXT NOT NULL, result BLOB NOT NULL, mac BLOB NOT NULL)"
    )
    conn.executemany(
        "INSERT OR IGNORE INTO asyncflow_meta VALUES (?, ?)",
        [("format", FORMAT), ("version", VERSION), ("created", str(time.time()))],
    )
    conn.execute("COMMIT")


def _check_meta(conn: sqlite3.Connection, path: Path) -> None:
    meta = dict(conn.execute("SELECT key, value FROM asyncflow_meta"))
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} was not written by asyncflow (format {meta.get('format')!r}); "
            "refusing to reuse it: choose another checkpoint path"
        )
    version = meta.get("version")
    if version == "1":
        raise CheckpointError(
            f"{path} is a checkpoint of an older asyncflow (format version 1, "
            "whose results are not authenticated); this asyncflow reads version "
            f"{VERSION} only: delete it (its tasks run again) or choose another path"
        )
    if version != VERSION:
        raise CheckpointError(
            f"{path} is an asyncflow checkpoint of version {version!r}; this "
            f"asyncflow reads version {VERSION}: delete it or choose another path"
        )


def _load_rows(
    conn: sqlite3.Connection, path: Path, keyed: _Keyed
) -> tuple[dict[str, tuple[str, bytes]], int]:
    """The authentic rows, by key, and how many were not.

    A key stored again (its old result could not be loaded, say) has several
    rows; the last authentic one counts and the older ones are deleted.
    """
    index: dict[str, tuple[str, bytes]] = {}
    chosen: dict[str, int] = {}
    superseded: list[int] = []
    rejected = 0
    try:
        rows = conn.execute(
            "SELECT rowid, key, kind, encoding, result, mac FROM asyncflow_results "
            "ORDER BY rowid"
        )
        for rowid, key, kind, encoding, payload, mac in rows:
            if (
                type(key) is str
                and type(kind) is str
                and type(encoding) is str
                and type(payload) is bytes
                and type(mac) is bytes
                and hmac.compare_digest(mac, _mac(keyed, key, kind, encoding, payload))
            ):
                index[key] = (encoding, payload)
                earlier = chosen.get(key)
                if earlier is not None:
                    superseded.append(earlier)
                chosen[key] = rowid
            else:
                rejected += 1
    except sqlite3.DatabaseError as exc:
        raise CheckpointError(
            f"{path} is not a usable asyncflow checkpoint ({exc}); refusing to "
            "reuse it: delete it or choose another checkpoint path"
        ) from exc
    if superseded:
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "DELETE FROM asyncflow_results WHERE rowid = ?",
                [(rowid,) for rowid in superseded],
            )
            conn.execute("COMMIT")
        except sqlite3.Error:  # read-only or locked: they do no harm meanwhile
            if conn.in_transaction:
                conn.execute("ROLLBACK")
    return index, rejected


# Results queued by a store nobody closed are written before the interpreter
# exits (daemon threads are stopped without warning at the very end).
_open_stores: set[CheckpointStore] = set()


def _flush_open_stores() -> None:
    for store in list(_open_stores):
        store._flush_at_exit()


atexit.register(_flush_open_stores)
