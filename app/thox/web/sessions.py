"""Server-side sessions for the web pages, and the web's per-app state.

A session lives in memory only; the cookie ``thox_session`` carries its
random id and nothing else. A session ends after 30 minutes idle or 12 hours
in all; when ``MAX_SESSIONS`` exist, expired ones are dropped first, then the
least recently seen anonymous ones, then any. The helpers below the store
work inside a Quart request: the request's session is ``g.web_session`` and
the cookie to send back is ``g.web_cookie`` (``""`` deletes it).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from quart import current_app, g, request

from ..api.state import app_state
from ..config import Config
from . import admin
from .security import LoginLimiter, new_csrf_token

COOKIE = "thox_session"
IDLE_TIMEOUT = 30 * 60
ABSOLUTE_TIMEOUT = 12 * 3600
MAX_SESSIONS = 2000


@dataclass
class Session:
    sid: str
    csrf: str = field(default_factory=new_csrf_token)
    created: float = field(default_factory=time.monotonic)
    seen: float = field(default_factory=time.monotonic)
    signed_in: bool = False
    must_change: bool = False
    pw_gen: str = ""          # salt of the admin password this session signed in with
    flash: list[tuple[str, str]] = field(default_factory=list)


class Sessions:
    """The sessions by id. ``clock`` gives the time in seconds (monotonic)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._by_id: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def _expired(self, s: Session, now: float) -> bool:
        return now - s.seen > IDLE_TIMEOUT or now - s.created > ABSOLUTE_TIMEOUT

    def get(self, sid: str | None) -> Session | None:
        """The live session with id ``sid`` (now seen), or None."""
        if not sid or len(sid) > 128:
            return None
        s = self._by_id.get(sid)
        if s is None:
            return None
        now = self.clock()
        if self._expired(s, now):
            self._by_id.pop(sid, None)
            return None
        s.seen = now
        return s

    def new(self, **kw: Any) -> Session:
        """A session with a fresh id; ``kw`` sets its other fields."""
        now = self.clock()
        if len(self._by_id) >= MAX_SESSIONS:
            for sid, s in list(self._by_id.items()):
                if self._expired(s, now):
                    del self._by_id[sid]
            # still full: drop the least recently seen anonymous ones, then any
            if len(self._by_id) >= MAX_SESSIONS:
                victims = sorted(self._by_id.values(), key=lambda s: (s.signed_in, s.seen))
                for s in victims[: len(self._by_id) - MAX_SESSIONS + 1]:
                    del self._by_id[s.sid]
        s = Session(sid=secrets.token_urlsafe(32), created=now, seen=now, **kw)
        self._by_id[s.sid] = s
        return s

    def drop(self, sid: str) -> None:
        self._by_id.pop(sid, None)

    def drop_all_signed_in(self) -> None:
        for sid in [sid for sid, s in self._by_id.items() if s.signed_in]:
            del self._by_id[sid]


class WebState:
    """What the web pages keep per app: sessions, the sign-in limiter, the
    lock that runs one password hash (scrypt) at a time, and the firmware job."""

    def __init__(self) -> None:
        self.sessions = Sessions()
        self.limiter = LoginLimiter()
        self.hash_lock = asyncio.Lock()   # one scrypt at a time: bounded CPU and memory
        self.firmware: Any = None         # web.firmware.FirmwareJob, made on first use


# --------------------------------------------------------------------------- inside a request

def web_state() -> WebState:
    return current_app.extensions["thox_web"]


def config() -> Config:
    return app_state().config


def client_ip() -> str:
    return request.remote_addr or "unknown"


def current_session() -> Session | None:
    return g.get("web_session")


def start_session(**kw: Any) -> Session:
    """A new session for this request; its id goes out in the cookie."""
    s = web_state().sessions.new(**kw)
    g.web_session = s
    g.web_cookie = s.sid
    return s


def end_session() -> None:
    """Drop this request's session and tell the browser to forget the cookie."""
    s = current_session()
    if s is not None:
        web_state().sessions.drop(s.sid)
    g.web_session = None
    g.web_cookie = ""


def flash(kind: str, text: str) -> None:
    """A message shown once, on the session's next page."""
    s = current_session()
    if s is not None:
        s.flash.append((kind, text))


def password_generation() -> str:
    """The salt of the current admin password ("" when none is set): a
    signed-in session whose ``pw_gen`` differs signed in before a change."""
    data = admin.load(config())
    return str(data["password"].get("salt", "")) if data else ""
