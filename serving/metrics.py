"""Prometheus metrics of the gateway: requests, latency, tokens, batch sizes, queue depth, cache hits."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class ServingMetrics:
    """One registry per gateway replica, rendered at /metrics; series are labelled by model version."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("privlm_requests", "Requests by endpoint, HTTP status and model version",
                                ["endpoint", "status", "version"], registry=self.registry)
        self.latency = Histogram("privlm_request_latency_seconds", "End-to-end request latency",
                                 ["endpoint", "version"], registry=self.registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
        self.tokens = Counter("privlm_tokens_generated", "Completion tokens generated", ["version"],
                              registry=self.registry)
        self.batch_size = Histogram("privlm_batch_size", "Requests per generation batch", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32))
        self.in_flight = Gauge("privlm_queue_depth", "Requests in the gateway, queued or generating",
                               registry=self.registry)
        self.cache = Counter("privlm_cache", "Deterministic-request cache lookups", ["result"], registry=self.registry)

    def observe(self, endpoint: str, status: int, version: str, seconds: float, tokens: int) -> None:
        self.requests.labels(endpoint, str(status), version).inc()
        self.latency.labels(endpoint, version).observe(seconds)
        if tokens:
            self.tokens.labels(version).inc(tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
