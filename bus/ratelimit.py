"""Per-institution rate limits on offering events: a token bucket each (events per second
sustained, a burst at once) — over HTTP (``http_rate_limit``/``http_rate_burst``) and over NATS
(``ingress_rate_limit``/``ingress_rate_burst``). In memory, per process: it protects the process,
and a partner spreading over several processes (gatekeepers) gets a share of each."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class RateLimiter:
    """Token buckets keyed by institution."""

    rate: float
    burst: int
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def take(self, key: str, cost: int = 1) -> float | None:
        """Take ``cost`` tokens; None when granted, else the seconds until they will be there."""
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            return None
        return (cost - bucket.tokens) / self.rate
