"""The files of a pull under way or interrupted, and the per-model pull lock.

* ``models/.partial/<id>.gguf.part``: the bytes received so far;
* ``models/.partial/<id>.json``: what they are (URL, expected sha256, ETag,
  total) and, while a pull runs, its progress (done, rate, eta);
* ``models/.locks/<id>.lock``: an exclusive ``fcntl.flock`` held for a whole pull.

Lock and partial files are opened with ``O_NOFOLLOW`` relative to a directory
opened with ``O_NOFOLLOW``: a symlink planted there is refused, never followed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

from ..config import atomic_write
from ..errors import StoreError, ThoxError
from .store import ModelStore, validate_model_id

PARTIAL_DIR = ".partial"
LOCK_DIR = ".locks"


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


def nofollow_opener(path: str, flags: int) -> int:
    """An ``opener`` for ``open()`` built on ``open_nofollow``."""
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


def lock_held(store: ModelStore, model_id: str) -> bool:
    """Whether a pull of ``model_id`` holds its lock now."""
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


def read_meta(meta_path: Path) -> dict[str, Any]:
    """The description of a partial download; empty when missing or unreadable."""
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def write_meta(meta_path: Path, meta: dict[str, Any]) -> None:
    """Record ``meta`` (stamped ``updated``); progress bookkeeping only, so a
    failed write never fails the download."""
    meta["updated"] = int(time.time())
    try:
        atomic_write(meta_path, (json.dumps(meta, indent=1) + "\n").encode())
    except OSError:
        pass


def pull_status(store: ModelStore) -> list[dict[str, Any]]:
    """Pulls in progress or interrupted (resumable), for `thox models status`
    and the web page: ``{model, url, done, total, rate, eta, active, updated}``."""
    out: list[dict[str, Any]] = []
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
        active = lock_held(store, model_id)
        done = part.stat().st_size if part.exists() else 0
        out.append({
            "model": model_id, "url": meta.get("url", ""),
            "done": max(done, int(meta.get("done", 0))) if active else done,
            "total": meta.get("total"), "rate": meta.get("rate", 0.0) if active else 0.0,
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


__all__ = [
    "PARTIAL_DIR", "LOCK_DIR", "partial_paths", "lock_path", "open_nofollow", "nofollow_opener", "model_lock",
    "lock_held", "read_meta", "write_meta", "pull_status", "discard_partial",
]
