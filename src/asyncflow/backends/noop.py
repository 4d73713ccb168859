"""The dry-run backend: validates the workflow without running any work."""

from __future__ import annotations

from collections.abc import Sequence

from ..tasks import TaskFuture, TaskKind
from .base import ExecutionBackend

__all__ = ["DRY_RUN_PROMPT_RESULT", "DRY_RUN_RESULT", "NoopExecutionBackend"]

#: The result of every function and executable task in a dry run. Function
#: bodies are not called; executable bodies are evaluated (so a bad command is
#: still caught) but the command is not run.
DRY_RUN_RESULT = "Dummy Output"

#: The result of every prompt task in a dry run: the body is evaluated (so a
#: bad prompt is still caught) but no model is asked.
DRY_RUN_PROMPT_RESULT = "Dummy Prompt Output"


class NoopExecutionBackend(ExecutionBackend):
    """Completes every task at once: prompt tasks with
    :data:`DRY_RUN_PROMPT_RESULT`, the others with :data:`DRY_RUN_RESULT`.

    A task is ``PENDING`` when its call returns and ends in a later loop
    iteration, as on every backend. With ``eager=True`` a function task whose
    dependencies have all succeeded ends during the call itself (already
    ``DONE``, holding no references to its arguments), so a dry run of a
    graph of millions of tasks never holds the whole graph in memory. It
    ends at the call only when nothing watches the run (no trace, progress,
    graph, subscriber or DEBUG log) and no command body is being evaluated;
    otherwise it ends as usual, with every lifecycle event.
    """

    #: Nothing runs, so every request is met.
    honours_resources = True

    def __init__(self, name: str = "default", *, eager: bool = False) -> None:
        super().__init__(name)
        if not isinstance(eager, bool):
            raise TypeError(f"eager must be True or False, got {eager!r}")
        self.completes_at_call = eager

    def submit(self, tasks: Sequence[TaskFuture]) -> None:
        succeeded = self.reporter.succeeded
        prompt = TaskKind.PROMPT
        for task in tasks:
            if task._definition.kind is prompt:
                succeeded(task, DRY_RUN_PROMPT_RESULT)
            else:
                succeeded(task, DRY_RUN_RESULT)

    def cancel(self, task: TaskFuture) -> None:
        """Nothing runs, so there is nothing to stop."""

    async def shutdown(self) -> None:
        """Holds no resources."""
