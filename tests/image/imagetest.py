"""Helpers of the image tests: the times file and the cold-cache build shared by a session.
(A module of its own: several test folders have a conftest.py, so `from conftest import`
would be ambiguous.)"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from image.common import cache_dir

REPO = Path(__file__).resolve().parents[2]
CACHE = cache_dir()
# what a cold cache starts with: the two compiled llama-cpp-python wheels (a compile takes
# 8-15 minutes each; everything else is downloaded by the build)
COMPILED_WHEELS = ("host", "portable")
TIMES_FILE = REPO / "build" / "image-e2e-times.json"


def record_times(**kv) -> None:
    TIMES_FILE.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(TIMES_FILE.read_text()) if TIMES_FILE.exists() else {}
    data.update(kv)
    TIMES_FILE.write_text(json.dumps(data, indent=1) + "\n")


@dataclass
class BuiltImage:
    image: Path          # <out>/thox-amd64.img
    out: Path            # IMAGE_OUT: manifest.json, thox-amd64.img.sha256, thox-amd64.files
    cache: Path          # the cold cache the build filled (rootfs-amd64 is the tree the image was packed from)
    seconds: float       # wall time of `make image`
    seeded: list[str]    # the files the cache held before the build


def mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(prefix)]
