"""Shared helpers of the image builder: stages with progress, cache keys, commands,
and the app's modules the builder reads (thox.pins, thox.statefiles).

Only the Python standard library is used, so the builder runs with the host's
python3 before any virtual environment exists.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# the build cache when THOX_CACHE names no other (the Makefile, the app and the roles use it too)
DEFAULT_CACHE = Path("/var/cache/thox-build")


def cache_dir() -> Path:
    """The build cache: $THOX_CACHE, else DEFAULT_CACHE (read when a build starts)."""
    return Path(os.environ.get("THOX_CACHE", DEFAULT_CACHE))


def app_module(name: str):
    """The app's module thox/<name>.py, loaded by path. Only modules that use nothing but the
    standard library and no package-relative import (pins, statefiles) can be loaded so: the
    builder runs with the build host's python3, where the app is not installed."""
    key = f"_thox_app_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, REPO / "app" / "thox" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


pins = app_module("pins")              # the pinned versions (app/thox/versions.env)
statefiles = app_module("statefiles")  # the app's one list of secret and per-device files


class BuildError(Exception):
    """A failure with a message meant for the person running the build."""


class StageFailed(BuildError):
    def __init__(self, stage: str, cause: BaseException, elapsed: float):
        self.stage, self.cause, self.elapsed = stage, cause, elapsed
        super().__init__(f"image build FAILED in stage '{stage}' after {elapsed:.1f}s: {cause}")


def log(msg: str) -> None:
    print(f"[thox-image] {msg}", file=sys.stderr, flush=True)


class Stages:
    """Runs named stages in order, printing which stage runs and the elapsed time.

    A failing stage raises StageFailed naming the stage; nothing else is run.
    """

    def __init__(self, names: list[str]):
        self.names = names
        self.t0 = time.monotonic()
        self.timings: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kw):
        i = self.names.index(name) + 1
        log(f"stage {i}/{len(self.names)} {name} ... (total {time.monotonic() - self.t0:.1f}s)")
        t = time.monotonic()
        try:
            result = fn(*args, **kw)
        except StageFailed:
            raise
        except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - re-raised with the stage name
            raise StageFailed(name, e, time.monotonic() - t) from e
        dt = time.monotonic() - t
        self.timings[name] = round(dt, 1)
        note = result[-1] if isinstance(result, tuple) and result and isinstance(result[-1], str) else result
        extra = f" [{note}]" if isinstance(note, str) and note else ""
        log(f"stage {i}/{len(self.names)} {name} done in {dt:.1f}s{extra}")
        return result

    @property
    def total(self) -> float:
        return time.monotonic() - self.t0


def run(cmd: list[str], *, logfile: Path | None = None, env: dict | None = None,
        cwd: Path | None = None, check: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run a command; its output goes to logfile (appended) when given.

    On failure the last lines of the log are part of the error message."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    if logfile:
        logfile.parent.mkdir(parents=True, exist_ok=True)
        with open(logfile, "ab") as f:
            f.write(("\n$ " + shlex.join(cmd) + "\n").encode())
            f.flush()
            p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=full_env, cwd=cwd, input=input)
    else:
        p = subprocess.run(cmd, env=full_env, cwd=cwd, input=input, capture_output=True)
    if check and p.returncode != 0:
        if logfile:
            tail = logfile.read_bytes()[-3000:].decode(errors="replace")
            where = f" (log: {logfile})"
        else:
            tail = (p.stdout or b"").decode(errors="replace")[-1500:] + (p.stderr or b"").decode(errors="replace")[-1500:]
            where = ""
        raise BuildError(f"command failed with exit status {p.returncode}: {shlex.join(cmd)}{where}\n{tail}")
    return p


def terminate(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM, then SIGKILL when the process has not exited within ``grace`` seconds; returns
    once it has exited."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

sha256_file = pins.sha256_file


def tree_digest(paths: list[Path], base: Path = REPO) -> str:
    """sha256 over the names, modes and contents of every file under paths (sorted)."""
    h = hashlib.sha256()
    for top in paths:
        if not top.exists():
            h.update(f"missing:{top}\n".encode())
            continue
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file() or p.is_symlink())
        for p in files:
            if "__pycache__" in p.parts or p.suffix == ".pyc" or ".egg-info" in str(p):
                continue
            rel = p.relative_to(base) if p.is_relative_to(base) else p
            h.update(f"{rel}\0{oct(p.lstat().st_mode)}\0".encode())
            h.update(os.readlink(p).encode() if p.is_symlink() else p.read_bytes())
    return h.hexdigest()


def key_of(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return ""


def source_date_epoch() -> int:
    """SOURCE_DATE_EPOCH from the environment, else the last commit's time."""
    if os.environ.get("SOURCE_DATE_EPOCH"):
        return int(os.environ["SOURCE_DATE_EPOCH"])
    ts = git("log", "-1", "--format=%ct")
    return int(ts) if ts else 0
