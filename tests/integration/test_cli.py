"""The ``asyncflow`` command (SPEC §9), run as a user runs it:
``python -m asyncflow ...`` in a subprocess, on scripts written to a
temporary directory.

Exit codes: 0 when main returned and no task failed, 1 when a task or the
script failed (or a command could not do its work), 2 for usage errors, 130
on Ctrl-C.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import asyncflow
from asyncflow import DRY_RUN_RESULT
from asyncflow.observers.trace import read_trace

#: Generous bound for one command: a healthy one takes a fraction of it.
TIMEOUT = 60.0


def asyncflow_cmd(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "asyncflow", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def write(directory: Path, name: str, code: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(code), encoding="utf-8")
    return path


#: Fan-out, fan-in and a block; every body leaves a mark in the working
#: directory; prints the result.
WORKFLOW = """
    from pathlib import Path


    def mark(name):
        with open("ran.txt", "a") as f:
            f.write(name + "\\n")


    async def main(flow):
        @flow.function_task
        def square(x):
            mark("square")
            return x * x

        @flow.function_task
        async def total(*values):
            mark("total")
            return sum(values)

        @flow.block
        async def campaign(n):
            return await total(*[square(i) for i in range(n)])

        print("result:", await campaign(4))
"""

FAILING = """
    async def main(flow):
        @flow.function_task
        def load_data(path):
            raise FileNotFoundError(f"no data at {path}")

        @flow.function_task
        def analyse(data):
            return len(data)

        print(await analyse(load_data("input.csv")))
"""


def ran(directory: Path) -> list[str]:
    marks = directory / "ran.txt"
    return marks.read_text().split() if marks.exists() else []


# -- help and version ---------------------------------------------------------------


def test_version(tmp_path: Path) -> None:
    done = asyncflow_cmd("--version", cwd=tmp_path)
    assert done.returncode == 0
    assert done.stdout == f"asyncflow {asyncflow.__version__}\n"


@pytest.mark.parametrize(
    ("command", "mentions"),
    [
        ((), ["run", "status", "report", "graph", "demo"]),
        (
            ("run",),
            [
                *("script", "--backend", "--workers", "--dry-run", "--no-progress"),
                *("--trace", "--checkpoint", "-- ARG"),
            ],
        ),
        (("status",), ["FILE"]),
        (("report",), ["TRACE", "--output"]),
        (("graph",), ["script", "--format", "mermaid", "dot", "-- ARG"]),
        (("demo",), ["--simulations", "--samples"]),
    ],
    ids=["asyncflow", "run", "status", "report", "graph", "demo"],
)
def test_help(tmp_path: Path, command: tuple[str, ...], mentions: list[str]) -> None:
    done = asyncflow_cmd(*command, "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: asyncflow {' '.join(command)}".rstrip())
    for word in mentions:
        assert word in done.stdout


def test_no_command_shows_the_usage(tmp_path: Path) -> None:
    done = asyncflow_cmd(cwd=tmp_path)
    assert done.returncode == 2
    assert "usage: asyncflow" in done.stderr


# -- run ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        [],
        ["--backend", "threads", "--workers", "2"],
        ["--backend", "processes", "--workers", "2"],
        ["--backend", "asyncio", "--workers", "2"],
    ],
    ids=["default", "threads", "processes", "asyncio"],
)
def test_run_succeeds(tmp_path: Path, options: list[str]) -> None:
    write(tmp_path, "flow.py", WORKFLOW)
    done = asyncflow_cmd("run", "flow.py", *options, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "result: 14\n"
    assert sorted(ran(tmp_path)) == ["square"] * 4 + ["total"]


@pytest.mark.parametrize("options", [["--dry-run"], ["--backend", "noop"]])
def test_dry_run_runs_no_body(tmp_path: Path, options: list[str]) -> None:
    write(tmp_path, "flow.py", WORKFLOW)
    done = asyncflow_cmd("run", "flow.py", *options, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"result: {DRY_RUN_RESULT}\n"
    assert not (tmp_path / "ran.txt").exists()


@pytest.mark.parametrize("backend", ["threads", "processes", "asyncio"])
def test_failing_task_exits_1_with_the_users_traceback(
    tmp_path: Path, backend: str
) -> None:
    script = write(tmp_path, "analysis.py", FAILING)
    done = asyncflow_cmd("run", "analysis.py", "--backend", backend, cwd=tmp_path)
    assert done.returncode == 1
    err = done.stderr
    assert "FileNotFoundError: no data at input.csv" in err
    frames = [
        line.strip() for line in err.splitlines() if line.strip().startswith("File ")
    ]
    assert frames, err
    # Every frame shown is the user's: the task body and main. (A worker
    # process knows the body's file as cloudpickle names it.)
    files = {script.name} if backend != "processes" else {script.name, "<dynamic-code>"}
    assert all(frame.split('"')[1] in files for frame in frames), err
    assert any(frame.endswith("in load_data") for frame in frames), err
    assert any(frame.endswith("in main") for frame in frames), err
    package = os.path.dirname(asyncflow.__file__)
    assert package not in err
    assert "runpy" not in err
    assert "asyncio" + os.sep not in err
    assert "load_data (task.000001)" in err  # the summary names the failed tasks


def test_progress_display_on_request(tmp_path: Path) -> None:
    write(tmp_path, "flow.py", WORKFLOW)
    quiet = asyncflow_cmd("run", "flow.py", cwd=tmp_path)  # stderr is a pipe
    assert quiet.returncode == 0
    assert quiet.stderr == ""
    shown = asyncflow_cmd("run", "flow.py", "--progress", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == "result: 14\n"
    assert shown.stderr != ""
    off = asyncflow_cmd("run", "flow.py", "--no-progress", cwd=tmp_path)
    assert off.stderr == ""


def test_full_traceback_on_request(tmp_path: Path) -> None:
    write(tmp_path, "analysis.py", FAILING)
    done = asyncflow_cmd(
        "run", "analysis.py", cwd=tmp_path, env={"ASYNCFLOW_TRACEBACK": "full"}
    )
    assert done.returncode == 1
    assert os.path.dirname(asyncflow.__file__) in done.stderr


def test_a_failed_task_the_script_handles_still_exits_1(tmp_path: Path) -> None:
    write(
        tmp_path,
        "tolerant.py",
        """
        import asyncio

        async def main(flow):
            @flow.function_task
            def flaky(i):
                if i == 2:
                    raise ValueError("bad sample")
                return i

            results = await asyncio.gather(
                *[flaky(i) for i in range(4)], return_exceptions=True
            )
            print(sum(r for r in results if isinstance(r, int)))
        """,
    )
    done = asyncflow_cmd("run", "tolerant.py", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stdout == "4\n"
    assert "1 task(s) failed: flaky" in done.stderr


def test_script_error_exits_1(tmp_path: Path) -> None:
    write(
        tmp_path,
        "oops.py",
        """
        async def main(flow):
            @flow.function_task
            def fine():
                return {}

            settings = await fine()
            return settings["missing"]
        """,
    )
    done = asyncflow_cmd("run", "oops.py", cwd=tmp_path)
    assert done.returncode == 1
    assert "KeyError: 'missing'" in done.stderr
    assert 'oops.py", line 8, in main' in done.stderr


def test_syntax_error_in_the_script_exits_1(tmp_path: Path) -> None:
    write(tmp_path, "broken.py", "async def main(flow):\n    return (\n")
    done = asyncflow_cmd("run", "broken.py", cwd=tmp_path)
    assert done.returncode == 1
    assert "SyntaxError" in done.stderr
    assert "broken.py" in done.stderr


@pytest.mark.parametrize(
    ("code", "args", "message"),
    [
        ("x = 1\n", [], "defines no main"),
        ("def main(flow):\n    pass\n", [], "must be an `async def`"),
        ("async def main():\n    pass\n", [], "must take the engine"),
        ("async def main(a, b, c):\n    pass\n", [], "must take the engine"),
        ("async def main(flow):\n    pass\n", ["--workers", "0"], "at least 1"),
        ("async def main(flow):\n    pass\n", ["--backend", "gpu"], "invalid choice"),
        ("async def main(flow):\n    pass\n", ["extra"], "unrecognized arguments"),
    ],
    ids=[
        "no-main",
        "sync-main",
        "main-without-flow",
        "main-with-three",
        "zero-workers",
        "unknown-backend",
        "args-without-dashes",
    ],
)
def test_usage_errors_exit_2(
    tmp_path: Path, code: str, args: list[str], message: str
) -> None:
    write(tmp_path, "script.py", code)
    done = asyncflow_cmd("run", "script.py", *args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr


def test_missing_script_exits_2(tmp_path: Path) -> None:
    done = asyncflow_cmd("run", "nowhere.py", cwd=tmp_path)
    assert done.returncode == 2
    assert "no such script: nowhere.py" in done.stderr
    (tmp_path / "folder").mkdir()
    done = asyncflow_cmd("graph", "folder", cwd=tmp_path)
    assert done.returncode == 2
    assert "folder is not a file" in done.stderr


def test_arguments_after_dashes_reach_main(tmp_path: Path) -> None:
    write(
        tmp_path,
        "args.py",
        """
        import json, sys

        async def main(flow, argv):
            print(json.dumps({"argv": argv, "sys.argv": sys.argv, "name": __name__}))

        if __name__ == "__main__":
            raise SystemExit("the script's own entry point must not run")
        """,
    )
    script_args = ["--samples", "10", "-x", "two words", "--"]
    done = asyncflow_cmd("run", "args.py", "--", *script_args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["argv"] == script_args
    assert seen["sys.argv"] == ["args.py", *script_args]
    assert seen["name"] != "__main__"


def test_script_directory_is_importable_and_cwd_is_the_callers(tmp_path: Path) -> None:
    write(tmp_path, "project/helpers.py", "def greeting():\n    return 'hello'\n")
    write(
        tmp_path,
        "project/flow.py",
        """
        from helpers import greeting

        async def main(flow):
            @flow.function_task
            def save(text):
                with open("out.txt", "w") as f:
                    f.write(text)

            await save(greeting())
        """,
    )
    done = asyncflow_cmd("run", "project/flow.py", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.txt").read_text() == "hello"


def test_ctrl_c_exits_130(tmp_path: Path) -> None:
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        pytest.skip("SIGINT is ignored here, and so in the child")
    write(
        tmp_path,
        "forever.py",
        """
        import asyncio

        async def main(flow):
            @flow.function_task
            async def wait_forever():
                print("waiting", flush=True)
                await asyncio.sleep(3600)

            await wait_forever()
        """,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncflow", "run", "forever.py"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "waiting\n"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert "Traceback" not in err


def test_trace_is_written(tmp_path: Path) -> None:
    write(tmp_path, "flow.py", WORKFLOW)
    done = asyncflow_cmd("run", "flow.py", "--trace", "run.trace", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    header, events = read_trace(tmp_path / "run.trace")
    assert header["format"] == "asyncflow-trace"
    finished = sorted(e["name"] for e in events if e["kind"] == "done")
    assert finished == ["campaign", "square", "square", "square", "square", "total"]


# -- checkpoint and status ------------------------------------------------------------


def test_checkpoint_then_status(tmp_path: Path) -> None:
    write(tmp_path, "flow.py", WORKFLOW)
    done = asyncflow_cmd("run", "flow.py", "--checkpoint", "run.db", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert len(ran(tmp_path)) == 5
    again = asyncflow_cmd("run", "flow.py", "--checkpoint", "run.db", cwd=tmp_path)
    assert again.stdout == "result: 14\n"
    assert len(ran(tmp_path)) == 5, "the second run restores every task"

    before = (tmp_path / "run.db").read_bytes()
    # No key file is needed (nor made) to list what the file holds.
    no_key = tmp_path / "no-such-dir" / "checkpoint.key"
    status = asyncflow_cmd(
        "status", "run.db", cwd=tmp_path, env={"ASYNCFLOW_KEY_FILE": str(no_key)}
    )
    assert status.returncode == 0, status.stderr
    assert not no_key.parent.exists()
    assert (tmp_path / "run.db").read_bytes() == before
    lines = status.stdout.splitlines()
    assert lines[0].startswith("run.db: asyncflow checkpoint")
    assert "5 result(s) of 2 task(s)" in lines[0]
    assert lines[1].split()[:3] == ["TASK", "RESULTS", "SIZE"]
    counts = {line.split()[0]: int(line.split()[1]) for line in lines[2:]}
    assert counts == {"square": 4, "total": 1}


def test_status_of_an_empty_checkpoint(tmp_path: Path) -> None:
    write(tmp_path, "idle.py", "async def main(flow):\n    pass\n")
    done = asyncflow_cmd("run", "idle.py", "--checkpoint", "run.db", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    status = asyncflow_cmd("status", "run.db", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "0 result(s) of 0 task(s)" in status.stdout


@pytest.mark.parametrize("kind", ["missing", "text", "other-sqlite", "directory"])
def test_status_refuses_what_is_not_a_checkpoint(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "run.db"
    if kind == "text":
        path.write_text("hello\n" * 100)
    elif kind == "other-sqlite":
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE asyncflow_meta (key TEXT, value TEXT)")
            db.execute("INSERT INTO asyncflow_meta VALUES ('format', 'other')")
        db.close()
    elif kind == "directory":
        path.mkdir()
    done = asyncflow_cmd("status", "run.db", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("asyncflow status: error: ")
    assert "Traceback" not in done.stderr
    if kind != "missing":
        assert path.exists()


# -- graph --------------------------------------------------------------------------


def test_graph_prints_a_mermaid_flowchart(tmp_path: Path) -> None:
    write(tmp_path, "flow.py", WORKFLOW)
    done = asyncflow_cmd("graph", "flow.py", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "flowchart TD"
    labels = [line for line in lines if '["' in line]
    for name in ("campaign", "square", "total"):
        assert any(f'"{name} (' in label for label in labels), done.stdout
    assert sum('"square (' in label for label in labels) == 4
    assert sum(" --> " in line for line in lines) == 4  # square -> total
    assert any(line.strip().startswith("subgraph ") for line in lines)
    # The script's own output goes to stderr, and no body ran.
    assert "result:" not in done.stdout
    assert "result:" in done.stderr
    assert not (tmp_path / "ran.txt").exists()


def test_graph_as_dot_with_script_arguments(tmp_path: Path) -> None:
    write(
        tmp_path,
        "sized.py",
        """
        async def main(flow, argv):
            @flow.function_task
            def step(i):
                return i

            await __import__("asyncio").gather(*[step(i) for i in range(int(argv[0]))])
        """,
    )
    done = asyncflow_cmd(
        "graph", "sized.py", "--format", "dot", "--", "3", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("digraph asyncflow {")
    assert done.stdout.count('label="step (') == 3
    dot = shutil.which("dot")
    if dot is not None:
        check = subprocess.run(
            [dot, "-Tsvg"], input=done.stdout, capture_output=True, text=True
        )
        assert check.returncode == 0, check.stderr


# -- report -------------------------------------------------------------------------


def test_report_from_a_trace(tmp_path: Path) -> None:
    if importlib.util.find_spec("asyncflow.report") is None:
        pytest.skip("asyncflow.report is not there yet")
    write(tmp_path, "flow.py", WORKFLOW)
    done = asyncflow_cmd("run", "flow.py", "--trace", "run.trace", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = asyncflow_cmd("report", "run.trace", "-o", "report.html", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    written = Path(report.stdout.strip())
    assert (tmp_path / written).resolve() == (tmp_path / "report.html").resolve()
    assert "square" in (tmp_path / "report.html").read_text(encoding="utf-8")


def test_report_errors_exit_1(tmp_path: Path) -> None:
    done = asyncflow_cmd("report", "missing.trace", "-o", "r.html", cwd=tmp_path)
    assert done.returncode == 1
    assert "asyncflow report: error: no such trace file: missing.trace" in done.stderr
    (tmp_path / "bad.trace").write_text("this is not a trace\n")
    done = asyncflow_cmd("report", "bad.trace", "-o", "r.html", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("asyncflow report: error: ")


def test_report_needs_an_output(tmp_path: Path) -> None:
    done = asyncflow_cmd("report", "run.trace", cwd=tmp_path)
    assert done.returncode == 2
    assert "-o/--output" in done.stderr


# -- demo ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--simulations", "1"], "at least 2"),
        (["--samples", "0"], "at least 1"),
        (["--samples", "many"], "not a whole number"),
    ],
)
def test_demo_validates_its_options(
    tmp_path: Path, args: list[str], message: str
) -> None:
    done = asyncflow_cmd("demo", *args, cwd=tmp_path)
    assert done.returncode == 2
    assert message in done.stderr


def test_demo_runs(tmp_path: Path) -> None:
    done = asyncflow_cmd("demo", "--simulations", "2", "--samples", "100", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "pi estimate" in done.stdout


def test_only_run_and_graph_take_script_arguments(tmp_path: Path) -> None:
    done = asyncflow_cmd("demo", "--", "x", cwd=tmp_path)
    assert done.returncode == 2
    assert "takes no arguments after '--'" in done.stderr
