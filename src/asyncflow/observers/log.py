"""The DEBUG log of every task's life, written from the engine's events.

Attached by the scheduler as soon as the ``asyncflow.scheduler`` logger is
enabled for DEBUG (``RADICAL_LOG_LVL=DEBUG``, or the application's own
logging set-up); it writes the lines the user guide's logging page shows.
"""

from __future__ import annotations

import logging

from ..events import Record, backend_name
from ..tasks import TaskKind

__all__ = ["LogObserver"]

log = logging.getLogger("asyncflow.scheduler")


class LogObserver:
    """Logs registration, submission, block starts and end states at DEBUG."""

    def records(self, batch: list[Record]) -> None:
        if not log.isEnabledFor(logging.DEBUG):
            return
        for kind, _, task, _, _, error, extra in batch:
            if kind == "created":
                dependencies = extra[3] if extra is not None else ()
                log.debug(
                    "registered %s %r depends on %s",
                    task.uid,
                    task.name,
                    [f"{d.name} ({d.uid})" for d in dependencies] or "nothing",
                )
            elif kind == "submitted":
                log.debug(
                    "submitted %s %r to backend %r",
                    task.uid,
                    task.name,
                    backend_name(task),
                )
            elif kind == "started":
                if task._definition.kind is TaskKind.BLOCK:
                    log.debug("started block %s %r", task.uid, task.name)
            elif kind == "failed":
                log.debug("%s %r FAILED", task.uid, task.name, exc_info=error)
            elif kind == "restored":
                log.debug("%s %r restored from the checkpoint", task.uid, task.name)
            elif kind in ("done", "cancelled"):
                log.debug("%s %r %s", task.uid, task.name, kind.upper())

    def close(self) -> None:
        """Nothing to release."""
