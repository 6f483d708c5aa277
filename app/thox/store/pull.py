"""Download models into the store: `thox models pull`.

``pull_model(store, name, mirror=...)`` fetches a catalog entry from
``mirror`` (callers pass the configured ``models.mirror``; without one, the
catalog's default host), or any URL with ``url=`` / ``--from``. Guarantees:

* **Resumable.** Bytes go to ``models/.partial/<id>.gguf.part`` next to a
  ``<id>.json`` describing the download (``thox.store.partial``). A dropped
  connection is retried with backoff inside one call, continuing with an HTTP
  ``Range`` request; a later call resumes the same partial file. A partial that
  was for another URL or checksum, or whose server copy changed, is discarded
  and the download starts over (``thox.store.download``).
* **Disk space** is checked against the server's Content-Length (or the
  catalog size) before the first byte is written; running out of space later
  keeps the partial so the pull can resume once space is freed.
* **Bounded.** A body without a Content-Length stops at the catalog size (for
  ``url=``: the free space); more bytes than that remove the partial and fail
  with ``too_large``. A catalog download whose length differs from the
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
* **One pull per model.** An exclusive lock on ``models/.locks/<id>.lock`` is
  held for the whole pull. A second pull of the same model **fails fast** with
  code ``pull_in_progress`` (HTTP 409) rather than waiting: the CLI tells the
  user, the web page shows the running pull's progress (``pull_status``).
  Pass ``wait_lock=True`` to block instead.

Every failure is a ``StoreError`` with a ``code``: ``unknown_model``,
``unpinned``, ``invalid_url``, ``invalid_sha256``, ``checksum_conflict``,
``pull_in_progress``, ``model_exists``, ``insufficient_storage``,
``network_error``, ``http_error``, ``bad_download``, ``checksum_mismatch``,
``io_error``, ``too_large``, ``size_mismatch``, ``insecure_redirect``,
``pin_mismatch``, ``pin_unverified``, ``unsafe_path``.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelBroken, StoreError, ThoxError
from ..ui import ProgressCallback, PullProgress
from .catalog import SHA256_RE, Catalog, load_catalog
from .download import (DEFAULT_BACKOFF, DEFAULT_RETRIES, DEFAULT_TIMEOUT, Download, backoff_delay, check_url,
                       http_open, is_transient, reason)
from .partial import discard_partial, model_lock, partial_paths, pull_status, read_meta, write_meta
from .store import Manifest, ModelStore, validate_model_id

# a refusal that means the server's copy is not the pinned file: nothing of it is kept
_DISCARD_CODES = ("pin_mismatch", "size_mismatch", "too_large", "insecure_redirect")


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


def _file_name_for_url(url: str, model_id: str) -> str:
    name = os.path.basename(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
    if name.endswith(".gguf") and not name.startswith(".") and "/" not in name:
        return name
    return f"{model_id}.gguf"


def _plan_url(name: str, url: str, sha256: str | None, allow_unpinned: bool) -> PullPlan:
    try:
        validate_model_id(name)
    except ThoxError as e:
        raise StoreError(e.message, code="invalid_model_id") from None
    check_url(url)
    if sha256 is None and not allow_unpinned:
        raise StoreError(f"pulling '{name}' from {url} needs --sha256 HEX (or --allow-unpinned to "
                         f"accept whatever arrives and record its hash)", code="unpinned")
    return PullPlan(model=name, url=url, file_name=_file_name_for_url(url, name), expected_sha256=sha256,
                    size_hint=None, source="url")


def plan_pull(name: str, *, url: str | None = None, sha256: str | None = None, allow_unpinned: bool = False,
              mirror: str | None = None, catalog: Catalog | None = None) -> PullPlan:
    """Resolve a name (or ``url``) into a PullPlan; raises the same errors as
    ``pull_model`` for unknown names, unpinned entries, bad URLs and hashes."""
    if sha256 is not None:
        sha256 = sha256.strip().lower()
        if not SHA256_RE.fullmatch(sha256):
            raise StoreError(f"invalid sha256 {sha256!r}: expected 64 hex digits", code="invalid_sha256")
    if url is not None:
        return _plan_url(name, url, sha256, allow_unpinned)
    entry = (catalog or load_catalog()).get(name)
    if sha256 and sha256 != entry.sha256:
        raise StoreError(f"--sha256 {sha256} conflicts with the catalog's pinned sha256 {entry.sha256} "
                         f"for '{name}'", code="checksum_conflict")
    if entry.source == "pypi":
        return PullPlan(model=name, url=None, file_name=entry.file, expected_sha256=entry.sha256,
                        size_hint=entry.size, source="pypi", catalog=entry.to_dict())
    return PullPlan(model=name, url=check_url(entry.url(mirror)), file_name=entry.file,
                    expected_sha256=entry.sha256, size_hint=entry.size, source="mirror",
                    catalog=entry.to_dict(mirror), metadata_url=check_url(entry.metadata_url(mirror)),
                    origin={"repo": entry.repo, "revision": entry.revision, "path": entry.path})


def pull_model(store: ModelStore, name: str, *, url: str | None = None, sha256: str | None = None,
               allow_unpinned: bool = False, mirror: str | None = None,
               progress: ProgressCallback | None = None, replace: bool = False,
               catalog: Catalog | None = None, retries: int = DEFAULT_RETRIES,
               backoff: float = DEFAULT_BACKOFF, timeout: float = DEFAULT_TIMEOUT,
               wait_lock: bool = False) -> Manifest:
    """Download ``name`` (a catalog name, or any id with ``url=``) into the
    store and return its manifest. Catalog entries come from ``mirror``
    (default: the catalog's host). If the model is already installed (with the
    expected hash, when one is known) its manifest is returned without
    downloading, unless ``replace``. See the module docstring for the rules."""
    plan = plan_pull(name, url=url, sha256=sha256, allow_unpinned=allow_unpinned, mirror=mirror,
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
            return _install_demo(store, plan, progress, replace)
        assert plan.url is not None
        return _pull_url(store, plan, progress=progress, replace=replace, retries=max(1, retries),
                         backoff=backoff, timeout=timeout)


def _install_demo(store: ModelStore, plan: PullPlan, progress: ProgressCallback | None, replace: bool) -> Manifest:
    from .demo import install_demo
    if progress:
        progress(PullProgress(plan.model, "connecting", message="installing from the PyPI wheel"))
    m = install_demo(store, replace=replace)
    if progress:
        progress(PullProgress(plan.model, "done", done=m.size, total=m.size))
    return m


# --------------------------------------------------------------------------- the pin

def _fetch_metadata(plan: PullPlan, *, retries: int, backoff: float, timeout: float) -> dict[str, Any]:
    """The host's JSON description of the pinned commit (retrying transient failures)."""
    assert plan.metadata_url is not None
    url, where = plan.metadata_url, f"{plan.origin['repo']} at commit {plan.origin['revision']}"
    for attempt in range(1, retries + 1):
        try:
            with http_open(url, 0, timeout) as resp:
                body = resp.read(16 << 20)
            break
        except urllib.error.HTTPError as e:
            e.close()
            if not is_transient(e.code):
                raise StoreError(f"cannot verify the pin of '{plan.model}': {url} answered HTTP {e.code} "
                                 f"(the mirror must describe {where})", code="pin_unverified", status=502) from None
            err = f"HTTP {e.code} {e.reason}"
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            err = reason(e)
        if attempt == retries:
            raise StoreError(f"cannot verify the pin of '{plan.model}': {url}: {err}", code="network_error",
                             status=502)
        time.sleep(backoff_delay(attempt, backoff))
    try:
        info = json.loads(body)
    except ValueError:
        info = None
    if not isinstance(info, dict):
        raise StoreError(f"cannot verify the pin of '{plan.model}': {url} did not answer JSON",
                         code="pin_unverified", status=502)
    return info


def declared_sha256(plan: PullPlan, info: dict[str, Any]) -> str:
    """The sha256 the host's description ``info`` declares for the pinned file;
    it must be the commit and the sha256 (and size) the catalog pins."""
    repo, rev, path = plan.origin["repo"], plan.origin["revision"], plan.origin["path"]
    where = f"{repo} at commit {rev}"
    if info.get("sha") != rev:
        raise StoreError(f"the host describes commit {info.get('sha')!r} of {repo}, not the pinned {rev}; "
                         f"refusing '{plan.model}'", code="pin_mismatch", status=502)
    files = [f for f in info.get("siblings") or [] if isinstance(f, dict) and f.get("rfilename") == path]
    lfs = files[0].get("lfs") if files else None
    if not isinstance(lfs, dict):
        lfs = {}
    declared = str(lfs.get("sha256") or lfs.get("oid") or "").lower().removeprefix("sha256:")
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


# --------------------------------------------------------------------------- download and install

def _resume_meta(plan: PullPlan, part: Path, meta_path: Path) -> dict[str, Any]:
    """The partial's description when it is for this URL and hash; otherwise
    a fresh one (and the partial bytes are dropped)."""
    part.parent.mkdir(parents=True, exist_ok=True)
    if part.parent.is_symlink():
        raise StoreError(f"refusing {part.parent}: it is a symlink, not a directory", code="unsafe_path")
    if part.is_symlink():
        part.unlink()   # never ours: the partial is always a plain file
    old = read_meta(meta_path)
    if old.get("url") == plan.url and old.get("expected_sha256") == plan.expected_sha256:
        return old
    part.unlink(missing_ok=True)
    return {"model": plan.model, "url": plan.url, "expected_sha256": plan.expected_sha256,
            "file": plan.file_name, "started": int(time.time())}


def _pull_url(store: ModelStore, plan: PullPlan, *, progress: ProgressCallback | None, replace: bool,
              retries: int, backoff: float, timeout: float) -> Manifest:
    assert plan.url is not None
    part, meta_path = partial_paths(store, plan.model)
    meta = _resume_meta(plan, part, meta_path)
    if plan.metadata_url:
        if progress:
            progress(PullProgress(plan.model, "connecting", url=plan.metadata_url,
                                  message=f"checking {plan.origin['repo']}@{plan.origin['revision'][:12]} "
                                          f"against the host's LFS metadata"))
        info = _fetch_metadata(plan, retries=retries, backoff=backoff, timeout=timeout)
        plan.origin["lfs_sha256"] = declared_sha256(plan, info)
    meta["pid"] = os.getpid()
    write_meta(meta_path, meta)
    download = Download(store, plan.model, plan.url, part, meta_path, meta, size_hint=plan.size_hint,
                        exact_size=plan.source == "mirror", expected_sha256=plan.expected_sha256,
                        progress=progress, timeout=timeout)
    try:
        digest, size = download.run(retries, backoff)
    except StoreError as e:
        if e.code in _DISCARD_CODES:
            part.unlink(missing_ok=True)
            meta_path.unlink(missing_ok=True)
        raise
    if progress:
        progress(PullProgress(plan.model, "verifying", done=size, total=size, url=plan.url,
                              message=f"verifying sha256 {digest[:16]}… and installing"))
    manifest = _install(store, plan, part, meta_path, digest, replace)
    if progress:
        progress(PullProgress(plan.model, "done", done=manifest.size, total=manifest.size, url=plan.url,
                              message=f"sha256 {manifest.sha256}" + ("" if plan.expected_sha256 else
                                                                     " (unpinned: recorded)")))
    return manifest


def _install(store: ModelStore, plan: PullPlan, part: Path, meta_path: Path, digest: str,
             replace: bool) -> Manifest:
    assert plan.url is not None
    try:
        return store.install_file(plan.model, part, sha256=digest, expected_sha256=plan.expected_sha256,
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


__all__ = [
    "PullPlan", "plan_pull", "pull_model", "declared_sha256", "pull_status", "discard_partial",
]
