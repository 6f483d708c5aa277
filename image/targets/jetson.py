"""Jetson Orin flash package: `make image TARGET=jetson-orin`, then `make flash`.

    python3 -m image build --target jetson-orin [--board orin-nano|orin-nx|agx-orin] [--ssh-pubkey FILE]
    python3 -m image flash [--board ...] [--out build]
    python3 -m image pin NAME FILE      record the sha256 of a checked download in jetson-pins.json

Stages of `build`:
  fetch       L4T BSP + sample root fs from NVIDIA (or the cache), sha256-checked against jetson-pins.json
  extract     BSP -> <work>/Linux_for_Tegra, sample root fs -> Linux_for_Tegra/rootfs
  binfmt      qemu-user (binfmt_misc) must run aarch64 binaries: the roles run inside the arm64 root fs
  provision   ansible/site.yml into Linux_for_Tegra/rootfs over the chroot connection,
              thox_image_build=true, thox_target=jetson-orin, ssh_user=thox-admin (the same roles
              as every other target; the image role installs the first-boot units)
  binaries    apply_binaries.sh (NVIDIA's userspace drivers into the root fs)
  user        l4t_create_default_user.sh: the admin user, with the host name the roles set;
              its password is locked (ssh key only)
  finalize    no host keys / machine-id / API key in the root fs (same as amd64)
  package     l4t_initrd_flash.sh --no-flash: the flash images, flashed later by `make flash`

Every step is a command built by a function below, so tests check the composition
without NVIDIA's files (tests/image/test_jetson.py uses fixture tarballs).
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .. import manifest, provision, scan, wheel
from ..common import REPO, BuildError, StageFailed, Stages, cache_dir, log, run, sha256_file
from ..context import Context

PINS = Path(os.environ.get("THOX_JETSON_PINS", REPO / "image" / "jetson-pins.json"))
# the admin account NVIDIA's helper makes; the roles' ssh_user, the key's owner at first boot
ADMIN_USER = "thox-admin"
L4T = "Linux_for_Tegra"              # NVIDIA's tree, under <out>/jetson-orin/
WHEELHOUSE_ARGS = ["--platform", "manylinux2014_aarch64", "--python-version", "3.10", "--implementation", "cp"]
STAGES = ["fetch", "extract", "binfmt", "provision", "binaries", "user", "finalize", "package"]


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
    dl_dir.mkdir(parents=True, exist_ok=True)
    dst = dl_dir / d["file"]
    if not dst.exists():
        part = dst.with_name(dst.name + ".part")
        log(f"downloading {d['url']}")
        try:
            with opener(d["url"], timeout=timeout) as r, open(part, "wb") as f:
                shutil.copyfileobj(r, f, 1 << 20)
        except (urllib.error.URLError, OSError, ValueError) as e:
            part.unlink(missing_ok=True)
            reason = getattr(e, "reason", e)
            raise BuildError(
                f"cannot download {name} from {d['url']}: {reason}. NVIDIA's server is unreachable from here "
                f"(no internet?). Copy {d['file']} (sha256 {want}) into {dl_dir}/ from a machine that has it, "
                "then run the build again.") from e
        os.replace(part, dst)
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
    return Context(target="jetson-orin", arch="arm64", out=out,
                   root=out / "jetson-orin" / L4T / "rootfs", cache=cache_dir(),
                   use_ansible=args.ansible, extra_vars=json.loads(args.extra_vars) if args.extra_vars else {},
                   target_vars={"thox_target": "jetson-orin", "thox_jetson_board": args.board,
                                "ssh_user": ADMIN_USER},
                   llama_wheel=Path(args.llama_wheel) if args.llama_wheel else None)


def extract_cmds(plan: Plan, bsp: Path, sample: Path) -> list[list[str]]:
    return [["tar", "-C", str(plan.work), "-xpf", str(bsp)],
            ["mkdir", "-p", str(plan.rootfs)],
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
    cfg = plan.board_cfg
    mode = ["--no-flash"] if no_flash else ["--flash-only"]
    return ["./tools/kernel_flash/l4t_initrd_flash.sh", *mode, *cfg["flash_args"], cfg["board"], cfg["storage"]]


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
    names = ("bsp", "sample_rootfs")
    for n in names:          # every pin first: no 700 MB download before a refusal
        if not plan.pins["downloads"][n].get("sha256"):
            fetch(n, plan.pins, dl)
    return {n: fetch(n, plan.pins, dl) for n in names}


def stage_extract(ctx: Context, plan: Plan, files: dict[str, Path]) -> str:
    (plan.work / ".package-ready").unlink(missing_ok=True)
    if plan.work.exists():
        shutil.rmtree(plan.work)
    plan.work.mkdir(parents=True)
    for c in extract_cmds(plan, files["bsp"], files["sample_rootfs"]):
        run(c, logfile=ctx.logdir / "jetson.log")
    return str(plan.l4t)


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


def stage_finalize(ctx: Context) -> str:
    """Same as amd64, except that the owner's public key (SSH_PUBKEY) stays: it is wanted."""
    keep = ctx.root / "home" / ADMIN_USER / ".ssh/authorized_keys"
    saved = keep.read_bytes() if keep.exists() else None
    manifest.record_package_lists(ctx.root)
    scan.clean_rootfs(ctx.root)
    problems = [p for p in scan.scan_rootfs(ctx.root) if not p.startswith(f"home/{ADMIN_USER}/.ssh/authorized_keys")]
    if saved is not None:
        keep.write_bytes(saved)
    if problems:
        raise BuildError("secret or per-device data in the root fs: " + "; ".join(problems))
    return "clean"


def build(ctx: Context, plan: Plan) -> int:
    dl = Path(os.environ.get("THOX_JETSON_DL", ctx.cache / "jetson"))
    st = Stages(STAGES)
    done = plan.work / ".package-ready"
    log_l4t = ctx.logdir / "jetson.log"
    try:
        plan.board_cfg  # unknown board: fail before any download
        files = st.run("fetch", fetch_all, plan, dl)
        st.run("extract", stage_extract, ctx, plan, files)
        st.run("binfmt", check_binfmt)
        st.run("provision", stage_provision, ctx)
        st.run("binaries", lambda: run(apply_binaries_cmd(plan), cwd=plan.l4t, logfile=log_l4t)
               and "apply_binaries.sh done")
        st.run("user", stage_user, plan)
        st.run("finalize", stage_finalize, ctx)
        st.run("package", lambda: run(initrd_flash_cmd(plan, no_flash=True), cwd=plan.l4t, logfile=log_l4t)
               and "l4t_initrd_flash.sh --no-flash done")
        done.write_text(json.dumps({"board": plan.board, "l4t": plan.pins["l4t_version"],
                                    "bsp_sha256": sha256_file(files["bsp"]),
                                    "sample_rootfs_sha256": sha256_file(files["sample_rootfs"])}) + "\n")
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
