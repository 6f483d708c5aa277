"""The device admin password for the web page.

* ``ensure_admin_password(cfg)`` (called by ``thox firstboot``) creates it
  once: 20 random characters from an unambiguous alphabet in 4 groups of 5
  (about 99 bits), written to ``$THOX_HOME/admin-password.txt`` (0600: the
  owner of THOX_HOME and root only) and printed on the console, and stored **hashed** in
  ``$THOX_HOME/admin.json`` (0600): scrypt (N=2^15, r=8, p=1, 16-byte random
  salt, 32-byte hash) with ``must_change: true``.
* The owner must change it on first sign-in (``set_password``); the change
  clears ``must_change`` and deletes ``admin-password.txt``.
* ``reset_admin_password(cfg)`` makes a fresh one-time password, again
  with ``must_change`` (``thox admin-password reset`` on the console). The
  web page signs out every session that signed in with an older password.

Every write is atomic (``config.atomic_write``) with mode 0600.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from pathlib import Path
from typing import Any

from ..config import Config, atomic_write
from ..statefiles import ADMIN_FILE, ADMIN_PASSWORD_FILE

ALPHABET = "23456789abcdefghjkmnpqrstuvwxyz"   # no 0/o, 1/l/i: easy to read off a console
GROUPS, GROUP_LEN = 4, 5
SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_DKLEN = 1 << 15, 8, 1, 32
SCRYPT_MAXMEM = 128 * 1024 * 1024
MIN_LENGTH = 10
MAX_LENGTH = 1024


class PasswordPolicyError(ValueError):
    """The new password is not acceptable; the message says why."""


def admin_path(cfg: Config) -> Path:
    return cfg.home / ADMIN_FILE


def password_file(cfg: Config) -> Path:
    return cfg.home / ADMIN_PASSWORD_FILE


def generate_password() -> str:
    return "-".join("".join(secrets.choice(ALPHABET) for _ in range(GROUP_LEN)) for _ in range(GROUPS))


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=dklen,
                          maxmem=SCRYPT_MAXMEM)


def hash_password(password: str) -> dict[str, Any]:
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_DKLEN)
    return {"algorithm": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P,
            "salt": salt.hex(), "hash": digest.hex()}


def load(cfg: Config) -> dict[str, Any] | None:
    try:
        data = json.loads(admin_path(cfg).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("password"), dict) else None


def _save(cfg: Config, data: dict[str, Any]) -> None:
    atomic_write(admin_path(cfg), (json.dumps(data, indent=2) + "\n").encode(), 0o600)


def check_password(cfg: Config, password: str) -> bool:
    """Constant-time check of ``password`` against admin.json (slow: scrypt)."""
    data = load(cfg)
    if not isinstance(password, str) or len(password) > MAX_LENGTH:
        password = ""
    if data is None:
        # same cost as a real check, so timing does not tell whether one is set
        _scrypt(password, b"\0" * 16, SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_DKLEN)
        return False
    h = data["password"]
    try:
        n, r, p = int(h["n"]), int(h["r"]), int(h["p"])
        salt, want = bytes.fromhex(h["salt"]), bytes.fromhex(h["hash"])
        if h.get("algorithm") != "scrypt" or n > (1 << 20) or r > 32 or p > 16:
            return False
        got = _scrypt(password, salt, n, r, p, len(want))
    except (KeyError, ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


def must_change(cfg: Config) -> bool:
    data = load(cfg)
    return bool(data and data.get("must_change"))


def check_policy(new: str, confirm: str, current: str | None = None) -> None:
    if new != confirm:
        raise PasswordPolicyError("The two new passwords do not match.")
    if len(new) < MIN_LENGTH:
        raise PasswordPolicyError(f"Use at least {MIN_LENGTH} characters.")
    if len(new) > MAX_LENGTH:
        raise PasswordPolicyError(f"Use at most {MAX_LENGTH} characters.")
    if new.strip() != new or not new.strip():
        raise PasswordPolicyError("The password must not start or end with spaces.")
    if current is not None and hmac.compare_digest(new.encode(), current.encode()):
        raise PasswordPolicyError("Choose a password different from the current one.")
    if len(set(new)) < 4:
        raise PasswordPolicyError("That password is too easy to guess.")


def set_password(cfg: Config, new: str, must_change: bool = False) -> None:
    """Store ``new`` (hashed); a normal change also deletes the one-time file."""
    _save(cfg, {"version": 1, "password": hash_password(new), "must_change": bool(must_change),
                "changed": int(time.time())})
    if not must_change:
        password_file(cfg).unlink(missing_ok=True)


def _create(cfg: Config) -> str:
    password = generate_password()
    atomic_write(password_file(cfg), (password + "\n").encode(), 0o600)
    set_password(cfg, password, must_change=True)
    return password


def ensure_admin_password(cfg: Config, echo: bool = True) -> bool:
    """Create the admin password when there is none; True when it did.
    Idempotent: an existing admin.json is never touched."""
    if admin_path(cfg).exists():
        return False
    password = _create(cfg)
    if echo:
        print(f"web admin password (sign in at http://thox.local, change it there): {password}", flush=True)
    return True


def reset_admin_password(cfg: Config) -> str:
    """A fresh one-time password (must be changed at the next sign-in)."""
    return _create(cfg)
