"""The web pages' defences, as plain functions and classes: the Host check
against DNS rebinding (and the ASGI guard for Host headers Werkzeug cannot
parse), CSRF tokens and the Origin check, the security headers, and the
sign-in limiter. The request hooks in ``routes`` apply them."""

from __future__ import annotations

import hmac
import ipaddress
import math
import re
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, MutableMapping
from typing import Any

LOGIN_PER_CLIENT = 5       # failures per LOGIN_WINDOW per client address
LOGIN_STORM = 30           # failures per LOGIN_WINDOW from all clients together: a storm
LOGIN_MAX_CLIENTS = 10000  # client addresses tracked (the least recently failed dropped first)
LOGIN_WINDOW = 60.0

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

BAD_HOST = "thox.bad_host"     # ASGI scope flag: the request's Host header was unusable


# --------------------------------------------------------------------------- Host

_HOST_RE = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9-]{1,63})*\.?|\[[0-9A-Fa-f:.]+\])"
                      r"(?::(\d{1,5}))?$")


def parse_host(raw: str) -> tuple[str, int | None] | None:
    """(host, port) from a ``Host`` header value (an IPv6 literal keeps its
    brackets); None when it is empty or malformed."""
    m = _HOST_RE.match(raw) if len(raw) <= 260 else None
    if not m:
        return None
    if m.group(1):
        return raw[: m.start(1) - 1], int(m.group(1))
    return raw, None


def is_ip_literal(host: str) -> bool:
    """Whether ``host`` is an IPv4 address or an IPv6 address (bracketed or not)."""
    try:
        ipaddress.ip_address(host[1:-1] if host.startswith("[") else host)
    except ValueError:
        return False
    return True


def known_host(host: str, hostname: str, extra_names: Callable[[], str]) -> bool:
    """Whether ``host`` is a name (or an address) this box answers to: an IP
    literal, ``localhost``, the box's ``hostname`` or its first label,
    ``<label>.local`` and avahi's ``<label>-N.local``, or one of the
    comma-separated names ``extra_names()`` returns. ``extra_names`` is only
    called when no other rule matched (it reads the config file)."""
    name = host.lower().rstrip(".")
    if is_ip_literal(name) or name in ("localhost", "localhost.localdomain"):
        return True
    own = hostname.lower().rstrip(".")
    short = own.split(".", 1)[0]
    if name in (own, short) or re.fullmatch(rf"{re.escape(short)}(?:-\d+)?\.local", name):
        return True
    return name in extra_names().split(",")


def guard_host_header(asgi_app: Callable[..., Any]) -> Callable[..., Any]:
    """Werkzeug cannot build a request context for a Host it cannot IDNA-encode
    (an empty or over-long label) and the request would end in a 500 before any
    handler runs. Such a Host is replaced by ``invalid`` and the request flagged
    with ``BAD_HOST``: the web pages answer 400, the API (which ignores Host)
    answers as usual."""
    async def guarded(scope, receive, send):
        if scope.get("type") == "http":
            headers = scope.get("headers") or []
            host = next((v for k, v in headers if k.lower() == b"host"), None)
            if host is not None:
                try:
                    host.decode("latin-1").lower().encode("idna")
                except UnicodeError:
                    headers = [(k, v) for k, v in headers if k.lower() != b"host"] + [(b"host", b"invalid")]
                    scope = {**scope, "headers": headers, BAD_HOST: True}
        await asgi_app(scope, receive, send)
    return guarded


# --------------------------------------------------------------------------- CSRF, Origin, headers

def new_csrf_token() -> str:
    """A random 256-bit token for one session's forms."""
    return secrets.token_urlsafe(32)


def csrf_ok(presented: str, expected: str) -> bool:
    """Whether the token a form carried is the session's (constant-time compare)."""
    return hmac.compare_digest(presented.encode(), expected.encode())


def origin_ok(origin: str | None, host: str) -> bool:
    """Whether a POST's ``Origin`` header allows it: absent or ``null`` (the
    browser sent none), or the same ``host[:port]`` as the ``Host`` header."""
    if not origin or origin == "null":
        return True
    return origin.split("://", 1)[-1].rstrip("/").lower() == host.lower()


def set_security_headers(headers: MutableMapping[str, str], static: bool) -> None:
    """The headers every web response carries; ``no-store`` on all but static assets."""
    if not static:
        headers["Cache-Control"] = "no-store"
    for name, value in SECURITY_HEADERS.items():
        headers[name] = value


# --------------------------------------------------------------------------- sign-in limiter

def client_key(ip: str) -> str:
    """The address sign-in failures are counted under (IPv4-mapped IPv6 as
    IPv4, an IPv6 zone dropped)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


class LoginLimiter:
    """Sliding windows of sign-in failures, per client address and overall.

    An address waits once it has ``per_client`` failures in the window or,
    while failures overall reach ``storm``, once it has any. An address with
    no failure in the window may always try. An attempt counts as a failure
    from the start and is taken back when the password was right, so parallel
    attempts from one address get no more tries than sequential ones.
    ``clock`` gives the time in seconds (monotonic)."""

    def __init__(self, per_client: int = LOGIN_PER_CLIENT, storm: int = LOGIN_STORM,
                 window: float = LOGIN_WINDOW, max_clients: int = LOGIN_MAX_CLIENTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_client, self.storm, self.window, self.max_clients = per_client, storm, window, max_clients
        self.clock = clock
        self._clients: OrderedDict[str, deque[float]] = OrderedDict()
        self._failures: deque[float] = deque(maxlen=storm)   # the latest ones tell whether it storms

    def _trim(self, q: deque[float], now: float) -> None:
        while q and now - q[0] >= self.window:
            q.popleft()

    def retry_after(self, ip: str) -> int:
        """0 when ``ip`` may try now, else seconds to wait."""
        now = self.clock()
        key = client_key(ip)
        q = self._clients.get(key)
        if q is None:
            return 0
        self._trim(q, now)
        if not q:
            del self._clients[key]
            return 0
        self._trim(self._failures, now)
        if len(q) >= self.per_client:
            wait = q[-self.per_client] + self.window - now
        elif len(self._failures) >= self.storm:
            # until this client's failures age out or the storm dies down, whichever is first
            wait = min(q[-1], self._failures[0]) + self.window - now
        else:
            return 0
        return max(1, math.ceil(wait))

    def attempt(self, ip: str) -> float:
        """Count an attempt as a failure; returns the token ``succeeded`` takes back."""
        now = self.clock()
        key = client_key(ip)
        q = self._clients.pop(key, None) or deque()
        q.append(now)
        while len(q) > self.per_client:
            q.popleft()
        self._clients[key] = q            # the most recently failed last
        while len(self._clients) > self.max_clients:
            self._clients.popitem(last=False)
        self._failures.append(now)
        self._trim(self._failures, now)
        return now

    def succeeded(self, ip: str, token: float) -> None:
        """The attempt ``token`` had the right password: it is no failure."""
        q = self._clients.get(client_key(ip))
        for seen in (q, self._failures):
            if seen is not None and token in seen:
                seen.remove(token)
