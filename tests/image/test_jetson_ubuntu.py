"""Ubuntu's arm64 base tarball for the Jetson root fs is used only when Ubuntu's SHA256SUMS lists
its sha256 and SHA256SUMS.gpg is a good signature by the pinned key (gpgv). Here a key made for
the test stands in for Ubuntu's CD image key, with its own SHA256SUMS and tarball; the wget/curl
stand-in that hands nv_build_samplefs.sh the verified tarball is run as NVIDIA's script would."""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from image import common
from image.targets import jetson_rootfs

BASE = "ubuntu-base-22.04.5-base-arm64.tar.gz"


class Signer:
    """A throwaway GnuPG home holding one signing key; its public keyring file for gpgv."""

    def __init__(self, home: Path, uid: str):
        self.home = home
        home.mkdir(mode=0o700, parents=True)
        self.env = {**os.environ, "GNUPGHOME": str(home)}
        self.gpg("--quick-gen-key", uid, "ed25519", "sign", "never")
        out = self.gpg("--list-keys", "--with-colons", uid).stdout
        self.fingerprint = next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))
        self.keyring = home.parent / f"{home.name}-public.gpg"
        self.keyring.write_bytes(self.gpg("--export", self.fingerprint, text=False).stdout)

    def gpg(self, *args: str, text: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run(["gpg", "--batch", "--pinentry-mode", "loopback", "--passphrase", "", *args],
                           env=self.env, capture_output=True, text=text, timeout=120)
        assert p.returncode == 0, p.stderr
        return p

    def sign(self, sums: Path) -> Path:
        sig = sums.with_name(sums.name + ".gpg")
        sig.unlink(missing_ok=True)
        self.gpg("--local-user", self.fingerprint, "--output", str(sig), "--detach-sign", str(sums))
        return sig

    def close(self) -> None:
        subprocess.run(["gpgconf", "--kill", "all"], env=self.env, capture_output=True)


@pytest.fixture(scope="module")
def signers(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpg")
    made = {"ubuntu": Signer(root / "u", "Test CD Image Signing Key <cdimage@example.invalid>"),
            "other": Signer(root / "o", "Someone Else <other@example.invalid>")}
    yield made
    for s in made.values():
        s.close()


def base_tarball(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as t:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    return path


def ubuntu_release(d: Path, signer: Signer, files: dict[str, bytes] | None = None) -> dict[str, Path]:
    """A release directory as Ubuntu publishes it: the tarball, SHA256SUMS (with another entry), its signature."""
    d.mkdir(parents=True, exist_ok=True)
    tar = base_tarball(d / BASE, files or {"etc/os-release": b'NAME="Ubuntu"\nVERSION_ID="22.04"\n'})
    digest = hashlib.sha256(tar.read_bytes()).hexdigest()
    sums = d / "SHA256SUMS"
    sums.write_text(f"{'1' * 64} *ubuntu-base-22.04.5-base-amd64.tar.gz\n{digest} *{BASE}\n")
    return {"tarball": tar, "sums": sums, "signature": signer.sign(sums), "keyring": signer.keyring}


def verify(f: dict[str, Path], fingerprint: str) -> str:
    return jetson_rootfs.verify_ubuntu_base(f["tarball"], f["sums"], f["signature"], f["keyring"], fingerprint)


def test_good_release_verifies(signers, tmp_path):
    f = ubuntu_release(tmp_path, signers["ubuntu"])
    assert verify(f, signers["ubuntu"].fingerprint) == common.sha256_file(f["tarball"])
    spaced = " ".join(signers["ubuntu"].fingerprint[i:i + 4] for i in range(0, 40, 4)).lower()
    assert verify(f, spaced) == common.sha256_file(f["tarball"])


def test_tampered_tarball_is_refused(signers, tmp_path):
    f = ubuntu_release(tmp_path, signers["ubuntu"])
    base_tarball(f["tarball"], {"etc/os-release": b"NAME=evil\n"})
    with pytest.raises(common.BuildError, match=r"sha256 mismatch for .*ubuntu-base-22\.04\.5-base-arm64\.tar\.gz: "
                                                r"Ubuntu's signed SHA256SUMS says [0-9a-f]{64}, the file is [0-9a-f]{64}"):
        verify(f, signers["ubuntu"].fingerprint)


def test_sums_changed_after_signing_is_refused(signers, tmp_path):
    f = ubuntu_release(tmp_path, signers["ubuntu"])
    evil = base_tarball(tmp_path / "evil.tar.gz", {"etc/os-release": b"NAME=evil\n"})
    os.replace(evil, f["tarball"])
    f["sums"].write_text(f"{common.sha256_file(f['tarball'])} *{BASE}\n")
    with pytest.raises(common.BuildError, match=r"SHA256SUMS\.gpg is not a good signature over .*SHA256SUMS by the "
                                                r"Ubuntu CD image key [0-9A-F]{40} \(gpgv: .*BAD signature"):
        verify(f, signers["ubuntu"].fingerprint)


def test_signature_by_another_key_is_refused(signers, tmp_path):
    """A good signature, but by a key that is not the pinned one: with that key in the keyring
    given to gpgv, and with only the pinned key in it."""
    f = ubuntu_release(tmp_path, signers["other"])
    with pytest.raises(common.BuildError, match="is not a good signature"):
        verify(f, signers["ubuntu"].fingerprint)
    f["keyring"] = signers["ubuntu"].keyring
    with pytest.raises(common.BuildError, match=r"is not a good signature .*gpgv: .*"):
        verify(f, signers["ubuntu"].fingerprint)


def test_tarball_not_listed_is_refused(signers, tmp_path):
    f = ubuntu_release(tmp_path, signers["ubuntu"])
    f["sums"].write_text(f"{'1' * 64} *ubuntu-base-22.04.5-base-amd64.tar.gz\n")
    f["signature"] = signers["ubuntu"].sign(f["sums"])
    with pytest.raises(common.BuildError, match=rf"{BASE.replace('.', '[.]')} is not listed in .*SHA256SUMS"):
        verify(f, signers["ubuntu"].fingerprint)


def test_missing_signature_file_is_refused(signers, tmp_path):
    f = ubuntu_release(tmp_path, signers["ubuntu"])
    f["signature"].unlink()
    with pytest.raises(common.BuildError, match="is not a good signature"):
        verify(f, signers["ubuntu"].fingerprint)


def test_ubuntu_files_come_from_the_cache_or_say_what_to_do(tmp_path):
    pins = jetson_rootfs_pins()
    dl = tmp_path / "dl"
    with pytest.raises(common.BuildError) as e:
        jetson_rootfs.ubuntu_files(pins, dl, opener=_unreachable)
    msg = str(e.value)
    assert msg.startswith("cannot download ubuntu-archive-keyring.gpg from https://archive.ubuntu.com/")
    assert "unreachable" in msg and "\n" not in msg
    d = dl / "ubuntu" / pins["ubuntu_base"]["release"]
    d.mkdir(parents=True)
    for n in ("SHA256SUMS", "SHA256SUMS.gpg", BASE):
        (d / n).write_text(n)
    (dl / "ubuntu/ubuntu-archive-keyring.gpg").write_text("k")
    got = jetson_rootfs.ubuntu_files(pins, dl, opener=_unreachable)
    assert got == {"keyring": dl / "ubuntu/ubuntu-archive-keyring.gpg", "sums": d / "SHA256SUMS",
                   "signature": d / "SHA256SUMS.gpg", "tarball": d / BASE}


def jetson_rootfs_pins() -> dict:
    import json
    return json.loads((common.REPO / "image/jetson-pins.json").read_text())


def _unreachable(url, timeout):
    raise OSError("Network is unreachable")


@pytest.mark.parametrize("tool, args, out", [
    ("wget", ["-q", "-O", "{d}/got.tar.gz", "{url}"], "{d}/got.tar.gz"),
    ("wget", ["-O{d}/got.tar.gz", "{url}"], "{d}/got.tar.gz"),
    ("wget", ["--output-document={d}/got.tar.gz", "{url}"], "{d}/got.tar.gz"),
    ("wget", ["-P", "{d}", "{url}"], "{d}/ubuntu-base-22.04-base-arm64.tar.gz"),
    ("wget", ["{url}"], "ubuntu-base-22.04-base-arm64.tar.gz"),
    ("curl", ["-fsSL", "-o", "{d}/got.tar.gz", "{url}"], "{d}/got.tar.gz"),
    ("curl", ["-O", "{url}"], "ubuntu-base-22.04-base-arm64.tar.gz"),
])
def test_download_stand_in_hands_out_the_verified_tarball(tmp_path, tool, args, out):
    verified = tmp_path / BASE
    verified.write_bytes(b"verified bytes")
    served = jetson_rootfs.write_download_shim(tmp_path / "shim", verified, "22.04.5")
    d = tmp_path / "w"
    d.mkdir()
    url = "http://cdimage.ubuntu.com/ubuntu-base/releases/22.04/release/ubuntu-base-22.04-base-arm64.tar.gz"
    p = subprocess.run([str(tmp_path / "shim" / tool), *[a.format(d=d, url=url) for a in args]], cwd=d,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    got = Path(out.format(d=d)) if "/" in out else d / out
    assert got.read_bytes() == b"verified bytes"
    assert jetson_rootfs.check_served(served).startswith(f"{tool} {url} -> ")


def test_download_stand_in_passes_other_downloads_on(tmp_path):
    """Another URL goes to the real tool (here one that cannot connect: the refusal is the real wget's)."""
    verified = tmp_path / BASE
    verified.write_bytes(b"v")
    served = jetson_rootfs.write_download_shim(tmp_path / "shim", verified, "22.04.5")
    p = subprocess.run([str(tmp_path / "shim/wget"), "-q", "-t", "1", "-O", str(tmp_path / "x"),
                        "http://127.0.0.1:9/ubuntu-base-20.04-base-arm64.tar.gz"], capture_output=True, timeout=60)
    assert p.returncode != 0
    with pytest.raises(common.BuildError, match="never downloaded the Ubuntu base tarball"):
        jetson_rootfs.check_served(served)


def test_samplefs_command_is_nvidia_minimal_jammy():
    assert jetson_rootfs.samplefs_cmd(jetson_rootfs_pins()) == [
        "./nv_build_samplefs.sh", "--abi", "aarch64", "--distro", "ubuntu", "--flavor", "minimal", "--version", "jammy"]


def test_pinned_ubuntu_inputs():
    u = jetson_rootfs_pins()["ubuntu_base"]
    assert u["file"] == f"ubuntu-base-{u['release']}-base-arm64.tar.gz" and u["release"].startswith("22.04")
    assert u["url_dir"] == "https://cdimage.ubuntu.com/ubuntu-base/releases/22.04/release/"
    assert len(u["signing_key"]["fingerprint"]) == 40 and "CD Image" in u["signing_key"]["uid"]
