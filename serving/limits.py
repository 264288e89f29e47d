"""Per-caller rate limits: a token bucket per caller id, refilled continuously.

Ray Serve has no per-key limit of its own (its queue bounds are per deployment), so the gateway keeps
one bucket per caller in each replica: with R gateway replicas a caller gets up to R times the rate.
"""

from __future__ import annotations

import math
import time

from serving.api import ApiError


class RateLimiter:
    """`requests_per_minute` with bursts of `burst`; over it, ApiError 429 with Retry-After."""

    def __init__(self, requests_per_minute: float | None, burst: int, max_callers: int = 100_000) -> None:
        self.rate = (requests_per_minute or 0) / 60.0
        self.burst = float(burst)
        self.max_callers = max_callers
        self.buckets: dict[str, tuple[float, float]] = {}

    def take(self, caller: str, now: float | None = None) -> None:
        if not self.rate:
            return
        now = time.monotonic() if now is None else now
        level, last = self.buckets.get(caller, (self.burst, now))
        level = min(self.burst, level + (now - last) * self.rate)
        if level < 1:
            wait = math.ceil((1 - level) / self.rate)
            self.buckets[caller] = (level, now)
            raise ApiError(429, f"rate limit of {self.rate * 60:g} requests per minute exceeded; retry in {wait} s",
                           "rate_limit_exceeded", headers={"Retry-After": str(wait)})
        if len(self.buckets) >= self.max_callers and caller not in self.buckets:
            self.buckets.clear()  # bounded memory; a reset only ever lets callers through early
        self.buckets[caller] = (level - 1, now)
