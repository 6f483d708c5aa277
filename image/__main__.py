"""The image builder's command line (run from the repository root; the make targets do):

    python3 -m image build [--target amd64|jetson-orin] [--out build] [--no-ansible] [--refresh]
                           [--extra-vars JSON] [--board B] [--ssh-pubkey FILE] [--llama-wheel FILE]
                           [--version V]
    python3 -m image bundle --version V [--overlay DIR] [--cert C --key K [--keyring CA]]
                            [--target amd64|jetson-orin] [--board B]
                                        a signed RAUC bundle build/thox-<target>-<V>.raucb of the same root fs
    python3 -m image wheel              only the portable llama-cpp-python wheel (cached)
    python3 -m image run|demo [...]     boot build/thox-amd64.img in QEMU (see image/qemu.py)
    python3 -m image flash [--board B]  flash the Jetson package (board in recovery mode)
    python3 -m image pin NAME FILE      record the sha256 of a checked Jetson download
    python3 -m image mirror [SUITE]     the Debian mirror this host's apt uses for SUITE

`build`, `bundle` and `flash` need root (mmdebstrap --mode=root, chroot, NVIDIA's scripts).
"""
from __future__ import annotations

import argparse
import fcntl
import os
import sys
from pathlib import Path

from . import aptmirror, qemu, slot, wheel
from .common import REPO, BuildError, cache_dir, log, pins
from .targets import amd64, jetson, jetson_bundle


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python3 -m image", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the image (amd64) or the flash package (jetson-orin)")
    b.add_argument("--target", default=os.environ.get("TARGET", "amd64"), choices=["amd64", "jetson-orin"])
    b.add_argument("--out", default=str(REPO / "build"))
    b.add_argument("--no-ansible", dest="ansible", action="store_false",
                   help="no roles: the plain Debian base with the builder's disk work only")
    b.add_argument("--refresh", action="store_true", help="ignore the cached base and provisioned root fs")
    b.add_argument("--extra-vars", default=os.environ.get("THOX_IMAGE_EXTRA_VARS", ""),
                   help="JSON object of extra Ansible variables")
    b.add_argument("--board", default=os.environ.get("BOARD", "orin-nano"), help="jetson-orin: the board")
    b.add_argument("--ssh-pubkey", default=os.environ.get("SSH_PUBKEY") or None,
                   help="jetson-orin: a public key file the admin user trusts")
    b.add_argument("--llama-wheel", default=os.environ.get("THOX_JETSON_LLAMA_WHEEL") or None,
                   help="jetson-orin: aarch64 llama-cpp-python wheel built with GGML_CUDA=on")
    b.add_argument("--version", default=slot.default_version(),
                   help="the image's version (IMAGE_VERSION in os-release; default THOX_VERSION in versions.env)")
    u = sub.add_parser("bundle", help="a signed RAUC update bundle of the image's root fs")
    u.add_argument("--target", default=os.environ.get("TARGET", "amd64"), choices=["amd64", "jetson-orin"])
    u.add_argument("--board", default=os.environ.get("BOARD", "orin-nano"), help="jetson-orin: the board")
    u.add_argument("--version", required=True, help="the bundle's version")
    u.add_argument("--overlay", default=None, help="a directory whose files are laid over the root fs")
    u.add_argument("--out", default=str(REPO / "build"))
    u.add_argument("--cert", default=None, help="signing certificate (default: RAUC_CERT, else the test CA)")
    u.add_argument("--key", default=None, help="its private key or PKCS#11 URI (default: RAUC_KEY)")
    u.add_argument("--keyring", default=None, help="the CA certificate a device trusts (default: RAUC_KEYRING)")
    u.add_argument("--no-ansible", dest="ansible", action="store_false", help=argparse.SUPPRESS)
    u.add_argument("--refresh", action="store_true", help="ignore the cached base and provisioned root fs")
    u.add_argument("--extra-vars", default=os.environ.get("THOX_IMAGE_EXTRA_VARS", ""),
                   help="JSON object of extra Ansible variables (the same as the image's)")
    sub.add_parser("wheel", help="only the portable llama-cpp-python wheel")
    for mode in ("run", "demo"):
        qemu.add_arguments(sub.add_parser(mode, help=f"boot the amd64 image in QEMU ({mode})"))
    f = sub.add_parser("flash", help="flash the Jetson package made by build --target jetson-orin")
    f.add_argument("--out", default=str(REPO / "build"))
    f.add_argument("--board", default=os.environ.get("BOARD", "orin-nano"))
    p = sub.add_parser("pin", help="record the sha256 of a checked Jetson download in jetson-pins.json")
    p.add_argument("name")
    p.add_argument("file")
    m = sub.add_parser("mirror", help="the Debian mirror this host's apt uses")
    m.add_argument("suite", nargs="?", default=pins.DEBIAN_SUITE)
    return ap


def build(args: argparse.Namespace) -> int:
    """One build or bundle at a time per cache (the cached root fs is shared): wait for a running one."""
    lockfile = cache_dir() / "image" / ".lock"
    lockfile.parent.mkdir(parents=True, exist_ok=True)
    with open(lockfile, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another image build holds {lockfile}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        overlay = Path(args.overlay).resolve() if getattr(args, "overlay", None) else None
        if args.cmd == "bundle":
            for opt, var in (("cert", "RAUC_CERT"), ("key", "RAUC_KEY"), ("keyring", "RAUC_KEYRING")):
                if getattr(args, opt):
                    os.environ[var] = getattr(args, opt)
        if getattr(args, "target", "amd64") == "jetson-orin":
            ctx = jetson.context(args)
            if args.cmd == "bundle":
                return jetson_bundle.build_bundle(ctx, jetson.Plan(work=ctx.out / "jetson-orin", board=args.board),
                                           args.version, overlay)
            pubkey = Path(args.ssh_pubkey).read_text().strip() if args.ssh_pubkey else None
            plan = jetson.Plan(work=ctx.out / "jetson-orin", board=args.board, ssh_pubkey=pubkey, version=args.version)
            return jetson.build(ctx, plan)
        if args.cmd == "bundle":
            return amd64.build_bundle(amd64.context(args), args.version, overlay)
        return amd64.build(amd64.context(args), args.version)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.cmd in ("run", "demo"):
            args.mode = args.cmd
            return qemu.main(args)
        if args.cmd == "mirror":
            print(aptmirror.mirror_for(args.suite))
            return 0
        if args.cmd == "pin":
            print(jetson.pin(args.name, Path(args.file)))
            return 0
        if args.cmd == "wheel":
            print(wheel.stage_wheel(amd64.context(parser().parse_args(["build", "--target", "amd64"]))))
            return 0
        if os.geteuid() != 0:
            log(f"`{args.cmd}` needs root (mmdebstrap --mode=root, chroot, NVIDIA's flash scripts)")
            return 2
        return build(args) if args.cmd in ("build", "bundle") else jetson.flash(args)
    except BuildError as e:
        log(str(e))
        return 1


if __name__ == "__main__":
    sys.exit(main())
