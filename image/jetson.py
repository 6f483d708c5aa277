#!/usr/bin/env python3
"""Jetson Orin flash package: `make image TARGET=jetson-orin`, then `make flash`.

    python3 image/jetson.py build [--board orin-nano|orin-nx|agx-orin] [--out build] [--ssh-pubkey FILE]
    python3 image/jetson.py flash [--board ...] [--out build]
    python3 image/jetson.py pin NAME FILE       record the sha256 of a checked download in jetson-pins.json

Stages of `build`:
  fetch       L4T BSP + sample root fs from NVIDIA (or the cache), sha256-checked against jetson-pins.json
  extract     BSP -> <work>/Linux_for_Tegra, sample root fs -> Linux_for_Tegra/rootfs
  binfmt      qemu-user (binfmt_misc) must run aarch64 binaries: the roles run inside the arm64 root fs
  provision   ansible/site.yml into Linux_for_Tegra/rootfs over the chroot connection,
              thox_image_build=true, thox_target=jetson-orin (the same roles as every other target)
  binaries    apply_binaries.sh (NVIDIA's userspace drivers into the root fs)
  user        l4t_create_default_user.sh: admin user, hostname thox; its password is locked (ssh key only)
  finalize    first-boot units, no host keys / machine-id / API key in the root fs (same as amd64)
  package     l4t_initrd_flash.sh --no-flash: the flash images, flashed later by `make flash`

Every step is a command built by a function below, so tests check the composition
without NVIDIA's files (tests/image/test_jetson.py uses fixture tarballs).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from imagecommon import CACHE, REPO, BuildError, StageFailed, Stages, log, run, sha256_file  # noqa: E402

PINS = Path(os.environ.get("THOX_JETSON_PINS", Path(__file__).resolve().parent / "jetson-pins.json"))
ADMIN_USER = "thox-admin"
HOSTNAME = "thox"
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
            f"run `python3 image/jetson.py pin {name} FILE` and commit the pin.")
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
    pins["downloads"][name]["pin_source"] = f"pinned from {file.name} with image/jetson.py pin"
    path.write_text(json.dumps(pins, indent=2) + "\n")
    return digest


# ---------------------------------------------------------------- command composition
@dataclass
class Plan:
    """Where everything goes and which board; every command is derived from it."""
    work: Path                       # holds Linux_for_Tegra/
    board: str = "orin-nano"
    pins: dict = field(default_factory=load_pins)
    ssh_pubkey: str | None = None
    llama_wheel: Path | None = None
    wheelhouse: Path | None = None
    demo_wheel: Path | None = None
    extra_vars: dict = field(default_factory=dict)

    @property
    def l4t(self) -> Path:
        return self.work / "Linux_for_Tegra"

    @property
    def rootfs(self) -> Path:
        return self.l4t / "rootfs"

    @property
    def board_cfg(self) -> dict:
        boards = self.pins["boards"]
        if self.board not in boards:
            raise BuildError(f"unknown board {self.board!r}; choose one of: {', '.join(sorted(boards))}")
        return boards[self.board]


def extract_cmds(plan: Plan, bsp: Path, sample: Path) -> list[list[str]]:
    return [["tar", "-C", str(plan.work), "-xpf", str(bsp)],
            ["mkdir", "-p", str(plan.rootfs)],
            ["tar", "-C", str(plan.rootfs), "--numeric-owner", "-xpf", str(sample)]]


def ansible_extra_vars(plan: Plan) -> dict:
    ev = {"thox_image_build": True, "thox_target": "jetson-orin", "thox_jetson_board": plan.board}
    if plan.llama_wheel:
        ev["thox_api_llama_wheel"] = str(plan.llama_wheel)
    if plan.wheelhouse:
        ev["thox_api_wheelhouse_tar"] = str(plan.wheelhouse)
    if plan.demo_wheel:
        ev["models_demo_wheel"] = str(plan.demo_wheel)
    ev.update(plan.extra_vars)
    return ev


def provision_cmd(plan: Plan, inventory: Path, playbook_bin: str) -> list[str]:
    import build  # the amd64 builder composes the same ansible command
    return build.ansible_cmd(plan.rootfs, "jetson-orin", REPO / "ansible/site.yml", inventory,
                             ansible_extra_vars(plan), playbook_bin)


def apply_binaries_cmd(plan: Plan) -> list[str]:
    return ["./apply_binaries.sh"]


def default_user_cmds(plan: Plan, password: str) -> list[list[str]]:
    """NVIDIA's helper makes the user (skips oem-config); then its password is locked: ssh keys only."""
    return [["./tools/l4t_create_default_user.sh", "-u", ADMIN_USER, "-p", password, "-n", HOSTNAME,
             "--accept-license"],
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


# ---------------------------------------------------------------- pipeline
def build(args) -> int:
    out = Path(args.out).resolve()
    work = out / "jetson-orin"
    dl = Path(os.environ.get("THOX_JETSON_DL", CACHE / "jetson"))
    logdir = CACHE / "logs"
    pubkey = Path(args.ssh_pubkey).read_text().strip() if args.ssh_pubkey else None
    plan = Plan(work=work, board=args.board, pins=load_pins(), ssh_pubkey=pubkey,
                llama_wheel=Path(args.llama_wheel) if args.llama_wheel else None,
                extra_vars=json.loads(args.extra_vars) if args.extra_vars else {})
    st = Stages(STAGES)
    done = work / ".package-ready"
    try:
        plan.board_cfg  # unknown board: fail before any download
        def fetch_all():
            names = ("bsp", "sample_rootfs")
            for n in names:          # every pin first: no 700 MB download before a refusal
                if not plan.pins["downloads"][n].get("sha256"):
                    fetch(n, plan.pins, dl)
            return {n: fetch(n, plan.pins, dl) for n in names}
        files = st.run("fetch", fetch_all)

        def extract():
            done.unlink(missing_ok=True)
            if work.exists():
                shutil.rmtree(work)
            work.mkdir(parents=True)
            for c in extract_cmds(plan, files["bsp"], files["sample_rootfs"]):
                run(c, logfile=logdir / "jetson.log")
            return str(plan.l4t)
        st.run("extract", extract)
        st.run("binfmt", check_binfmt)

        def provision():
            if not args.ansible:
                return "skipped (--no-ansible)"
            import build as amd64
            # the app + dependencies for the sample root fs' Python (Ubuntu 22.04: CPython 3.10, aarch64)
            wh = CACHE / "wheelhouse" / "image-jetson-orin"
            run(["bash", str(REPO / "ansible/build-wheelhouse.sh"), str(wh), *WHEELHOUSE_ARGS],
                logfile=logdir / "wheelhouse-jetson-orin.log",
                env={"THOX_LLAMA_WHEELS": str(plan.llama_wheel.parent) if plan.llama_wheel else ""})
            plan.wheelhouse = wh / "thox-wheelhouse.tar"
            plan.demo_wheel, _ = amd64.stage_demo_wheel()
            inv = work / "inventory.json"
            inv.write_text(amd64.ansible_inventory(plan.rootfs))
            with amd64.chroot_mounts(plan.rootfs):
                run(provision_cmd(plan, inv, amd64.ansible_playbook_bin()), logfile=logdir / "ansible-jetson.log",
                    cwd=REPO / "ansible", env={"ANSIBLE_CONFIG": str(REPO / "ansible/ansible.cfg")})
            return "roles applied"
        st.run("provision", provision)
        st.run("binaries", lambda: run(apply_binaries_cmd(plan), cwd=plan.l4t, logfile=logdir / "jetson.log")
               and "apply_binaries.sh done")

        def user():
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
        st.run("user", user)

        def finalize():
            import build as amd64
            keep = (plan.rootfs / "home" / ADMIN_USER / ".ssh/authorized_keys")
            saved = keep.read_bytes() if keep.exists() else None
            amd64.finalize_rootfs(plan.rootfs, "jetson-orin", ssh_user=ADMIN_USER)
            problems = [p for p in amd64.scan_rootfs(plan.rootfs)
                        if not p.startswith(f"home/{ADMIN_USER}/.ssh/authorized_keys")]
            if saved is not None:       # the owner's public key is wanted, not a secret
                keep.write_bytes(saved)
            if problems:
                raise BuildError("secret or per-device data in the root fs: " + "; ".join(problems))
            return "clean"
        st.run("finalize", finalize)
        st.run("package", lambda: run(initrd_flash_cmd(plan, no_flash=True), cwd=plan.l4t,
                                      logfile=logdir / "jetson.log") and "l4t_initrd_flash.sh --no-flash done")
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


def flash(args) -> int:
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


def main(args_or_argv=None) -> int:
    if isinstance(args_or_argv, argparse.Namespace):     # from build.py --target jetson-orin
        a = args_or_argv
        ns = argparse.Namespace(cmd="build", out=a.out, board=os.environ.get("BOARD", "orin-nano"),
                                ssh_pubkey=os.environ.get("SSH_PUBKEY") or None,
                                llama_wheel=os.environ.get("THOX_JETSON_LLAMA_WHEEL") or None,
                                extra_vars=a.extra_vars, ansible=a.ansible)
        return build(ns)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("build", "flash"):
        p = sub.add_parser(name)
        p.add_argument("--out", default=str(REPO / "build"))
        p.add_argument("--board", default=os.environ.get("BOARD", "orin-nano"))
        if name == "build":
            p.add_argument("--ssh-pubkey", default=os.environ.get("SSH_PUBKEY") or None)
            p.add_argument("--llama-wheel", default=os.environ.get("THOX_JETSON_LLAMA_WHEEL") or None,
                           help="aarch64 llama-cpp-python wheel built with GGML_CUDA=on")
            p.add_argument("--extra-vars", default="")
            p.add_argument("--no-ansible", dest="ansible", action="store_false")
    p = sub.add_parser("pin")
    p.add_argument("name")
    p.add_argument("file")
    args = ap.parse_args(args_or_argv)
    try:
        if args.cmd == "pin":
            print(pin(args.name, Path(args.file)))
            return 0
        if os.geteuid() != 0:
            log("needs root (tar -p of a root fs, chroot, NVIDIA's flash scripts)")
            return 2
        return build(args) if args.cmd == "build" else flash(args)
    except BuildError as e:
        log(str(e))
        return 1


if __name__ == "__main__":
    sys.exit(main())
