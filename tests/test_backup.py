"""`thox backup create|restore` with the real `age` and `zstd`, and config
files from a newer version (unknown keys). Restore verifies the whole backup
before touching THOX_HOME and refuses members that would leave it."""

from __future__ import annotations

import io
import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from thox.agecrypt import Age, Secret, zstd
from thoxtest import THOX, one_line_error, require, run_thox

PASSPHRASE = "correct horse battery staple"


def snapshot(home: Path) -> dict[str, bytes]:
    return {str(p.relative_to(home)): p.read_bytes() for p in sorted(home.rglob("*")) if p.is_file()}


@pytest.fixture
def pwfile(tmp_path) -> Path:
    p = tmp_path / "passphrase"
    p.write_text(PASSPHRASE + "\n")
    return p


@pytest.fixture
def home(tmp_path, models_dir) -> Path:
    require(shutil.which("age") and shutil.which("zstd"), "age and zstd (make apt-deps)")
    h = tmp_path / "home"
    h.mkdir()
    run_thox(h, "firstboot")
    run_thox(h, "config", "set", "api.port", "9191")
    run_thox(h, "models", "import", str(models_dir / "tiny.gguf"), "--id", "tiny")
    cfg = json.loads((h / "config.json").read_text())
    cfg["future.setting"] = {"from": "a newer version"}
    (h / "config.json").write_text(json.dumps(cfg))
    (h / "updates").mkdir()
    (h / "updates" / "big.raucb").write_bytes(b"x" * 1000)
    return h


def test_round_trip_brings_key_config_password_and_model_list_back(tmp_path, home, pwfile):
    before = snapshot(home)
    sha = json.loads((home / "models" / "tiny" / "manifest.json").read_text())["sha256"]
    out = tmp_path / "box.backup"
    p = run_thox(home, "backup", "create", str(out), "--passphrase-file", str(pwfile))
    assert "models listed, not included: tiny" in p.stdout
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    data = out.read_bytes()
    assert data.startswith(b"age-encryption.org/v1") and before["api_key"].strip() not in data
    assert not list(tmp_path.glob(".box.backup.*"))
    for child in home.iterdir():            # wipe
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    p = run_thox(home, "backup", "restore", str(out), "--passphrase-file", str(pwfile))
    assert "not installed here" in p.stdout, "a dev box has no thox-api.service: the note says so"
    after = snapshot(home)
    for name in ("api_key", "config.json", "admin.json", "admin-password.txt"):
        assert after[name] == before[name], name
    assert stat.S_IMODE((home / "api_key").stat().st_mode) == 0o600
    assert stat.S_IMODE((home / "admin.json").stat().st_mode) == 0o600
    assert "updates/big.raucb" not in after and not any(k.startswith("models/") for k in after)
    assert f"tiny" in p.stdout and "missing" in p.stdout and sha in p.stdout
    assert not [c for c in home.iterdir() if c.name.startswith(".restore-")]


def test_with_models_restores_the_model_and_env_passphrase_works(tmp_path, home):
    env = {"THOX_BACKUP_PASSPHRASE": PASSPHRASE}
    out = tmp_path / "full.backup"
    assert "models included" in run_thox(home, "backup", "create", str(out), "--with-models", env=env).stdout
    shutil.rmtree(home / "models")
    p = run_thox(home, "backup", "restore", str(out), env=env)
    assert "present" in p.stdout
    assert [m["id"] for m in json.loads(run_thox(home, "models", "list", "--json").stdout)] == ["tiny"]


def test_age_recipients_and_identity(tmp_path, home):
    key = tmp_path / "age.key"
    subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True)
    pub = next(ln.split(": ")[1] for ln in key.read_text().splitlines() if "public key" in ln)
    out = tmp_path / "keyed.backup"
    run_thox(home, "backup", "create", str(out), "-r", pub, env={"THOX_BACKUP_PASSPHRASE": ""})
    (home / "api_key").unlink()
    run_thox(home, "backup", "restore", str(out), "-i", str(key))
    assert (home / "api_key").is_file()
    one_line_error(run_thox(home, "backup", "restore", str(out), check=False, stdin=open(os.devnull),
                            env={"THOX_BACKUP_PASSPHRASE": ""}), "no passphrase")


def test_bad_passphrase_and_truncated_file_touch_nothing(tmp_path, home, pwfile):
    out = tmp_path / "box.backup"
    run_thox(home, "backup", "create", str(out), "--passphrase-file", str(pwfile), "--with-models")
    run_thox(home, "config", "set", "api.port", "7777")
    before = snapshot(home)
    wrong = tmp_path / "wrong"
    wrong.write_text("not it\n")
    one_line_error(run_thox(home, "backup", "restore", str(out), "--passphrase-file", str(wrong), check=False),
                   "incorrect passphrase")
    for cut in (out.stat().st_size // 2, out.stat().st_size - 20):
        short = tmp_path / f"short-{cut}.backup"
        short.write_bytes(out.read_bytes()[:cut])
        one_line_error(run_thox(home, "backup", "restore", str(short), "--passphrase-file", str(pwfile),
                                check=False), "cannot decrypt the backup")
    one_line_error(run_thox(home, "backup", "restore", str(tmp_path / "none"), "--passphrase-file", str(pwfile),
                            check=False), "cannot open")
    assert snapshot(home) == before
    assert not [c for c in home.iterdir() if c.name.startswith(".restore-")]


def _evil_backup(path: Path, member: tarfile.TarInfo, payload: bytes = b"pwned\n") -> None:
    """An encrypted backup (made with the same age + zstd pipeline) whose tar
    holds ``member`` next to a valid file and a manifest listing both."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        ok = tarfile.TarInfo("home/config.json")
        ok.size = 3
        tar.addfile(ok, io.BytesIO(b"{}\n"))
        if member.isfile():
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
        else:
            tar.addfile(member)
        manifest = json.dumps({"format": "thox-backup", "version": 1, "models": [], "files": {
            "config.json": {"sha256": "0" * 64, "size": 3, "mode": 420}}}).encode()
        mi = tarfile.TarInfo("manifest.json")
        mi.size = len(manifest)
        tar.addfile(mi, io.BytesIO(manifest))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    comp = zstd(False, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    age = Age(Secret(passphrase=PASSPHRASE.encode()), decrypt=False, stdin=comp.stdout, stdout=fd)
    comp.stdout.close()
    comp.stdin.write(buf.getvalue())
    comp.stdin.close()
    assert comp.wait() == 0 and age.finish() is None
    os.close(fd)


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.type, m.linkname, m.mode = kind, link, 0o644
    return m


@pytest.mark.parametrize("member,needle", [
    (_member("home/../evil"), "outside THOX_HOME"),
    (_member("home/../../evil"), "outside THOX_HOME"),
    (_member("/tmp/thox-evil-abs"), "outside THOX_HOME"),
    (_member("evil-top"), "outside THOX_HOME"),
    (_member("home/link", tarfile.SYMTYPE, "/etc"), "not a plain file"),
    (_member("home/models/link", tarfile.SYMTYPE, "../../../../etc/passwd"), "not a plain file"),
    (_member("home/hard", tarfile.LNKTYPE, "/etc/passwd"), "not a plain file"),
    (_member("home/dev", tarfile.CHRTYPE), "not a plain file"),
], ids=["dotdot", "dotdot2", "absolute", "outside-prefix", "symlink-abs", "symlink-rel", "hardlink", "device"])
def test_traversal_and_link_members_are_refused(tmp_path, home, pwfile, member, needle):
    evil = tmp_path / "evil.backup"
    _evil_backup(evil, member)
    before = snapshot(home)
    one_line_error(run_thox(home, "backup", "restore", str(evil), "--passphrase-file", str(pwfile), check=False),
                   needle)
    assert snapshot(home) == before
    assert not (home.parent / "evil").exists() and not (tmp_path / "evil").exists()
    assert not Path("/tmp/thox-evil-abs").exists()
    assert not [c for c in home.iterdir() if c.name.startswith(".restore-")]


def test_a_file_that_does_not_match_the_manifest_is_refused(tmp_path, home, pwfile):
    evil = tmp_path / "altered.backup"
    _evil_backup(evil, _member("home/api_key"))     # the manifest's sha256 of config.json is wrong too
    one_line_error(run_thox(home, "backup", "restore", str(evil), "--passphrase-file", str(pwfile), check=False),
                   "do not match its manifest")


def test_restore_on_a_device_stops_and_starts_the_api(tmp_path, home, pwfile):
    """With thox-api.service installed (THOX_UNIT_DIRS) the restore runs
    systemctl stop before any file changes and start after (a recording
    systemctl first on PATH)."""
    out = tmp_path / "box.backup"
    run_thox(home, "backup", "create", str(out), "--passphrase-file", str(pwfile))
    units = tmp_path / "units"
    units.mkdir()
    (units / "thox-api.service").write_text("[Service]\n")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "systemctl.log"
    (bindir / "systemctl").write_text(f"#!/bin/sh\necho \"$* $(cat {home}/api_key)\" >> {log}\n")
    (bindir / "systemctl").chmod(0o755)
    old_key = (home / "api_key").read_text().strip()
    run_thox(home, "api-key", "generate")
    new_key = (home / "api_key").read_text().strip()
    p = run_thox(home, "backup", "restore", str(out), "--passphrase-file", str(pwfile),
                 env={"THOX_UNIT_DIRS": str(units), "PATH": f"{bindir}:{os.environ['PATH']}"})
    assert log.read_text().splitlines() == [f"stop thox-api.service {new_key}", f"start thox-api.service {old_key}"]
    assert "stopped thox-api.service" in p.stdout and "started thox-api.service" in p.stdout


# --------------------------------------------------------------------------- as root

@pytest.fixture
def owned_home(tmp_path, home):
    """``home`` given to a throwaway system user (removed afterwards)."""
    require(os.geteuid() == 0, "root (CI runs as root): this test runs the CLI as root")
    name = f"thoxb{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                    "--shell", "/usr/sbin/nologin", name], check=True, capture_output=True)
    pw = pwd.getpwnam(name)
    base = Path(tempfile.mkdtemp(prefix="thox-backup-root-"))
    base.chmod(0o755)
    moved = base / "home"
    shutil.copytree(home, moved)
    for p in [moved, *moved.rglob("*")]:
        os.chown(p, pw.pw_uid, pw.pw_gid, follow_symlinks=False)
    yield moved, pw.pw_uid, pw.pw_gid
    shutil.rmtree(base, ignore_errors=True)
    subprocess.run(["userdel", name], capture_output=True)
    subprocess.run(["groupdel", name], capture_output=True)


def test_root_backup_and_restore_keep_files_owned_by_the_home_owner(tmp_path, owned_home, pwfile):
    home, uid, gid = owned_home
    pwfile.chmod(0o600)                  # root's file: the owner cannot read it; the CLI reads it as root
    out = tmp_path / "root.backup"       # in root's directory
    tmp_path.chmod(0o700)
    env = {**os.environ, "THOX_HOME": str(home)}
    p = subprocess.run([THOX, "backup", "create", str(out), "--passphrase-file", str(pwfile)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert out.stat().st_uid == 0 and stat.S_IMODE(out.stat().st_mode) == 0o600
    (home / "api_key").unlink()
    (home / "admin.json").unlink()
    p = subprocess.run([THOX, "backup", "restore", str(out), "--passphrase-file", str(pwfile)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    wrong = [str(x) for x in [home, *home.rglob("*")] if (x.lstat().st_uid, x.lstat().st_gid) != (uid, gid)]
    assert wrong == [], f"restored as root but not owned by the home's owner: {wrong}"
    assert stat.S_IMODE((home / "api_key").stat().st_mode) == 0o600


# --------------------------------------------------------------------------- config from a newer version

def test_config_with_unknown_keys_is_read_and_kept(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "api.port": 9090, "future.key": [1, 2], "engine.parallel": "lots-of-them", "models.keep_alive": 30}))
    assert run_thox(tmp_path, "config", "get", "api.port").stdout.strip() == "9090"
    listing = json.loads(run_thox(tmp_path, "config", "list", "--json").stdout)
    assert "future.key" not in listing
    assert listing["engine.parallel"] == 4, "a value this version cannot read falls back to the default"
    run_thox(tmp_path, "config", "set", "api.port", "9191")
    run_thox(tmp_path, "config", "unset", "models.keep_alive")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved == {"api.port": 9191, "future.key": [1, 2], "engine.parallel": "lots-of-them"}
    code = ("from thox.config import Config\nfrom thox.engine.manager import Settings\n"
            "s = Settings.from_config(Config())\nprint('ok')\n")
    p = subprocess.run([sys.executable, "-c", code], env={**os.environ, "THOX_HOME": str(tmp_path)},
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr
