"""``asyncflow.data``: where RADICAL AsyncFlow scripts import their file
declarations from (``from radical.asyncflow.data import InputFile``); the
same classes as ``asyncflow.InputFile`` and ``asyncflow.OutputFile``."""

from .files import InputFile, OutputFile

__all__ = ["InputFile", "OutputFile"]
