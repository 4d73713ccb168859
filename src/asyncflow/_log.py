"""The ``asyncflow`` logger and its ``RADICAL_LOG_LVL`` switch.

The library never configures the root logger. When ``RADICAL_LOG_LVL`` (or
its alias ``ASYNCFLOW_LOG_LVL``, which wins if both are set) names a level,
the ``asyncflow`` logger gets that level and one handler writing to stderr.
"""

from __future__ import annotations

import logging
import os
import sys

LOGGER_NAME = "asyncflow"
ENV_VARS = ("ASYNCFLOW_LOG_LVL", "RADICAL_LOG_LVL")
_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

logger = logging.getLogger(LOGGER_NAME)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of each record.

    Stays silent while the application has configured logging itself (the
    root logger has handlers): the record reaches those handlers anyway.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter(_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        if logger.propagate and logging.getLogger().handlers:
            return
        self.stream = sys.stderr
        super().emit(record)


def parse_level(text: str) -> int | None:
    """A level from a name (``debug``, ``WARNING``) or a number; None if invalid."""
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    level = logging.getLevelName(text.upper())
    return level if isinstance(level, int) else None


def configure_from_environment() -> None:
    """Apply the log level named in the environment, if any. Idempotent."""
    for var in ENV_VARS:
        value = os.environ.get(var)
        if value:
            break
    else:
        return
    level = parse_level(value)
    if level is None:
        logger.warning(
            "ignoring %s=%r: not a log level (use DEBUG, INFO, WARNING, ERROR, "
            "CRITICAL or a number)",
            var,
            value,
        )
        return
    logger.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())
