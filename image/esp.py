"""The EFI system partition: a FAT32 file filled with mtools (no mounts) that holds GRUB
(EFI/BOOT/BOOTX64.EFI, made with grub-mkimage from the build host's grub-efi-amd64-bin), its
grub.cfg and grubenv (EFI/thox/), and thox/README.txt. GRUB picks the root slot as RAUC's GRUB
backend expects (ORDER, A_OK/B_OK, A_TRY/B_TRY in grubenv) and loads that slot's own kernel and
initrd (/boot/vmlinuz, /boot/initrd.img: links the image role keeps pointing at the newest kernel)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .common import BuildError, run, source_date_epoch
from .context import Context
from .disk import ESP_MIB, ESP_VOLID, SLOTS, kernel_cmdline, layout

GRUB_DIR = "EFI/thox"                      # grub.cfg and grubenv; GRUB's $prefix
GRUB_MODULES_DIR = Path("/usr/lib/grub/x86_64-efi")
# everything grub.cfg uses is built into the one EFI binary (no module directory on the ESP)
GRUB_MODULES = ["part_gpt", "fat", "ext2", "normal", "linux", "configfile", "loadenv", "test", "echo", "regexp",
                "serial", "terminal", "efi_gop", "all_video", "gzio", "sleep", "reboot", "halt", "cat"]
KERNEL, INITRD = "boot/vmlinuz", "boot/initrd.img"
# the first boot of an image: slot A is good and comes first, B holds nothing yet
INITIAL_ENV = {"ORDER": "A B", "A_OK": "1", "B_OK": "0", "A_TRY": "0", "B_TRY": "0"}


def kernel_and_initrd(root: Path) -> tuple[Path, Path]:
    """The kernel and initrd GRUB loads from a slot: what /boot/vmlinuz and /boot/initrd.img
    point at (both must exist)."""
    found = []
    for rel in (KERNEL, INITRD):
        link = root / rel
        target = link.parent / os.readlink(link) if link.is_symlink() else None
        if target is None or not target.resolve().is_relative_to(root.resolve()) or not target.is_file():
            raise BuildError(f"/{rel} in the root file system is not a link to a file in /boot: "
                             "the image role makes it (/etc/kernel-img.conf link_in_boot = yes)")
        found.append(target)
    return found[0], found[1]


def grub_cfg() -> str:
    """RAUC's documented GRUB script: the first slot in ORDER that is OK and not being tried is
    booted and marked as tried (TRY=1, saved before the kernel starts); the booted system marks
    it good (TRY=0) or bad. When no slot qualifies, the TRY flags of the good slots are reset."""
    entries = []
    for n, name in enumerate(SLOTS, 2):
        entries.append(
            f'menuentry "Thox slot {name} (OK=${name}_OK TRY=${name}_TRY)" {{\n'
            f'    echo "thox: booting slot {name}"\n'
            f'    linux ($bootdisk,gpt{n})/{KERNEL} {kernel_cmdline(name)}\n'
            f'    initrd ($bootdisk,gpt{n})/{INITRD}\n}}\n')
    return f"""# GRUB of the Thox appliance (written by the image builder): two root slots, A and B,
# chosen through grubenv as RAUC's GRUB backend expects (ORDER, A_OK/B_OK, A_TRY/B_TRY)
serial --unit=0 --speed=115200
terminal_input console serial
terminal_output console serial
set default=0
set timeout=0
set any_ok=0

set ORDER="A B"
set A_OK=0
set B_OK=0
set A_TRY=0
set B_TRY=0
load_env --file $prefix/grubenv

# select the bootable slot
for SLOT in $ORDER; do
    if [ "$SLOT" == "A" ]; then
        INDEX=0
        OK=$A_OK
        TRY=$A_TRY
        A_TRY=1
    fi
    if [ "$SLOT" == "B" ]; then
        INDEX=1
        OK=$B_OK
        TRY=$B_TRY
        B_TRY=1
    fi
    if [ "$OK" -eq 1 -a "$TRY" -eq 0 ]; then
        default=$INDEX
        any_ok=1
        break
    fi
done

# reset the booted flags in case both slots have failed to boot
if [ "$any_ok" -eq 0 ]; then
    if [ "$A_OK" -eq 1 -a "$A_TRY" -eq 1 ]; then
        A_TRY=0
    fi
    if [ "$B_OK" -eq 1 -a "$B_TRY" -eq 1 ]; then
        B_TRY=0
    fi
fi

save_env --file $prefix/grubenv A_TRY B_TRY

# the slots are on the disk GRUB was loaded from ($root: that disk's ESP)
set bootdisk=hd0
regexp --set=1:bootdisk '^([^,]+),' "$root"
export bootdisk

""" + "\n".join(entries)


def grub_efi(out: Path, logfile: Path | None = None) -> Path:
    """GRUB's EFI binary with its modules built in and $prefix /EFI/thox on the disk it was loaded from."""
    if not (GRUB_MODULES_DIR / "linux.mod").exists():
        raise BuildError(f"{GRUB_MODULES_DIR} missing: run `make image-deps` (package grub-efi-amd64-bin)")
    run(["grub-mkimage", "-O", "x86_64-efi", "-d", str(GRUB_MODULES_DIR), "-p", f"/{GRUB_DIR}", "-o", str(out),
         *GRUB_MODULES], logfile=logfile)
    return out


def grubenv(out: Path, values: dict[str, str], logfile: Path | None = None) -> Path:
    out.unlink(missing_ok=True)
    run(["grub-editenv", str(out), "create"], logfile=logfile)
    run(["grub-editenv", str(out), "set", *[f"{k}={v}" for k, v in values.items()]], logfile=logfile)
    return out


def stage_esp(ctx: Context, esp: Path) -> str:
    logfile = ctx.logdir / "image-disk.log"
    kernel, _ = kernel_and_initrd(ctx.root)
    esp.unlink(missing_ok=True)
    run(["mkfs.vfat", "-F", "32", "-n", "THOX-ESP", "-i", ESP_VOLID, "-C", str(esp), str(ESP_MIB * 1024)],
        logfile=logfile)
    tmp = esp.parent / "esp-files"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "grub.cfg").write_text(grub_cfg())
    (tmp / "README.txt").write_text(
        "Thox appliance boot partition.\r\n"
        "To trust an SSH key on first boot, put its public line(s) into thox/authorized_keys here.\r\n")
    env = {"MTOOLS_SKIP_CHECK": "1", "SOURCE_DATE_EPOCH": str(source_date_epoch())}
    mi = ["-i", str(esp)]
    run(["mmd", *mi, "::/EFI", "::/EFI/BOOT", f"::/{GRUB_DIR}", "::/thox"], env=env, logfile=logfile)
    copies = [(grub_efi(tmp / "BOOTX64.EFI", logfile), "::/EFI/BOOT/BOOTX64.EFI"),
              (tmp / "grub.cfg", f"::/{GRUB_DIR}/grub.cfg"),
              (grubenv(tmp / "grubenv", INITIAL_ENV, logfile), f"::/{GRUB_DIR}/grubenv"),
              (tmp / "README.txt", "::/thox/README.txt")]
    for src, dst in copies:
        run(["mcopy", *mi, "-o", str(src), dst], env=env, logfile=logfile)
    shutil.rmtree(tmp)
    return f"GRUB, slots {' '.join(SLOTS)} ({layout(0)[1].size_mib} MiB each), kernel {kernel.name}"
