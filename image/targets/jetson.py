"""Jetson Orin flash package: `make image TARGET=jetson-orin`, then `make flash`.

    python3 -m image build --target jetson-orin [--board orin-nano|orin-nx|agx-orin] [--ssh-pubkey FILE]
    python3 -m image bundle --target jetson-orin --version V [--board ...] [--overlay DIR]
    python3 -m image flash [--board ...] [--out build]
    python3 -m image pin NAME FILE      record the sha256 of a checked download in jetson-pins.json

Stages of `build`:
  fetch       L4T BSP from NVIDIA (or the cache), sha256-checked against jetson-pins.json; Ubuntu's
              arm64 base tarball, checked against Ubuntu's SHA256SUMS signed by the pinned CD image key
  keyring     the CA certificate the device accepts bundles from (RAUC_KEYRING, or the cache's
              throwaway test CA; RELEASE=1 refuses that one), for the updates role
  extract     BSP -> <work>/Linux_for_Tegra (its nv_tegra/jetson-ota-public.key is the apt key)
  binfmt      qemu-user (binfmt_misc) must run aarch64 binaries: the roles run inside the arm64 root fs
  rootfs      the BSP's tools/samplefs/nv_build_samplefs.sh (minimal, jammy) on the verified base
              tarball -> Linux_for_Tegra/rootfs
  provision   ansible/site.yml into Linux_for_Tegra/rootfs over the chroot connection,
              thox_image_build=true, thox_target=jetson-orin, ssh_user=thox-admin (the same roles
              as every other target; the image role installs the first-boot units)
  binaries    apply_binaries.sh (NVIDIA's userspace drivers into the root fs)
  user        l4t_create_default_user.sh: the admin user, with the host name the roles set;
              its password is locked (ssh key only)
  finalize    no host keys / machine-id / API key in the root fs (same as amd64); /var/lib/thox's
              contents move to /usr/lib/thox/factory-data/thox (the thox-data ext4 is made from them);
              IMAGE_ID/IMAGE_VERSION in /usr/lib/os-release; /etc/fstab must mount thox-data
  package     the board's rootfs A/B layout (APP, APP_b of jetson_layout.SLOT_MIB) plus thox-data,
              the thox-data ext4, then ROOTFS_AB=1 l4t_initrd_flash.sh -S <SLOT_MIB>MiB --no-flash:
              the flash images, flashed later by `make flash`

Stages of `bundle` (build/thox-jetson-orin-<V>.raucb, compatible thox-jetson-orin):
  fetch, keyring  as above (no BSP in the cache: the same one-line failure as `build`)
  package     the flash package's root fs, made by `build` from these very downloads for this board
  bundle      that root fs as a SLOT_MIB ext4 of version V (overlay laid over it, the board's DTB
              under /boot/dtb as flash.sh puts it in system.img), signed, checked with `rauc info`
              against the signer's keyring and the root fs's own /etc/rauc/keyring.pem

Every step is a command built by a function below, so tests check the composition
without NVIDIA's files (tests/image/test_jetson.py uses fixture tarballs).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import subprocess
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .. import bundle, manifest, provision, scan, slot, wheel
from ..common import REPO, BuildError, StageFailed, Stages, cache_dir, log, run, sha256_file
from ..context import Context
from . import jetson_layout, jetson_rootfs

PINS = Path(os.environ.get("THOX_JETSON_PINS", REPO / "image" / "jetson-pins.json"))
# the admin account NVIDIA's helper makes; the roles' ssh_user, the key's owner at first boot
ADMIN_USER = "thox-admin"
L4T = "Linux_for_Tegra"              # NVIDIA's tree, under <out>/jetson-orin/
WHEELHOUSE_ARGS = ["--platform", "manylinux2014_aarch64", "--python-version", "3.10", "--implementation", "cp"]
STAGES = ["fetch", "keyring", "extract", "binfmt", "rootfs", "provision", "binaries", "user", "finalize", "package"]
BUNDLE_STAGES = ["fetch", "keyring", "package", "bundle"]
TARGET = "jetson-orin"
COMPATIBLE = f"thox-{TARGET}"                # RAUC's compatible in system.conf and in every bundle
EXTLINUX = "boot/extlinux/extlinux.conf"     # what UEFI's L4TLauncher boots a slot from
FSTAB_DATA = re.compile(rf"^PARTLABEL={re.escape(jetson_layout.DATA_LABEL)}\s+/{slot.DATA_MOUNT}\s+ext4\s", re.M)
# THOX_HOME: the data partition's folder bind-mounted on it
FSTAB_HOME = re.compile(rf"^/{slot.DATA_MOUNT}/{slot.HOME_NAME}\s+/{slot.HOME_MOUNT}\s+none\s+bind\b", re.M)
ESP_LABEL = "esp"                            # the UEFI ESP in NVIDIA's flash layout, on /boot/efi
APT_KEY = "nv_tegra/jetson-ota-public.key"   # NVIDIA's apt key, inside the sha256-pinned BSP
DATA_FS_UUID = str(uuid.uuid5(slot.FS_NAMESPACE, "jetson-orin thox-data"))


def load_pins(path: Path | None = None) -> dict:
    return json.loads(Path(path or PINS).read_text())


# ---------------------------------------------------------------- fetch
def fetch(name: str, pins: dict, dl_dir: Path, *, opener=urllib.request.urlopen, timeout: float = 30) -> Path:
    """The pinned download NAME in dl_dir: reused when present, else downloaded; always sha256-checked."""
    d = pins["downloads"][name]
    want = d.get("sha256")
    if not want:
        raise BuildError(
            f"no pinned sha256 for {name} ({d['file']}) in {PINS.name}: refusing to use an unchecked download. "
            f"Download {d['url']} on a machine with internet, compare it with NVIDIA's published checksum, then "
            f"run `python3 -m image pin {name} FILE` and commit the pin.")
    dst = jetson_rootfs.download(
        d["url"], dl_dir / d["file"], what=name, opener=opener, timeout=timeout,
        hint=(f"NVIDIA's server is unreachable from here (no internet?). Copy {d['file']} (sha256 {want}) "
              f"into {dl_dir}/ from a machine that has it, then run the build again."))
    got = sha256_file(dst)
    if got != want:
        bad = dst.with_name(dst.name + ".bad")
        os.replace(dst, bad)
        raise BuildError(f"sha256 mismatch for {d['file']}: expected {want}, got {got}. "
                         f"The file was moved aside to {bad}; download it again.")
    return dst


def pin(name: str, file: Path, path: Path | None = None) -> str:
    path = Path(path or PINS)
    pins = load_pins(path)
    if name not in pins["downloads"]:
        raise BuildError(f"unknown download {name}; known: {', '.join(pins['downloads'])}")
    digest = sha256_file(file)
    pins["downloads"][name]["sha256"] = digest
    pins["downloads"][name]["pin_source"] = f"pinned from {file.name} with python3 -m image pin"
    path.write_text(json.dumps(pins, indent=2) + "\n")
    return digest


# ---------------------------------------------------------------- command composition
@dataclass
class Plan:
    """Where NVIDIA's tree goes and which board; every L4T command is derived from it."""
    work: Path                       # holds Linux_for_Tegra/
    board: str = "orin-nano"
    pins: dict = field(default_factory=load_pins)
    ssh_pubkey: str | None = None
    version: str = field(default_factory=slot.default_version)

    @property
    def l4t(self) -> Path:
        return self.work / L4T

    @property
    def rootfs(self) -> Path:
        return self.l4t / "rootfs"

    @property
    def board_cfg(self) -> dict:
        boards = self.pins["boards"]
        if self.board not in boards:
            raise BuildError(f"unknown board {self.board!r}; choose one of: {', '.join(sorted(boards))}")
        return boards[self.board]


def context(args: argparse.Namespace) -> Context:
    out = Path(args.out).resolve()
    llama = getattr(args, "llama_wheel", None)
    return Context(target=TARGET, arch="arm64", out=out,
                   root=out / TARGET / L4T / "rootfs", cache=cache_dir(),
                   use_ansible=args.ansible, extra_vars=json.loads(args.extra_vars) if args.extra_vars else {},
                   target_vars={"thox_target": TARGET, "thox_jetson_board": args.board,
                                "ssh_user": ADMIN_USER,
                                "jetson_apt_key_src": str(out / TARGET / L4T / APT_KEY),
                                # the image role's fstab mounts thox-data, and L4T's UEFI ESP
                                # (partition "esp") on /boot/efi: the factory reset flag's place
                                "image_esp_partlabel": ESP_LABEL,
                                "image_data_partlabel": jetson_layout.DATA_LABEL},
                   llama_wheel=Path(llama) if llama else None)


def extract_cmds(plan: Plan, bsp: Path) -> list[list[str]]:
    return [["tar", "-C", str(plan.work), "-xpf", str(bsp)]]


def rootfs_extract_cmds(plan: Plan) -> list[list[str]]:
    """NVIDIA's freshly built sample root fs into Linux_for_Tegra/rootfs."""
    sample = plan.l4t / jetson_rootfs.SAMPLEFS_DIR / jetson_rootfs.SAMPLEFS_OUT
    return [["mkdir", "-p", str(plan.rootfs)],
            ["tar", "-C", str(plan.rootfs), "--numeric-owner", "-xpf", str(sample)]]


def apply_binaries_cmd(plan: Plan) -> list[str]:
    return ["./apply_binaries.sh"]


def hostname_of(root: Path) -> str | None:
    """The host name the roles wrote into the root fs (the mdns role), if any."""
    f = root / "etc/hostname"
    return (f.read_text().strip() or None) if f.is_file() else None


def default_user_cmds(plan: Plan, password: str) -> list[list[str]]:
    """NVIDIA's helper makes the user (skips oem-config) and, given one, writes the host name
    (the roles' own: left out, the helper would write its default); then the password is
    locked: ssh keys only."""
    hostname = hostname_of(plan.rootfs)
    return [["./tools/l4t_create_default_user.sh", "-u", ADMIN_USER, "-p", password,
             *(["-n", hostname] if hostname else []), "--accept-license"],
            ["chroot", str(plan.rootfs), "passwd", "-l", ADMIN_USER]]


def initrd_flash_cmd(plan: Plan, *, no_flash: bool) -> list[str]:
    """NVIDIA's initrd flash with rootfs A/B (APP, APP_b) and the board's layout as edited by
    jetson_layout (the flash args name it as {layout}); -S: the root fs image (system.img) is
    as large as a slot, the size a bundle's ext4 has."""
    cfg = plan.board_cfg
    mode = ["--no-flash"] if no_flash else ["--flash-only"]
    layout = jetson_layout.thox_layout_path(cfg["layout"])
    args = [a.replace("{layout}", layout) for a in cfg["flash_args"]]
    return ["env", "ROOTFS_AB=1", "./tools/kernel_flash/l4t_initrd_flash.sh", *mode,
            "-S", f"{jetson_layout.SLOT_MIB}MiB", *args, cfg["board"], cfg["storage"]]


# ---------------------------------------------------------------- checks
def binfmt_aarch64_ok(binfmt_dir: Path = Path("/proc/sys/fs/binfmt_misc")) -> bool:
    entry = binfmt_dir / "qemu-aarch64"
    return entry.exists() and entry.read_text().splitlines()[0].strip() == "enabled"


def check_binfmt() -> str:
    if os.uname().machine == "aarch64":
        return "native aarch64"
    if not binfmt_aarch64_ok():
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], capture_output=True)
    if not binfmt_aarch64_ok():
        raise BuildError("aarch64 binaries cannot run here: binfmt_misc has no enabled qemu-aarch64 entry. "
                         "Install qemu-user-static and binfmt-support (`make image-deps`).")
    return "qemu-aarch64 binfmt enabled"


def recovery_mode_devices(lsusb_output: str) -> list[str]:
    """USB ids of Jetsons in recovery mode (vendor 0955, NVIDIA APX)."""
    return [line for line in lsusb_output.splitlines() if " 0955:" in line]


# ---------------------------------------------------------------- stages
def fetch_all(plan: Plan, dl: Path) -> dict[str, Path]:
    """The BSP (sha256 pin) and Ubuntu's base tarball (signed SHA256SUMS), both verified."""
    files = {"bsp": fetch("bsp", plan.pins, dl)}
    files.update(jetson_rootfs.ubuntu_files(plan.pins, dl))
    key = plan.pins["ubuntu_base"]["signing_key"]["fingerprint"]
    jetson_rootfs.verify_ubuntu_base(files["tarball"], files["sums"], files["signature"], files["keyring"], key)
    return files


def stage_extract(ctx: Context, plan: Plan, files: dict[str, Path]) -> str:
    (plan.work / ".package-ready").unlink(missing_ok=True)
    if plan.work.exists():
        shutil.rmtree(plan.work)
    plan.work.mkdir(parents=True)
    for c in extract_cmds(plan, files["bsp"]):
        run(c, logfile=ctx.logdir / "jetson.log")
    if not (plan.l4t / APT_KEY).is_file():
        raise BuildError(f"the BSP has no {L4T}/{APT_KEY}: the apt key the jetson role installs comes from there")
    return str(plan.l4t)


def stage_rootfs(ctx: Context, plan: Plan, files: dict[str, Path]) -> str:
    """nv_build_samplefs.sh, handed the verified Ubuntu base tarball, then its output into rootfs/."""
    samplefs = plan.l4t / jetson_rootfs.SAMPLEFS_DIR
    served = jetson_rootfs.write_download_shim(plan.work / "download-shim", files["tarball"],
                                               plan.pins["ubuntu_base"]["release"])
    path = f"{served.parent}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    (samplefs / jetson_rootfs.SAMPLEFS_OUT).unlink(missing_ok=True)
    run(jetson_rootfs.samplefs_cmd(plan.pins), cwd=samplefs, env={"PATH": path}, logfile=ctx.logdir / "jetson.log")
    handed = jetson_rootfs.check_served(served)
    if not (samplefs / jetson_rootfs.SAMPLEFS_OUT).is_file():
        raise BuildError(f"nv_build_samplefs.sh wrote no {jetson_rootfs.SAMPLEFS_OUT} in {samplefs}")
    for c in rootfs_extract_cmds(plan):
        run(c, logfile=ctx.logdir / "jetson.log")
    return f"{plan.pins['samplefs']['flavor']} {plan.pins['samplefs']['version']} ({handed.split()[1].rsplit('/', 1)[1]})"


def stage_provision(ctx: Context) -> str:
    """The roles into the sample root fs, with the app and its dependencies for its Python
    (Ubuntu 22.04: CPython 3.10, aarch64)."""
    if not ctx.use_ansible:
        return "skipped (--no-ansible)"
    wheel.stage_wheelhouse(ctx, *WHEELHOUSE_ARGS, llama_wheels=ctx.llama_wheel.parent if ctx.llama_wheel else None)
    wheel.stage_demo_wheel(ctx)
    return provision.apply_roles(ctx)


def stage_user(plan: Plan) -> str:
    pw = secrets.token_urlsafe(24)       # never stored: the account is locked right after
    for c in default_user_cmds(plan, pw):
        run(c, cwd=plan.l4t, logfile=None)
    if plan.ssh_pubkey:
        ssh = plan.rootfs / "home" / ADMIN_USER / ".ssh"
        ssh.mkdir(parents=True, exist_ok=True)
        (ssh / "authorized_keys").write_text(plan.ssh_pubkey + "\n")
        run(["chroot", str(plan.rootfs), "sh", "-c",
             f"chown -R {ADMIN_USER}: /home/{ADMIN_USER}/.ssh && chmod 700 /home/{ADMIN_USER}/.ssh "
             f"&& chmod 600 /home/{ADMIN_USER}/.ssh/authorized_keys"])
    return f"user {ADMIN_USER} (password locked{', ssh key set' if plan.ssh_pubkey else ''})"


def stage_keyring(ctx: Context, *, need_key: bool = False) -> tuple[bundle.Signing, str]:
    """The signing material: the CA certificate the image trusts (the updates role installs
    it) and, for a bundle, the certificate and key that sign it."""
    sign = bundle.signing(ctx.cache, need_key=need_key)
    ctx.keyring = sign.keyring
    return sign, f"{'test CA ' if sign.test else ''}{sign.keyring}"


def stage_finalize(ctx: Context, plan: Plan) -> str:
    """Same as amd64, except that the owner's public key (SSH_PUBKEY) stays: it is wanted.
    The image's version goes into os-release; with the roles applied, /etc/fstab must mount
    thox-data at /var/lib/thox-data and bind its thox/ on /var/lib/thox (NVIDIA's packages, installed after the roles, must not undo it)."""
    keep = ctx.root / "home" / ADMIN_USER / ".ssh/authorized_keys"
    saved = keep.read_bytes() if keep.exists() else None
    manifest.record_package_lists(ctx.root)
    scan.clean_rootfs(ctx.root)
    problems = [p for p in scan.scan_rootfs(ctx.root) if not p.startswith(f"home/{ADMIN_USER}/.ssh/authorized_keys")]
    if saved is not None:
        keep.write_bytes(saved)
    if problems:
        raise BuildError("secret or per-device data in the root fs: " + "; ".join(problems))
    fstab = ctx.root / "etc/fstab"
    text = fstab.read_text() if fstab.is_file() else ""
    if ctx.use_ansible and not (FSTAB_DATA.search(text) and FSTAB_HOME.search(text)):
        raise BuildError(f"{fstab} does not mount PARTLABEL={jetson_layout.DATA_LABEL} at /{slot.DATA_MOUNT} "
                         f"and bind /{slot.DATA_MOUNT}/{slot.HOME_NAME} on /{slot.HOME_MOUNT}: "
                         "the data would be written into the root slot and lost at the next update")
    slot.move_factory_data(ctx.root)
    rel = ctx.root / slot.OS_RELEASE
    rel.write_text(slot.os_release(rel.read_text() if rel.exists() else "", plan.version))
    return f"clean, version {plan.version}"


def stage_package(ctx: Context, plan: Plan) -> str:
    """The board's layout with thox-data, its ext4 image, then the flash images (--no-flash)."""
    part_mib, data_mib = plan.pins["thox_data"]["size_mib"], slot.data_mib(plan.rootfs)
    if data_mib > part_mib:
        raise BuildError(f"the factory data needs a {data_mib} MiB thox-data; the layout's is {part_mib} MiB "
                         "(thox_data.size_mib in jetson-pins.json)")
    layout = jetson_layout.write_thox_layout(plan.l4t, plan.board_cfg["layout"], part_mib << 20)
    image = plan.l4t / "bootloader" / jetson_layout.DATA_IMAGE
    image.unlink(missing_ok=True)
    slot.make_data_fs(plan.rootfs, image, data_mib, DATA_FS_UUID, logfile=ctx.logdir / "jetson.log")
    run(initrd_flash_cmd(plan, no_flash=True), cwd=plan.l4t, logfile=ctx.logdir / "jetson.log")
    return f"ROOTFS_AB=1 l4t_initrd_flash.sh --no-flash done ({layout.name}, {image.name})"


def build(ctx: Context, plan: Plan) -> int:
    dl = Path(os.environ.get("THOX_JETSON_DL", ctx.cache / "jetson"))
    st = Stages(STAGES)
    done = plan.work / ".package-ready"
    log_l4t = ctx.logdir / "jetson.log"
    try:
        plan.board_cfg  # unknown board: fail before any download
        slot.check_version(plan.version)
        files = st.run("fetch", fetch_all, plan, dl)
        st.run("keyring", stage_keyring, ctx)
        st.run("extract", stage_extract, ctx, plan, files)
        st.run("binfmt", check_binfmt)
        st.run("rootfs", stage_rootfs, ctx, plan, files)
        st.run("provision", stage_provision, ctx)
        st.run("binaries", lambda: run(apply_binaries_cmd(plan), cwd=plan.l4t, logfile=log_l4t)
               and "apply_binaries.sh done")
        st.run("user", stage_user, plan)
        st.run("finalize", stage_finalize, ctx, plan)
        st.run("package", stage_package, ctx, plan)
        done.write_text(json.dumps({"board": plan.board, "version": plan.version,
                                    "l4t": plan.pins["l4t_version"], "rootfs_ab": True,
                                    "bsp_sha256": sha256_file(files["bsp"]),
                                    "ubuntu_base": files["tarball"].name,
                                    "ubuntu_base_sha256": sha256_file(files["tarball"])}) + "\n")
    except StageFailed as e:
        log(str(e).splitlines()[0])
        for line in str(e).splitlines()[1:][-20:]:
            log("  " + line)
        return 1
    log(f"flash package ready in {plan.l4t} ({st.total:.0f}s). Put the board in recovery mode and run `make flash`.")
    return 0


def flash(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    plan = Plan(work=out / "jetson-orin", board=args.board)
    ready = plan.work / ".package-ready"
    if not ready.exists():
        log(f"no flash package in {plan.l4t}: run `make image TARGET=jetson-orin` first")
        return 1
    meta = json.loads(ready.read_text())
    if meta.get("board") != plan.board:
        log(f"the package was made for board {meta.get('board')}, not {plan.board} (pass --board)")
        return 1
    lsusb = subprocess.run(["lsusb"], capture_output=True, text=True).stdout if shutil.which("lsusb") else ""
    if not recovery_mode_devices(lsusb):
        log("no Jetson in recovery mode on USB (lsusb shows no 0955:xxxx device). Power it off, hold the "
            "RECOVERY button (Orin Nano/NX devkit: jumper pins 9-10 FC REC/GND of the button header), power on, "
            "connect the USB-C port to this machine, then run `make flash` again.")
        return 1
    cmd = initrd_flash_cmd(plan, no_flash=False)
    log("flashing: " + " ".join(cmd))
    return subprocess.call(cmd, cwd=plan.l4t)
