"""Bundle downloads for `thox update install URL`.

The bundle is fetched into ``$THOX_HOME/updates/<name>.part`` and renamed to
``<name>`` when complete. Every request asks for a byte range (``Range:
bytes=N-``): a server that answers without one (200) is refused before any
byte is kept, because an interrupted download could not be resumed from it.
An interrupted download (dropped connection, Ctrl-C) continues where it
stopped, on the next attempt or the next run with the same URL, as long as
the server's copy is the same (``If-Range`` with its ETag or Last-Modified).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from .. import __version__
from ..config import atomic_write
from ..errors import UpdateError
from ..ui import ProgressCallback, PullProgress, format_bytes

CHUNK = 1 << 20
RETRIES = 5
TIMEOUT = 30.0
USER_AGENT = f"thox/{__version__} (update download)"
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.I)
_NAME = re.compile(r"[^A-Za-z0-9._-]")


def bundle_name(url: str) -> str:
    """A safe file name for the bundle at ``url`` (ends in .raucb, as RAUC requires)."""
    base = _NAME.sub("_", os.path.basename(urllib.parse.urlsplit(url).path)).lstrip(".") or "bundle"
    return base if base.endswith(".raucb") else base + ".raucb"


def _validator(headers) -> str | None:
    return headers.get("ETag") or headers.get("Last-Modified")


class _Fetch:
    def __init__(self, url: str, dest: Path, progress: ProgressCallback | None):
        self.url, self.dest, self.progress = url, dest, progress
        self.part = dest.with_name(dest.name + ".part")
        self.meta_path = dest.with_name(dest.name + ".part.json")
        self.total: int | None = None
        self.validator: str | None = None
        self.t0, self.t0_bytes = time.monotonic(), 0

    def _load_meta(self) -> int:
        try:
            meta = json.loads(self.meta_path.read_text())
            if meta.get("url") == self.url and self.part.exists():
                self.total, self.validator = meta.get("total"), meta.get("validator")
                return self.part.stat().st_size
        except (OSError, ValueError, AttributeError):
            pass
        self.part.unlink(missing_ok=True)
        return 0

    def _save_meta(self) -> None:
        atomic_write(self.meta_path, json.dumps({"url": self.url, "total": self.total,
                                                 "validator": self.validator}).encode())

    def _emit(self, phase: str, done: int, message: str = "") -> None:
        if not self.progress:
            return
        elapsed = time.monotonic() - self.t0
        rate = (done - self.t0_bytes) / elapsed if elapsed > 0.5 else 0.0
        eta = (self.total - done) / rate if rate and self.total else None
        self.progress(PullProgress(model=self.dest.name, phase=phase, done=done, total=self.total, rate=rate,
                                   eta=eta, message=message, url=self.url))

    def _attempt(self, have: int) -> int:
        headers = {"User-Agent": USER_AGENT, "Range": f"bytes={have}-"}
        if have and self.validator:
            headers["If-Range"] = self.validator
        req = urllib.request.Request(self.url, headers=headers)
        try:
            resp = urllib.request.urlopen(req, timeout=TIMEOUT)
        except urllib.error.HTTPError as e:
            if e.code == 416 and self.total is not None and have == self.total:
                return have          # complete already
            raise UpdateError(f"the server answered {e.code} {e.reason} for {self.url}") from None
        with resp:
            if resp.status != 206:
                if have and self.validator:
                    # If-Range did not match: the file changed on the server since the last attempt
                    self.part.unlink(missing_ok=True)
                    self.total, self.validator = None, None
                    raise _Restart()
                raise UpdateError(f"the server at {urllib.parse.urlsplit(self.url).netloc} does not support "
                                  f"HTTP range requests (it answered {resp.status} to `Range: bytes={have}-`), "
                                  f"so a download could not be resumed: serve the bundle from a server that "
                                  f"does (nginx, Apache, caddy) or copy it to the device and install the file")
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range") or "")
            if not m or int(m.group(1)) != have:
                raise UpdateError(f"the server sent a range other than the one asked for "
                                  f"(Content-Range: {resp.headers.get('Content-Range')!r})")
            total = None if m.group(3) == "*" else int(m.group(3))
            if self.total is None and total is not None:
                free = shutil.disk_usage(self.dest.parent).free
                if total - have > free:
                    raise UpdateError(f"the bundle needs {format_bytes(total - have)} more and "
                                      f"{self.dest.parent} has {format_bytes(free)} free")
            self.total = total if total is not None else self.total
            self.validator = _validator(resp.headers) or self.validator
            self._save_meta()
            fd = os.open(self.part, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "ab") as f:
                last = 0.0
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                    have += len(chunk)
                    if time.monotonic() - last > 0.2:
                        last = time.monotonic()
                        self._emit("downloading", have)
                f.flush()
                os.fsync(f.fileno())
        return have

    def run(self) -> Path:
        have = self._load_meta()
        if have:
            self._emit("resuming", have, f"resuming at {format_bytes(have)}")
        self.t0_bytes = have
        failures = 0
        while True:
            try:
                have = self._attempt(have)
                if self.total is None or have >= self.total:
                    break
                raise OSError("the connection closed before the end of the bundle")
            except _Restart:
                have = 0
                self._emit("retrying", 0, "the bundle changed on the server: starting over")
            except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException) as e:
                failures += 1
                have = self.part.stat().st_size if self.part.exists() else 0
                why = getattr(e, "reason", None) or (
                    "the connection closed early" if isinstance(e, http.client.IncompleteRead) else e)
                if failures >= RETRIES:
                    raise UpdateError(f"cannot download {self.url}: {why} (run the same command again to "
                                      f"resume)") from None
                self._emit("retrying", have, f"{why}; retrying")
                time.sleep(min(2 ** (failures - 1), 30))
        if self.total is not None and have != self.total:
            raise UpdateError(f"the server sent {have} bytes, more than the {self.total} it announced")
        os.replace(self.part, self.dest)
        self.meta_path.unlink(missing_ok=True)
        self._emit("done", have)
        return self.dest


class _Restart(Exception):
    pass


def fetch_bundle(url: str, updates_dir: Path, progress: ProgressCallback | None = None) -> Path:
    """Download ``url`` (http or https) into ``updates_dir``; returns the file."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise UpdateError(f"not an http(s) URL: {url}")
    updates_dir.mkdir(parents=True, exist_ok=True)
    return _Fetch(url, updates_dir / bundle_name(url), progress).run()
