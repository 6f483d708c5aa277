"""The system side of updates, restore and factory reset.

* The API unit: ``thox-api.service`` is stopped and started (systemctl, as
  root) around a restore when it is installed, that is when its unit file is
  in one of systemd's unit directories (``THOX_UNIT_DIRS``, colon-separated,
  names others); on a development machine there is none and nothing is done.
* Reboots: root runs ``systemctl reboot``; the service user writes the
  request file ``$THOX_HOME/requests/reboot``, which a root path unit
  (thox-reboot.path) turns into a reboot.
* Factory reset: the one-shot flag on the ESP that ``THOX_FACTORY_RESET_FLAG``
  of /etc/thox/updates.conf names (the updates role writes it; default
  ``/boot/efi/thox/factory-reset``; the environment variable of that name
  overrides both); at the next boot thox-factory-reset.service wipes the data
  partition and removes the flag.
* The config snapshot: RAUC's pre-install handler copies config.json to
  ``$THOX_SYSTEM_DIR/config-before-update.json`` (THOX_SYSTEM_DIR of
  updates.conf) before it writes a slot.
* ``THOX_UPDATES_CONF`` names another updates.conf (tests).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from ..config import atomic_write, thox_home
from ..errors import ThoxError

API_UNIT = "thox-api.service"
UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system",
             "/usr/lib/systemd/system", "/lib/systemd/system")
FACTORY_RESET_FLAG = "/boot/efi/thox/factory-reset"
UPDATES_CONF = "/etc/thox/updates.conf"
CONFIG_SNAPSHOT = "config-before-update.json"
REBOOT_REQUEST = Path("requests") / "reboot"


def api_unit_installed() -> bool:
    dirs = os.environ.get("THOX_UNIT_DIRS")
    return any((Path(d) / API_UNIT).exists() for d in (dirs.split(":") if dirs else UNIT_DIRS) if d)


def _systemctl(*args: str) -> None:
    exe = shutil.which("systemctl")
    if exe is None:
        raise ThoxError("systemctl is not installed: cannot " + " ".join(args))
    p = subprocess.run([exe, *args], capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        why = (p.stderr.strip() or p.stdout.strip() or f"exit {p.returncode}").splitlines()[-1]
        raise ThoxError(f"systemctl {' '.join(args)} failed: {why}")


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise ThoxError(f"{what} needs root: run it with sudo")


def stop_api() -> bool:
    """Stop the API service when it is installed; False (nothing done) on a dev machine."""
    if not api_unit_installed():
        return False
    require_root("stopping thox-api.service")
    _systemctl("stop", API_UNIT)
    return True


def start_api() -> None:
    _systemctl("start", API_UNIT)


def request_reboot(home: Path | None = None) -> str:
    """Reboot now (root) or ask the root path unit to (the service user).
    Returns what was done, for the user."""
    if os.geteuid() == 0:
        _systemctl("reboot")
        return "rebooting"
    return f"reboot requested ({write_reboot_request(home)})"


def write_reboot_request(home: Path | None = None) -> Path:
    """The request file thox-reboot.path acts on (never a reboot by itself)."""
    path = (home or thox_home()) / REBOOT_REQUEST
    atomic_write(path, f"{int(time.time())}\n".encode(), 0o644)
    return path


def updates_conf() -> dict[str, str]:
    """The KEY=VALUE lines of updates.conf ({} when there is none: not a Thox image)."""
    path = Path(os.environ.get("THOX_UPDATES_CONF") or UPDATES_CONF)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ThoxError(f"cannot read {path}: {e.strerror}") from None
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            out[key.strip()] = value.strip().strip("\"'")
    return out


def factory_reset_flag() -> Path:
    return Path(os.environ.get("THOX_FACTORY_RESET_FLAG") or updates_conf().get("THOX_FACTORY_RESET_FLAG")
                or FACTORY_RESET_FLAG)


def config_snapshot() -> Path | None:
    """Where the pre-install handler keeps the config from before the last install (None: not an image)."""
    sysdir = updates_conf().get("THOX_SYSTEM_DIR")
    return Path(sysdir) / CONFIG_SNAPSHOT if sysdir else None


def write_factory_reset_flag() -> Path:
    """Write the one-shot flag. Its directory (thox/ on the ESP) is made when the
    ESP is mounted without it (a Jetson's ESP comes from NVIDIA's flash tools)."""
    flag = factory_reset_flag()
    if not flag.parent.is_dir() and os.path.ismount(flag.parent.parent):
        try:
            flag.parent.mkdir(mode=0o755)
        except PermissionError:
            raise ThoxError(f"cannot write {flag}: a factory reset needs root (run it with sudo)") from None
        except OSError as e:
            raise ThoxError(f"cannot make {flag.parent}: {e.strerror}") from None
    if not flag.parent.is_dir():
        raise ThoxError(f"{flag.parent} does not exist: a factory reset works on a Thox device "
                        f"(its ESP mounted at /boot/efi)")
    if not os.access(flag.parent, os.W_OK):
        raise ThoxError(f"cannot write {flag}: a factory reset needs root (run it with sudo)")
    # the ESP is vfat: no chmod; the flag's presence is what counts
    atomic_write(flag, f"requested {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n".encode(), mode=None)
    return flag
