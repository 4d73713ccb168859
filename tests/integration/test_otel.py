"""SPEC §9 OpenTelemetry: one span per task from the lifecycle events.

Spans are read back with the SDK's ``InMemorySpanExporter`` behind a
``SimpleSpanProcessor``, handed over through RADICAL AsyncFlow's own
``span_processors=`` parameter.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk.trace")

from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import StatusCode

from asyncflow import DependencyFailureError, WorkflowEngine

MakeEngine = Callable[..., Any]


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


async def traced(
    make_engine: MakeEngine,
    exporter: InMemorySpanExporter,
    backend: str = "asyncio",
    **kwargs: Any,
) -> tuple[WorkflowEngine, Any]:
    flow: WorkflowEngine = await make_engine(backend)
    telemetry = await flow.start_telemetry(
        span_processors=[SimpleSpanProcessor(exporter)], **kwargs
    )
    return flow, telemetry


def named(spans: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def one(spans: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    found = named(spans, name)
    assert len(found) == 1, f"{len(found)} spans named {name!r}: {spans}"
    return found[0]


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    context = span.context
    assert context is not None
    return context.span_id


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


async def test_one_span_per_task_with_names_attributes_and_status(
    make_engine: MakeEngine, exporter: InMemorySpanExporter
) -> None:
    flow, _ = await traced(make_engine, exporter, "threads")

    @flow.function_task
    def add(x: int, y: int) -> int:
        return x + y

    @flow.function_task
    def square(x: int) -> int:
        return x * x

    first = add(1, 2)
    second = square(first)
    assert await second == 9
    await flow.shutdown()

    spans = exporter.get_finished_spans()
    engine_span = one(spans, f"engine {flow.uid}")
    assert [s.name for s in spans].count("add") == 1
    for future, span in ((first, one(spans, "add")), (second, one(spans, "square"))):
        assert attrs(span) == {
            "asyncflow.task.uid": future.uid,
            "asyncflow.task.name": future.name,
            "asyncflow.task.kind": "function",
            "asyncflow.backend": flow.backend.name,
            "asyncflow.task.state": "DONE",
            "asyncflow.task.attempts": 1,
            "asyncflow.task.restored": False,
        }
        assert span.status.status_code is StatusCode.UNSET
        assert parent_id(span) == span_id(engine_span)  # no block, no workflow
        assert [e.name for e in span.events] == ["started"]
    assert attrs(engine_span)["asyncflow.engine.uid"] == flow.uid
    assert engine_span.parent is None
    assert len({s.context.trace_id for s in spans if s.context}) == 1  # one trace
    assert len(spans) == 3


async def test_block_members_are_children_of_the_block_span(
    make_engine: MakeEngine, exporter: InMemorySpanExporter
) -> None:
    flow, _ = await traced(make_engine, exporter)

    @flow.function_task
    async def double(x: int) -> int:
        return 2 * x

    @flow.block
    async def inner(x: int) -> int:
        return await double(x)

    @flow.block
    async def outer(x: int) -> int:
        return await inner(x) + await double(x)

    assert await outer(3) == 12
    await flow.shutdown()

    spans = exporter.get_finished_spans()
    outer_span, inner_span = one(spans, "outer"), one(spans, "inner")
    doubles = named(spans, "double")
    assert len(doubles) == 2
    assert attrs(outer_span)["asyncflow.task.kind"] == "block"
    assert "asyncflow.backend" not in attrs(outer_span)
    assert parent_id(inner_span) == span_id(outer_span)
    assert sorted(parent_id(s) for s in doubles) == sorted(
        [span_id(inner_span), span_id(outer_span)]
    )
    for child in (inner_span, *doubles):
        assert child.start_time is not None
        assert outer_span.start_time is not None
        assert child.start_time >= outer_span.start_time


async def test_workflow_scope_tasks_are_under_one_workflow_span(
    make_engine: MakeEngine, exporter: InMemorySpanExporter
) -> None:
    flow, _ = await traced(make_engine, exporter)

    @flow.function_task
    async def step(x: int) -> int:
        await asyncio.sleep(0.01)
        return x + 1

    @flow.block
    async def pipeline(x: int) -> int:
        return await step(step(x))

    async with flow.workflow_scope("wf-a"):
        a = [step(i) for i in range(3)]
        piped = pipeline(10)
    async with flow.workflow_scope("wf-b"):
        b = step(100)
    loose = step(0)
    await asyncio.gather(*a, piped, b, loose)
    await flow.shutdown()

    spans = exporter.get_finished_spans()
    wf_a, wf_b = one(spans, "wf-a"), one(spans, "wf-b")
    engine_span = one(spans, f"engine {flow.uid}")
    assert attrs(wf_a) == {"asyncflow.workflow_id": "wf-a"}
    assert parent_id(wf_a) == parent_id(wf_b) == span_id(engine_span)
    in_a = [s for s in spans if attrs(s).get("asyncflow.workflow_id") == "wf-a"]
    # three steps, the block, and its two steps (wf-a's span itself included)
    assert len(in_a) == 7
    block_span = one(spans, "pipeline")
    assert parent_id(block_span) == span_id(wf_a)
    direct = {f.uid for f in a} | {piped.uid}
    members = []
    for span in in_a:
        if span is wf_a:
            continue
        uid = attrs(span)["asyncflow.task.uid"]
        if uid in direct:
            assert parent_id(span) == span_id(wf_a)
        else:  # a member of the block: under the block, still tagged wf-a
            assert parent_id(span) == span_id(block_span)
            members.append(span)
        assert wf_a.start_time is not None
        assert span.start_time is not None
        assert wf_a.end_time is not None
        assert span.end_time is not None
        assert wf_a.start_time <= span.start_time <= span.end_time <= wf_a.end_time
    assert [s.name for s in members] == ["step", "step"]
    b_span = [s for s in named(spans, "step") if parent_id(s) == span_id(wf_b)]
    assert [attrs(s)["asyncflow.task.uid"] for s in b_span] == [b.uid]
    loose_span = [s for s in spans if attrs(s).get("asyncflow.task.uid") == loose.uid]
    assert parent_id(loose_span[0]) == span_id(engine_span)
    # The workflow span ends with its last task, not at shutdown.
    assert wf_a.end_time == max(s.end_time or 0 for s in in_a if s is not wf_a)


async def test_retried_task_has_retried_span_events(
    make_engine: MakeEngine, exporter: InMemorySpanExporter
) -> None:
    flow, _ = await traced(make_engine, exporter)
    calls = 0

    @flow.function_task(retries=3, retry_delay=0)
    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionError(f"attempt {calls} lost")
        return "ok"

    future = flaky()
    assert await future == "ok"
    await flow.shutdown()

    span = one(exporter.get_finished_spans(), "flaky")
    retried = [e for e in span.events if e.name == "retried"]
    assert [dict(e.attributes or {}) for e in retried] == [
        {
            "asyncflow.task.attempt": n,
            "exception.type": "ConnectionError",
            "exception.message": f"attempt {n} lost",
        }
        for n in (1, 2)
    ]
    assert attrs(span)["asyncflow.task.attempts"] == 3
    assert attrs(span)["asyncflow.task.state"] == "DONE"
    assert span.status.status_code is StatusCode.UNSET
    assert [e.name for e in span.events].count("started") == 3
    times = [e.timestamp for e in span.events]
    assert times == sorted(times)
    assert span.start_time is not None
    assert span.end_time is not None
    assert span.start_time <= times[0]
    assert times[-1] <= span.end_time


async def test_failed_task_has_error_status_and_exception_type(
    make_engine: MakeEngine, exporter: InMemorySpanExporter
) -> None:
    flow, telemetry = await traced(make_engine, exporter, "threads")

    @flow.function_task
    def parse(text: str) -> int:
        return int(text)

    @flow.function_task
    def plus_one(x: int) -> int:
        return x + 1

    bad = parse("not a number")
    after = plus_one(bad)
    with pytest.raises(ValueError, match="invalid literal"):
        await bad
    with pytest.raises(DependencyFailureError):
        await after
    await flow.shutdown()

    spans = exporter.get_finished_spans()
    span = one(spans, "parse")
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description is not None
    assert span.status.description.startswith("ValueError: invalid literal")
    assert attrs(span)["error.type"] == "ValueError"
    assert attrs(span)["asyncflow.task.state"] == "FAILED"
    assert "invalid literal" in attrs(span)["asyncflow.task.error"]
    (exception,) = [e for e in span.events if e.name == "exception"]
    assert dict(exception.attributes or {})["exception.type"] == "ValueError"
    # The dependent never ran: its span is there, empty, failed on the dependency.
    dependent = one(spans, "plus_one")
    assert dependent.status.status_code is StatusCode.ERROR
    assert str(attrs(dependent)["error.type"]).endswith("DependencyFailureError")
    assert dependent.start_time == dependent.end_time
    assert attrs(dependent)["asyncflow.task.attempts"] == 0
    summary = telemetry.summary()
    assert summary["tasks"]["failed"] == 2
    assert summary["tasks"]["completed"] == 0


async def test_span_times_match_the_futures(
    make_engine: MakeEngine, exporter: InMemorySpanExporter
) -> None:
    flow, _ = await traced(make_engine, exporter, "threads")

    @flow.function_task
    def nap(seconds: float) -> float:
        import time

        time.sleep(seconds)
        return seconds

    futures = [nap(0.02) for _ in range(4)]
    await asyncio.gather(*futures)
    await flow.shutdown()

    by_uid = {
        attrs(s)["asyncflow.task.uid"]: s
        for s in exporter.get_finished_spans()
        if s.name == "nap"
    }
    micro = 1_000  # ns: float epoch seconds carry about a microsecond
    for future in futures:
        span = by_uid[future.uid]
        assert future.submitted_at is not None
        assert future.started_at is not None
        assert future.finished_at is not None
        assert span.start_time is not None
        assert span.end_time is not None
        assert abs(span.start_time - future.submitted_at * 1e9) <= micro
        (started,) = [e for e in span.events if e.name == "started"]
        assert abs(started.timestamp - future.started_at * 1e9) <= micro
        # The final event follows finished_at within a moment.
        assert span.end_time >= future.finished_at * 1e9 - micro
        assert span.end_time - future.finished_at * 1e9 < 0.05e9
        assert span.start_time <= started.timestamp <= span.end_time
        assert span.end_time - started.timestamp >= 0.02e9 - micro


async def test_cancelled_before_start_still_has_a_span(
    make_engine: MakeEngine, exporter: InMemorySpanExporter
) -> None:
    flow, _ = await traced(make_engine, exporter)
    release = asyncio.Event()

    @flow.function_task
    async def gate() -> int:
        await release.wait()
        return 1

    @flow.function_task
    async def after(x: int) -> int:
        return x + 1

    first = gate()
    waiting = after(first)
    await asyncio.sleep(0.01)
    assert waiting.cancel()
    release.set()
    assert await first == 1
    await flow.shutdown()

    span = one(exporter.get_finished_spans(), "after")
    assert attrs(span)["asyncflow.task.state"] == "CANCELLED"
    assert span.status.status_code is StatusCode.UNSET
    assert span.start_time == span.end_time
    assert attrs(span)["asyncflow.task.attempts"] == 0


async def test_stop_and_shutdown_end_running_task_spans(
    make_engine: MakeEngine, exporter: InMemorySpanExporter
) -> None:
    flow, telemetry = await traced(make_engine, exporter)
    running = asyncio.Event()

    @flow.function_task
    async def forever() -> None:
        running.set()
        await asyncio.sleep(60)

    future = forever()
    await asyncio.wait_for(running.wait(), 10)
    assert telemetry.summary()["tasks"]["running"] == 1
    await telemetry.stop()
    await telemetry.stop()  # idempotent
    assert telemetry.stopped
    span = one(exporter.get_finished_spans(), "forever")
    assert attrs(span)["asyncflow.task.state"] == "CANCELLED"
    assert span.status.status_code is StatusCode.UNSET
    await flow.shutdown()  # closes the observer again: nothing more, no error
    assert future.state == "CANCELLED"
    assert len(named(exporter.get_finished_spans(), "forever")) == 1
    # After a stop, telemetry can start again on the same engine... unless it
    # is shut down.
    with pytest.raises(RuntimeError, match="shut down"):
        await flow.start_telemetry()


async def test_shutdown_cancels_a_running_task_and_its_span_ends(
    make_engine: MakeEngine, exporter: InMemorySpanExporter
) -> None:
    flow, _ = await traced(make_engine, exporter)
    running = asyncio.Event()

    @flow.function_task
    async def forever() -> None:
        running.set()
        await asyncio.sleep(60)

    async with flow.workflow_scope("wf-long"):
        future = forever()
    await asyncio.wait_for(running.wait(), 10)
    await flow.shutdown()
    assert future.state == "CANCELLED"
    spans = exporter.get_finished_spans()
    span = one(spans, "forever")
    assert attrs(span)["asyncflow.task.state"] == "CANCELLED"
    assert parent_id(span) == span_id(one(spans, "wf-long"))


async def test_restored_task_span(
    make_engine: MakeEngine, exporter: InMemorySpanExporter, tmp_path: Path
) -> None:
    database = tmp_path / "run.db"

    async def run(memory: InMemorySpanExporter) -> Any:
        flow = await WorkflowEngine.create(checkpoint=database)
        await flow.start_telemetry(span_processors=[SimpleSpanProcessor(memory)])

        @flow.function_task
        def simulate(t: int) -> float:
            return t * 1.5

        future = simulate(280)
        await future
        await flow.shutdown()
        return future

    await run(InMemorySpanExporter())
    future = await run(exporter)
    assert future.restored
    span = one(exporter.get_finished_spans(), "simulate")
    assert attrs(span)["asyncflow.task.restored"] is True
    assert attrs(span)["asyncflow.task.state"] == "DONE"


async def test_radical_parameter_names_work(
    make_engine: MakeEngine, exporter: InMemorySpanExporter, tmp_path: Path
) -> None:
    """A RADICAL AsyncFlow 0.6 script's call runs unchanged."""
    flow: WorkflowEngine = await make_engine("asyncio")
    reader = InMemoryMetricReader()
    telemetry = await flow.start_telemetry(
        resource_poll_interval=5.0,
        checkpoint_interval=0.05,
        checkpoint_path=str(tmp_path / "telemetry"),
        span_processors=[SimpleSpanProcessor(exporter)],
        metric_readers=[reader],
        resource=Resource.create({"service.name": "radical-script"}),
    )
    assert telemetry.session_id == flow.uid

    @flow.function_task
    async def work(x: int) -> int:
        return x

    assert await asyncio.gather(*(work(i) for i in range(5))) == list(range(5))
    path = telemetry.checkpoint_file
    assert path is not None
    assert path.parent == tmp_path / "telemetry"
    # A periodic write, before shutdown: the header and the five spans.
    for _ in range(200):
        if len(path.read_text().splitlines()) == 1 + 5:
            break
        await asyncio.sleep(0.025)
    assert len(path.read_text().splitlines()) == 1 + 5
    await flow.shutdown()

    spans = exporter.get_finished_spans()
    assert len(named(spans, "work")) == 5
    assert spans[0].resource.attributes["service.name"] == "radical-script"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["format"] == "asyncflow-spans"
    assert lines[0]["engine"] == flow.uid
    written = {line["span_id"] for line in lines[1:]}
    assert written == {f"{span_id(s):016x}" for s in spans}  # tasks and engine
    summary = telemetry.summary()
    assert summary["tasks"]["completed"] == 5
    assert summary["duration"]["count"] == 5
    data = reader.get_metrics_data()
    assert data is not None
    metrics = {
        metric.name: metric
        for resource_metrics in data.resource_metrics
        for scope in resource_metrics.scope_metrics
        for metric in scope.metrics
    }
    assert "asyncflow.task.duration" in metrics
    (point,) = metrics["asyncflow.tasks"].data.data_points  # type: ignore[union-attr]
    assert point.value == 5  # type: ignore[union-attr]
    assert point.attributes is not None
    assert point.attributes["asyncflow.task.state"] == "DONE"

    # Positionally, in RADICAL's order, too.
    second: WorkflowEngine = await make_engine("asyncio")
    other = InMemorySpanExporter()
    await second.start_telemetry(
        1.0, None, None, [SimpleSpanProcessor(other)], None, None
    )

    @second.function_task
    async def again() -> int:
        return 1

    assert await again() == 1
    await second.shutdown()
    assert len(named(other.get_finished_spans(), "again")) == 1


async def test_exporter_choices(
    make_engine: MakeEngine, capsys: pytest.CaptureFixture[str]
) -> None:
    flow: WorkflowEngine = await make_engine("asyncio")
    telemetry = await flow.start_telemetry(exporter="console")

    @flow.function_task
    async def shout() -> str:
        return "hi"

    assert await shout() == "hi"
    await flow.shutdown()
    out = capsys.readouterr().out
    assert '"name": "shout"' in out
    with pytest.raises(RuntimeError, match="exporter='memory'"):
        telemetry.spans()

    # No destination at all: spans are kept in memory.
    quiet: WorkflowEngine = await make_engine("asyncio")
    kept = await quiet.start_telemetry(service_name="my-campaign")

    @quiet.function_task
    async def hush() -> str:
        return "sh"

    await hush()
    await quiet.shutdown()
    (span,) = named(kept.spans(), "hush")
    assert span.resource.attributes["service.name"] == "my-campaign"

    # A SpanExporter object of one's own (exported in a batch, flushed at the end).
    mine: WorkflowEngine = await make_engine("asyncio")
    memory = InMemorySpanExporter()
    await mine.start_telemetry(exporter=memory)

    @mine.function_task
    async def quick() -> int:
        return 0

    await quick()
    await mine.shutdown()
    assert len(named(memory.get_finished_spans(), "quick")) == 1


async def test_user_tracer_provider_is_used_and_left_running(
    make_engine: MakeEngine, exporter: InMemorySpanExporter
) -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    flow: WorkflowEngine = await make_engine("asyncio")
    telemetry = await flow.start_telemetry(tracer_provider=provider)
    assert telemetry.tracer_provider is provider

    @flow.function_task
    async def job() -> int:
        return 1

    await job()
    await flow.shutdown()
    assert len(named(exporter.get_finished_spans(), "job")) == 1
    provider.get_tracer("mine").start_span("later").end()  # not shut down by us
    assert len(named(exporter.get_finished_spans(), "later")) == 1
    provider.shutdown()


async def test_missing_otlp_exporter_package_is_a_clear_error(
    make_engine: MakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in (
        "opentelemetry.exporter.otlp.proto.http.trace_exporter",
        "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
    ):
        monkeypatch.setitem(sys.modules, module, None)
    flow: WorkflowEngine = await make_engine("asyncio")
    with pytest.raises(ImportError, match="opentelemetry-exporter-otlp-proto-http"):
        await flow.start_telemetry(exporter="otlp", endpoint="http://localhost:4318")
    with pytest.raises(ImportError, match="opentelemetry-exporter-otlp-proto-grpc"):
        await flow.start_telemetry(exporter="otlp-grpc")
    # Nothing was half-started: telemetry still starts.
    telemetry = await flow.start_telemetry(exporter="memory")
    await telemetry.stop()


async def test_missing_opentelemetry_names_the_extra(
    make_engine: MakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    flow: WorkflowEngine = await make_engine("asyncio")
    with pytest.raises(ImportError, match=r"pip install 'asyncflow\[otel\]'"):
        await flow.start_telemetry()


def test_importing_asyncflow_does_not_import_opentelemetry() -> None:
    code = (
        "import sys, asyncflow, asyncflow.engine\n"
        "loaded = [m for m in sys.modules if m.startswith('opentelemetry')]\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


async def test_bad_arguments_are_refused(make_engine: MakeEngine) -> None:
    flow: WorkflowEngine = await make_engine("asyncio")
    with pytest.raises(ValueError, match="unknown exporter 'jaeger'"):
        await flow.start_telemetry(exporter="jaeger")
    with pytest.raises(TypeError, match="SpanExporter"):
        await flow.start_telemetry(exporter=42)
    with pytest.raises(ValueError, match="endpoint= is for the OTLP exporter"):
        await flow.start_telemetry(exporter="console", endpoint="http://x:4318")
    with pytest.raises(ValueError, match="endpoint= is for the OTLP exporter"):
        await flow.start_telemetry(endpoint="http://x:4318")
    with pytest.raises(ValueError, match="resource_poll_interval"):
        await flow.start_telemetry(resource_poll_interval=0)
    with pytest.raises(ValueError, match="checkpoint_interval"):
        await flow.start_telemetry(checkpoint_interval=-1.0)
    with pytest.raises(TypeError, match="span_processors"):
        await flow.start_telemetry(span_processors=[InMemorySpanExporter()])
    with pytest.raises(TypeError, match="metric_readers"):
        await flow.start_telemetry(metric_readers=["prometheus"])
    with pytest.raises(ValueError, match="tracer_provider"):
        await flow.start_telemetry(
            tracer_provider=TracerProvider(), service_name="clash"
        )
    telemetry = await flow.start_telemetry(exporter="memory")
    with pytest.raises(RuntimeError, match="already started"):
        await flow.start_telemetry(exporter="memory")
    await telemetry.stop()
    again = await flow.start_telemetry(exporter="memory")  # after a stop: fine
    await again.stop()
