"""SPEC §3 executable tasks, on the thread-pool and asyncio backends (§6).

The body returns a command; the backend runs it; the result is its stdout.
Concurrency and cancellation are proven with marker files written by the
commands themselves and with psutil, never with timing.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import stat
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import psutil
import pytest

from asyncflow import (
    DRY_RUN_RESULT,
    ExecutableError,
    NoopExecutionBackend,
    TaskTimeoutError,
    WorkflowEngine,
)

from ..conftest import EXE_BACKENDS as BACKENDS
from ..processes import alive, group_of, wait_until

LIVENESS = 20.0


@pytest.fixture(params=list(BACKENDS))
async def flow(request: pytest.FixtureRequest, make_flow) -> WorkflowEngine:
    return await make_flow(request.param)


async def failure_of(fut: asyncio.Future[Any]) -> BaseException:
    await asyncio.wait([fut], timeout=LIVENESS)
    assert fut.done(), "the task never finished"
    assert fut.state == "FAILED", fut
    error = fut.exception()
    assert error is not None
    return error


# -- results, shell and argv ----------------------------------------------------


async def test_stdout_is_the_result(flow: WorkflowEngine) -> None:
    @flow.executable_task
    async def greet(name: str) -> str:
        return f"echo hello {name}; echo second line"

    fut = greet("world")
    result = await fut
    assert type(result) is str
    assert result == "hello world\nsecond line\n"
    assert fut.state == "DONE"


async def test_commands_run_through_the_shell_by_default(
    flow: WorkflowEngine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AF_TEST_GREETING", "bonjour")

    @flow.executable_task
    async def pipeline() -> str:
        return "printf 'b\\na\\nc\\n' | sort | tr a-z A-Z"

    @flow.executable_task
    async def expand() -> str:
        return 'echo "$AF_TEST_GREETING" && echo $((6 * 7))'

    @flow.executable_task
    async def redirect(path: str) -> str:
        return f"echo written > {path}; cat {path}"

    assert await pipeline() == "A\nB\nC\n"
    assert await expand() == "bonjour\n42\n"
    assert await redirect(str(tmp_path / "out.txt")) == "written\n"
    assert (tmp_path / "out.txt").read_text() == "written\n"


async def test_shell_false_runs_argv_without_interpreting_shell_syntax(
    flow: WorkflowEngine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AF_TEST_GREETING", "bonjour")
    target = tmp_path / "must-not-exist"

    @flow.executable_task
    async def literal(task_description: dict = {"shell": False}) -> str:  # noqa: B006
        return f"echo $AF_TEST_GREETING | cat > {target}; $((1+1))"

    @flow.executable_task
    async def quoted() -> str:
        return "printf '%s|' 'a b' c"

    # echo got every word literally: no expansion, pipe or redirection.
    assert await literal() == f"$AF_TEST_GREETING | cat > {target}; $((1+1))\n"
    assert not target.exists()
    # Call-time description, and argv quoting as in a shell (shlex rules).
    assert await quoted(task_description={"shell": False}) == "a b|c|"


async def test_shell_false_unknown_program_fails_without_hanging(
    flow: WorkflowEngine,
) -> None:
    @flow.executable_task
    async def missing() -> str:
        return "af-no-such-program-xyz --flag"

    @flow.executable_task
    async def fine() -> str:
        return "echo fine"

    fut = missing(task_description={"shell": False})
    error = await failure_of(fut)
    assert "af-no-such-program-xyz" in str(error)
    assert await fine() == "fine\n"


# -- task_description: env, cwd, merging ------------------------------------------


async def test_env_is_merged_over_the_environment(
    flow: WorkflowEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AF_TEST_INHERITED", "inherited")
    monkeypatch.setenv("AF_TEST_OVERRIDDEN", "old")

    @flow.executable_task
    async def show() -> str:
        return 'echo "$AF_TEST_ONLY_HERE:$AF_TEST_INHERITED:$AF_TEST_OVERRIDDEN"'

    env = {"AF_TEST_ONLY_HERE": "here", "AF_TEST_OVERRIDDEN": "new"}
    assert await show(task_description={"env": env}) == "here:inherited:new\n"

    # Without the shell as well (PATH is inherited, so `env` is found).
    @flow.executable_task
    async def environment() -> str:
        return "env"

    lines = set(
        (await environment(task_description={"env": env, "shell": False})).split()
    )
    assert {
        "AF_TEST_ONLY_HERE=here",
        "AF_TEST_INHERITED=inherited",
        "AF_TEST_OVERRIDDEN=new",
    } <= lines
    # The engine's own environment is untouched.
    assert "AF_TEST_ONLY_HERE" not in os.environ
    assert os.environ["AF_TEST_OVERRIDDEN"] == "old"


async def test_cwd_is_honoured(flow: WorkflowEngine, tmp_path: Path) -> None:
    (tmp_path / "input.txt").write_text("data in cwd\n")

    @flow.executable_task
    async def where() -> str:
        return "pwd; cat input.txt"

    out = await where(task_description={"cwd": str(tmp_path)})
    cwd, content = out.splitlines()
    assert os.path.realpath(cwd) == os.path.realpath(tmp_path)
    assert content == "data in cwd"

    @flow.executable_task
    async def ls() -> str:
        return "ls"

    # Without the shell too; a path-like cwd works like a str.
    assert await ls(task_description={"cwd": tmp_path, "shell": False}) == (
        "input.txt\n"
    )


async def test_definition_default_and_call_time_description_merge(
    flow: WorkflowEngine, tmp_path: Path
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    default = {"env": {"AF_TEST_LEVEL": "definition"}, "cwd": str(first)}
    seen: list[tuple[Any, dict[str, Any]]] = []

    @flow.executable_task
    async def probe(label: str, task_description: dict = default, **kwargs: Any) -> str:
        seen.append((task_description, kwargs))
        return f'echo "{label}:$AF_TEST_LEVEL"; pwd'

    def parse(out: str) -> tuple[str, str]:
        line, cwd = out.splitlines()
        return line, os.path.realpath(cwd)

    assert parse(await probe("plain")) == (
        "plain:definition",
        os.path.realpath(first),
    )
    # A call-time key overrides the definition's; the others stay.
    assert parse(
        await probe("env", task_description={"env": {"AF_TEST_LEVEL": "call"}})
    ) == ("env:call", os.path.realpath(first))
    assert parse(await probe("cwd", task_description={"cwd": str(second)})) == (
        "cwd:definition",
        os.path.realpath(second),
    )
    # The definition default is not mutated by call-time keys.
    assert default == {"env": {"AF_TEST_LEVEL": "definition"}, "cwd": str(first)}
    assert parse(await probe("again")) == (
        "again:definition",
        os.path.realpath(first),
    )
    # The description (and workflow_id) never reach the body.
    await probe("tagged", task_description={"cwd": str(second)}, workflow_id="wf-1")
    for description, kwargs in seen:
        assert description is default
        assert kwargs == {}


async def test_workflow_id_is_stripped_and_kept_as_a_tag(flow: WorkflowEngine) -> None:
    seen: list[dict[str, Any]] = []

    @flow.executable_task
    async def tagged(**kwargs: Any) -> str:
        seen.append(kwargs)
        return "echo tagged"

    fut = tagged(workflow_id="wf-42", task_description={"shell": True})
    assert await fut == "tagged\n"
    assert seen == [{}]
    assert fut.workflow_id == "wf-42"


# -- failures -------------------------------------------------------------------


async def test_nonzero_exit_fails_with_executable_error(flow: WorkflowEngine) -> None:
    command = (
        "echo partial-output; "
        "for i in $(seq 1 200); do echo errline-$i >&2; done; exit 3"
    )

    @flow.executable_task
    async def simulate() -> str:
        return command

    @flow.executable_task
    async def sibling() -> str:
        return "echo unaffected"

    fut = simulate()
    other = sibling()
    error = await failure_of(fut)
    assert isinstance(error, ExecutableError)
    assert isinstance(error, RuntimeError)
    assert error.exit_code == 3
    assert error.stdout == "partial-output\n"
    assert error.stderr.splitlines() == [f"errline-{i}" for i in range(1, 201)]
    assert error.command == command
    message = str(error)
    assert "simulate" in message
    assert re.search(r"\b3\b", message), message
    # The tail of stderr, not all of it.
    assert "errline-200" in message
    assert "errline-199" in message
    assert not re.search(r"errline-1\b", message), message
    with pytest.raises(ExecutableError):
        await fut
    assert await other == "unaffected\n"


async def test_nonzero_exit_without_shell(flow: WorkflowEngine) -> None:
    @flow.executable_task
    async def nope() -> str:
        return "false"

    error = await failure_of(nope(task_description={"shell": False}))
    assert isinstance(error, ExecutableError)
    assert error.exit_code == 1
    assert error.stdout == ""


@pytest.mark.parametrize(("signame", "signum"), [("SIGKILL", 9), ("SIGTERM", 15)])
async def test_killed_by_a_signal_reports_negative_exit_code(
    flow: WorkflowEngine, signame: str, signum: int
) -> None:
    @flow.executable_task
    async def doomed() -> str:
        return f"echo before; kill -{signame[3:]} $$; echo never"

    error = await failure_of(doomed())
    assert isinstance(error, ExecutableError)
    assert error.exit_code == -signum
    assert error.stdout == "before\n"
    assert signame in str(error)
    assert "doomed" in str(error)


BAD_COMMANDS = [42, None, b"echo hi", [], ["echo", 1], [b"echo"], "", "   ", "\n\t"]


@pytest.mark.parametrize("bad", BAD_COMMANDS, ids=repr)
async def test_body_returning_a_non_command_fails_naming_the_task(
    flow: WorkflowEngine, bad: Any
) -> None:
    @flow.executable_task
    async def build_command() -> Any:
        return bad

    @flow.executable_task
    def sync_build_command() -> Any:
        return bad

    @flow.executable_task
    async def sibling() -> str:
        return "echo sibling"

    for task in (build_command, sync_build_command):
        error = await failure_of(task())
        assert type(error) is ValueError
        assert task.__name__ in str(error)
    assert await sibling() == "sibling\n"


async def test_body_raising_fails_the_task(flow: WorkflowEngine) -> None:
    @flow.executable_task
    async def broken(x: int) -> str:
        raise KeyError(f"missing input {x}")

    error = await failure_of(broken(7))
    assert isinstance(error, KeyError)
    assert "missing input 7" in str(error)


# -- cancellation and concurrency ---------------------------------------------------


async def test_cancelling_a_running_command_kills_its_process_group(
    flow: WorkflowEngine, reaper, tmp_path: Path
) -> None:
    pid_file = tmp_path / "sh.pid"

    @flow.executable_task
    async def long_command() -> str:
        return f"echo $$ > {tmp_path}/sh.tmp && mv {tmp_path}/sh.tmp {pid_file}; " + (
            "sleep 60 & sleep 60"
        )

    @flow.executable_task
    async def afterwards() -> str:
        return "echo still works"

    fut = long_command()
    await wait_until(pid_file.exists, "the command to start")
    leader = int(pid_file.read_text())

    def sleeps() -> list[psutil.Process]:
        return [p for p in group_of(leader) if p.name() == "sleep"]

    await wait_until(lambda: len(sleeps()) == 2, "both sleeps to start")
    procs = group_of(leader)
    reaper.extend(procs)
    assert fut.state == "RUNNING"

    assert fut.cancel() is True
    assert fut.state == "CANCELLED"
    with pytest.raises(asyncio.CancelledError):
        await fut
    await wait_until(
        lambda: not any(alive(p) for p in procs), "the whole group to be gone"
    )
    assert await afterwards() == "still works\n"


async def test_cancel_during_body_evaluation_closes_the_body(
    flow: WorkflowEngine,
) -> None:
    @flow.executable_task
    async def prepare() -> str:
        return "echo should-not-run"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fut = prepare()
        await asyncio.sleep(0)  # dispatched: the body is being evaluated
        assert fut.state == "RUNNING"
        assert fut.cancel() is True
        for _ in range(5):
            await asyncio.sleep(0)
        del fut
        gc.collect()
    unawaited = [str(w.message) for w in caught if "never awaited" in str(w.message)]
    assert not unawaited, unawaited


@pytest.mark.parametrize("backend", list(BACKENDS))
async def test_concurrency_is_bounded_by_the_worker_count(
    make_flow, tmp_path: Path, backend: str
) -> None:
    workers, tasks = 2, 6
    flow = await make_flow(backend, workers)
    running, seen, release = (tmp_path / d for d in ("running", "seen", "release"))
    for d in (running, seen, release):
        d.mkdir()

    @flow.executable_task
    async def step(i: int) -> str:
        # Record how many commands run right now (this one included), then
        # wait for the test to release this one.
        return (
            f"touch {running}/{i}; n=$(ls {running} | wc -l); "
            f"echo $n > {seen}/{i}.tmp && mv {seen}/{i}.tmp {seen}/{i}; "
            f"while [ ! -e {release}/{i} ]; do sleep 0.01; done; "
            f"rm {running}/{i}; echo $n"
        )

    futs = [step(i) for i in range(tasks)]
    released: list[str] = []
    while len(released) < tasks:
        # Wait until as many commands as there are workers are started and
        # waiting (the bound must be reached, not only respected) ...
        want = min(workers, tasks - len(released))
        await wait_until(
            lambda want=want: (
                len({p.name for p in seen.iterdir() if not p.name.endswith(".tmp")})
                - len(released)
                >= want
            ),
            f"{want} commands to be running",
        )
        # ... and never more than that.
        assert len(list(running.iterdir())) <= workers
        waiting = sorted(
            p.name
            for p in seen.iterdir()
            if not p.name.endswith(".tmp") and p.name not in released
        )
        (release / waiting[0]).touch()
        released.append(waiting[0])
    results = await asyncio.wait_for(asyncio.gather(*futs), LIVENESS)
    counts = [int(r) for r in results]
    assert max(counts) == workers, counts
    assert all(c <= workers for c in counts), counts


# -- argument lists -----------------------------------------------------------------

#: Writes its arguments (after the output path) as JSON, prints their count.
RECORD_ARGS = (
    "import json, pathlib, sys; "
    "pathlib.Path(sys.argv[1]).write_text(json.dumps(sys.argv[2:])); "
    "print(len(sys.argv) - 2)"
)
#: Words a shell would expand, split, substitute or run.
HOSTILE_WORDS = [
    "two words",
    "$HOME",
    "; touch injected",
    "`touch substituted`",
    "$(touch substituted)",
    "*",
    "'single'",
    'dou"ble',
    "back\\slash",
    "line\nbreak",
    "",
]


@pytest.mark.parametrize("shell", ["unset", True, False])
async def test_argument_list_is_run_without_any_shell(
    flow: WorkflowEngine, tmp_path: Path, shell: Any
) -> None:
    record = tmp_path / "args.json"

    @flow.executable_task
    async def build(*words: str) -> list[str]:
        return [sys.executable, "-c", RECORD_ARGS, str(record), *words]

    description: dict[str, Any] = {"cwd": str(tmp_path)}
    if shell != "unset":
        description["shell"] = shell
    result = await build(*HOSTILE_WORDS, task_description=description)
    assert result == f"{len(HOSTILE_WORDS)}\n"
    # Every word arrived as it was, and nothing in them was run.
    assert json.loads(record.read_text()) == HOSTILE_WORDS
    assert sorted(os.listdir(tmp_path)) == ["args.json"]


async def test_argument_list_from_a_tuple_and_its_failure(flow: WorkflowEngine) -> None:
    @flow.executable_task
    async def fail(code: int) -> tuple[str, ...]:
        return (sys.executable, "-c", f"import sys; print('out'); sys.exit({code})")

    error = await failure_of(fail(4))
    assert isinstance(error, ExecutableError)
    assert error.exit_code == 4
    assert error.stdout == "out\n"
    assert error.command == [
        sys.executable,
        "-c",
        "import sys; print('out'); sys.exit(4)",
    ]


@pytest.mark.parametrize("form", ["list", "shell_false"])
async def test_argv_program_that_does_not_exist_exits_127(
    flow: WorkflowEngine, form: str
) -> None:
    @flow.executable_task
    async def missing() -> Any:
        if form == "list":
            return ["af-no-such-program-xyz", "--flag"]
        return "af-no-such-program-xyz --flag"

    error = await failure_of(missing(task_description={"shell": form == "list"}))
    assert isinstance(error, ExecutableError)
    assert error.exit_code == 127
    assert "af-no-such-program-xyz: not found" in error.stderr
    assert error.stdout == ""
    assert "af-no-such-program-xyz" in str(error)


@pytest.mark.parametrize("target", ["plain_file", "directory"])
@pytest.mark.parametrize("form", ["list", "shell_false"])
async def test_argv_program_that_cannot_be_executed_exits_126(
    flow: WorkflowEngine, tmp_path: Path, form: str, target: str
) -> None:
    program = tmp_path / "data.txt"
    if target == "plain_file":
        program.write_text("not a program\n")
        program.chmod(0o644)
    else:
        program.mkdir()

    @flow.executable_task
    async def run() -> Any:
        return [str(program)] if form == "list" else str(program)

    error = await failure_of(run(task_description={"shell": False}))
    assert isinstance(error, ExecutableError)
    assert error.exit_code == 126
    assert f"{program}: Permission denied" in error.stderr


async def test_argv_script_without_shebang_runs_with_sh(
    flow: WorkflowEngine, tmp_path: Path
) -> None:
    script = tmp_path / "legacy"
    script.write_text('printf "[%s]\\n" "$@"\n')
    script.chmod(0o755)

    @flow.executable_task
    async def run() -> list[str]:
        return [str(script), "two words", "$HOME"]

    assert await run() == "[two words]\n[$HOME]\n"


# -- a command started without the shell ends as it would with it ------------------


async def test_plain_command_naming_a_script_without_shebang_runs(
    flow: WorkflowEngine, tmp_path: Path
) -> None:
    script = tmp_path / "legacy-tool"
    script.write_text('echo "legacy $1"\n')
    script.chmod(0o755)

    @flow.executable_task
    async def run() -> str:
        return f"{script} ok"

    assert await run() == "legacy ok\n"


async def test_program_missing_from_path_fails_as_in_the_shell(
    flow: WorkflowEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "af-vanishing-tool"
    tool.write_text("#!/bin/sh\necho present\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    @flow.executable_task
    async def run(command: str) -> str:
        return command

    def in_the_shell(command: str) -> tuple[int, str]:
        done = subprocess.run(
            ["/bin/sh", "-c", command], capture_output=True, text=True
        )
        return done.returncode, done.stderr

    assert await run("af-vanishing-tool --check") == "present\n"
    # Removed after it was first seen (and remembered) on PATH.
    tool.unlink()
    for command in ("af-vanishing-tool --check", "af-never-there-tool --check"):
        error = await failure_of(run(command))
        assert isinstance(error, ExecutableError)
        assert error.exit_code == 127
        assert "not found" in error.stderr
        assert (error.exit_code, error.stderr) == in_the_shell(command)


# -- timeouts -----------------------------------------------------------------------


async def test_timeout_does_not_count_time_waiting_for_a_slot(
    make_flow, tmp_path: Path
) -> None:
    # NOTE: needs the backend to report starts (``reports_start = True``).
    timeout = 1.0
    flow = await make_flow("threads", 1)  # one command at a time
    started, release = tmp_path / "started", tmp_path / "release"

    @flow.executable_task
    async def long_command() -> str:
        return (
            f"touch {started}; while [ ! -e {release} ]; do sleep 0.01; done; echo long"
        )

    @flow.executable_task(timeout=timeout)
    async def queued() -> str:
        return "echo queued"

    first = long_command()
    await wait_until(started.exists, "the long command to start")
    second = queued()
    # Let `queued` wait for the only slot well past its timeout.
    await asyncio.sleep(3 * timeout)
    assert second.state == "RUNNING", second
    release.touch()
    assert await first == "long\n"
    assert await second == "queued\n"


async def test_timeout_still_stops_a_command_that_runs_too_long(
    make_flow, tmp_path: Path
) -> None:
    flow = await make_flow("threads", 1)

    @flow.executable_task(timeout=0.5)
    async def stuck() -> str:
        return "sleep 60"

    with pytest.raises(TaskTimeoutError):
        await asyncio.wait_for(stuck(), LIVENESS)


# -- captured output ----------------------------------------------------------------


async def test_captured_output_belongs_to_its_own_call(tmp_path: Path) -> None:
    work_dir, checkpoint = tmp_path / "work", tmp_path / "checkpoint.sqlite"

    async def run(*words: str) -> list[tuple[Path, bool]]:
        async with await WorkflowEngine.create(
            uid="fixed", work_dir=work_dir, checkpoint=checkpoint
        ) as flow:

            @flow.executable_task(capture_stdio=True)
            async def say(word: str) -> str:
                return f"echo {word}; echo {word}-err >&2"

            futs = [say(word) for word in words]
            paths = await asyncio.gather(*futs)
            return [(Path(p), f.restored) for p, f in zip(paths, futs, strict=True)]

    [(first_a, _)] = await run("A")
    assert first_a.read_text() == "A\n"
    # A second run of the same workflow (same uid and checkpoint): `echo B`
    # now runs first, and `echo A` is restored from the checkpoint.
    (path_b, restored_b), (path_a, restored_a) = await run("B", "A")
    assert (restored_b, restored_a) == (False, True)
    assert path_a == first_a
    assert path_b != path_a
    assert path_b.read_text() == "B\n"
    assert path_a.read_text() == "A\n"
    assert path_b.with_suffix(".err").read_text() == "B-err\n"
    assert path_a.with_suffix(".err").read_text() == "A-err\n"


async def test_captured_output_of_uncached_runs_is_per_engine(tmp_path: Path) -> None:
    paths = []
    for word in ("first", "second"):
        async with await WorkflowEngine.create(uid="fixed", work_dir=tmp_path) as flow:

            @flow.executable_task(capture_stdio=True)
            async def say(word: str) -> str:
                return f"echo {word}"

            paths.append(Path(await say(word)))
    assert paths[0] != paths[1]
    assert [p.read_text() for p in paths] == ["first\n", "second\n"]


async def test_captured_output_is_private_to_the_user(
    flow: WorkflowEngine, tmp_path: Path
) -> None:
    flow.work_dir = tmp_path

    @flow.executable_task(capture_stdio=True)
    async def say() -> str:
        return "echo private"

    path = Path(await say())
    folder = path.parent
    assert folder == tmp_path / flow.uid
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for output in (path, path.with_suffix(".err")):
        assert stat.S_IMODE(output.lstat().st_mode) == 0o600
    # Nothing else (no temporary file) is left behind.
    assert sorted(folder.iterdir()) == sorted([path, path.with_suffix(".err")])


async def test_captured_output_refuses_a_folder_of_another_user(
    flow: WorkflowEngine, tmp_path: Path
) -> None:
    flow.work_dir = tmp_path
    folder = tmp_path / flow.uid
    if os.getuid() == 0:
        folder.mkdir()
        os.chown(folder, 65534, 65534)
    else:
        folder.symlink_to("/")  # a link to a folder owned by root

    @flow.executable_task(capture_stdio=True)
    async def say() -> str:
        return "echo nope"

    error = await failure_of(say())
    assert isinstance(error, PermissionError)
    assert "say" in str(error)
    assert "another user" in str(error)
    if os.getuid() == 0:
        assert os.listdir(folder) == []


async def test_planted_symlink_does_not_redirect_captured_output(
    flow: WorkflowEngine, tmp_path: Path
) -> None:
    flow.work_dir = tmp_path
    folder = tmp_path / flow.uid
    folder.mkdir(mode=0o700)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")

    @flow.executable_task(capture_stdio=True)
    async def say() -> str:
        return "echo ours; echo ours-err >&2"

    fut = say()
    # The output's name is known before the command starts: plant links there.
    for suffix in (".out", ".err"):
        (folder / f"{fut.uid}-{flow.run_id}{suffix}").symlink_to(victim)
    path = Path(await fut)
    assert victim.read_text() == "precious\n"
    assert not path.is_symlink()
    assert path.read_text() == "ours\n"
    assert path.with_suffix(".err").read_text() == "ours-err\n"


# -- dry run ------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["noop_backend", "dry_run_flag"])
async def test_dry_run_evaluates_the_body_but_runs_no_command(
    tmp_path: Path, how: str
) -> None:
    marker = tmp_path / "ran"
    evaluated: list[int] = []
    if how == "noop_backend":
        flow = await WorkflowEngine.create(backend=NoopExecutionBackend())
    else:
        flow = await WorkflowEngine.create(dry_run=True)
    try:

        @flow.executable_task
        async def touch(i: int) -> str:
            evaluated.append(i)
            return f"touch {marker}"

        @flow.executable_task
        async def bad_body() -> str:
            raise ValueError("invalid parameters")

        @flow.executable_task
        async def empty_command() -> str:
            return ""

        fut = touch(1)
        assert await fut == DRY_RUN_RESULT
        assert fut.state == "DONE"
        assert evaluated == [1]
        assert not marker.exists()
        error = await failure_of(bad_body())
        assert isinstance(error, ValueError)
        assert "invalid parameters" in str(error)
        error = await failure_of(empty_command())
        assert type(error) is ValueError
        assert "empty_command" in str(error)
    finally:
        await flow.shutdown()
    assert not marker.exists()
