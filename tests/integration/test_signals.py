"""SPEC §2: SIGINT / SIGTERM shut the engine down gracefully, then exit.

Each test runs a real program (``python script.py``) that starts long-running
executable tasks (``sleep 60``, including a background grandchild) and
thread tasks, prints ``READY`` once every command has written its PID and
every thread task has started (markers, not sleeps), and then waits. The
test sends the signal and checks how the program ends.

Exit convention (what a program gets after the graceful shutdown):

* SIGINT  -> ``KeyboardInterrupt`` propagates out of ``asyncio.run``; an
  uncaught ``KeyboardInterrupt`` makes CPython exit by re-raising SIGINT on
  itself, so the return code is ``-2`` (killed by SIGINT) or, where the
  interpreter exits instead, ``130`` (128 + 2). Both are accepted.
* SIGTERM -> ``SystemExit(143)`` (128 + 15), so the return code is ``143``.
* A program that installed its own handler before creating the engine gets
  that handler called after the graceful shutdown; its handler decides.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from ..processes import alive, kill_alive

#: Generous liveness bound: a healthy run needs a fraction of a second.
LIVENESS = 30.0

SCRIPT = textwrap.dedent(
    """
    import asyncio, os, signal, sys, threading, time
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    import psutil

    from asyncflow import LocalExecutionBackend, WorkflowEngine

    directory, mode = Path(sys.argv[1]), sys.argv[2]
    finally_marker = directory / "finally.ran"
    stop = threading.Event()


    def recorded():
        procs = []
        for path in directory.glob("*.pid"):
            try:
                procs.append(psutil.Process(int(path.read_text())))
            except psutil.NoSuchProcess:
                pass
        return procs


    def still_running(procs):
        n = 0
        for p in procs:
            try:
                n += p.is_running() and p.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                pass
        return n


    if mode == "own-handler":
        def on_sigterm(signum, frame):
            # Called after the graceful shutdown: the commands are gone.
            print(f"HANDLER signum={signum} alive={still_running(recorded())}",
                  flush=True)
            sys.exit(7)

        signal.signal(signal.SIGTERM, on_sigterm)


    def pid_snippet(name):
        tmp = directory / f"{name}.tmp"
        return f"echo $$ > {tmp} && mv {tmp} {directory / name}.pid"


    async def workflow(flow, tag):
        @flow.executable_task
        async def simulate(i):
            # A background grandchild and a foreground one, both recorded.
            bg = directory / f"{tag}-bg{i}"
            return (
                f"{pid_snippet(f'{tag}-sh{i}')}; "
                f"sleep 60 & echo $! > {bg}.tmp && mv {bg}.tmp {bg}.pid; sleep 60"
            )

        @flow.function_task
        def analyse(i):
            # Thread work that watches a stop flag (the program sets it in
            # its finally block, as cooperative thread code does).
            (directory / f"{tag}-thread{i}.started").write_text("x")
            while not stop.is_set():
                time.sleep(0.01)

        @flow.function_task
        def blocked(i):
            # Blocking code in a thread that nothing can interrupt.
            (directory / f"{tag}-blocked{i}.started").write_text("x")
            while not (directory / "release").exists():
                time.sleep(0.05)

        futs = [simulate(0), simulate(1), analyse(0), analyse(1)]
        if mode.startswith("blocked-thread"):
            futs.append(blocked(0))
        return futs


    def backend():
        if mode == "blocked-thread-default-pool":
            return LocalExecutionBackend(shutdown_timeout=0.5)
        return LocalExecutionBackend(ThreadPoolExecutor(8), shutdown_timeout=0.5)


    async def main():
        engines = [await WorkflowEngine.create(backend=backend())]
        if mode == "two-engines":
            engines.append(await WorkflowEngine.create(backend=backend()))
        try:
            futs = []
            for n, flow in enumerate(engines):
                futs += await workflow(flow, f"e{n}")
            expected_pids = 4 * len(engines)
            blocking = mode.startswith("blocked-thread")
            expected_started = (2 + blocking) * len(engines)
            while (len(list(directory.glob("*.pid"))) < expected_pids
                   or len(list(directory.glob("*.started"))) < expected_started):
                await asyncio.sleep(0.01)
            print("READY", flush=True)
            await asyncio.gather(*futs)
        finally:
            stop.set()
            finally_marker.write_text("yes")
            print("FINALLY", flush=True)
            for flow in engines:
                await flow.shutdown()
            print("SHUT DOWN", flush=True)
            print("STATES", *sorted({str(f.state) for f in futs}), flush=True)


    asyncio.run(main())
    """
)


def wait_until(predicate: Callable[[], bool], what: str, bound: float) -> None:
    deadline = time.monotonic() + bound
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Program:
    """The script, run as a subprocess, with line-wise access to its stdout."""

    def __init__(self, script: Path, directory: Path, mode: str) -> None:
        self.directory = directory
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(directory), mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
        )
        self.stdout = b""
        self.stderr = b""
        self.commands: list[psutil.Process] = []

    def wait_for_line(self, marker: str, bound: float = LIVENESS) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + bound
        while marker.encode() not in self.stdout.splitlines():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {marker!r} line; stdout={self.stdout!r}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:  # EOF: the program ended before the marker
                    self.finish(bound)
                    raise AssertionError(
                        f"program exited ({self.proc.returncode}) before "
                        f"{marker!r}; stdout={self.stdout!r} stderr={self.err}"
                    )
                self.stdout += chunk

    def record_commands(self) -> None:
        """Remember every process the commands started (PID-reuse safe).

        That is each recorded PID plus every member of its process group
        (each command leads its own group), so the foreground ``sleep`` is
        tracked too.
        """
        leaders = {int(path.read_text()) for path in self.directory.glob("*.pid")}
        seen: set[int] = set()
        for proc in psutil.process_iter():
            try:
                if proc.pid in leaders or os.getpgid(proc.pid) in leaders:
                    self.commands.append(proc)
                    seen.add(proc.pid)
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
        assert leaders <= seen, "a command ended before the signal was sent"

    def finish(self, bound: float = LIVENESS) -> None:
        out, err = self.proc.communicate(timeout=bound)
        self.stdout += out
        self.stderr += err

    @property
    def out(self) -> str:
        return self.stdout.decode(errors="replace")

    @property
    def err(self) -> str:
        return self.stderr.decode(errors="replace")

    def cleanup(self) -> None:
        (self.directory / "release").write_text("x")
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.communicate(timeout=LIVENESS)
        except (subprocess.TimeoutExpired, ValueError):
            pass
        kill_alive(self.commands)


@pytest.fixture
def run_program(tmp_path: Path) -> Iterator[Callable[[str], Program]]:
    script = tmp_path / "workflow.py"
    script.write_text(SCRIPT)
    programs: list[Program] = []

    def start(mode: str) -> Program:
        directory = tmp_path / f"run-{len(programs)}"
        directory.mkdir()
        program = Program(script, directory, mode)
        programs.append(program)
        program.wait_for_line("READY")
        program.record_commands()
        return program

    yield start
    for program in programs:
        program.cleanup()


def assert_graceful(program: Program, signame: str) -> None:
    # The library logs its shutdown (WARNING: visible at the default level).
    assert "shutting down" in program.err, program.err
    assert signame in program.err, program.err
    # The user's try/finally ran.
    assert (program.directory / "finally.ran").read_text() == "yes"
    assert "FINALLY" in program.out
    # No command process outlived the program (grandchildren included).
    assert len(program.commands) >= 6
    survivors = [p.pid for p in program.commands if alive(p)]
    assert not survivors, f"orphaned processes: {survivors}"


def assert_finally_completed(program: Program) -> None:
    """``await flow.shutdown()`` in the finally block returned normally and
    every future was settled (CANCELLED) by then."""
    assert "SHUT DOWN" in program.out, (program.out, program.err)
    assert "STATES CANCELLED" in program.out.splitlines(), program.out


def test_sigint_shuts_down_gracefully_and_raises_keyboard_interrupt(
    run_program,
) -> None:
    program = run_program("plain")
    program.proc.send_signal(signal.SIGINT)
    program.finish()
    assert program.proc.returncode in (-signal.SIGINT, 128 + signal.SIGINT), (
        program.proc.returncode,
        program.err,
    )
    assert "KeyboardInterrupt" in program.err
    assert_graceful(program, "SIGINT")
    assert_finally_completed(program)


def test_sigterm_shuts_down_gracefully_and_exits_143(run_program) -> None:
    program = run_program("plain")
    program.proc.send_signal(signal.SIGTERM)
    program.finish()
    assert program.proc.returncode == 128 + signal.SIGTERM, program.err
    assert_graceful(program, "SIGTERM")
    assert_finally_completed(program)


def test_sigterm_stops_the_work_of_every_engine_in_the_process(run_program) -> None:
    program = run_program("two-engines")
    assert len(program.commands) == 12  # 2 engines x 2 commands x 3 processes
    program.proc.send_signal(signal.SIGTERM)
    program.finish()
    assert program.proc.returncode == 128 + signal.SIGTERM, program.err
    assert "2 workflow engine" in program.err
    assert_graceful(program, "SIGTERM")


@pytest.mark.parametrize("signame", ["SIGTERM"])
def test_with_two_engines_the_users_finally_completes(run_program, signame) -> None:
    program = run_program("two-engines")
    program.proc.send_signal(getattr(signal, signame))
    program.finish()
    assert_graceful(program, signame)
    assert_finally_completed(program)


def test_own_sigterm_handler_is_called_after_the_graceful_shutdown(
    run_program,
) -> None:
    program = run_program("own-handler")
    program.proc.send_signal(signal.SIGTERM)
    program.finish()
    # The program's handler ran, once, and decided the exit code.
    handler_lines = [
        line for line in program.out.splitlines() if line.startswith("HANDLER")
    ]
    assert handler_lines == [f"HANDLER signum={int(signal.SIGTERM)} alive=0"], (
        program.out,
        program.err,
    )
    assert program.proc.returncode == 7, program.err
    assert_graceful(program, "SIGTERM")
    assert_finally_completed(program)


def sigint_with_a_stuck_thread(program: Program) -> None:
    program.proc.send_signal(signal.SIGINT)
    # The graceful shutdown itself is bounded (shutdown_timeout=0.5).
    program.wait_for_line("SHUT DOWN")
    # Exiting after that takes a fraction of a second; 5 s is generous.
    try:
        program.finish(bound=5)
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not exit after its graceful shutdown")
    assert program.proc.returncode in (-signal.SIGINT, 128 + signal.SIGINT)
    assert "abandoned" in program.err  # the stuck task is reported
    assert_graceful(program, "SIGINT")
    assert_finally_completed(program)


def test_sigint_exits_even_with_a_thread_stuck_in_blocking_code(
    run_program,
) -> None:
    """The default thread pool (``LocalExecutionBackend()``)."""
    sigint_with_a_stuck_thread(run_program("blocked-thread-default-pool"))


@pytest.mark.slow
def test_sigint_exits_with_a_stuck_thread_in_a_user_thread_pool(
    run_program,
) -> None:
    sigint_with_a_stuck_thread(run_program("blocked-thread"))


def test_no_orphans_check_is_meaningful(run_program) -> None:
    """Control: killing the program outright (no graceful path) *does* orphan.

    Proves the orphan assertions above can fail: with SIGKILL the engine gets
    no chance to stop its commands, and the recorded processes survive.
    """
    program = run_program("plain")
    program.proc.kill()
    program.finish()
    assert any(alive(p) for p in program.commands)
    assert "FINALLY" not in program.out
