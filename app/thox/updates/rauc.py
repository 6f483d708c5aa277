"""The `rauc` command line, as the CLI and the web page use it.

Every call runs ``rauc`` from PATH; a missing binary or a failing call is an
``UpdateError`` with one line (RAUC's own reason). The booted version is
``IMAGE_VERSION`` of /etc/os-release (``THOX_OS_RELEASE`` names another file);
the other slot's version is what RAUC recorded when it installed it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import UpdateError

OS_RELEASE = "/etc/os-release"
STATUS_TIMEOUT = 60
INSTALL_TIMEOUT = 3 * 3600

_PROGRESS = re.compile(r"^\s*(\d{1,3})% (.*)$")
_INFO = re.compile(r"^(rauc-Message: [\d:.]+: |\(rauc:\d+\): )")

InstallCallback = Callable[[int, str], None]


@dataclass
class Slot:
    name: str                     # rootfs.0
    bootname: str | None          # A
    device: str | None
    state: str | None             # booted | active | inactive
    good: bool | None             # RAUC's boot status: good, bad, or unknown (None)
    version: str | None           # bundle version RAUC installed there (None: not installed by RAUC)
    installed: str | None = None  # when RAUC installed it
    booted: bool = False
    primary: bool = False         # the slot the next boot tries first


@dataclass
class SystemStatus:
    compatible: str | None
    booted: str | None            # bootname of the booted slot
    booted_version: str | None    # IMAGE_VERSION of the running system
    slots: list[Slot] = field(default_factory=list)

    def other(self) -> Slot | None:
        """The root slot that is not booted."""
        return next((s for s in self.slots if not s.booted and s.bootname), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def os_release_version(path: str | None = None) -> str | None:
    """IMAGE_VERSION from os-release (quotes removed); None when absent."""
    p = Path(path or os.environ.get("THOX_OS_RELEASE") or OS_RELEASE)
    try:
        text = p.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "IMAGE_VERSION":
            return value.strip().strip("'\"") or None
    return None


def rauc_binary() -> str:
    path = shutil.which("rauc")
    if path is None:
        raise UpdateError("RAUC is not installed here (no `rauc` on PATH): firmware updates work on a Thox device")
    return path


def rauc_reason(output: str) -> str:
    """RAUC's reason for a failure, on one line: its ``LastError``, else its
    last line that is not an informational message."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("LastError:"):
            return ln.removeprefix("LastError:").strip()
    useful = [ln for ln in lines if not _INFO.match(ln) and not _PROGRESS.match(ln)
              and not re.match(r"^Installing `.*` failed$", ln)]
    return (useful or lines or ["rauc failed without a message"])[-1]


def _rauc(*args: str, timeout: float = STATUS_TIMEOUT) -> str:
    try:
        p = subprocess.run([rauc_binary(), *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UpdateError(f"`rauc {args[0]}` did not answer within {int(timeout)} s") from None
    if p.returncode != 0:
        raise UpdateError(f"rauc: {rauc_reason(p.stderr + p.stdout)}")
    return p.stdout


def _slot(name: str, d: dict[str, Any], booted: str | None, primary: str | None) -> Slot:
    st = d.get("slot_status") or {}
    bundle = st.get("bundle") or {}
    boot = d.get("boot_status")
    return Slot(name=name, bootname=d.get("bootname"), device=d.get("device"), state=d.get("state"),
                good=None if boot is None else boot == "good", version=bundle.get("version"),
                installed=(st.get("installed") or {}).get("timestamp"),
                booted=d.get("state") == "booted" or (booted is not None and d.get("bootname") == booted),
                primary=name == primary)


def parse_status(text: str, booted_version: str | None) -> SystemStatus:
    """``rauc status --detailed --output-format=json`` as a SystemStatus."""
    try:
        doc = json.loads(text)
        slots = [(name, d) for item in doc.get("slots") or [] for name, d in item.items()]
    except (ValueError, AttributeError, TypeError):
        raise UpdateError("rauc status printed something that is not its JSON status") from None
    booted, primary = doc.get("booted"), doc.get("boot_primary")
    out = SystemStatus(compatible=doc.get("compatible"), booted=booted, booted_version=booted_version)
    out.slots = sorted((_slot(n, d, booted, primary) for n, d in slots if isinstance(d, dict)),
                       key=lambda s: s.name)
    for s in out.slots:
        if s.booted and s.version is None:
            s.version = booted_version
    return out


def system_status() -> SystemStatus:
    return parse_status(_rauc("status", "--detailed", "--output-format=json"), os_release_version())


def bundle_info(path: Path) -> dict[str, Any]:
    """The manifest of a bundle (compatible, version), after RAUC checked its
    signature against the device keyring."""
    try:
        info = json.loads(_rauc("info", "--output-format=json", str(path)))
    except ValueError:
        raise UpdateError("rauc info printed something that is not JSON") from None
    return info if isinstance(info, dict) else {}


def install(path: Path, progress: InstallCallback | None = None) -> None:
    """``rauc install PATH``; ``progress(percent, step)`` for each step RAUC
    reports. A failure raises UpdateError with RAUC's reason."""
    proc = subprocess.Popen([rauc_binary(), "install", str(Path(path).resolve())], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    seen: list[str] = []
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            seen.append(line)
            m = _PROGRESS.match(line)
            if m and progress:
                progress(min(100, int(m.group(1))), m.group(2).strip())
        rc = proc.wait(timeout=INSTALL_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if rc != 0:
        raise UpdateError(f"rauc: {rauc_reason(''.join(seen))}")


def rollback() -> Slot:
    """Make the other slot the primary one, when RAUC has it marked good."""
    st = system_status()
    other = st.other()
    if other is None:
        raise UpdateError("RAUC reports no other root slot to roll back to")
    if not other.good:
        raise UpdateError(f"slot {other.bootname} is marked bad{' (version ' + other.version + ')' if other.version else ''}: "
                          f"there is nothing good to roll back to")
    _rauc("status", "mark-active", "other")
    return other
