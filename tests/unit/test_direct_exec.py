"""Plain commands skip ``sh -c`` only where that cannot change their meaning."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from asyncflow.backends._subprocess import _direct_argv


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
