"""The dry-run backend: validates the workflow without running any work."""

from __future__ import annotations

from collections.abc import Sequence

from ..tasks import TaskFuture
from .base import ExecutionBackend

__all__ = ["DRY_RUN_RESULT", "NoopExecutionBackend"]

#: The result every task gets in a dry run. Function bodies are not called;
#: executable and prompt bodies are evaluated (so a bad command is still
#: caught) but the command or prompt is not run.
DRY_RUN_RESULT = "Dummy Output"


class NoopExecutionBackend(ExecutionBackend):
    """Completes every task at once with :data:`DRY_RUN_RESULT`."""

    def submit(self, tasks: Sequence[TaskFuture]) -> None:
        succeeded = self.reporter.succeeded
        for task in tasks:
            succeeded(task, DRY_RUN_RESULT)

    def cancel(self, task: TaskFuture) -> None:
        """Nothing runs, so there is nothing to stop."""

    async def shutdown(self) -> None:
        """Holds no resources."""
