"""Files a task reads (:class:`InputFile`) and writes (:class:`OutputFile`).

Both are path-like objects passed to a task as arguments, with RADICAL
AsyncFlow's constructor signatures: ``InputFile(file)`` and
``OutputFile(filename)``. The task's body receives the object itself, so
``open(f)``, ``os.fspath(f)``, ``f.filepath``, ``f.filename`` and
``f"cat {f}"`` all work.

What moving a file means depends on the backend that runs the task:

- asyncflow's own backends (threads, processes, asyncio, dry run) and
  RHAPSODY backends that share the local filesystem (its concurrent, Dask
  and Dragon backends on one machine) move nothing: an :class:`InputFile`
  is the absolute path of its file, read in place, and an
  :class:`OutputFile` is the path the task writes, relative to its working
  directory.
- RHAPSODY backends that declare ``supports_explicit_data_linking`` (its
  RADICAL-Pilot backend) stage the files: each :class:`InputFile` of a task
  is staged into the task's sandbox, from the machine where the workflow
  runs or, when a dependency declared an :class:`OutputFile` of that name,
  from the dependency's sandbox. Backends that declare
  ``supports_implicit_data_linking`` also get every file of a dependency that
  declared no :class:`OutputFile`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

__all__ = ["REMOTE_SCHEMES", "URL_SCHEMES", "File", "InputFile", "OutputFile"]

#: URL schemes an :class:`InputFile` recognises (RADICAL AsyncFlow's list).
URL_SCHEMES = (
    "http",
    "https",
    "ftp",
    "ftps",
    "sftp",
    "file",
    "data",
    "s3",
    "azure",
    "r2",
    "gs",
)
#: The remote schemes an :class:`InputFile` downloads when it is made.
REMOTE_SCHEMES = ("http", "https", "ftp")
#: Seconds a download may stall before it fails.
DOWNLOAD_TIMEOUT = 60.0


class File:
    """What :class:`InputFile` and :class:`OutputFile` share: a ``filename``
    (the last part of the path) and a ``filepath``, usable wherever a path is
    (``os.PathLike``)."""

    filename: str
    filepath: Path

    def __fspath__(self) -> str:
        return str(self.filepath)

    def __str__(self) -> str:
        return str(self.filepath)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.filepath)!r})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, File)
        return self.filepath == other.filepath

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.filepath))

    @staticmethod
    def download_remote_url(url: str) -> Path:
        """Download ``url`` into the current directory; its absolute path.

        The file is named after the URL's last path segment
        (``downloaded_file`` when there is none) and appears whole or not at
        all. Blocks until the download is done: in a coroutine, make the
        :class:`InputFile` with ``await asyncio.to_thread(InputFile, url)``.
        """
        import urllib.request

        name = Path(unquote(urlparse(url).path)).name or "downloaded_file"
        target = Path(name).resolve()
        fd, partial = tempfile.mkstemp(prefix=f".{name}.", dir=target.parent)
        try:
            with (
                os.fdopen(fd, "wb") as sink,
                urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as source,
            ):
                shutil.copyfileobj(source, sink)
            os.replace(partial, target)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
        return target


class InputFile(File):
    """A file a task reads, given as a URL, a local path, or the name of a
    file another task produces.

    - ``http``, ``https`` and ``ftp`` URLs are downloaded into the current
      directory when the object is made (``remote_url`` keeps the URL);
    - ``file://`` URLs and paths of existing files resolve to their absolute
      path (``local_file`` keeps what was given);
    - any other name is a file a dependency will produce (``other_task_file``):
      its ``filepath`` stays as given, relative to the task's working
      directory.

    Other URL schemes (``s3``, ``gs``, ``sftp``, ...) raise ``ValueError``.
    """

    def __init__(self, file: str | os.PathLike[str]) -> None:
        self.remote_url: str | None = None
        self.local_file: str | None = None
        self.other_task_file: str | None = None
        text = os.fspath(file)
        if not isinstance(text, str) or not text:
            raise ValueError(
                f"InputFile needs a path, a URL or a file name, got {file!r}"
            )
        scheme = urlparse(text).scheme.lower()
        if scheme in URL_SCHEMES:
            if scheme == "file":
                path = Path(unquote(urlparse(text).path))
                if not path.is_file():
                    raise FileNotFoundError(f"InputFile({text!r}): no such file {path}")
                self.local_file = text
                self.filepath = path.resolve()
            elif scheme in REMOTE_SCHEMES:
                self.remote_url = text
                self.filepath = self.download_remote_url(text)
            else:
                raise ValueError(
                    f"InputFile({text!r}): {scheme}:// URLs are not fetched; "
                    f"give a local path or an {', '.join(REMOTE_SCHEMES)} URL"
                )
        elif os.path.exists(text):
            self.local_file = text
            self.filepath = Path(text).resolve()
        else:
            self.other_task_file = text
            self.filepath = Path(text)
        self.filename = self.filepath.name


class OutputFile(File):
    """A file a task writes. ``filename`` is the last part of the given path
    (the name dependents' :class:`InputFile` objects refer to); ``filepath``
    is the path as given, relative to the task's working directory.
    """

    def __init__(self, filename: str | os.PathLike[str]) -> None:
        text = os.fspath(filename)
        if not isinstance(text, str) or not text:
            raise ValueError("Filename cannot be empty")
        name = os.path.basename(text)
        if not name:
            raise ValueError(
                f"Invalid filename, the path {text} does not include a file"
            )
        self.filename = name
        self.filepath = Path(text)
