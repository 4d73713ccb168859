"""asyncflow: workflows of async tasks on top of asyncio.

Decorate ``async def`` functions as tasks, call them to get futures at once,
pass futures to other tasks to declare dependencies, and let independent work
run in parallel on threads, processes, asyncio or a cluster.
"""

from ._version import __version__
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
