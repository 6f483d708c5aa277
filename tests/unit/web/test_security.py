"""thox.web.security: Host parsing and matching, the ASGI Host guard, CSRF
tokens, the Origin check and the security headers."""

from __future__ import annotations

import asyncio
import string

import pytest

from thox.web.security import (BAD_HOST, CSP, csrf_ok, guard_host_header, is_ip_literal, known_host,
                               new_csrf_token, origin_ok, parse_host, set_security_headers)


# --------------------------------------------------------------------------- Host

@pytest.mark.parametrize("raw, parsed", [
    ("thox.local", ("thox.local", None)),
    ("thox.local:8080", ("thox.local", 8080)),
    ("thox.local.", ("thox.local.", None)),
    ("192.168.1.50:80", ("192.168.1.50", 80)),
    ("[fe80::1]:8080", ("[fe80::1]", 8080)),
    ("[::1]", ("[::1]", None)),
    ("a" * 63, ("a" * 63, None)),
])
def test_parse_host(raw, parsed):
    assert parse_host(raw) == parsed


@pytest.mark.parametrize("raw", ["", ":80", "-thox", "thox local", "evil.com/x", "thox.local:123456",
                                 "thox.local:", "a" * 64, "x" + ".a" * 130, "user@thox.local", "[zz::1]"])
def test_parse_host_refuses_malformed(raw):
    assert parse_host(raw) is None


@pytest.mark.parametrize("host, ip", [("127.0.0.1", True), ("[::1]", True), ("fe80::1", True),
                                      ("thox.local", False), ("[thox]", False), ("999.1.1.1", False)])
def test_is_ip_literal(host, ip):
    assert is_ip_literal(host) is ip


def _never() -> str:
    raise AssertionError("the extra names are read only when no other rule matched")


@pytest.mark.parametrize("host", ["thox", "THOX", "thox.", "thox.local", "Thox.Local.", "thox-2.local",
                                  "localhost", "localhost.localdomain", "127.0.0.1", "192.168.1.50",
                                  "[::1]", "[fe80::1]"])
def test_known_host_own_names_and_addresses(host):
    assert known_host(host, "thox", _never)


def test_known_host_fqdn_hostname():
    for host in ("thox.lan", "thox", "thox.local", "thox-12.local"):
        assert known_host(host, "thox.lan.", _never)
    assert not known_host("thox.example", "thox.lan", lambda: "")


@pytest.mark.parametrize("host", ["evil.com", "thoxx.local", "thox-x.local", "thox-.local",
                                  "thox.local.evil.com", "xthox.local", "local", "thox.localhost"])
def test_known_host_refuses_other_names(host):
    assert not known_host(host, "thox", lambda: "")


def test_known_host_extra_names():
    extra = lambda: "box.example,ai.home.arpa"  # noqa: E731
    assert known_host("box.example", "thox", extra)
    assert known_host("AI.home.arpa.", "thox", extra)
    assert not known_host("example", "thox", extra)
    assert not known_host("other.example", "thox", extra)


def _run_guard(headers, scope_type="http"):
    seen = {}

    async def inner(scope, receive, send):
        seen["scope"] = scope

    scope = {"type": scope_type, "headers": headers}
    asyncio.run(guard_host_header(inner)(scope, None, None))
    return scope, seen["scope"]


def test_host_guard_passes_usable_hosts_unchanged():
    for host in (b"thox.local:8080", b"b\xc3\xbccher.de", b""):
        scope, passed = _run_guard([(b"host", host), (b"accept", b"*/*")])
        assert passed is scope and BAD_HOST not in passed
    scope, passed = _run_guard([(b"accept", b"*/*")])
    assert passed is scope
    scope, passed = _run_guard([(b"host", b"a..b")], scope_type="lifespan")
    assert passed is scope


@pytest.mark.parametrize("host", [b"a..b", b"a" * 64 + b".local", b".", b"thox..local:8080"])
def test_host_guard_replaces_hosts_werkzeug_cannot_encode(host):
    scope, passed = _run_guard([(b"accept", b"*/*"), (b"Host", host)])
    assert passed[BAD_HOST] is True
    assert passed["headers"] == [(b"accept", b"*/*"), (b"host", b"invalid")]
    assert scope["headers"] == [(b"accept", b"*/*"), (b"Host", host)]      # the original is left alone


# --------------------------------------------------------------------------- CSRF, Origin, headers

def test_csrf_tokens_are_random_256_bit_and_url_safe():
    tokens = {new_csrf_token() for _ in range(200)}
    assert len(tokens) == 200
    alphabet = set(string.ascii_letters + string.digits + "-_")
    assert all(len(t) == 43 and set(t) <= alphabet for t in tokens)


def test_csrf_ok_only_for_the_exact_token():
    token = new_csrf_token()
    assert csrf_ok(token, token)
    assert not csrf_ok("", token)
    assert not csrf_ok(token[:-1], token)
    assert not csrf_ok(token + "x", token)
    assert not csrf_ok(token.swapcase(), token)
    assert not csrf_ok("é" * 43, token)


@pytest.mark.parametrize("origin, host, ok", [
    (None, "thox.local", True),
    ("", "thox.local", True),
    ("null", "thox.local", True),
    ("http://thox.local:8080", "thox.local:8080", True),
    ("http://THOX.local:8080/", "thox.local:8080", True),
    ("http://192.168.1.50", "192.168.1.50", True),
    ("http://evil.com", "thox.local", False),
    ("http://thox.local", "thox.local:8080", False),
    ("http://thox.local:8081", "thox.local:8080", False),
    ("http://thox.local.evil.com", "thox.local", False),
    ("http://thox.local", "", False),
])
def test_origin_ok(origin, host, ok):
    assert origin_ok(origin, host) is ok


def test_security_headers():
    headers: dict[str, str] = {"Cache-Control": "max-age=60"}
    set_security_headers(headers, static=True)
    assert headers == {"Cache-Control": "max-age=60", "Content-Security-Policy": CSP, "X-Frame-Options": "DENY",
                       "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
    set_security_headers(headers, static=False)
    assert headers["Cache-Control"] == "no-store"
    assert "'unsafe-inline'" not in CSP and "frame-ancestors 'none'" in CSP and "default-src 'none'" in CSP
