"""The Jetson root fs: NVIDIA's own tools/samplefs/nv_build_samplefs.sh from the pinned BSP
(minimal flavor, Ubuntu jammy), fed Ubuntu's arm64 base tarball only once it is verified: its
sha256 is listed in Ubuntu's SHA256SUMS, whose detached signature SHA256SUMS.gpg gpgv checks
against the Ubuntu CD image signing key, pinned by fingerprint in jetson-pins.json (the key is
read from Ubuntu's published keyring; no Debian 12 package ships it).

NVIDIA's script downloads the base tarball itself; it runs with a wget/curl stand-in first on
PATH that hands it the verified file for that download (every other download goes to the real
tool), and the build fails if the script never asked for it."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from ..common import BuildError, log, sha256_file

SAMPLEFS_DIR = "tools/samplefs"
SAMPLEFS_OUT = "sample_fs.tbz2"        # what nv_build_samplefs.sh writes in its directory
SERVED_LOG = "ubuntu-base-served.log"  # the stand-in's record of the base tarballs it handed out


def download(url: str, dst: Path, *, what: str, hint: str, opener=urllib.request.urlopen,
             timeout: float = 30) -> Path:
    """dst, downloaded from url unless present; a failed download leaves nothing behind."""
    if dst.exists():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    part = dst.with_name(dst.name + ".part")
    log(f"downloading {url}")
    try:
        with opener(url, timeout=timeout) as r, open(part, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
    except (urllib.error.URLError, OSError, ValueError) as e:
        part.unlink(missing_ok=True)
        raise BuildError(f"cannot download {what} from {url}: {getattr(e, 'reason', e)}. {hint}") from e
    os.replace(part, dst)
    return dst


def ubuntu_files(pins: dict, dl_dir: Path, **kw) -> dict[str, Path]:
    """Ubuntu's keyring, SHA256SUMS, SHA256SUMS.gpg and the base tarball, from dl_dir/ubuntu or downloaded."""
    u = pins["ubuntu_base"]
    d = dl_dir / "ubuntu" / u["release"]
    hint = (f"Ubuntu's server is unreachable from here (no internet?). Copy the file into {d}/ from a machine "
            "that has it, then run the build again; it is verified here before use.")
    wanted = {"keyring": (u["keyring_url"], dl_dir / "ubuntu" / u["keyring_url"].rsplit("/", 1)[1]),
              "sums": (u["url_dir"] + "SHA256SUMS", d / "SHA256SUMS"),
              "signature": (u["url_dir"] + "SHA256SUMS.gpg", d / "SHA256SUMS.gpg"),
              "tarball": (u["url_dir"] + u["file"], d / u["file"])}
    return {k: download(url, dst, what=dst.name, hint=hint, **kw) for k, (url, dst) in wanted.items()}


def verify_signature(sums: Path, signature: Path, keyring: Path, fingerprint: str) -> None:
    """gpgv: SHA256SUMS.gpg is a good signature over SHA256SUMS by the key with that fingerprint."""
    want = fingerprint.replace(" ", "").upper()
    p = subprocess.run(["gpgv", "--status-fd", "1", "--keyring", str(keyring.resolve()),
                        str(signature), str(sums)], capture_output=True, text=True)
    status = [line.split() for line in p.stdout.splitlines() if line.startswith("[GNUPG:] ")]
    bad = [s for s in status if s[1] in ("BADSIG", "EXPKEYSIG", "REVKEYSIG")]
    good = [s for s in status if s[1] == "VALIDSIG" and want in (s[2].upper(), s[-1].upper())]
    if bad or not good:
        why = (p.stderr.strip().splitlines() or ["no signature"])[-1]
        raise BuildError(f"{signature.name} is not a good signature over {sums} by the Ubuntu CD image key "
                         f"{want} (gpgv: {why}); the download is refused")


def listed_sha256(sums: Path, name: str) -> str:
    for line in sums.read_text().splitlines():
        m = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](.+)", line.strip())
        if m and m.group(2) == name:
            return m.group(1).lower()
    raise BuildError(f"{name} is not listed in {sums}: no signed checksum for it")


def verify_ubuntu_base(tarball: Path, sums: Path, signature: Path, keyring: Path, fingerprint: str) -> str:
    """The tarball's sha256, once SHA256SUMS is signed by the pinned key and lists that sha256."""
    verify_signature(sums, signature, keyring, fingerprint)
    want = listed_sha256(sums, tarball.name)
    got = sha256_file(tarball)
    if got != want:
        raise BuildError(f"sha256 mismatch for {tarball}: Ubuntu's signed SHA256SUMS says {want}, the file is "
                         f"{got}; remove it to download it again")
    return got


def samplefs_cmd(pins: dict) -> list[str]:
    s = pins["samplefs"]
    return ["./nv_build_samplefs.sh", "--abi", s["abi"], "--distro", s["distro"],
            "--flavor", s["flavor"], "--version", s["version"]]


SHIM = r'''#!PYTHON
"""wget/curl stand-in for nv_build_samplefs.sh: the Ubuntu base tarball is the verified copy."""
import fnmatch, os, shutil, sys
VERIFIED, PATTERN, LOG, REAL = VERIFIED_, PATTERN_, LOG_, REAL_
tool, args = os.path.basename(sys.argv[0]), sys.argv[1:]
urls = [a for a in args if "://" in a]
name = urls[-1].rsplit("/", 1)[-1] if urls else ""
if not fnmatch.fnmatch(name, PATTERN):
    real = REAL.get(tool)
    if not real:
        sys.exit(f"{tool}: not installed on the build machine")
    os.execv(real, [real, *args])
out = name
takes = {"wget": ("-O", "--output-document"), "curl": ("-o", "--output")}[tool]
for i, a in enumerate(args):
    nxt = args[i + 1] if i + 1 < len(args) else None
    if a in takes and nxt:
        out = nxt
    elif a.startswith(takes[1] + "="):
        out = a.split("=", 1)[1]
    elif tool == "wget" and a.startswith("-O") and len(a) > 2:
        out = a[2:]
    elif tool == "wget" and a in ("-P", "--directory-prefix") and nxt:
        out = os.path.join(nxt, name)
    elif tool == "wget" and a.startswith("--directory-prefix="):
        out = os.path.join(a.split("=", 1)[1], name)
if out == "-":
    with open(VERIFIED, "rb") as f:
        shutil.copyfileobj(f, sys.stdout.buffer)
else:
    shutil.copyfile(VERIFIED, out)
with open(LOG, "a") as f:
    f.write(f"{tool} {urls[-1]} -> {out}\n")
'''


def write_download_shim(shim_dir: Path, verified: Path, release: str) -> Path:
    """wget and curl in shim_dir: the verified tarball for any ubuntu-base-<release>*-base-arm64
    download, the real tool for everything else. Returns the log of what it handed out."""
    shim_dir.mkdir(parents=True, exist_ok=True)
    served = shim_dir / SERVED_LOG
    served.unlink(missing_ok=True)
    real = {t: shutil.which(t) for t in ("wget", "curl")}
    text = (SHIM.replace("#!PYTHON", "#!" + sys.executable)
            .replace("VERIFIED_", repr(str(verified.resolve())))
            .replace("PATTERN_", repr(f"ubuntu-base-{release.rsplit('.', 1)[0]}*-base-arm64.tar.gz"))
            .replace("LOG_", repr(str(served))).replace("REAL_", repr(real)))
    for tool in ("wget", "curl"):
        (shim_dir / tool).write_text(text)
        (shim_dir / tool).chmod(0o755)
    return served


def check_served(served: Path) -> str:
    if not served.exists() or not served.read_text().strip():
        raise BuildError("nv_build_samplefs.sh never downloaded the Ubuntu base tarball through wget or curl, so "
                         "the verified tarball cannot be shown to be the one it used; the root fs is refused")
    return served.read_text().splitlines()[-1]
