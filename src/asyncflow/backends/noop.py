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
    :data:`DRY_RUN_PROMPT_RESULT`, the others with :data:`DRY_RUN_RESULT`."""

    #: Nothing runs, so every request is met.
    honours_resources = True

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
