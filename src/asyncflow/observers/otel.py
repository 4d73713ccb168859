"""OpenTelemetry: one span per task, from the engine's lifecycle events.

``await flow.start_telemetry(...)`` (extra ``otel``) adds a built-in observer
that turns each task's events into one span: it opens when the task is handed
to its backend (``submitted``; ``started`` for blocks), closes at the task's
final event, and carries the task's identity, final state, attempts, retries
(as ``retried`` span events) and failure. A block's members are children of
the block's span; the tasks of a :meth:`workflow_scope
<asyncflow.WorkflowEngine.workflow_scope>` are children of one span per
workflow id; everything sits under one engine span, so one run is one trace.

The parameters are RADICAL AsyncFlow 0.6's (``resource_poll_interval``,
``checkpoint_interval``, ``checkpoint_path``, ``span_processors``,
``metric_readers``, ``resource``) plus keyword-only ones choosing where spans
go (``exporter``, ``endpoint``, ``service_name``, ``tracer_provider``). See
docs/telemetry.md for the table and the differences from RADICAL AsyncFlow.

OpenTelemetry is imported only when telemetry starts: ``import asyncflow``
never imports it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ..events import FINAL_KINDS, TaskEvent
from ._lines import LinesFile

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.metrics import Counter, Histogram
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
        InMemorySpanExporter,
    )
    from opentelemetry.trace import Span, Tracer, TracerProvider

    from ..engine import WorkflowEngine

__all__ = ["EXPORTERS", "INSTALL_HINT", "SCOPE", "Telemetry", "start_telemetry"]

log = logging.getLogger("asyncflow.telemetry")

#: What to run when OpenTelemetry is missing.
INSTALL_HINT = "pip install 'asyncflow[otel]'"
#: The instrumentation scope (tracer and meter name) of every span and metric.
SCOPE = "asyncflow"
#: The names ``exporter=`` takes (or give a ``SpanExporter`` object).
EXPORTERS = ("console", "memory", "otlp", "otlp-http", "otlp-grpc")

_OTLP_MODULES = {
    "http": (
        "opentelemetry.exporter.otlp.proto.http.trace_exporter",
        "opentelemetry-exporter-otlp-proto-http",
    ),
    "grpc": (
        "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
        "opentelemetry-exporter-otlp-proto-grpc",
    ),
}

# Attribute keys (``asyncflow.workflow_id`` is RADICAL AsyncFlow's own).
A_UID = "asyncflow.task.uid"
A_NAME = "asyncflow.task.name"
A_KIND = "asyncflow.task.kind"
A_STATE = "asyncflow.task.state"
A_ATTEMPTS = "asyncflow.task.attempts"
A_RESTORED = "asyncflow.task.restored"
A_ERROR = "asyncflow.task.error"
A_ATTEMPT = "asyncflow.task.attempt"
A_BACKEND = "asyncflow.backend"
A_WORKFLOW = "asyncflow.workflow_id"
A_ENGINE = "asyncflow.engine.uid"
A_RUN = "asyncflow.run_id"
A_ERROR_TYPE = "error.type"

_STATES = {
    "done": "DONE",
    "restored": "DONE",
    "failed": "FAILED",
    "cancelled": "CANCELLED",
}


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _type_name(error: BaseException) -> str:
    kind = type(error)
    module = kind.__module__
    return (
        kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"
    )


def _otel_missing(exc: ImportError) -> ImportError:
    return ImportError(
        f"flow.start_telemetry() needs OpenTelemetry (module {exc.name or '?'!r} "
        f"is missing): {INSTALL_HINT}"
    )


async def start_telemetry(
    engine: WorkflowEngine,
    resource_poll_interval: float = 5.0,
    checkpoint_interval: float | None = None,
    checkpoint_path: str | os.PathLike[str] | None = None,
    span_processors: Sequence[SpanProcessor] | None = None,
    metric_readers: Sequence[MetricReader] | None = None,
    resource: Resource | None = None,
    *,
    exporter: str | SpanExporter | None = None,
    endpoint: str | None = None,
    service_name: str | None = None,
    tracer_provider: TracerProvider | None = None,
) -> Telemetry:
    """Export one OpenTelemetry span per task of ``engine`` from now on.

    The first six parameters are RADICAL AsyncFlow 0.6's, in its order:
    ``resource_poll_interval`` is accepted and checked but has no effect (no
    node metrics are polled); ``checkpoint_path`` names a directory that
    receives the finished spans as JSON lines, written every
    ``checkpoint_interval`` seconds (``None``: at the end);
    ``span_processors`` are added to the tracer provider;
    ``metric_readers`` receive task counts and durations; ``resource`` is the
    provider's ``Resource``. Keyword-only: ``exporter`` is ``"console"``,
    ``"memory"``, ``"otlp"`` (``"otlp-http"``, ``"otlp-grpc"``; needs
    ``opentelemetry-exporter-otlp``) or a ``SpanExporter``; ``endpoint`` goes
    to the OTLP exporter; ``service_name`` sets ``service.name``;
    ``tracer_provider`` uses a provider of yours instead of a new one. With
    no destination at all, spans are kept in memory (:meth:`Telemetry.spans`).

    Returns the :class:`Telemetry` handle. Raises ``ImportError`` when
    OpenTelemetry (or the OTLP exporter asked for) is not installed.
    """
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource as SdkResource
        from opentelemetry.sdk.trace import SpanProcessor as SdkSpanProcessor
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SimpleSpanProcessor,
        )
        from opentelemetry.sdk.trace.export import SpanExporter as SdkSpanExporter
    except ImportError as exc:
        raise _otel_missing(exc) from exc

    if engine.is_shut_down:
        raise RuntimeError(
            f"workflow engine {engine.uid!r} is shut down: start telemetry before "
            "calling flow.shutdown()"
        )
    for observer in engine._builtins:
        if isinstance(observer, _SpanObserver) and not observer.closed:
            raise RuntimeError(
                f"telemetry is already started for workflow engine {engine.uid!r}; "
                "`await telemetry.stop()` before starting it again"
            )
    _check_seconds("resource_poll_interval", resource_poll_interval, none_ok=False)
    _check_seconds("checkpoint_interval", checkpoint_interval, none_ok=True)
    if checkpoint_interval is not None and checkpoint_path is None:
        log.warning(
            "start_telemetry(checkpoint_interval=%s) without checkpoint_path: "
            "nothing is written to disk",
            checkpoint_interval,
        )
    processors = list(span_processors or ())
    for processor in processors:
        if not isinstance(processor, SdkSpanProcessor):
            raise TypeError(
                "span_processors takes OpenTelemetry SpanProcessor objects (such "
                "as BatchSpanProcessor(exporter)), got "
                f"{type(processor).__name__}"
            )
    readers = list(metric_readers or ())
    if readers:
        try:
            from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
            from opentelemetry.sdk.metrics.export import (
                MetricReader as SdkMetricReader,
            )
        except ImportError as exc:
            raise _otel_missing(exc) from exc
        for reader in readers:
            if not isinstance(reader, SdkMetricReader):
                raise TypeError(
                    "metric_readers takes OpenTelemetry MetricReader objects (such "
                    "as InMemoryMetricReader()), got "
                    f"{type(reader).__name__}"
                )
    if resource is not None and not isinstance(resource, SdkResource):
        raise TypeError(
            "resource takes an opentelemetry.sdk.resources.Resource, got "
            f"{type(resource).__name__}"
        )
    if service_name is not None and (
        not isinstance(service_name, str) or not service_name
    ):
        raise ValueError(
            f"service_name must be a non-empty string, got {service_name!r}"
        )
    if tracer_provider is not None and (
        resource is not None or service_name is not None
    ):
        raise ValueError(
            "resource= and service_name= describe a tracer provider that "
            "start_telemetry() creates: with tracer_provider=, set the resource "
            "on your provider"
        )

    if (
        tracer_provider is not None
        and not isinstance(tracer_provider, SdkTracerProvider)
        and (processors or exporter is not None)
    ):
        raise TypeError(
            "span processors and exporters can only be added to an "
            "opentelemetry.sdk.trace.TracerProvider, got "
            f"{type(tracer_provider).__name__}: give none, or add them to your "
            "provider yourself"
        )

    # Where spans go: the exporter asked for, or memory when nothing is.
    built: SpanExporter | None = None
    memory: InMemorySpanExporter | None = None
    if exporter is None:
        if endpoint is not None:
            raise ValueError("endpoint= is for the OTLP exporter: add exporter='otlp'")
        if not processors and tracer_provider is None and checkpoint_path is None:
            exporter = "memory"
    if isinstance(exporter, str):
        built = _build_exporter(exporter, endpoint)
        if exporter == "memory":
            memory = cast("InMemorySpanExporter", built)
        # Console and memory export at once; the network in a thread of its own.
        processors.append(
            SimpleSpanProcessor(built)
            if exporter in ("console", "memory")
            else _batch(BatchSpanProcessor, built)
        )
    elif exporter is not None:
        if not isinstance(exporter, SdkSpanExporter):
            raise TypeError(
                f"exporter takes one of {', '.join(map(repr, EXPORTERS))} or an "
                f"OpenTelemetry SpanExporter object, got {type(exporter).__name__}"
            )
        if endpoint is not None:
            raise ValueError(
                "endpoint= is for exporter='otlp'; configure your own exporter "
                "object directly"
            )
        built = exporter
        processors.append(_batch(BatchSpanProcessor, exporter))

    owned = tracer_provider is None
    if tracer_provider is None:
        if resource is None:
            resource = _default_resource(service_name)
        elif service_name is not None:
            resource = resource.merge(SdkResource({"service.name": service_name}))
        tracer_provider = SdkTracerProvider(resource=resource, shutdown_on_exit=False)
    if processors:
        assert isinstance(tracer_provider, SdkTracerProvider)  # checked above
        for processor in processors:
            tracer_provider.add_span_processor(processor)

    meter_provider: MeterProvider | None = None
    if readers:
        meter_provider = SdkMeterProvider(
            metric_readers=readers,
            resource=resource
            or getattr(tracer_provider, "resource", None)
            or _default_resource(None),
        )

    span_file: _SpanFile | None = None
    if checkpoint_path is not None:
        span_file = _SpanFile(
            Path(checkpoint_path),
            engine,
            checkpoint_interval,
        )

    from .. import __version__

    tracer = tracer_provider.get_tracer(SCOPE, __version__)
    observer = _SpanObserver(
        engine,
        trace,
        tracer,
        tracer_provider if owned else None,
        meter_provider,
        span_file,
    )
    engine._add_builtin(observer)
    log.info(
        "telemetry started for engine %s: spans to %s",
        engine.uid,
        _destinations(exporter, processors, built, span_file, owned),
    )
    return Telemetry(
        engine.uid, observer, tracer_provider, meter_provider, built, memory
    )


#: Spans a batch processor we make may hold (the SDK's default, 2048, drops
#: spans when thousands of tasks end in one moment).
BATCH_QUEUE = 65_536


def _batch(kind: Any, exporter: SpanExporter) -> SpanProcessor:
    """A batch processor for ``exporter``; ``OTEL_BSP_*`` variables still win."""
    if "OTEL_BSP_MAX_QUEUE_SIZE" in os.environ:
        made: SpanProcessor = kind(exporter)
    else:
        made = kind(exporter, max_queue_size=BATCH_QUEUE)
    return made


def _check_seconds(name: str, value: object, *, none_ok: bool) -> None:
    if value is None and none_ok:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not value > 0
        or value == float("inf")
    ):
        raise ValueError(
            f"{name} must be a positive number of seconds"
            f"{' or None' if none_ok else ''}, got {value!r}"
        )


def _default_resource(service_name: str | None) -> Resource:
    from opentelemetry.sdk.resources import Resource as SdkResource

    if service_name is not None:
        return SdkResource.create({"service.name": service_name})
    created = SdkResource.create()
    # Resource.create() honours OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES;
    # otherwise it says "unknown_service": name ours.
    if str(created.attributes.get("service.name", "")).startswith("unknown_service"):
        created = created.merge(SdkResource({"service.name": "asyncflow"}))
    return created


def _build_exporter(name: str, endpoint: str | None) -> SpanExporter:
    if name not in EXPORTERS:
        raise ValueError(
            f"unknown exporter {name!r}: choose one of "
            f"{', '.join(map(repr, EXPORTERS))} or give a SpanExporter object"
        )
    if endpoint is not None and not name.startswith("otlp"):
        raise ValueError(f"endpoint= is for the OTLP exporter, not exporter={name!r}")
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        # Today's sys.stdout, not the one when the SDK was imported.
        return ConsoleSpanExporter(out=sys.stdout)
    if name == "memory":
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter,
        )

        return InMemorySpanExporter()
    protocol = name.partition("-")[2]
    if not protocol:
        wanted = (
            os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf"
        )
        protocol = "grpc" if wanted.strip().lower() == "grpc" else "http"
    module_name, package = _OTLP_MODULES[protocol]
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(
            f"exporter={name!r} needs the OTLP exporter package, which is not "
            f"installed: pip install {package} (or opentelemetry-exporter-otlp "
            "for both protocols); or choose exporter='console' or 'memory'"
        ) from exc
    exporter_class: Any = module.OTLPSpanExporter
    made: SpanExporter = (
        exporter_class() if endpoint is None else exporter_class(endpoint=endpoint)
    )
    return made


def _destinations(
    exporter: str | SpanExporter | None,
    processors: list[SpanProcessor],
    built: SpanExporter | None,
    span_file: _SpanFile | None,
    owned: bool,
) -> str:
    where: list[str] = []
    if isinstance(exporter, str):
        where.append(f"exporter {exporter!r}")
    elif built is not None:
        where.append(type(built).__name__)
    extra = len(processors) - (1 if built is not None else 0)
    if extra:
        where.append(f"{extra} span processor(s)")
    if not owned:
        where.append("the given tracer provider")
    if span_file is not None:
        where.append(str(span_file.path))
    return ", ".join(where) or "nowhere"


class Telemetry:
    """What :meth:`WorkflowEngine.start_telemetry` returns.

    It stops by itself when the engine shuts down; :meth:`stop` ends it
    sooner. ``tracer_provider`` is the provider the spans come from (a new one
    unless you gave yours), ``meter_provider`` the one task metrics go to
    (only with ``metric_readers``), ``exporter`` the span exporter that
    ``exporter=`` chose (or the one given), ``session_id`` the engine's uid.
    """

    def __init__(
        self,
        session_id: str,
        observer: _SpanObserver,
        tracer_provider: TracerProvider,
        meter_provider: MeterProvider | None,
        exporter: SpanExporter | None,
        memory: InMemorySpanExporter | None,
    ) -> None:
        self.session_id = session_id
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self.exporter = exporter
        self._observer = observer
        self._memory = memory

    @property
    def tracer(self) -> Tracer:
        """The ``asyncflow`` tracer (to add spans of your own under the run's)."""
        return self._observer.tracer

    @property
    def checkpoint_file(self) -> Path | None:
        """The JSON-lines file of finished spans (with ``checkpoint_path``)."""
        span_file = self._observer.span_file
        return span_file.path if span_file is not None else None

    @property
    def stopped(self) -> bool:
        return self._observer.closed

    def spans(self) -> tuple[ReadableSpan, ...]:
        """The finished spans, with ``exporter="memory"`` (the default when no
        other destination is given)."""
        if self._memory is None:
            raise RuntimeError(
                "spans() reads the in-memory exporter: start telemetry with "
                "exporter='memory' (or with no exporter, processor, provider or "
                "checkpoint_path at all)"
            )
        return self._memory.get_finished_spans()

    def summary(self) -> dict[str, Any]:
        """Task counts (``submitted``, ``completed``, ``failed``, ``canceled``,
        ``restored``, ``running``) and, for tasks that ran to completion,
        ``duration`` statistics in seconds (``None`` before the first)."""
        return self._observer.summary()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Hand every finished span and metric to the exporters now."""
        return self._observer.flush(timeout_millis)

    async def stop(self) -> None:
        """End the open spans (unfinished tasks as ``CANCELLED``) and flush, as
        the engine does at shutdown. Idempotent."""
        self._observer.close()

    def __repr__(self) -> str:
        state = "stopped" if self.stopped else "running"
        return f"<Telemetry {self.session_id} {state}>"


class _Task:
    """A task whose final event has not come yet."""

    __slots__ = ("backend", "kind", "name", "parent", "span", "workflow_id")

    def __init__(self, event: TaskEvent, parent: str | None) -> None:
        self.name = event.name
        self.kind = event.kind_of_task
        self.backend = event.backend
        self.workflow_id = event.workflow_id
        self.parent = parent
        self.span: Span | None = None


class _Block:
    """A block's span context, kept while members of it may still come."""

    __slots__ = ("context", "ended", "members")

    def __init__(self, context: Context) -> None:
        self.context = context
        self.members = 0
        self.ended = False


class _SpanObserver:
    """The built-in observer: task events in, spans out."""

    def __init__(
        self,
        engine: WorkflowEngine,
        trace_api: Any,
        tracer: Tracer,
        owned_provider: TracerProvider | None,
        meter_provider: MeterProvider | None,
        span_file: _SpanFile | None,
    ) -> None:
        from opentelemetry.trace import Status, StatusCode

        self._trace = trace_api
        self._status_error = (Status, StatusCode.ERROR)
        self.tracer = tracer
        self.span_file = span_file
        self._owned = owned_provider
        self._meter_provider = meter_provider
        self.closed = False
        self._tasks: dict[str, _Task] = {}
        self._blocks: dict[str, _Block] = {}
        # Workflow id -> its span and context; first event and last end time.
        self._workflows: dict[str, tuple[Span, Context]] = {}
        self._wf_first: dict[str, float] = {}
        self._wf_last: dict[str, float] = {}
        self._counts = {
            "submitted": 0,
            "completed": 0,
            "failed": 0,
            "canceled": 0,
            "restored": 0,
        }
        self._durations = [0, 0.0, float("inf"), 0.0]  # count, total, min, max
        # The engine span: a child of the span current where telemetry started.
        self._root = tracer.start_span(
            f"engine {engine.uid}",
            attributes={A_ENGINE: engine.uid, A_RUN: engine.run_id},
        )
        self._root_context: Context = trace_api.set_span_in_context(self._root)
        self._finished_count: Counter | None = None
        self._duration_hist: Histogram | None = None
        self._retry_count: Counter | None = None
        if meter_provider is not None:
            from .. import __version__

            meter = meter_provider.get_meter(SCOPE, __version__)
            self._finished_count = meter.create_counter(
                "asyncflow.tasks",
                unit="{task}",
                description="Tasks that reached a final state",
            )
            self._duration_hist = meter.create_histogram(
                "asyncflow.task.duration",
                unit="s",
                description="Running time of the attempt that ended a task",
            )
            self._retry_count = meter.create_counter(
                "asyncflow.task.retries",
                unit="{retry}",
                description="Failed attempts that were retried",
            )

    # -- events ------------------------------------------------------------------

    def __call__(self, event: TaskEvent) -> None:
        if self.closed:
            return
        kind = event.kind
        if kind == "created":
            self._created(event)
        elif kind in FINAL_KINDS:
            self._final(event)
        elif kind in ("submitted", "started"):
            task = self._task(event)
            if task.span is None:
                self._open(event, task, event.time)
                self._counts["submitted"] += 1
            elif kind == "started":
                task.span.add_event(
                    "started",
                    {A_ATTEMPT: event.attempt},
                    timestamp=_ns(event.time),
                )
        elif kind == "retried":
            self._retried(event)

    def _created(self, event: TaskEvent) -> None:
        parent = event.parent
        task = _Task(event, parent)
        self._tasks[event.uid] = task
        if parent is not None:
            block = self._blocks.get(parent)
            if block is not None:
                block.members += 1
        wf = event.workflow_id
        if wf is not None and wf not in self._wf_first:
            self._wf_first[wf] = event.time

    def _task(self, event: TaskEvent) -> _Task:
        task = self._tasks.get(event.uid)
        if task is None:  # created before telemetry started
            task = self._tasks[event.uid] = _Task(event, None)
        return task

    def _open(self, event: TaskEvent, task: _Task, start: float) -> Span:
        attributes: dict[str, Any] = {A_UID: event.uid, A_NAME: task.name}
        if task.kind is not None:
            attributes[A_KIND] = task.kind
        if task.backend is not None:
            attributes[A_BACKEND] = task.backend
        if task.workflow_id is not None:
            attributes[A_WORKFLOW] = task.workflow_id
        span = self.tracer.start_span(
            task.name,
            context=self._parent_context(task, start),
            attributes=attributes,
            start_time=_ns(start),
        )
        task.span = span
        if task.kind == "block":
            self._blocks[event.uid] = _Block(self._trace.set_span_in_context(span))
        return span

    def _parent_context(self, task: _Task, when: float) -> Context:
        if task.parent is not None:
            block = self._blocks.get(task.parent)
            if block is not None:
                return block.context
        wf = task.workflow_id
        if wf is None:
            return self._root_context
        known = self._workflows.get(wf)
        if known is not None:
            return known[1]
        start = min(self._wf_first.setdefault(wf, when), when)
        span = self.tracer.start_span(
            wf,
            context=self._root_context,
            attributes={A_WORKFLOW: wf},
            start_time=_ns(start),
        )
        context: Context = self._trace.set_span_in_context(span)
        self._workflows[wf] = (span, context)
        return context

    def _retried(self, event: TaskEvent) -> None:
        task = self._task(event)
        span = task.span
        if span is None:
            span = self._open(event, task, event.time)
        attributes: dict[str, Any] = {A_ATTEMPT: event.attempt}
        error = event.error
        if isinstance(error, BaseException):
            attributes["exception.type"] = _type_name(error)
            attributes["exception.message"] = str(error)
        elif error is not None:
            attributes["exception.message"] = str(error)
        span.add_event("retried", attributes, timestamp=_ns(event.time))
        if self._retry_count is not None:
            self._retry_count.add(1, self._metric_attributes(task, None))

    def _final(self, event: TaskEvent) -> None:
        task = self._tasks.pop(event.uid, None)
        if task is None:
            task = _Task(event, None)
        span = task.span
        if span is None:  # never ran: cancelled or failed before, or restored
            span = self._open(event, task, event.time)
        kind = event.kind
        state = _STATES[kind]
        span.set_attributes(
            {A_STATE: state, A_ATTEMPTS: event.attempt, A_RESTORED: kind == "restored"}
        )
        error = event.error
        if kind == "failed":
            self._counts["failed"] += 1
            status, code = self._status_error
            if isinstance(error, BaseException):
                type_name = _type_name(error)
                span.set_attribute(A_ERROR_TYPE, type_name)
                span.set_attribute(A_ERROR, str(error))
                span.set_status(status(code, f"{type(error).__name__}: {error}"))
                span.record_exception(error, timestamp=_ns(event.time))
            else:
                span.set_attribute(A_ERROR_TYPE, "unknown")
                if error is not None:
                    span.set_attribute(A_ERROR, str(error))
                span.set_status(status(code, str(error or "failed")))
        elif kind == "cancelled":
            self._counts["canceled"] += 1
            if error is not None:
                span.set_attribute(A_ERROR, str(error))
        elif kind == "restored":
            self._counts["restored"] += 1
        else:
            self._counts["completed"] += 1
            if event.duration is not None:
                stats = self._durations
                stats[0] += 1
                stats[1] += event.duration
                stats[2] = min(stats[2], event.duration)
                stats[3] = max(stats[3], event.duration)
        self._end(event.uid, task, span, event.time)
        if self._finished_count is not None:
            attributes = self._metric_attributes(task, state)
            self._finished_count.add(1, attributes)
            if event.duration is not None and self._duration_hist is not None:
                self._duration_hist.record(event.duration, attributes)

    def _end(self, uid: str, task: _Task, span: Span, when: float) -> None:
        span.end(end_time=_ns(when))
        if self.span_file is not None:
            self.span_file.add(span)
        wf = task.workflow_id
        if wf is not None and when > self._wf_last.get(wf, 0.0):
            self._wf_last[wf] = when
        parent = task.parent
        if parent is not None:
            block = self._blocks.get(parent)
            if block is not None:
                block.members -= 1
                if block.ended and block.members <= 0:
                    del self._blocks[parent]
        if task.kind == "block":
            own = self._blocks.get(uid)
            if own is not None:
                own.ended = True
                if own.members <= 0:
                    del self._blocks[uid]

    @staticmethod
    def _metric_attributes(task: _Task, state: str | None) -> dict[str, Any]:
        attributes: dict[str, Any] = {A_KIND: task.kind or "unknown"}
        if task.backend is not None:
            attributes[A_BACKEND] = task.backend
        if state is not None:
            attributes[A_STATE] = state
        return attributes

    # -- reading -----------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        tasks: dict[str, int] = dict(self._counts)
        tasks["running"] = sum(1 for t in self._tasks.values() if t.span is not None)
        count, total, low, high = self._durations
        duration = (
            {
                "count": int(count),
                "total_seconds": total,
                "mean_seconds": total / count,
                "min_seconds": low,
                "max_seconds": high,
            }
            if count
            else None
        )
        return {"tasks": tasks, "duration": duration}

    def flush(self, timeout_millis: int = 30_000) -> bool:
        ok = True
        for provider in (self._owned, self._meter_provider):
            flush = getattr(provider, "force_flush", None)
            if flush is not None:
                try:
                    ok = bool(flush(timeout_millis)) and ok
                except Exception:
                    log.warning("telemetry flush failed", exc_info=True)
                    ok = False
        if self.span_file is not None:
            self.span_file.flush()
        return ok

    # -- the end -----------------------------------------------------------------

    def close(self) -> None:
        """End every open span, flush and release what we made; never raises."""
        if self.closed:
            return
        self.closed = True
        now = time.time()
        try:
            for uid, task in list(self._tasks.items()):
                if task.span is None:
                    continue  # never submitted and no final event: nothing ran
                task.span.set_attribute(A_STATE, "CANCELLED")
                task.span.set_attribute(A_ERROR, "still running when telemetry stopped")
                self._end(uid, task, task.span, now)
            self._tasks.clear()
            self._blocks.clear()
            for wf, (span, _) in self._workflows.items():
                last = max(self._wf_last.get(wf, now), self._wf_first.get(wf, now))
                span.end(end_time=_ns(last))
                if self.span_file is not None:
                    self.span_file.add(span)
            self._workflows.clear()
            self._root.end(end_time=_ns(now))
            if self.span_file is not None:
                self.span_file.add(self._root)
        except Exception:
            log.warning("telemetry could not end its open spans", exc_info=True)
        self.flush()
        if self._owned is not None:
            shutdown = getattr(self._owned, "shutdown", None)
            if shutdown is not None:
                try:
                    shutdown()
                except Exception:
                    log.warning(
                        "telemetry tracer provider shutdown failed", exc_info=True
                    )
        if self.span_file is not None:
            self.span_file.close()


class _SpanFile:
    """Finished spans as JSON lines under ``checkpoint_path``."""

    def __init__(
        self,
        directory: Path,
        engine: WorkflowEngine,
        interval: float | None,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in engine.uid)
        self.path = directory / f"telemetry-{safe}.jsonl"
        header = {
            "format": "asyncflow-spans",
            "version": 1,
            "engine": engine.uid,
            "run_id": engine.run_id,
            "started": time.time(),
        }
        self._out = LinesFile(
            self.path, engine.loop, header, interval, "telemetry file"
        )

    def add(self, span: Any) -> None:
        if self._out.closed:
            return
        record = _span_record(span)
        if record is not None:
            self._out.lines.append(json.dumps(record, default=str, ensure_ascii=False))

    def flush(self) -> None:
        self._out.flush()

    def close(self) -> None:
        self._out.close()


def _span_record(span: Any) -> dict[str, Any] | None:
    from opentelemetry.sdk.trace import ReadableSpan as SdkReadableSpan

    if not isinstance(span, SdkReadableSpan):
        return None  # a provider that records nothing
    context = span.get_span_context()
    if context is None:
        return None
    parent = span.parent
    return {
        "name": span.name,
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent_id": f"{parent.span_id:016x}" if parent is not None else None,
        "start": span.start_time / 1e9 if span.start_time is not None else None,
        "end": span.end_time / 1e9 if span.end_time is not None else None,
        "status": span.status.status_code.name,
        "description": span.status.description,
        "attributes": dict(span.attributes or {}),
        "events": [
            {
                "name": e.name,
                "time": e.timestamp / 1e9,
                "attributes": dict(e.attributes or {}),
            }
            for e in span.events
        ],
    }
