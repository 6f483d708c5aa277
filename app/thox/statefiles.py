"""The one list of secret and per-device files.

The app writes its secrets under ``THOX_HOME`` with the names in
``SECRET_FILES``; ``config`` and ``web.admin`` take their file names from
here, and the image builder removes and scans for exactly these names (plus
the temporary files an interrupted atomic write can leave, ``SECRET_TEMP_GLOBS``).

``HOST_SECRET_GLOBS`` are per-device files of the operating system, relative
to the root of a file system; an image must hold each of them absent or
empty (``etc/machine-id`` stays as an empty file: systemd's first-boot marker).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

DEFAULT_HOME = "/var/lib/thox"

API_KEY_FILE = "api_key"                 # the API key, 64 hex characters, 0600
ADMIN_FILE = "admin.json"                # the web admin password, scrypt-hashed, 0600
ADMIN_PASSWORD_FILE = "admin-password.txt"  # the one-time admin password in clear, 0600

SECRET_FILES: tuple[str, ...] = (API_KEY_FILE, ADMIN_FILE, ADMIN_PASSWORD_FILE)

# what `thox firstboot` makes, each piece on its own; first boot is done when all exist
# (thox-firstboot.service, ansible/roles/thox_api/templates, runs while any one is missing)
FIRSTBOOT_FILES: tuple[str, ...] = (API_KEY_FILE, ADMIN_FILE)

# config.atomic_write's temporary name: ".<name>.<random>.tmp" next to the target
SECRET_TEMP_GLOBS: tuple[str, ...] = tuple(f".{name}.*.tmp" for name in SECRET_FILES)

HOST_SECRET_GLOBS: tuple[str, ...] = (
    "etc/ssh/ssh_host_*key*",
    "etc/machine-id",
    "var/lib/dbus/machine-id",
    "var/lib/systemd/random-seed",
    "var/lib/systemd/credential.secret",
    "etc/ssl/private/*.key",
    "etc/ssl/certs/ssl-cert-snakeoil.pem",
    "root/.ssh/authorized_keys",
    "home/*/.ssh/authorized_keys",
)


def home_in(root: Path, home: str = DEFAULT_HOME) -> Path:
    """THOX_HOME inside a root file system (an image tree)."""
    return Path(root) / home.lstrip("/")


def secret_paths(root: Path, home: str = DEFAULT_HOME) -> list[Path]:
    """Every path under ``root`` named by the lists above that exists (files, links)."""
    found: list[Path] = []
    state = home_in(root, home)
    for pattern in SECRET_FILES + SECRET_TEMP_GLOBS:
        found += [Path(p) for p in glob.glob(glob.escape(str(state)) + "/" + pattern, include_hidden=True)]
    for pattern in HOST_SECRET_GLOBS:
        found += [Path(p) for p in glob.glob(glob.escape(str(root)) + "/" + pattern)]
    return sorted(set(p for p in found if os.path.lexists(p)))


def leaked(root: Path, home: str = DEFAULT_HOME) -> list[str]:
    """Paths (relative to ``root``) that an image must not hold: a secret file
    that exists, or a host file that is not empty. Empty list: clean."""
    out: list[str] = []
    for p in secret_paths(root, home):
        rel = str(p.relative_to(root))
        if any(p.match(g) for g in HOST_SECRET_GLOBS) and not p.is_symlink() and p.is_file() \
                and p.stat().st_size == 0:
            continue
        if p.is_symlink() and any(p.match(g) for g in HOST_SECRET_GLOBS):
            continue   # var/lib/dbus/machine-id -> /etc/machine-id
        out.append(rel)
    return out
