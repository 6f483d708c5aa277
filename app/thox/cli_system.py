"""The `thox update`, `thox backup` and `thox factory-reset` commands.

These stay root when root runs them (the system part: RAUC, systemctl, the
ESP) and do their work under THOX_HOME as its owner (``privileges``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from .config import Config
from .errors import ThoxError
from .privileges import as_home_owner
from .ui import StepProgress, format_bytes


# -- update ------------------------------------------------------------------------
def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def cmd_update_install(a: argparse.Namespace) -> int:
    from .ui import progress_renderer
    from .updates import device, fetch, rauc
    rauc.rauc_binary()
    home = Config().home
    downloaded = _is_url(a.source)
    if downloaded:
        path = home / "updates" / fetch.bundle_name(a.source)
        as_home_owner(lambda: fetch.fetch_bundle(a.source, home / "updates", progress_renderer()) and None)
    else:
        path = Path(a.source)
        if not path.is_file():
            raise ThoxError(f"no such bundle file: {a.source}")
    info = rauc.bundle_info(path)
    print(f"bundle: {info.get('compatible')} version {info.get('version')} (signature verified by RAUC)")
    bar = StepProgress("install")
    try:
        rauc.install(path, bar)
    finally:
        bar.end()
        if downloaded:
            as_home_owner(lambda: path.unlink(missing_ok=True))
    other = _other_slot_text()
    print(f"installed version {info.get('version')}{other}; it becomes active at the next boot")
    if a.reboot:
        print(device.request_reboot())
    else:
        print("reboot to activate it (or run the install with --reboot)")
    return 0


def _other_slot_text() -> str:
    from .updates import rauc
    try:
        other = rauc.system_status().other()
    except ThoxError:
        return ""
    return f" into slot {other.bootname}" if other else ""


def cmd_update_status(a: argparse.Namespace) -> int:
    from .updates import rauc
    st = rauc.system_status()
    if a.json:
        print(json.dumps(st.to_dict(), indent=2))
        return 0
    print(f"booted:  slot {st.booted or '?'}, version {st.booted_version or 'unknown'}")
    for s in st.slots:
        flags = [f for f, on in (("booted", s.booted), ("primary (next boot)", s.primary)) if on]
        health = "good" if s.good else "bad" if s.good is False else "unknown"
        print(f"slot {s.bootname or '?'}  ({s.name})  version {s.version or 'unknown':<10} {health:<5}  "
              f"{', '.join(flags)}".rstrip())
    return 0


def cmd_update_rollback(a: argparse.Namespace) -> int:
    from .updates import rauc
    other = rauc.rollback()
    print(f"slot {other.bootname} (version {other.version or 'unknown'}) is now the primary slot: "
          f"a reboot activates it")
    config = Config().path
    snapshot = _changed_config_snapshot(config)
    if snapshot:
        print(f"the config changed since the last update was installed; the one from before it is kept in "
              f"{snapshot} (copy it over {config} to use it again)")
    return 0


def _changed_config_snapshot(config: Path) -> Path | None:
    """The pre-install config snapshot when it differs from ``config`` now (read only)."""
    from .updates import device
    snapshot = device.config_snapshot()
    if snapshot is None:
        return None
    try:
        before = snapshot.read_bytes()
    except OSError:
        return None
    try:
        now = config.read_bytes()
    except OSError:
        return snapshot
    try:
        return None if json.loads(before) == json.loads(now) else snapshot
    except ValueError:
        return None if before == now else snapshot


# -- backup --------------------------------------------------------------------------
def cmd_backup_create(a: argparse.Namespace) -> int:
    from . import backup
    from .agecrypt import secret_from_args
    secret = secret_from_args(a.passphrase_file, a.recipient, a.recipients_file, None, confirm=True)
    home = Config().home
    out = Path(a.file).absolute()
    if out.is_dir():
        raise ThoxError(f"{a.file} is a directory: name the backup file")
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        os.fchmod(fd, 0o600)
        as_home_owner(lambda: _print_created(backup.create(home, fd, secret, a.with_models)))
        os.fsync(fd)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    print(f"wrote {out} ({format_bytes(out.stat().st_size)}, mode 0600)")
    return 0


def _print_created(manifest: dict) -> None:
    files = manifest.get("files", {})
    models = manifest.get("models", [])
    print(f"backed up {len(files)} files ({format_bytes(sum(f['size'] for f in files.values()))}); "
          f"models {'included' if manifest.get('with_models') else 'listed, not included'}: "
          f"{', '.join(m['id'] for m in models) or 'none'}")


def cmd_backup_restore(a: argparse.Namespace) -> int:
    from . import backup
    from .agecrypt import secret_from_args
    from .updates import device
    if device.api_unit_installed() and os.geteuid() != 0:
        raise ThoxError("restoring on a device stops and starts thox-api.service: run it as root (sudo)")
    try:
        fd = os.open(a.file, os.O_RDONLY)
    except OSError as e:
        raise ThoxError(f"cannot open {a.file}: {e.strerror}") from None
    secret = secret_from_args(a.passphrase_file, None, None, a.identity, confirm=False)
    home = Config().home
    if not home.is_dir():
        raise ThoxError(f"{home} does not exist")
    staging = backup.staging_dir(home)
    try:
        as_home_owner(lambda: backup.unpack(fd, secret, staging) and None)
    finally:
        os.close(fd)
    print(f"backup verified: {a.file}")
    stopped = device.stop_api()
    if stopped:
        print("stopped thox-api.service")
    else:
        print("note: thox-api.service is not installed here (not a device): not stopping or starting it; "
              "restart `thox serve` yourself")
    try:
        as_home_owner(lambda: _finish_restore(staging, home))
    finally:
        if stopped:
            device.start_api()
            print("started thox-api.service")
    return 0


def _finish_restore(staging: Path, home: Path) -> None:
    from . import backup
    manifest = backup.swap_in(staging, home)
    print(f"restored {len(manifest['files'])} files into {home} (backup of {manifest.get('created')}, "
          f"thox {manifest.get('thox_version')}, image version {manifest.get('image_version') or 'unknown'})")
    lines = backup.model_report(home, manifest)
    if lines:
        print("models in the backup:")
        print("\n".join(lines))


# -- factory reset ------------------------------------------------------------------------
def cmd_factory_reset(a: argparse.Namespace) -> int:
    from .updates import device
    if not a.yes:
        if not sys.stdin.isatty():
            raise ThoxError("a factory reset erases the API key, admin password, settings and models: "
                            "add --yes to confirm")
        answer = input("This erases the API key, admin password, settings and models at the next boot. "
                       "Type 'reset' to confirm: ")
        if answer.strip() != "reset":
            raise ThoxError("not confirmed: nothing done")
    flag = device.write_factory_reset_flag()
    print(f"factory reset requested ({flag}): the next boot erases the data partition and starts afresh "
          f"(a new API key and admin password; the installed version stays)")
    if a.reboot:
        print(device.request_reboot())
    else:
        print("reboot to perform it (or run it with --reboot)")
    return 0


def add_parsers(sub) -> None:
    """The update, backup and factory-reset commands (``keep_root``: root runs them as root)."""
    u = sub.add_parser("update", help="firmware updates (RAUC): install, status, rollback")
    u.set_defaults(keep_root=True)
    us = u.add_subparsers(dest="sub", required=True, metavar="ACTION")
    s = us.add_parser("install", help="install a signed update bundle (.raucb) from a URL or a file",
                      description="A URL is downloaded into $THOX_HOME/updates first; its server must support "
                                  "HTTP range requests (an interrupted download resumes).")
    s.add_argument("source", metavar="URL|FILE")
    s.add_argument("--reboot", action="store_true", help="reboot into the new version after a successful install")
    s.set_defaults(func=cmd_update_install)
    s = us.add_parser("status", help="both root slots: versions, which is booted, which is good")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_update_status)
    s = us.add_parser("rollback", help="make the other slot primary (when it is good); a reboot activates it")
    s.set_defaults(func=cmd_update_rollback)

    b = sub.add_parser("backup", help="encrypted backups of THOX_HOME (age + zstd)")
    b.set_defaults(keep_root=True)
    bs = b.add_subparsers(dest="sub", required=True, metavar="ACTION")
    s = bs.add_parser("create", help="write an encrypted backup (key, settings, admin password, model list)",
                      description="Encrypted with a passphrase (--passphrase-file, else THOX_BACKUP_PASSPHRASE, "
                                  "else asked on the terminal) or to age recipients (-r/-R).")
    s.add_argument("file")
    s.add_argument("--with-models", action="store_true", help="include the model files (large)")
    s.add_argument("--passphrase-file", metavar="FILE", help="read the passphrase from the first line of FILE")
    s.add_argument("-r", "--recipient", action="append", metavar="RECIPIENT", help="encrypt to an age public key")
    s.add_argument("-R", "--recipients-file", metavar="FILE", help="encrypt to the age recipients in FILE")
    s.set_defaults(func=cmd_backup_create)
    s = bs.add_parser("restore", help="verify a backup, stop the API, restore, start the API",
                      description="Decrypts with --passphrase-file, else THOX_BACKUP_PASSPHRASE, else -i, "
                                  "else a passphrase asked on the terminal.")
    s.add_argument("file")
    s.add_argument("--passphrase-file", metavar="FILE")
    s.add_argument("-i", "--identity", metavar="FILE", help="decrypt with this age identity (key) file")
    s.set_defaults(func=cmd_backup_restore)

    s = sub.add_parser("factory-reset", help="erase the data partition at the next boot (a one-shot flag)")
    s.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    s.add_argument("--reboot", action="store_true", help="reboot now to perform it")
    s.set_defaults(func=cmd_factory_reset, keep_root=True)
