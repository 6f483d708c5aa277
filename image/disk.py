"""The amd64 disk layout and the raw GPT disk image: an EFI system partition and an ext4
root made in place from the root directory (mkfs.ext4 -d: no loop devices, no mounts)."""
from __future__ import annotations

import subprocess
from pathlib import Path

from .common import run, source_date_epoch
from .context import Context

ESP_MIB = 160
# fixed identifiers: the image is the same for every device; the per-device ids
# (machine-id, host keys, API key) are made at first boot.
DISK_GUID = "6c1f6b1e-7a2d-4f0e-9d39-74686f780001"
ESP_PARTUUID = "6c1f6b1e-7a2d-4f0e-9d39-74686f780002"
ROOT_PARTUUID = "6c1f6b1e-7a2d-4f0e-9d39-74686f780003"
ROOT_FSUUID = "6c1f6b1e-7a2d-4f0e-9d39-74686f780004"
ESP_VOLID = "7468F001"
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_X86_64_TYPE = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
KERNEL_CMDLINE = f"root=PARTUUID={ROOT_PARTUUID} ro rootwait console=tty0 console=ttyS0,115200 net.ifnames=1"


def layout_vars() -> dict[str, str]:
    """The image role's variables for this layout: its /etc/fstab mounts these partitions."""
    return {"image_root_partuuid": ROOT_PARTUUID, "image_esp_partuuid": ESP_PARTUUID}


def dir_size(root: Path) -> int:
    out = subprocess.run(["du", "-s", "-B1", "--apparent-size", "-x", str(root)], capture_output=True, text=True,
                         check=True).stdout
    return int(out.split()[0])


def stage_disk(ctx: Context, esp: Path, tmp_img: Path) -> str:
    logfile = ctx.logdir / "image-disk.log"
    mib = 1 << 20
    used = dir_size(ctx.root)
    root_mib = int(used * 1.25 / mib) + 300          # room for logs, first-boot files; grown at first boot
    esp_off = 1
    root_off = esp_off + ESP_MIB
    total_mib = root_off + root_mib + 1              # +1 MiB: the backup GPT
    tmp_img.unlink(missing_ok=True)
    with open(tmp_img, "wb") as f:
        f.truncate(total_mib * mib)
    sector = 512
    table = "\n".join([
        "label: gpt", f"label-id: {DISK_GUID}", "unit: sectors", "first-lba: 2048",
        f"start={esp_off * mib // sector}, size={ESP_MIB * mib // sector}, type={ESP_TYPE}, "
        f"uuid={ESP_PARTUUID}, name=\"esp\"",
        f"start={root_off * mib // sector}, size={root_mib * mib // sector}, type={ROOT_X86_64_TYPE}, "
        f"uuid={ROOT_PARTUUID}, name=\"root\"", ""])
    run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(tmp_img)], input=table.encode(), logfile=logfile)
    run(["dd", f"if={esp}", f"of={tmp_img}", "bs=1M", f"seek={esp_off}", "conv=notrunc,sparse", "status=none"],
        logfile=logfile)
    env = {"E2FSPROGS_FAKE_TIME": str(source_date_epoch())} if source_date_epoch() else {}
    run(["mkfs.ext4", "-q", "-F", "-L", "thox-root", "-U", ROOT_FSUUID, "-E",
         f"offset={root_off * mib},hash_seed={ROOT_FSUUID},root_owner=0:0",
         "-d", str(ctx.root), str(tmp_img), f"{root_mib * 1024}k"], env=env, logfile=logfile)
    return f"{total_mib} MiB (root {root_mib} MiB, {used / mib:.0f} MiB used)"
