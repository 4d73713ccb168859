"""Execution backends: where and how tasks run."""

from typing import TYPE_CHECKING, Any

from .asyncio_ import AsyncioExecutionBackend
from .base import ExecutionBackend, TaskReporter
from .local import LocalExecutionBackend
from .noop import DRY_RUN_PROMPT_RESULT, DRY_RUN_RESULT, NoopExecutionBackend

#: Public names whose modules load on first use (they are rarely needed and
#: import more than the rest).
_LAZY = {
    "RhapsodyBackend": "asyncflow.backends.rhapsody",
}

if TYPE_CHECKING:
    from .rhapsody import RhapsodyBackend


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'asyncflow.backends' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "DRY_RUN_PROMPT_RESULT",
    "DRY_RUN_RESULT",
    "AsyncioExecutionBackend",
    "ExecutionBackend",
    "LocalExecutionBackend",
    "NoopExecutionBackend",
    "RhapsodyBackend",
    "TaskReporter",
]
