"""Prometheus metrics of one server (its own registry, so several apps can live in one process, as in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_TPS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)

OUTCOMES = ("ok", "cancelled", "rejected", "invalid", "unauthorized", "error")


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("gyrfalcon_requests", "Requests by route and outcome "
                                "(ok, cancelled, rejected = 429, invalid = 422, unauthorized, error)",
                                ["route", "outcome"], registry=r)
        self.queue_length = Gauge("gyrfalcon_queue_length", "Requests waiting for their first step", registry=r)
        self.running = Gauge("gyrfalcon_batch_size", "Sequences in the running batch", registry=r)
        self.kv_used = Gauge("gyrfalcon_kv_blocks_used", "KV-cache blocks (or state slots) in use", registry=r)
        self.kv_free = Gauge("gyrfalcon_kv_blocks_free", "KV-cache blocks (or state slots) free", registry=r)
        self.kv_total = Gauge("gyrfalcon_kv_blocks_total", "KV-cache blocks (or state slots) in the pool",
                              registry=r)
        self.ttft = Histogram("gyrfalcon_time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("gyrfalcon_inter_token_latency_seconds", "Time between two tokens of a sequence",
                             buckets=_ITL_BUCKETS, registry=r)
        self.tokens_per_second = Histogram("gyrfalcon_request_tokens_per_second",
                                           "Generated tokens per second of each finished request (decode phase)",
                                           buckets=_TPS_BUCKETS, registry=r)
        self.duration = Histogram("gyrfalcon_request_duration_seconds", "Arrival to last token",
                                  buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("gyrfalcon_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generated_tokens = Counter("gyrfalcon_generated_tokens", "Tokens generated", registry=r)
        self.preemptions = Counter("gyrfalcon_preemptions", "Sequences preempted (to be recomputed)", registry=r)
        self.steps = Counter("gyrfalcon_engine_steps", "Engine steps run", registry=r)

    def count(self, route: str, outcome: str) -> None:
        self.requests.labels(route=route, outcome=outcome).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
