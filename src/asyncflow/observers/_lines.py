"""A JSON-lines file written from the event loop, for observers."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["LinesFile"]

log = logging.getLogger("asyncflow.observers")


class LinesFile:
    """A header line, then the lines appended to :attr:`lines`, written every
    ``every`` seconds (never, if None) and at :meth:`close`.

    The file is truncated at open (it describes one run). A write that fails
    stops the file with one WARNING naming ``what`` and the error; the run
    goes on. Undecodable characters (surrogates in file names) are escaped.
    ``before_write``, if given, is called at the start of every write, to
    append the lines its owner keeps unencoded until then.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        loop: asyncio.AbstractEventLoop,
        header: dict[str, Any],
        every: float | None,
        what: str,
        before_write: Callable[[], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.lines: list[str] = []
        self._before_write = before_write
        self._loop = loop
        self._every = every
        self._what = what
        self._file: IO[str] | None = open(  # noqa: SIM115 - closed by close()
            self.path, "w", encoding="utf-8", errors="backslashreplace"
        )
        self._file.write(json.dumps(header, default=str, ensure_ascii=False) + "\n")
        self._file.flush()
        self._timer: asyncio.TimerHandle | None = (
            loop.call_later(every, self._tick) if every else None
        )

    @property
    def closed(self) -> bool:
        return self._file is None

    def _tick(self) -> None:
        try:
            self.flush()
        finally:
            if self._file is not None and self._every:
                self._timer = self._loop.call_later(self._every, self._tick)

    def flush(self) -> None:
        if self._file is None:
            return
        if self._before_write is not None:
            try:
                self._before_write()
            except Exception:
                log.warning(
                    "%s %s: encoding failed; it stops, the run goes on",
                    self._what,
                    self.path,
                    exc_info=True,
                )
                self.lines.clear()
                self._close_file()
                return
        if not self.lines:
            return
        text = "\n".join(self.lines) + "\n"
        self.lines.clear()
        try:
            self._file.write(text)
            self._file.flush()
        except (OSError, ValueError) as exc:
            log.warning(
                "%s %s cannot be written (%s); it stops, the run goes on",
                self._what,
                self.path,
                exc,
            )
            self._close_file()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
        self._close_file()

    def _close_file(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
