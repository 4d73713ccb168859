"""The progress display of ``WorkflowEngine.create(progress=True)``.

:class:`ProgressDisplay` is an observer of task events. Per event it only
bumps a counter and, for tasks that start or end running, updates a dict of
the running ones; everything else (throughput, ETA, the longest-running
tasks, drawing) happens in a loop timer a few times per second at most.

Two modes:

* **live**: stderr is a terminal and the extra ``rich`` is installed. A
  small panel redrawn every :data:`REFRESH_EVERY` seconds: tasks per state,
  retries, throughput, ETA and the longest-running tasks. One live panel is
  shown at a time in a process; a second engine with ``progress=True``
  running meanwhile prints plain lines instead.
* **plain**: otherwise (stderr redirected to a file or a pipe, or no
  ``rich``). One line with the same figures every :data:`PLAIN_EVERY`
  seconds, written to ``sys.stderr``.

Either way, :meth:`ProgressDisplay.close` (at engine shutdown) prints one
summary line. While a display is open, the scheduler's per-attempt retry
WARNING is filtered out for tasks of the display's loop: the retry count
stands for it.

Hooks: set :data:`CONSOLE` to a ``rich.console.Console`` (for instance
``Console(file=io.StringIO(), force_terminal=True)``) to force the live mode
on that console, whatever stderr is; ``ProgressDisplay(engine, console=...)``
does the same for one display.
"""

from __future__ import annotations

import asyncio
import atexit
import heapq
import logging
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from itertools import chain, compress, islice, repeat
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from ..events import FINAL_KINDS, RECORD_SIZE, TaskEvent

if TYPE_CHECKING:
    from ..engine import WorkflowEngine

__all__ = [
    "CONSOLE",
    "PLAIN_EVERY",
    "REFRESH_EVERY",
    "TOP_RUNNING",
    "WINDOW",
    "ProgressDisplay",
]

log = logging.getLogger("asyncflow.progress")

#: Seconds between redraws of the live display.
REFRESH_EVERY = 0.25
#: Seconds between two lines of the plain mode.
PLAIN_EVERY = 5.0
#: Seconds of recent history the throughput is measured over.
WINDOW = 10.0
#: How many of the longest-running tasks are shown.
TOP_RUNNING = 3
#: A ``rich`` Console every new display draws on in live mode (None: a
#: terminal on stderr, if stderr is one).
CONSOLE: Any = None

#: The start of the scheduler's per-attempt retry WARNING (its format string).
RETRY_MESSAGE = "task %r (%s) attempt %d of %d failed"
_SCHEDULER_LOGGER = "asyncflow.scheduler"

_TIME = itemgetter(1)
_TASK = itemgetter(2)
_SUBMITTED = "submitted".__eq__
_STARTED = "started".__eq__
#: Runs an iterator to its end, keeping nothing.
_consume: Callable[[Iterable[Any]], None] = deque(maxlen=0).extend
_FINAL_ORDER = ("done", "failed", "cancelled", "restored")
_STYLES = {
    "running": "blue",
    "done": "green",
    "failed": "red",
    "cancelled": "yellow",
    "restored": "cyan",
    "retries": "magenta",
}
# Kinds after which a task is no longer running.
_LEAVES_RUNNING = FINAL_KINDS | {"retried"}

# The display whose rich Live panel is up (one per process at a time).
_live_owner: ProgressDisplay | None = None
_atexit_registered = False
_told_no_rich = False


class _RetryFilter(logging.Filter):
    """Drops the retry WARNINGs logged on one loop (the display's engine's)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._loop = loop

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg
        if not (isinstance(message, str) and message.startswith(RETRY_MESSAGE)):
            return True
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return True
        return running is not self._loop


def _seconds(value: float) -> str:
    """A duration for people: ``4.2s``, ``3m05s``, ``2h07m``."""
    if value < 60:
        return f"{value:.1f}s"
    minutes, seconds = divmod(int(value + 0.5), 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class ProgressDisplay:
    """Counts an engine's tasks per state and shows them (see the module)."""

    def __init__(self, engine: WorkflowEngine, *, console: Any = None) -> None:
        self._loop = engine.loop
        uid = engine.uid
        self._label = uid if uid.startswith("asyncflow") else f"asyncflow {uid}"
        self._t0 = time.monotonic()
        #: Events seen, per kind (``retried`` is the retry count).
        self.counts: dict[str, int] = {}
        # Running tasks by uid, each with its latest TaskEvent or (kind, time,
        # task) of a record (both have the time at [1]), in the order they
        # started running: those submitted, and those whose start the backend
        # reported.
        self._submitted: dict[Any, TaskEvent | tuple[str, float, Any]] = {}
        self._started: dict[Any, TaskEvent | tuple[str, float, Any]] = {}
        # (monotonic time, finished tasks) at recent ticks, for the throughput.
        self._samples: deque[tuple[float, int]] = deque([(self._t0, 0)])
        self._closed = False
        self._broken = False
        self._timer: asyncio.TimerHandle | None = None
        self._live: Any = None
        self._console: Any = None

        self._filter = _RetryFilter(self._loop)
        logging.getLogger(_SCHEDULER_LOGGER).addFilter(self._filter)

        if console is None:
            console = CONSOLE
        self._start_live(console)
        self._interval = REFRESH_EVERY if self._live is not None else PLAIN_EVERY
        self._timer = self._loop.call_later(self._interval, self._tick)

    # -- the hot path -----------------------------------------------------

    #: Reads the scheduler's flat record list (see :mod:`asyncflow.events`).
    flat = True

    def records(self, flat: list[Any]) -> None:
        """Count a batch of the scheduler's records (the engine's fast path).

        Here the running tasks are keyed by their TaskFuture (hashed by
        identity, cheaper than its uid).
        """
        kinds = flat[0::RECORD_SIZE]
        counts = self.counts
        tally = Counter(kinds)
        for kind, n in tally.items():
            counts[kind] = counts.get(kind, 0) + n
        submitted = self._submitted
        started = self._started
        forget_submitted = submitted.pop
        forget_started = started.pop
        leaves = _LEAVES_RUNNING
        times = flat[1::RECORD_SIZE]
        tasks = flat[2::RECORD_SIZE]
        if "retried" not in tally and (
            tally["started"] < 2
            or len(set(compress(tasks, map(_STARTED, kinds)))) == tally["started"]
        ):
            # Each kind in one C-level pass, in lifecycle order: the same
            # outcome as taking the records one by one, since without a
            # retry, or a task started twice (its worker was lost), no task
            # goes back to an earlier step within the batch.
            if "submitted" in tally:
                chosen = list(
                    compress(
                        zip(kinds, times, tasks, strict=True), map(_SUBMITTED, kinds)
                    )
                )
                submitted.update(zip(map(_TASK, chosen), chosen, strict=True))
            if "started" in tally:
                chosen = list(
                    compress(
                        zip(kinds, times, tasks, strict=True), map(_STARTED, kinds)
                    )
                )
                keys = list(map(_TASK, chosen))
                _consume(map(forget_submitted, keys, repeat(None)))
                _consume(map(forget_started, keys, repeat(None)))  # to the end
                started.update(zip(keys, chosen, strict=True))
            if not leaves.isdisjoint(tally):
                keys = list(compress(tasks, map(leaves.__contains__, kinds)))
                _consume(map(forget_started, keys, repeat(None)))
                _consume(map(forget_submitted, keys, repeat(None)))
            return
        for record in zip(kinds, times, tasks, strict=True):
            kind = record[0]
            if kind == "submitted":
                submitted[record[2]] = record
            elif kind == "started":
                task = record[2]
                if forget_submitted(task, None) is None:
                    forget_started(task, None)  # started again: to the end
                started[task] = record
            elif kind in leaves:
                task = record[2]
                if forget_started(task, None) is None:
                    forget_submitted(task, None)

    def __call__(self, event: TaskEvent) -> None:
        """Count one event (when subscribed as a plain event callback)."""
        kind = event.kind
        counts = self.counts
        counts[kind] = counts.get(kind, 0) + 1
        if kind == "submitted":
            self._submitted[event.uid] = event
        elif kind == "started":
            uid = event.uid
            self._submitted.pop(uid, None)
            started = self._started
            started.pop(uid, None)  # started again: goes to the end
            started[uid] = event
        elif kind in _LEAVES_RUNNING:
            uid = event.uid
            if self._started.pop(uid, None) is None:
                self._submitted.pop(uid, None)

    # -- figures ----------------------------------------------------------

    @property
    def mode(self) -> str:
        """``"live"`` (a rich panel), ``"plain"`` (lines) or ``"closed"``."""
        if self._closed:
            return "closed"
        return "live" if self._live is not None else "plain"

    def state_counts(self) -> dict[str, int]:
        """Tasks per state: pending, running, done, failed, cancelled, restored."""
        counts = self.counts
        running = len(self._submitted) + len(self._started)
        finals = {kind: counts.get(kind, 0) for kind in _FINAL_ORDER}
        pending = counts.get("created", 0) - running - sum(finals.values())
        return {"pending": max(pending, 0), "running": running, **finals}

    @property
    def retries(self) -> int:
        return self.counts.get("retried", 0)

    def _finished(self) -> int:
        """Tasks that ended by running (a restore is no work)."""
        counts = self.counts
        return (
            counts.get("done", 0) + counts.get("failed", 0) + counts.get("cancelled", 0)
        )

    def _sample(self) -> None:
        now = time.monotonic()
        samples = self._samples
        samples.append((now, self._finished()))
        window = max(WINDOW, 2.5 * self._interval)
        # Keep the newest sample that is at least a window old, and those after.
        while len(samples) > 2 and now - samples[1][0] >= window:
            samples.popleft()

    def throughput(self) -> float | None:
        """Tasks finished per second over the recent window (None: no data)."""
        then, finished_then = self._samples[0]
        span = time.monotonic() - then
        if span <= 0:
            return None
        return (self._finished() - finished_then) / span

    def eta(self, states: dict[str, int] | None = None) -> str:
        """Time left for the tasks known now at the recent throughput, or ``—``."""
        if states is None:
            states = self.state_counts()
        remaining = states["pending"] + states["running"]
        if remaining == 0:
            return "0s" if self.counts.get("created") else "—"
        rate = self.throughput()
        if not rate:
            return "—"
        return _seconds(remaining / rate)

    def longest_running(self, n: int = TOP_RUNNING) -> list[tuple[str, str, float]]:
        """(name, uid, seconds running) of the ``n`` longest-running tasks.

        A task runs from its start when the engine reported it, else from its
        submission (the engine may report a start only with the outcome).
        Each dict is in (about) the order of those times: the oldest of each
        are its first entries.
        """
        now = time.time()
        oldest = heapq.nsmallest(
            n,
            chain(
                islice(self._started.values(), n), islice(self._submitted.values(), n)
            ),
            key=_TIME,
        )
        shown = []
        for entry in oldest:
            if isinstance(entry, TaskEvent):
                name, uid = entry.name, entry.uid
            else:
                name, uid = entry[2].name, entry[2].uid
            shown.append((str(name), str(uid), max(now - entry[1], 0.0)))
        return shown

    def status_line(self) -> str:
        """The counts, throughput and ETA on one line (the plain mode's line)."""
        states = self.state_counts()
        rate = self.throughput()
        figures = ", ".join(f"{count} {state}" for state, count in states.items())
        speed = "—" if rate is None else f"{rate:.1f}"
        return (
            f"{self._label} [{_seconds(time.monotonic() - self._t0)}]: {figures}; "
            f"{self.retries} retries; {speed} tasks/s; ETA {self.eta(states)}"
        )

    def summary_line(self) -> str:
        """The line printed at the end of the run."""
        states = self.state_counts()
        figures = ", ".join(f"{states[kind]} {kind}" for kind in _FINAL_ORDER)
        return (
            f"{self._label} finished in {_seconds(time.monotonic() - self._t0)}: "
            f"{figures}; {self.retries} retries"
        )

    # -- drawing ----------------------------------------------------------

    def _start_live(self, console: Any) -> None:
        global _live_owner, _atexit_registered, _told_no_rich
        if _live_owner is not None:
            return  # another engine's panel is up: plain lines
        if console is None and not _isatty(sys.stderr):
            return
        try:
            from rich.console import Console
            from rich.live import Live
        except ImportError:
            if not _told_no_rich:
                _told_no_rich = True
                log.info(
                    "progress: the live display needs the extra 'rich' (pip "
                    "install 'asyncflow[rich]'); printing plain lines instead"
                )
            return
        redirect = console is None
        live: Any = None
        try:
            if console is None:
                console = Console(stderr=True)
            live = Live(
                self._renderable(),
                console=console,
                auto_refresh=False,  # refreshed from the loop, not a thread
                transient=True,
                redirect_stdout=redirect and _isatty(sys.stdout),
                redirect_stderr=redirect,
            )
            live.start(refresh=True)
        except Exception:
            log.warning(
                "progress: the live display failed to start; printing plain "
                "lines instead",
                exc_info=True,
            )
            self._stop_live_quietly(live)
            return
        self._live = live
        self._console = console
        _live_owner = self
        if not _atexit_registered:
            _atexit_registered = True
            atexit.register(_close_live_at_exit)

    def _renderable(self) -> Any:
        """The live panel: a title line, a table of counts, the longest runners.

        ::

            asyncflow.session.1a2b3c4d  elapsed 12.4s  80.2 tasks/s  ETA 3.1s
            pending  running  done  failed  cancelled  restored  retries
                 12        8   230       1          0         0        2
            longest running  simulate (task.000017)  4.2s
        """
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        states = self.state_counts()
        rate = self.throughput()
        speed = "—" if rate is None else f"{rate:.1f} tasks/s"
        title = Text.assemble(
            (self._label, "bold"),
            f"  elapsed {_seconds(time.monotonic() - self._t0)}  {speed}  "
            f"ETA {self.eta(states)}",
            no_wrap=True,
            overflow="ellipsis",
        )
        counts = Table(box=None, padding=(0, 1), show_edge=False, pad_edge=False)
        values: list[str] = []
        for state, count in [*states.items(), ("retries", self.retries)]:
            counts.add_column(state, justify="right", style=_STYLES.get(state, ""))
            values.append(str(count))
        counts.add_row(*values)
        runners = Table.grid(padding=(0, 2))
        runners.add_column(no_wrap=True, style="dim")
        runners.add_column(no_wrap=True, overflow="ellipsis")
        runners.add_column(no_wrap=True, justify="right")
        for row, (name, uid, seconds) in enumerate(self.longest_running()):
            runners.add_row(
                "" if row else "longest running", f"{name} ({uid})", _seconds(seconds)
            )
        return Group(title, counts, runners)

    def _tick(self) -> None:
        self._timer = None
        if self._closed:
            return
        try:
            self._sample()
            if self._live is not None:
                self._live.update(self._renderable(), refresh=True)
            else:
                _write_stderr(self.status_line())
        except Exception:
            # Drawing must never disturb the run: stop drawing, keep counting.
            if not self._broken:
                self._broken = True
                log.warning(
                    "progress display failed to draw; it stops updating, the run "
                    "goes on",
                    exc_info=True,
                )
            self._stop_live()
            return
        self._timer = self._loop.call_later(self._interval, self._tick)

    def _stop_live(self) -> None:
        global _live_owner
        live, self._live = self._live, None
        if _live_owner is self:
            _live_owner = None
        self._stop_live_quietly(live)

    @staticmethod
    def _stop_live_quietly(live: Any) -> None:
        if live is None:
            return
        try:
            live.stop()
        except Exception:
            log.debug("progress: the live display failed to stop", exc_info=True)

    # -- the end ----------------------------------------------------------

    def close(self) -> None:
        """Stop the timer and the live panel, print the summary line. Idempotent;
        never raises."""
        if self._closed:
            return
        self._closed = True
        try:
            logging.getLogger(_SCHEDULER_LOGGER).removeFilter(self._filter)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            console = self._console if self._live is not None else None
            self._stop_live()
            line = self.summary_line()
            if console is not None:
                console.print(line, markup=False, highlight=False, soft_wrap=True)
            else:
                _write_stderr(line)
        except Exception:
            log.warning("progress display failed to close", exc_info=True)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except Exception:
        return False


def _write_stderr(line: str) -> None:
    stream = sys.stderr
    if stream is None:  # pythonw
        return
    try:
        stream.write(line + "\n")
        stream.flush()
    except (OSError, ValueError):
        pass  # stderr closed: nothing to show on


def _close_live_at_exit() -> None:
    # An engine never shut down leaves its panel up: give the terminal back.
    owner = _live_owner
    if owner is not None:
        owner.close()
