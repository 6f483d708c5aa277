"""Jetson flash package: pins, command composition and failure messages, with fixture
tarballs standing in for NVIDIA's BSP and sample root fs (nothing is downloaded)."""
import io
import json
import os
import re
import subprocess
import tarfile
from argparse import Namespace
from pathlib import Path

import pytest
from thoxtest import require

from image import common, provision
from image.__main__ import main
from image.targets import jetson

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


@pytest.fixture
def fixtures(tmp_path, monkeypatch):
    """Fake BSP + sample root fs tarballs, a pins file pinning them, a download dir."""
    dl = tmp_path / "dl"
    dl.mkdir()
    bsp = dl / "Jetson_Linux_R36.4.3_aarch64.tbz2"
    with tarfile.open(bsp, "w:bz2") as t:
        _add(t, "Linux_for_Tegra", kind=tarfile.DIRTYPE, mode=0o755)
        _add(t, "Linux_for_Tegra/apply_binaries.sh", FAKE_SCRIPT.format(
            name="apply_binaries.sh", extra='test -d rootfs/etc || exit 3\ntouch rootfs/etc/nv_tegra_release').encode(), 0o755)
        _add(t, "Linux_for_Tegra/tools/l4t_create_default_user.sh", FAKE_SCRIPT.format(
            name="l4t_create_default_user.sh", extra='mkdir -p rootfs/home/thox-admin').encode(), 0o755)
        _add(t, "Linux_for_Tegra/tools/kernel_flash/l4t_initrd_flash.sh", FAKE_SCRIPT.format(
            name="l4t_initrd_flash.sh", extra='mkdir -p tools/kernel_flash/images').encode(), 0o755)
    sample = dl / "Tegra_Linux_Sample-Root-Filesystem_R36.4.3_aarch64.tbz2"
    with tarfile.open(sample, "w:bz2") as t:
        for d in ("etc", "etc/ssh", "var", "var/lib", "var/lib/dbus", "home"):
            _add(t, d, kind=tarfile.DIRTYPE, mode=0o755)
        _add(t, "etc/os-release", b'NAME="Ubuntu"\nVERSION_ID="22.04"\n')
        _add(t, "etc/machine-id", b"0123456789abcdef0123456789abcdef\n")
        _add(t, "etc/ssh/ssh_host_ed25519_key", b"-----BEGIN OPENSSH PRIVATE KEY-----\nxx\n", 0o600)
        _add(t, "etc/group", b"root:x:0:\nsudo:x:27:\n")
    pins = json.loads((common.REPO / "image/jetson-pins.json").read_text())
    pins["downloads"]["bsp"]["sha256"] = common.sha256_file(bsp)
    pins["downloads"]["sample_rootfs"]["sha256"] = common.sha256_file(sample)
    pins_file = tmp_path / "pins.json"
    pins_file.write_text(json.dumps(pins))
    monkeypatch.setattr(jetson, "PINS", pins_file)
    monkeypatch.setenv("THOX_JETSON_DL", str(dl))
    monkeypatch.setenv("THOX_CACHE", str(tmp_path / "cache"))       # its own lock and logs
    monkeypatch.setenv("THOX_FAKE_LOG", str(tmp_path / "calls.log"))
    return {"dl": dl, "bsp": bsp, "sample": sample, "pins": pins, "pins_file": pins_file, "log": tmp_path / "calls.log"}


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
    assert {"agx-orin", "orin-nx", "orin-nano"} <= set(pins["boards"])


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
    pins["downloads"]["sample_rootfs"]["sha256"] = None
    with pytest.raises(common.BuildError, match=r"no pinned sha256 for sample_rootfs .*-m image pin sample_rootfs"):
        jetson.fetch("sample_rootfs", pins, fixtures["dl"])


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
    digest = jetson.pin("sample_rootfs", fixtures["sample"], fixtures["pins_file"])
    assert json.loads(fixtures["pins_file"].read_text())["downloads"]["sample_rootfs"]["sha256"] == digest
    with pytest.raises(common.BuildError, match="unknown download"):
        jetson.pin("nope", fixtures["sample"], fixtures["pins_file"])


# ------------------------------------------------------------------ command composition
def test_flash_commands_per_board(tmp_path):
    pins = jetson.load_pins()
    nano = jetson.Plan(work=tmp_path, board="orin-nano", pins=pins)
    cmd = jetson.initrd_flash_cmd(nano, no_flash=True)
    assert cmd[0] == "./tools/kernel_flash/l4t_initrd_flash.sh" and cmd[1] == "--no-flash"
    assert cmd[-2:] == ["jetson-orin-nano-devkit", "nvme0n1p1"]
    assert "--external-device" in cmd and "tools/kernel_flash/flash_l4t_t234_nvme.xml" in cmd
    assert jetson.initrd_flash_cmd(nano, no_flash=False)[1] == "--flash-only"
    agx = jetson.Plan(work=tmp_path, board="agx-orin", pins=pins)
    assert jetson.initrd_flash_cmd(agx, no_flash=True) == [
        "./tools/kernel_flash/l4t_initrd_flash.sh", "--no-flash", "jetson-agx-orin-devkit", "internal"]
    with pytest.raises(common.BuildError, match="unknown board 'tx2'"):
        jetson.initrd_flash_cmd(jetson.Plan(work=tmp_path, board="tx2", pins=pins), no_flash=True)


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
    assert not {"image_root_partuuid", "image_esp_partuuid"} & set(ev), "NVIDIA's flash tools write the fstab"
    inv = json.loads(provision.ansible_inventory(ctx.root))
    host = inv["all"]["children"]["thox"]["hosts"][str(ctx.root)]
    assert host["ansible_connection"] == "community.general.chroot"


def test_extract_commands(tmp_path):
    plan = jetson.Plan(work=tmp_path, pins=jetson.load_pins())
    cmds = jetson.extract_cmds(plan, Path("/d/bsp.tbz2"), Path("/d/rootfs.tbz2"))
    assert cmds[0] == ["tar", "-C", str(tmp_path), "-xpf", "/d/bsp.tbz2"]
    assert cmds[-1] == ["tar", "-C", str(tmp_path / "Linux_for_Tegra/rootfs"), "--numeric-owner", "-xpf", "/d/rootfs.tbz2"]


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
    rc = main(["build", "--target", "jetson-orin", "--out", str(out), "--board", "orin-nano", "--no-ansible"])
    err = capsys.readouterr().err
    assert rc == 0, err
    for i, stage in enumerate(jetson.STAGES, 1):
        assert f"stage {i}/{len(jetson.STAGES)} {stage} done" in err
    calls = fixtures["log"].read_text().splitlines()
    assert [c.split()[0] for c in calls] == ["apply_binaries.sh", "l4t_create_default_user.sh", "l4t_initrd_flash.sh"]
    assert calls[2] == "l4t_initrd_flash.sh --no-flash " + " ".join(
        fixtures["pins"]["boards"]["orin-nano"]["flash_args"] + ["jetson-orin-nano-devkit", "nvme0n1p1"])
    rootfs = out / "jetson-orin/Linux_for_Tegra/rootfs"
    assert (rootfs / "etc/os-release").exists() and (rootfs / "etc/nv_tegra_release").exists()
    assert (rootfs / "etc/machine-id").read_text() == ""          # finalize: per-device ids removed
    assert not list((rootfs / "etc/ssh").glob("ssh_host_*"))
    assert not (rootfs / "etc/systemd/system/thox-ssh-hostkeys.service").exists(), "the image role's, not run"
    assert ["chroot", str(rootfs), "passwd", "-l", "thox-admin"] in recorded
    ready = json.loads((out / "jetson-orin/.package-ready").read_text())
    assert ready["bsp_sha256"] == fixtures["pins"]["downloads"]["bsp"]["sha256"]


def test_pipeline_failure_names_the_stage(fixtures, tmp_path, monkeypatch, capsys):
    require(os.geteuid() == 0, "the pipeline needs root")
    pins = json.loads(fixtures["pins_file"].read_text())
    pins["downloads"]["sample_rootfs"]["sha256"] = "f" * 64
    fixtures["pins_file"].write_text(json.dumps(pins))
    rc = main(["build", "--target", "jetson-orin", "--out", str(tmp_path / "out"), "--no-ansible"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "image build FAILED in stage 'fetch'" in err and "sha256 mismatch" in err
    assert not (tmp_path / "out/jetson-orin/.package-ready").exists()


def test_flash_refuses_without_package(tmp_path, capsys):
    require(os.geteuid() == 0, "flashing needs root")
    assert main(["flash", "--out", str(tmp_path)]) == 1
    assert "no flash package" in capsys.readouterr().err


def test_unpinned_input_stops_before_any_download(fixtures, tmp_path, monkeypatch, capsys):
    require(os.geteuid() == 0, "the pipeline needs root")
    pins = json.loads(fixtures["pins_file"].read_text())
    pins["downloads"]["sample_rootfs"]["sha256"] = None
    pins["downloads"]["bsp"]["url"] = "http://127.0.0.1:9/never-fetched.tbz2"
    fixtures["pins_file"].write_text(json.dumps(pins))
    fixtures["bsp"].unlink()
    rc = main(["build", "--target", "jetson-orin", "--out", str(tmp_path / "out"), "--no-ansible"])
    err = capsys.readouterr().err
    assert rc == 1 and "FAILED in stage 'fetch'" in err and "no pinned sha256 for sample_rootfs" in err
    assert "downloading" not in err
