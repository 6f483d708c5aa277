"""API key check: constant-time comparison against $THOX_HOME/api_key,
re-read whenever the file changes on disk (no restart needed)."""

from __future__ import annotations

import hmac
import os

from ..config import Config
from ..errors import ThoxError


class InvalidKey(ThoxError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


def credential(headers) -> str | None:
    """The request's credentials: the Authorization header, or else an
    ``x-api-key`` header (Anthropic clients) read as Bearer."""
    auth = headers.get("Authorization")
    if auth and auth.strip():
        return auth
    key = headers.get("x-api-key")
    if key and key.strip():
        return "Bearer " + key.strip()
    return None


class KeyFile:
    def __init__(self, config: Config):
        self.path = config.key_path
        self._stamp: tuple | None = None
        self._key: bytes | None = None

    def current(self) -> bytes | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._key = None, None
            return None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                key = self.path.read_text().strip()
            except OSError:
                return self._key
            self._key = key.lower().encode() if key else None
            self._stamp = stamp
        return self._key

    def check(self, header: str | None) -> None:
        if not header or not header.strip():
            raise InvalidKey("You didn't provide an API key. You need to provide your API key in an "
                             "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise InvalidKey("Malformed Authorization header: expected 'Bearer YOUR_KEY'.")
        expected = self.current()
        given = token.lower().encode("utf-8", errors="replace")
        # compare_digest is constant-time for equal lengths; compare against a
        # same-length dummy when no key is configured so timing says nothing
        ok = hmac.compare_digest(given, expected if expected else b"\0" * len(given))
        if not ok or expected is None:
            raise InvalidKey("Incorrect API key provided. You can find the device's API key with "
                             "`thox config get api.key` or on the device's web page.")
