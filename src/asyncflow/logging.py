"""Logging set-up for programs that use asyncflow.

``from asyncflow.logging import init_default_logger`` is the import RADICAL
AsyncFlow's examples use (``radical.asyncflow.logging``) with the package
name changed. The library itself logs to the ``asyncflow`` logger and its
children; see docs/logging.md.
"""

from ._log import LOGGER_NAME, STYLES, init_default_logger

__all__ = ["LOGGER_NAME", "STYLES", "init_default_logger"]
