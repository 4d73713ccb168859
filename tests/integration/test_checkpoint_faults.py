"""The checkpoint store under real faults, and the trust it gives (SPEC §11).

Every fault here is real: a second SQLite connection holding the write lock,
a file size limit (RLIMIT_FSIZE) standing for a full disk, a read-only file,
flipped bytes, a planted malicious pickle, files of another user.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import os
import pickle
import shutil
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from asyncflow import CheckpointError, WorkflowEngine
from asyncflow import checkpoint as checkpoint_module
from asyncflow.checkpoint import CheckpointStore
from asyncflow.tasks import TaskDefinition, TaskFuture, TaskKind

from ..processes import wait_until

LIVENESS = 30.0
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def run_child(
    script: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def finished_task(loop: asyncio.AbstractEventLoop, name: str = "work") -> TaskFuture:
    """A task future as the engine hands it to the store."""

    def work() -> None:
        return None

    work.__name__ = name
    task = TaskFuture(loop=loop)
    task._definition = TaskDefinition(work, TaskKind.FUNCTION, {}, None)
    task.name = name
    task.uid = "task.000000"
    return task


# -- a locked, full or read-only database ---------------------------------------------


class Recorder(logging.Handler):
    """Appends the warnings it sees to a shared list of events."""

    def __init__(self, events: list[tuple[str, ...]]) -> None:
        super().__init__(logging.WARNING)
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append(("warning", record.getMessage()))


async def test_a_database_locked_by_another_connection_never_stalls_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpoint_module, "BUSY_TIMEOUT_S", 1.5)
    db = tmp_path / "run.db"
    flow = await WorkflowEngine.create(checkpoint=db)
    blocker = sqlite3.connect(db, isolation_level=None, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")
    events: list[tuple[str, ...]] = []
    recorder = Recorder(events)
    logging.getLogger("asyncflow.checkpoint").addHandler(recorder)
    loop = asyncio.get_running_loop()
    beating = True

    def beat() -> None:
        events.append(("tick",))
        if beating:
            loop.call_later(0.01, beat)

    beat()
    try:

        @flow.function_task
        def square(i: int) -> int:
            return i * i

        futs = [square(i) for i in range(50)]
        results = await asyncio.wait_for(asyncio.gather(*futs), LIVENESS)
        finished = len(events)
        assert results == [i * i for i in range(50)]
        assert all(f.state == "DONE" for f in futs)
        # The writer thread is still waiting for the lock: nothing warned yet.
        assert not [e for e in events[:finished] if e[0] == "warning"]

        await wait_until(
            lambda: any(e[0] == "warning" for e in events), "the write warning"
        )
        at = next(i for i, e in enumerate(events) if e[0] == "warning")
        assert str(db) in events[at][1]
        # The loop kept its heartbeat all the while the writer waited.
        assert sum(e[0] == "tick" for e in events[finished:at]) >= 10
    finally:
        beating = False
        logging.getLogger("asyncflow.checkpoint").removeHandler(recorder)
        blocker.execute("ROLLBACK")
        blocker.close()
    # Results that met the lock were kept and are written once it is free.
    await flow.shutdown()
    store = CheckpointStore(db)
    try:
        assert store.count() == 50
    finally:
        store.close()


FULL_DISK = """
    import asyncio, logging, os, resource, signal, sys
    from asyncflow import WorkflowEngine

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    db = sys.argv[1]

    async def main():
        async with await WorkflowEngine.create(checkpoint=db) as flow:
            # A file size limit fails writes the way a full disk does.
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (128 * 1024, 128 * 1024))

            @flow.function_task
            def big(i):
                return bytes([i]) * 200_000

            results = await asyncio.gather(*[big(i) for i in range(20)])
            assert all(r == bytes([i]) * 200_000 for i, r in enumerate(results))
            print("finished", len(results))

    asyncio.run(main())
"""


def test_a_full_disk_loses_results_not_the_run(tmp_path: Path) -> None:
    db = tmp_path / "run.db"
    done = run_child(FULL_DISK, str(db))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "finished 20\n"
    assert f"cannot write to checkpoint file {db}" in done.stderr
    assert f"were not stored in checkpoint file {db}" in done.stderr
    assert done.stderr.count("cannot write to checkpoint file") == 1


def make_read_only(path: Path) -> Callable[[], None]:
    """Make ``path`` read-only even for root; return what undoes it."""
    if not IS_ROOT:
        path.chmod(0o400)
        return lambda: path.chmod(0o600)
    # chmod does not stop root: the immutable attribute does, where allowed.
    chattr = shutil.which("chattr")
    if chattr and subprocess.run([chattr, "+i", str(path)]).returncode == 0:
        return lambda: subprocess.run([chattr, "-i", str(path)], check=True) and None
    pytest.skip(
        "running as root, where chmod 0400 does not stop writes, without chattr +i"
    )


async def test_a_read_only_checkpoint_restores_and_the_run_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "run.db"
    ran: list[int] = []

    async def campaign(inputs: list[int]) -> list[bool]:
        async with await WorkflowEngine.create(checkpoint=db) as flow:

            @flow.function_task
            def simulate(x: int) -> int:
                ran.append(x)
                return x * 10

            futs = [simulate(x) for x in inputs]
            assert await asyncio.wait_for(asyncio.gather(*futs), LIVENESS) == [
                x * 10 for x in inputs
            ]
            return [f.restored for f in futs]

    assert await campaign([1, 2]) == [False, False]
    undo = make_read_only(db)
    try:
        with caplog.at_level(logging.WARNING, logger="asyncflow"):
            assert await campaign([1, 2, 3]) == [True, True, False]
    finally:
        undo()
    assert ran == [1, 2, 3]
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"cannot write to checkpoint file {db}" in m for m in messages)
    assert any("1 task result(s) were not stored" in m for m in messages)


# -- files that must not be used ------------------------------------------------------


def fill(db: Path, rows: int) -> None:
    """A checkpoint file with ``rows`` results, closed."""
    loop = asyncio.new_event_loop()
    try:
        store = CheckpointStore(db)
        task = finished_task(loop)
        for i in range(rows):
            store.store(f"key-{i}", task, f"result {i} " * 20)
        store.close()
    finally:
        loop.close()


def test_a_checkpoint_with_flipped_bytes_is_refused_at_open(tmp_path: Path) -> None:
    db = tmp_path / "run.db"
    fill(db, 2_000)
    data = bytearray(db.read_bytes())
    page = 4096
    middle = len(data) // 2 // page * page
    data[middle : middle + page] = bytes(b ^ 0xFF for b in data[middle : middle + page])
    db.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="delete it or choose another") as error:
        CheckpointStore(db)
    assert str(db) in str(error.value)


def test_a_version_1_checkpoint_is_refused_with_what_to_do(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE asyncflow_meta (key TEXT PRIMARY KEY, value TEXT)")
        conn.execute(
            "CREATE TABLE asyncflow_results (key TEXT PRIMARY KEY, task TEXT, "
            "kind TEXT, stored_at REAL, result BLOB)"
        )
        conn.executemany(
            "INSERT INTO asyncflow_meta VALUES (?, ?)",
            [("format", "asyncflow-checkpoint"), ("version", "1")],
        )
    conn.close()
    with pytest.raises(CheckpointError, match=r"version 1.*delete it"):
        CheckpointStore(db)


class Exploit:
    """Unpickling this creates the file it names."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


async def _answer(db: Path, ran: list[str]) -> tuple[int, bool]:
    async with await WorkflowEngine.create(checkpoint=db) as flow:

        @flow.function_task
        def answer() -> int:
            ran.append("answer")
            return 42

        fut = answer()
        return await asyncio.wait_for(fut, LIVENESS), fut.restored


def _key_of_the_only_row(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        [(key,)] = conn.execute("SELECT key FROM asyncflow_results").fetchall()
    conn.close()
    return str(key)


async def test_a_planted_pickle_is_never_loaded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[str] = []
    probe = tmp_path / "probe.db"
    assert await _answer(probe, ran) == (42, False)
    key = _key_of_the_only_row(probe)

    # Someone else's file: the documented format, the right key, a payload
    # that runs code when unpickled, authenticated with a key not ours.
    planted = tmp_path / "planted.db"
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Exploit(marker))
    mac = hmac.new(b"not the user's key" * 2, payload, hashlib.sha256).digest()
    with sqlite3.connect(planted) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE asyncflow_meta (key TEXT PRIMARY KEY, value TEXT)")
        conn.execute(
            "CREATE TABLE asyncflow_results (key TEXT PRIMARY KEY, task TEXT NOT "
            "NULL, kind TEXT NOT NULL, stored_at REAL NOT NULL, encoding TEXT NOT "
            "NULL, result BLOB NOT NULL, mac BLOB NOT NULL)"
        )
        conn.executemany(
            "INSERT INTO asyncflow_meta VALUES (?, ?)",
            [("format", "asyncflow-checkpoint"), ("version", "2"), ("created", "0")],
        )
        conn.execute(
            "INSERT INTO asyncflow_results VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key, "answer", "function", time.time(), "pickle", payload, mac),
        )
    conn.close()
    pickle.loads(payload).close()
    assert marker.exists()  # the payload is armed
    marker.unlink()

    with caplog.at_level(logging.WARNING, logger="asyncflow"):
        assert await _answer(planted, ran) == (42, False)
    assert not marker.exists()
    assert ran == ["answer", "answer"]
    messages = [r.getMessage() for r in caplog.records]
    assert any(str(planted) in m and "1 result(s)" in m for m in messages)


async def test_a_result_edited_after_it_was_stored_is_recomputed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "run.db"
    ran: list[str] = []
    assert await _answer(db, ran) == (42, False)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE asyncflow_results SET result = ?", (b"666",))
    conn.close()
    with caplog.at_level(logging.WARNING, logger="asyncflow"):
        assert await _answer(db, ran) == (42, False)
    assert ran == ["answer", "answer"]
    assert any(str(db) in r.getMessage() for r in caplog.records)
    # The recomputed result replaced the edited one.
    assert await _answer(db, ran) == (42, True)


# -- permissions and ownership ---------------------------------------------------------


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.parametrize("where", ["XDG_CONFIG_HOME", "HOME"])
async def test_new_checkpoint_and_key_files_are_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask_022: None, where: str
) -> None:
    monkeypatch.delenv("ASYNCFLOW_KEY_FILE")
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    if where == "HOME":
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        key_dir = tmp_path / "home" / ".config" / "asyncflow"
    else:
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
        key_dir = tmp_path / "config" / "asyncflow"
    db = tmp_path / "run.db"
    async with await WorkflowEngine.create(checkpoint=db) as flow:

        @flow.function_task
        def work() -> int:
            return 1

        await work()
        assert mode(db) == 0o600
        for suffix in ("-wal", "-shm"):
            side = Path(f"{db}{suffix}")
            assert not side.exists() or mode(side) == 0o600
    assert mode(db) == 0o600
    assert mode(key_dir) == 0o700
    assert mode(key_dir / "checkpoint.key") == 0o600


def test_a_key_file_others_can_read_is_refused(
    tmp_path: Path, checkpoint_key_file: Path
) -> None:
    CheckpointStore(tmp_path / "run.db").close()
    checkpoint_key_file.chmod(0o644)
    try:
        with pytest.raises(CheckpointError, match=r"chmod 600"):
            CheckpointStore(tmp_path / "run.db")
    finally:
        checkpoint_key_file.chmod(0o600)


@pytest.mark.skipif(not IS_ROOT, reason="only root can give a file to another user")
def test_files_of_another_user_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nobody = 65534
    db = tmp_path / "run.db"
    CheckpointStore(db).close()
    os.chown(db, nobody, nobody)
    with pytest.raises(CheckpointError, match=f"{db} is owned by uid {nobody}"):
        CheckpointStore(db)

    key = tmp_path / "foreign.key"
    monkeypatch.setenv("ASYNCFLOW_KEY_FILE", str(key))
    CheckpointStore(tmp_path / "other.db").close()
    os.chown(key, nobody, nobody)
    with pytest.raises(CheckpointError, match=f"{key} is owned by uid {nobody}"):
        CheckpointStore(tmp_path / "other.db")


RACE = """
    import asyncio, sys, time
    from asyncflow import WorkflowEngine

    start = float(sys.argv[2])
    time.sleep(max(0.0, start - time.time()))

    async def main():
        async with await WorkflowEngine.create(checkpoint=sys.argv[1]) as flow:

            @flow.function_task
            def work():
                return "stored"

            await work()

    asyncio.run(main())
"""


def test_processes_racing_to_make_the_key_agree_on_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    key = tmp_path / "keys" / "checkpoint.key"
    monkeypatch.setenv("ASYNCFLOW_KEY_FILE", str(key))
    start = str(time.time() + 1.5)  # after every child has imported asyncflow
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(RACE),
                str(tmp_path / f"{i}.db"),
                start,
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(6)
    ]
    for child in children:
        _, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
    with caplog.at_level(logging.WARNING, logger="asyncflow"):
        for i in range(6):
            store = CheckpointStore(tmp_path / f"{i}.db")
            store.close()
    # Every row verifies under the one key on disk.
    assert not caplog.records


# -- what is stored, and when ----------------------------------------------------------


PLAIN = {
    "plain": {"a": [1, 2.5, None, True, "x\udcff"], "b": {"c": []}},
    "text": "caf\u00e9 \ud800",
    "number": -0.0,
    "tuple": (1, 2),
    "int keys": {1: "a"},
    "nan": [float("nan")],
    "huge int": 10**5000,
    "subclass": [True, type("Text", (str,), {})("s")],
}
EXPECTED_ENCODING = {
    "plain": "json",
    "text": "json",
    "number": "json",
    "tuple": "pickle",
    "int keys": "pickle",
    "nan": "pickle",
    "huge int": "pickle",
    "subclass": "pickle",
}


def same(a: Any, b: Any) -> bool:
    """Equal, with identical types all the way down (NaN equal to NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


def test_rows_are_signed_as_the_format_says(
    tmp_path: Path, loop, checkpoint_key_file: Path
) -> None:
    """docs/reliability.md's MAC, recomputed with the standard library."""
    db = tmp_path / "run.db"
    store = CheckpointStore(db)
    store.store("some-key", finished_task(loop), {"answer": 42})
    store.close()
    with sqlite3.connect(db) as conn:
        [row] = conn.execute(
            "SELECT key, kind, encoding, result, mac FROM asyncflow_results"
        ).fetchall()
    conn.close()
    key, kind, encoding, result, mac = row
    assert (key, kind, encoding, result) == (
        "some-key",
        "function",
        "json",
        b'{"answer":42}',
    )
    message = b"asyncflow-checkpoint-2"
    for field in (key.encode(), kind.encode(), encoding.encode(), result):
        message += len(field).to_bytes(8, "little") + field
    secret = bytes.fromhex(checkpoint_key_file.read_text().strip())
    assert mac == hmac.new(secret, message, hashlib.sha256).digest()


def test_plain_results_are_json_and_come_back_identical(tmp_path: Path, loop) -> None:
    db = tmp_path / "run.db"
    store = CheckpointStore(db)
    for name, value in PLAIN.items():
        store.store(name, finished_task(loop, name), value)
    store.close()
    with sqlite3.connect(db) as conn:
        encodings = dict(conn.execute("SELECT key, encoding FROM asyncflow_results"))
        [plain] = conn.execute(
            "SELECT result FROM asyncflow_results WHERE key = 'plain'"
        ).fetchone()
    conn.close()
    assert encodings == EXPECTED_ENCODING
    assert json.loads(plain) == PLAIN["plain"]
    store = CheckpointStore(db)
    try:
        for name, value in PLAIN.items():
            found, restored = store.lookup(name)
            assert found
            assert same(restored, value), name
    finally:
        store.close()


def test_a_result_is_stored_as_it_was_when_it_finished(tmp_path: Path, loop) -> None:
    db = tmp_path / "run.db"
    store = CheckpointStore(db)
    value = {"items": [1, 2]}
    store.store("k", finished_task(loop), value)
    value["items"].append(3)
    assert store.count() == 1  # count waits for what was queued
    store.close()
    store.close()  # idempotent
    store.store("late", finished_task(loop), 1)  # after close: ignored
    store = CheckpointStore(db)
    try:
        assert store.lookup("k") == (True, {"items": [1, 2]})
        assert store.lookup("late") == (False, None)
    finally:
        store.close()


async def test_aclose_writes_what_is_queued(tmp_path: Path, loop) -> None:
    db = tmp_path / "run.db"
    store = await asyncio.to_thread(CheckpointStore, db)
    for i in range(500):
        store.store(f"k{i}", finished_task(loop), i)
    await store.aclose()
    await store.aclose()
    store = CheckpointStore(db)
    try:
        assert store.count() == 500
    finally:
        store.close()


EXIT_WITHOUT_CLOSE = """
    import asyncio, sys
    from asyncflow.checkpoint import CheckpointStore
    from asyncflow.tasks import TaskDefinition, TaskFuture, TaskKind

    def work():
        return None

    loop = asyncio.new_event_loop()
    task = TaskFuture(loop=loop)
    task._definition = TaskDefinition(work, TaskKind.FUNCTION, {}, None)
    task.name, task.uid = "work", "task.000000"
    store = CheckpointStore(sys.argv[1])
    for i in range(300):
        store.store(f"k{i}", task, "x" * 1000)
    # No close(): the interpreter's exit must still write them.
"""


def test_results_queued_when_the_program_ends_are_written(tmp_path: Path) -> None:
    db = tmp_path / "run.db"
    done = run_child(EXIT_WITHOUT_CLOSE, str(db))
    assert done.returncode == 0, done.stderr
    store = CheckpointStore(db)
    try:
        assert store.count() == 300
    finally:
        store.close()


# -- keys, end to end ----------------------------------------------------------


async def test_closures_and_lambdas_never_restore_each_others_results(
    tmp_path: Path,
) -> None:
    db = tmp_path / "run.db"
    results = []
    for pick in (0, 1):
        for factor in (2, 3):
            async with await WorkflowEngine.create(checkpoint=db) as flow:
                bodies = (lambda: "one"), (lambda: "two")

                def scale(x: int) -> int:
                    return x * factor  # noqa: B023 - the point of the test

                results.append(await flow.function_task(bodies[pick])())
                results.append(await flow.function_task(scale)(10))
    assert results == ["one", 20, "one", 30, "two", 20, "two", 30]


async def test_an_argument_nested_10000_deep_runs_uncached_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    deep: list[Any] = []
    for _ in range(10_000):
        deep = [deep]
    db = tmp_path / "run.db"
    ran = []
    with caplog.at_level(logging.WARNING, logger="asyncflow"):
        for _ in range(2):
            async with await WorkflowEngine.create(checkpoint=db) as flow:

                @flow.function_task
                def measure(value: list[Any]) -> str:
                    ran.append(1)
                    return "measured"

                fut = measure(deep)
                assert await asyncio.wait_for(fut, LIVENESS) == "measured"
                assert not fut.restored
    assert len(ran) == 2
    assert any(
        "'measure' has no stable cache key" in r.getMessage() for r in caplog.records
    )


async def test_cache_key_and_version_decide_what_is_reused(tmp_path: Path) -> None:
    db = tmp_path / "run.db"
    calls: list[str] = []

    async def run(version: str, factor: int) -> list[bool]:
        async with await WorkflowEngine.create(checkpoint=db) as flow:

            @flow.function_task(cache_key=lambda url, session: url)
            def fetch(url: str, session: object) -> str:
                calls.append(f"fetch {url}")
                return url.upper()

            @flow.function_task(version=version)
            def solve(x: int) -> int:
                calls.append(f"solve {version}")
                return x * factor

            futs = [fetch("a", object()), solve(1)]
            await asyncio.gather(*futs)
            return [f.restored for f in futs]

    assert await run("1", 2) == [False, False]
    # A new session object, and a body whose closure changed, but the same
    # cache_key and version: both are reused.
    assert await run("1", 3) == [True, True]
    assert await run("2", 3) == [True, False]
    assert calls == ["fetch a", "solve 1", "solve 2"]


CONSTANT = """
    import asyncio, sys
    from asyncflow import WorkflowEngine

    FACTOR = {factor}

    def helper(x):
        return x * FACTOR

    async def main():
        async with await WorkflowEngine.create(checkpoint=sys.argv[1]) as flow:

            @flow.function_task
            def scale(x):
                return helper(x)

            fut = scale(10)
            print(await fut, fut.restored)

    asyncio.run(main())
"""


def test_a_changed_module_constant_is_noticed_by_the_next_run(
    tmp_path: Path,
) -> None:
    db = tmp_path / "run.db"
    outputs = [
        run_child(CONSTANT.format(factor=factor), str(db), env={"PYTHONHASHSEED": seed})
        for factor, seed in [(2, "1"), (3, "2"), (2, "3")]
    ]
    for done in outputs:
        assert done.returncode == 0, done.stderr
    assert [d.stdout for d in outputs] == ["20 False\n", "30 False\n", "20 True\n"]
