"""The EFI system partition: a FAT32 file filled with mtools (no mounts) that holds
systemd-boot, the root file system's kernel and initrd, and one loader entry."""
from __future__ import annotations

import glob
import re
import shutil
from pathlib import Path

from .common import BuildError, run, source_date_epoch
from .context import Context
from .disk import ESP_MIB, ESP_VOLID, KERNEL_CMDLINE


def kernel_and_initrd(root: Path) -> tuple[Path, Path]:
    def vkey(p: str):
        return [int(x) if x.isdigit() else x for x in re.split(r"[.-]", Path(p).name.split("-", 1)[1])]
    kernels = sorted(glob.glob(str(root / "boot/vmlinuz-*")), key=vkey)
    if not kernels:
        raise BuildError("no kernel in the root file system (boot/vmlinuz-*)")
    k = Path(kernels[-1])
    initrd = root / "boot" / k.name.replace("vmlinuz-", "initrd.img-")
    if not initrd.exists():
        raise BuildError(f"no initrd for {k.name}")
    return k, initrd


def stage_esp(ctx: Context, esp: Path) -> str:
    logfile = ctx.logdir / "image-disk.log"
    efi = ctx.root / "usr/lib/systemd/boot/efi/systemd-bootx64.efi"
    if not efi.exists():
        raise BuildError("systemd-boot EFI binary missing from the root fs (package systemd-boot-efi)")
    kernel, initrd = kernel_and_initrd(ctx.root)
    esp.unlink(missing_ok=True)
    run(["mkfs.vfat", "-F", "32", "-n", "THOX-ESP", "-i", ESP_VOLID, "-C", str(esp), str(ESP_MIB * 1024)],
        logfile=logfile)
    tmp = esp.parent / "esp-files"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "loader/entries").mkdir(parents=True)
    (tmp / "loader/loader.conf").write_text("default thox.conf\ntimeout 0\nconsole-mode keep\neditor no\n")
    (tmp / "loader/entries/thox.conf").write_text(
        f"title   Thox appliance ({kernel.name.removeprefix('vmlinuz-')})\n"
        "linux   /thox/vmlinuz\ninitrd  /thox/initrd.img\n"
        f"options {KERNEL_CMDLINE}\n")
    (tmp / "thox").mkdir()
    (tmp / "thox/README.txt").write_text(
        "Thox appliance boot partition.\r\n"
        "To trust an SSH key on first boot, put its public line(s) into thox/authorized_keys here.\r\n")
    env = {"MTOOLS_SKIP_CHECK": "1", "SOURCE_DATE_EPOCH": str(source_date_epoch())}
    mi = ["-i", str(esp)]
    run(["mmd", *mi, "::/EFI", "::/EFI/BOOT", "::/EFI/systemd", "::/loader", "::/loader/entries", "::/thox"],
        env=env, logfile=logfile)
    copies = [(efi, "::/EFI/BOOT/BOOTX64.EFI"), (efi, "::/EFI/systemd/systemd-bootx64.efi"),
              (kernel, "::/thox/vmlinuz"), (initrd, "::/thox/initrd.img"),
              (tmp / "loader/loader.conf", "::/loader/loader.conf"),
              (tmp / "loader/entries/thox.conf", "::/loader/entries/thox.conf"),
              (tmp / "thox/README.txt", "::/thox/README.txt")]
    for src, dst in copies:
        run(["mcopy", *mi, "-o", str(src), dst], env=env, logfile=logfile)
    shutil.rmtree(tmp)
    return f"kernel {kernel.name}"
