"""Signed A/B updates on a booted Thox image (the updates role; pytest-testinfra).

Only an image has RAUC, its slots and the data partition: the image test sets
THOX_IMAGE=1 when it runs this suite against the booted image (tests/image), and
this module is left out elsewhere (a box provisioned over ssh).
"""
from __future__ import annotations

import json
import os
import re
import time
from contextlib import nullcontext

import pytest

pytestmark = [pytest.mark.slow_infra,
              pytest.mark.skipif(os.environ.get("THOX_IMAGE") != "1", reason="a booted image only (THOX_IMAGE=1)")]

HOME = "/var/lib/thox"
DATA = "/var/lib/thox-data"
SYSTEM = f"{DATA}/system"
USER = "thox"
KEY_TYPES = ("ed25519", "rsa", "ecdsa")


def root(host):
    """Root for the block: sudo when logged in as another user."""
    return nullcontext() if host.user().uid == 0 else host.sudo()


def _health_state(host, bound_s: float = 900) -> dict[str, str]:
    """thox-health.service's state once it has finished (it waits for the API after boot)."""
    deadline = time.monotonic() + bound_s
    while True:
        out = host.check_output("systemctl show -p ActiveState -p SubState -p Result thox-health.service")
        state = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        if state.get("ActiveState") != "activating" or time.monotonic() > deadline:
            return state
        time.sleep(5)


def _rauc_status(host, user: str = "root") -> dict:
    with root(host):
        r = host.run(f"runuser -u {user} -- rauc status --output-format=json")
    assert r.rc == 0, r.stderr
    return json.loads(r.stdout)


def _slots(status: dict) -> dict[str, dict]:
    return {name: fields for item in status["slots"] for name, fields in item.items()}


def test_health_check_succeeded_and_said_so(host):
    state = _health_state(host)
    assert state == {"ActiveState": "active", "SubState": "exited", "Result": "success"}, state
    version = re.search(r"^IMAGE_VERSION=\"?([^\"\n]+)", host.file("/etc/os-release").content_string, re.M)
    assert version, "IMAGE_VERSION missing from /etc/os-release"
    with root(host):
        log = host.check_output("journalctl -b -o cat -u thox-health.service")
    assert re.search(rf"^thox-health: slot [AB] good \(version {re.escape(version.group(1))}\)$", log, re.M), log


def test_rauc_status_shows_the_booted_slot_good(host):
    _health_state(host)
    status = _rauc_status(host)
    assert status["compatible"] in ("thox-amd64", "thox-jetson-orin")
    assert status["booted"] in ("A", "B")
    slots = _slots(status)
    booted = [s for s in slots.values() if s.get("bootname") == status["booted"]]
    assert len(booted) == 1 and booted[0]["state"] == "booted", slots
    assert booted[0]["boot_status"] == "good", slots
    cmdline = host.file("/proc/cmdline").content_string
    assert f"rauc.slot={status['booted']}" in cmdline.split(), cmdline


def test_the_service_user_may_use_rauc_and_others_may_not(host):
    assert _rauc_status(host, "thox")["booted"] in ("A", "B")
    with root(host):
        r = host.run("runuser -u nobody -- rauc status --output-format=json")
    # the bus refuses the call: dbus-daemon says AccessDenied or "Rejected send message"
    said = r.stderr + r.stdout
    assert r.rc != 0 and ("AccessDenied" in said or "Rejected send message" in said), said


def test_data_partition_holds_thox_home(host):
    """The data partition is mounted at DATA; THOX_HOME is a bind mount of its folder thox/."""
    with root(host):
        source = host.check_output(f"findmnt -n -o SOURCE --mountpoint {DATA}")
        fstype = host.check_output(f"findmnt -n -o FSTYPE --mountpoint {DATA}")
        data = host.check_output("readlink -f /dev/disk/by-partlabel/thox-data")
        label = host.check_output(f"blkid -s LABEL -o value {data}")
        data_dev = host.check_output(f"findmnt -n -o MAJ:MIN --mountpoint {DATA}")
        home_dev = host.check_output(f"findmnt -n -o MAJ:MIN --mountpoint {HOME}")
        home_root = host.check_output(f"findmnt -n -o FSROOT --mountpoint {HOME}")
    assert source == data and fstype == "ext4" and label == "thox-data", (source, data, fstype, label)
    assert home_dev == data_dev and home_root == "/thox", (home_dev, data_dev, home_root)
    root_source = host.check_output("findmnt -n -o SOURCE --mountpoint /")
    assert root_source != data


def test_system_dir_is_roots(host):
    """The data partition's top folder and system/ are root's, 0755: the service user can
    neither write into them nor rename system/ (it owns only thox/, THOX_HOME)."""
    for path in (DATA, SYSTEM):
        d = host.file(path)
        assert d.is_directory and d.user == "root" and d.group == "root" and d.mode == 0o755, path
    home = host.file(f"{DATA}/thox")
    assert home.is_directory and home.user == USER and home.mode == 0o750
    with root(host):
        for path in (DATA, SYSTEM):
            assert host.run(f"runuser -u {USER} -- test -w {path}").rc != 0, path
        moved = host.run(f"runuser -u {USER} -- mv {SYSTEM} {DATA}/thox/system")
        assert moved.rc != 0 and host.file(SYSTEM).is_directory, moved.stderr


def test_host_keys_on_the_data_partition(host):
    with root(host):
        for t in KEY_TYPES:
            key = host.file(f"{SYSTEM}/ssh/ssh_host_{t}_key")
            assert key.is_file and key.user == "root" and key.mode & 0o077 == 0, t
            assert host.file(f"{SYSTEM}/ssh/ssh_host_{t}_key.pub").is_file, t
        assert not host.run("ls /etc/ssh/ssh_host_*_key").stdout.strip(), "host keys in the slot"
        cfg = host.check_output("sshd -T").lower()
        for t in KEY_TYPES:
            assert f"hostkey {SYSTEM}/ssh/ssh_host_{t}_key" in cfg, t
        # the key sshd presents is the one on the data partition
        served = host.check_output("ssh-keyscan -t ed25519 127.0.0.1 2>/dev/null").split()
        kept = host.file(f"{SYSTEM}/ssh/ssh_host_ed25519_key.pub").content_string.split()
    assert served[1:3] == kept[0:2], (served, kept)


def test_keyring_is_a_certificate_and_no_key(host):
    with root(host):
        pem = host.file("/etc/rauc/keyring.pem").content_string
        assert "-----BEGIN CERTIFICATE-----" in pem and "PRIVATE KEY" not in pem
        r = host.run("openssl x509 -in /etc/rauc/keyring.pem -noout -subject")
        assert r.rc == 0 and "subject" in r.stdout, r.stderr
        assert host.run("grep -rl 'PRIVATE KEY' /etc/rauc").stdout.strip() == ""
    f = host.file("/etc/rauc/keyring.pem")
    assert f.user == "root" and f.mode == 0o644


def test_machine_id_is_set(host):
    assert re.fullmatch(r"[0-9a-f]{32}", host.file("/etc/machine-id").content_string.strip())


def test_watchdog_reboot_path_and_factory_reset_are_armed(host):
    assert host.check_output("systemctl show -p RuntimeWatchdogUSec --value") == "1min"
    assert host.service("thox-reboot.path").is_running
    assert host.service("thox-factory-reset.service").is_enabled
    assert host.check_output("systemctl show -p ConditionResult --value thox-factory-reset.service") == "no"
    assert host.service("thox-health.service").is_enabled


def test_hung_and_failed_boots_are_reset(host):
    """systemd applies the boot deadline to multi-user.target and would start the failed-boot
    reset with emergency and rescue mode (tests/provision/test_updates_units.py boots both)."""
    assert host.check_output("systemctl show -p JobTimeoutUSec --value multi-user.target") == "15min"
    assert host.check_output("systemctl show -p JobTimeoutAction --value multi-user.target") == "reboot-force"
    assert host.service("thox-boot-failed.service").is_enabled
    wants = host.check_output("systemctl show -p WantedBy --value thox-boot-failed.service").split()
    assert {"emergency.target", "rescue.target"} <= set(wants)
    assert host.check_output("systemctl show -p SuccessAction --value thox-boot-failed.service") == "reboot-force"
