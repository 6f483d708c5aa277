"""`thox backup create` and `thox backup restore`.

A backup is a tar stream, compressed with zstd and encrypted with age
(``agecrypt``): ``home/<path>`` for each regular file and directory of
THOX_HOME, then ``manifest.json`` (last) with the sha256, size and mode of
each file and the installed models (id, sha256, size, source). The GGUF files
of the models are left out unless asked for (``--with-models``); the list in
the manifest says what to pull again. Never in a backup: bundle downloads
(``updates/``), reboot requests, the root-owned ``system/`` (RAUC state and
ssh host keys of this box), ``lost+found``, interrupted model downloads and
temporary files.

Restore verifies before it touches anything: the whole stream is decrypted
into a staging directory inside THOX_HOME (same file system) and each file is
checked against the manifest; a wrong passphrase, a truncated or altered
file, or a member that is not a plain file or directory under ``home/`` (an
absolute path, ``..``, a link, a device) refuses the backup, and the staging
directory is removed. Then each file is renamed into place (atomic per
file), owned by THOX_HOME's owner (the work runs as that user).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import shutil
import stat
import subprocess
import tarfile
import time
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from . import __version__
from .config import atomic_write
from .agecrypt import Age, Secret, zstd, zstd_error
from .errors import BackupError, ThoxError
from .store import ModelStore
from .updates.rauc import os_release_version

FORMAT = "thox-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PREFIX = "home"
STAGING_PREFIX = ".restore-"
CHUNK = 1 << 20
# top-level names of THOX_HOME never backed up
SKIP_TOP = {"updates", "requests", "system", "lost+found"}
# names inside models/ never backed up (interrupted pulls, locks, half-done replaces)
SKIP_MODELS_PREFIX = (".partial", ".locks", ".staging-", ".old-", ".rm-")


def _skipped(rel: PurePosixPath, with_models: bool) -> bool:
    parts = rel.parts
    if parts[0] in SKIP_TOP or parts[0].startswith(STAGING_PREFIX):
        return True
    if parts[-1].startswith(".") and parts[-1].endswith(".tmp"):
        return True
    if parts[0] == "models" and len(parts) > 1:
        # without the models, none of their files: the backup manifest lists them
        return not with_models or parts[1].startswith(SKIP_MODELS_PREFIX)
    return False


def _models(home: Path) -> list[dict[str, Any]]:
    return [{"id": m.id, "sha256": m.sha256, "size": m.size, "kind": m.kind, "source": m.source}
            for m in ModelStore(home / "models").list()]


# --------------------------------------------------------------------------- create

class _HashingReader(io.RawIOBase):
    def __init__(self, f: BinaryIO):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.f.read(len(b))
        b[: len(data)] = data
        self.h.update(data)
        self.n += len(data)
        return len(data)


def _write_tar(home: Path, out: BinaryIO, with_models: bool) -> dict[str, Any]:
    files: dict[str, dict[str, Any]] = {}
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(home):
            base = Path(dirpath)
            for name in sorted(dirnames + filenames):
                path = base / name
                rel = PurePosixPath(path.relative_to(home).as_posix())
                if _skipped(rel, with_models):
                    if name in dirnames:
                        dirnames.remove(name)
                    continue
                st = path.lstat()
                if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                    continue         # links, sockets, fifos: not part of a backup
                info = tarfile.TarInfo(f"{PREFIX}/{rel}")
                info.mode, info.mtime = stat.S_IMODE(st.st_mode), int(st.st_mtime)
                if stat.S_ISDIR(st.st_mode):
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                    continue
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
                with os.fdopen(fd, "rb") as f:
                    info.size = os.fstat(fd).st_size
                    reader = _HashingReader(f)
                    tar.addfile(info, reader)
                if reader.n != info.size:
                    raise BackupError(f"{path} changed while it was backed up")
                files[str(rel)] = {"sha256": reader.h.hexdigest(), "size": info.size, "mode": info.mode}
        manifest = {"format": FORMAT, "version": FORMAT_VERSION,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "thox_version": __version__, "image_version": os_release_version(),
                    "with_models": with_models, "models": _models(home), "files": files}
        data = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size, info.mode, info.mtime = len(data), 0o600, int(time.time())
        tar.addfile(info, io.BytesIO(data))
    return manifest


def create(home: Path, out_fd: int, secret: Secret, with_models: bool) -> dict[str, Any]:
    """Write the encrypted backup of ``home`` to ``out_fd``; returns its manifest."""
    if not home.is_dir():
        raise BackupError(f"{home} does not exist: nothing to back up")
    comp = zstd(False, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    age = Age(secret, decrypt=False, stdin=comp.stdout, stdout=out_fd)
    comp.stdout.close()
    try:
        manifest = _write_tar(home, comp.stdin, with_models)
        comp.stdin.close()
    except BrokenPipeError:
        manifest = {}
    except BaseException:
        comp.kill()
        age.kill()
        age.close()
        raise
    finally:
        if not comp.stdin.closed:
            try:
                comp.stdin.close()
            except BrokenPipeError:
                pass
    z_err, a_err = zstd_error(comp), age.finish()
    if a_err:
        raise BackupError(f"age: {a_err}")
    if z_err or not manifest:
        raise BackupError(f"zstd: {z_err or 'stopped early'}")
    return manifest


# --------------------------------------------------------------------------- restore

def member_path(name: str) -> PurePosixPath | None:
    """The path under THOX_HOME of a ``home/...`` member; None for anything
    that could leave the tree (absolute, ``..``, empty parts)."""
    p = PurePosixPath(name)
    if p.is_absolute() or "\\" in name or not p.parts or p.parts[0] != PREFIX or len(p.parts) < 2:
        return None
    if any(part in ("..", ".", "") for part in p.parts) or "\0" in name:
        return None
    return PurePosixPath(*p.parts[1:])


def _extract(tar: tarfile.TarFile, staging: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    manifest: dict[str, Any] | None = None
    seen: dict[str, dict[str, Any]] = {}
    for m in tar:
        if m.name == MANIFEST and m.isfile():
            if m.size > 64 << 20:
                raise BackupError("the backup's manifest is too large")
            f = tar.extractfile(m)
            try:
                manifest = json.loads(f.read() if f else b"")
            except ValueError:
                raise BackupError("the backup's manifest is not JSON") from None
            continue
        rel = member_path(m.name)
        if rel is None:
            raise BackupError(f"the backup holds a member outside THOX_HOME ({m.name!r}): refused")
        if not (m.isfile() or m.isdir()):
            raise BackupError(f"the backup holds {m.name!r}, which is not a plain file or directory: refused")
        if manifest is not None:
            raise BackupError("the backup has members after its manifest: refused")
        target = staging / rel
        if m.isdir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        src = tar.extractfile(m)
        h = hashlib.sha256()
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, m.mode & 0o777 & ~0o022 | 0o400)
        with os.fdopen(fd, "wb") as out:
            while src is not None and (chunk := src.read(CHUNK)):
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        seen[str(rel)] = {"sha256": h.hexdigest(), "size": m.size}
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError("the backup ends without its manifest (a truncated or foreign file): refused")
    if not isinstance(manifest.get("version"), int) or manifest["version"] > FORMAT_VERSION:
        raise BackupError(f"the backup's format version {manifest.get('version')} is newer than this thox reads")
    return manifest, seen


def _verify(manifest: dict[str, Any], seen: dict[str, dict[str, Any]]) -> None:
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BackupError("the backup's manifest lists no files")
    if set(files) != set(seen):
        missing = sorted(set(files) - set(seen))[:3]
        extra = sorted(set(seen) - set(files))[:3]
        raise BackupError(f"the backup's files do not match its manifest (missing {missing}, unlisted {extra})")
    for rel, want in files.items():
        if not isinstance(want, dict) or want.get("sha256") != seen[rel]["sha256"]:
            raise BackupError(f"{rel} in the backup does not match its sha256: the file is damaged")


def unpack(backup_fd: int, secret: Secret, staging: Path) -> dict[str, Any]:
    """Decrypt, decompress and check the backup into ``staging`` (files under
    ``staging/home``, the manifest as ``staging/manifest.json``); returns the
    manifest. On any failure ``staging`` is removed and BackupError raised."""
    staging.mkdir(mode=0o700)
    (staging / PREFIX).mkdir(mode=0o700)
    age = Age(secret, decrypt=True, stdin=backup_fd, stdout=subprocess.PIPE)
    comp = zstd(True, stdin=age.proc.stdout, stdout=subprocess.PIPE)
    age.proc.stdout.close()
    error: str | None = None
    manifest: dict[str, Any] = {}
    try:
        try:
            with tarfile.open(fileobj=comp.stdout, mode="r|") as tar:
                manifest, seen = _extract(tar, staging / PREFIX)
            _verify(manifest, seen)
            atomic_write(staging / MANIFEST, json.dumps(manifest).encode(), 0o600)
        except (tarfile.TarError, EOFError) as e:
            error = f"the backup is damaged or truncated ({e})"
        except OSError as e:
            error = f"cannot unpack the backup: {e.strerror or e}"
        except BackupError as e:
            error = e.message
        if error:
            comp.kill()
            age.kill()
        a_err, z_err = age.finish(), zstd_error(comp)
        if a_err:
            error = f"cannot decrypt the backup: {a_err}"
        elif z_err and not error:
            error = f"the backup is damaged or truncated (zstd: {z_err})"
    except BaseException:
        comp.kill()
        age.kill()
        age.close()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if comp.stdout:
            comp.stdout.close()
    if error:
        shutil.rmtree(staging, ignore_errors=True)
        raise BackupError(error)
    return manifest


def swap_in(staging: Path, home: Path) -> dict[str, Any]:
    """Rename each file ``unpack`` left in ``staging`` over its place in
    ``home`` (atomic per file); removes ``staging``. Returns the manifest."""
    try:
        manifest = json.loads((staging / MANIFEST).read_text())
        for rel in sorted(manifest["files"]):
            if member_path(f"{PREFIX}/{rel}") is None:
                raise BackupError(f"refusing to restore {rel!r}: outside THOX_HOME")
            src, dst = staging / PREFIX / rel, home / rel
            parent = home
            for part in PurePosixPath(rel).parts[:-1]:
                parent = parent / part
                if parent.is_symlink() or (parent.exists() and not parent.is_dir()):
                    raise BackupError(f"{parent} is in the way (not a directory): the restore stopped there")
                parent.mkdir(exist_ok=True)
            if dst.is_dir() and not dst.is_symlink():
                raise BackupError(f"{dst} is a directory where the backup has a file: the restore stopped there")
            os.replace(src, dst)
        for d in {(home / rel).parent for rel in manifest["files"]} | {home}:
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def staging_dir(home: Path) -> Path:
    return home / f"{STAGING_PREFIX}{secrets.token_hex(6)}"


def model_report(home: Path, manifest: dict[str, Any]) -> list[str]:
    """Lines on the backup's models: present here, or how to get them back."""
    store = ModelStore(home / "models")
    lines = []
    for m in manifest.get("models") or []:
        mid, sha = str(m.get("id")), str(m.get("sha256"))
        try:
            here = store.get(mid).sha256 == sha
        except ThoxError:
            here = False
        if here:
            lines.append(f"  {mid:<24} present (sha256 {sha[:16]})")
        elif str(m.get("source", "")).startswith("pypi:"):
            lines.append(f"  {mid:<24} missing: thox models demo")
        elif str(m.get("source", "")).startswith("file://"):
            lines.append(f"  {mid:<24} missing: imported from a file; thox models import FILE --id {mid} "
                         f"--sha256 {sha}")
        else:
            lines.append(f"  {mid:<24} missing: thox models pull {mid} (sha256 {sha})")
    return lines
