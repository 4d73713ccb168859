"""asyncflow: workflows of async tasks on top of asyncio.

Decorate ``async def`` functions as tasks, call them to get futures at once,
pass futures to other tasks to declare dependencies, and let independent work
run in parallel on threads, processes, asyncio or a cluster.
"""

from importlib import metadata as _metadata

from .backends import (
    DRY_RUN_RESULT,
    AsyncioExecutionBackend,
    ExecutionBackend,
    LocalExecutionBackend,
    NoopExecutionBackend,
    RhapsodyBackend,
    TaskReporter,
)
from .engine import Task, TaskDecorator, WorkflowEngine
from .errors import (
    AsyncFlowError,
    CheckpointError,
    DependencyFailureError,
    ExecutableError,
    TaskTimeoutError,
    WorkerLostError,
)
from .events import TaskEvent
from .tasks import TaskFuture, TaskKind, TaskOptions, TaskState

try:
    __version__ = _metadata.version("asyncflow")
except _metadata.PackageNotFoundError:  # pragma: no cover - a bare source tree
    __version__ = "0.0.0"

__all__ = [
    "DRY_RUN_RESULT",
    "AsyncFlowError",
    "AsyncioExecutionBackend",
    "CheckpointError",
    "DependencyFailureError",
    "ExecutableError",
    "ExecutionBackend",
    "LocalExecutionBackend",
    "NoopExecutionBackend",
    "RhapsodyBackend",
    "Task",
    "TaskDecorator",
    "TaskEvent",
    "TaskFuture",
    "TaskKind",
    "TaskOptions",
    "TaskReporter",
    "TaskState",
    "TaskTimeoutError",
    "WorkerLostError",
    "WorkflowEngine",
    "__version__",
]


def __dir__() -> list[str]:
    # The implementation modules stay importable, but are not the API.
    return sorted(__all__)
