"""The Debian base root file system (mmdebstrap): a cached tarball, every .deb kept in the cache."""
from __future__ import annotations

import os
from pathlib import Path

from .aptmirror import image_mirrors
from .common import BuildError, key_of, pins, run, source_date_epoch
from .context import Context

SUITE = pins.DEBIAN_SUITE
# What the image needs to boot, to be grown and to be provisioned by Ansible; everything
# the appliance itself needs comes from the roles.
BASE_PACKAGES = [
    "systemd", "systemd-sysv", "systemd-resolved", "udev", "dbus", "libpam-systemd",
    "linux-image-amd64", "initramfs-tools", "zstd",
    "python3", "python3-apt", "python3-venv", "ca-certificates",
    "openssh-server", "sudo", "iproute2", "iputils-ping", "procps", "kmod", "netbase", "less",
    "cloud-guest-utils", "gdisk", "fdisk", "e2fsprogs", "dosfstools",
]


def mmdebstrap_cmd(arch: str, out: Path, deb_cache: Path, packages: list[str], suite: str = SUITE) -> list[str]:
    mirror, security = image_mirrors(suite)
    if not mirror:
        raise BuildError(f"this host has no apt source for {suite}: set THOX_DEBIAN_MIRROR to a Debian mirror URL")
    sources = [f"deb {mirror} {suite} main", f"deb {mirror} {suite}-updates main",
               f"deb {security} {suite}-security main"]
    return [
        "mmdebstrap", "--mode=root", "--variant=minbase", f"--architectures={arch}", "--format=tar",
        "--include=" + ",".join(packages),
        "--aptopt=Acquire::Languages \"none\"",
        "--skip=essential/unlink",
        # a Debian system keeps its package lists: the roles' apt tasks rely on them (removed at finalize)
        "--skip=cleanup/apt/lists",
        f"--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/ {deb_cache}",
        f"--setup-hook=sync-in {deb_cache} /var/cache/apt/archives/",
        # the date of the package lists is part of the bill of materials
        "--customize-hook=mkdir -p \"$1\"/var/lib/thox-image && "
        "grep -h -E '^(Origin|Suite|Date):' \"$1\"/var/lib/apt/lists/*_InRelease > \"$1\"/var/lib/thox-image/apt-lists-base.txt || true",
        f"--customize-hook=sync-out /var/cache/apt/archives {deb_cache}",
        suite, str(out), *sources,
    ]


def stage_bootstrap(ctx: Context) -> tuple[Path, str]:
    """The base tarball for ctx.arch, kept in the cache under a key of everything it is made of."""
    bdir = ctx.cache / "image"
    bdir.mkdir(parents=True, exist_ok=True)
    key = key_of("bootstrap-v2", ctx.arch, SUITE, *image_mirrors(SUITE), *BASE_PACKAGES)
    tar = bdir / f"base-{SUITE}-{ctx.arch}-{key}.tar"
    if tar.exists() and not ctx.refresh:
        return tar, f"cached {tar.name}"
    deb_cache = ctx.cache / "debs" / f"{SUITE}-{ctx.arch}"
    deb_cache.mkdir(parents=True, exist_ok=True)
    tmp = tar.with_suffix(".tar.tmp")
    tmp.unlink(missing_ok=True)
    run(mmdebstrap_cmd(ctx.arch, tmp, deb_cache, BASE_PACKAGES), logfile=ctx.logdir / f"mmdebstrap-{ctx.arch}.log",
        env={"SOURCE_DATE_EPOCH": str(source_date_epoch())})
    os.replace(tmp, tar)
    return tar, f"built {tar.name}"
