"""Prometheus metrics of ``embedstream serve``, in a registry of their own (served on
its /metrics): requests by route and status, latency, the batcher's calls, batch sizes,
queue depth, and tokens."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.process_collector import ProcessCollector

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter(
            "embedstream_serve_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "embedstream_serve_request_seconds",
            "Time to answer, by route",
            ["route"],
            buckets=_LATENCY,
            registry=r,
        )
        self.model_calls = Counter(
            "embedstream_serve_model_calls",
            "Model calls of the batcher (one per batch and prompt)",
            registry=r,
        )
        self.batch_inputs = Histogram(
            "embedstream_serve_batch_inputs", "Inputs per model call", buckets=_SIZES, registry=r
        )
        self.batch_requests = Histogram(
            "embedstream_serve_batch_requests",
            "Requests coalesced into one model call",
            buckets=_SIZES,
            registry=r,
        )
        self.batch_tokens = Histogram(
            "embedstream_serve_batch_tokens",
            "Tokens per model call",
            buckets=(16, 64, 256, 1024, 2048, 4096, 8192, 16384, 65536),
            registry=r,
        )
        self.model_seconds = Histogram(
            "embedstream_serve_model_seconds", "Time of one model call", buckets=_LATENCY, registry=r
        )
        self.queue_wait = Histogram(
            "embedstream_serve_queue_seconds",
            "Time a request waited for the model",
            buckets=_LATENCY,
            registry=r,
        )
        self.queue_tokens = Gauge(
            "embedstream_serve_queue_tokens", "Tokens waiting for the model", registry=r
        )
        self.queue_requests = Gauge(
            "embedstream_serve_queue_requests", "Requests waiting for the model", registry=r
        )
        self.tokens = Counter("embedstream_serve_tokens", "Tokens embedded (after truncation)", registry=r)
        self.inputs = Counter("embedstream_serve_inputs", "Inputs embedded", registry=r)
        self.truncated = Counter(
            "embedstream_serve_truncated_inputs", "Inputs cut to the model's longest input", registry=r
        )
        self.in_flight = Gauge(
            "embedstream_serve_requests_in_flight", "Requests being answered, of every route", registry=r
        )
        #: The same, as a number: one means the request asking is alone (the batcher may then
        #: compute a short one inline).
        self.active = 0
        self.rejected = Counter(
            "embedstream_serve_rejected", "Requests refused by the batcher, by reason", ["reason"], registry=r
        )
