"""The amd64 disk layout and the raw GPT disk image: an EFI system partition, two root slots
(A holds the image's version, B is empty until the first update) and the data partition, last
so that it can grow to the disk at first boot. The file systems are made in place (mkfs.ext4 -d
at an offset: no loop devices, no mounts)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import slot
from .common import run
from .context import Context

ESP_MIB = 160
# fixed identifiers: the image is the same for every device; the per-device ids
# (machine-id, host keys, API key) are made at first boot.
DISK_GUID = "6c1f6b1e-7a2d-4f0e-9d39-74686f780001"
ESP_PARTUUID = "6c1f6b1e-7a2d-4f0e-9d39-74686f780002"
SLOT_A_PARTUUID = "6c1f6b1e-7a2d-4f0e-9d39-74686f780003"
SLOT_B_PARTUUID = "6c1f6b1e-7a2d-4f0e-9d39-74686f780005"
DATA_PARTUUID = "6c1f6b1e-7a2d-4f0e-9d39-74686f780006"
DATA_FSUUID = "6c1f6b1e-7a2d-4f0e-9d39-74686f780007"
ESP_VOLID = "7468F001"
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_X86_64_TYPE = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
LINUX_DATA_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
ESP_LABEL, DATA_LABEL = "esp", "thox-data"
# RAUC's bootname of each root slot, its partition label and PARTUUID (the GRUB entries and the
# updates role's system.conf name the same)
SLOTS = {"A": ("thox-a", SLOT_A_PARTUUID), "B": ("thox-b", SLOT_B_PARTUUID)}
BOOT_ARGS = "rw rootwait console=tty0 console=ttyS0,115200 net.ifnames=1 panic=30"


def kernel_cmdline(bootname: str) -> str:
    """The kernel command line of a slot: its root by PARTUUID, mounted rw (no fstab line for /)."""
    return f"root=PARTUUID={SLOTS[bootname][1]} {BOOT_ARGS} rauc.slot={bootname}"


KERNEL_CMDLINE = kernel_cmdline("A")


@dataclass(frozen=True)
class Partition:
    number: int
    name: str          # the GPT partition label
    start_mib: int
    size_mib: int
    type: str
    uuid: str


def layout(data_mib: int) -> list[Partition]:
    """ESP, slot A, slot B (slot.SLOT_MIB each), data (data_mib, the last: it grows)."""
    parts, start = [], 1
    for n, (name, size, ptype, puuid) in enumerate([
            (ESP_LABEL, ESP_MIB, ESP_TYPE, ESP_PARTUUID),
            (SLOTS["A"][0], slot.SLOT_MIB, ROOT_X86_64_TYPE, SLOT_A_PARTUUID),
            (SLOTS["B"][0], slot.SLOT_MIB, ROOT_X86_64_TYPE, SLOT_B_PARTUUID),
            (DATA_LABEL, data_mib, LINUX_DATA_TYPE, DATA_PARTUUID)], 1):
        parts.append(Partition(n, name, start, size, ptype, puuid))
        start += size
    return parts


def disk_mib(parts: list[Partition]) -> int:
    return parts[-1].start_mib + parts[-1].size_mib + 1          # +1 MiB: the backup GPT


def sfdisk_script(parts: list[Partition]) -> str:
    sectors = (1 << 20) // 512
    return "\n".join(["label: gpt", f"label-id: {DISK_GUID}", "unit: sectors", "first-lba: 2048"] + [
        f"start={p.start_mib * sectors}, size={p.size_mib * sectors}, type={p.type}, uuid={p.uuid}, "
        f"name=\"{p.name}\"" for p in parts] + [""])


def layout_vars() -> dict[str, str]:
    """The roles' variables for this layout: the image role's /etc/fstab mounts the ESP and the
    data partition by label."""
    return {"image_esp_partlabel": ESP_LABEL, "image_data_partlabel": DATA_LABEL}


def stage_disk(ctx: Context, esp: Path, tmp_img: Path, version: str) -> str:
    logfile = ctx.logdir / "image-disk.log"
    parts = layout(slot.data_mib(ctx.root))
    esp_p, a, _b, data = parts
    total = disk_mib(parts)
    tmp_img.unlink(missing_ok=True)
    with open(tmp_img, "wb") as f:
        f.truncate(total << 20)
    run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(tmp_img)], input=sfdisk_script(parts).encode(),
        logfile=logfile)
    run(["dd", f"if={esp}", f"of={tmp_img}", "bs=1M", f"seek={esp_p.start_mib}", "conv=notrunc,sparse",
         "status=none"], logfile=logfile)
    used = slot.make_slot_fs(ctx.root, tmp_img, version, offset_mib=a.start_mib, logfile=logfile)
    slot.make_data_fs(ctx.root, tmp_img, data.size_mib, DATA_FSUUID, offset_mib=data.start_mib, logfile=logfile)
    return (f"{total} MiB: slots {slot.SLOT_MIB} MiB ({used >> 20} MiB used, version {version}), "
            f"data {data.size_mib} MiB")
