"""Unit tests of the amd64 image builder's parts (no image is built here: seconds)."""
import ast
import json
import os
from argparse import Namespace
from pathlib import Path

import pytest

from image import bootstrap, common, manifest, provision, qemu, scan
from image.__main__ import main
from image.common import REPO, pins, statefiles
from image.context import Context
from image.disk import ESP_PARTUUID, ROOT_PARTUUID
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
    """Finalize removes what a build leaves and records the package lists; every other change
    to the tree (host name, units, fstab, network) is the roles' (the image role)."""
    root = _tree(tmp_path)
    (root / "root/notes.txt").unlink()
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
        "image_root_partuuid": ROOT_PARTUUID, "image_esp_partuuid": ESP_PARTUUID}
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
