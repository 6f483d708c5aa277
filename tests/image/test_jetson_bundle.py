"""Jetson update bundles (python3 -m image bundle --target jetson-orin): made with the real
rauc, mkfs.ext4 and mksquashfs from the root fs of a flash package built on the fixture BSP of
test_jetson.py (NVIDIA's scripts are stand-ins there); the fstab the image role writes for Jetson."""
import json
import os
import re
import subprocess
from pathlib import Path

import jinja2
import pytest
from test_jetson import DTB, fixtures, ubuntu_signer  # noqa: F401 (fixtures used by name)
from thoxtest import require

from image import common, disk, slot
from image.__main__ import main
from image.targets import jetson, jetson_bundle, jetson_layout

FSTAB_J2 = common.REPO / "ansible/roles/image/templates/fstab.j2"


def _build_package(tmp_path, monkeypatch, capsys, version="1.0.0") -> Path:
    real_run = common.run

    def fake_run(cmd, **kw):
        if cmd[0] == "chroot":            # the fixture root fs holds no aarch64 programs
            return subprocess.CompletedProcess(cmd, 0)
        return real_run(cmd, **kw)
    monkeypatch.setattr(jetson, "run", fake_run)
    monkeypatch.setattr(jetson, "check_binfmt", lambda: "fixture")
    out = tmp_path / "out"
    rc = main(["build", "--target", "jetson-orin", "--out", str(out), "--no-ansible", "--version", version])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    return out


def _failed_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "FAILED" in line]
    assert len(lines) == 1, err
    return re.sub(r" after [0-9.]+s", "", lines[0])


def test_bundle_is_the_flash_package_root_fs_in_a_slot_sized_ext4(fixtures, tmp_path, monkeypatch, capsys):
    require(os.geteuid() == 0, "a root fs with owners and mkfs.ext4 -d of it need root")
    out = _build_package(tmp_path, monkeypatch, capsys)
    rootfs = out / "jetson-orin/Linux_for_Tegra/rootfs"
    overlay = tmp_path / "overlay"
    (overlay / "etc").mkdir(parents=True)
    (overlay / "etc/thox-overlay").write_text("v2 only\n")
    rc = main(["bundle", "--target", "jetson-orin", "--version", "2", "--out", str(out), "--no-ansible",
               "--overlay", str(overlay)])
    err = capsys.readouterr().err
    assert rc == 0, err
    for i, stage in enumerate(jetson.BUNDLE_STAGES, 1):
        assert f"stage {i}/{len(jetson.BUNDLE_STAGES)} {stage} done" in err
    raucb = out / "thox-jetson-orin-2.raucb"
    ca = tmp_path / "cache/rauc-test-ca/ca.cert.pem"
    info = json.loads(subprocess.run(["rauc", "info", f"--keyring={ca}", "--output-format=json", str(raucb)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["compatible"] == "thox-jetson-orin" and info["version"] == "2"
    [image] = [i["rootfs"] for i in info["images"]]
    assert image["filename"] == "rootfs.ext4"
    assert image["size"] == jetson_layout.SLOT_MIB << 20, "the bundle's ext4 is as large as APP/APP_b"
    # its contents: the package's root fs at version 2, the overlay, the DTB where system.img has it
    squash = tmp_path / "squash"
    subprocess.run(["unsquashfs", "-q", "-n", "-d", str(squash), str(raucb), "rootfs.ext4"], check=True,
                   capture_output=True)
    ext4 = squash / "rootfs.ext4"

    def cat(inner: str) -> str:
        return subprocess.run(["debugfs", "-R", f"cat {inner}", str(ext4)], capture_output=True, text=True).stdout
    assert "IMAGE_ID=thox\nIMAGE_VERSION=2\n" in cat("/usr/lib/os-release")
    assert cat("/etc/thox-overlay") == "v2 only\n"
    assert cat(f"/boot/dtb/{DTB}") == "dtb\n" and cat("/boot/Image") == "kernel\n"
    assert "root=" in cat("/boot/extlinux/extlinux.conf"), "rewritten per slot by the post-install handler"
    # the flash package's root fs is left as it was
    assert "IMAGE_VERSION=1.0.0" in (rootfs / "usr/lib/os-release").read_text()
    assert not (rootfs / "boot/dtb").exists() and not (rootfs / "etc/thox-overlay").exists()
    entry = [b for b in json.loads((out / "manifest.json").read_text())["bundles"] if b["file"] == raucb.name]
    assert entry and entry[0]["compatible"] == "thox-jetson-orin" and entry[0]["version"] == "2"
    assert entry[0]["sha256"] == common.sha256_file(raucb)


def test_bundle_without_the_bsp_fails_in_fetch_like_the_image(fixtures, tmp_path, capsys):
    """No BSP in the cache and NVIDIA unreachable: the bundle stops at fetch with the same one
    line as `make image TARGET=jetson-orin`."""
    require(os.geteuid() == 0, "the builder's commands need root")
    pins = json.loads(fixtures["pins_file"].read_text())
    pins["downloads"]["bsp"]["url"] = "http://127.0.0.1:9/Jetson_Linux_R36.4.3_aarch64.tbz2"
    fixtures["pins_file"].write_text(json.dumps(pins))
    fixtures["bsp"].unlink()
    out = str(tmp_path / "out")
    assert main(["build", "--target", "jetson-orin", "--out", out, "--no-ansible"]) == 1
    image_line = _failed_line(capsys.readouterr().err)
    assert main(["bundle", "--target", "jetson-orin", "--version", "2", "--out", out, "--no-ansible"]) == 1
    err = capsys.readouterr().err
    assert _failed_line(err) == image_line
    assert "stage 'fetch'" in image_line and "cannot download bsp" in image_line
    assert not list(Path(out).glob("*.raucb"))


def test_bundle_needs_the_flash_package_of_these_inputs(fixtures, tmp_path, monkeypatch, capsys):
    require(os.geteuid() == 0, "the builder's commands need root")
    out = tmp_path / "out"
    args = ["bundle", "--target", "jetson-orin", "--version", "2", "--out", str(out), "--no-ansible"]
    assert main(args) == 1
    line = _failed_line(capsys.readouterr().err)
    assert "stage 'package'" in line and "no flash package" in line and "make image TARGET=jetson-orin" in line
    out = _build_package(tmp_path, monkeypatch, capsys)
    assert main(args + ["--board", "agx-orin"]) == 1
    line = _failed_line(capsys.readouterr().err)
    assert "made with another board" in line and "BOARD=agx-orin" in line
    assert not list(out.glob("*.raucb"))


def test_complete_boot_copies_the_dtb_and_refuses_missing_boot_files(tmp_path):
    tree = tmp_path / "tree"
    with pytest.raises(common.BuildError, match="no /boot/extlinux/extlinux.conf"):
        jetson_bundle.complete_boot(tree)
    (tree / "boot/extlinux").mkdir(parents=True)
    conf = tree / "boot/extlinux/extlinux.conf"
    conf.write_text("LABEL primary\n  LINUX /boot/Image\n  FDT /boot/dtb/x.dtb\n  INITRD /boot/initrd # the initrd\n"
                    "  APPEND ${cbootargs} root=PARTUUID=1 rw\n")
    assert jetson_bundle.extlinux_files(conf.read_text()) == [("LINUX", "/boot/Image"), ("FDT", "/boot/dtb/x.dtb"),
                                                      ("INITRD", "/boot/initrd")]
    (tree / "boot/Image").write_text("k")
    (tree / "boot/x.dtb").write_text("d")
    with pytest.raises(common.BuildError, match="lacks: INITRD /boot/initrd"):
        jetson_bundle.complete_boot(tree)
    (tree / "boot/initrd").write_text("i")
    (tree / "boot/dtb/x.dtb").unlink()
    assert jetson_bundle.complete_boot(tree) == ["/boot/dtb/x.dtb"]
    assert (tree / "boot/dtb/x.dtb").read_text() == "d"
    assert jetson_bundle.complete_boot(tree) == [], "present already: nothing to add"
    (tree / "boot/x.dtb").unlink()
    (tree / "boot/dtb/x.dtb").unlink()
    with pytest.raises(common.BuildError, match="lacks: FDT /boot/dtb/x.dtb"):
        jetson_bundle.complete_boot(tree)


def _fstab(**layout) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(FSTAB_J2.parent)), keep_trailing_newline=True)
    return env.get_template(FSTAB_J2.name).render(ansible_managed="managed", thox_home="/" + slot.HOME_MOUNT,
                                                  thox_data_dir="/" + slot.DATA_MOUNT,
                                                  thox_data_home=f"/{slot.DATA_MOUNT}/{slot.HOME_NAME}",
                                                  **{"image_esp_partlabel": "", "image_data_partlabel": "",
                                                     **layout})


def test_fstab_mounts_thox_data_and_the_esp_on_both_targets(tmp_path):
    """The image role's fstab with the variables each target's builder passes."""
    ctx = jetson.context(type("A", (), {"out": str(tmp_path), "ansible": True, "extra_vars": "",
                                        "board": "orin-nano"})())
    layout = {k: v for k, v in ctx.target_vars.items() if k.startswith("image_")}
    jet = _fstab(**layout)
    assert jetson.FSTAB_DATA.search(jet), jet
    assert "PARTLABEL=thox-data\t/var/lib/thox-data\text4\tdefaults,x-systemd.growfs\t0\t2" in jet
    assert ("/var/lib/thox-data/thox\t/var/lib/thox\tnone\tbind,x-systemd.requires-mounts-for=/var/lib/thox-data"
            "\t0\t0") in jet
    assert jetson.FSTAB_HOME.search(jet), jet
    assert "PARTLABEL=esp\t/boot/efi\tvfat" in jet, "the factory reset flag lies on the ESP on Jetson too"
    amd = _fstab(**disk.layout_vars())
    assert "PARTLABEL=esp\t/boot/efi\tvfat" in amd and jetson.FSTAB_DATA.search(amd)
