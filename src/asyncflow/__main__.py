"""The ``asyncflow`` command (also ``python -m asyncflow``).

``run`` a workflow script, ``graph`` it without running anything, show what
a checkpoint holds (``status``), turn a trace into a ``report``, or run the
built-in ``demo``. docs/cli.md describes every command and the exit codes.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import importlib
import inspect
import os
import re
import runpy
import sys
import time
import traceback
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import __version__
from .graph import FORMATS as GRAPH_FORMATS

__all__ = ["main"]

EXIT_OK = 0
#: A task failed, the script raised, or a command could not do its work.
EXIT_FAILED = 1
#: The command line or the script's ``main`` is not usable.
EXIT_USAGE = 2
#: Ctrl-C (128 + SIGINT).
EXIT_INTERRUPTED = 130

BACKENDS = ("threads", "processes", "asyncio", "dask", "noop")
#: ``__name__`` of a script run by ``asyncflow run``: not ``"__main__"``, so
#: that a script's own ``if __name__ == "__main__":`` entry point stays idle.
SCRIPT_MODULE = "__asyncflow_script__"
#: Set to ``full`` to see asyncflow's own frames in a failing script's traceback.
TRACEBACK_ENV = "ASYNCFLOW_TRACEBACK"

# A failing script's traceback leaves out the frames of these.
_HIDDEN_DIRS = tuple(
    os.path.dirname(os.path.abspath(path)) + os.sep
    for path in (__file__, asyncio.__file__, concurrent.futures.__file__)
)
_HIDDEN_FILES = frozenset({os.path.abspath(runpy.__file__ or "")})


class UsageError(Exception):
    """The command line or the script cannot be used (exit status 2)."""


class CommandError(Exception):
    """The command could not do its work (exit status 1)."""


# -- the command line ---------------------------------------------------------------


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asyncflow",
        description="Workflows of async tasks on asyncio.",
        epilog="Run 'asyncflow COMMAND --help' for a command's options; "
        "docs/cli.md has the exit codes.",
    )
    parser.add_argument(
        "--version", action="version", version=f"asyncflow {__version__}"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    script_help = (
        "a Python file defining `async def main(flow)` or `async def main(flow, argv)`"
    )
    after_dashes = (
        "Arguments after '--' go to the script: main(flow, argv) receives them "
        "as argv, and sys.argv is [script, *args]."
    )

    run = commands.add_parser(
        "run",
        usage="%(prog)s [options] script [-- ARG ...]",
        help="run a workflow script",
        description="Run a workflow script's `main(flow)` on a new engine, then "
        "shut the engine down. Exit status: 0 when main returned and no task "
        "failed, 1 when a task or the script failed, 2 for usage errors, 130 on "
        "Ctrl-C.",
        epilog=after_dashes,
    )
    run.add_argument("script", help=script_help)
    run.add_argument(
        "--backend",
        choices=BACKENDS,
        default="threads",
        help="where tasks run (default: threads)",
    )
    run.add_argument(
        "--workers",
        type=_int_at_least(1),
        metavar="N",
        help="worker threads (threads), worker processes (processes), the "
        "limit on threads and subprocesses (asyncio), or the worker processes "
        "of the local Dask cluster (dask, unless DASK_SCHEDULER_ADDRESS names "
        "a scheduler); default: as the standard library's pools (Dask: as "
        "LocalCluster)",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="run no task bodies and no commands (whatever --backend says); "
        "every task gets a placeholder result",
    )
    run.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress display on stderr (default: when stderr is a terminal)",
    )
    run.add_argument(
        "--trace", metavar="FILE", help="write every task event to FILE (JSON lines)"
    )
    run.add_argument(
        "--checkpoint",
        metavar="FILE",
        help="keep task results in FILE (SQLite) and skip the tasks it already holds",
    )

    status = commands.add_parser(
        "status",
        help="show what a checkpoint file holds",
        description="List the results a checkpoint holds: per task name, how many, "
        "their total size, and when the first and last were written. Reads the "
        "file only, decoding no result.",
    )
    status.add_argument("checkpoint", metavar="FILE", help="a checkpoint file")

    report = commands.add_parser(
        "report",
        help="make a run report from a trace",
        description="Render a run report (with a Gantt chart) from a trace "
        "written by 'asyncflow run --trace' or create(trace=...): HTML or PNG, "
        "by the output's suffix.",
    )
    report.add_argument("trace", metavar="TRACE", help="a trace file")
    report.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="FILE",
        help="the report to write (.html or .png)",
    )

    graph = commands.add_parser(
        "graph",
        usage="%(prog)s [--format {mermaid,dot}] script [-- ARG ...]",
        help="print a workflow's task graph without running it",
        description="Run a workflow script's main as a dry run (no task bodies, "
        "no commands) and print its task graph.",
        epilog=after_dashes,
    )
    graph.add_argument("script", help=script_help)
    graph.add_argument(
        "--format",
        choices=GRAPH_FORMATS,
        default="mermaid",
        help="Mermaid flowchart or Graphviz DOT (default: mermaid)",
    )

    demo = commands.add_parser(
        "demo",
        help="run the built-in demo workflow",
        description="Run a small simulation campaign: seeds from commands, "
        "Monte-Carlo estimates of pi in parallel, a block that aggregates them.",
    )
    demo.add_argument(
        "--simulations",
        type=_int_at_least(2),
        default=6,
        metavar="N",
        help="estimates to run in parallel (at least 2; default: 6)",
    )
    demo.add_argument(
        "--samples",
        type=_int_at_least(1),
        default=200_000,
        metavar="N",
        help="random points per estimate (default: 200000)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``asyncflow`` command; returns its exit status."""
    words = list(sys.argv[1:] if argv is None else argv)
    script_args: list[str] | None = None
    if "--" in words:
        cut = words.index("--")
        words, script_args = words[:cut], words[cut + 1 :]
    parser = _parser()
    args = parser.parse_args(words)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if script_args is not None and args.command not in ("run", "graph"):
        parser.error(f"'asyncflow {args.command}' takes no arguments after '--'")
    try:
        if args.command == "run":
            return _run(args, script_args or [])
        if args.command == "graph":
            return _graph(args, script_args or [])
        if args.command == "status":
            return _status(args.checkpoint)
        if args.command == "report":
            return _report(args.trace, args.output)
        return _demo(args.simulations, args.samples)
    except UsageError as exc:
        _say(f"asyncflow {args.command}: error: {exc}")
        return EXIT_USAGE
    except CommandError as exc:
        _say(f"asyncflow {args.command}: error: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        _say("asyncflow: interrupted")
        return EXIT_INTERRUPTED


def _say(message: str) -> None:
    sys.stdout.flush()
    print(message, file=sys.stderr)


# -- run and graph ------------------------------------------------------------------


class _Script:
    """A loaded workflow script: its ``main`` and how to call it."""

    def __init__(self, path: str, argv: list[str]) -> None:
        self.path = path
        self.argv = argv
        self.main, self.takes_argv = self._load()

    def _load(self) -> tuple[Callable[..., Coroutine[Any, Any, Any]], bool]:
        path = Path(self.path)
        if not path.exists():
            raise UsageError(f"no such script: {self.path}")
        if not path.is_file():
            raise UsageError(f"{self.path} is not a file: give a Python script")
        sys.argv = [self.path, *self.argv]
        directory = str(path.resolve().parent)
        if directory not in sys.path:
            sys.path.insert(0, directory)
        namespace = runpy.run_path(self.path, run_name=SCRIPT_MODULE)
        main = namespace.get("main")
        if main is None:
            raise UsageError(
                f"{self.path} defines no main: write `async def main(flow):` "
                "(or `async def main(flow, argv):`) that calls its tasks"
            )
        if not inspect.iscoroutinefunction(main):
            raise UsageError(
                f"main in {self.path} must be an `async def` function taking the "
                "engine: `async def main(flow):` or `async def main(flow, argv):`"
            )
        return main, _takes_argv(main, self.path)

    def call(self, flow: Any) -> Coroutine[Any, Any, Any]:
        if self.takes_argv:
            return self.main(flow, list(self.argv))
        return self.main(flow)


def _takes_argv(main: Callable[..., Any], where: str) -> bool:
    """Whether ``main`` takes ``(flow, argv)``; a UsageError unless it takes
    that or ``(flow)``."""
    kinds = inspect.Parameter
    try:
        parameters = list(inspect.signature(main).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in parameters
        if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)
    ]
    variadic = any(p.kind is kinds.VAR_POSITIONAL for p in parameters)
    required = [p for p in positional if p.default is kinds.empty]
    keyword_only = [
        p.name
        for p in parameters
        if p.kind is kinds.KEYWORD_ONLY and p.default is kinds.empty
    ]
    if keyword_only or len(required) > 2 or not (positional or variadic):
        raise UsageError(
            f"main in {where} must take the engine and, optionally, the script's "
            "arguments: `async def main(flow):` or `async def main(flow, argv):`"
        )
    return len(positional) >= 2 or variadic


class _Outcome:
    """What a script's run left behind, also when it raised."""

    def __init__(self) -> None:
        self.flow: Any = None
        self.failed: list[tuple[str, str]] = []

    def watch(self, event: Any) -> None:
        if event.kind == "failed":
            self.failed.append((event.name, event.uid))


async def _execute(
    script: _Script, outcome: _Outcome, make_backend: Callable[[], Any], **options: Any
) -> None:
    from .engine import WorkflowEngine

    try:
        flow = await WorkflowEngine.create(backend=make_backend(), **options)
    except Exception as exc:
        raise CommandError(f"cannot start the workflow engine: {exc}") from exc
    outcome.flow = flow
    flow.subscribe(outcome.watch)
    # As `async with` in a script: wait for every task main called once it
    # returns; cancel the unfinished ones if it raised.
    async with flow:
        await script.call(flow)


def _run_script(
    script_path: str,
    script_args: list[str],
    make_backend: Callable[[], Any],
    **options: Any,
) -> tuple[_Outcome, bool]:
    """Load and run the script's main: (what it left, whether it raised).
    A failing script's traceback is printed, without asyncflow's frames."""
    outcome = _Outcome()
    try:
        script = _Script(script_path, script_args)
        asyncio.run(_execute(script, outcome, make_backend, **options))
    except (UsageError, CommandError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        sys.stdout.flush()
        sys.stderr.write(_user_traceback(exc))
        return outcome, True
    return outcome, False


def _dask_factory(workers: int | None) -> Callable[[], Any]:
    """The scheduler Dask is configured with (``DASK_SCHEDULER_ADDRESS``,
    or ``scheduler-address`` in Dask's configuration), else a LocalCluster
    of ``workers`` worker processes started for the run."""
    try:
        import dask

        from .backends.dask_ import DaskExecutionBackend
    except ImportError:
        raise UsageError(
            "--backend dask needs Dask: pip install 'asyncflow-workflows[dask]'"
        ) from None
    address = dask.config.get("scheduler-address", None)
    if address:
        return lambda: DaskExecutionBackend(address=address)
    if workers is None:
        return lambda: DaskExecutionBackend(processes=True)
    return lambda: DaskExecutionBackend(n_workers=workers, processes=True)


def _backend_factory(name: str, workers: int | None) -> Callable[[], Any]:
    from .backends import AsyncioExecutionBackend, LocalExecutionBackend

    if name == "dask":
        return _dask_factory(workers)
    if name == "threads":
        if workers is None:
            return lambda: None  # the engine's default thread pool
        return lambda: LocalExecutionBackend(ThreadPoolExecutor(workers))
    if name == "processes":
        from concurrent.futures import ProcessPoolExecutor

        return lambda: LocalExecutionBackend(ProcessPoolExecutor(workers))
    if name == "asyncio":
        return lambda: AsyncioExecutionBackend(
            max_threads=workers, max_subprocesses=workers
        )
    return lambda: None  # noop: the engine's dry run


def _run(args: argparse.Namespace, script_args: list[str]) -> int:
    dry_run = args.dry_run or args.backend == "noop"
    make_backend = (
        (lambda: None) if dry_run else _backend_factory(args.backend, args.workers)
    )
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    outcome, raised = _run_script(
        args.script,
        script_args,
        make_backend,
        dry_run=dry_run,
        progress=progress,
        trace=args.trace,
        checkpoint=args.checkpoint,
    )
    if outcome.failed:
        shown = ", ".join(f"{name} ({uid})" for name, uid in outcome.failed[:10])
        more = len(outcome.failed) - 10
        _say(
            f"asyncflow run: {len(outcome.failed)} task(s) failed: {shown}"
            + (f" and {more} more" if more > 0 else "")
        )
    return EXIT_FAILED if raised or outcome.failed else EXIT_OK


def _graph(args: argparse.Namespace, script_args: list[str]) -> int:
    # The graph alone goes to stdout, so that it can be piped or saved.
    with contextlib.redirect_stdout(sys.stderr):
        outcome, raised = _run_script(
            args.script, script_args, lambda: None, dry_run=True, graph=True
        )
    if outcome.flow is not None:
        sys.stdout.write(outcome.flow.graph(args.format))
    return EXIT_FAILED if raised else EXIT_OK


def _hidden(filename: str) -> bool:
    if filename.startswith("<frozen "):
        return True
    path = os.path.abspath(filename)
    return path in _HIDDEN_FILES or path.startswith(_HIDDEN_DIRS)


def _user_traceback(exc: BaseException) -> str:
    """``exc`` formatted as Python would, less the frames of asyncflow, asyncio,
    concurrent.futures and runpy (unless ``ASYNCFLOW_TRACEBACK=full``)."""
    report = traceback.TracebackException.from_exception(exc)
    if os.environ.get(TRACEBACK_ENV, "").lower() == "full":
        return "".join(report.format())
    _prune(report, set())
    # A process pool's worker sends its traceback as text (the cause of the
    # error): its frames are pruned from the text.
    return _prune_text("".join(report.format()))


def _prune(report: traceback.TracebackException, seen: set[int]) -> None:
    if id(report) in seen:
        return
    seen.add(id(report))
    report.stack = traceback.StackSummary.from_list(
        [frame for frame in report.stack if not _hidden(frame.filename)]
    )
    related: list[traceback.TracebackException | None] = [
        report.__cause__,
        report.__context__,
        *(getattr(report, "exceptions", None) or ()),
    ]
    for other in related:
        if other is not None:
            _prune(other, seen)


_FRAME_LINE = re.compile(r'( *)File "([^"]+)", line \d+, in ')


def _prune_text(text: str) -> str:
    kept: list[str] = []
    skipping: str | None = None  # the indent of a dropped frame's line
    for line in text.splitlines(keepends=True):
        if skipping is not None:
            if line.startswith(skipping + " ") and line.strip():
                continue  # the dropped frame's source line and markers
            skipping = None
        frame = _FRAME_LINE.match(line)
        if frame is not None and _hidden(frame[2]):
            skipping = frame[1]
            continue
        kept.append(line)
    return "".join(kept)


# -- status -------------------------------------------------------------------------


def _status(file: str) -> int:
    import sqlite3

    from .checkpoint import FORMAT

    path = Path(file)
    if not path.exists():
        raise CommandError(f"no such file: {file}")
    if not path.is_file():
        raise CommandError(f"{file} is not a file")
    try:
        connection = sqlite3.connect(
            path.resolve().as_uri() + "?mode=ro", uri=True, timeout=5.0
        )
    except sqlite3.Error as exc:
        raise CommandError(f"cannot open {file}: {exc}") from exc
    try:
        try:
            meta = dict(connection.execute("SELECT key, value FROM asyncflow_meta"))
        except sqlite3.DatabaseError as exc:
            raise CommandError(
                f"{file} is not an asyncflow checkpoint ({exc})"
            ) from exc
        if meta.get("format") != FORMAT:
            raise CommandError(
                f"{file} is not an asyncflow checkpoint (format {meta.get('format')!r})"
            )
        try:
            # Of several rows with one key the last counts (the engine deletes
            # the others when it next opens the file).
            rows = connection.execute(
                "SELECT task, COUNT(*), SUM(LENGTH(result)), MIN(stored_at), "
                "MAX(stored_at) FROM asyncflow_results WHERE rowid IN "
                "(SELECT MAX(rowid) FROM asyncflow_results GROUP BY key) "
                "GROUP BY task ORDER BY MIN(stored_at), task"
            ).fetchall()
        except sqlite3.DatabaseError as exc:
            raise CommandError(f"cannot read the results in {file}: {exc}") from exc
    finally:
        connection.close()
    print(_status_text(file, meta, rows), end="")
    return EXIT_OK


def _status_text(
    file: str, meta: dict[str, str], rows: list[tuple[str, int, int, float, float]]
) -> str:
    created = meta.get("created")
    try:
        since = f", created {_when(float(created))}" if created else ""
    except ValueError:
        since = ""
    total = sum(row[1] for row in rows)
    size = sum(row[2] or 0 for row in rows)
    head = (
        f"{file}: asyncflow checkpoint (format version {meta.get('version', '?')}"
        f"{since}): {total} result(s) of {len(rows)} task(s), {_size(size)}\n"
    )
    if not rows:
        return head
    table = [("TASK", "RESULTS", "SIZE", "FIRST WRITTEN", "LAST WRITTEN")]
    table.extend(
        (name, str(count), _size(nbytes or 0), _when(first), _when(last))
        for name, count, nbytes, first, last in rows
    )
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    lines = [
        "  ".join(
            cell.rjust(width) if i in (1, 2) else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in table
    ]
    return head + "\n".join(lines) + "\n"


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _size(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{nbytes} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


# -- report and demo ----------------------------------------------------------------


def _report(trace: str, output: str) -> int:
    if not Path(trace).is_file():
        raise CommandError(f"no such trace file: {trace}")
    try:
        # Imported here: it may pull in matplotlib, which the other commands
        # do not need.
        module = importlib.import_module("asyncflow.report")
    except ImportError as exc:
        raise CommandError(f"cannot make reports: {exc}") from exc
    try:
        written = module.render_report(trace, output)
    except Exception as exc:
        raise CommandError(f"{type(exc).__name__}: {exc}") from exc
    print(written)
    return EXIT_OK


def _demo(simulations: int, samples: int) -> int:
    from .demo import run_demo

    asyncio.run(run_demo(simulations, samples))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
