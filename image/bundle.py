"""Signed RAUC update bundles (format=verity) made from the same provisioned root file system
as the image, and the keys they are signed with.

The signing certificate, its key and the keyring (the CA certificate a device trusts) are given
at build time (RAUC_CERT, RAUC_KEY, RAUC_KEYRING); none is ever committed. Without them a
throwaway test CA is made under <cache>/rauc-test-ca (its CN holds TEST_CN), and a release build
(RELEASE=1) refuses it. Only the keyring, a public certificate, goes into the image."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import slot
from .common import BuildError, run, sha256_file

COMPATIBLE = "thox-amd64"
TEST_CN = "Thox TEST"
# zstd level 3: about 12 s for a 1.2 GB root fs on 2 cores, 5% larger than level 9
MKSQUASHFS_ARGS = "-comp zstd -Xcompression-level 3"
IMAGE_FILE = "rootfs.ext4"


@dataclass(frozen=True)
class Signing:
    cert: Path | None       # the signing certificate (None: only the keyring is needed)
    key: str | None         # its private key: a file or a PKCS#11 URI
    keyring: Path           # the CA certificate(s) a device accepts bundles from
    test: bool              # the throwaway test CA of this cache


def bundle_name(version: str, target: str = "amd64") -> str:
    return f"thox-{target}-{slot.check_version(version)}.raucb"


def _openssl(*args: str) -> None:
    run(["openssl", *args])


def test_ca(cache: Path) -> Signing:
    """The cache's throwaway CA and a signing certificate it issued (made once, then reused)."""
    d = cache / "rauc-test-ca"
    ca_key, ca_cert, key, cert = d / "ca.key.pem", d / "ca.cert.pem", d / "signing.key.pem", d / "signing.cert.pem"
    if not all(p.exists() for p in (ca_key, ca_cert, key, cert)):
        tmp = d.with_name(d.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        os.chmod(tmp, 0o700)
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        _openssl("req", "-x509", *ec, "-keyout", str(tmp / ca_key.name), "-out", str(tmp / ca_cert.name),
                 "-days", "3650", "-subj", f"/O=Thox/CN={TEST_CN} update CA (throwaway, not for release)",
                 "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        _openssl("req", *ec, "-keyout", str(tmp / key.name), "-out", str(tmp / "signing.csr"),
                 "-subj", f"/O=Thox/CN={TEST_CN} update signing (throwaway, not for release)")
        ext = tmp / "signing.ext"
        ext.write_text("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n")
        _openssl("x509", "-req", "-in", str(tmp / "signing.csr"), "-CA", str(tmp / ca_cert.name),
                 "-CAkey", str(tmp / ca_key.name), "-set_serial", "2", "-days", "3650", "-extfile", str(ext),
                 "-out", str(tmp / cert.name))
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
    return Signing(cert=cert, key=str(key), keyring=ca_cert, test=True)


def names_of(cert: Path) -> str:
    """The subject and issuer lines of every certificate in a PEM file."""
    text = cert.read_text()
    blocks = [b + "-----END CERTIFICATE-----\n" for b in text.split("-----END CERTIFICATE-----") if "BEGIN" in b]
    out = []
    for b in blocks:
        p = subprocess.run(["openssl", "x509", "-noout", "-subject", "-issuer"], input=b, capture_output=True,
                           text=True)
        if p.returncode != 0:
            raise BuildError(f"{cert}: not a PEM certificate: {p.stderr.strip()}")
        out.append(p.stdout)
    if not out:
        raise BuildError(f"{cert}: no PEM certificate in it")
    return "".join(out)


def is_test_cert(cert: Path) -> bool:
    return TEST_CN in names_of(cert)


def signing(cache: Path, env: dict | None = None, *, need_key: bool) -> Signing:
    """The signing material of this build: RAUC_CERT + RAUC_KEY (+ RAUC_KEYRING, else the
    certificate itself) from env, or the cache's test CA. RELEASE=1 refuses a test certificate."""
    env = os.environ if env is None else env
    cert, key, keyring = (env.get(k) or None for k in ("RAUC_CERT", "RAUC_KEY", "RAUC_KEYRING"))
    if cert or key or keyring:
        if need_key and not (cert and key):
            raise BuildError("a bundle needs both RAUC_CERT and RAUC_KEY (and RAUC_KEYRING, the CA a device trusts)")
        s = Signing(cert=Path(cert) if cert else None, key=key, keyring=Path(keyring or cert or ""), test=False)
        for p in (s.cert, s.keyring):
            if p and not p.is_file():
                raise BuildError(f"{p}: no such certificate file")
    else:
        s = test_ca(cache)
    if env.get("RELEASE", "") not in ("", "0"):
        for p in (s.cert, s.keyring):
            if p and (s.test or is_test_cert(p)):
                raise BuildError(f"RELEASE=1 refuses the test certificate {p} (its CN holds {TEST_CN!r}): "
                                 "give the release keys as RAUC_CERT, RAUC_KEY and RAUC_KEYRING")
    return s


def manifest_text(version: str, compatible: str = COMPATIBLE) -> str:
    return (f"[update]\ncompatible={compatible}\nversion={slot.check_version(version)}\n\n"
            f"[bundle]\nformat=verity\n\n[image.rootfs]\nfilename={IMAGE_FILE}\n")


def make_bundle(root: Path, out: Path, version: str, sign: Signing, *, overlay: Path | None = None,
                compatible: str = COMPATIBLE, logfile: Path | None = None) -> Path:
    """out (a .raucb): the root slot's ext4 made from root for this version (overlay's files
    laid over it), signed, checked against the keyring with `rauc info`."""
    if not (sign.cert and sign.key):
        raise BuildError("a bundle needs a signing certificate and key")
    content = out.with_name(out.name + ".content")
    shutil.rmtree(content, ignore_errors=True)
    content.mkdir(parents=True)
    tmp = out.with_name("." + out.name + ".partial")
    tmp.unlink(missing_ok=True)
    try:
        (content / "manifest.raucm").write_text(manifest_text(version, compatible))
        slot.make_slot_fs(root, content / IMAGE_FILE, version, overlay=overlay, logfile=logfile)
        run(["rauc", "bundle", f"--cert={sign.cert}", f"--key={sign.key}", f"--keyring={sign.keyring}",
             f"--mksquashfs-args={MKSQUASHFS_ARGS}", str(content), str(tmp)], logfile=logfile)
        run(["rauc", "info", f"--keyring={sign.keyring}", str(tmp)], logfile=logfile)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(content, ignore_errors=True)
        tmp.unlink(missing_ok=True)
    return out


def record(manifest: Path, bundle: Path, version: str, compatible: str = COMPATIBLE) -> dict:
    """The bundle's name, version and sha256 into manifest.json (key `bundles`, one entry per file)."""
    m = json.loads(manifest.read_text()) if manifest.exists() else {}
    entry = {"file": bundle.name, "version": version, "compatible": compatible, "sha256": sha256_file(bundle),
             "bytes": bundle.stat().st_size}
    m["bundles"] = [b for b in m.get("bundles", []) if b.get("file") != bundle.name] + [entry]
    manifest.write_text(json.dumps(m, indent=1) + "\n")
    return entry
