"""Jetson flash package: pins, command composition and failure messages, with a fixture BSP
(fake NVIDIA scripts, flash layout and apt key) and a fixture Ubuntu release signed by a key
made for the test standing in for NVIDIA's and Ubuntu's downloads (nothing is downloaded)."""
import io
import json
import os
import re
import subprocess
import tarfile
from argparse import Namespace
from pathlib import Path

import pytest
from test_jetson_ubuntu import Signer, ubuntu_release
from thoxtest import require

from image import common, provision
from image.__main__ import main
from image.targets import jetson, jetson_layout

# what NVIDIA's kernel packages put into /boot (apply_binaries.sh); flash.sh copies the DTB
# named by FDT from /boot/ to /boot/dtb/ of system.img and appends root= to APPEND
DTB = "kernel_tegra234-p3768-0000+p3767-0005-nv.dtb"
EXTLINUX = f"""TIMEOUT 30
DEFAULT primary

MENU TITLE L4T boot options

LABEL primary
      MENU LABEL primary kernel
      LINUX /boot/Image
      FDT /boot/dtb/{DTB}
      INITRD /boot/initrd
      APPEND ${{cbootargs}} root=/dev/mmcblk0p1 rw rootwait rootfstype=ext4 console=ttyTCU0,115200
"""
APPLY_BINARIES = f"""test -d rootfs/etc || exit 3
touch rootfs/etc/nv_tegra_release
mkdir -p rootfs/boot/extlinux && printf '%s' '{EXTLINUX}' > rootfs/boot/extlinux/extlinux.conf
echo kernel > rootfs/boot/Image && echo initrd > rootfs/boot/initrd && echo dtb > rootfs/boot/{DTB}"""

FAKE_SCRIPT = """#!/bin/sh
# fixture stand-in for NVIDIA's {name}: records how it was called
echo "{name} $*" >> "$THOX_FAKE_LOG"
{extra}
"""


def _add(tar, name, data=b"", mode=0o644, kind=tarfile.REGTYPE):
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    if kind == tarfile.DIRTYPE:
        tar.addfile(ti)
        return
    ti.size = len(data)
    tar.addfile(ti, io.BytesIO(data))


SAMPLEFS = """#!/bin/sh
# fixture stand-in for NVIDIA's nv_build_samplefs.sh: fetches the Ubuntu base, makes sample_fs.tbz2
echo "nv_build_samplefs.sh $*" >> "$THOX_FAKE_LOG"
wget -q -O base.tar.gz http://cdimage.ubuntu.com/ubuntu-base/releases/22.04/release/ubuntu-base-22.04.5-base-arm64.tar.gz || exit 4
rm -rf fs && mkdir fs && tar -C fs -xzf base.tar.gz && echo minimal > fs/etc/samplefs-flavor \
  && tar -C fs -cjf sample_fs.tbz2 . && rm -rf fs base.tar.gz
"""

NV_LAYOUT = """<?xml version="1.0"?>
<partition_layout version="01.00.0000">
    <!-- fixture: the end of NVIDIA's rootfs A/B NVMe layout -->
    <device type="external" instance="0" sector_size="512" num_sectors="INT_NUM_SECTORS">
        <partition name="master_boot_record" type="protective_master_boot_record">
            <allocation_policy> sequential </allocation_policy>
            <size> 512 </size>
        </partition>
        <partition name="APP" id="1" type="data">
            <size> APPSIZE </size>
            <allocation_attribute> 0x8 </allocation_attribute>
            <filename> APPFILE </filename>
        </partition>
        <partition name="esp" id="11" type="data">
            <size> 67108864 </size>
        </partition>
        <partition name="APP_b" id="2" type="data">
            <size> APPSIZE </size>
            <allocation_attribute> 0x808 </allocation_attribute>
            <filename> APPFILE_b </filename>
        </partition>
        <partition name="secondary_gpt" type="secondary_gpt">
            <size> 0xFFFFFFFFFFFFFFFF </size>
        </partition>
    </device>
</partition_layout>
"""


@pytest.fixture(scope="module")
def ubuntu_signer(tmp_path_factory):
    s = Signer(tmp_path_factory.mktemp("gpg") / "u", "Test CD Image Signing Key <cdimage@example.invalid>")
    yield s
    s.close()


@pytest.fixture
def fixtures(tmp_path, monkeypatch, ubuntu_signer):
    """Fake BSP tarball, a signed fixture Ubuntu release in the download cache, a pins file pinning both."""
    dl = tmp_path / "dl"
    dl.mkdir()
    bsp = dl / "Jetson_Linux_R36.4.3_aarch64.tbz2"
    with tarfile.open(bsp, "w:bz2") as t:
        for d in ("Linux_for_Tegra", "Linux_for_Tegra/bootloader", "Linux_for_Tegra/nv_tegra"):
            _add(t, d, kind=tarfile.DIRTYPE, mode=0o755)
        _add(t, "Linux_for_Tegra/nv_tegra/jetson-ota-public.key", b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n")
        _add(t, "Linux_for_Tegra/tools/kernel_flash/flash_l4t_t234_nvme_rootfs_ab.xml", NV_LAYOUT.encode())
        _add(t, "Linux_for_Tegra/tools/samplefs/nv_build_samplefs.sh", SAMPLEFS.encode(), 0o755)
        _add(t, "Linux_for_Tegra/apply_binaries.sh", FAKE_SCRIPT.format(
            name="apply_binaries.sh", extra=APPLY_BINARIES).encode(), 0o755)
        _add(t, "Linux_for_Tegra/tools/l4t_create_default_user.sh", FAKE_SCRIPT.format(
            name="l4t_create_default_user.sh", extra='mkdir -p rootfs/home/thox-admin').encode(), 0o755)
        _add(t, "Linux_for_Tegra/tools/kernel_flash/l4t_initrd_flash.sh", FAKE_SCRIPT.format(
            name="l4t_initrd_flash.sh", extra='echo "ROOTFS_AB=$ROOTFS_AB" >> "$THOX_FAKE_LOG"\n'
                                          'mkdir -p tools/kernel_flash/images').encode(), 0o755)
    pins = json.loads((common.REPO / "image/jetson-pins.json").read_text())
    rel = dl / "ubuntu" / pins["ubuntu_base"]["release"]
    ubuntu = ubuntu_release(rel, ubuntu_signer, {
        "etc/os-release": b'NAME="Ubuntu"\nVERSION_ID="22.04"\n',
        "etc/machine-id": b"0123456789abcdef0123456789abcdef\n",
        "etc/ssh/ssh_host_ed25519_key": b"-----BEGIN OPENSSH PRIVATE KEY-----\nxx\n",
        "etc/group": b"root:x:0:\nsudo:x:27:\n",
        "var/lib/thox/models/canary.txt": b"canary\n"})
    os.replace(ubuntu_signer.keyring, dl / "ubuntu/ubuntu-archive-keyring.gpg")
    os.link(dl / "ubuntu/ubuntu-archive-keyring.gpg", ubuntu_signer.keyring)
    pins["downloads"]["bsp"]["sha256"] = common.sha256_file(bsp)
    pins["ubuntu_base"]["signing_key"]["fingerprint"] = ubuntu_signer.fingerprint
    pins["thox_data"]["size_mib"] = 64
    pins_file = tmp_path / "pins.json"
    pins_file.write_text(json.dumps(pins))
    monkeypatch.setattr(jetson, "PINS", pins_file)
    monkeypatch.setenv("THOX_JETSON_DL", str(dl))
    monkeypatch.setenv("THOX_CACHE", str(tmp_path / "cache"))       # its own lock and logs
    monkeypatch.setenv("THOX_FAKE_LOG", str(tmp_path / "calls.log"))
    return {"dl": dl, "bsp": bsp, "ubuntu": ubuntu, "pins": pins, "pins_file": pins_file,
            "log": tmp_path / "calls.log"}


# ------------------------------------------------------------------ pins
def test_pins_are_r36_4_with_sha256_and_nvidia_urls():
    pins = jetson.load_pins()
    assert pins["l4t_version"].startswith("36.4")
    for name, d in pins["downloads"].items():
        assert d["url"].startswith("https://developer.nvidia.com/downloads/embedded/l4t/r36_release_v4"), name
        assert d["file"].endswith("_aarch64.tbz2")
        assert d["sha256"] is None or re.fullmatch(r"[0-9a-f]{64}", d["sha256"]), name
        assert d["pin_source"]
    assert re.fullmatch(r"[0-9a-f]{64}", pins["downloads"]["bsp"]["sha256"])
    assert set(pins["downloads"]) == {"bsp"}, "the root fs is built from the BSP, no sample root fs download"
    assert {"agx-orin", "orin-nx", "orin-nano"} <= set(pins["boards"])
    for name, b in pins["boards"].items():
        assert any("{layout}" in a for a in b["flash_args"]), name


# ------------------------------------------------------------------ fetch: checks and failure messages
def test_fetch_uses_cached_file_when_sha256_matches(fixtures):
    got = jetson.fetch("bsp", fixtures["pins"], fixtures["dl"], opener=pytest.fail)
    assert got == fixtures["bsp"]


def test_fetch_sha256_mismatch_is_refused_and_moved_aside(fixtures):
    pins = json.loads(json.dumps(fixtures["pins"]))
    pins["downloads"]["bsp"]["sha256"] = "0" * 64
    with pytest.raises(common.BuildError) as e:
        jetson.fetch("bsp", pins, fixtures["dl"])
    msg = str(e.value)
    assert "sha256 mismatch" in msg and "0" * 64 in msg and common.sha256_file(fixtures["bsp"].with_name(fixtures["bsp"].name + ".bad")) in msg
    assert not fixtures["bsp"].exists()


def test_fetch_without_pin_refuses(fixtures):
    pins = json.loads(json.dumps(fixtures["pins"]))
    pins["downloads"]["bsp"]["sha256"] = None
    with pytest.raises(common.BuildError, match=r"no pinned sha256 for bsp .*-m image pin bsp"):
        jetson.fetch("bsp", pins, fixtures["dl"])


def test_fetch_unreachable_server_says_what_to_do(fixtures, tmp_path):
    pins = json.loads(json.dumps(fixtures["pins"]))
    pins["downloads"]["bsp"]["url"] = "http://127.0.0.1:9/Jetson_Linux_R36.4.3_aarch64.tbz2"   # nothing listens on 9
    empty = tmp_path / "empty"
    with pytest.raises(common.BuildError) as e:
        jetson.fetch("bsp", pins, empty, timeout=5)
    msg = str(e.value)
    assert "cannot download bsp" in msg and "unreachable" in msg and str(empty) in msg
    assert pins["downloads"]["bsp"]["sha256"] in msg
    assert not list(empty.iterdir()), "no partial download is left behind"


def test_pin_records_sha256(fixtures):
    digest = jetson.pin("bsp", fixtures["bsp"], fixtures["pins_file"])
    assert json.loads(fixtures["pins_file"].read_text())["downloads"]["bsp"]["sha256"] == digest
    with pytest.raises(common.BuildError, match="unknown download"):
        jetson.pin("nope", fixtures["bsp"], fixtures["pins_file"])


# ------------------------------------------------------------------ command composition
def test_flash_commands_per_board(tmp_path):
    """Rootfs A/B (ROOTFS_AB=1 in the environment of NVIDIA's script) with the board's layout
    as edited to hold thox-data."""
    pins = jetson.load_pins()
    nano = jetson.Plan(work=tmp_path, board="orin-nano", pins=pins)
    assert jetson.initrd_flash_cmd(nano, no_flash=True) == [
        "env", "ROOTFS_AB=1", "./tools/kernel_flash/l4t_initrd_flash.sh", "--no-flash", "-S", "16384MiB",
        "--external-device", "nvme0n1p1", "-c", "tools/kernel_flash/thox_flash_l4t_t234_nvme_rootfs_ab.xml",
        "-p", "-c bootloader/generic/cfg/flash_t234_qspi.xml", "--showlogs", "--network", "usb0",
        "jetson-orin-nano-devkit", "external"]
    assert jetson.initrd_flash_cmd(nano, no_flash=False)[3] == "--flash-only"
    assert jetson.initrd_flash_cmd(jetson.Plan(work=tmp_path, board="orin-nx", pins=pins), no_flash=True) == \
        jetson.initrd_flash_cmd(nano, no_flash=True)
    agx = jetson.Plan(work=tmp_path, board="agx-orin", pins=pins)
    assert jetson.initrd_flash_cmd(agx, no_flash=True) == [
        "env", "ROOTFS_AB=1", "./tools/kernel_flash/l4t_initrd_flash.sh", "--no-flash", "-S", "16384MiB",
        "-p", "-c bootloader/generic/cfg/thox_flash_t234_qspi_sdmmc.xml", "jetson-agx-orin-devkit", "internal"]
    assert jetson_layout.SLOT_MIB == 16384, "the -S above is the slot size"
    with pytest.raises(common.BuildError, match="unknown board 'tx2'"):
        jetson.initrd_flash_cmd(jetson.Plan(work=tmp_path, board="tx2", pins=pins), no_flash=True)


def _partitions(xml_text: str) -> list[dict]:
    import xml.etree.ElementTree as ET
    dev = ET.fromstring(xml_text).find("device")
    return [{"name": p.get("name"), "id": p.get("id"), **{c.tag: (c.text or "").strip() for c in p}}
            for p in dev.findall("partition")]


def test_layout_gets_thox_data_after_app_b_filling_the_disk():
    out = jetson_layout.add_data_partition(NV_LAYOUT, 1 << 30)
    parts = _partitions(out)
    names = [p["name"] for p in parts]
    assert names == ["master_boot_record", "APP", "esp", "APP_b", "thox-data", "secondary_gpt"]
    data = parts[4]
    assert data["id"] == "12", "the next free partition number"
    assert data["size"] == str(1 << 30) and data["allocation_attribute"] == "0x808"
    assert data["filename"] == "thox-data.ext4" and data["filesystem_type"] == "basic"
    assert data["partition_type_guid"] == "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
    assert parts[3]["allocation_attribute"] == "0x8", "only thox-data takes the rest of the disk"
    slot_bytes = str(jetson_layout.SLOT_MIB << 20)
    assert parts[1]["size"] == parts[3]["size"] == slot_bytes, "APP and APP_b: the bundles' slot size"
    assert {k: v for k, v in parts[1].items() if k != "size"} == \
        {k: v for k, v in _partitions(NV_LAYOUT)[1].items() if k != "size"}, "APP otherwise as NVIDIA wrote it"
    assert out.startswith('<?xml version="1.0"?>') and "fixture: the end of NVIDIA" in out
    with pytest.raises(common.BuildError, match="already has a thox-data partition"):
        jetson_layout.add_data_partition(out, 1 << 30)


def test_layout_with_partitions_after_app_b_gets_a_fixed_thox_data():
    xml = NV_LAYOUT.replace('<partition name="secondary_gpt"', '<partition name="UDA" id="15" type="data">'
                            '<size> 1024 </size></partition>\n        <partition name="secondary_gpt"')
    parts = _partitions(jetson_layout.add_data_partition(xml, 1 << 30))
    assert [p["name"] for p in parts][3:] == ["APP_b", "thox-data", "UDA", "secondary_gpt"]
    assert parts[4]["allocation_attribute"] == "0x8" and parts[4]["id"] == "16"
    assert parts[3]["allocation_attribute"] == "0x808", "APP_b untouched when thox-data is not last"


def test_layout_without_app_b_is_refused(tmp_path):
    single = NV_LAYOUT.replace('name="APP_b"', 'name="UDA"')
    with pytest.raises(common.BuildError, match="no APP_b partition: it is not a rootfs A/B layout"):
        jetson_layout.add_data_partition(single, 1 << 30)
    with pytest.raises(common.BuildError, match="NVIDIA's flash layout tools/kernel_flash/x.xml is not in the BSP"):
        jetson_layout.write_thox_layout(tmp_path, "tools/kernel_flash/x.xml", 1 << 30)
    (tmp_path / "tools/kernel_flash").mkdir(parents=True)
    (tmp_path / "tools/kernel_flash/x.xml").write_text(NV_LAYOUT)
    out = jetson_layout.write_thox_layout(tmp_path, "tools/kernel_flash/x.xml", 1 << 30)
    assert out == tmp_path / "tools/kernel_flash/thox_x.xml" and "thox-data" in out.read_text()


def test_default_user_is_locked_and_named(tmp_path):
    """The user gets the host name the roles wrote into the root fs (the mdns role's); without
    one NVIDIA's helper is not given any."""
    plan = jetson.Plan(work=tmp_path, pins=jetson.load_pins())
    (plan.rootfs / "etc").mkdir(parents=True)
    (plan.rootfs / "etc/hostname").write_text("thox\n")
    mk, lock = jetson.default_user_cmds(plan, "pw")
    assert mk[:7] == ["./tools/l4t_create_default_user.sh", "-u", "thox-admin", "-p", "pw", "-n", "thox"]
    assert "--accept-license" in mk
    assert lock == ["chroot", str(plan.rootfs), "passwd", "-l", "thox-admin"]
    (plan.rootfs / "etc/hostname").unlink()
    assert "-n" not in jetson.default_user_cmds(plan, "pw")[0]


def test_provision_runs_the_same_site_playbook_for_jetson(tmp_path):
    ctx = jetson.context(Namespace(out=str(tmp_path), ansible=True, extra_vars="", board="agx-orin",
                                   llama_wheel="/w/llama.whl"))
    assert ctx.root == jetson.Plan(work=tmp_path / "jetson-orin").rootfs
    cmd = provision.ansible_cmd(ctx, tmp_path / "inv.json", "ansible-playbook")
    assert cmd[:4] == ["ansible-playbook", "-i", str(tmp_path / "inv.json"), str(common.REPO / "ansible/site.yml")]
    ev = json.loads(cmd[cmd.index("-e") + 1])
    assert ev["thox_image_build"] is True and ev["thox_target"] == "jetson-orin"
    assert ev["thox_jetson_board"] == "agx-orin"
    assert ev["thox_api_llama_wheel"] == "/w/llama.whl"
    # the admin account NVIDIA's helper makes is the one the ssh and image roles serve
    assert ev["ssh_user"] == jetson.ADMIN_USER
    assert not {"image_root_partuuid", "image_esp_partuuid"} & set(ev), "no root line on Jetson"
    # L4T's UEFI ESP (partition "esp" of NVIDIA's layout) on /boot/efi: the factory reset flag's place
    assert ev["image_esp_partlabel"] == "esp"
    assert ev["image_data_partlabel"] == jetson_layout.DATA_LABEL, "the image role's fstab mounts thox-data"
    # the apt key comes out of the sha256-pinned BSP
    assert ev["jetson_apt_key_src"] == str(tmp_path / "jetson-orin/Linux_for_Tegra/nv_tegra/jetson-ota-public.key")
    inv = json.loads(provision.ansible_inventory(ctx.root))
    host = inv["all"]["children"]["thox"]["hosts"][str(ctx.root)]
    assert host["ansible_connection"] == "community.general.chroot"


def test_extract_commands(tmp_path):
    plan = jetson.Plan(work=tmp_path, pins=jetson.load_pins())
    assert jetson.extract_cmds(plan, Path("/d/bsp.tbz2")) == [["tar", "-C", str(tmp_path), "-xpf", "/d/bsp.tbz2"]]
    assert jetson.rootfs_extract_cmds(plan)[-1] == [
        "tar", "-C", str(tmp_path / "Linux_for_Tegra/rootfs"), "--numeric-owner", "-xpf",
        str(tmp_path / "Linux_for_Tegra/tools/samplefs/sample_fs.tbz2")]


def test_recovery_mode_detection():
    out = ("Bus 001 Device 002: ID 0955:7523 NVIDIA Corp. APX\n"
           "Bus 001 Device 001: ID 1d6b:0002 Linux Foundation 2.0 root hub\n")
    assert jetson.recovery_mode_devices(out) == [out.splitlines()[0]]
    assert jetson.recovery_mode_devices("Bus 001 Device 001: ID 1d6b:0002 hub\n") == []


def test_binfmt_detection(tmp_path):
    assert not jetson.binfmt_aarch64_ok(tmp_path)
    (tmp_path / "qemu-aarch64").write_text("enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\n")
    assert jetson.binfmt_aarch64_ok(tmp_path)
    (tmp_path / "qemu-aarch64").write_text("disabled\n")
    assert not jetson.binfmt_aarch64_ok(tmp_path)


# ------------------------------------------------------------------ the whole pipeline on fixtures
def test_pipeline_on_fixture_tarballs(fixtures, tmp_path, monkeypatch, capsys):
    require(os.geteuid() == 0, "extracting a root fs with owners needs root")
    real_run = common.run
    recorded = []

    def fake_run(cmd, **kw):
        recorded.append(list(cmd))
        if cmd[0] == "chroot":            # the fixture root fs holds no aarch64 programs
            return subprocess.CompletedProcess(cmd, 0)
        return real_run(cmd, **kw)
    monkeypatch.setattr(jetson, "run", fake_run)
    monkeypatch.setattr(jetson, "check_binfmt", lambda: "fixture")
    out = tmp_path / "out"
    rc = main(["build", "--target", "jetson-orin", "--out", str(out), "--board", "orin-nano", "--no-ansible",
               "--version", "1.0.0"])
    err = capsys.readouterr().err
    assert rc == 0, err
    for i, stage in enumerate(jetson.STAGES, 1):
        assert f"stage {i}/{len(jetson.STAGES)} {stage} done" in err
    calls = fixtures["log"].read_text().splitlines()
    assert [c.split()[0] for c in calls] == ["nv_build_samplefs.sh", "apply_binaries.sh",
                                             "l4t_create_default_user.sh", "l4t_initrd_flash.sh", "ROOTFS_AB=1"]
    assert calls[0] == "nv_build_samplefs.sh --abi aarch64 --distro ubuntu --flavor minimal --version jammy"
    plan = jetson.Plan(work=out / "jetson-orin", board="orin-nano", pins=fixtures["pins"])
    assert calls[3] == " ".join(["l4t_initrd_flash.sh", *jetson.initrd_flash_cmd(plan, no_flash=True)[3:]])
    l4t = out / "jetson-orin/Linux_for_Tegra"
    rootfs = l4t / "rootfs"
    # the root fs is nv_build_samplefs.sh's, made from the verified Ubuntu base tarball
    assert (rootfs / "etc/samplefs-flavor").read_text() == "minimal\n"
    assert (rootfs / "etc/os-release").exists() and (rootfs / "etc/nv_tegra_release").exists()
    served = (out / "jetson-orin/download-shim/ubuntu-base-served.log").read_text()
    assert served.startswith("wget http://cdimage.ubuntu.com/ubuntu-base/releases/22.04/release/")
    # the package: the layout with thox-data, and thox-data's ext4 holding the factory data
    layout = (l4t / "tools/kernel_flash/thox_flash_l4t_t234_nvme_rootfs_ab.xml").read_text()
    assert [p["name"] for p in _partitions(layout)][3:5] == ["APP_b", "thox-data"]
    data = l4t / "bootloader/thox-data.ext4"
    dump = subprocess.run(["debugfs", "-R", "cat /thox/models/canary.txt", str(data)], capture_output=True, text=True)
    assert dump.stdout == "canary\n", dump.stderr
    label = subprocess.run(["dumpe2fs", "-h", str(data)], capture_output=True, text=True).stdout
    assert "Filesystem volume name:   thox-data" in label
    assert not list((rootfs / "var/lib/thox").iterdir()), "THOX_HOME's mount point is left empty"
    assert not list((rootfs / "var/lib/thox-data").iterdir()), "the data partition's mount point is left empty"
    assert (rootfs / "etc/machine-id").read_text() == ""          # finalize: per-device ids removed
    assert not list((rootfs / "etc/ssh").glob("ssh_host_*"))
    assert not (rootfs / "etc/systemd/system/thox-ssh-hostkeys.service").exists(), "the image role's, not run"
    assert ["chroot", str(rootfs), "passwd", "-l", "thox-admin"] in recorded
    assert "IMAGE_ID=thox\nIMAGE_VERSION=1.0.0\n" in (rootfs / "usr/lib/os-release").read_text()
    ready = json.loads((out / "jetson-orin/.package-ready").read_text())
    assert ready["version"] == "1.0.0"
    assert ready["bsp_sha256"] == fixtures["pins"]["downloads"]["bsp"]["sha256"]
    assert ready["rootfs_ab"] is True
    assert ready["ubuntu_base_sha256"] == common.sha256_file(fixtures["ubuntu"]["tarball"])


def test_pipeline_failure_names_the_stage(fixtures, tmp_path, monkeypatch, capsys):
    require(os.geteuid() == 0, "the pipeline needs root")
    pins = json.loads(fixtures["pins_file"].read_text())
    pins["downloads"]["bsp"]["sha256"] = "f" * 64
    fixtures["pins_file"].write_text(json.dumps(pins))
    rc = main(["build", "--target", "jetson-orin", "--out", str(tmp_path / "out"), "--no-ansible"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "image build FAILED in stage 'fetch'" in err and "sha256 mismatch" in err
    assert not (tmp_path / "out/jetson-orin/.package-ready").exists()


def test_pipeline_refuses_a_tampered_ubuntu_base(fixtures, tmp_path, capsys):
    require(os.geteuid() == 0, "the pipeline needs root")
    with open(fixtures["ubuntu"]["tarball"], "ab") as f:
        f.write(b"\0")
    rc = main(["build", "--target", "jetson-orin", "--out", str(tmp_path / "out"), "--no-ansible"])
    err = capsys.readouterr().err
    assert rc == 1 and "FAILED in stage 'fetch'" in err
    assert "Ubuntu's signed SHA256SUMS says" in err
    assert not (tmp_path / "out/jetson-orin").exists(), "nothing is extracted from an unverified download"


def test_bsp_not_in_the_cache_fails_in_one_line(fixtures, tmp_path, capsys):
    """No BSP in the cache and NVIDIA's server unreachable: the build stops at fetch with one
    line saying where to put the file."""
    require(os.geteuid() == 0, "the pipeline needs root")
    pins = json.loads(fixtures["pins_file"].read_text())
    pins["downloads"]["bsp"]["url"] = "http://127.0.0.1:9/Jetson_Linux_R36.4.3_aarch64.tbz2"
    fixtures["pins_file"].write_text(json.dumps(pins))
    fixtures["bsp"].unlink()
    rc = main(["build", "--target", "jetson-orin", "--out", str(tmp_path / "out"), "--no-ansible"])
    err = capsys.readouterr().err
    assert rc == 1
    failed = [line for line in err.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and "stage 'fetch'" in failed[0] and "cannot download bsp" in failed[0]
    assert str(fixtures["dl"]) in failed[0] and "unreachable" in failed[0]


def test_flash_refuses_without_package(tmp_path, capsys):
    require(os.geteuid() == 0, "flashing needs root")
    assert main(["flash", "--out", str(tmp_path)]) == 1
    assert "no flash package" in capsys.readouterr().err


def test_unpinned_input_stops_before_any_download(fixtures, tmp_path, monkeypatch, capsys):
    require(os.geteuid() == 0, "the pipeline needs root")
    pins = json.loads(fixtures["pins_file"].read_text())
    pins["downloads"]["bsp"]["sha256"] = None
    pins["downloads"]["bsp"]["url"] = "http://127.0.0.1:9/never-fetched.tbz2"
    fixtures["pins_file"].write_text(json.dumps(pins))
    fixtures["bsp"].unlink()
    rc = main(["build", "--target", "jetson-orin", "--out", str(tmp_path / "out"), "--no-ansible"])
    err = capsys.readouterr().err
    assert rc == 1 and "FAILED in stage 'fetch'" in err and "no pinned sha256 for bsp" in err
    assert "downloading" not in err
