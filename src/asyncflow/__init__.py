"""asyncflow: workflows of async tasks on top of asyncio.

Decorate ``async def`` functions as tasks, call them to get futures at once,
pass futures to other tasks to declare dependencies, and let independent work
run in parallel on threads, processes, asyncio or a cluster.
"""

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .backends import (
    DRY_RUN_PROMPT_RESULT,
    DRY_RUN_RESULT,
    AsyncioExecutionBackend,
    ExecutionBackend,
    LocalExecutionBackend,
    NoopExecutionBackend,
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

#: Public names whose modules (or optional dependencies) load on first use.
_LAZY = {
    "CallablePromptBackend": "asyncflow.backends.prompt",
    "ConcurrentExecutionBackend": "asyncflow.backends.local",
    "DaskExecutionBackend": "asyncflow.backends.dask_",
    "InputFile": "asyncflow.files",
    "OpenAIChatBackend": "asyncflow.backends.prompt",
    "OutputFile": "asyncflow.files",
    "ResourceError": "asyncflow.errors",
    "RhapsodyBackend": "asyncflow.backends.rhapsody",
    "current_resources": "asyncflow.resources",
}

if TYPE_CHECKING:
    from .backends.dask_ import DaskExecutionBackend
    from .backends.local import ConcurrentExecutionBackend
    from .backends.prompt import CallablePromptBackend, OpenAIChatBackend
    from .backends.rhapsody import RhapsodyBackend
    from .errors import ResourceError
    from .files import InputFile, OutputFile
    from .resources import current_resources


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'asyncflow' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "DRY_RUN_PROMPT_RESULT",
    "DRY_RUN_RESULT",
    "AsyncFlowError",
    "AsyncioExecutionBackend",
    "CallablePromptBackend",
    "CheckpointError",
    "ConcurrentExecutionBackend",
    "DaskExecutionBackend",
    "DependencyFailureError",
    "ExecutableError",
    "ExecutionBackend",
    "InputFile",
    "LocalExecutionBackend",
    "NoopExecutionBackend",
    "OpenAIChatBackend",
    "OutputFile",
    "ResourceError",
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
    "current_resources",
]


def __dir__() -> list[str]:
    # The implementation modules stay importable, but are not the API.
    return sorted(__all__)
