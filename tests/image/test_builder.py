"""Unit tests of the amd64 image builder's parts (no VM is booted here: seconds). The disk
layout, GRUB's files and the update bundles are made for real from a small fake root fs."""
import ast
import json
import os
import subprocess
from argparse import Namespace
from pathlib import Path

import pytest

from image import bootstrap, bundle, common, disk, esp, manifest, provision, qemu, scan, slot
from image.__main__ import main
from image.common import REPO, pins, statefiles
from image.context import Context
from image.targets import amd64

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
    problems = scan.scan_rootfs(root)
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


def test_builder_removes_and_scans_with_the_apps_secret_list(tmp_path):
    """The builder has no list of its own: every file the app's list names is reported by the
    scan and gone after finalize (etc/machine-id stays, empty: systemd's first-boot marker)."""
    root = _tree(tmp_path)
    (root / "root/notes.txt").unlink()
    names = _every_secret_file(root)
    problems = scan.scan_rootfs(root)
    for rel in names:
        assert f"{rel}: secret or per-device file" in problems, rel
    scan.clean_rootfs(root)
    assert scan.scan_rootfs(root) == []
    left = [rel for rel in names if (root / rel).exists() and rel != "etc/machine-id"]
    assert left == []
    assert (root / "etc/machine-id").read_text() == ""


def test_finalize_leaves_a_clean_tree_and_changes_nothing_else(tmp_path):
    """Finalize removes what a build leaves, records the package lists and moves the data
    directory's contents to THOX_HOME's folder in the factory data (the data partition is made
    from it: its top folder root's, 0755; the mount points stay, empty, the data partition's
    root's); every other change to the tree (host name,
    units, fstab, network) is the roles' (the image role)."""
    root = _tree(tmp_path)
    (root / "root/notes.txt").unlink()
    os.chown(root / "var/lib/thox", 999, 995)
    os.chmod(root / "var/lib/thox", 0o750)
    os.chown(root / "var/lib/thox/config.json", 999, 995)
    ctx = Context(target="amd64", arch="amd64", out=tmp_path / "out", root=root, cache=tmp_path / "cache")
    amd64.finalize(ctx)
    assert scan.scan_rootfs(root) == []
    assert (root / "etc/machine-id").read_text() == ""
    assert (root / "var/log/dpkg.log").read_text() == ""
    assert not list((root / "var/lib/apt/lists").iterdir())
    lists = json.loads((root / "var/lib/thox-image/apt-lists.json").read_text())
    assert lists[0]["date"] == "Sat, 08 Nov 2025 09:20:41 UTC" and lists[0]["codename"] == "bookworm"
    for untouched in ("etc/hostname", "etc/hosts", "etc/fstab", "etc/systemd", "etc/thox", "etc/resolv.conf"):
        assert not (root / untouched).exists(), untouched
    factory, home = root / slot.FACTORY_DATA, root / slot.FACTORY_HOME
    assert list((root / "var/lib/thox").iterdir()) == [] and list((root / "var/lib/thox-data").iterdir()) == []
    assert sorted(p.name for p in factory.iterdir()) == ["thox"]
    assert sorted(p.name for p in home.iterdir()) == ["config.json"], "the API key is gone, the config kept"
    for d in (root / "var/lib/thox", home, home / "config.json"):
        assert (d.stat().st_uid, d.stat().st_gid) == (999, 995), d
    assert home.stat().st_mode & 0o777 == 0o750
    for d in (factory, root / "var/lib/thox-data"):
        assert (d.stat().st_uid, d.stat().st_gid, d.stat().st_mode & 0o777) == (0, 0, 0o755), d


def test_raw_image_scan(tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * 1000 + KEY + b"\0" * 1000)
    assert len(scan.scan_image(img)) == 1
    assert scan.scan_image(img, allowed={scan.PRIVATE_KEY_RE.search(KEY).group(0)}) == []
    # programs carry the bare armour line as a string: not a key
    img.write_bytes(b"\0-----BEGIN OPENSSH PRIVATE KEY-----\n\0ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/\0")
    assert scan.scan_image(img) == []


def test_mmdebstrap_command_caches_debs_and_records_list_dates(tmp_path):
    cmd = bootstrap.mmdebstrap_cmd("amd64", tmp_path / "o.tar", tmp_path / "debs", ["systemd", "python3"])
    assert cmd[:3] == ["mmdebstrap", "--mode=root", "--variant=minbase"]
    assert "--include=systemd,python3" in cmd
    assert f"--setup-hook=sync-in {tmp_path / 'debs'} /var/cache/apt/archives/" in cmd
    assert f"--customize-hook=sync-out /var/cache/apt/archives {tmp_path / 'debs'}" in cmd
    assert "--skip=cleanup/apt/lists" in cmd
    assert pins.DEBIAN_SUITE in cmd


def _build_args(**kw) -> Namespace:
    return Namespace(**{"out": "build", "ansible": True, "refresh": False, "extra_vars": "", "board": "orin-nano",
                        "llama_wheel": None, **kw})


def test_playbook_command_uses_chroot_connection_and_image_vars(tmp_path):
    """The variables of the roles an amd64 build sets: an image build, the generic target, the
    partitions its fstab mounts (the disk layout's), the inputs of earlier stages, the caller's."""
    ctx = amd64.context(_build_args(extra_vars='{"x": 1}'))
    ctx.llama_wheel, ctx.wheelhouse, ctx.demo_wheel = Path("/w/llama.whl"), Path("/w/wh.tar"), Path("/w/demo.whl")
    assert ctx.ansible_vars() == {
        "thox_image_build": True, "thox_target": "generic", "thox_api_llama_wheel": "/w/llama.whl",
        "thox_api_wheelhouse_tar": "/w/wh.tar", "models_demo_wheel": "/w/demo.whl", "x": 1,
        "image_esp_partlabel": "esp", "image_data_partlabel": "thox-data"}
    ctx.keyring = Path("/k/ca.cert.pem")
    assert ctx.ansible_vars()["updates_keyring_cert"] == "/k/ca.cert.pem"
    cmd = provision.ansible_cmd(ctx, tmp_path / "inv.json", "ap")
    assert cmd[:4] == ["ap", "-i", str(tmp_path / "inv.json"), str(REPO / "ansible/site.yml")]
    assert json.loads(cmd[cmd.index("-e") + 1]) == ctx.ansible_vars()
    inv = json.loads(provision.ansible_inventory(tmp_path))
    assert inv["all"]["children"]["thox"]["hosts"][str(tmp_path)]["ansible_connection"] == "community.general.chroot"


def test_manifest_parsers(tmp_path):
    root = tmp_path
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_text(
        "Package: b\nStatus: install ok installed\nVersion: 2\nArchitecture: amd64\n\n"
        "Package: a\nStatus: deinstall ok config-files\nVersion: 1\n\n"
        "Package: c\nStatus: install ok installed\nVersion: 1:3-1\nArchitecture: all\nDescription: x\n more\n")
    assert manifest.dpkg_packages(root) == [{"name": "b", "version": "2", "arch": "amd64"},
                                         {"name": "c", "version": "1:3-1", "arch": "all"}]
    meta = root / "opt/thox/venv/lib/python3.11/site-packages/quart-0.20.0.dist-info/METADATA"
    meta.parent.mkdir(parents=True)
    meta.write_text("Metadata-Version: 2.1\nName: Quart\nVersion: 0.20.0\n\nbody\n")
    assert manifest.python_packages(root) == [{"name": "Quart", "version": "0.20.0", "venv": "/opt/thox/venv"}]
    m = root / "var/lib/thox/models/thox-demo"
    m.mkdir(parents=True)
    (m / "model.gguf").write_bytes(b"GGUF")
    (m / "manifest.json").write_text("{}")
    files = manifest.model_files(root)
    assert files == [{"model": "thox-demo", "file": "model.gguf", "bytes": 4,
                      "sha256":
                      __import__("hashlib").sha256(b"GGUF").hexdigest()}]
    slot.move_factory_data(root)
    assert manifest.model_files(root) == files, "after finalize: the models in the factory data"


def test_qemu_command_line(tmp_path):
    cmd = qemu.qemu_cmd(tmp_path / "d.qcow2", tmp_path / "vars.fd", api_port=18080, ssh_port=12222,
                        pubkey="ssh-ed25519 AAAA test", console="stdio")
    s = " ".join(cmd)
    assert "accel=tcg" in s and "-cpu max" in s
    assert "hostfwd=tcp:127.0.0.1:18080-:8080" in s and "hostfwd=tcp:127.0.0.1:12222-:22" in s
    assert "io.systemd.credential.binary:thox.ssh_authorized_keys=" in s
    assert f"file={qemu.OVMF_CODE}" in s and "readonly=on" in s
    assert "-serial mon:stdio" in s
    assert "-device i6300esb" in s and "-action watchdog=reset" in s and "ICH9-LPC.noreboot=false" in s
    assert "-no-reboot" not in cmd, "a reboot in the guest restarts it on the same disk"
    assert f"format=qcow2,file={tmp_path / 'd.qcow2'}" in s
    raw = qemu.qemu_cmd(tmp_path / "d.img", tmp_path / "vars.fd", api_port=1, ssh_port=2, pubkey=None, console="x")
    assert f"format=raw,file={tmp_path / 'd.img'}" in " ".join(raw)


def test_run_keeps_a_given_disk(tmp_path):
    """--disk: made as an overlay of the image when missing, booted as it is when present (its
    writes and firmware variables kept); the default overlay is made anew each run."""
    image = tmp_path / "img.raw"
    image.write_bytes(b"\0" * 4096)
    d = tmp_path / "keep.qcow2"
    overlay, vars_fd = qemu.prepare(image, tmp_path / "run", disk=d)
    assert overlay == d and d.exists()
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 512", str(d)], check=True, capture_output=True)
    vars_fd.write_bytes(b"vars of the first run")
    assert qemu.prepare(image, tmp_path / "run", disk=d) == (d, vars_fd)
    read = subprocess.run(["qemu-io", "-c", "read -P 0x5a 0 512", str(d)], capture_output=True, text=True)
    assert "Pattern verification failed" not in read.stdout + read.stderr and read.returncode == 0
    assert vars_fd.read_bytes() == b"vars of the first run"
    fresh, _ = qemu.prepare(image, tmp_path / "run")
    assert fresh == tmp_path / "run/disk.qcow2" and vars_fd.read_bytes() != b"vars of the first run"


def test_failed_build_leaves_no_image(tmp_path, monkeypatch, capsys):
    """A failing stage: exit 1, the stage named, nothing under the final name."""
    monkeypatch.setattr(bootstrap, "stage_bootstrap",
                        lambda ctx: (_ for _ in ()).throw(common.BuildError("mirror down")))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("THOX_CACHE", str(tmp_path / "cache"))      # its own lock, not a real build's
    rc = main(["build", "--no-ansible", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1 and "FAILED in stage 'bootstrap'" in err and "mirror down" in err
    assert not (tmp_path / "thox-amd64.img").exists()
    assert not list(tmp_path.glob(".thox-amd64*"))


def _imports(path: Path) -> set[str]:
    """The modules of the image package that a module imports (relative or absolute)."""
    pkg = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg.rsplit(".", node.level - 1)[0] if node.level else ""
            mod = ".".join(p for p in (base, node.module) if p)
            for alias in node.names:
                name = f"{mod}.{alias.name}"
                found.add(name if (REPO / (name.replace(".", "/") + ".py")).exists() else mod)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m == "image" or m.startswith("image.")}


def test_image_package_has_no_import_cycle_and_small_modules():
    """`python3 -m image` is a package of small modules whose imports form no cycle; none
    edits sys.path."""
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts): p for p in (REPO / "image").rglob("*.py")}
    modules = {n.removesuffix(".__init__"): p for n, p in modules.items()}
    graph = {name: _imports(p) - {name} for name, p in modules.items()}
    for name, p in modules.items():
        assert len(p.read_text().splitlines()) <= 450, name
        assert "sys.path" not in p.read_text(), name
    state: dict[str, str] = {}

    def visit(n: str, stack: list[str]) -> None:
        state[n] = "open"
        for m in sorted(graph.get(n, ())):
            assert state.get(m) != "open", f"import cycle: {' -> '.join(stack + [n, m])}"
            if m not in state:
                visit(m, stack + [n])
        state[n] = "done"
    for n in sorted(graph):
        if n not in state:
            visit(n, [])
    assert "image.targets.jetson" in graph["image.__main__"] and graph["image.targets.amd64"] >= {
        "image.bootstrap", "image.provision", "image.scan", "image.esp", "image.disk", "image.manifest"}
    assert "image.targets.jetson" not in graph["image.targets.amd64"]
    assert "image.targets.amd64" not in graph["image.targets.jetson"]


def test_the_apps_llama_pin_is_the_pinned_version(repo):
    """pyproject.toml cannot read versions.env: its llama-cpp-python pin must equal it."""
    import tomllib
    deps = tomllib.loads((repo / "app/pyproject.toml").read_text())["project"]["dependencies"]
    assert f"llama-cpp-python=={pins.LLAMA_CPP_PYTHON_VERSION}" in deps
    assert (repo / "versions.env").resolve() == pins.VERSIONS_FILE


# ------------------------------------------------------------------ disk, GRUB, bundles
KERNEL_VERSION = "6.1.0-99-amd64"


def _fake_root(tmp_path: Path) -> Path:
    """A small provisioned-looking root fs: os-release, a kernel and initrd behind the /boot
    links, and the data directory (owned by a service user) that finalize moves away."""
    root = tmp_path / "rootfs"
    for d in ("usr/lib", "etc", "boot", "var/lib/thox/models/m"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "usr/lib/os-release").write_text('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\n')
    (root / "etc/os-release").symlink_to("../usr/lib/os-release")
    (root / f"boot/vmlinuz-{KERNEL_VERSION}").write_bytes(b"kernel")
    (root / f"boot/initrd.img-{KERNEL_VERSION}").write_bytes(b"initrd")
    (root / "boot/vmlinuz").symlink_to(f"vmlinuz-{KERNEL_VERSION}")
    (root / "boot/initrd.img").symlink_to(f"initrd.img-{KERNEL_VERSION}")
    (root / "var/lib/thox/config.json").write_text("{}")
    (root / "var/lib/thox/models/m/model.gguf").write_bytes(b"GGUF" * 1000)
    for p in [root / "var/lib/thox", *(root / "var/lib/thox").rglob("*")]:
        os.chown(p, 999, 995)
    os.chmod(root / "var/lib/thox", 0o750)
    slot.move_factory_data(root)
    return root


def _debugfs(img: Path, offset_mib: int, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, f"{img}?offset={offset_mib << 20}"], capture_output=True,
                          text=True, check=True).stdout


def test_disk_layout_slots_and_data_partition(tmp_path):
    """The GPT of a built disk: ESP, thox-a and thox-b of the same fixed size, thox-data last;
    slot A's ext4 holds the version in os-release (the root fs it was made from unchanged),
    slot B is empty, thox-data is the factory data: root's top folder (0755), thox/ with its
    owner and mode."""
    root = _fake_root(tmp_path)
    ctx = Context(target="amd64", arch="amd64", out=tmp_path / "out", root=root, cache=tmp_path / "cache")
    esp_file, img = tmp_path / "esp.img", tmp_path / "disk.img"
    esp.stage_esp(ctx, esp_file)
    disk.stage_disk(ctx, esp_file, img, "7.1")
    table = json.loads(subprocess.run(["sfdisk", "-J", str(img)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    parts = table["partitions"]
    assert [p["name"] for p in parts] == ["esp", "thox-a", "thox-b", "thox-data"]
    assert [p["uuid"].lower() for p in parts] == [disk.ESP_PARTUUID, disk.SLOT_A_PARTUUID, disk.SLOT_B_PARTUUID,
                                                  disk.DATA_PARTUUID]
    mib = (1 << 20) // table["sectorsize"]
    assert parts[0]["size"] == disk.ESP_MIB * mib
    assert parts[1]["size"] == parts[2]["size"] == slot.SLOT_MIB * mib
    assert parts[3]["start"] == parts[2]["start"] + parts[2]["size"], "the data partition is the last one"
    assert img.stat().st_size == (parts[3]["start"] + parts[3]["size"]) * table["sectorsize"] + (1 << 20)
    a, b, data = (p["start"] // mib for p in parts[1:])
    release = _debugfs(img, a, "cat /usr/lib/os-release")
    assert "ID=debian" in release and "IMAGE_ID=thox\nIMAGE_VERSION=7.1\n" in release
    assert "IMAGE_VERSION" not in (root / "usr/lib/os-release").read_text(), "the cached root fs is not changed"
    assert f'Fast link dest: "vmlinuz-{KERNEL_VERSION}"' in _debugfs(img, a, "stat /boot/vmlinuz")
    assert "config.json" in _debugfs(img, a, f"ls /{slot.FACTORY_HOME}")
    with open(img, "rb") as f:
        f.seek(b << 20)
        assert f.read(1 << 20).count(0) == 1 << 20, "slot B holds nothing in a fresh image"
    stat = _debugfs(img, data, "stat /")
    assert "Mode:  0755" in stat and "User:     0   Group:     0" in stat, stat
    stat = _debugfs(img, data, "stat /thox")
    assert "Mode:  0750" in stat and "User:   999   Group:   995" in stat, stat
    assert "model.gguf" in _debugfs(img, data, "ls /thox/models/m")
    label = subprocess.run(["dumpe2fs", "-h", f"{img}?offset={data << 20}"], capture_output=True, text=True).stdout
    assert "Filesystem volume name:   thox-data" in label


def test_grub_config_and_initial_env(tmp_path):
    """grub.cfg is RAUC's documented A/B script (ORDER, X_OK, X_TRY via load_env/save_env on the
    ESP) with one entry per slot that loads the slot's own /boot/vmlinuz; valid GRUB script.
    The ESP holds GRUB as the removable-media loader, grub.cfg and the initial grubenv."""
    cfg = esp.grub_cfg()
    for line in ('set ORDER="A B"', "load_env --file $prefix/grubenv", "save_env --file $prefix/grubenv A_TRY B_TRY",
                 'if [ "$OK" -eq 1 -a "$TRY" -eq 0 ]; then', 'if [ "$any_ok" -eq 0 ]; then'):
        assert line in cfg, line
    for name, n, puuid in (("A", 2, disk.SLOT_A_PARTUUID), ("B", 3, disk.SLOT_B_PARTUUID)):
        assert (f"linux ($bootdisk,gpt{n})/boot/vmlinuz root=PARTUUID={puuid} rw rootwait console=tty0 "
                f"console=ttyS0,115200 net.ifnames=1 panic=30 rauc.slot={name}\n") in cfg
        assert f"initrd ($bootdisk,gpt{n})/boot/initrd.img\n" in cfg
    assert cfg.index('menuentry "Thox slot A') < cfg.index('menuentry "Thox slot B'), "entry 0 is A, 1 is B"
    (tmp_path / "grub.cfg").write_text(cfg)
    subprocess.run(["grub-script-check", str(tmp_path / "grub.cfg")], check=True)

    root = _fake_root(tmp_path)
    ctx = Context(target="amd64", arch="amd64", out=tmp_path, root=root, cache=tmp_path / "cache")
    esp.stage_esp(ctx, tmp_path / "esp.img")
    env = {"MTOOLS_SKIP_CHECK": "1", **os.environ}
    listing = subprocess.run(["mdir", "-i", str(tmp_path / "esp.img"), "-/", "-b", "::/"], capture_output=True,
                             text=True, env=env, check=True).stdout.split()
    files = sorted(f for f in listing if not f.endswith("/"))
    assert files == ["::/EFI/BOOT/BOOTX64.EFI", "::/EFI/thox/grub.cfg", "::/EFI/thox/grubenv", "::/thox/README.txt"]
    for name in ("grubenv", "grub.cfg"):
        subprocess.run(["mcopy", "-i", str(tmp_path / "esp.img"), f"::/EFI/thox/{name}", str(tmp_path / f"esp-{name}")],
                       env=env, check=True)
    assert (tmp_path / "esp-grub.cfg").read_text() == cfg
    assert (tmp_path / "esp-grubenv").stat().st_size == 1024
    values = subprocess.run(["grub-editenv", str(tmp_path / "esp-grubenv"), "list"], capture_output=True, text=True,
                            check=True).stdout.splitlines()
    assert sorted(values) == sorted(["ORDER=A B", "A_OK=1", "B_OK=0", "A_TRY=0", "B_TRY=0"])
    efi = subprocess.run(["mtype", "-i", str(tmp_path / "esp.img"), "::/EFI/BOOT/BOOTX64.EFI"], capture_output=True,
                         env=env, check=True).stdout
    assert efi[:2] == b"MZ" and b"/EFI/thox" in efi, "a PE binary with $prefix /EFI/thox"


def _rauc_info(keyring: Path, raucb: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["rauc", "info", f"--keyring={keyring}", "--output-format=json", str(raucb)],
                          capture_output=True, text=True)


def test_bundle_is_signed_verity_and_refused_with_another_ca(tmp_path):
    """A bundle of the fake root fs, signed with the cache's test CA: `rauc info` with that CA
    verifies it (compatible thox-amd64, the version, format verity, one ext4 image of a slot's
    size); a bundle signed by another CA is refused against this CA, and the other way round.
    The overlay's files are in the bundle's slot, the root fs is unchanged."""
    root = _fake_root(tmp_path)
    ours = bundle.test_ca(tmp_path / "cache")
    assert ours.test and bundle.is_test_cert(ours.keyring) and "PRIVATE" not in ours.keyring.read_text()
    assert bundle.test_ca(tmp_path / "cache") == ours and ours.cert.read_bytes() == ours.cert.read_bytes()
    overlay = tmp_path / "overlay"
    (overlay / "etc").mkdir(parents=True)
    (overlay / "etc/thox-overlay").write_text("bad version\n")
    out = tmp_path / "out" / bundle.bundle_name("3-bad")
    out.parent.mkdir()
    bundle.make_bundle(root, out, "3-bad", ours, overlay=overlay)
    assert out.name == "thox-amd64-3-bad.raucb" and not list(out.parent.glob(".*"))
    p = _rauc_info(ours.keyring, out)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert (info["compatible"], info["version"]) == ("thox-amd64", "3-bad")
    text = subprocess.run(["rauc", "info", f"--keyring={ours.keyring}", str(out)], capture_output=True, text=True)
    assert "Bundle Format: \tverity" in text.stdout, text.stdout
    assert [i["rootfs"]["filename"] for i in info["images"]] == ["rootfs.ext4"]
    assert info["images"][0]["rootfs"]["size"] == slot.SLOT_MIB << 20
    assert not (root / "etc/thox-overlay").exists()
    subprocess.run(["unsquashfs", "-q", "-n", "-d", str(tmp_path / "content"), str(out)], check=True,
                   capture_output=True)
    fs = tmp_path / "content/rootfs.ext4"
    assert _debugfs(fs, 0, "cat /etc/thox-overlay") == "bad version\n"
    assert "IMAGE_VERSION=3-bad" in _debugfs(fs, 0, "cat /usr/lib/os-release")

    other = bundle.test_ca(tmp_path / "other-cache")
    theirs = tmp_path / "out" / bundle.bundle_name("2")
    bundle.make_bundle(root, theirs, "2", other)
    for keyring, raucb in ((ours.keyring, theirs), (other.keyring, out)):
        p = _rauc_info(keyring, raucb)
        assert p.returncode != 0 and "signature verification failed" in p.stderr, p.stderr
    entry = bundle.record(tmp_path / "out/manifest.json", out, "3-bad")
    assert json.loads((tmp_path / "out/manifest.json").read_text())["bundles"] == [entry]
    assert entry["sha256"] == pins.sha256_file(out) and entry["version"] == "3-bad"


def test_release_refuses_the_test_certificate(tmp_path):
    """RELEASE=1 refuses the throwaway test CA, also when it is handed in as RAUC_CERT/RAUC_KEYRING;
    a certificate of another name is accepted; a bundle needs a key."""
    test = bundle.test_ca(tmp_path / "cache")
    with pytest.raises(common.BuildError, match=r"^RELEASE=1 refuses the test certificate .*Thox TEST"):
        bundle.signing(tmp_path / "cache", {"RELEASE": "1"}, need_key=True)
    given = {"RAUC_CERT": str(test.cert), "RAUC_KEY": str(test.key), "RAUC_KEYRING": str(test.keyring), "RELEASE": "1"}
    with pytest.raises(common.BuildError, match="refuses the test certificate"):
        bundle.signing(tmp_path / "cache", given, need_key=True)
    with pytest.raises(common.BuildError, match="refuses the test certificate"):
        bundle.signing(tmp_path / "cache", {"RAUC_KEYRING": str(test.keyring), "RELEASE": "1"}, need_key=False)
    assert bundle.signing(tmp_path / "cache", {**given, "RELEASE": ""}, need_key=True).keyring == test.keyring
    key, cert = tmp_path / "rel.key", tmp_path / "rel.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/O=Thox/CN=Thox release", "-days", "30"],
                   check=True, capture_output=True)
    rel = bundle.signing(tmp_path / "cache", {"RAUC_CERT": str(cert), "RAUC_KEY": str(key), "RELEASE": "1"},
                         need_key=True)
    assert (rel.cert, rel.keyring, rel.test) == (cert, cert, False)
    with pytest.raises(common.BuildError, match="needs both RAUC_CERT and RAUC_KEY"):
        bundle.signing(tmp_path / "cache", {"RAUC_CERT": str(cert)}, need_key=True)


def test_release_build_stops_with_one_line(tmp_path, monkeypatch, capsys):
    """`python3 -m image bundle` with RELEASE=1 and no keys: exit 1, the stage named, one line
    saying why; no bundle."""
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("THOX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RELEASE", "1")
    for var in ("RAUC_CERT", "RAUC_KEY", "RAUC_KEYRING"):
        monkeypatch.delenv(var, raising=False)
    rc = main(["bundle", "--no-ansible", "--version", "2", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and "FAILED in stage 'keyring'" in err
    assert [line for line in err.splitlines() if "RELEASE=1 refuses the test certificate" in line]
    assert not list((tmp_path / "out").glob("*.raucb"))


def test_version_and_os_release():
    assert slot.default_version() == pins.VERSIONS["THOX_VERSION"]
    assert slot.os_release("ID=debian\nIMAGE_VERSION=1\n", "2") == "ID=debian\nIMAGE_ID=thox\nIMAGE_VERSION=2\n"
    for bad in ("", "../x", "a b", "-1", "x" * 65):
        with pytest.raises(common.BuildError):
            slot.check_version(bad)
    assert bundle.manifest_text("2").splitlines()[:3] == ["[update]", "compatible=thox-amd64", "version=2"]
    assert "[bundle]\nformat=verity\n" in bundle.manifest_text("2")
