"""Drop-in parity with RADICAL AsyncFlow 0.6: what its own tests, examples
and published pages use, written the way they write it."""

from __future__ import annotations

import asyncio
import functools
import http.server
import inspect
import json
import logging
import os
import shutil
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from asyncflow import (
    DRY_RUN_RESULT,
    ConcurrentExecutionBackend,
    ExecutableError,
    InputFile,
    LocalExecutionBackend,
    NoopExecutionBackend,
    OutputFile,
    WorkflowEngine,
)
from asyncflow.backends import DRY_RUN_PROMPT_RESULT
from asyncflow.logging import init_default_logger

from ..processes import carrying, wait_until

# -- dry runs -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_dry_run_prompt_task_returns_dummy_prompt_output() -> None:
    flow = await WorkflowEngine.create(dry_run=True)

    @flow.prompt_task
    async def summarize(text: str) -> str:
        return f"Summarize: {text}"

    @flow.function_task
    async def compute() -> int:
        raise AssertionError("a dry run never calls a function body")

    @flow.executable_task
    async def list_files() -> str:
        return "ls -l"

    assert await summarize("doc") == DRY_RUN_PROMPT_RESULT == "Dummy Prompt Output"
    assert await compute() == DRY_RUN_RESULT == "Dummy Output"
    assert await list_files() == "Dummy Output"
    await flow.shutdown()


@pytest.mark.asyncio
async def test_noop_backend_routed_for_prompts() -> None:
    # The shape of RADICAL AsyncFlow's 04-concurrent_backends example.
    compute = await LocalExecutionBackend(ThreadPoolExecutor(2), name="compute")
    ai = NoopExecutionBackend(name="ai")
    flow = await WorkflowEngine.create(backend=[compute, ai])

    @flow.function_task(backend="compute")
    async def preprocess(doc: str) -> str:
        return doc.upper()

    @flow.prompt_task(backend="ai")
    async def summarize(text: str) -> str:
        return f"Summarize: {text}"

    cleaned = preprocess("report")
    summary = summarize(cleaned)
    assert await summary == "Dummy Prompt Output"
    assert summary.command == "Summarize: REPORT"
    await flow.shutdown()


# -- shutdown(skip_execution_backend=True) -----------------------------------------


@pytest.mark.asyncio
async def test_shutdown_skip_execution_backend_leaves_backend_running() -> None:
    backend = await LocalExecutionBackend(ThreadPoolExecutor(2))
    flow = await WorkflowEngine.create(backend=backend)

    started, gate = threading.Event(), threading.Event()

    @flow.function_task
    def blocked() -> str:
        started.set()
        gate.wait(30)
        return "late"

    @flow.function_task
    async def quick() -> int:
        return 1

    assert await quick() == 1
    pending = blocked()
    assert await asyncio.to_thread(started.wait, 10)
    await flow.shutdown(skip_execution_backend=True)

    # The engine is done: its unfinished task is cancelled, no new task runs.
    assert pending.cancelled()
    with pytest.raises(asyncio.CancelledError):
        await pending
    with pytest.raises(RuntimeError, match="shut down"):
        quick()
    # The backend is not: its pool still takes work, while the stuck body runs.
    assert backend.executor.submit(lambda: 7).result(timeout=10) == 7
    gate.set()

    # Released from the first engine, it serves a second one.
    again = await WorkflowEngine.create(backend=backend)

    @again.function_task
    async def double(x: int) -> int:
        return 2 * x

    assert await double(21) == 42
    await again.shutdown()
    with pytest.raises(RuntimeError):
        backend.executor.submit(lambda: 7)


@pytest.mark.asyncio
async def test_shutdown_default_shuts_the_backend_down() -> None:
    backend = await LocalExecutionBackend(ThreadPoolExecutor(2))
    flow = await WorkflowEngine.create(backend=backend)
    await flow.shutdown(skip_execution_backend=False)
    with pytest.raises(RuntimeError):
        backend.executor.submit(lambda: 7)


@pytest.mark.asyncio
async def test_shutdown_skip_execution_backend_on_rhapsody_backend() -> None:
    rhapsody = pytest.importorskip("rhapsody.backends")
    inner = await rhapsody.ConcurrentExecutionBackend(ThreadPoolExecutor(2))
    flow = await WorkflowEngine.create(backend=inner)

    @flow.function_task
    async def ping() -> str:
        return "pong"

    assert await ping() == "pong"
    await flow.shutdown(skip_execution_backend=True)
    assert inner.executor.submit(lambda: 3).result(timeout=10) == 3
    await inner.shutdown()
    with pytest.raises(RuntimeError):
        inner.executor.submit(lambda: 3)


# -- capture_stdio: one naming scheme on every backend --------------------------


async def _rhapsody_concurrent() -> Any:
    rhapsody = pytest.importorskip("rhapsody.backends")
    return await rhapsody.ConcurrentExecutionBackend(ThreadPoolExecutor(2))


@pytest.mark.asyncio
async def test_capture_stdio_on_rhapsody_backend(tmp_path: Path) -> None:
    backend = await _rhapsody_concurrent()
    flow = await WorkflowEngine.create(
        backend=backend, uid="test-wf", work_dir=str(tmp_path)
    )

    @flow.executable_task(capture_stdio=True)
    async def say_hello() -> str:
        return "/bin/bash -c 'echo hello; echo to-stderr >&2'"

    @flow.executable_task(capture_stdio=True)
    async def broken() -> str:
        return "echo partial; echo oops >&2; exit 4"

    fut = say_hello()
    stdout_path = await fut
    assert isinstance(stdout_path, str)
    assert stdout_path == str(tmp_path / "test-wf" / f"{fut.uid}-{flow.run_id}.out")
    assert Path(stdout_path).read_text() == "hello\n"
    stderr_path = Path(stdout_path).with_suffix(".err")
    assert stderr_path.read_text() == "to-stderr\n"
    for path in (Path(stdout_path), stderr_path, tmp_path / "test-wf"):
        assert path.stat().st_mode & 0o077 == 0, path  # private to the user

    with pytest.raises(ExecutableError, match="code 4") as info:
        await broken()
    assert info.value.stdout == "partial\n"
    assert info.value.stderr == "oops\n"

    await flow.shutdown()
    # Only the common names remain: the inner backend's own files are gone.
    assert sorted(p.suffix for p in (tmp_path / "test-wf").iterdir()) == [
        ".err",
        ".err",
        ".out",
        ".out",
    ]


@pytest.mark.asyncio
async def test_capture_stdio_retry_on_rhapsody_backend(tmp_path: Path) -> None:
    flow = await WorkflowEngine.create(
        backend=await _rhapsody_concurrent(), uid="wf", work_dir=tmp_path
    )
    marker = tmp_path / "ran-once"

    @flow.executable_task(capture_stdio=True, retries=1)
    async def flaky() -> str:
        return f"if [ -e {marker} ]; then echo second; else touch {marker}; exit 1; fi"

    fut = flaky()
    path = Path(await fut)
    assert fut.attempts == 2
    assert path.read_text() == "second\n"
    assert path == tmp_path / "wf" / f"{fut.uid}-{flow.run_id}.out"
    await flow.shutdown()


@pytest.mark.asyncio
async def test_capture_stdio_on_rhapsody_dask_backend(tmp_path: Path) -> None:
    rhapsody = pytest.importorskip("rhapsody.backends")
    pytest.importorskip("distributed")
    backend = await rhapsody.DaskExecutionBackend(
        {"n_workers": 1, "threads_per_worker": 1, "processes": False}
    )
    flow = await WorkflowEngine.create(
        backend=backend, uid="dask-wf", work_dir=tmp_path
    )

    @flow.executable_task(capture_stdio=True)
    async def greet(name: str) -> str:
        return f"echo hello {name}; echo note >&2"

    fut = greet("dask")
    path = Path(await fut)
    assert path == tmp_path / "dask-wf" / f"{fut.uid}-{flow.run_id}.out"
    assert path.read_text() == "hello dask\n"
    assert path.with_suffix(".err").read_text() == "note\n"
    await flow.shutdown()


async def _shout(word: str) -> str:
    return f"echo {word}"


@pytest.mark.asyncio
async def test_capture_stdio_names_match_across_backends(tmp_path: Path) -> None:
    """The same call names the same files on asyncflow's and RHAPSODY's
    backends: per run without a checkpoint, per cache key with one."""
    made = [
        await LocalExecutionBackend(ThreadPoolExecutor(2)),
        await _rhapsody_concurrent(),
    ]
    plain, cached = [], []
    for i, backend in enumerate(made):
        flow = await WorkflowEngine.create(
            backend=backend,
            uid="campaign",
            work_dir=tmp_path,
            checkpoint=tmp_path / f"run-{i}.db",
        )
        shout = flow.executable_task(capture_stdio=True)(_shout)
        uncached = flow.executable_task(capture_stdio=True, cache=False)(_shout)
        fut = uncached("hi")
        plain.append((Path(await fut), fut.uid, flow.run_id))
        cached.append(Path(await shout("hello")))
        await flow.shutdown()
    for path, uid, run_id in plain:
        assert path == tmp_path / "campaign" / f"{uid}-{run_id}.out"
        assert path.read_text() == "hi\n"
    assert cached[0] == cached[1]
    assert cached[0].name.startswith("_shout-")
    assert cached[0].read_text() == "hello\n"


# -- InputFile / OutputFile ---------------------------------------------------------


def test_file_constructor_signatures() -> None:
    assert list(inspect.signature(InputFile).parameters) == ["file"]
    assert list(inspect.signature(OutputFile).parameters) == ["filename"]


def test_input_file_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.csv").write_text("a,b\n")

    local = InputFile("data.csv")
    assert local.local_file == "data.csv"
    assert local.filepath == tmp_path / "data.csv"
    assert local.filename == "data.csv"
    assert os.fspath(local) == str(tmp_path / "data.csv") == str(local)

    via_url = InputFile((tmp_path / "data.csv").as_uri())
    assert via_url.filepath == tmp_path / "data.csv"

    produced = InputFile("sub/result.txt")  # another task's output, not yet there
    assert produced.other_task_file == "sub/result.txt"
    assert produced.filepath == Path("sub/result.txt")
    assert produced.filename == "result.txt"

    with pytest.raises(ValueError, match="s3://"):
        InputFile("s3://bucket/key.csv")
    with pytest.raises(FileNotFoundError):
        InputFile((tmp_path / "missing.csv").as_uri())
    with pytest.raises(ValueError, match="needs a path"):
        InputFile("")


def test_output_file_validation() -> None:
    assert OutputFile("path/to/result.txt").filename == "result.txt"
    assert OutputFile("path/to/result.txt").filepath == Path("path/to/result.txt")
    with pytest.raises(ValueError, match="cannot be empty"):
        OutputFile("")
    with pytest.raises(ValueError, match="does not include a file"):
        OutputFile("path/")


@pytest.fixture
def web_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTP server on loopback serving the folder it yields."""
    root = tmp_path / "served"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_input_file_downloads_a_url(
    web_root: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, root = web_root
    (root / "table.txt").write_text("remote rows\n")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)

    remote = InputFile(f"{base}/table.txt")
    assert remote.remote_url == f"{base}/table.txt"
    assert remote.filepath == work / "table.txt"
    assert remote.filepath.read_text() == "remote rows\n"

    with pytest.raises(OSError, match="404"):
        InputFile(f"{base}/absent.txt")
    assert sorted(p.name for p in work.iterdir()) == ["table.txt"]  # no partial file


@pytest.mark.asyncio
async def test_files_are_paths_in_task_bodies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.txt").write_text("x y z\n")
    backend = await LocalExecutionBackend(ThreadPoolExecutor(2))
    flow = await WorkflowEngine.create(backend=backend)

    @flow.executable_task
    async def count(source: InputFile, target: OutputFile) -> str:
        return f"wc -w < {source} > {target}"

    @flow.function_task
    async def read(dep: str, source: InputFile) -> int:
        with open(source) as f:
            return int(f.read())

    done = count(InputFile("in.txt"), OutputFile("count.txt"))
    assert await read(done, InputFile("count.txt")) == 3
    await flow.shutdown()


@pytest.mark.asyncio
async def test_files_staged_on_a_rhapsody_backend_that_links_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A RHAPSODY backend that declares data linking (as RADICAL-Pilot's
    does) gets each task's files through its linking hooks."""
    rhapsody = pytest.importorskip("rhapsody.backends")

    class SandboxBackend(rhapsody.ConcurrentExecutionBackend):  # type: ignore[misc, name-defined]
        """Runs each command in a sandbox of its own under ``pilot``, staged
        from ``input_staging`` the way RADICAL-Pilot reads it."""

        supports_explicit_data_linking = True
        supports_implicit_data_linking = True

        def __init__(self, pilot: Path) -> None:
            super().__init__(ThreadPoolExecutor(2))
            self.pilot = pilot

        def link_explicit_data_deps(
            self,
            src_task: dict[str, Any] | None = None,
            dst_task: dict[str, Any] | None = None,
            file_name: str | None = None,
            file_path: str | None = None,
        ) -> dict[str, str]:
            assert dst_task is not None
            assert file_name is not None
            source = file_path or f"pilot:///{src_task['uid']}/{file_name}"  # type: ignore[index]
            staged = {"source": source, "target": f"task:///{file_name}"}
            kwargs = dst_task["task_backend_specific_kwargs"]
            kwargs.setdefault("input_staging", []).append(staged)
            return staged

        def link_implicit_data_deps(
            self, src_task: dict[str, Any], dst_task: dict[str, Any]
        ) -> None:
            kwargs = dst_task["task_backend_specific_kwargs"]
            kwargs.setdefault("link_all_of", []).append(src_task["uid"])

        async def _execute_command(self, task: dict[str, Any]) -> Any:
            kwargs = task["task_backend_specific_kwargs"]
            sandbox = self.pilot / task["uid"]
            sandbox.mkdir()
            for staged in kwargs.get("input_staging", []):
                target = sandbox / staged["target"].removeprefix("task:///")
                source = staged["source"]
                if source.startswith("pilot:///"):
                    target.symlink_to(self.pilot / source.removeprefix("pilot:///"))
                else:
                    shutil.copy(source, target)
            for uid in kwargs.get("link_all_of", []):
                for produced in (self.pilot / uid).iterdir():
                    (sandbox / produced.name).symlink_to(produced)
            kwargs["cwd"] = str(sandbox)
            return await super()._execute_command(task)

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.txt").write_text("7\n")
    pilot = tmp_path / "pilot"
    pilot.mkdir()
    flow = await WorkflowEngine.create(backend=await SandboxBackend(pilot))

    @flow.executable_task
    async def simulate(params: InputFile, result: OutputFile) -> str:
        # Names relative to the sandbox: only staging puts the file there.
        return f"echo $(( $(cat {params.filename}) * 6 )) > {result.filename}"

    @flow.executable_task
    async def analyse(dep: str, result: InputFile) -> str:
        return f"cat {result.filename}"

    @flow.executable_task
    async def scratch() -> str:
        return "echo untracked > notes.txt"

    @flow.executable_task
    async def read_notes(dep: str) -> str:
        return "cat notes.txt"

    produced = simulate(InputFile("params.txt"), OutputFile("result.txt"))
    assert (await analyse(produced, InputFile("result.txt"))).strip() == "42"
    # A dependency that declares no OutputFile lends all its files.
    assert (await read_notes(scratch())).strip() == "untracked"
    await flow.shutdown()


# -- init_default_logger ------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    logging.captureWarnings(False)


def test_init_default_logger_has_radicals_parameters() -> None:
    parameters = inspect.signature(init_default_logger).parameters
    assert list(parameters) == [
        "log_level",
        "output_file",
        "file_log_level",
        "use_colors",
        "show_details",
        "style",
        "clear_handlers",
        "logger_name",
        "structured_logging",
        "structured_file",
    ]
    assert parameters["log_level"].default == logging.INFO


@pytest.mark.asyncio
async def test_init_default_logger_configures_the_root_logger(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    log_file = tmp_path / "logs" / "run.log"
    root = init_default_logger(
        logging.DEBUG, output_file=log_file, structured_logging=True
    )
    assert root is logging.getLogger()
    init_default_logger(logging.DEBUG, output_file=log_file, structured_logging=True)

    async with await WorkflowEngine.create() as flow:

        @flow.function_task
        async def hello() -> str:
            return "hi"

        assert await hello() == "hi"
    logging.getLogger("my.script").info("done %d", 1, extra={"run": "r1"})
    warnings.warn("old API", UserWarning, stacklevel=1)

    text = log_file.read_text()
    assert "[engine]" in text
    assert "shut down" in text
    assert text.count("done 1") == 1  # a second call replaced, not doubled
    assert "old API" in text
    console = capsys.readouterr()
    assert "done 1" in console.err
    assert "done 1" not in console.out
    assert "\033[" not in console.err  # no colour codes when not a terminal

    lines = [json.loads(line) for line in log_file.with_suffix(".json").open()]
    done = [line for line in lines if line["message"] == "done 1"]
    assert done == [
        {
            "timestamp": done[0]["timestamp"],
            "level": "INFO",
            "logger": "my.script",
            "message": "done 1",
            "run": "r1",
        }
    ]


def test_init_default_logger_named_logger_and_levels(
    tmp_path: Path, restore_logging: None
) -> None:
    root_handlers = list(logging.getLogger().handlers)
    log_file = tmp_path / "named.log"
    named = init_default_logger(
        "WARNING",
        output_file=log_file,
        file_log_level=logging.DEBUG,
        logger_name="pipeline",
        show_details=True,
        clear_handlers=True,
    )
    assert named is logging.getLogger("pipeline")
    assert logging.getLogger().handlers == root_handlers  # the root is untouched
    named.debug("fine detail")
    (line,) = log_file.read_text().splitlines()
    assert f"PID:{os.getpid()}]" in line
    assert line.endswith("DEBUG │ [pipeline] │ fine detail")

    minimal = tmp_path / "minimal.log"
    init_default_logger(output_file=minimal, logger_name="pipeline", style="minimal")
    named.info("short")
    named.debug("below the level")
    assert minimal.read_text().splitlines() == ["INFO [pipeline] short"]

    with pytest.raises(ValueError, match="unknown logging style 'fancy'"):
        init_default_logger(style="fancy", logger_name="pipeline")
    with pytest.raises(ValueError, match="log_level"):
        init_default_logger("LOUD", logger_name="pipeline")
    for handler in list(named.handlers):
        named.removeHandler(handler)
        handler.close()


# -- ConcurrentExecutionBackend ---------------------------------------------------


@pytest.mark.asyncio
async def test_concurrent_execution_backend_as_published_pages_write_it() -> None:
    backend = await ConcurrentExecutionBackend(ThreadPoolExecutor())
    assert isinstance(backend, LocalExecutionBackend)
    flow = await WorkflowEngine.create(backend=backend)

    @flow.executable_task
    async def task1() -> str:
        return "echo 21"

    @flow.function_task
    async def task2(t1_result: str) -> int:
        return int(t1_result.strip()) * 2

    t1_fut = task1()
    assert await task2(t1_fut) == 42
    await flow.shutdown()


def test_file_declarations_import_from_where_radical_scripts_take_them():
    # `from radical.asyncflow.data import InputFile` becomes this.
    from asyncflow import DRY_RUN_PROMPT_RESULT, OutputFile
    from asyncflow.data import InputFile as DataInput
    from asyncflow.data import OutputFile as DataOutput

    assert DataInput is InputFile
    assert DataOutput is OutputFile
    assert DRY_RUN_PROMPT_RESULT == "Dummy Prompt Output"


async def test_shutdown_skip_execution_backend_still_stops_a_running_command(
    tmp_path: Path,
) -> None:
    # SPEC §11: nothing is orphaned, even when the backend itself is kept.
    mark = {"ASYNCFLOW_TEST_MARK": f"skip-{tmp_path.name}"}
    backend = await LocalExecutionBackend(ThreadPoolExecutor(2))
    flow = await WorkflowEngine.create(backend=backend)

    @flow.executable_task
    def sleeper() -> str:
        return "sleep 60"

    running = sleeper(task_description={"env": mark})
    await wait_until(lambda: bool(carrying(mark)), "the command to start")
    await flow.shutdown(skip_execution_backend=True)
    assert running.cancelled()
    await wait_until(lambda: not carrying(mark), "the command to be stopped")
    await backend.shutdown()
