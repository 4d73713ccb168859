"""Plain commands skip ``sh -c`` only where that cannot change their meaning,
and a command started without the shell ends as it would have with it."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from asyncflow.backends._subprocess import _direct_argv, _NotStarted, _spawn


@pytest.mark.parametrize(
    ("command", "argv"),
    [
        ("/bin/true", ["/bin/true"]),
        ("sleep 5", ["sleep", "5"]),
        ("ls -l --color=never /tmp", ["ls", "-l", "--color=never", "/tmp"]),
    ],
)
def test_plain_commands_run_directly(command: str, argv: list[str]) -> None:
    assert _direct_argv(command, {}) == argv


@pytest.mark.parametrize(
    "command",
    [
        "echo $HOME",  # expansion
        "ls | wc -l",  # pipeline
        "sleep 1; true",  # list
        "cat *.txt",  # glob
        "echo 'quoted words'",  # quoting
        "FOO=1 env",  # assignment
        "exit 3",  # builtin
        "echo -e plain",  # builtin that differs from /bin/echo
        "cd /tmp",  # builtin
        "no-such-program-here arg",  # the shell reports 127 itself
        "/no/such/file",
        "ls ~",  # tilde expansion
        "ls\nwc",  # two commands
    ],
)
def test_anything_else_goes_through_the_shell(command: str) -> None:
    assert _direct_argv(command, {}) is None


def test_relative_program_with_a_task_cwd_goes_through_the_shell(
    tmp_path: Path,
) -> None:
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\necho ok\n")
    script.chmod(0o755)
    assert _direct_argv("./run.sh", {"cwd": str(tmp_path)}) is None
    assert _direct_argv(str(script), {"cwd": str(tmp_path)}) == [str(script)]


def test_a_changed_path_goes_through_the_shell() -> None:
    env = dict(os.environ, PATH="/nowhere")
    assert _direct_argv("sleep 1", {"env": env}) is None
    assert _direct_argv("sleep 1", {"env": dict(os.environ)}) == ["sleep", "1"]


# -- starting: a failed direct start ends as it would through the shell -------------

PIPES: dict[str, Any] = {
    "stdin": asyncio.subprocess.DEVNULL,
    "stdout": asyncio.subprocess.PIPE,
    "stderr": asyncio.subprocess.PIPE,
}


async def outcome(proc: asyncio.subprocess.Process) -> tuple[int | None, str, str]:
    out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()


def test_a_script_without_shebang_is_started_directly(tmp_path: Path) -> None:
    # exec then fails with ENOEXEC: the start must fall back to the shell.
    script = tmp_path / "legacy"
    script.write_text("echo legacy\n")
    script.chmod(0o755)
    assert _direct_argv(str(script), {}) == [str(script)]


async def test_a_script_without_shebang_runs_as_through_the_shell(
    tmp_path: Path,
) -> None:
    script = tmp_path / "legacy"
    script.write_text('echo "legacy $1"\n')
    script.chmod(0o755)
    assert await outcome(await _spawn(f"{script} ok", False, PIPES)) == (
        0,
        "legacy ok\n",
        "",
    )


async def test_a_program_gone_since_it_was_seen_is_reported_by_the_shell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tool = tmp_path / "af-unit-vanishing"
    tool.write_text("#!/bin/sh\necho here\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert await outcome(await _spawn("af-unit-vanishing", False, PIPES)) == (
        0,
        "here\n",
        "",
    )
    tool.unlink()
    # What was learnt about PATH is stale now ...
    assert _direct_argv("af-unit-vanishing", {}) == ["af-unit-vanishing"]
    # ... and the outcome is still exactly the shell's.
    code, out, err = await outcome(await _spawn("af-unit-vanishing", False, PIPES))
    shell = await asyncio.create_subprocess_exec(
        "/bin/sh", "-c", "af-unit-vanishing", **PIPES
    )
    assert (code, out, err) == await outcome(shell)
    assert code == 127


@pytest.mark.parametrize(
    ("program", "status", "reason"),
    [
        ("af-unit-no-such-program", 127, "not found"),
        ("{tmp}/no/such/program", 127, "not found"),
        ("{tmp}/data.txt", 126, "Permission denied"),  # not executable
        ("{tmp}", 126, "Permission denied"),  # a directory
    ],
)
async def test_an_argv_program_that_cannot_start_gets_the_shells_status(
    tmp_path: Path, program: str, status: int, reason: str
) -> None:
    (tmp_path / "data.txt").write_text("data\n")
    program = program.format(tmp=tmp_path)
    with pytest.raises(_NotStarted) as info:
        await _spawn([program, "arg"], True, PIPES)
    assert info.value.exit_code == status
    assert info.value.stderr == f"{program}: {reason}\n"


async def test_a_missing_cwd_is_not_blamed_on_the_program(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError) as info:
        await _spawn(["true"], True, {**PIPES, "cwd": str(missing)})
    assert info.value.filename == str(missing)


async def test_an_argument_list_is_never_parsed(tmp_path: Path) -> None:
    words = ["a b", "$HOME", "; echo injected", "*"]
    code, out, _ = await outcome(
        await _spawn(["printf", "[%s]\n", *words], True, PIPES)
    )
    assert code == 0
    assert out == "".join(f"[{w}]\n" for w in words)
