"""asyncflow: workflows of async tasks on top of asyncio.

Decorate ``async def`` functions as tasks, call them to get futures at once,
pass futures to other tasks to declare dependencies, and let independent work
run in parallel on threads, processes, asyncio or a cluster.
"""

from importlib.metadata import PackageNotFoundError, version

from .backends import (
    DRY_RUN_RESULT,
    AsyncioExecutionBackend,
    ExecutionBackend,
    LocalExecutionBackend,
    NoopExecutionBackend,
    TaskReporter,
)
from .engine import WorkflowEngine
from .errors import AsyncFlowError, DependencyFailureError, ExecutableError
from .tasks import TaskFuture, TaskKind, TaskState

try:
    __version__ = version("asyncflow")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "DRY_RUN_RESULT",
    "AsyncFlowError",
    "AsyncioExecutionBackend",
    "DependencyFailureError",
    "ExecutableError",
    "ExecutionBackend",
    "LocalExecutionBackend",
    "NoopExecutionBackend",
    "TaskFuture",
    "TaskKind",
    "TaskReporter",
    "TaskState",
    "WorkflowEngine",
    "__version__",
]
