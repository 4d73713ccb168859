"""SPEC §2: SIGINT / SIGTERM shut the engine down gracefully, then exit.

Each test runs a real program (``python script.py``) that starts long-running
executable tasks (``sleep 60``, including a background grandchild) and
thread tasks, prints ``READY`` once every command has written its PID and
every thread task has started (markers, not sleeps), and then waits. The
test sends the signal and checks how the program ends. (Only the check that
no event loop outlives its run works in this process, in pytest's main
thread.)

Exit convention (what a program gets after the graceful shutdown):

* SIGINT  -> ``KeyboardInterrupt`` propagates out of ``asyncio.run``; an
  uncaught ``KeyboardInterrupt`` makes CPython exit by re-raising SIGINT on
  itself, so the return code is ``-2`` (killed by SIGINT) or, where the
  interpreter exits instead, ``130`` (128 + 2). Both are accepted.
* SIGTERM -> ``SystemExit(143)`` (128 + 15), so the return code is ``143``.
* A program that installed its own handler before creating the engine
  (``signal.signal`` or ``loop.add_signal_handler``) gets that handler called
  after the graceful shutdown; its handler decides. The handler is back in
  place afterwards, and after ``flow.shutdown()``.
* A second signal during the graceful shutdown kills the running work and
  lets the exit proceed at once.
"""

from __future__ import annotations

import asyncio
import gc
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from asyncflow import WorkflowEngine
from asyncflow.observers.trace import read_trace

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

    def __init__(self, script: Path, directory: Path, *args: str) -> None:
        self.directory = directory
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(directory), *args],
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
        # Whole lines only: a signal handler may print in the middle of one.
        while marker.encode() not in self.stdout.rpartition(b"\n")[0].splitlines():
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
        # Each shell and its background sleep wrote a PID file; its
        # foreground sleep may still be starting: wait (bounded) for it.
        expected = len(leaders) * 3 // 2
        deadline = time.monotonic() + LIVENESS
        while True:
            found: list[psutil.Process] = []
            for proc in psutil.process_iter():
                try:
                    if proc.pid in leaders or os.getpgid(proc.pid) in leaders:
                        found.append(proc)
                except (ProcessLookupError, psutil.NoSuchProcess):
                    pass
            if len(found) >= expected or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        self.commands.extend(found)
        seen = {proc.pid for proc in found}
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
def run_program(tmp_path: Path) -> Iterator[Callable[..., Program]]:
    """Start a script (SCRIPT unless told) with the given arguments; return
    once it printed READY, with its recorded commands."""
    programs: list[Program] = []

    def start(*args: str, script: str = SCRIPT) -> Program:
        path = tmp_path / f"script-{len(programs)}.py"
        path.write_text(script)
        directory = tmp_path / f"run-{len(programs)}"
        directory.mkdir()
        program = Program(path, directory, *args)
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


APP_HANDLER_SCRIPT = textwrap.dedent(
    """
    import asyncio, signal, sys
    from pathlib import Path

    import psutil

    from asyncflow import WorkflowEngine

    directory, kind, when = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    pid_file = directory / "command.pid"
    calls = 0


    def command_alive():
        try:
            proc = psutil.Process(int(pid_file.read_text()))
            return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False


    async def main():
        loop = asyncio.get_running_loop()
        called = asyncio.Event()

        def on_sigint(*_):
            global calls
            calls += 1
            print(f"APP SIGINT {calls} command_alive={command_alive()}", flush=True)
            # A signal.signal handler may run while the loop sleeps in select.
            loop.call_soon_threadsafe(called.set)

        if kind == "signal.signal":
            signal.signal(signal.SIGINT, on_sigint)
        else:
            loop.add_signal_handler(signal.SIGINT, on_sigint)

        flow = await WorkflowEngine.create()

        @flow.executable_task
        async def simulate():
            tmp = f"{pid_file}.tmp"
            return f"echo $$ > {tmp} && mv {tmp} {pid_file}; sleep 60"

        run = simulate()
        while not pid_file.exists():
            await asyncio.sleep(0.01)
        print("READY", flush=True)
        if when == "after-shutdown":
            while not (directory / "recorded").exists():  # the test's go-ahead
                await asyncio.sleep(0.01)
            await flow.shutdown()
            print("SHUT DOWN", flush=True)
        try:
            await run
        except asyncio.CancelledError:
            pass
        await called.wait()
        called.clear()
        print("AGAIN", flush=True)
        await called.wait()
        print("DONE", flush=True)


    asyncio.run(main())
    """
)

HANDLER_KINDS = ["signal.signal", "loop.add_signal_handler"]


def sigint_twice_reaches_the_app(program: Program) -> None:
    program.proc.send_signal(signal.SIGINT)
    program.wait_for_line("APP SIGINT 1 command_alive=False")
    program.wait_for_line("AGAIN")
    program.proc.send_signal(signal.SIGINT)
    program.wait_for_line("DONE")
    program.finish()
    assert program.proc.returncode == 0, program.err
    lines = [line for line in program.out.splitlines() if line.startswith("APP")]
    assert lines == [
        "APP SIGINT 1 command_alive=False",
        "APP SIGINT 2 command_alive=False",
    ], program.out
    survivors = [p.pid for p in program.commands if alive(p)]
    assert not survivors, f"orphaned processes: {survivors}"


@pytest.mark.parametrize("kind", HANDLER_KINDS)
def test_own_sigint_handler_is_called_after_the_shutdown_and_stays(
    run_program, kind
) -> None:
    """The first SIGINT stops the engine, then reaches the program's handler
    (called once, with the command already gone); the next SIGINT reaches
    the handler directly."""
    program = run_program(kind, "during-the-run", script=APP_HANDLER_SCRIPT)
    sigint_twice_reaches_the_app(program)
    assert "shutting down 1 workflow engine" in program.err, program.err


@pytest.mark.parametrize("kind", HANDLER_KINDS)
def test_own_sigint_handler_is_restored_by_flow_shutdown(run_program, kind) -> None:
    program = run_program(kind, "after-shutdown", script=APP_HANDLER_SCRIPT)
    (program.directory / "recorded").touch()
    program.wait_for_line("SHUT DOWN")
    sigint_twice_reaches_the_app(program)
    assert "shutting down 1 workflow engine" not in program.err, program.err


HURRY_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, time
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from asyncflow import LocalExecutionBackend, WorkflowEngine

    directory, pool = Path(sys.argv[1]), sys.argv[2]
    # A graceful shutdown of this program would take an hour.
    PATIENCE = 3600.0


    def stuck():
        # Thread work that nothing tells to stop.
        (directory / "stuck.started").write_text("x")
        while True:
            time.sleep(0.05)


    async def report_stopping(flow):
        while not flow.is_shut_down:
            await asyncio.sleep(0.01)
        print("STOPPING", flush=True)


    async def main():
        # The default pool's threads are daemons; a ThreadPoolExecutor's
        # are joined when the interpreter exits.
        executor = ThreadPoolExecutor(4) if pool == "user-pool" else None
        backend = LocalExecutionBackend(executor, shutdown_timeout=PATIENCE)
        flow = await WorkflowEngine.create(backend=backend, shutdown_timeout=PATIENCE)

        @flow.executable_task
        async def simulate(i):
            # Ignores SIGTERM: only a SIGKILL stops it.
            tmp, pid = directory / f"sh{i}.tmp", directory / f"sh{i}.pid"
            return f"trap '' TERM; echo $$ > {tmp} && mv {tmp} {pid}; sleep 60"

        futs = [simulate(0), simulate(1), flow.function_task(stuck)()]
        while (len(list(directory.glob("*.pid"))) < 2
               or not (directory / "stuck.started").exists()):
            await asyncio.sleep(0.01)
        watcher = asyncio.create_task(report_stopping(flow))
        print("READY", flush=True)
        try:
            await asyncio.gather(*futs)
        finally:
            print("FINALLY", flush=True)
            await flow.shutdown()
            print("SHUT DOWN", flush=True)
            watcher.cancel()


    asyncio.run(main())
    """
)


@pytest.mark.parametrize("pool", ["default-pool", "user-pool"])
def test_second_sigint_during_the_shutdown_kills_the_work_and_exits(
    run_program, pool
) -> None:
    """The first Ctrl-C starts a graceful shutdown that would wait an hour
    (commands that ignore SIGTERM, a thread task that never returns); the
    second one kills the running work and the program exits, leaving no
    process behind."""
    program = run_program(pool, script=HURRY_SCRIPT)
    assert len(program.commands) >= 2
    program.proc.send_signal(signal.SIGINT)
    program.wait_for_line("STOPPING")
    program.proc.send_signal(signal.SIGINT)
    try:
        program.finish()
    except subprocess.TimeoutExpired:
        pytest.fail("the second SIGINT did not end the program")
    assert program.proc.returncode in (-signal.SIGINT, 128 + signal.SIGINT), (
        program.proc.returncode,
        program.err,
    )
    assert "killing the running work of 1 workflow engine" in program.err
    assert "FINALLY" in program.out
    survivors = [p.pid for p in program.commands if alive(p)]
    assert not survivors, f"orphaned processes: {survivors}"


LATE_ENGINE_SCRIPT = textwrap.dedent(
    """
    import asyncio, threading

    from asyncflow import WorkflowEngine

    late_engine_created = threading.Event()


    async def main():
        loop = asyncio.get_running_loop()
        started = asyncio.Event()
        first = await WorkflowEngine.create()

        @first.function_task
        def hold():
            # Keeps the first engine's graceful shutdown going until the
            # second engine exists.
            loop.call_soon_threadsafe(started.set)
            late_engine_created.wait()

        async def create_during_the_shutdown():
            while not first.is_shut_down:
                await asyncio.sleep(0.01)
            late = await WorkflowEngine.create()
            late_engine_created.set()
            print(f"LATE ENGINE shut_down={late.is_shut_down}", flush=True)

        creator = asyncio.create_task(create_during_the_shutdown())
        running = hold()
        await started.wait()
        print("READY", flush=True)
        await asyncio.gather(running, creator)
        await asyncio.Event().wait()  # only the signal ends the program


    asyncio.run(main())
    """
)


def test_an_engine_created_during_the_shutdown_is_shut_down_too(run_program) -> None:
    program = run_program(script=LATE_ENGINE_SCRIPT)
    program.proc.send_signal(signal.SIGINT)
    program.wait_for_line("LATE ENGINE shut_down=True")
    program.finish()
    assert program.proc.returncode in (-signal.SIGINT, 128 + signal.SIGINT), (
        program.proc.returncode,
        program.err,
    )


@pytest.mark.parametrize("shut_down", [True, False], ids=["shut-down", "left-running"])
def test_no_event_loop_outlives_its_run(shut_down) -> None:
    """A signal-handling engine (main thread) must not keep its loop alive
    after ``asyncio.run``, whether or not it was shut down."""
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []
    handles_signals: list[bool] = []

    async def main() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        # dry_run: no thread pool is left behind by the engine left running.
        flow = await WorkflowEngine.create(dry_run=not shut_down)
        handles_signals.append(flow._handles_signals)

        @flow.function_task
        def add(x: int) -> int:
            return x + 1

        await add(1)
        if shut_down:
            await flow.shutdown()

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    for _ in range(2):
        asyncio.run(main())
    gc.collect()
    assert handles_signals == [True, True]
    assert [loop() for loop in loops] == [None, None]
    after = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert after == before


@pytest.mark.skipif(not hasattr(asyncio, "Runner"), reason="asyncio.Runner: 3.11+")
def test_an_engine_shut_down_in_a_later_run_leaves_no_stale_handler() -> None:
    """Created in one ``Runner.run`` and shut down in the next (as
    pytest-asyncio does with fixtures): the first run's SIGINT handler,
    which holds the runner and its loop, must not be put back."""
    before = signal.getsignal(signal.SIGINT)
    engines: list[WorkflowEngine] = []

    async def create() -> None:
        engines.append(await WorkflowEngine.create(dry_run=True))

    with asyncio.Runner() as runner:
        runner.run(create())
        assert engines[0]._handles_signals
        loop = weakref.ref(runner.get_loop())
        runner.run(engines[0].shutdown())
        assert signal.getsignal(signal.SIGINT) is before
    engines.clear()
    del runner
    gc.collect()
    assert loop() is None


def test_ctrl_c_while_async_with_waits_at_its_exit(tmp_path: Path) -> None:
    """The exit of ``async with`` waits for a stuck task; Ctrl-C then stops
    the program (KeyboardInterrupt), and the code after the block never runs
    as if the block had ended normally."""
    script = tmp_path / "exit_wait.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio, sys
            from asyncflow import WorkflowEngine

            async def main():
                async with await WorkflowEngine.create(trace="run.jsonl") as flow:

                    @flow.function_task
                    async def stuck():
                        await asyncio.sleep(3600)

                    stuck()
                    print("LEAVING BLOCK", flush=True)
                print("AFTER BLOCK", flush=True)

            try:
                asyncio.run(main())
            except KeyboardInterrupt:
                print("INTERRUPTED", flush=True)
                sys.exit(130)
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "LEAVING BLOCK"
        time.sleep(0.2)  # into the wait of the exit (no marker to wait for)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=LIVENESS)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "INTERRUPTED" in out
    assert "AFTER BLOCK" not in out
    _, events = read_trace(tmp_path / "run.jsonl")
    assert events[-1]["kind"] == "cancelled"


@pytest.mark.parametrize(
    ("signame", "code", "eager"),
    [("SIGINT", 130, False), ("SIGINT", 130, True), ("SIGTERM", 143, False)],
)
def test_a_signal_while_the_program_still_calls_tasks(
    tmp_path: Path, signame: str, code: int, eager: bool
) -> None:
    """The signal arrives while ``main`` is still building its graph: its next
    task call ends it as the signal would (not with an error of ours), and
    every future it made is terminal."""
    script = tmp_path / "building.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import asyncio, os, signal, sys
            from asyncflow import NoopExecutionBackend, WorkflowEngine

            futures = []

            async def main():
                backend = NoopExecutionBackend(eager={eager})
                flow = await WorkflowEngine.create(backend=backend)

                @flow.function_task
                def step(*upstream):
                    return None

                layer = [step() for _ in range(10)]
                for i in range(100_000):
                    if i == 300:
                        os.kill(os.getpid(), signal.{signame})
                    if i % 100 == 0:
                        await asyncio.sleep(0)
                    layer = [step(layer[j], layer[(j + 1) % 10]) for j in range(10)]
                    futures.extend(layer)
                print("BUILT EVERYTHING", flush=True)

            try:
                asyncio.run(main())
            except KeyboardInterrupt:
                print("INTERRUPTED", file=sys.stderr, flush=True)
                sys.exit(130)
            finally:
                left = sum(not f.done() for f in futures)
                print("CALLED", len(futures), "UNFINISHED", left, flush=True)
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=LIVENESS,
        check=False,
    )
    assert done.returncode == code, done.stderr
    assert "BUILT EVERYTHING" not in done.stdout
    called, unfinished = done.stdout.split()[1::2]
    assert int(called) > 0
    assert unfinished == "0", done.stdout
    assert "has been shut down" not in done.stderr
    assert ("INTERRUPTED" in done.stderr) is (signame == "SIGINT")
