"""The Jetson flash layout: NVIDIA's rootfs A/B partition XML (APP and APP_b, flashed with
ROOTFS_AB=1) with a `thox-data` partition added right after APP_b, flashed with the image
bootloader/thox-data.ext4 (label thox-data, the root fs's factory data; mounted at /var/lib/thox-data).
APP and APP_b get SLOT_MIB each: the size of the root file system in every Jetson update bundle.

When APP_b is the last partition before the secondary GPT, thox-data takes the rest of the disk
(allocation_attribute 0x808, the size below being its minimum) and its ext4 is grown at boot;
otherwise it keeps the fixed size."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from ..common import BuildError

DATA_LABEL = "thox-data"
ROOT_SLOTS = ("APP", "APP_b")          # rootfs A and B: RAUC's slots rootfs.0 and rootfs.1
# each root slot's size in MiB: room for the CUDA root fs (cuda-toolkit, L4T userspace, the app)
# with headroom for later versions; the flash layout's APP/APP_b and every bundle's ext4 (and
# flash.sh's system.img, `-S`) have this size. Changing it needs a reflash.
SLOT_MIB = 16384
DATA_IMAGE = "thox-data.ext4"          # in Linux_for_Tegra/bootloader/, named by the partition's <filename>
LINUX_FS_GUID = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
FILL = "0x808"                         # NVIDIA's allocation attribute: take the remaining space
FIXED = "0x8"


def thox_layout_path(src: str) -> str:
    """Where the edited copy of NVIDIA's layout src (relative to Linux_for_Tegra) is written."""
    p = Path(src)
    return str(p.with_name("thox_" + p.name))


def _data_partition(pid: int, size_bytes: int, allocation: str) -> ET.Element:
    part = ET.Element("partition", {"name": DATA_LABEL, "id": str(pid), "type": "data"})
    for tag, text in (("allocation_policy", "sequential"), ("filesystem_type", "basic"),
                      ("size", str(size_bytes)), ("file_system_attribute", "0"),
                      ("allocation_attribute", allocation), ("partition_type_guid", LINUX_FS_GUID),
                      ("percent_reserved", "0"), ("align_boundary", "16384"), ("filename", DATA_IMAGE),
                      ("description", "Thox data (ext4, label thox-data): /var/lib/thox-data, kept across "
                                      "rootfs A/B updates; its ext4 grows to the partition at boot.")):
        ET.SubElement(part, tag).text = f" {text} "
    return part


def add_data_partition(xml_text: str, size_bytes: int) -> str:
    """NVIDIA's layout with APP and APP_b of SLOT_MIB each and thox-data inserted after APP_b,
    in the device that holds APP_b."""
    root = ET.fromstring(xml_text, parser=ET.XMLParser(target=ET.TreeBuilder(insert_comments=True)))
    for device in root.iter("device"):
        parts = [c for c in device if c.tag == "partition"]
        app_b = next((p for p in parts if p.get("name") == "APP_b"), None)
        if app_b is None:
            continue
        if any(p.get("name") == DATA_LABEL for p in parts):
            raise BuildError(f"the flash layout already has a {DATA_LABEL} partition")
        for p in parts:
            if p.get("name") in ROOT_SLOTS:
                size = p.find("size")
                if size is None:
                    size = ET.SubElement(p, "size")
                size.text = f" {SLOT_MIB << 20} "
        ids = [int(p.get("id")) for p in parts if (p.get("id") or "").strip().isdigit()]
        after = parts[parts.index(app_b) + 1:]
        last = not after or [p.get("name") for p in after] == ["secondary_gpt"]
        if last:
            attr = app_b.find("allocation_attribute")
            if attr is not None and attr.text.strip() == FILL:
                attr.text = f" {FIXED} "      # one partition fills the disk: thox-data, not APP_b
        children = list(device)
        device.insert(children.index(app_b) + 1,
                      _data_partition(max(ids, default=0) + 1, size_bytes, FILL if last else FIXED))
        ET.indent(root, space="    ")
        return '<?xml version="1.0"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
    raise BuildError("the flash layout has no APP_b partition: it is not a rootfs A/B layout (ROOTFS_AB=1)")


def write_thox_layout(l4t: Path, src: str, size_bytes: int) -> Path:
    """Linux_for_Tegra/<dir>/thox_<name>: NVIDIA's layout src plus thox-data."""
    nv = l4t / src
    if not nv.is_file():
        raise BuildError(f"NVIDIA's flash layout {src} is not in the BSP ({nv})")
    dst = l4t / thox_layout_path(src)
    dst.write_text(add_data_partition(nv.read_text(), size_bytes))
    return dst

