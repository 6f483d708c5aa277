"""Jetson update bundles: `python3 -m image bundle --target jetson-orin --version V` makes
build/thox-jetson-orin-<V>.raucb (RAUC, compatible thox-jetson-orin) from the root fs of the
flash package `build` made, as an ext4 the size of the APP/APP_b slots."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .. import bundle, slot
from ..common import BuildError, StageFailed, Stages, log, run, sha256_file
from ..context import Context
from . import jetson_layout
from .jetson import BUNDLE_STAGES, COMPATIBLE, EXTLINUX, TARGET, Plan, fetch_all, stage_keyring


def package_root(plan: Plan, files: dict[str, Path]) -> str:
    """The flash package's root fs, when `build` made it from these downloads for this board."""
    ready = plan.work / ".package-ready"
    if not ready.is_file():
        raise BuildError(f"no flash package in {plan.l4t}: run `make image TARGET={TARGET} BOARD={plan.board}` "
                         "first (a bundle is made from the root fs the flash package is made from)")
    meta = json.loads(ready.read_text())
    want = {"board": plan.board, "bsp_sha256": plan.pins["downloads"]["bsp"]["sha256"],
            "ubuntu_base_sha256": sha256_file(files["tarball"])}
    stale = [k for k, v in want.items() if meta.get(k) != v]
    if stale:
        raise BuildError(f"the flash package in {plan.l4t} was made with another {', '.join(stale)}: "
                         f"run `make image TARGET={TARGET} BOARD={plan.board}` again")
    return f"{plan.rootfs} (flash package of version {meta.get('version', '?')}, board {plan.board})"


def extlinux_files(text: str) -> list[tuple[str, str]]:
    """(keyword, path) of every LINUX, INITRD and FDT line of an extlinux.conf."""
    out = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) >= 2 and words[0].upper() in ("LINUX", "INITRD", "FDT"):
            out.append((words[0].upper(), words[1]))
    return out


def complete_boot(tree: Path) -> list[str]:
    """The slot tree as flash.sh writes it into system.img: the DTB that extlinux.conf's FDT
    line names under /boot/dtb/ is copied there from /boot/ (build_fsimg does the same). Every
    file extlinux.conf names must then be in the tree: UEFI's L4TLauncher boots the slot from
    them. Returns the files added."""
    conf = tree / EXTLINUX
    if not conf.is_file():
        raise BuildError(f"the root fs has no /{EXTLINUX}: a Jetson slot boots from it")
    added, missing = [], []
    for kind, name in extlinux_files(conf.read_text()):
        f = tree / name.lstrip("/")
        src = tree / "boot" / Path(name).name
        if kind == "FDT" and not os.path.lexists(f) and src.is_file():
            f.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, f)
            added.append(name)
        if not os.path.lexists(f):
            missing.append(f"{kind} {name}")
    if missing:
        raise BuildError(f"/{EXTLINUX} names files the root fs lacks: {', '.join(missing)}")
    return added


def bundle_cmds(sign: bundle.Signing, content: Path, out: Path, device_keyring: Path | None) -> list[list[str]]:
    """rauc bundle of the content directory, then `rauc info` against the signer's keyring and,
    when the root fs has one, against the keyring the device will check it with."""
    cmds = [["rauc", "bundle", f"--cert={sign.cert}", f"--key={sign.key}", f"--keyring={sign.keyring}",
             f"--mksquashfs-args={bundle.MKSQUASHFS_ARGS}", str(content), str(out)],
            ["rauc", "info", f"--keyring={sign.keyring}", str(out)]]
    if device_keyring is not None:
        cmds.append(["rauc", "info", f"--keyring={device_keyring}", str(out)])
    return cmds


def make_bundle(root: Path, out: Path, version: str, sign: bundle.Signing, *, overlay: Path | None = None,
                logfile: Path | None = None) -> Path:
    """out (a .raucb, compatible thox-jetson-orin): root as a SLOT_MIB ext4 of this version."""
    if not (sign.cert and sign.key):
        raise BuildError("a bundle needs a signing certificate and key")
    slot_mib = jetson_layout.SLOT_MIB
    used = slot.dir_size(root)
    if used * slot.HEADROOM > slot_mib << 20:
        raise BuildError(f"the root file system uses {used >> 20} MiB: more than 1/{slot.HEADROOM} of a "
                         f"{slot_mib} MiB slot (jetson_layout.SLOT_MIB; a new size needs a reflash)")
    content, tmp = out.with_name(out.name + ".content"), out.with_name("." + out.name + ".partial")
    shutil.rmtree(content, ignore_errors=True)
    content.mkdir(parents=True)
    tmp.unlink(missing_ok=True)
    device_keyring = root / "etc/rauc/keyring.pem"
    try:
        (content / "manifest.raucm").write_text(bundle.manifest_text(version, COMPATIBLE))
        with slot.slot_tree(root, version, overlay) as tree:
            complete_boot(tree)
            slot.mkfs_ext4(tree, content / bundle.IMAGE_FILE, slot_mib, label="thox-root",
                           fs_uuid=slot.slot_fs_uuid(version), logfile=logfile)
        for c in bundle_cmds(sign, content, tmp, device_keyring if device_keyring.is_file() else None):
            run(c, logfile=logfile)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(content, ignore_errors=True)
        tmp.unlink(missing_ok=True)
    return out


def build_bundle(ctx: Context, plan: Plan, version: str, overlay: Path | None = None) -> int:
    """build/thox-jetson-orin-<version>.raucb from the flash package's root fs."""
    dl = Path(os.environ.get("THOX_JETSON_DL", ctx.cache / "jetson"))
    target = ctx.out / bundle.bundle_name(version, TARGET)
    st = Stages(BUNDLE_STAGES)
    try:
        plan.board_cfg
        slot.check_version(version)
        files = st.run("fetch", fetch_all, plan, dl)
        sign, _ = st.run("keyring", stage_keyring, ctx, need_key=True)
        st.run("package", package_root, plan, files)

        def make() -> str:
            make_bundle(plan.rootfs, target, version, sign, overlay=overlay, logfile=ctx.logdir / "jetson-bundle.log")
            entry = bundle.record(ctx.out / "manifest.json", target, version, COMPATIBLE)
            return f"{target.name}: {entry['bytes'] >> 20} MiB, sha256 {entry['sha256'][:16]}…"
        st.run("bundle", make)
    except StageFailed as e:
        log(str(e).splitlines()[0])
        for line in str(e).splitlines()[1:][-20:]:
            log("  " + line)
        log(f"no bundle written ({target} left as it was)")
        return 1
    log(f"bundle ready: {target} (version {version}, {COMPATIBLE}) in {st.total:.1f}s")
    return 0


