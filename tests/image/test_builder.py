"""Unit tests of the amd64 image builder's parts (no image is built here: seconds)."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import build
import imagecommon as common
import qemu
from imagecommon import pins, statefiles
from thoxtest import require

KEY = ("-----BEGIN OPENSSH PRIVATE KEY-----\n" + "\n".join(["b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW"] * 4)
       + "\n-----END OPENSSH PRIVATE KEY-----\n").encode()


def test_stage_failure_names_the_stage(capsys):
    st = common.Stages(["one", "two"])
    assert st.run("one", lambda: "fine") == "fine"
    with pytest.raises(common.StageFailed) as e:
        st.run("two", lambda: (_ for _ in ()).throw(common.BuildError("disk full")))
    assert str(e.value).startswith("image build FAILED in stage 'two' after")
    assert "disk full" in str(e.value)
    err = capsys.readouterr().err
    assert "stage 1/2 one done in" in err and "stage 2/2 two ..." in err


def _tree(tmp_path):
    root = tmp_path / "root"
    for d in ("etc/ssh", "var/lib/thox", "var/lib/dbus", "root", "usr/lib", "var/lib/apt/lists", "var/log", "boot"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (root / "etc/ssh/ssh_host_ed25519_key").write_bytes(KEY)
    (root / "var/lib/thox/api_key").write_text("a" * 64)
    (root / "var/lib/thox/config.json").write_text(json.dumps({"api": {"port": 8080}}))
    (root / "root/notes.txt").write_bytes(b"junk " + KEY)
    (root / "usr/lib/libfake.so").write_bytes(b"\x7fELF" + b"\0" * 10 + KEY)   # test vectors in a library
    (root / "var/lib/apt/lists/mirror.example_debian_dists_bookworm_InRelease").write_text(
        "Origin: Debian\nSuite: stable\nCodename: bookworm\nDate: Sat, 08 Nov 2025 09:20:41 UTC\n\nSHA256:\n")
    (root / "var/log/dpkg.log").write_text("lots\n")
    return root


def test_scan_finds_secrets_and_per_device_data(tmp_path):
    root = _tree(tmp_path)
    problems = build.scan_rootfs(root)
    assert "etc/machine-id: secret or per-device file" in problems
    assert "etc/ssh/ssh_host_ed25519_key: secret or per-device file" in problems
    assert "var/lib/thox/api_key: secret or per-device file" in problems
    assert "root/notes.txt holds a private key" in problems
    assert not any("libfake" in p for p in problems), "key blocks inside programs are package constants"
    assert not any("config.json" in p for p in problems), "settings are not secrets"


def _every_secret_file(root: Path) -> list[str]:
    """One file for each name of the app's list (thox.statefiles), with content."""
    home = statefiles.home_in(root)
    names = [str((home / n).relative_to(root)) for n in statefiles.SECRET_FILES]
    names += [str((home / f".{n}.x1y2.tmp").relative_to(root)) for n in statefiles.SECRET_FILES]
    names += [g.replace("*", "thox") for g in statefiles.HOST_SECRET_GLOBS]
    for rel in names:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("per-device or secret\n")
    return names


def test_builder_removes_and_scans_with_the_apps_secret_list(tmp_path, monkeypatch):
    """The builder has no list of its own: every file the app's list names is reported by the
    scan and gone after finalize (etc/machine-id stays, empty: systemd's first-boot marker)."""
    root = _tree(tmp_path)
    (root / "root/notes.txt").unlink()
    names = _every_secret_file(root)
    problems = build.scan_rootfs(root)
    for rel in names:
        assert f"{rel}: secret or per-device file" in problems, rel
    monkeypatch.setattr(build, "run", lambda cmd, **kw: None)
    build.finalize_rootfs(root, "amd64")
    assert build.scan_rootfs(root) == []
    left = [rel for rel in names if (root / rel).exists() and rel != "etc/machine-id"]
    assert left == []
    assert (root / "etc/machine-id").read_text() == ""


def test_finalize_leaves_a_clean_tree(tmp_path, monkeypatch):
    root = _tree(tmp_path)
    calls = []
    monkeypatch.setattr(build, "run", lambda cmd, **kw: calls.append(cmd))
    (root / "root/notes.txt").unlink()
    build.finalize_rootfs(root, "amd64")
    assert build.scan_rootfs(root) == []
    assert (root / "etc/machine-id").read_text() == ""
    assert (root / "etc/hostname").read_text() == "thox\n"
    assert "127.0.1.1\tthox" in (root / "etc/hosts").read_text()
    assert f"PARTUUID={build.ROOT_PARTUUID}\t/\text4" in (root / "etc/fstab").read_text()
    assert (root / "var/log/dpkg.log").read_text() == ""
    assert not list((root / "var/lib/apt/lists").iterdir())
    lists = json.loads((root / "var/lib/thox-image/apt-lists.json").read_text())
    assert lists[0]["date"] == "Sat, 08 Nov 2025 09:20:41 UTC" and lists[0]["codename"] == "bookworm"
    for unit in ("thox-ssh-hostkeys.service", "thox-ssh-import.service", "thox-growroot.service"):
        assert (root / "etc/systemd/system" / unit).exists()
        assert unit in calls[0]
    assert calls[1][-2:] == ["mask", "systemd-firstboot.service"]
    assert "THOX_SSH_USER=root" in (root / "etc/thox/image.conf").read_text()


def test_raw_image_scan(tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * 1000 + KEY + b"\0" * 1000)
    assert len(build.scan_image(img)) == 1
    assert build.scan_image(img, allowed={build.PRIVATE_KEY_RE.search(KEY).group(0)}) == []
    # programs carry the bare armour line as a string: not a key
    img.write_bytes(b"\0-----BEGIN OPENSSH PRIVATE KEY-----\n\0ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/\0")
    assert build.scan_image(img) == []


def test_mmdebstrap_command_caches_debs_and_records_list_dates(tmp_path):
    cmd = build.mmdebstrap_cmd("amd64", tmp_path / "o.tar", tmp_path / "debs", ["systemd", "python3"])
    assert cmd[:3] == ["mmdebstrap", "--mode=root", "--variant=minbase"]
    assert "--include=systemd,python3" in cmd
    assert f"--setup-hook=sync-in {tmp_path / 'debs'} /var/cache/apt/archives/" in cmd
    assert f"--customize-hook=sync-out /var/cache/apt/archives {tmp_path / 'debs'}" in cmd
    assert "--skip=cleanup/apt/lists" in cmd
    assert pins.DEBIAN_SUITE in cmd


def test_playbook_command_uses_chroot_connection_and_image_vars(tmp_path):
    ev = build.image_extra_vars("amd64", Path("/w/llama.whl"), {"x": 1}, Path("/w/wh.tar"), Path("/w/demo.whl"))
    assert ev == {"thox_image_build": True, "thox_target": "generic", "thox_api_llama_wheel": "/w/llama.whl",
                  "thox_api_wheelhouse_tar": "/w/wh.tar", "models_demo_wheel": "/w/demo.whl", "x": 1}
    cmd = build.ansible_cmd(tmp_path, "amd64", Path("site.yml"), tmp_path / "inv.json", ev, "ap")
    assert cmd[:4] == ["ap", "-i", str(tmp_path / "inv.json"), "site.yml"]
    inv = json.loads(build.ansible_inventory(tmp_path))
    assert inv["all"]["children"]["thox"]["hosts"][str(tmp_path)]["ansible_connection"] == "community.general.chroot"


def test_manifest_parsers(tmp_path):
    root = tmp_path
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_text(
        "Package: b\nStatus: install ok installed\nVersion: 2\nArchitecture: amd64\n\n"
        "Package: a\nStatus: deinstall ok config-files\nVersion: 1\n\n"
        "Package: c\nStatus: install ok installed\nVersion: 1:3-1\nArchitecture: all\nDescription: x\n more\n")
    assert build.dpkg_packages(root) == [{"name": "b", "version": "2", "arch": "amd64"},
                                         {"name": "c", "version": "1:3-1", "arch": "all"}]
    meta = root / "opt/thox/venv/lib/python3.11/site-packages/quart-0.20.0.dist-info/METADATA"
    meta.parent.mkdir(parents=True)
    meta.write_text("Metadata-Version: 2.1\nName: Quart\nVersion: 0.20.0\n\nbody\n")
    assert build.python_packages(root) == [{"name": "Quart", "version": "0.20.0", "venv": "/opt/thox/venv"}]
    m = root / "var/lib/thox/models/thox-demo"
    m.mkdir(parents=True)
    (m / "model.gguf").write_bytes(b"GGUF")
    (m / "manifest.json").write_text("{}")
    files = build.model_files(root)
    assert files == [{"model": "thox-demo", "file": "model.gguf", "bytes": 4,
                      "sha256":
                      __import__("hashlib").sha256(b"GGUF").hexdigest()}]


def test_qemu_command_line(tmp_path):
    cmd = qemu.qemu_cmd(tmp_path / "d.qcow2", tmp_path / "vars.fd", api_port=18080, ssh_port=12222,
                        pubkey="ssh-ed25519 AAAA test", console="stdio")
    s = " ".join(cmd)
    assert "accel=tcg" in s and "-cpu max" in s
    assert "hostfwd=tcp:127.0.0.1:18080-:8080" in s and "hostfwd=tcp:127.0.0.1:12222-:22" in s
    assert "io.systemd.credential.binary:thox.ssh_authorized_keys=" in s
    assert f"file={qemu.OVMF_CODE}" in s and "readonly=on" in s
    assert "-serial mon:stdio" in s


def test_failed_build_leaves_no_image(tmp_path, monkeypatch, capsys):
    """A failing stage: exit 1, the stage named, nothing under the final name."""
    monkeypatch.setattr(build, "stage_bootstrap", lambda *a: (_ for _ in ()).throw(common.BuildError("mirror down")))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(build, "CACHE", tmp_path / "cache")      # its own lock, not a real build's
    rc = build.main(["--no-ansible", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1 and "FAILED in stage 'bootstrap'" in err and "mirror down" in err
    assert not (tmp_path / "thox-amd64.img").exists()
    assert not list(tmp_path.glob(".thox-amd64*"))


def test_overlay_units_verify(repo, tmp_path):
    require(shutil.which("systemd-analyze"), "systemd-analyze is not installed (make image-deps: systemd)")
    units = sorted((repo / "image/overlay/etc/systemd/system").glob("*.service"))
    assert units
    p = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, units)], capture_output=True, text=True)
    # units referencing programs that exist only in the image are fine; syntax errors are not
    bad = [l for l in p.stderr.splitlines() if "Unknown" in l or "Failed to parse" in l or "bad-setting" in l]
    assert not bad, p.stderr


def test_the_apps_llama_pin_is_the_pinned_version(repo):
    """pyproject.toml cannot read versions.env: its llama-cpp-python pin must equal it."""
    import tomllib
    deps = tomllib.loads((repo / "app/pyproject.toml").read_text())["project"]["dependencies"]
    assert f"llama-cpp-python=={pins.LLAMA_CPP_PYTHON_VERSION}" in deps
    assert (repo / "versions.env").resolve() == pins.VERSIONS_FILE
