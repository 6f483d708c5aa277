"""Installed models.

Each model lives in its own directory ``$THOX_HOME/models/<id>/`` holding the
GGUF file and ``manifest.json``. A model becomes visible only when its
directory is renamed into place, after the file's sha256 has been checked, so
nothing half-installed is ever listed or served.
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
from . import gguf_meta

MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
CHUNK = 1 << 20


def validate_model_id(model_id: str) -> str:
    if not isinstance(model_id, str) or not MODEL_ID_RE.match(model_id) or ".." in model_id:
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
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


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
            m = Manifest.from_dict(json.loads((d / "manifest.json").read_text()))
        except FileNotFoundError:
            raise ModelNotFound(f"The model '{model_id}' does not exist", param="model") from None
        except (ValueError, TypeError) as e:
            raise ModelBroken(f"model '{model_id}' has a corrupt manifest: {e}") from None
        return m

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
        return Path(tempfile.mkdtemp(prefix=f".staging-{model_id}-", dir=self.root))

    def install_file(self, model_id: str, staged_file: Path, *, sha256: str | None = None,
                     expected_sha256: str | None = None, source: str = "", replace: bool = False,
                     file_name: str | None = None) -> Manifest:
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
            meta = gguf_meta.read_metadata(staged_file)
            caps = gguf_meta.describe(meta)
            name = file_name or (staged_file.name if staged_file.suffix == ".gguf" else f"{model_id}.gguf")
            stage = self.staging_dir(model_id)
            os.replace(staged_file, stage / name)
            manifest = Manifest(id=model_id, file=name, sha256=digest, size=(stage / name).stat().st_size,
                                kind=caps["kind"], architecture=caps["architecture"],
                                context_length=caps["context_length"], chat_template=caps["chat_template"],
                                fim=caps["fim"], source=source)
            atomic_write(stage / "manifest.json", (json.dumps(asdict(manifest), indent=2) + "\n").encode())
            final = self._dir(model_id)
            if final.exists():
                old = Path(tempfile.mkdtemp(prefix=f".old-{model_id}-", dir=self.root))
                os.replace(final, old / "m")
                os.replace(stage, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(stage, final)
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
        gguf_meta.read_metadata(src)  # refuse non-GGUF before copying gigabytes
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

    def remove(self, model_id: str) -> None:
        self.get(model_id)
        d = self._dir(model_id)
        trash = Path(tempfile.mkdtemp(prefix=f".rm-{model_id}-", dir=self.root))
        os.replace(d, trash / "m")
        shutil.rmtree(trash, ignore_errors=True)

    def check_free_space(self, need: int, margin: int = 64 << 20) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.root).free
        if free < need + margin:
            raise StoreError(f"not enough disk space in {self.root}: need {need + margin} bytes, "
                             f"{free} free", code="insufficient_storage")

    def cleanup_staging(self) -> None:
        """Remove leftovers of interrupted installs (called at service start)."""
        if not self.root.is_dir():
            return
        for d in self.root.iterdir():
            if d.name.startswith((".staging-", ".old-", ".rm-")) and d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
