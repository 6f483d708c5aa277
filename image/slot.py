"""What goes into a root slot and into the data partition: the provisioned tree made into ext4
(mkfs.ext4 -d: no loop devices, no mounts) with the slot's version in /usr/lib/os-release and
optional files laid over it, and the factory data that the data partition is made from.

The provisioned tree is a cache shared by every version, so it is never changed here: a slot is
made from a tree of hard links to it (cp -al) in which the files that differ are replaced, not
written through."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .common import BuildError, pins, run, source_date_epoch

# a root slot's size: the same for both slots and for the file system in a bundle
SLOT_MIB = 2048
# the provisioned tree may fill at most 1/HEADROOM of a slot: later versions must still fit
HEADROOM = 1.6
# the data partition's mount point in a slot (empty there, root 0755); THOX_HOME is its folder
# HOME_NAME (the service user's, 0750), bind-mounted on HOME_MOUNT; root's device state is its
# folder system/ (root 0755), out of the service user's reach
DATA_MOUNT = "var/lib/thox-data"
HOME_MOUNT = "var/lib/thox"
HOME_NAME = "thox"
# where the data partition's first contents live (what it is made from), and THOX_HOME's there
FACTORY_DATA = "usr/lib/thox/factory-data"
FACTORY_HOME = f"{FACTORY_DATA}/{HOME_NAME}"
OS_RELEASE = "usr/lib/os-release"
IMAGE_ID = "thox"
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+~_-]{0,63}$")
# the file system UUIDs of a version's slot are derived from it: the same version gives the same ids
FS_NAMESPACE = uuid.UUID("6c1f6b1e-7a2d-4f0e-9d39-74686f780000")


def default_version() -> str:
    """THOX_VERSION in versions.env: the version of a build that names none."""
    return pins.VERSIONS["THOX_VERSION"]


def check_version(version: str) -> str:
    if not VERSION_RE.match(version):
        raise BuildError(f"version {version!r}: use letters, digits and . + ~ _ - (at most 64, no leading sign)")
    return version


def dir_size(root: Path) -> int:
    out = subprocess.run(["du", "-s", "-B1", "--apparent-size", "-x", str(root)], capture_output=True, text=True,
                         check=True).stdout
    return int(out.split()[0])


def move_factory_data(root: Path) -> None:
    """The provisioned contents of HOME_MOUNT move to FACTORY_HOME (owner and mode of the
    directory kept), those of DATA_MOUNT (if any) to FACTORY_DATA, a directory owned by root,
    0755; HOME_MOUNT and DATA_MOUNT stay as empty mount points (DATA_MOUNT owned by root, 0755)."""
    src, dst, data = root / HOME_MOUNT, root / FACTORY_DATA, root / DATA_MOUNT
    if not src.is_dir():
        return
    if dst.exists():
        shutil.rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    for d in (dst, data):
        d.mkdir(exist_ok=True)
        os.chown(d, 0, 0)
        os.chmod(d, 0o755)
    for entry in os.listdir(data):
        os.rename(data / entry, dst / entry)
    home = dst / HOME_NAME
    if home.exists():
        raise BuildError(f"/{DATA_MOUNT}/{HOME_NAME} in the provisioned tree: THOX_HOME is /{HOME_MOUNT}")
    home.mkdir()
    st = src.stat()
    os.chown(home, st.st_uid, st.st_gid)
    os.chmod(home, st.st_mode & 0o7777)
    for entry in os.listdir(src):
        os.rename(src / entry, home / entry)


def os_release(text: str, version: str) -> str:
    """os-release with IMAGE_ID and IMAGE_VERSION set to this image's (any earlier ones dropped)."""
    lines = [line for line in text.splitlines() if not line.startswith(("IMAGE_ID=", "IMAGE_VERSION="))]
    return "\n".join(lines + [f"IMAGE_ID={IMAGE_ID}", f"IMAGE_VERSION={version}"]) + "\n"


def _replace(path: Path, data: bytes) -> None:
    """A new file in place of path (a hard link into the cache is unlinked, never written through)."""
    st = path.stat()
    path.unlink()
    path.write_bytes(data)
    os.chown(path, st.st_uid, st.st_gid)
    os.chmod(path, st.st_mode & 0o7777)


def lay_over(overlay: Path, tree: Path) -> None:
    """Overlay's files copied into tree (owner, mode, links kept), each replacing a file of the
    same name; directories missing in tree are made like overlay's, existing ones left as they are."""
    for dirpath, dirnames, filenames in os.walk(overlay):
        rel = Path(dirpath).relative_to(overlay)
        for name in dirnames + filenames:
            src, dst = Path(dirpath) / name, tree / rel / name
            if name in dirnames and not src.is_symlink():
                if not dst.is_dir():
                    dst.mkdir()
                    shutil.copystat(src, dst)
                    os.chown(dst, src.stat().st_uid, src.stat().st_gid)
                continue
            if dst.is_dir() and not dst.is_symlink():
                shutil.rmtree(dst)
            elif os.path.lexists(dst):
                dst.unlink()
            shutil.copy2(src, dst, follow_symlinks=False)
            st = src.lstat()
            os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)


@contextmanager
def slot_tree(root: Path, version: str, overlay: Path | None = None) -> Iterator[Path]:
    """A tree of hard links to root with this version's os-release and overlay's files (copied
    over it, replacing files of the same name); removed when the block ends."""
    tree = root.with_name(root.name + ".slot")
    if tree.exists():
        shutil.rmtree(tree)
    run(["cp", "-al", str(root), str(tree)])
    try:
        rel = tree / OS_RELEASE
        _replace(rel, os_release(rel.read_text() if rel.exists() else "", version).encode())
        if overlay:
            if not overlay.is_dir():
                raise BuildError(f"overlay {overlay} is not a directory")
            lay_over(overlay, tree)
        yield tree
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def mkfs_ext4(src: Path, target: Path, size_mib: int, *, label: str, fs_uuid: str, offset_mib: int = 0,
              root_owner: tuple[int, int] = (0, 0), logfile: Path | None = None) -> None:
    """An ext4 file system of size_mib made from the directory src, at offset_mib in target
    (made when missing). Fixed UUID and hash seed; the build's time (SOURCE_DATE_EPOCH)."""
    epoch = source_date_epoch()
    env = {"E2FSPROGS_FAKE_TIME": str(epoch)} if epoch else {}
    if not target.exists():
        with open(target, "wb") as f:
            f.truncate((offset_mib + size_mib) << 20)
    run(["mkfs.ext4", "-q", "-F", "-L", label, "-U", fs_uuid, "-E",
         f"offset={offset_mib << 20},hash_seed={fs_uuid},root_owner={root_owner[0]}:{root_owner[1]}",
         "-d", str(src), str(target), f"{size_mib << 10}k"], env=env, logfile=logfile)


def slot_fs_uuid(version: str) -> str:
    return str(uuid.uuid5(FS_NAMESPACE, f"slot {version}"))


def make_slot_fs(root: Path, target: Path, version: str, *, offset_mib: int = 0, overlay: Path | None = None,
                 logfile: Path | None = None) -> int:
    """The root slot's ext4 (SLOT_MIB) from root, for this version; returns the bytes used.
    Refuses a tree larger than SLOT_MIB / HEADROOM."""
    check_version(version)
    used = dir_size(root)
    if used * HEADROOM > SLOT_MIB << 20:
        raise BuildError(f"the root file system uses {used >> 20} MiB: more than 1/{HEADROOM} of a "
                         f"{SLOT_MIB} MiB slot (raise SLOT_MIB in image/slot.py for new devices only)")
    with slot_tree(root, version, overlay) as tree:
        mkfs_ext4(tree, target, SLOT_MIB, label="thox-root", fs_uuid=slot_fs_uuid(version), offset_mib=offset_mib,
                  logfile=logfile)
    return used


def data_mib(root: Path) -> int:
    """The data partition's size in the image: the factory data with room to spare (it is
    grown to the disk at first boot)."""
    src = root / FACTORY_DATA
    used = dir_size(src) if src.is_dir() else 0
    return max(64, int(used * 1.25 / (1 << 20)) + 64)


def make_data_fs(root: Path, target: Path, size_mib: int, fs_uuid: str, *, offset_mib: int = 0,
                 logfile: Path | None = None) -> None:
    """The data partition's ext4 (label thox-data) from FACTORY_DATA: ownership kept (THOX_HOME's
    folder the service user's), its top directory with the owner and mode of the factory data's
    (root, 0755)."""
    src = root / FACTORY_DATA
    if not src.is_dir():
        raise BuildError(f"no {FACTORY_DATA} in the root file system (finalize moves /{HOME_MOUNT} there)")
    st = src.stat()
    mkfs_ext4(src, target, size_mib, label="thox-data", fs_uuid=fs_uuid, offset_mib=offset_mib,
              root_owner=(st.st_uid, st.st_gid), logfile=logfile)
    run(["debugfs", "-w", "-R", f"sif / mode 0{0o40000 | (st.st_mode & 0o7777):o}",
         f"{target}?offset={offset_mib << 20}"], logfile=logfile)
