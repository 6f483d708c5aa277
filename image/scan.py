"""What must not be in an image: the secret and per-device files (the app's one list,
thox.statefiles), private keys, and what a build leaves behind. The builder removes them
from the provisioned tree (clean_rootfs) and then scans the tree and the raw image for them."""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

from .common import BuildError, statefiles
from .context import Context
from .slot import FACTORY_HOME

# THOX_HOME as provisioned, and where an image keeps its contents (THOX_HOME's folder in the data
# partition's first contents, FACTORY_HOME): the app's secret files are looked for in both
HOMES = (statefiles.DEFAULT_HOME, "/" + FACTORY_HOME)

# what a build leaves behind that has no place in an image; the secret and per-device
# files are the app's list (statefiles.secret_paths), removed and scanned for as such
BUILD_LEFTOVERS = [
    "var/lib/apt/lists/*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb", "var/log/journal/*",
    "tmp/*", "var/tmp/*", "root/.bash_history", "root/.ansible", "root/.ansible_async", "root/.cache",
]
# the armour line followed by key material (programs such as ssh-keygen hold the bare armour line as a string)
PRIVATE_KEY_RE = re.compile(rb"-----BEGIN (?:OPENSSH |RSA |EC |DSA |ENCRYPTED )?PRIVATE KEY-----\r?\n"
                            rb"(?:[A-Za-z-]+: [^\n]*\n)*\r?\n?(?:[A-Za-z0-9+/=]{60,76}\r?\n){2,}")


def _rm(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def clean_rootfs(root: Path) -> None:
    """Remove the secret and per-device files, the package lists and caches; empty the logs
    (their files, owners and modes stay). /etc/machine-id stays as an empty file: systemd's
    first-boot marker, which makes a new id on the device."""
    for home in HOMES:
        for p in statefiles.secret_paths(root, home):
            _rm(p)
    for pattern in BUILD_LEFTOVERS:
        for p in glob.glob(str(root / pattern)):
            _rm(Path(p))
    for p in glob.glob(str(root / "var/log/**/*"), recursive=True):
        if os.path.isfile(p):
            open(p, "w").close()
    (root / "etc/machine-id").write_text("")


def scan_rootfs(root: Path) -> list[str]:
    """Everything secret or per-device found in a root directory (empty list: clean): the
    app's secret files and the host's per-device files (statefiles.leaked), and private-key
    blocks in any file that is not a program."""
    leaked = sorted({rel for home in HOMES for rel in statefiles.leaked(root, home)})
    problems = [f"{rel}: secret or per-device file" for rel in leaked]
    bad, _ = private_keys_in_tree(root)
    problems += [f"{p} holds a private key" for p in bad]
    return problems


def private_keys_in_tree(root: Path) -> tuple[list[str], set[bytes]]:
    """Files holding private-key blocks: (paths of non-ELF files, the blocks found inside ELF files).

    Programs and libraries carry public test vectors (e.g. libgnutls' self-tests): those are
    constants of the package, not secrets of a device, and are allowed."""
    p = subprocess.run(["grep", "-rlaZ", "--no-messages", "-E", "PRIVATE KEY-----", "."], cwd=root,
                       capture_output=True)
    bad, allowed = [], set()
    for name in filter(None, p.stdout.split(b"\0")):
        f = root / os.fsdecode(name)
        if f.is_symlink() or not f.is_file():
            continue
        data = f.read_bytes()
        found = [m.group(0) for m in PRIVATE_KEY_RE.finditer(data)]
        if not found:
            continue
        if data[:4] == b"\x7fELF":
            allowed.update(found)
        else:
            bad.append(os.fsdecode(name).removeprefix("./"))
    return sorted(bad), allowed


def scan_image(img: Path, allowed: set[bytes] = frozenset()) -> list[str]:
    """Private-key blocks anywhere in the raw image bytes (also catches remnants in free blocks);
    blocks that are constants inside programs of the root fs (allowed) are skipped."""
    hits = []
    overlap = 8192
    with open(img, "rb") as f:
        prev = b""
        off = 0
        while chunk := f.read(64 << 20):
            buf = prev + chunk
            for m in PRIVATE_KEY_RE.finditer(buf):
                if m.group(0) in allowed:
                    continue
                hits.append(f"private key block at byte {off - len(prev) + m.start()}")
            prev = buf[-overlap:]
            off += len(chunk)
    return sorted(set(hits))


def stage_verify(ctx: Context) -> str:
    problems = scan_rootfs(ctx.root)
    if problems:
        raise BuildError("secret or per-device data in the root file system: " + "; ".join(problems))
    return "no secrets, no per-device ids"
