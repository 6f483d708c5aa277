"""Per-client request rate limit for the API routes (``/v1/…`` and ``/api/…``;
``api.rate_limit`` per minute),
a token bucket per client address, answered like OpenAI: 429 with
Retry-After and x-ratelimit-* headers. Clients on the box itself (loopback)
are exempt unless ``api.rate_limit_loopback`` is set."""

from __future__ import annotations

import ipaddress
import math
import time
from dataclasses import dataclass

from ..config import Config
from ..errors import ThoxError


class RateLimited(ThoxError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"


@dataclass
class _Bucket:
    tokens: float
    stamp: float


def _fmt(seconds: float) -> str:
    s = max(0.0, seconds)
    m, s = divmod(s, 60)
    return f"{int(m)}m{s:.0f}s" if m else f"{s:.3g}s"


class RateLimiter:
    MAX_CLIENTS = 10000

    def __init__(self, config: Config):
        self.config = config
        self._stamp: tuple | None = None
        self._loaded = False
        self.limit = 0
        self.loopback = False
        self._buckets: dict[str, _Bucket] = {}

    def _refresh(self) -> None:
        try:
            st = self.config.path.stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp or not self._loaded:
            self._loaded = True
            self._stamp = stamp
            self.limit = int(self.config.get("api.rate_limit"))
            self.loopback = bool(self.config.get("api.rate_limit_loopback"))

    @staticmethod
    def _is_loopback(addr: str) -> bool:
        try:
            return ipaddress.ip_address(addr.split("%")[0]).is_loopback
        except ValueError:
            return False

    def check(self, client: str | None) -> dict[str, str]:
        """Take one request from ``client``'s bucket; returns headers to add.
        Raises RateLimited when the bucket is empty."""
        self._refresh()
        if self.limit <= 0 or not client or (self._is_loopback(client) and not self.loopback):
            return {}
        now = time.monotonic()
        rate = self.limit / 60.0
        b = self._buckets.get(client)
        if b is None:
            if len(self._buckets) >= self.MAX_CLIENTS:
                self._buckets = {k: v for k, v in self._buckets.items()
                                 if now - v.stamp < 60}
            b = self._buckets[client] = _Bucket(float(self.limit), now)
        b.tokens = min(float(self.limit), b.tokens + (now - b.stamp) * rate)
        b.stamp = now
        headers = {"x-ratelimit-limit-requests": str(self.limit)}
        if b.tokens < 1.0:
            wait = (1.0 - b.tokens) / rate
            headers.update({"x-ratelimit-remaining-requests": "0",
                            "x-ratelimit-reset-requests": _fmt(wait),
                            "Retry-After": str(max(1, math.ceil(wait)))})
            raise RateLimited(f"Rate limit reached: {self.limit} requests per minute for this client. "
                              f"Retry in {_fmt(wait)}.", headers=headers)
        b.tokens -= 1.0
        headers.update({"x-ratelimit-remaining-requests": str(int(b.tokens)),
                        "x-ratelimit-reset-requests": _fmt((self.limit - b.tokens) / rate)})
        return headers
