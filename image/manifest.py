"""The bill of materials of an image (manifest.json) and the list of its files: what the
build was made from, and what the root file system holds."""
from __future__ import annotations

import glob
import json
import os
import re
import stat
from pathlib import Path

from .aptmirror import image_mirrors
from .common import git, pins, sha256_file, source_date_epoch
from .context import Context
from .slot import FACTORY_HOME, HOME_MOUNT

# written into the image by the builder: the package lists' dates (and the base's, by mmdebstrap)
RECORDS = "var/lib/thox-image"
# written by the image role: the user thox-ssh-import gives the key to (THOX_SSH_USER)
IMAGE_CONF = "etc/thox/image.conf"


def record_package_lists(root: Path) -> None:
    """Origin, suite, codename and date of every package list the tree was built from, into
    RECORDS/apt-lists.json (the lists themselves are removed from the image)."""
    info = []
    for f in sorted(glob.glob(str(root / "var/lib/apt/lists/*_InRelease"))):
        fields = {}
        for line in Path(f).read_text(errors="replace").splitlines():
            m = re.match(r"^(Origin|Suite|Codename|Date): (.*)$", line)
            if m:
                fields[m.group(1).lower()] = m.group(2)
            if line.startswith("-----BEGIN PGP SIGNATURE") or (line == "" and fields):
                break
        fields["file"] = Path(f).name
        info.append(fields)
    (root / RECORDS).mkdir(parents=True, exist_ok=True)
    if info:
        (root / RECORDS / "apt-lists.json").write_text(json.dumps(info, indent=1) + "\n")


def dpkg_packages(root: Path) -> list[dict]:
    pkgs, cur = [], {}
    status = root / "var/lib/dpkg/status"
    for line in status.read_text(errors="replace").splitlines() + [""]:
        if not line:
            if cur.get("Status", "").endswith(" installed"):
                pkgs.append({"name": cur["Package"], "version": cur.get("Version", ""),
                             "arch": cur.get("Architecture", "")})
            cur = {}
        elif not line[0].isspace() and ":" in line:
            k, v = line.split(":", 1)
            cur[k] = v.strip()
    return sorted(pkgs, key=lambda p: p["name"])


def python_packages(root: Path) -> list[dict]:
    out = []
    metas = {os.path.realpath(m) for m in glob.glob(str(root / "opt/**/site-packages/*.dist-info/METADATA"),
                                                     recursive=True)}      # venvs' lib64 -> lib
    for meta in sorted(metas):
        if not meta.startswith(str(root) + os.sep):
            continue
        name = version = ""
        for line in Path(meta).read_text(errors="replace").splitlines():
            if line.startswith("Name: "):
                name = line[6:].strip()
            elif line.startswith("Version: "):
                version = line[9:].strip()
            elif not line:
                break
        env = Path(meta).relative_to(root).parts
        venv = "/" + "/".join(env[:env.index("lib")]) if "lib" in env else ""
        out.append({"name": name, "version": version, "venv": venv})
    return out


def model_files(root: Path) -> list[dict]:
    """The model files the image ships: in the factory data (the data partition's first contents)
    once finalize has moved them there, else in the data directory."""
    out = []
    models = next((d for d in (root / FACTORY_HOME / "models", root / HOME_MOUNT / "models") if d.is_dir()), None)
    for f in sorted(models.glob("*/*")) if models else []:
        if f.is_file() and f.name != "manifest.json":
            out.append({"model": f.parent.name, "file": f.name, "bytes": f.stat().st_size,
                        "sha256": sha256_file(f)})
    return out


def file_list(root: Path) -> str:
    """Every path in the root fs with its type, mode, owner and size (sorted): two builds of one
    commit give the same list (compare build/thox-amd64.files of two builds with diff)."""
    lines = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            kind = "l" if stat.S_ISLNK(st.st_mode) else "d" if stat.S_ISDIR(st.st_mode) else "f"
            size = st.st_size if kind == "f" else 0
            target = " -> " + os.readlink(p) if kind == "l" else ""
            lines.append(f"/{os.path.relpath(p, root)}{target}\t{kind} {stat.S_IMODE(st.st_mode):04o} "
                         f"{st.st_uid}:{st.st_gid} {size}")
    return "\n".join(sorted(lines)) + "\n"


def image_conf(root: Path) -> dict:
    f = root / IMAGE_CONF
    if not f.exists():
        return {}
    return dict(line.split("=", 1) for line in f.read_text().splitlines() if "=" in line and not line.startswith("#"))


def write_manifest(ctx: Context, img: Path, out: Path, timings: dict, *, version: str, kernel: str | None = None,
                   kernel_cmdline: str | None = None) -> dict:
    """The image's bill of materials into out; the bundles recorded there before whose files
    are still next to it are kept (key `bundles`)."""
    lists_file = ctx.root / RECORDS / "apt-lists.json"
    lists = json.loads(lists_file.read_text()) if lists_file.exists() else []
    mirror, security = image_mirrors(pins.DEBIAN_SUITE)
    wheel = ctx.llama_wheel
    try:
        bundles = [b for b in json.loads(out.read_text()).get("bundles", []) if (out.parent / b["file"]).exists()]
    except (OSError, ValueError, KeyError, TypeError):
        bundles = []
    m = {
        "image": img.name,
        "target": ctx.target,
        "version": version,
        "sha256": sha256_file(img),
        "bytes": img.stat().st_size,
        "git": {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "ansible",
                                                                      "app", "systemd", "image"))},
        "source_date_epoch": source_date_epoch(),
        "debian": {"suite": pins.DEBIAN_SUITE, "mirror": mirror, "security_mirror": security,
                   "package_lists": lists},
        "ssh_user": image_conf(ctx.root).get("THOX_SSH_USER", "root"),
        "kernel": kernel,
        "kernel_cmdline": kernel_cmdline,
        "debian_packages": dpkg_packages(ctx.root),
        "python_packages": python_packages(ctx.root),
        "models": model_files(ctx.root),
        "llama_cpp_python_wheel": {"file": wheel.name, "sha256": sha256_file(wheel)} if wheel else None,
        "build": {"stage_seconds": timings, "host": os.uname().nodename},
        "bundles": bundles,
    }
    out.write_text(json.dumps(m, indent=1) + "\n")
    return m
