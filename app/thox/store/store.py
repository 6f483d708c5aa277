"""Installed models.

Each model lives in its own directory ``$THOX_HOME/models/<id>/`` holding the
GGUF file and ``manifest.json``. A model becomes visible only when its
directory is renamed into place, after the file's sha256 has been checked, so
nothing half-installed is ever listed or served.

Replacing an installed model keeps one whole model through a crash at any point:

1. the new model is assembled, manifest last, in ``.staging-<id>-<random>/``;
2. the installed directory is renamed to ``.old-<id>``;
3. the staging directory is renamed to ``<id>``;
4. ``.old-<id>`` is deleted.

``recover()`` (run at service start, and before touching a model) finishes or
undoes an interrupted replace: a whole ``<id>`` wins and its ``.old-<id>`` is
deleted; otherwise ``.old-<id>`` is renamed back to ``<id>``. Staging
directories never hold the only copy of a model, so they are deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..config import atomic_write
from ..errors import InvalidRequest, ModelBroken, ModelNotFound, StoreError
from .gguf_meta import describe, read_metadata

OLD_PREFIX, STAGING_PREFIX, TRASH_PREFIX = ".old-", ".staging-", ".rm-"
MODEL_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")   # used with fullmatch: no trailing newline
CHUNK = 1 << 20
FREE_SPACE_MARGIN = 64 << 20   # bytes a write must leave free on the store's disk


def validate_model_id(model_id: str) -> str:
    if not isinstance(model_id, str) or not MODEL_ID_RE.fullmatch(model_id) or ".." in model_id:
        raise InvalidRequest(f"invalid model id {model_id!r}: use letters, digits, '.', '_', ':' and '-'",
                             param="model")
    return model_id


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest()


@dataclass
class Manifest:
    id: str
    file: str
    sha256: str
    size: int
    kind: str = "chat"            # chat | embedding
    architecture: str = "unknown"
    context_length: int | None = None
    chat_template: bool = False
    fim: bool = False
    source: str = ""
    origin: dict[str, str] = field(default_factory=dict)   # where a pinned download came from, as verified
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


def _read_manifest(d: Path, model_id: str) -> Manifest:
    try:
        data = json.loads((d / "manifest.json").read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return Manifest.from_dict(data)
    except (ValueError, TypeError) as e:
        raise ModelBroken(f"model '{model_id}' has a corrupt manifest: {e}") from None


def _whole(d: Path) -> bool:
    """A model directory with a readable manifest and its GGUF file at the recorded size."""
    try:
        m = _read_manifest(d, d.name)
        f = d / m.file
        return not f.is_symlink() and f.is_file() and f.stat().st_size == m.size
    except (OSError, ModelBroken):
        return False


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ModelStore:
    def __init__(self, root: Path | str):
        self.root = Path(root)

    # -- reading ---------------------------------------------------------
    def _dir(self, model_id: str) -> Path:
        return self.root / validate_model_id(model_id)

    def get(self, model_id: str) -> Manifest:
        try:
            d = self._dir(model_id)
        except InvalidRequest:
            raise ModelNotFound(f"The model '{model_id}' does not exist", param="model") from None
        try:
            return _read_manifest(d, model_id)
        except FileNotFoundError:
            if not os.path.lexists(self._old_dir(model_id)):
                raise ModelNotFound(f"The model '{model_id}' does not exist", param="model") from None
        self.recover(model_id)   # an interrupted replace left the model at .old-<id>
        try:
            return _read_manifest(d, model_id)
        except FileNotFoundError:
            raise ModelNotFound(f"The model '{model_id}' does not exist", param="model") from None

    def has(self, model_id: str) -> bool:
        try:
            self.get(model_id)
            return True
        except (ModelNotFound, ModelBroken):
            return False

    def path(self, model_id: str) -> Path:
        m = self.get(model_id)
        return self._dir(model_id) / m.file

    def list(self) -> list[Manifest]:
        out = []
        if not self.root.is_dir():
            return out
        for d in sorted(self.root.iterdir()):
            if d.name.startswith(".") or not (d / "manifest.json").is_file():
                continue
            try:
                out.append(self.get(d.name))
            except (ModelNotFound, ModelBroken, InvalidRequest):
                continue
        return out

    def verify(self, model_id: str) -> bool:
        m = self.get(model_id)
        return sha256_file(self._dir(model_id) / m.file) == m.sha256

    # -- writing ---------------------------------------------------------
    def staging_dir(self, model_id: str) -> Path:
        """A private directory on the same filesystem to assemble a model in."""
        validate_model_id(model_id)
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{model_id}-", dir=self.root))

    def install_file(self, model_id: str, staged_file: Path, *, sha256: str | None = None,
                     expected_sha256: str | None = None, source: str = "", replace: bool = False,
                     file_name: str | None = None, origin: dict[str, str] | None = None) -> Manifest:
        """Move ``staged_file`` (already on the store's filesystem) into place as
        ``model_id``. Checks it is a readable GGUF and its sha256 (computed when
        not given) against ``expected_sha256``. On any failure the staged file is
        removed and nothing becomes visible."""
        validate_model_id(model_id)
        staged_file = Path(staged_file)
        stage = None
        try:
            if not replace and self.has(model_id):
                raise StoreError(f"model '{model_id}' is already installed (remove it first: "
                                 f"thox models rm {model_id})", code="model_exists")
            digest = sha256 or sha256_file(staged_file)
            if expected_sha256 and digest.lower() != expected_sha256.lower():
                raise StoreError(f"sha256 mismatch for '{model_id}': expected {expected_sha256.lower()}, "
                                 f"got {digest}; the download is corrupt and was discarded",
                                 code="checksum_mismatch")
            meta = read_metadata(staged_file)
            caps = describe(meta)
            name = file_name or (staged_file.name if staged_file.suffix == ".gguf" else f"{model_id}.gguf")
            stage = self.staging_dir(model_id)
            os.replace(staged_file, stage / name)
            manifest = Manifest(id=model_id, file=name, sha256=digest, size=(stage / name).stat().st_size,
                                kind=caps["kind"], architecture=caps["architecture"],
                                context_length=caps["context_length"], chat_template=caps["chat_template"],
                                fim=caps["fim"], source=source, origin=dict(origin or {}))
            atomic_write(stage / "manifest.json", (json.dumps(asdict(manifest), indent=2) + "\n").encode())
            self._swap_in(model_id, stage)
            stage = None
            return manifest
        finally:
            if staged_file.exists():
                staged_file.unlink(missing_ok=True)
            if stage is not None:
                shutil.rmtree(stage, ignore_errors=True)

    def import_file(self, src: Path | str, model_id: str, *, expected_sha256: str | None = None,
                    replace: bool = False) -> Manifest:
        """Copy a GGUF from anywhere into the store."""
        src = Path(src)
        validate_model_id(model_id)
        if not src.is_file():
            raise StoreError(f"no such file: {src}", code="file_not_found")
        read_metadata(src)  # refuse non-GGUF before copying gigabytes
        if not replace and self.has(model_id):
            raise StoreError(f"model '{model_id}' is already installed (remove it first: "
                             f"thox models rm {model_id})", code="model_exists")
        self.check_free_space(src.stat().st_size)
        stage = self.staging_dir(model_id)
        try:
            tmp = stage / src.name
            h = hashlib.sha256()
            with open(src, "rb") as fi, open(tmp, "wb") as fo:
                while chunk := fi.read(CHUNK):
                    h.update(chunk)
                    fo.write(chunk)
                fo.flush()
                os.fsync(fo.fileno())
            name = src.name if src.suffix == ".gguf" else f"{model_id}.gguf"
            return self.install_file(model_id, tmp, sha256=h.hexdigest(), expected_sha256=expected_sha256,
                                     source=f"file://{src.resolve()}", replace=replace, file_name=name)
        except OSError as e:
            raise StoreError(f"cannot import {src}: {e.strerror or e}", code="io_error") from None
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def _old_dir(self, model_id: str) -> Path:
        return self.root / f"{OLD_PREFIX}{validate_model_id(model_id)}"

    def _swap_in(self, model_id: str, stage: Path) -> None:
        """Put the whole model in ``stage`` in place of ``model_id`` (steps 2-4 above)."""
        final, old = self._dir(model_id), self._old_dir(model_id)
        self.recover(model_id)
        if os.path.lexists(final):
            os.replace(final, old)
            _fsync_dir(self.root)
        os.replace(stage, final)
        _fsync_dir(self.root)
        if os.path.lexists(old):
            _trash(old, self.root)

    def recover(self, model_id: str | None = None) -> None:
        """Finish or undo interrupted replaces (of ``model_id``, or of every model)."""
        if not self.root.is_dir():
            return
        olds = [self._old_dir(model_id)] if model_id else \
            [p for p in self.root.iterdir() if p.name.startswith(OLD_PREFIX)]
        for old in olds:
            if not os.path.lexists(old):
                continue
            name = old.name[len(OLD_PREFIX):]
            try:
                final = self._dir(name)
            except InvalidRequest:
                _trash(old, self.root)
                continue
            if _whole(final):
                _trash(old, self.root)      # step 3 happened: the new model is in place
                continue
            if os.path.lexists(final):      # not whole (damaged since): keep whichever copy is whole
                if not _whole(old):
                    _trash(old, self.root)
                    continue
                _trash(final, self.root)
            os.replace(old, final)          # step 3 never happened: the old model comes back
            _fsync_dir(self.root)

    def remove(self, model_id: str) -> None:
        self.get(model_id)
        d = self._dir(model_id)
        trash = Path(tempfile.mkdtemp(prefix=f"{TRASH_PREFIX}{model_id}-", dir=self.root))
        os.replace(d, trash / "m")
        shutil.rmtree(trash, ignore_errors=True)

    def check_free_space(self, need: int, margin: int = FREE_SPACE_MARGIN) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.root).free
        if free < need + margin:
            raise StoreError(f"not enough disk space in {self.root}: need {need + margin} bytes, "
                             f"{free} free", code="insufficient_storage")

    def cleanup_staging(self) -> None:
        """At service start: finish or undo interrupted replaces (``recover``),
        then delete staging and trash directories, which never hold the only
        copy of a model."""
        if not self.root.is_dir():
            return
        self.recover()
        for d in self.root.iterdir():
            if d.name.startswith((STAGING_PREFIX, TRASH_PREFIX)) and d.is_dir() and not d.is_symlink():
                shutil.rmtree(d, ignore_errors=True)


def _trash(p: Path, root: Path) -> None:
    """Delete a directory (or stray file) by renaming it into a trash directory first."""
    if p.is_dir() and not p.is_symlink():
        trash = Path(tempfile.mkdtemp(prefix=TRASH_PREFIX, dir=root))
        os.replace(p, trash / "m")
        shutil.rmtree(trash, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)
