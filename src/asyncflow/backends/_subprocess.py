"""Running executable tasks as asyncio subprocesses, a bounded number at a time.

Every command leads its own session, so its process group holds everything it
started. A command that is stopped (cancelled, timed out, shut down) gets
SIGTERM, a grace period, then SIGKILL, and the coroutine that ran it ends only
once no process of its group is left: callers may take "its runner is done"
to mean "this attempt has really stopped".
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import re
import signal
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import ExecutableError
from ..resources import Grant
from ..tasks import TaskFuture, TaskState
from .base import TaskReporter, log_started

if TYPE_CHECKING:
    from pathlib import Path

_log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Seconds between SIGTERM and SIGKILL when a command is stopped.
TERMINATE_GRACE = 3.0
#: Seconds we wait for SIGKILLed processes to disappear before giving up on
#: them (one stuck in the kernel): stopping must never hang.
REAP_BOUND = 5.0

#: How sh reports a program it could not start: not found, or not runnable.
_NOT_FOUND = 127
_CANNOT_EXECUTE = 126


def _environment(
    overrides: Mapping[str, Any] | None, placement: Mapping[str, str] | None = None
) -> dict[str, str] | None:
    if not overrides and not placement:
        return None
    env = dict(os.environ)
    if placement:
        env.update(placement)
    if overrides:
        env.update({str(k): str(v) for k, v in overrides.items()})
    return env


# -- process groups ----------------------------------------------------------------


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _has_live_member(pgid: int) -> bool:
    """Whether a process other than a zombie is in group ``pgid``.

    Orphaned members are reparented to PID 1, which in a container may never
    reap them: a group of zombies still "exists" for ``killpg``, so only
    ``/proc`` tells whether anything in it still runs.
    """
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True  # no /proc: we cannot tell zombies apart
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat_file:
                stat = stat_file.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields are
        # counted from the last ")". They are: state, ppid, pgrp, ...
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in b"ZX":
            return True
    return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # only processes we may not signal are left: not ours to stop
    return _has_live_member(pgid)


async def _group_gone(pgid: int, bound: float) -> bool:
    """Wait (at most ``bound`` seconds) until group ``pgid`` has no live process."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound
    pause = 0.001
    while _group_alive(pgid):
        left = deadline - loop.time()
        if left <= 0:
            return False
        # SIGKILL is delivered within moments: poll briefly, then back off.
        await asyncio.sleep(min(pause, left))
        pause = min(pause * 2, 0.05)
    return True


async def terminate(proc: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM the command's process group, SIGKILL what is left after
    ``grace`` seconds, and return once no process of the group runs.

    The SIGKILL is sent however the wait ends, even when it is cancelled
    because the program is going down: the group never outlives its task.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    pgid = proc.pid
    gone = False
    _kill_group(pgid, signal.SIGTERM)
    try:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(proc.wait(), grace)
        # The shell may die at once while a child of it handles SIGTERM:
        # the child gets the rest of the grace period too.
        gone = await _group_gone(pgid, deadline - loop.time())
    finally:
        if not gone:
            # Not after the group was seen empty: its ID may be reused.
            _kill_group(pgid, signal.SIGKILL)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(proc.wait(), REAP_BOUND)
    if not gone and not await _group_gone(pgid, REAP_BOUND):
        _log.warning(
            "process group %d still has live processes %.1fs after SIGKILL",
            pgid,
            REAP_BOUND,
        )


class ProcessGroups:
    """The process groups of commands that may still be running."""

    def __init__(self) -> None:
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._killing = False

    def add(self, proc: asyncio.subprocess.Process) -> None:
        self._procs[proc.pid] = proc
        if self._killing:
            # Spawned while kill_all ran (the spawn was already under way).
            _kill_group(proc.pid, signal.SIGKILL)

    def discard(self, proc: asyncio.subprocess.Process) -> None:
        if self._procs.get(proc.pid) is proc:
            del self._procs[proc.pid]

    def kill_all(self) -> None:
        """SIGKILL every group now, and every group added from now on."""
        self._killing = True
        for pgid in list(self._procs):
            _kill_group(pgid, signal.SIGKILL)

    async def kill_left(self) -> None:
        """SIGKILL whatever is still tracked; return once it is gone."""
        for proc in list(self._procs.values()):
            _kill_group(proc.pid, signal.SIGKILL)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), REAP_BOUND)
            await _group_gone(proc.pid, REAP_BOUND)
            self.discard(proc)


async def _outlast(fut: asyncio.Future[_T]) -> _T:
    """``fut``'s outcome, awaited to its end however often we are cancelled
    meanwhile: the caller re-raises the cancellation once it is done."""
    while not fut.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([fut])
    return fut.result()


# -- starting a command ------------------------------------------------------------


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
    # Only a hint (it may be stale): a failed direct start falls back to sh.
    import shutil

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


class _NotStarted(Exception):
    """An argument-list command whose program could not be started; carries
    the exit status and message sh would have given."""

    def __init__(self, exit_code: int, stderr: str) -> None:
        super().__init__(stderr)
        self.exit_code = exit_code
        self.stderr = stderr


async def _exec_argv(argv: list[str], options: dict[str, Any]) -> Any:
    program = argv[0]
    try:
        return await asyncio.create_subprocess_exec(*argv, **options)
    except OSError as exc:
        if exc.filename != program:
            # subprocess names the cwd when changing to it failed: that is
            # not the command's fault, and sh would fail to start as well.
            raise
        if exc.errno == errno.ENOEXEC:
            # An executable script without "#!": run it with sh, as execvp
            # and every shell do. Its arguments are passed, not parsed.
            if "/" not in program:
                import shutil

                search = os.pathsep.join(os.get_exec_path(options.get("env")))
                program = shutil.which(program, path=search) or program
            return await asyncio.create_subprocess_exec(
                "/bin/sh", program, *argv[1:], **options
            )
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise _NotStarted(_NOT_FOUND, f"{program}: not found\n") from None
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise _NotStarted(_CANNOT_EXECUTE, f"{program}: {reason}\n") from None


async def _spawn(command: Any, argv_mode: bool, options: dict[str, Any]) -> Any:
    if argv_mode:
        import shlex

        argv = shlex.split(command) if isinstance(command, str) else list(command)
        return await _exec_argv(argv, options)
    # Skipping ``sh -c`` for a plain command saves a process start.
    direct = _direct_argv(command, options)
    if direct is not None:
        try:
            return await asyncio.create_subprocess_exec(*direct, **options)
        except OSError:
            # Gone since it was seen, or a script without "#!": let the
            # shell run or report it, so the outcome is the shell's.
            pass
    return await asyncio.create_subprocess_shell(command, **options)


# -- captured output ---------------------------------------------------------------


#: What a file name built from a task's name or key may keep.
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def _private_folder(folder: Path, task: TaskFuture) -> None:
    """Create ``folder`` for this user only, or check that it is this user's."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        pass
    else:
        os.chmod(folder, 0o700)  # whatever the umask took away from the owner
    uid = os.getuid()
    link, target = os.lstat(folder), os.stat(folder)
    if link.st_uid != uid or target.st_uid != uid:
        owner = link.st_uid if link.st_uid != uid else target.st_uid
        raise PermissionError(
            f"executable task {task.name!r} ({task.uid}): refusing to write its "
            f"captured output into {folder}, which belongs to another user "
            f"(uid {owner}); give the engine a work_dir or uid of your own"
        )
    if not os.path.isdir(folder):
        raise NotADirectoryError(
            f"executable task {task.name!r} ({task.uid}): cannot write its "
            f"captured output into {folder}: it is not a directory"
        )


class _Outputs:
    """The stdout/stderr files of one attempt of a ``capture_stdio`` task.

    Written under temporary names and renamed when the command ends, so a
    result path always holds one whole run's output, even when two calls
    with the same cache key run at once.
    """

    def __init__(self, task: TaskFuture) -> None:
        from pathlib import Path

        engine = task._engine
        folder = Path(engine.work_dir) / engine.uid
        _private_folder(folder, task)
        key = task._key
        if key is not None:
            # Same key, same call: a restored result names this very file.
            stem = f"{_UNSAFE.sub('_', task.name)[:100]}-{_UNSAFE.sub('_', key)[:20]}"
        else:
            stem = f"{task.uid}-{engine.run_id}"
        self.out = folder / f"{stem}.out"
        self.err = folder / f"{stem}.err"
        unique = f"{task.uid}.{engine.run_id}.{task.attempts}"
        self._tmp: tuple[Path, ...] = (
            folder / f".{stem}.{unique}.out.tmp",
            folder / f".{stem}.{unique}.err.tmp",
        )
        self.fds: list[int] = []
        try:
            for path in self._tmp:
                self.fds.append(_create(path))
        except BaseException:
            # Only what we created: a file planted under our name stays.
            self._tmp = self._tmp[: len(self.fds)]
            self.discard()
            raise

    def close(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)

    def keep(self) -> None:
        self.close()
        os.replace(self._tmp[1], self.err)
        os.replace(self._tmp[0], self.out)

    def discard(self) -> None:
        self.close()
        for path in self._tmp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _create(path: Path) -> int:
    # O_EXCL and O_NOFOLLOW: a file or link planted under our name fails the
    # task instead of receiving (or redirecting) our writes.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(path, flags, 0o600)


# -- running a command -------------------------------------------------------------


async def run_command(
    task: TaskFuture,
    grace: float = TERMINATE_GRACE,
    groups: ProcessGroups | None = None,
    placement: Mapping[str, str] | None = None,
    cpu_ids: Sequence[int] = (),
) -> str:
    """Run ``task.command``; return its stdout or raise :class:`ExecutableError`.

    ``placement`` (``CUDA_VISIBLE_DEVICES``, ``OMP_NUM_THREADS``, ...) is set
    in its environment under the task's own ``env``; ``cpu_ids`` pins it.
    Cancelled, it stops the command's process group and re-raises only once
    the group is gone, however often it is cancelled meanwhile.
    """
    if groups is None:
        groups = ProcessGroups()
    command = task.command
    desc = task.task_description
    # An argument list never goes through a shell: nothing in it is parsed.
    argv_mode = isinstance(command, list) or not desc.get("shell", True)
    outputs = _Outputs(task) if task._definition.capture_stdio else None
    pipe = asyncio.subprocess.PIPE
    options: dict[str, Any] = {
        "stdin": asyncio.subprocess.DEVNULL,
        "stdout": outputs.fds[0] if outputs else pipe,
        "stderr": outputs.fds[1] if outputs else pipe,
        "start_new_session": True,
        "env": _environment(desc.get("env"), placement),
        "cwd": desc.get("cwd"),
    }
    if cpu_ids:
        options["preexec_fn"] = functools.partial(os.sched_setaffinity, 0, cpu_ids)
    finished = False
    try:
        returncode, out, err, started = await _run_process(
            task, command, argv_mode, options, grace, groups
        )
        if outputs is not None:
            if not started:
                os.write(outputs.fds[1], err)
            outputs.keep()
        finished = True
    finally:
        if outputs is not None and not finished:
            outputs.discard()
    if outputs is not None and not returncode:
        return str(outputs.out)
    if outputs is not None:
        out, err = outputs.out.read_bytes(), outputs.err.read_bytes()
    if returncode:
        raise ExecutableError(
            task.name,
            command,
            returncode,
            out.decode(errors="replace"),
            err.decode(errors="replace"),
        )
    return out.decode(errors="replace")


async def _run_process(
    task: TaskFuture,
    command: Any,
    argv_mode: bool,
    options: dict[str, Any],
    grace: float,
    groups: ProcessGroups,
) -> tuple[int, bytes, bytes, bool]:
    """(exit status, stdout, stderr, started) of the command. When its
    program could not be started, the status and stderr are those sh gives."""
    # Cancelled mid-spawn, asyncio would kill the shell alone and leave what
    # it started: let the spawn finish, then stop the whole group.
    spawning = asyncio.ensure_future(_spawn(command, argv_mode, options))
    try:
        proc = await asyncio.shield(spawning)
    except asyncio.CancelledError:
        await _stop_when_spawned(spawning, grace, groups)
        raise
    except _NotStarted as exc:
        return exc.exit_code, b"", exc.stderr.encode(), False
    groups.add(proc)
    log_started(task, f" as process {proc.pid}")
    try:
        out, err = await proc.communicate()
    except BaseException:
        # Cancelled (or the loop is going down): the command must not
        # outlive its task, and we must not end before it is gone.
        await _outlast(asyncio.ensure_future(terminate(proc, grace)))
        groups.discard(proc)
        raise
    # What it started in the background and left running stays tracked:
    # the engine's shutdown stops it (a live group's ID is never reused).
    if not _group_alive(proc.pid):
        groups.discard(proc)
    assert proc.returncode is not None
    return proc.returncode, out or b"", err or b"", True


async def _stop_when_spawned(
    spawning: asyncio.Future[Any], grace: float, groups: ProcessGroups
) -> None:
    """Let an interrupted spawn finish (cancelling it would strand asyncio's
    transport), then stop the process group it started."""
    try:
        proc = await _outlast(spawning)
    except Exception:
        return
    groups.add(proc)
    try:
        await _outlast(asyncio.ensure_future(terminate(proc, grace)))
    finally:
        groups.discard(proc)


class SubprocessRunner:
    """Runs at most ``limit`` commands at once; the rest wait in a queue.

    Only running commands have a coroutine; queued ones are plain records.
    A stopped command holds its slot until its process group is gone.
    """

    def __init__(
        self,
        limit: int,
        *,
        grace: float = TERMINATE_GRACE,
        on_end: Callable[[Grant], None] | None = None,
    ) -> None:
        if limit < 1:
            raise ValueError(f"subprocess limit must be at least 1, got {limit}")
        self.limit = limit
        self.grace = grace
        #: Called with a command's grant once its process group is gone.
        self.on_end = on_end
        self._queue: deque[
            tuple[TaskFuture, int, Grant | None, Mapping[str, str] | None]
        ] = deque()
        #: The attempt each queued task waits to run; a withdrawn or stale
        #: queue entry is skipped when it comes up.
        self._waiting: dict[TaskFuture, int] = {}
        self._running: set[asyncio.Task[None]] = set()
        self._groups = ProcessGroups()
        self._reporter: TaskReporter | None = None
        self._closed = False

    def bind(self, reporter: TaskReporter) -> None:
        self._reporter = reporter

    def submit(
        self,
        task: TaskFuture,
        grant: Grant | None = None,
        placement: Mapping[str, str] | None = None,
    ) -> None:
        """Queue ``task``'s command; ``grant`` (what it was admitted with) is
        handed to ``on_end`` when it is over, ``placement`` set in its
        environment."""
        self._queue.append((task, task.attempts, grant, placement))
        self._waiting[task] = task.attempts
        self._pump()

    def _pump(self) -> None:
        queue, waiting = self._queue, self._waiting
        reporter = self._reporter
        assert reporter is not None
        while queue and len(self._running) < self.limit and not self._closed:
            task, attempt, grant, placement = queue.popleft()
            if waiting.get(task) != attempt or (
                task.state is not TaskState.RUNNING or task.attempts != attempt
            ):
                if waiting.get(task) == attempt:
                    del waiting[task]
                if grant is not None and self.on_end is not None:
                    self.on_end(grant)
                continue
            del waiting[task]
            # Its timeout counts from here, not from its time in the queue.
            reporter.started(task, attempt)
            runner = asyncio.get_running_loop().create_task(
                self._run(task, attempt, grant, placement)
            )
            # A callback, not a ``finally`` in _run: a runner cancelled before
            # its first step never enters its body, and would keep its slot.
            runner.add_done_callback(functools.partial(self._ended, grant))
            task._handle = runner
            self._running.add(runner)

    def _ended(self, grant: Grant | None, runner: asyncio.Task[None]) -> None:
        self._running.discard(runner)
        if grant is not None and self.on_end is not None:
            self.on_end(grant)
        self._pump()

    async def _run(
        self,
        task: TaskFuture,
        attempt: int,
        grant: Grant | None = None,
        placement: Mapping[str, str] | None = None,
    ) -> None:
        reporter = self._reporter
        assert reporter is not None
        try:
            stdout = await run_command(
                task,
                self.grace,
                self._groups,
                placement,
                grant.cpu_ids if grant is not None else (),
            )
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            if task.attempts == attempt:
                reporter.failed(task, exc)
        else:
            if task.attempts == attempt:
                reporter.succeeded(task, stdout)

    def cancel(self, task: TaskFuture) -> None:
        handle = task._handle
        if handle in self._running:
            handle.cancel()
        else:
            self._waiting.pop(task, None)

    def kill_all(self) -> None:
        """SIGKILL every running command's process group at once (no grace).

        Their runners then end as usual; nothing queued starts any more.
        """
        self._closed = True
        self._queue.clear()
        self._waiting.clear()
        self._groups.kill_all()

    async def shutdown(self) -> None:
        """Stop every command; return once none of their processes is left."""
        self._closed = True
        self._queue.clear()
        self._waiting.clear()
        running = list(self._running)
        for runner in running:
            runner.cancel()
        try:
            if running:
                await asyncio.wait(running)
            await self._groups.kill_left()
        except asyncio.CancelledError:
            # Our caller gave up waiting for the grace periods: nothing may
            # outlive it, so no grace is left to give.
            self._groups.kill_all()
            raise
