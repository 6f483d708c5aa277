"""Fetch one URL into a partial file over HTTP(S), resuming what is there.

``Download(...).run(retries, backoff)`` returns the sha256 and size of the
whole file. It continues the bytes already in the partial file with a
``Range`` request, hashing them first. A dropped connection is retried with
exponential backoff (``retries`` failed attempts in a row without progress
end it). A server copy that changed (another ETag or length) or a server that
ignores ``Range`` (answers 200) makes it start again from byte 0.

Bounds: free disk space is checked against the announced length (or the
size hint) before the first byte; a body without a length stops at the size
hint (else at the free space) and then fails with ``too_large``; a pinned
size (``exact_size``) that the server contradicts fails with
``size_mismatch``; LFS headers (``X-Linked-Etag``/``X-Linked-Size``) that
contradict the pin fail with ``pin_mismatch``; a redirect from https to
anything else fails with ``insecure_redirect``.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import itertools
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

from .. import __version__
from ..errors import StoreError
from ..ui import ProgressCallback, PullProgress, format_bytes
from .catalog import SHA256_RE
from .partial import nofollow_opener, write_meta
from .store import CHUNK, FREE_SPACE_MARGIN, ModelStore

DEFAULT_RETRIES = 5          # failed attempts in a row (without progress) before giving up
DEFAULT_BACKOFF = 1.0        # seconds; doubles each retry, capped at MAX_BACKOFF
MAX_BACKOFF = 30.0
DEFAULT_TIMEOUT = 30.0       # seconds of socket silence before an attempt counts as failed
META_INTERVAL = 1.0          # seconds between progress snapshots written to the partial's .json
USER_AGENT = f"thox/{__version__} (model pull)"

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.I)
_UNSATISFIED_RANGE = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$", re.I)


class Retry(Exception):
    """A transient failure: try again (after backoff) from where we are."""


class Restart(Exception):
    """The partial bytes cannot be continued: start again from byte 0."""


# --------------------------------------------------------------------------- pure helpers

def check_url(url: str) -> str:
    """``url`` itself when it is http(s) with a host; else ``invalid_url``."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise StoreError(f"invalid download URL {url!r}: expected http:// or https://", code="invalid_url")
    return url


def strong_etag(headers: Message | dict[str, str]) -> str | None:
    """The ETag when it is a strong one (weak ETags say nothing about bytes)."""
    etag = headers.get("ETag")
    if not etag or etag.startswith("W/"):
        return None
    return etag


def parse_content_range(value: str | None) -> tuple[int, int | None] | None:
    """``bytes START-END/TOTAL`` -> (START, TOTAL or None for ``*``); None if malformed."""
    m = _CONTENT_RANGE.match(value or "")
    if not m:
        return None
    return int(m.group(1)), (int(m.group(3)) if m.group(3) != "*" else None)


def unsatisfied_range_size(value: str | None) -> int | None:
    """The size in a 416 answer's ``bytes */SIZE``; None if absent or malformed."""
    m = _UNSATISFIED_RANGE.match(value or "")
    return int(m.group(1)) if m else None


def is_transient(status: int) -> bool:
    """HTTP statuses worth retrying: timeouts, rate limits, server errors."""
    return status in (408, 425, 429) or status >= 500


def backoff_delay(failures: int, backoff: float) -> float:
    """Seconds to wait after the ``failures``-th failure in a row (1, 2, 4... times ``backoff``)."""
    return min(MAX_BACKOFF, backoff * (2 ** (max(1, failures) - 1)))


def copy_changed(meta: dict[str, Any], etag: str | None, total: int | None) -> bool:
    """Whether a range answer is for another copy than the partial's (ETag or length differ)."""
    return bool((meta.get("etag") and etag and etag != meta["etag"])
                or (meta.get("total") and total and total != meta["total"]))


def reason(e: BaseException) -> str:
    """A short human reason for a network or I/O failure."""
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        r = e.reason
        return getattr(r, "strerror", None) or str(r)
    if isinstance(e, http.client.IncompleteRead):
        return "incomplete read"
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def check_linked(linked: dict[str, str], url: str, expected_sha256: str | None, size: int | None) -> None:
    """The host's LFS headers on the download must agree with the pin."""
    etag = linked.get("x-linked-etag", "").lower()
    if expected_sha256 and SHA256_RE.fullmatch(etag) and etag != expected_sha256:
        raise StoreError(f"{url}: the host declares sha256 {etag} for this file, the catalog pins "
                         f"{expected_sha256}; refusing it", code="pin_mismatch", status=502)
    lsize = linked.get("x-linked-size", "")
    if size is not None and lsize.isdigit() and int(lsize) != size:
        raise StoreError(f"{url}: the host declares {lsize} bytes for this file, the catalog pins {size}; "
                         f"refusing it", code="pin_mismatch", status=502)


def raise_disk(e: OSError, store: ModelStore) -> NoReturn:
    """A write failure as a StoreError: a full disk keeps the partial for a resume."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        raise StoreError(f"the disk holding {store.root} is full; the partial download was kept: free "
                         f"space and run the pull again to resume", code="insufficient_storage",
                         status=507) from None
    raise StoreError(f"cannot write the download in {store.root}: {e.strerror or e}", code="io_error") from None


# --------------------------------------------------------------------------- HTTP

def keep_linked(headers: Any, into: dict[str, str]) -> None:
    """Remember the LFS headers (first seen wins), without quotes or W/."""
    for name in ("X-Linked-Etag", "X-Linked-Size"):
        v = headers.get(name)
        if v:
            into.setdefault(name.lower(), v.strip().removeprefix("W/").strip('"'))


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects, except from https to anything but https, and keeps
    the LFS headers a hop sent."""

    def __init__(self) -> None:
        super().__init__()
        self.linked: dict[str, str] = {}

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 (urllib's signature)
        new = urllib.parse.urljoin(req.full_url, newurl)
        if urllib.parse.urlsplit(req.full_url).scheme == "https" and urllib.parse.urlsplit(new).scheme != "https":
            raise StoreError(f"refusing the redirect from {req.full_url} to {new}: https must not become "
                             f"{urllib.parse.urlsplit(new).scheme or 'plain'}", code="insecure_redirect")
        keep_linked(headers, self.linked)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def http_open(url: str, offset: int, timeout: float, linked: dict[str, str] | None = None
              ) -> http.client.HTTPResponse:
    """GET ``url`` from byte ``offset`` on; the LFS headers of every hop go to ``linked``."""
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    redirects = _Redirects()
    resp = urllib.request.build_opener(redirects).open(req, timeout=timeout)
    if linked is not None:
        linked.update(redirects.linked)
        keep_linked(resp.headers, linked)
    return resp


class Meter:
    """Smoothed transfer rate (bytes/second) and ETA."""

    WINDOW = 0.5

    def __init__(self) -> None:
        self.rate = 0.0
        self._t = time.monotonic()
        self._bytes = 0
        self._smoothed = False

    def add(self, n: int) -> None:
        self._bytes += n
        now = time.monotonic()
        dt = now - self._t
        if dt >= self.WINDOW:
            inst = self._bytes / dt
            self.rate = 0.7 * self.rate + 0.3 * inst if self._smoothed else inst
            self._smoothed = True
            self._t, self._bytes = now, 0
        elif not self._smoothed and dt >= 0.02:
            self.rate = self._bytes / dt  # the first half second: plain average so far

    def eta(self, done: int, total: int | None) -> float | None:
        if not total or self.rate <= 0:
            return None
        return max(0.0, (total - done) / self.rate)


# --------------------------------------------------------------------------- the download

@dataclass
class Download:
    """One file fetched into ``part``; ``meta`` (kept at ``meta_path``) records
    what the partial bytes are. ``size_hint`` bounds a body without a length;
    with ``exact_size`` it is the pinned size the server must agree with."""

    store: ModelStore
    model_id: str
    url: str
    part: Path
    meta_path: Path
    meta: dict[str, Any]
    size_hint: int | None = None
    exact_size: bool = False
    expected_sha256: str | None = None
    progress: ProgressCallback | None = None
    timeout: float = DEFAULT_TIMEOUT
    have: int = field(default=0, init=False)
    _hash: Any = field(default=None, init=False, repr=False)
    _progressed: bool = field(default=False, init=False, repr=False)

    def run(self, retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF) -> tuple[str, int]:
        """Download until complete; returns (sha256, size)."""
        self._hash_existing()
        failures = 0
        for attempt in itertools.count(1):
            self._progressed = False
            try:
                return self._attempt(attempt)
            except Restart:
                self._restart()
                error = "the server copy changed or ignored the range request; starting over"
                self._emit("retrying", done=0, attempt=attempt, message=error)
                failures += 1
            except Retry as e:
                error = str(e)
                failures = 1 if self._progressed else failures + 1
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                error = f"cannot reach {self.url}: {reason(e)}"
                failures = 1 if self._progressed else failures + 1
            if failures >= retries:
                raise StoreError(f"download of '{self.model_id}' failed after {attempt} attempts: {error} "
                                 f"({format_bytes(self.have)} kept; run the pull again to resume)",
                                 code="network_error", status=502)
            delay = backoff_delay(failures, backoff)
            self._emit("retrying", done=self.have, total=self.meta.get("total"), attempt=attempt,
                       message=f"{error}; retrying in {delay:.1f}s")
            time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- one attempt -----------------------------------------------------
    def _attempt(self, attempt: int) -> tuple[str, int]:
        self._emit("connecting", done=self.have, total=self.meta.get("total"), attempt=attempt)
        linked: dict[str, str] = {}
        resp = self._connect(linked)
        if resp is None:
            return self._hash.hexdigest(), self.have
        with resp:
            total, etag = self._accept(resp)
            self._check_announced(linked, total)
            limit = self._prepare(total, etag)
            self._receive(resp, total, limit, attempt)
        self.meta.update({"done": self.have, "rate": 0.0, "eta": None})
        write_meta(self.meta_path, self.meta)
        if total is not None and self.have < total:
            raise Retry(f"connection closed after {format_bytes(self.have)} of {format_bytes(total)}")
        return self._hash.hexdigest(), self.have

    def _connect(self, linked: dict[str, str]) -> http.client.HTTPResponse | None:
        """The response to continue from ``have``; None when the server says
        every byte is already here (416 for exactly our size)."""
        try:
            return http_open(self.url, self.have, self.timeout, linked)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 416 and self.have:
                if unsatisfied_range_size(e.headers.get("Content-Range")) == self.have:
                    return None
                raise Restart() from None
            if is_transient(e.code):
                raise Retry(f"HTTP {e.code} {e.reason} from {self.url}") from None
            raise StoreError(f"download failed: HTTP {e.code} {e.reason} from {self.url}",
                             code="http_error", status=502) from None

    def _accept(self, resp: http.client.HTTPResponse) -> tuple[int | None, str | None]:
        """(total length or None, strong ETag or None) of an answer we can use."""
        etag = strong_etag(resp.headers)
        if resp.status == 206:
            rng = parse_content_range(resp.headers.get("Content-Range"))
            if rng is None or rng[0] != self.have or copy_changed(self.meta, etag, rng[1]):
                raise Restart()
            return rng[1], etag
        if resp.status == 200:
            if self.have:   # the server ignores Range: start over from byte 0
                self._restart()
            cl = resp.headers.get("Content-Length")
            return (int(cl) if cl and cl.isdigit() else None), etag
        raise StoreError(f"download failed: unexpected HTTP {resp.status} from {self.url}",
                         code="http_error", status=502)

    def _check_announced(self, linked: dict[str, str], total: int | None) -> None:
        pinned_size = self.size_hint if self.exact_size else None
        check_linked(linked, self.url, self.expected_sha256, pinned_size)
        if pinned_size is not None and total is not None and total != pinned_size:
            raise StoreError(f"{self.url} has {total} bytes, the catalog pins {pinned_size}; refusing it",
                             code="size_mismatch", status=502)

    def _prepare(self, total: int | None, etag: str | None) -> int:
        """Check the disk space and record the answer; returns the most bytes
        the file may have."""
        self.store.check_free_space(max(0, (total or self.size_hint or 0) - self.have))
        self.meta.update({"total": total, "etag": etag or self.meta.get("etag")})
        write_meta(self.meta_path, self.meta)
        if total is not None:
            return total
        if self.size_hint is not None:
            return self.size_hint
        return self.have + max(0, shutil.disk_usage(self.store.root).free - FREE_SPACE_MARGIN)

    def _receive(self, resp: http.client.HTTPResponse, total: int | None, limit: int, attempt: int) -> None:
        meter = Meter()
        last_meta = time.monotonic()
        with self._open_part() as out:
            while chunk := self._read(resp):
                self._append(out, chunk, total, limit)
                meter.add(len(chunk))
                eta = meter.eta(self.have, total)
                self._emit("downloading", done=self.have, total=total, rate=meter.rate, eta=eta, attempt=attempt)
                if time.monotonic() - last_meta >= META_INTERVAL:
                    last_meta = time.monotonic()
                    self.meta.update({"done": self.have, "rate": meter.rate, "eta": eta})
                    write_meta(self.meta_path, self.meta)
            try:
                out.flush()
                os.fsync(out.fileno())
            except OSError as e:
                raise_disk(e, self.store)

    def _read(self, resp: http.client.HTTPResponse) -> bytes:
        """What has arrived, up to one chunk (live progress on slow links)."""
        try:
            return resp.read1(CHUNK)
        except (OSError, http.client.HTTPException) as e:
            raise Retry(f"connection lost after {format_bytes(self.have)}: {reason(e)}") from None

    def _append(self, out: BinaryIO, chunk: bytes, total: int | None, limit: int) -> None:
        if self.have + len(chunk) > limit:
            if total is not None:
                raise Restart()
            out.close()
            self._restart()
            self.meta_path.unlink(missing_ok=True)
            raise StoreError(f"{self.url} sent more than the expected {format_bytes(limit)} ({limit} bytes) "
                             f"without announcing a length; the partial download was removed",
                             code="too_large", status=502)
        try:
            out.write(chunk)
        except OSError as e:
            raise_disk(e, self.store)
        self._hash.update(chunk)
        self.have += len(chunk)
        self._progressed = True

    # -- the partial file ------------------------------------------------
    def _open_part(self) -> BinaryIO:
        try:
            self.part.parent.mkdir(parents=True, exist_ok=True)
            return open(self.part, "ab", opener=nofollow_opener)
        except OSError as e:
            raise_disk(e, self.store)

    def _hash_existing(self) -> None:
        """Hash the bytes an earlier attempt left, to continue after them."""
        self._hash, self.have = hashlib.sha256(), 0
        if not self.part.exists():
            return
        size = self.part.stat().st_size
        if size:
            self._emit("resuming", done=0, total=size,
                       message=f"resuming an interrupted download at {format_bytes(size)}")
        with open(self.part, "rb", opener=nofollow_opener) as f:
            while chunk := f.read(CHUNK):
                self._hash.update(chunk)
                self.have += len(chunk)

    def _restart(self) -> None:
        self.part.unlink(missing_ok=True)
        self.meta.pop("etag", None)
        self.meta.pop("total", None)
        self._hash, self.have = hashlib.sha256(), 0

    def _emit(self, phase: str, **kw: Any) -> None:
        if self.progress:
            self.progress(PullProgress(self.model_id, phase, url=self.url, **kw))


__all__ = [
    "DEFAULT_RETRIES", "DEFAULT_BACKOFF", "DEFAULT_TIMEOUT", "MAX_BACKOFF", "Download", "Meter", "Retry",
    "Restart", "check_url", "strong_etag", "parse_content_range", "unsatisfied_range_size", "is_transient",
    "backoff_delay", "copy_changed", "reason", "check_linked", "http_open",
]
