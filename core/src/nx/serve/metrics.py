"""Prometheus metrics of one served engine, in a registry of the app's own (not the process-global
one), so that several apps in one process, as in tests, do not collide."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _EngineCollector(Collector):
    """Reads `Engine.stats()` at scrape time: the engine owns these numbers, the server only shows them."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        s = self.engine.stats()
        yield GaugeMetricFamily("nx_queue_depth", "Requests waiting for a batch row.", value=s["queued"])
        yield GaugeMetricFamily("nx_running_rows", "Batch rows generating for a request now.", value=s["running"])
        yield GaugeMetricFamily("nx_batch_size", "Rows the engine decodes per step.", value=s["batch_size"])
        yield CounterMetricFamily("nx_generated_tokens", "Tokens generated since start.", value=s["generated_tokens"])
        yield CounterMetricFamily("nx_engine_finished_requests", "Requests the engine finished.", value=s["finished"])


class Metrics:
    """The app's metrics: engine gauges, requests by finish reason and latency histograms."""

    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        r = self.registry
        self.requests = Counter(
            "nx_requests", "Generation requests answered, by endpoint and finish reason.", ["endpoint", "finish_reason"],
            registry=r,
        )
        self.rejected = Counter("nx_rejected_requests", "Requests answered with an error, by status.", ["status"], registry=r)
        self.ttft = Histogram(
            "nx_time_to_first_token_seconds", "From request arrival to its first token.", buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "nx_inter_token_latency_seconds", "Between consecutive tokens of one request.", buckets=_STEP_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "nx_request_duration_seconds", "From request arrival to its last token.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("nx_prompt_tokens", "Prompt tokens of answered requests.", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
