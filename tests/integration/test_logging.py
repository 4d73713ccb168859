"""SPEC §7: the ``asyncflow`` logger and the ``RADICAL_LOG_LVL`` switch.

Logging is configured once per process from the environment, so each case
runs a small workflow in a fresh interpreter and inspects its stderr.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from asyncflow import NoopExecutionBackend, WorkflowEngine

LIVENESS = 60.0

SCRIPT = textwrap.dedent(
    """
    import asyncio, logging, sys

    if "basic-config" in sys.argv:
        logging.basicConfig()  # the application configures logging itself
    root = logging.getLogger()
    before = list(root.handlers), root.level

    from concurrent.futures import ThreadPoolExecutor

    from asyncflow import LocalExecutionBackend, WorkflowEngine


    async def main():
        async with await WorkflowEngine.create(
            backend=LocalExecutionBackend(ThreadPoolExecutor(1))
        ) as flow:
            @flow.function_task
            async def produce_data():
                return 20

            @flow.function_task
            async def transform_data(x):
                return x + 1

            @flow.function_task
            async def combine_results(a, b):
                return a + b

            @flow.function_task
            def explode_badly():
                raise ValueError("kaboom-4711")

            produced = produce_data()
            result = await combine_results(produced, transform_data(produced))
            try:
                await explode_badly()
            except ValueError:
                pass
            print("RESULT", result, flush=True)
        if "second-engine" in sys.argv:
            async with await WorkflowEngine.create() as other:
                @other.function_task
                def second_engine_task():
                    return 1

                await second_engine_task()


    asyncio.run(main())
    after = list(root.handlers), root.level
    print("ROOT-UNCHANGED", before == after, flush=True)
    """
)

LOG_VARS = ("RADICAL_LOG_LVL", "ASYNCFLOW_LOG_LVL")
TASKS = ("produce_data", "transform_data", "combine_results", "explode_badly")


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "workflow.py"
    path.write_text(SCRIPT)
    return path


def run(script: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k not in LOG_VARS}
    environment.update(env)
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=LIVENESS,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "RESULT 41" in proc.stdout, proc.stdout
    assert "ROOT-UNCHANGED True" in proc.stdout, proc.stdout
    return proc


def lines_with(text: str, *words: str) -> list[str]:
    return [line for line in text.splitlines() if all(w in line for w in words)]


def event_lines(stderr: str, word: str, task: str) -> list[str]:
    """Lines containing ``word`` whose subject is ``task``: the first task name
    on the line (dependencies are named after the task itself)."""
    found = []
    for line in stderr.splitlines():
        lowered = line.lower()
        if word not in lowered:
            continue
        named = [(lowered.index(t), t) for t in TASKS if t in lowered]
        if named and min(named)[1] == task:
            found.append(line)
    return found


def assert_debug_log(stderr: str) -> None:
    # Registration of each task, once, with its dependencies named.
    registered = {task: event_lines(stderr, "regist", task) for task in TASKS}
    for task, lines in registered.items():
        assert len(lines) == 1, f"registration of {task}: {lines}\n{stderr}"
    assert "produce_data" in registered["transform_data"][0]
    assert "produce_data" in registered["combine_results"][0]
    assert "transform_data" in registered["combine_results"][0]
    for task in ("produce_data", "explode_badly"):
        others = [t for t in TASKS if t != task]
        assert not any(t in registered[task][0] for t in others)
    # Submission of each task.
    for task in TASKS:
        assert event_lines(stderr, "submit", task), f"no submission of {task}"
    # End states.
    for task in TASKS[:3]:
        assert event_lines(stderr, "done", task), f"no DONE line for {task}"
    (failed,) = event_lines(stderr, "failed", "explode_badly")
    assert "FAILED" in failed
    # The failure comes with its traceback, pointing at the user's code.
    tail = stderr[stderr.index(failed) :]
    assert "Traceback (most recent call last)" in tail
    assert 'raise ValueError("kaboom-4711")' in tail
    assert "ValueError: kaboom-4711" in tail
    # Order: registration before submission before the end state.
    for task in TASKS[:3]:
        registered_at = stderr.index(registered[task][0])
        submitted_at = stderr.index(event_lines(stderr, "submit", task)[0])
        done_at = stderr.index(event_lines(stderr, "done", task)[0])
        assert registered_at < submitted_at < done_at, task


@pytest.mark.parametrize("variable", LOG_VARS)
def test_debug_level_logs_each_tasks_lifecycle(script: Path, variable: str) -> None:
    proc = run(script, **{variable: "DEBUG"})
    assert_debug_log(proc.stderr)
    assert "DEBUG" in proc.stderr
    # Logs go to stderr only.
    assert "regist" not in proc.stdout.lower()


@pytest.mark.parametrize("spelling", ["debug", " Debug ", "10"])
def test_level_names_are_case_insensitive_and_numbers_work(
    script: Path, spelling: str
) -> None:
    proc = run(script, RADICAL_LOG_LVL=spelling)
    assert_debug_log(proc.stderr)


def test_info_level_logs_engine_start_and_shutdown_only(script: Path) -> None:
    proc = run(script, RADICAL_LOG_LVL="INFO")
    stderr = proc.stderr
    assert re.search(r"INFO.*start", stderr), stderr
    assert re.search(r"INFO.*shut(ting)? down", stderr), stderr
    assert "DEBUG" not in stderr
    assert "regist" not in stderr.lower()
    assert "submit" not in stderr.lower()


def test_default_level_shows_no_debug_or_info(script: Path) -> None:
    proc = run(script)
    stderr = proc.stderr
    assert "DEBUG" not in stderr
    assert "INFO" not in stderr
    for word in ("regist", "submit", "started", "shutting down", "thread pool"):
        assert word not in stderr.lower(), stderr
    for task in TASKS[:3]:
        assert task not in stderr, stderr


@pytest.mark.parametrize("variable", LOG_VARS)
def test_invalid_level_is_reported_not_crashed_on(script: Path, variable: str) -> None:
    proc = run(script, **{variable: "LOUDEST"})  # run() asserts the result
    (report,) = [line for line in proc.stderr.splitlines() if "LOUDEST" in line]
    assert variable in report
    # And the level stays the default: nothing below WARNING is logged.
    assert "regist" not in proc.stderr.lower()
    assert "submit" not in proc.stderr.lower()
    assert "thread pool" not in proc.stderr


def test_second_engine_does_not_duplicate_log_lines(script: Path) -> None:
    proc = run(script, "second-engine", RADICAL_LOG_LVL="DEBUG")
    registered = [
        line
        for line in proc.stderr.splitlines()
        if "regist" in line.lower() and "second_engine_task" in line
    ]
    assert len(registered) == 1, proc.stderr
    assert len(lines_with(proc.stderr, "produce_data", "DONE")) == 1


def test_records_appear_once_when_the_application_configured_logging(
    script: Path,
) -> None:
    proc = run(script, "basic-config", RADICAL_LOG_LVL="DEBUG")
    registered = [
        line
        for line in proc.stderr.splitlines()
        if "regist" in line.lower() and "combine_results" in line
    ]
    assert len(registered) == 1, registered


def test_debug_level_logs_each_tasks_start(script: Path) -> None:
    proc = run(script, RADICAL_LOG_LVL="DEBUG")
    for task in TASKS:
        assert event_lines(proc.stderr, "start", task), f"no start line for {task}"


# -- in process: the root logger is never touched ----------------------------------


@pytest.fixture
def restore_asyncflow_logger() -> Iterator[None]:
    logger = logging.getLogger("asyncflow")
    saved = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], *saved[1:]


@pytest.mark.usefixtures("restore_asyncflow_logger")
@pytest.mark.parametrize("value", ["DEBUG", "INFO", "not-a-level"])
async def test_library_never_adds_handlers_to_the_root_logger(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("RADICAL_LOG_LVL", value)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    flow = await WorkflowEngine.create(backend=NoopExecutionBackend())

    @flow.function_task
    async def noop() -> None:
        return None

    await noop()
    await flow.shutdown()
    assert root.handlers == handlers
    assert root.level == level
    # Its own loggers hang under "asyncflow".
    names = [n for n in logging.root.manager.loggerDict if "asyncflow" in n]
    assert names
    assert all(n == "asyncflow" or n.startswith("asyncflow.") for n in names)
