"""thox.api.ratelimit.RateLimiter: a token bucket per client address, read
from a real config.json (changes apply without a restart). The limits are
small per minute, so no refill worth a request happens while a test runs."""

from __future__ import annotations

import re

import pytest

from thox.api.ratelimit import RateLimited, RateLimiter
from thox.config import Config


@pytest.fixture
def cfg(tmp_path) -> Config:
    c = Config(tmp_path)
    c.set("api.rate_limit", 6)          # one request per 10 s refills
    return c


def test_a_client_gets_its_burst_then_429_with_retry_after(cfg):
    rl = RateLimiter(cfg)
    for i in range(6):
        h = rl.check("192.0.2.1")
        assert h["x-ratelimit-limit-requests"] == "6" and h["x-ratelimit-remaining-requests"] == str(5 - i)
    with pytest.raises(RateLimited) as ei:
        rl.check("192.0.2.1")
    e = ei.value
    assert e.status == 429 and e.code == "rate_limit_exceeded" and e.type == "requests"
    assert e.headers["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= int(e.headers["Retry-After"]) <= 10
    assert e.headers["x-ratelimit-reset-requests"].endswith("s") and "6 requests per minute" in e.message
    assert rl.check("192.0.2.2")["x-ratelimit-remaining-requests"] == "5"   # another client has its own bucket


def seconds(value: str) -> float:
    """``1m30s`` / ``9.5s`` (OpenAI's x-ratelimit-reset-* format) in seconds."""
    m = re.fullmatch(r"(?:(\d+)m)?(\d+(?:\.\d+)?)s", value)
    assert m, value
    return int(m.group(1) or 0) * 60 + float(m.group(2))


def test_reset_header_counts_the_time_to_a_full_bucket(cfg):
    rl = RateLimiter(cfg)
    assert 9.9 <= seconds(rl.check("192.0.2.1")["x-ratelimit-reset-requests"]) <= 10
    for _ in range(5):
        h = rl.check("192.0.2.1")
    assert 59.5 <= seconds(h["x-ratelimit-reset-requests"]) <= 60     # an empty bucket: 6 requests to refill
    cfg.set("api.rate_limit", 1)
    rl.check("192.0.2.7")
    with pytest.raises(RateLimited) as ei:
        rl.check("192.0.2.7")
    assert 59 <= seconds(ei.value.headers["x-ratelimit-reset-requests"]) <= 60
    assert re.fullmatch(r"\d+m\d+s|\d+(\.\d+)?s", ei.value.headers["x-ratelimit-reset-requests"])


@pytest.mark.parametrize("client", ["127.0.0.1", "::1", "127.8.9.10"])
def test_loopback_is_exempt_unless_configured(cfg, client):
    rl = RateLimiter(cfg)
    assert all(rl.check(client) == {} for _ in range(20))
    cfg.set("api.rate_limit_loopback", True)
    for _ in range(6):
        rl.check(client)
    with pytest.raises(RateLimited):
        rl.check(client)


@pytest.mark.parametrize("client", [None, ""])
def test_no_client_address_is_not_limited(cfg, client):
    rl = RateLimiter(cfg)
    assert all(rl.check(client) == {} for _ in range(20))


def test_a_zone_index_is_not_loopback(cfg):
    rl = RateLimiter(cfg)
    for _ in range(6):
        rl.check("fe80::1%eth0")
    with pytest.raises(RateLimited):
        rl.check("fe80::1%eth0")


def test_config_changes_apply_at_once(cfg):
    rl = RateLimiter(cfg)
    for _ in range(6):
        rl.check("192.0.2.1")
    cfg.set("api.rate_limit", 0)                 # off
    assert all(rl.check("192.0.2.1") == {} for _ in range(20))
    cfg.set("api.rate_limit", 600)               # a larger burst
    assert rl.check("192.0.2.9")["x-ratelimit-limit-requests"] == "600"
