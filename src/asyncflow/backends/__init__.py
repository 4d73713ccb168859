"""Execution backends: where and how tasks run."""

from .asyncio_ import AsyncioExecutionBackend
from .base import ExecutionBackend, TaskReporter
from .local import LocalExecutionBackend
from .noop import DRY_RUN_RESULT, NoopExecutionBackend
from .rhapsody import RhapsodyBackend

__all__ = [
    "DRY_RUN_RESULT",
    "AsyncioExecutionBackend",
    "ExecutionBackend",
    "LocalExecutionBackend",
    "NoopExecutionBackend",
    "RhapsodyBackend",
    "TaskReporter",
]
