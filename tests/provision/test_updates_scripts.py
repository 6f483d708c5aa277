"""The updates role's scripts, run here as the device runs them:

- thox-health against a real HTTP server on 127.0.0.1 (http.server answering /health),
  with `rauc` and `systemctl` replaced on PATH by recording stand-ins (external tools;
  the stand-in systemctl reports the API unit's state the test chooses);
- rauc-pre-install on a THOX_HOME in a temporary directory;
- rauc-post-install with RAUC's handler environment against a real ext4 file system
  (a file, loop-mounted by mount(8)); for a Jetson slot's extlinux.conf, blkid answers by a
  stand-in (a file has no GPT partition UUID);
- thox-ssh-hostkeys (the ssh role's) with the real ssh-keygen;
- shellcheck on the shell scripts.
"""
from __future__ import annotations

import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .conftest import ANSIBLE_DIR, need_root, need_tools, run

FILES = ANSIBLE_DIR / "roles/updates/files"
HEALTH = FILES / "thox-health"
PRE = FILES / "rauc-pre-install"
POST = FILES / "rauc-post-install"
RESET = FILES / "thox-factory-reset"
HOSTKEYS = ANSIBLE_DIR / "roles/ssh/files/thox-ssh-hostkeys"
SHELL_SCRIPTS = [PRE, POST, RESET, HOSTKEYS]

# `rauc status --output-format=json` of a box booted from B with A good (RAUC 1.8's layout)
STATUS_B_BOOTED_A_GOOD = {
    "compatible": "thox-amd64", "variant": "", "booted": "B", "boot_primary": "rootfs.1",
    "slots": [
        {"rootfs.0": {"class": "rootfs", "device": "/dev/disk/by-partlabel/thox-a", "type": "ext4",
                      "bootname": "A", "state": "inactive", "parent": None, "mountpoint": None,
                      "boot_status": "good"}},
        {"rootfs.1": {"class": "rootfs", "device": "/dev/disk/by-partlabel/thox-b", "type": "ext4",
                      "bootname": "B", "state": "booted", "parent": None, "mountpoint": "/",
                      "boot_status": "good"}},
    ],
}


class Health(http.server.BaseHTTPRequestHandler):
    """GET /health answers ``server.code`` (200 once ``server.ready_after`` requests were refused)."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        srv = self.server
        srv.hits += 1
        code = 200 if srv.hits > srv.ready_after else 503
        if self.path != "/health":
            code = 404
        body = json.dumps({"status": "ok" if code == 200 else "loading"}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def health_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    srv.hits, srv.ready_after = 0, 0
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


STUB = """#!/bin/sh
# records its argv (one JSON list per line) and answers from files the test writes
printf '%s\\n' "$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1:]))' "$0" "$@")" >> "$STUB_LOG"
name=$(basename "$0")
case "$name $1 $2" in
  "rauc status --output-format=json") cat "$STUB_DIR/rauc-status.json"; exit 0 ;;
  "systemctl show "*) cat "$STUB_DIR/unit-state"; exit 0 ;;
esac
exit "$(cat "$STUB_DIR/$name-rc" 2>/dev/null || echo 0)"
"""


@pytest.fixture
def stubs(tmp_path):
    d = tmp_path / "stubs"
    d.mkdir()
    for name in ("rauc", "systemctl"):
        (d / name).write_text(STUB)
        (d / name).chmod(0o755)
    (d / "rauc-status.json").write_text(json.dumps(STATUS_B_BOOTED_A_GOOD))
    (d / "unit-state").write_text("ActiveState=activating\nSubState=start\nResult=success\nNRestarts=0\n")
    os_release = tmp_path / "os-release"
    os_release.write_text('ID=debian\nIMAGE_ID=thox\nIMAGE_VERSION="3"\n')

    def calls() -> list[list[str]]:
        log = tmp_path / "calls.log"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    env = dict(os.environ, PATH=f"{d}:{os.environ['PATH']}", STUB_DIR=str(d), STUB_LOG=str(tmp_path / "calls.log"),
               THOX_OS_RELEASE=str(os_release), THOX_HEALTH_MAX_RESTARTS="3")
    return {"dir": d, "env": env, "calls": calls}


def run_health(stubs, url: str, timeout_s: float, bound_s: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(stubs["env"], THOX_HEALTH_URL=url, THOX_HEALTH_TIMEOUT=str(timeout_s))
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, str(HEALTH)], capture_output=True, text=True, env=env, timeout=bound_s)
    return p, time.monotonic() - t0


def verdicts(calls) -> list[list[str]]:
    """The calls that decide: rauc mark-* and systemctl reboot (not the status queries)."""
    return [c[1:] for c in calls if c[1:2] in (["status"], ["reboot"]) and c[1:] != ["status", "--output-format=json"]]


def test_health_marks_the_slot_good_once_health_answers(health_server, stubs):
    health_server.ready_after = 2        # two 503s (loading), then 200
    url = f"http://127.0.0.1:{health_server.server_port}/health"
    p, _ = run_health(stubs, url, timeout_s=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert verdicts(stubs["calls"]()) == [["status", "mark-good", "booted"]]
    assert p.stdout == "thox-health: slot B good (version 3)\n"
    assert health_server.hits == 3


def test_health_marks_bad_and_reboots_when_the_api_unit_failed(health_server, stubs):
    """The API unit gave up (restarts used up: failed): the verdict comes at once, not
    after the timeout."""
    health_server.ready_after = 10**9
    (stubs["dir"] / "unit-state").write_text("ActiveState=failed\nSubState=failed\nResult=exit-code\nNRestarts=2\n")
    url = f"http://127.0.0.1:{health_server.server_port}/health"
    p, took = run_health(stubs, url, timeout_s=600)
    assert p.returncode == 1
    assert verdicts(stubs["calls"]()) == [["status", "mark-bad", "booted"], ["reboot"]]
    assert p.stdout == ("thox-health: slot B bad (version 3): thox-api.service failed (exit-code); "
                        "rebooting into A\n"), p.stdout
    assert took < 30, took


def test_health_gives_up_after_the_api_restarted_n_times(stubs):
    """A unit that keeps restarting (each try slower than the start limit) counts as failed
    after THOX_HEALTH_MAX_RESTARTS restarts; nothing listens on the port."""
    (stubs["dir"] / "unit-state").write_text("ActiveState=activating\nSubState=auto-restart\nResult=exit-code\n"
                                             "NRestarts=3\n")
    p, took = run_health(stubs, "http://127.0.0.1:9/health", timeout_s=600)
    assert p.returncode == 1
    assert verdicts(stubs["calls"]()) == [["status", "mark-bad", "booted"], ["reboot"]]
    assert "thox-api.service restarted 3 times; rebooting into A" in p.stdout
    assert took < 30, took


def test_health_times_out_when_the_api_never_answers(health_server, stubs):
    health_server.ready_after = 10**9    # always 503; the unit stays active
    (stubs["dir"] / "unit-state").write_text("ActiveState=active\nSubState=running\nResult=success\nNRestarts=0\n")
    url = f"http://127.0.0.1:{health_server.server_port}/health"
    p, took = run_health(stubs, url, timeout_s=3)
    assert p.returncode == 1
    assert verdicts(stubs["calls"]()) == [["status", "mark-bad", "booted"], ["reboot"]]
    assert f"no answer from {url} within 3 s; rebooting into A" in p.stdout
    assert 3 <= took < 30, took
    assert health_server.hits >= 2


def test_health_stays_when_no_other_slot_is_good(stubs):
    """A fresh image (B never written, so not good): no mark-bad, no reboot loop."""
    status = json.loads(json.dumps(STATUS_B_BOOTED_A_GOOD))
    status["booted"] = "A"
    status["slots"][0]["rootfs.0"].update(state="booted", boot_status="good")
    status["slots"][1]["rootfs.1"].update(state="inactive", boot_status="bad")
    (stubs["dir"] / "rauc-status.json").write_text(json.dumps(status))
    (stubs["dir"] / "unit-state").write_text("ActiveState=failed\nSubState=failed\nResult=exit-code\nNRestarts=5\n")
    p, _ = run_health(stubs, "http://127.0.0.1:9/health", timeout_s=600)
    assert p.returncode == 1
    assert verdicts(stubs["calls"]()) == []
    assert p.stdout == ("thox-health: slot A bad (version 3): thox-api.service failed (exit-code); "
                        "no other good slot, staying on A\n")


def test_health_reports_a_failed_mark_good(health_server, stubs):
    (stubs["dir"] / "rauc-rc").write_text("1")
    url = f"http://127.0.0.1:{health_server.server_port}/health"
    p, _ = run_health(stubs, url, timeout_s=30)
    assert p.returncode == 1
    assert "could not be marked good" in p.stdout


def run_health_from_config(stubs, config: Path, default_port: int, timeout_s: float = 30,
                           host: str = "::") -> subprocess.CompletedProcess:
    """thox-health as the unit starts it: no URL, the address from config.json or the defaults."""
    env = dict(stubs["env"], THOX_HEALTH_CONFIG=str(config), THOX_HEALTH_PORT=str(default_port),
               THOX_HEALTH_HOST=host, THOX_HEALTH_TIMEOUT=str(timeout_s))
    env.pop("THOX_HEALTH_URL", None)
    return subprocess.run([sys.executable, str(HEALTH)], capture_output=True, text=True, env=env, timeout=60)


def test_health_polls_the_port_and_host_config_json_names(health_server, stubs, tmp_path):
    """The user moved the API to another port: the check follows config.json (flat dotted keys,
    as thox config set writes them; a port given as a string too), not the unit's default."""
    port = health_server.server_port
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"api.port": port, "future.key": 1}))
    p = run_health_from_config(stubs, config, default_port=9)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "thox-health: slot B good (version 3)\n"
    assert f"http://127.0.0.1:{port}/health" in p.stderr
    assert health_server.hits == 1
    # a specific address the API listens on is polled there; a string port is read as the app reads it
    config.write_text(json.dumps({"api.host": "127.0.0.1", "api.port": str(port)}))
    p = run_health_from_config(stubs, config, default_port=9)
    assert p.returncode == 0 and health_server.hits == 2, p.stderr
    # no config.json, or one without the keys or with a value the app refuses: the unit's default port
    for text in (None, "{}", json.dumps({"api.port": 0}), json.dumps({"api.port": True}), "not json"):
        if text is None:
            config.unlink(missing_ok=True)
        else:
            config.write_text(text)
        p = run_health_from_config(stubs, config, default_port=port)
        assert p.returncode == 0 and f"127.0.0.1:{port}/health" in p.stderr, (text, p.stderr)


def test_health_fails_when_config_json_points_elsewhere(health_server, stubs, tmp_path):
    """Control: with config.json naming a port nothing answers on, the slot is not kept
    even though the unit's default port answers."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"api.port": 9}))
    (stubs["dir"] / "unit-state").write_text("ActiveState=failed\nSubState=failed\nResult=exit-code\nNRestarts=3\n")
    p = run_health_from_config(stubs, config, default_port=health_server.server_port)
    assert p.returncode == 1 and "127.0.0.1:9/health" in p.stderr
    assert health_server.hits == 0


@pytest.mark.parametrize("host, polled", [("::", "127.0.0.1"), ("[::]", "127.0.0.1"), ("*", "127.0.0.1"),
                                          ("0.0.0.0", "127.0.0.1"), ("::1", "[::1]"), ("[::1]", "[::1]"),
                                          ("192.168.1.20", "192.168.1.20"), ("fd00::5", "[fd00::5]")])
def test_health_polls_the_address_the_api_listens_on(stubs, tmp_path, host, polled):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"api.host": host, "api.port": 9}))
    (stubs["dir"] / "unit-state").write_text("ActiveState=failed\nSubState=failed\nResult=exit-code\nNRestarts=3\n")
    p = run_health_from_config(stubs, config, default_port=8080)
    assert f"waiting up to 30 s for http://{polled}:9/health" in p.stderr


def test_health_polls_ipv6_loopback_when_the_api_listens_there(stubs, tmp_path):
    class Server6(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6

    srv = Server6(("::1", 0), Health)
    srv.hits, srv.ready_after = 0, 0
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        config = tmp_path / "config.json"
        config.write_text(json.dumps({"api.host": "::1", "api.port": srv.server_port}))
        p = run_health_from_config(stubs, config, default_port=9)
        assert p.returncode == 0 and srv.hits == 1, p.stderr
    finally:
        srv.shutdown()
        srv.server_close()


# ---------------------------------------------------------------------- RAUC handlers

def test_pre_install_snapshots_the_config(tmp_path):
    home, sysdir = tmp_path / "home", tmp_path / "home/system"
    home.mkdir()
    (home / "config.json").write_text('{"api": {"port": 8080}, "future": 1}\n')
    os.chmod(home / "config.json", 0o640)
    conf = tmp_path / "updates.conf"
    conf.write_text(f"THOX_HOME={home}\nTHOX_SYSTEM_DIR={sysdir}\n")
    p = run([str(PRE)], env=dict(os.environ, THOX_UPDATES_CONF=str(conf)))
    snap = sysdir / "config-before-update.json"
    assert snap.read_text() == (home / "config.json").read_text()
    assert (snap.stat().st_mode & 0o777) == 0o640
    assert "config snapshot" in p.stdout
    # no config yet (a fresh box): nothing to keep, not an error
    (home / "config.json").unlink()
    snap.unlink()
    run([str(PRE)], env=dict(os.environ, THOX_UPDATES_CONF=str(conf)))
    assert not snap.exists()


def test_pre_install_follows_no_planted_link(tmp_path):
    """THOX_HOME is the service user's: a config.json that is a symbolic link is not read, a
    system folder that is a link, or not root's alone, is not written into, and a planted link
    at any name the snapshot could take is replaced, never written through."""
    home, sysdir = tmp_path / "home", tmp_path / "system"
    home.mkdir()
    conf = tmp_path / "updates.conf"
    conf.write_text(f"THOX_HOME={home}\nTHOX_SYSTEM_DIR={sysdir}\n")
    env = dict(os.environ, THOX_UPDATES_CONF=str(conf))
    secret = tmp_path / "secret"
    secret.write_text("root only\n")
    (home / "config.json").symlink_to(secret)
    p = run([str(PRE)], env=env, check=False)
    assert p.returncode != 0 and not (sysdir / "config-before-update.json").exists(), p.stdout + p.stderr
    (home / "config.json").unlink()
    (home / "config.json").write_text('{"api": {}}\n')
    # a system folder that is a link elsewhere
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    sysdir.symlink_to(elsewhere)
    p = run([str(PRE)], env=env, check=False)
    assert p.returncode != 0 and list(elsewhere.iterdir()) == [], p.stdout + p.stderr
    sysdir.unlink()
    # a system folder others may write to
    sysdir.mkdir()
    os.chmod(sysdir, 0o777)
    p = run([str(PRE)], env=env, check=False)
    assert p.returncode != 0 and list(sysdir.iterdir()) == [], p.stdout + p.stderr
    os.chmod(sysdir, 0o755)
    # links planted at the snapshot's name and at the old temporary name are replaced
    target = tmp_path / "target"
    target.write_text("untouched\n")
    (sysdir / "config-before-update.json").symlink_to(target)
    (sysdir / "config-before-update.json.tmp").symlink_to(target)
    run([str(PRE)], env=env)
    snap = sysdir / "config-before-update.json"
    assert not snap.is_symlink() and snap.read_text() == '{"api": {}}\n'
    assert target.read_text() == "untouched\n"
    assert sorted(x.name for x in sysdir.iterdir()) == ["config-before-update.json", "config-before-update.json.tmp"]


def _ext4(path: Path, size_mb: int = 8) -> Path:
    run(["truncate", "-s", f"{size_mb}M", str(path)])
    run(["mkfs.ext4", "-q", "-F", str(path)])
    return path


def _debugfs_cat(image: Path, inner: str) -> str:
    return run(["debugfs", "-R", f"cat {inner}", str(image)]).stdout


def test_post_install_carries_the_machine_id_into_the_target_slot(tmp_path):
    need_root()
    need_tools("mkfs.ext4", "debugfs", "mount", "umount")
    slot_a, slot_b = _ext4(tmp_path / "a.ext4"), _ext4(tmp_path / "b.ext4")
    mid = tmp_path / "machine-id"
    mid.write_text("0123456789abcdef0123456789abcdef\n")
    prefix = tmp_path / "mnt"
    env = dict(os.environ, MACHINE_ID=str(mid), RAUC_MOUNT_PREFIX=str(prefix),
               RAUC_SLOTS="1 2", RAUC_TARGET_SLOTS="2",
               RAUC_SLOT_NAME_1="rootfs.0", RAUC_SLOT_CLASS_1="rootfs", RAUC_SLOT_DEVICE_1=str(slot_a),
               RAUC_SLOT_BOOTNAME_1="A",
               RAUC_SLOT_NAME_2="rootfs.1", RAUC_SLOT_CLASS_2="rootfs", RAUC_SLOT_DEVICE_2=str(slot_b),
               RAUC_SLOT_BOOTNAME_2="B")
    p = run([str(POST)], env=env)
    assert f"machine-id copied into {slot_b}" in p.stdout
    assert _debugfs_cat(slot_b, "/etc/machine-id") == mid.read_text()
    assert "machine-id" not in run(["debugfs", "-R", "ls /", str(slot_a)]).stdout
    assert not list(prefix.iterdir()), "the mount point is left behind"
    assert str(prefix) not in Path("/proc/mounts").read_text()
    # an empty (uninitialised) machine-id is refused: nothing is written
    mid.write_text("")
    p = run([str(POST)], env=dict(env, RAUC_TARGET_SLOTS="1"), check=False)
    assert p.returncode != 0 and "holds no machine id" in p.stderr
    assert "machine-id" not in run(["debugfs", "-R", "ls /", str(slot_a)]).stdout
    # no rootfs among the targets: an error, not a silent success
    mid.write_text("0123456789abcdef0123456789abcdef\n")
    p = run([str(POST)], env=dict(env, RAUC_TARGET_SLOTS=""), check=False)
    assert p.returncode != 0 and "no rootfs slot" in p.stderr


def test_post_install_carries_root_s_and_the_admin_s_ssh_keys(tmp_path):
    """authorized_keys of root and of THOX_SSH_USER (image.conf) on this system are added to the
    same users' files in the new slot (owner from the slot's passwd, 0700/0600, lines the slot has
    kept, none doubled); the machine-id still goes in; a link planted for a key file is not followed."""
    need_root()
    need_tools("mkfs.ext4", "debugfs", "mount", "umount")
    here = tmp_path / "running"
    (here / "etc").mkdir(parents=True)
    (here / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\nnvadmin:x:1000:1000::/home/nvadmin:/bin/bash\n"
                                     "other:x:1001:1001::/home/other:/bin/sh\n")
    for home, keys in (("root", "ssh-ed25519 AAAAroot root@laptop\n"),
                       ("home/nvadmin", "ssh-ed25519 AAAAbaked owner\nssh-ed25519 AAAAimported esp\n"),
                       ("home/other", "ssh-ed25519 AAAAother x\n")):
        (here / home / ".ssh").mkdir(parents=True)
        (here / home / ".ssh/authorized_keys").write_text(keys)
    image_conf = tmp_path / "image.conf"
    image_conf.write_text("# managed\nTHOX_SSH_USER=nvadmin\n")
    # the new slot: its own passwd (the admin with another uid), the admin's baked key already there
    tree = tmp_path / "slot"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\nnvadmin:x:1005:1006::/home/nvadmin:/bin/bash\n")
    (tree / "home/nvadmin/.ssh").mkdir(parents=True)
    (tree / "home/nvadmin/.ssh/authorized_keys").write_text("ssh-ed25519 AAAAbaked owner\n")
    slot_b = tmp_path / "b.ext4"
    run(["truncate", "-s", "8M", str(slot_b)])
    run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(slot_b)])
    mid = tmp_path / "machine-id"
    mid.write_text("0123456789abcdef0123456789abcdef\n")
    env = dict(os.environ, MACHINE_ID=str(mid), RAUC_MOUNT_PREFIX=str(tmp_path / "mnt"), RAUC_TARGET_SLOTS="2",
               RAUC_SLOT_NAME_2="rootfs.1", RAUC_SLOT_CLASS_2="rootfs", RAUC_SLOT_DEVICE_2=str(slot_b),
               RAUC_SLOT_BOOTNAME_2="B", IMAGE_CONF=str(image_conf), SSH_KEYS_ROOT=str(here))
    p = run([str(POST)], env=env)
    assert "ssh keys of root carried" in p.stdout and "ssh keys of nvadmin carried" in p.stdout, p.stdout
    assert _debugfs_cat(slot_b, "/etc/machine-id") == mid.read_text()
    assert _debugfs_cat(slot_b, "/root/.ssh/authorized_keys") == "ssh-ed25519 AAAAroot root@laptop\n"
    assert _debugfs_cat(slot_b, "/home/nvadmin/.ssh/authorized_keys") == \
        "ssh-ed25519 AAAAbaked owner\nssh-ed25519 AAAAimported esp\n"
    assert "other" not in run(["debugfs", "-R", "ls /home", str(slot_b)]).stdout, "only root and the admin"
    for inner, mode, owner in (("/home/nvadmin/.ssh/authorized_keys", "0600", (1005, 1006)),
                               ("/home/nvadmin/.ssh", "0700", (1005, 1006)), ("/root/.ssh/authorized_keys", "0600", (0, 0))):
        st = run(["debugfs", "-R", f"stat {inner}", str(slot_b)]).stdout
        assert f"Mode:  {mode}" in st and re.search(rf"User:\s+{owner[0]}\s+Group:\s+{owner[1]}\b", st), (inner, st)
    # again: nothing doubled
    run([str(POST)], env=env)
    assert _debugfs_cat(slot_b, "/home/nvadmin/.ssh/authorized_keys") == \
        "ssh-ed25519 AAAAbaked owner\nssh-ed25519 AAAAimported esp\n"
    # a key file that is a link (to a root-only file) is not carried
    secret = tmp_path / "shadow"
    secret.write_text("root:secret\n")
    (here / "root/.ssh/authorized_keys").unlink()
    (here / "root/.ssh/authorized_keys").symlink_to(secret)
    (here / "home/nvadmin/.ssh/authorized_keys").write_text("ssh-ed25519 AAAAnew later\n")
    p = run([str(POST)], env=env)
    assert "ssh keys of root carried" not in p.stdout
    assert "secret" not in _debugfs_cat(slot_b, "/root/.ssh/authorized_keys")
    assert _debugfs_cat(slot_b, "/home/nvadmin/.ssh/authorized_keys").endswith("ssh-ed25519 AAAAnew later\n")
    # without image.conf only root's keys are looked at
    (here / "root/.ssh/authorized_keys").unlink()
    (here / "root/.ssh/authorized_keys").write_text("ssh-ed25519 AAAAroot2 x\n")
    p = run([str(POST)], env=dict(env, IMAGE_CONF=str(tmp_path / "none.conf")))
    assert "ssh keys of root carried" in p.stdout and "nvadmin" not in p.stdout


JETSON_EXTLINUX = """TIMEOUT 30
DEFAULT primary

LABEL primary
      MENU LABEL primary kernel
      LINUX /boot/Image
      FDT /boot/dtb/kernel_tegra234-p3768-0000+p3767-0005-nv.dtb
      INITRD /boot/initrd
      APPEND ${cbootargs} root=/dev/mmcblk0p1 rw rootwait rootfstype=ext4 console=ttyTCU0,115200 root=PARTUUID=aaaaaaaa-0000-4000-8000-00000000000a

LABEL backup
      LINUX /boot/Image.backup
      APPEND ${cbootargs} rw rootwait root=PARTUUID=aaaaaaaa-0000-4000-8000-00000000000a
"""
SLOT_B_PARTUUID = "bbbbbbbb-0000-4000-8000-00000000000b"


def test_post_install_points_a_jetson_slot_at_itself(tmp_path):
    """A slot with /boot/extlinux/extlinux.conf (written from a bundle made of slot A's root fs,
    so naming A or no slot) gets root=PARTUUID=<its own partition UUID> on every APPEND line
    and nothing else changed. blkid is a stand-in answering for the slot device (a file has no
    GPT partition UUID); the file system is a real ext4, loop-mounted."""
    need_root()
    need_tools("mkfs.ext4", "debugfs", "mount", "umount")
    tree = tmp_path / "tree"
    (tree / "boot/extlinux").mkdir(parents=True)
    (tree / "boot/extlinux/extlinux.conf").write_text(JETSON_EXTLINUX)
    os.chmod(tree / "boot/extlinux/extlinux.conf", 0o644)
    slot_b = tmp_path / "app_b.ext4"
    run(["truncate", "-s", "8M", str(slot_b)])
    run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(slot_b)])
    bin_dir, calls = tmp_path / "bin", tmp_path / "blkid.calls"
    bin_dir.mkdir()
    (bin_dir / "blkid").write_text(f"""#!/bin/sh
echo "$*" >> {calls}
[ "$*" = "-s PARTUUID -o value {slot_b}" ] && [ -n "$PARTUUID" ] && echo "$PARTUUID" && exit 0
exit 2
""")
    os.chmod(bin_dir / "blkid", 0o755)
    mid = tmp_path / "machine-id"
    mid.write_text("0123456789abcdef0123456789abcdef\n")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PARTUUID=SLOT_B_PARTUUID,
               MACHINE_ID=str(mid), RAUC_MOUNT_PREFIX=str(tmp_path / "mnt"), RAUC_TARGET_SLOTS="2",
               RAUC_SLOT_NAME_2="rootfs.1", RAUC_SLOT_CLASS_2="rootfs", RAUC_SLOT_DEVICE_2=str(slot_b),
               RAUC_SLOT_BOOTNAME_2="B")
    p = run([str(POST)], env=env)
    assert f"{slot_b} boots with root=PARTUUID={SLOT_B_PARTUUID}" in p.stdout
    conf = _debugfs_cat(slot_b, "/boot/extlinux/extlinux.conf")
    appends = [line for line in conf.splitlines() if line.strip().startswith("APPEND")]
    assert len(appends) == 2
    for line in appends:
        assert re.findall(r"\broot=\S+", line) == [f"root=PARTUUID={SLOT_B_PARTUUID}"], line
    assert appends[0] == ("      APPEND ${cbootargs} rw rootwait rootfstype=ext4 console=ttyTCU0,115200 "
                          f"root=PARTUUID={SLOT_B_PARTUUID}")
    others = [line for line in JETSON_EXTLINUX.splitlines() if not line.strip().startswith("APPEND")]
    assert [line for line in conf.splitlines() if not line.strip().startswith("APPEND")] == others
    assert "Mode:  0644" in run(["debugfs", "-R", "stat /boot/extlinux/extlinux.conf", str(slot_b)]).stdout
    assert _debugfs_cat(slot_b, "/etc/machine-id") == mid.read_text()
    # installing again (the same slot rewritten) gives the same file
    run([str(POST)], env=env)
    assert _debugfs_cat(slot_b, "/boot/extlinux/extlinux.conf") == conf
    # no partition UUID for the device: the install fails, the mount is cleaned up
    p = run([str(POST)], env=dict(env, PARTUUID=""), check=False)
    assert p.returncode != 0 and "has no GPT partition UUID" in p.stderr
    assert str(tmp_path / "mnt") not in Path("/proc/mounts").read_text()
    assert not list((tmp_path / "mnt").iterdir())
    # an amd64 slot (GRUB, no extlinux.conf) is left to GRUB: blkid is not asked
    calls.unlink()
    slot_a = _ext4(tmp_path / "thox-a.ext4")
    run([str(POST)], env=dict(env, RAUC_SLOT_DEVICE_2=str(slot_a)))
    assert not calls.exists()
    assert "extlinux" not in run(["debugfs", "-R", "ls /", str(slot_a)]).stdout


# ---------------------------------------------------------------------- factory reset

def test_factory_reset_makes_the_data_partition_anew(tmp_path):
    """A used data partition (a file here) becomes the factory data again: label thox-data,
    top folder root's with mode 0755, THOX_HOME's folder thox/ the service user's with mode 0750
    (whatever the factory data's owners), old files gone; the flag is removed."""
    need_tools("mkfs.ext4", "debugfs")
    part = _ext4(tmp_path / "data.ext4", 16)
    run(["debugfs", "-w", "-R", "mkdir canary", str(part)])
    data = tmp_path / "factory-data"
    (data / "thox/models").mkdir(parents=True)
    (data / "thox/config.json").write_text('{"api": {}}\n')
    os.chmod(data, 0o700)
    os.chmod(data / "thox", 0o777)
    flag = tmp_path / "factory-reset"
    flag.write_text("")
    p = run([str(RESET), str(part), str(data), str(flag), "daemon:daemon", "thox"])
    assert "made anew" in p.stdout
    assert not flag.exists()
    assert run(["blkid", "-s", "LABEL", "-o", "value", str(part)]).stdout.strip() == "thox-data"
    listing = run(["debugfs", "-R", "ls -l /", str(part)]).stdout
    assert "canary" not in listing and "thox" in listing
    assert "models" in run(["debugfs", "-R", "ls -l /thox", str(part)]).stdout
    top = run(["debugfs", "-R", "stat /", str(part)]).stdout
    assert "Mode:  0755" in top and re.search(r"User:\s+0\s+Group:\s+0\b", top), top
    home = run(["debugfs", "-R", "stat /thox", str(part)]).stdout
    uid, gid = run(["id", "-u", "daemon"]).stdout.strip(), run(["id", "-g", "daemon"]).stdout.strip()
    assert "Mode:  0750" in home and re.search(rf"User:\s+{uid}\s+Group:\s+{gid}\b", home), home
    assert _debugfs_cat(part, "/thox/config.json") == '{"api": {}}\n'
    # a missing folder of factory data, or one without THOX_HOME's folder: an error
    for bad in (tmp_path / "none", data / "thox/models"):
        p = run([str(RESET), str(part), str(bad), str(flag), "daemon:daemon", "thox"], check=False)
        assert p.returncode != 0 and "no " in p.stderr, p.stderr
    assert "config.json" in run(["debugfs", "-R", "ls -l /thox", str(part)]).stdout


# ---------------------------------------------------------------------- ssh host keys

def test_hostkeys_makes_each_missing_key_once(tmp_path):
    need_tools("ssh-keygen")
    d = tmp_path / "system/ssh"
    p = run([str(HOSTKEYS), str(d)], timeout=300)
    keys = sorted(x.name for x in d.iterdir())
    assert keys == sorted(f"ssh_host_{t}_key{s}" for t in ("ed25519", "rsa", "ecdsa") for s in ("", ".pub"))
    for t in ("ed25519", "rsa", "ecdsa"):
        assert (d / f"ssh_host_{t}_key").stat().st_mode & 0o077 == 0
        run(["ssh-keygen", "-l", "-f", str(d / f"ssh_host_{t}_key.pub")])
    assert p.stdout.count("made ") == 3
    before = {k: (d / k).read_bytes() for k in keys}
    (d / "ssh_host_rsa_key").unlink()
    (d / "ssh_host_rsa_key.pub").unlink()
    p = run([str(HOSTKEYS), str(d)], timeout=300)
    assert p.stdout.count("made ") == 1 and "ssh_host_rsa_key" in p.stdout
    for k in keys:
        if "rsa" not in k:
            assert (d / k).read_bytes() == before[k], k


def test_shell_scripts_pass_shellcheck():
    need_tools("shellcheck")
    p = run(["shellcheck", "-s", "sh", *map(str, SHELL_SCRIPTS)], check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def test_health_script_compiles_standalone():
    """/usr/bin/python3 runs it on the device: the standard library only."""
    src = HEALTH.read_text()
    assert src.startswith("#!/usr/bin/python3\n")
    compile(src, str(HEALTH), "exec")
    for mod in ("import requests", "import httpx", "from thox"):
        assert mod not in src
