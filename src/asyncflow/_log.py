"""The ``asyncflow`` logger, its ``RADICAL_LOG_LVL`` switch, and
:func:`init_default_logger`.

The library never configures the root logger on its own. When
``RADICAL_LOG_LVL`` (or its alias ``ASYNCFLOW_LOG_LVL``, which wins if both
are set) names a level, the ``asyncflow`` logger gets that level and one
handler writing to stderr. A program that wants its whole logging set up in
one call uses :func:`init_default_logger` (public as
``asyncflow.logging.init_default_logger``).
"""

from __future__ import annotations

import logging
import os
import sys
import threading

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


# -- init_default_logger: one call that sets up a program's logging ------------

#: The styles :func:`init_default_logger` accepts (RADICAL AsyncFlow's names).
STYLES = ("modern", "core", "execution_backend", "minimal")
_DATE = "%Y-%m-%d %H:%M:%S"
_COLORS = {
    logging.DEBUG: "\033[96m",
    logging.INFO: "\033[94m",
    logging.WARNING: "\033[93m",
    logging.ERROR: "\033[91m",
    logging.CRITICAL: "\033[1;91m",
}
_GREY, _NAME, _RESET = "\033[90m", "\033[38;5;165m", "\033[0m"
#: Attributes every LogRecord has: not repeated as fields in JSON lines.
_RECORD_FIELDS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "short_name",
    "thread_id",
}


def _short_name(name: str) -> str:
    if name == "__main__":
        return "main"
    return name.rsplit(".", 1)[-1]


class _ConsoleFormatter(logging.Formatter):
    """``time │ LEVEL │ [logger] │ message``, coloured by level if asked."""

    def __init__(self, style: str, colors: bool, details: bool) -> None:
        super().__init__(datefmt=_DATE)
        self._style_name = style
        self._colors = colors
        self._details = details

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            message = f"{message}\n{record.exc_text}"
        if record.stack_info:
            message = f"{message}\n{self.formatStack(record.stack_info)}"
        level = record.levelname
        name = f"[{_short_name(record.name)}]"
        when = f"{self.formatTime(record, _DATE)}.{int(record.msecs):03d}"
        if self._colors:
            color = _COLORS.get(record.levelno, "")
            level = f"{color}{level}{_RESET}"
            name = f"{_NAME}{name}{_RESET}"
            when = f"{_GREY}{when}{_RESET}"
        if self._style_name == "minimal":
            return f"{level} {name} {message}"
        details = (
            f"[TID:{threading.get_native_id()} PID:{record.process}] "
            if self._details
            else ""
        )
        return f"{when} │ {details}{level} │ {name} │ {message}"


class _JsonFormatter(logging.Formatter):
    """One JSON object per record, with the fields given through ``extra=``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "timestamp": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        import json

        return json.dumps(entry, default=str)


def _level(value: int | str, what: str) -> int:
    level = parse_level(value) if isinstance(value, str) else value
    if not isinstance(level, int) or isinstance(level, bool):
        raise ValueError(
            f"{what} must be a level name (DEBUG, INFO, WARNING, ERROR, CRITICAL) "
            f"or a number, got {value!r}"
        )
    return level


def _file_handler(path: str | os.PathLike[str]) -> logging.FileHandler:
    import pathlib

    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    return logging.FileHandler(target, encoding="utf-8")


def init_default_logger(
    log_level: int | str = logging.INFO,
    *,
    output_file: str | os.PathLike[str] | None = None,
    file_log_level: int | str | None = None,
    use_colors: bool = True,
    show_details: bool = False,
    style: str = "modern",
    clear_handlers: bool = False,
    logger_name: str | None = None,
    structured_logging: bool = False,
    structured_file: str | os.PathLike[str] | None = None,
) -> logging.Logger:
    """Set up logging for a program in one call, as RADICAL AsyncFlow's
    ``radical.asyncflow.logging.init_default_logger`` does (same parameters).

    Adds to the logger ``logger_name`` (the root logger when None) a console
    handler writing to standard error at ``log_level``; with ``output_file``,
    a plain-text file handler at ``file_log_level`` (default: ``log_level``);
    with ``structured_logging``, a handler writing one JSON object per line
    to ``structured_file`` (default: ``output_file`` with the suffix
    ``.json``, else ``asyncflow.logs.json``). ``use_colors`` colours the
    console by level when standard error is a terminal; ``show_details``
    adds thread and process ids; ``style`` is one of ``"modern"``,
    ``"core"``, ``"execution_backend"`` (the same layout) or ``"minimal"``
    (no time stamp). ``clear_handlers`` removes (and closes) the logger's
    existing handlers first. Calling it again replaces the handlers an
    earlier call added instead of doubling every line. Python warnings are
    routed to logging. Returns the configured logger.
    """
    if style not in STYLES:
        raise ValueError(
            f"unknown logging style {style!r}: use one of {', '.join(STYLES)}"
        )
    console_level = _level(log_level, "log_level")
    file_level = (
        console_level
        if file_log_level is None
        else _level(file_log_level, "file_log_level")
    )
    target = logging.getLogger(logger_name)
    for handler in list(target.handlers):
        if clear_handlers or getattr(handler, "_asyncflow_default", False):
            target.removeHandler(handler)
            handler.close()

    handlers: list[logging.Handler] = []
    console = _DefaultStderr()
    console.setLevel(console_level)
    console.setFormatter(
        _ConsoleFormatter(style, use_colors and _is_terminal(), show_details)
    )
    handlers.append(console)
    if output_file is not None:
        plain = _file_handler(output_file)
        plain.setLevel(file_level)
        plain.setFormatter(_ConsoleFormatter(style, False, show_details))
        handlers.append(plain)
    if structured_logging:
        if structured_file is None:
            import pathlib

            structured_file = (
                pathlib.Path(output_file).with_suffix(".json")
                if output_file is not None
                else "asyncflow.logs.json"
            )
        lines = _file_handler(structured_file)
        lines.setLevel(file_level)
        lines.setFormatter(_JsonFormatter())
        handlers.append(lines)
    for handler in handlers:
        handler._asyncflow_default = True  # type: ignore[attr-defined]
        target.addHandler(handler)
    # Records below every handler's level are not even created.
    target.setLevel(min(h.level for h in handlers))
    logging.captureWarnings(True)
    logger.debug(
        "logging configured: console %s, file %s, JSON lines %s, style %s",
        logging.getLevelName(console_level),
        output_file if output_file is not None else "off",
        structured_file if structured_logging else "off",
        style,
    )
    return target


class _DefaultStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """The console handler of :func:`init_default_logger`: standard error as
    it is at each record (a test or a tool may swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
