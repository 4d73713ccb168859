"""Run tasks on backends that speak the RHAPSODY / RADICAL task-dict protocol.

Those backends (RHAPSODY's concurrent, Dask, RADICAL-Pilot and Dragon
backends, for instance) take lists of task dictionaries in ``submit_tasks``
and report ``(task, state)`` through a registered callback. Passing one to
``WorkflowEngine.create`` wraps it in :class:`RhapsodyBackend` automatically.

``capture_stdio=True`` works as on asyncflow's own backends: the inner
backend writes the command's output into a private folder of the engine's
run, and the files are then renamed to the names every backend uses
(``<task uid>-<run id>.out`` / ``.err`` under ``work_dir/<engine uid>/``, or
``<task name>-<cache key>`` for calls the checkpoint caches). Backends that
declare ``supports_explicit_data_linking`` / ``supports_implicit_data_linking``
get the :class:`~asyncflow.InputFile` / :class:`~asyncflow.OutputFile`
arguments of each task staged through their ``link_explicit_data_deps`` /
``link_implicit_data_deps`` hooks, as RADICAL AsyncFlow does.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shlex
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import ExecutableError
from ..files import InputFile, OutputFile
from ..tasks import TaskFuture, TaskKind
from ._subprocess import _UNSAFE, _private_folder
from .base import ExecutionBackend

__all__ = ["RhapsodyBackend", "TaskDictBackend", "captured_paths"]

log = logging.getLogger("asyncflow.backends.rhapsody")


@runtime_checkable
class TaskDictBackend(Protocol):
    """The protocol of RHAPSODY (and RADICAL AsyncFlow) execution backends."""

    def register_callback(self, func: Any) -> None: ...

    async def submit_tasks(self, tasks: list[dict[str, Any]]) -> Any: ...

    async def cancel_task(self, uid: str) -> Any: ...

    async def shutdown(self) -> None: ...


def captured_paths(task: TaskFuture) -> tuple[Path, Path]:
    """Where a ``capture_stdio`` task's stdout and stderr end up.

    Under ``work_dir/<engine uid>/``: ``<task uid>-<run id>.out`` and
    ``.err``, or, for a call the checkpoint caches, ``<task name>-<cache
    key>.out`` and ``.err`` (the same call names the same files, so a
    restored result still points at its output).
    """
    engine = task._engine
    folder = Path(engine.work_dir) / engine.uid
    key = task._key
    if key is not None:
        stem = f"{_UNSAFE.sub('_', task.name)[:100]}-{_UNSAFE.sub('_', key)[:20]}"
    else:
        stem = f"{task.uid}-{engine.run_id}"
    return folder / f"{stem}.out", folder / f"{stem}.err"


def _move(source: str, target: Path) -> None:
    """Rename ``source`` to ``target``, replacing whatever is there (a link
    included, never followed); across file systems, copy then rename."""
    try:
        os.replace(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        shutil.copyfile(source, partial)
        os.chmod(partial, 0o600)
        os.replace(partial, target)
        os.unlink(source)


def _files_in(values: Iterable[Any]) -> Iterable[Any]:
    for value in values:
        if isinstance(value, (InputFile, OutputFile)):
            yield value
        elif isinstance(value, (list, tuple, set, frozenset)):
            yield from (v for v in value if isinstance(v, (InputFile, OutputFile)))


class _Sent:
    """One attempt handed to the inner backend."""

    __slots__ = ("attempt", "capture", "future")

    def __init__(self, future: TaskFuture, attempt: int, capture: bool) -> None:
        self.future = future
        self.attempt = attempt
        self.capture = capture


class RhapsodyBackend(ExecutionBackend):
    """Adapts a task-dict backend to asyncflow's :class:`ExecutionBackend`.

    The inner backend sees each attempt under its own uid: the task's uid
    for the first attempt, ``<task uid>.<attempt>`` for retries, so that a
    late report of an abandoned attempt is never taken for the current one.
    """

    def __init__(self, inner: TaskDictBackend, name: str | None = None) -> None:
        super().__init__(name or str(getattr(inner, "name", None) or "default"))
        self.inner = inner
        self._tasks: dict[str, _Sent] = {}  # by the uid the inner backend sees
        self._current: dict[str, str] = {}  # task uid -> that uid
        self._loop: asyncio.AbstractEventLoop | None = None
        self._jobs: set[asyncio.Task[Any]] = set()
        self._capture_dir: Path | None = None
        self._explicit = bool(getattr(inner, "supports_explicit_data_linking", False))
        self._implicit = bool(getattr(inner, "supports_implicit_data_linking", False))
        #: Staging backends: task uid -> (the uid its last attempt ran under,
        #: the names of the OutputFiles it declared).
        self._produced: dict[str, tuple[str, frozenset[str]]] = {}
        states = (
            inner.get_task_states_map()
            if hasattr(inner, "get_task_states_map")
            else None
        )
        #: How resources and priority reach the inner backend: RADICAL-Pilot
        #: task description keys, Dask's ``priority=`` (its workers declare
        #: no resources, so none are asked for: a warning says so), or not.
        kind = type(inner).__name__
        self._placement = (
            "pilot"
            if kind == "RadicalExecutionBackend"
            else "dask"
            if kind == "DaskExecutionBackend"
            else None
        )
        self.honours_resources = self._placement == "pilot"
        self._done = str(getattr(states, "DONE", "DONE"))
        self._failed = str(getattr(states, "FAILED", "FAILED"))
        self._cancelled = str(getattr(states, "CANCELED", "CANCELED"))

    async def attach(self, reporter: Any) -> None:
        await super().attach(reporter)
        self._loop = asyncio.get_running_loop()
        self.inner.register_callback(self._on_state)
        engine = getattr(reporter, "_engine", None)
        attached = getattr(self.inner, "attached_to", None)
        if engine is not None and isinstance(attached, list):
            attached.append(engine.uid)
            with contextlib.suppress(AttributeError):
                self.inner.is_attached = True  # type: ignore[attr-defined]

    def submit(self, tasks: Sequence[TaskFuture]) -> None:
        dicts = []
        for task in tasks:
            try:
                entry = self._as_dict(task)
            except Exception as exc:
                self.reporter.failed(task, exc)
                continue
            dicts.append(entry)
        if dicts:
            self._spawn(self.inner.submit_tasks(dicts), [d["uid"] for d in dicts])

    def _as_dict(self, task: TaskFuture) -> dict[str, Any]:
        kind = task.kind
        description = dict(task.task_description)
        uid = task.uid if task.attempts <= 1 else f"{task.uid}.{task.attempts}"
        capture = task._definition.capture_stdio
        entry: dict[str, Any] = {
            "uid": uid,
            "name": task.name,
            "args": task.args,
            "kwargs": task.kwargs,
            "function": None,
            "executable": None,
            "arguments": [],
            "prompt": None,
            "task_backend_specific_kwargs": description,
            "capture_stdio": capture,
        }
        if kind is TaskKind.FUNCTION:
            entry["function"] = task.function
        elif kind is TaskKind.EXECUTABLE:
            command = task.command
            if isinstance(command, (list, tuple)):
                # An argument list never goes through a shell.
                description["shell"] = False
                argv = [str(part) for part in command]
            elif description.setdefault("shell", True):
                argv = [command]
            else:
                argv = shlex.split(command)
            entry["executable"], entry["arguments"] = argv[0], argv[1:]
        else:
            entry["prompt"] = task.command
        if self._placement is not None:
            _place(task, description, self._placement)
        if capture:
            self._prepare_capture(task)
        if self._explicit or self._implicit:
            self._stage(task, entry)
        self._tasks[uid] = _Sent(task, task.attempts, capture)
        self._current[task.uid] = uid
        return entry

    # -- captured output --------------------------------------------------------

    def _prepare_capture(self, task: TaskFuture) -> None:
        """Point the inner backend at this run's private capture folder."""
        if self._capture_dir is None:
            engine = task._engine
            folder = Path(engine.work_dir) / engine.uid
            _private_folder(folder, task)
            staging = folder / f".rhapsody-{engine.run_id}"
            _private_folder(staging, task)
            self._capture_dir = staging
        self.inner._work_dir = str(self._capture_dir)  # type: ignore[attr-defined]

    @staticmethod
    def _collect(task: TaskFuture, record: dict[str, Any]) -> tuple[Path, Path] | None:
        """Rename the inner backend's files to the common names; None if it
        wrote none."""
        written = record.get("stdout"), record.get("stderr")
        if not all(isinstance(p, str) and os.path.isfile(p) for p in written):
            return None
        out, err = captured_paths(task)
        for path in written:
            os.chmod(
                str(path), 0o600
            )  # private, as asyncflow's own backends write them
        _move(str(written[1]), err)
        _move(str(written[0]), out)
        return out, err

    # -- staging --------------------------------------------------------------

    def _stage(self, task: TaskFuture, entry: dict[str, Any]) -> None:
        files = list(_files_in((*task.args, *task.kwargs.values())))
        outputs = frozenset(f.filename for f in files if isinstance(f, OutputFile))
        deps = [d for d in task.dependencies if d.uid in self._produced]
        if self._implicit:
            for dep in deps:
                dep_uid, declared = self._produced[dep.uid]
                if not declared:
                    self.inner.link_implicit_data_deps(  # type: ignore[attr-defined]
                        {"uid": dep_uid, "name": dep.name}, entry
                    )
        if self._explicit:
            for file in files:
                if not isinstance(file, InputFile):
                    continue
                source = next(
                    (
                        self._produced[d.uid][0]
                        for d in deps
                        if file.filename in self._produced[d.uid][1]
                    ),
                    None,
                )
                if source is not None:
                    self.inner.link_explicit_data_deps(  # type: ignore[attr-defined]
                        src_task={"uid": source},
                        dst_task=entry,
                        file_name=file.filename,
                    )
                else:
                    self.inner.link_explicit_data_deps(  # type: ignore[attr-defined]
                        src_task=None,
                        dst_task=entry,
                        file_name=file.filename,
                        file_path=file.remote_url or str(file.filepath),
                    )
        self._produced[task.uid] = (entry["uid"], outputs)

    # -- reports --------------------------------------------------------------

    def _spawn(self, coro: Any, uids: Sequence[str]) -> None:
        assert self._loop is not None
        job = self._loop.create_task(coro)
        self._jobs.add(job)

        def done(job: asyncio.Task[Any]) -> None:
            self._jobs.discard(job)
            if not job.cancelled() and job.exception() is not None:
                for uid in uids:
                    sent = self._tasks.pop(uid, None)
                    if sent is None:
                        continue
                    if self._current.get(sent.future.uid) == uid:
                        del self._current[sent.future.uid]
                    if sent.future.attempts == sent.attempt:
                        self.reporter.failed(sent.future, job.exception())  # type: ignore[arg-type]

        job.add_done_callback(done)

    def _on_state(self, task: Any, state: Any) -> None:
        record = task if isinstance(task, dict) else task.as_dict()
        state = str(getattr(state, "value", state))
        if state not in (self._done, self._failed, self._cancelled):
            return
        uid = record.get("uid", "")
        sent = self._tasks.pop(uid, None)
        if sent is None:
            return
        future, attempt = sent.future, sent.attempt
        if self._current.get(future.uid) == uid:
            del self._current[future.uid]
        if future.attempts != attempt:
            return
        report = self.reporter.report_threadsafe
        if state == self._cancelled:
            report(
                future,
                False,
                RuntimeError(f"backend {self.name!r} cancelled task {future.name!r}"),
                attempt,
            )
            return
        files = None
        if sent.capture:
            try:
                files = self._collect(future, record)
            except OSError as exc:
                report(future, False, exc, attempt)
                return
        if state == self._done:
            if future.kind is TaskKind.FUNCTION:
                report(future, True, record.get("return_value"), attempt)
            elif files is not None:
                report(future, True, str(files[0]), attempt)
            else:
                report(future, True, record.get("stdout"), attempt)
        else:
            report(future, False, self._error(future, record, files), attempt)

    @staticmethod
    def _error(
        task: TaskFuture, record: dict[str, Any], files: tuple[Path, Path] | None
    ) -> BaseException:
        error = record.get("exception")
        if isinstance(error, BaseException):
            return error
        if task.kind is TaskKind.EXECUTABLE and record.get("exit_code") is not None:
            if files is not None:
                out, err = (p.read_bytes().decode(errors="replace") for p in files)
            else:
                out = str(record.get("stdout") or "")
                err = str(record.get("stderr") or "")
            return ExecutableError(
                task.name, task.command, int(record["exit_code"]), out, err
            )
        return RuntimeError(
            f"task {task.name!r} failed: {record.get('stderr') or 'no details given'}"
        )

    def cancel(self, task: TaskFuture) -> None:
        uid = self._current.pop(task.uid, None)
        if uid is not None and self._tasks.pop(uid, None) is not None:
            self._spawn(self.inner.cancel_task(uid), ())

    async def shutdown(self) -> None:
        await self.inner.shutdown()
        for job in list(self._jobs):
            job.cancel()
        self._tasks.clear()
        self._current.clear()
        self._produced.clear()
        if self._capture_dir is not None:
            # Empty unless the inner backend left files of stopped attempts.
            with contextlib.suppress(OSError):
                self._capture_dir.rmdir()


def adapt(backend: object) -> ExecutionBackend | None:
    """Wrap a task-dict backend; None when ``backend`` is not one."""
    if isinstance(backend, TaskDictBackend) and not isinstance(
        backend, ExecutionBackend
    ):
        return RhapsodyBackend(backend)
    return None


def _place(task: TaskFuture, description: dict[str, Any], how: str) -> None:
    """Put a task's resources and priority into its description, in the
    inner backend's vocabulary; keys the user set there win."""
    request = task.resources
    priority = task.priority
    if how == "pilot":
        if request is not None:
            description.setdefault("ranks", 1)
            description.setdefault("cores_per_rank", request.cpus)
            if request.gpus:
                description.setdefault("gpus_per_rank", request.gpus)
            if request.memory:
                mib = -(-request.memory // 2**20)
                description.setdefault("mem_per_rank", mib)
        if priority:
            description.setdefault("priority", priority)
    elif priority:  # Dask's client.submit keyword
        description.setdefault("priority", priority)
