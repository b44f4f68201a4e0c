"""OpenTelemetry spans per request: `request` with children `queue`, `prefill` and `decode`.

The engine thread knows when each phase of a request began and ended; it records the times and, when the
request is over, emits the spans with those explicit timestamps. With `--otlp-endpoint` they are exported over
OTLP/HTTP (protobuf) by a batch processor; without it nothing is traced and opentelemetry is not imported.
"""

from __future__ import annotations

from typing import Any


def make_tracer_provider(endpoint: str, service_name: str = "gyrfalcon") -> Any:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if not endpoint.rstrip("/").endswith("/v1/traces"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider


def emit_request_spans(tracer: Any, name: str, times: dict[str, int | None], attributes: dict[str, Any],
                       error: str | None = None) -> None:
    """times (ns since the epoch): arrival, scheduled, first_token, end (None when the phase never began)."""
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode

    start, end = times["arrival"], times["end"]
    root = tracer.start_span(name, start_time=start, attributes=attributes, kind=trace.SpanKind.SERVER)
    ctx = trace.set_span_in_context(root)
    scheduled, first = times.get("scheduled"), times.get("first_token")
    phases = [("queue", start, scheduled or end)]
    if scheduled is not None:
        phases.append(("prefill", scheduled, first or end))
    if first is not None:
        phases.append(("decode", first, end))
    for phase, t0, t1 in phases:
        tracer.start_span(phase, context=ctx, start_time=t0).end(end_time=max(t0, t1))
    if error:
        root.set_status(Status(StatusCode.ERROR, error))
    root.end(end_time=end)
