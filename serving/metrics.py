"""Prometheus metrics of the gateway, labelled by model version: requests, latency, time to first
token, inter-token latency, prompt and completion tokens, queue depth, cache hits; the output
statistics drift is measured on (generated token ids by bucket, completion lengths, finish reasons,
refusals) and online quality (feedback scores against the version's baseline)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)
LENGTH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class ServingMetrics:
    """One registry per gateway replica, rendered at /metrics."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("privlm_requests", "Requests by endpoint, HTTP status and model version",
                                ["endpoint", "status", "version"], registry=r)
        self.latency = Histogram("privlm_request_latency_seconds", "End-to-end request latency",
                                 ["endpoint", "version"], registry=r, buckets=LATENCY_BUCKETS)
        self.ttft = Histogram("privlm_time_to_first_token_seconds", "Time to the first streamed token",
                              ["version"], registry=r, buckets=LATENCY_BUCKETS)
        self.itl = Histogram("privlm_inter_token_latency_seconds", "Time between streamed chunks",
                             ["version"], registry=r, buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
        self.prompt_tokens = Counter("privlm_prompt_tokens", "Prompt tokens", ["version"], registry=r)
        self.tokens = Counter("privlm_completion_tokens", "Completion tokens generated", ["version"], registry=r)
        self.in_flight = Gauge("privlm_queue_depth", "Requests in the gateway, queued or generating", registry=r)
        self.cache = Counter("privlm_cache", "Deterministic-request cache lookups", ["result"], registry=r)
        self.output_tokens = Counter("privlm_output_tokens", "Generated token ids, counted by id modulo the bucket "
                                     "count", ["version", "bucket"], registry=r)
        self.lengths = Histogram("privlm_completion_length_tokens", "Tokens per generated choice", ["version"],
                                 registry=r, buckets=LENGTH_BUCKETS)
        self.finish = Counter("privlm_finish_reasons", "Generated choices by finish reason", ["version", "reason"],
                              registry=r)
        self.refusals = Counter("privlm_refusals", "Generated choices matching a refusal pattern", ["version"],
                                registry=r)
        self.feedback = Summary("privlm_feedback_score", "Feedback scores in [0, 1]", ["version", "arm"], registry=r)
        self.baseline = Gauge("privlm_quality_baseline", "The version's expected feedback score (its A/B mean when "
                              "it was promoted)", ["version"], registry=r)

    def observe(self, endpoint: str, status: int, version: str, seconds: float, usage: dict | None) -> None:
        self.requests.labels(endpoint, str(status), version).inc()
        self.latency.labels(endpoint, version).observe(seconds)
        if usage:
            self.prompt_tokens.labels(version).inc(usage.get("prompt_tokens") or 0)
            self.tokens.labels(version).inc(usage.get("completion_tokens") or 0)

    def observe_choice(self, version: str, token_ids: list[int], finish_reason: str | None, refused: bool,
                       buckets: int) -> None:
        """One generated choice's output statistics."""
        counts: dict[int, int] = {}
        for t in token_ids:
            counts[t % buckets] = counts.get(t % buckets, 0) + 1
        for bucket, n in counts.items():
            self.output_tokens.labels(version, str(bucket)).inc(n)
        self.lengths.labels(version).observe(len(token_ids))
        self.finish.labels(version, finish_reason or "none").inc()
        if refused:
            self.refusals.labels(version).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
