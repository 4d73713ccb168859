"""Running executable tasks as asyncio subprocesses, a bounded number at a time."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import shlex
import shutil
import signal
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ExecutableError
from ..tasks import TaskFuture, TaskState
from .base import TaskReporter, log_started

#: Seconds between SIGTERM and SIGKILL when a command is stopped.
TERMINATE_GRACE = 3.0


def _environment(overrides: Mapping[str, Any] | None) -> dict[str, str] | None:
    if not overrides:
        return None
    env = dict(os.environ)
    env.update({str(k): str(v) for k, v in overrides.items()})
    return env


def _kill_group(proc: asyncio.subprocess.Process, sig: int) -> None:
    # Each command leads its own session, so its pid is its process group:
    # signalling the group also reaches what a shell command started.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


async def terminate(proc: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM the command's process group, then SIGKILL it after ``grace``.

    The SIGKILL is sent however the wait ends, even when it is cancelled
    because the program is going down: the group never outlives its task.
    """
    _kill_group(proc, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except asyncio.TimeoutError:
        pass
    finally:
        _kill_group(proc, signal.SIGKILL)
    await proc.wait()


#: A command made only of these characters has no shell syntax in it.
_PLAIN = re.compile(r"[A-Za-z0-9_\-./:,+@%= ]+")
#: Names the shell runs itself (or differently from the program of that name).
_SHELL_WORDS = frozenset(
    [
        "alias",
        "bg",
        "break",
        "cd",
        "command",
        "continue",
        "echo",
        "eval",
        "exec",
        "exit",
        "export",
        "false",
        "fc",
        "fg",
        "getopts",
        "hash",
        "jobs",
        "kill",
        "local",
        "printf",
        "pwd",
        "read",
        "readonly",
        "return",
        "set",
        "shift",
        "source",
        "test",
        "times",
        "trap",
        "true",
        "type",
        "ulimit",
        "umask",
        "unalias",
        "unset",
        "wait",
    ]
)


@functools.lru_cache(maxsize=256)
def _on_path(program: str, path: str | None) -> bool:
    return shutil.which(program, path=path) is not None


def _direct_argv(command: str, options: dict[str, Any]) -> list[str] | None:
    """argv for running ``command`` without a shell, when that cannot change
    what it does: plain words, the first naming an existing program."""
    if not _PLAIN.fullmatch(command):
        return None
    argv = command.split()
    if not argv or "=" in argv[0] or argv[0] in _SHELL_WORDS:
        return None
    program = argv[0]
    env = options.get("env")
    if env is not None and env.get("PATH") != os.environ.get("PATH"):
        return None
    if "/" in program:
        if not os.path.isabs(program) and options.get("cwd") is not None:
            return None
        usable = os.path.isfile(program) and os.access(program, os.X_OK)
    else:
        usable = _on_path(program, os.environ.get("PATH"))
    return argv if usable else None


async def _spawn(
    command: Any, shell: bool, options: dict[str, Any]
) -> asyncio.subprocess.Process:
    if shell:
        # Skipping ``sh -c`` for a plain command saves a process start.
        argv = _direct_argv(command, options)
        if argv is not None:
            return await asyncio.create_subprocess_exec(*argv, **options)
        return await asyncio.create_subprocess_shell(command, **options)
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    return await asyncio.create_subprocess_exec(*argv, **options)


async def _stop_when_spawned(
    spawning: asyncio.Future[asyncio.subprocess.Process], grace: float
) -> None:
    """Let an interrupted spawn finish (however often we are cancelled
    meanwhile: cancelling it would strand asyncio's transport), then stop
    the process group it started."""
    while not spawning.done():
        try:
            await asyncio.shield(spawning)
        except asyncio.CancelledError:
            continue
        except Exception:
            return
    if spawning.cancelled() or spawning.exception() is not None:
        return
    await asyncio.shield(terminate(spawning.result(), grace))


async def run_command(task: TaskFuture, grace: float = TERMINATE_GRACE) -> str:
    """Run ``task.command``; return its stdout or raise :class:`ExecutableError`."""
    command = task.command
    desc = task.task_description
    capture = task._definition.capture_stdio
    files: tuple[Path, Path] | None = None
    streams: tuple[Any, Any] = (asyncio.subprocess.PIPE, asyncio.subprocess.PIPE)
    if capture:
        engine = task._engine
        folder = Path(engine.work_dir) / engine.uid
        folder.mkdir(parents=True, exist_ok=True)
        files = (folder / f"{task.uid}.out", folder / f"{task.uid}.err")
        streams = (files[0].open("wb"), files[1].open("wb"))
    common: dict[str, Any] = {
        "stdin": asyncio.subprocess.DEVNULL,
        "stdout": streams[0],
        "stderr": streams[1],
        "start_new_session": True,
        "env": _environment(desc.get("env")),
        "cwd": desc.get("cwd"),
    }
    try:
        # Cancelled mid-spawn, asyncio would kill the shell alone and leave
        # what it started: let the spawn finish, then stop the whole group.
        spawning = asyncio.ensure_future(
            _spawn(command, desc.get("shell", True), common)
        )
        try:
            proc = await asyncio.shield(spawning)
        except asyncio.CancelledError:
            await _stop_when_spawned(spawning, grace)
            raise
        log_started(task, f" as process {proc.pid}")
        try:
            out, err = await proc.communicate()
        except BaseException:
            # Cancelled (or the loop is going down): the command must not
            # outlive its task. Shield the clean-up from a second cancellation.
            await asyncio.shield(terminate(proc, grace))
            raise
    finally:
        if files is not None:
            streams[0].close()
            streams[1].close()
    if files is not None:
        stdout = str(files[0])
        if proc.returncode:
            out = files[0].read_bytes()
            err = files[1].read_bytes()
    else:
        stdout = out.decode(errors="replace")
    if proc.returncode:
        raise ExecutableError(
            task.name,
            command,
            proc.returncode,
            out.decode(errors="replace"),
            err.decode(errors="replace"),
        )
    return stdout


class SubprocessRunner:
    """Runs at most ``limit`` commands at once; the rest wait in a queue.

    Only running commands have a coroutine; queued ones are plain records.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"subprocess limit must be at least 1, got {limit}")
        self.limit = limit
        self._queue: deque[TaskFuture] = deque()
        self._running: set[asyncio.Task[None]] = set()
        self._reporter: TaskReporter | None = None
        self._closed = False

    def bind(self, reporter: TaskReporter) -> None:
        self._reporter = reporter

    def submit(self, task: TaskFuture) -> None:
        self._queue.append(task)
        self._pump()

    def _pump(self) -> None:
        queue = self._queue
        while queue and len(self._running) < self.limit and not self._closed:
            task = queue.popleft()
            if task.state is not TaskState.RUNNING:
                continue
            runner = asyncio.get_running_loop().create_task(self._run(task))
            task._handle = runner
            self._running.add(runner)

    async def _run(self, task: TaskFuture) -> None:
        reporter = self._reporter
        assert reporter is not None
        attempt = task.attempts
        try:
            stdout = await run_command(task)
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            if task.attempts == attempt:
                reporter.failed(task, exc)
        else:
            if task.attempts == attempt:
                reporter.succeeded(task, stdout)
        finally:
            current = asyncio.current_task()
            if current is not None:
                self._running.discard(current)
            self._pump()

    def cancel(self, task: TaskFuture) -> None:
        handle = task._handle
        if isinstance(handle, asyncio.Task):
            handle.cancel()
        # A queued task is skipped by _pump once it is no longer RUNNING.

    async def shutdown(self) -> None:
        self._closed = True
        self._queue.clear()
        running = list(self._running)
        for runner in running:
            runner.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
