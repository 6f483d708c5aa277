"""The updates role's files as Ansible renders them (its defaults, both targets):
systemd-analyze verify on the units, RAUC itself loading system.conf, a real dbus-daemon
applying the D-Bus policy, sshd's HostKey lines, and the role's keyring checks."""
from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from .conftest import (ABIN, ANSIBLE_DIR, NSPAWN_PREP, SYSTEMD_DIR, ansible_env, need_ansible, need_root, need_tools, render,
                       run, unit_root, verify_units)

pytestmark = pytest.mark.slow_infra

ROLE = ANSIBLE_DIR / "roles/updates"
UNITS = ["thox-health.service", "thox-reboot.path", "thox-reboot.service", "thox-factory-reset.service",
         "thox-ssh-hostkeys.service", "thox-boot-failed.service"]
# what the units above name, rendered alongside so that verify resolves them
DEPS = ["thox-api.service", "thox-firstboot.service"]
CONFIGS = {"system.conf": "updates/templates/system.conf.j2", "thox-rauc.conf": "updates/templates/thox-rauc.conf.j2",
           "tmpfiles.conf": "updates/templates/thox-updates.tmpfiles.j2",
           "watchdog.conf": "updates/templates/thox-watchdog.conf.j2", "updates.conf": "updates/templates/updates.conf.j2",
           "boot-deadline.conf": str(SYSTEMD_DIR / "thox-boot-deadline.conf.j2"),
           "sshd.conf": "ssh/templates/sshd_thox.conf.j2"}


def _render(tmp: Path, extra: dict) -> dict[str, str]:
    tmp.mkdir(parents=True, exist_ok=True)
    items = [(str(SYSTEMD_DIR / f"{n}.j2"), n) for n in UNITS + DEPS] + [(src, n) for n, src in CONFIGS.items()]
    out = render(tmp, items, {"thox_image_build": True, "thox_is_jetson": False, **extra})
    return {n: (out / n).read_text() for n in UNITS + DEPS + list(CONFIGS)}


@pytest.fixture(scope="module")
def amd64(tmp_path_factory) -> dict[str, str]:
    return _render(tmp_path_factory.mktemp("amd64"), {})


@pytest.fixture(scope="module")
def jetson(tmp_path_factory) -> dict[str, str]:
    return _render(tmp_path_factory.mktemp("jetson"), {"thox_is_jetson": True})


def _unit_root(tmp: Path, files: dict[str, str]) -> Path:
    return unit_root(tmp, {n: files[n] for n in UNITS + DEPS})


def test_units_verify(tmp_path, amd64):
    need_tools("systemd-analyze")
    p = verify_units(_unit_root(tmp_path, amd64), UNITS)
    assert p.returncode == 0 and not p.stderr.strip(), p.stderr


def test_units_verify_catches_a_broken_unit(tmp_path, amd64):
    """Control: the same check fails on a unit with an unknown directive."""
    need_tools("systemd-analyze")
    broken = dict(amd64, **{"thox-reboot.path": amd64["thox-reboot.path"].replace("[Path]", "[Path]\nPathExist=/x")})
    p = verify_units(_unit_root(tmp_path, broken), ["thox-reboot.path"])
    assert "PathExist" in p.stderr


def _lines(text: str) -> set[str]:
    return {ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")}


def test_health_unit(amd64):
    u = _lines(amd64["thox-health.service"])
    for line in ("Type=oneshot", "RemainAfterExit=yes", "Wants=thox-api.service", "After=thox-api.service dbus.service",
                 "Environment=THOX_HEALTH_CONFIG=/var/lib/thox/config.json", "Environment=THOX_HEALTH_HOST=::",
                 "Environment=THOX_HEALTH_PORT=8080", "Environment=THOX_HEALTH_TIMEOUT=600",
                 "Environment=THOX_HEALTH_UNIT=thox-api.service", "Environment=THOX_HEALTH_MAX_RESTARTS=3",
                 "ExecStart=/usr/local/lib/thox/thox-health", "StandardOutput=journal+console",
                 "WantedBy=multi-user.target"):
        assert line in u, line
    # systemd never kills it before the script's own timeout has run out
    timeout = int(re.search(r"^TimeoutStartSec=(\d+)$", amd64["thox-health.service"], re.M).group(1))
    assert timeout > 600


def test_units_follow_the_role_variables(tmp_path):
    files = _render(tmp_path / "knobs", {"thox_api_port": 8123, "updates_health_timeout": 90,
                                         "updates_health_max_restarts": 7, "thox_home": "/srv/thox-home",
                                         "updates_emergency_reset_sec": 9,
                                         "thox_data_dir": "/srv/thox-data",
                                         "thox_user": "svc", "updates_data_device": "/dev/disk/by-partlabel/data-x"})
    h = _lines(files["thox-health.service"])
    assert {"Environment=THOX_HEALTH_PORT=8123", "Environment=THOX_HEALTH_CONFIG=/srv/thox-home/config.json",
            "Environment=THOX_HEALTH_TIMEOUT=90",
            "Environment=THOX_HEALTH_MAX_RESTARTS=7", "TimeoutStartSec=210"} <= h
    assert "PathExists=/srv/thox-home/requests/reboot" in _lines(files["thox-reboot.path"])
    assert {"User=svc", "ExecStart=/usr/bin/rm -f /srv/thox-home/requests/reboot",
            "ExecStart=+/usr/bin/systemctl reboot"} <= _lines(files["thox-reboot.service"])
    f = _lines(files["thox-factory-reset.service"])
    assert (r"Before=srv-thox\x2ddata.mount srv-thox\x2dhome.mount systemd-fsck@dev-disk-by\x2dpartlabel-data\x2dx.service "
            "local-fs.target") in f
    assert r"Requires=dev-disk-by\x2dpartlabel-data\x2dx.device" in f
    assert "ExecStart=/usr/local/lib/thox/thox-factory-reset /dev/disk/by-partlabel/data-x " \
           "/usr/lib/thox/factory-data /boot/efi/thox/factory-reset svc:thox thox" in f
    assert "d /srv/thox-data/system 0755 root root -" in _lines(files["tmpfiles.conf"])
    assert "d /srv/thox-home/requests 0750 svc thox -" in _lines(files["tmpfiles.conf"])
    assert "ExecStart=/usr/local/sbin/thox-ssh-hostkeys /srv/thox-data/system/ssh" in _lines(files["thox-ssh-hostkeys.service"])
    assert 'allow send_destination="de.pengutronix.rauc"' in files["thox-rauc.conf"] and 'user="svc"' in files["thox-rauc.conf"]
    assert {"THOX_HOME=/srv/thox-home", "THOX_SYSTEM_DIR=/srv/thox-data/system"} <= _lines(files["updates.conf"])
    assert "statusfile=/srv/thox-data/system/rauc.status" in _lines(files["system.conf"])
    assert "JobTimeoutSec=390" in _lines(files["boot-deadline.conf"]), "the health timeout + 300 s"
    assert "exec sleep 9'" in files["thox-boot-failed.service"]


def test_factory_reset_runs_before_the_data_partition_is_mounted(amd64):
    f = _lines(amd64["thox-factory-reset.service"])
    for line in ("DefaultDependencies=no", "ConditionPathExists=/boot/efi/thox/factory-reset",
                 "RequiresMountsFor=/boot/efi/thox",
                 r"Before=var-lib-thox\x2ddata.mount var-lib-thox.mount "
                 r"systemd-fsck@dev-disk-by\x2dpartlabel-thox\x2ddata.service local-fs.target",
                 "ExecStart=/usr/local/lib/thox/thox-factory-reset /dev/disk/by-partlabel/thox-data "
                 "/usr/lib/thox/factory-data /boot/efi/thox/factory-reset thox:thox thox", "WantedBy=local-fs.target"):
        assert line in f, line
    # the unit names systemd derives from the paths are the ones systemd-escape gives
    if shutil.which("systemd-escape"):
        for path, suffix in (("/var/lib/thox", "mount"), ("/var/lib/thox-data", "mount"),
                             ("/dev/disk/by-partlabel/thox-data", "device")):
            name = run(["systemd-escape", "--path", f"--suffix={suffix}", path]).stdout.strip()
            assert name in amd64["thox-factory-reset.service"], name


def _conf(text: str) -> configparser.ConfigParser:
    c = configparser.ConfigParser(interpolation=None)
    c.read_string(text)
    return c


def test_system_conf_amd64(amd64):
    c = _conf(amd64["system.conf"])
    assert dict(c["system"]) == {"compatible": "thox-amd64", "bootloader": "grub",
                                 "grubenv": "/boot/efi/EFI/thox/grubenv",
                                 "statusfile": "/var/lib/thox-data/system/rauc.status", "bundle-formats": "-plain",
                                 "max-bundle-download-size": "4294967296"}
    assert dict(c["keyring"]) == {"path": "/etc/rauc/keyring.pem"}
    assert dict(c["handlers"]) == {"pre-install": "/usr/local/lib/thox/rauc-pre-install",
                                   "post-install": "/usr/local/lib/thox/rauc-post-install"}
    assert dict(c["slot.rootfs.0"]) == {"device": "/dev/disk/by-partlabel/thox-a", "type": "ext4", "bootname": "A"}
    assert dict(c["slot.rootfs.1"]) == {"device": "/dev/disk/by-partlabel/thox-b", "type": "ext4", "bootname": "B"}


def test_system_conf_jetson(jetson):
    c = _conf(jetson["system.conf"])
    assert c["system"]["compatible"] == "thox-jetson-orin" and c["system"]["bootloader"] == "custom"
    assert "grubenv" not in c["system"]
    assert c["handlers"]["bootloader-custom-backend"] == "/usr/local/sbin/thox-rauc-nvbootctrl"
    assert (ANSIBLE_DIR / "roles/jetson/files/thox-rauc-nvbootctrl").is_file()
    assert c["slot.rootfs.0"]["device"] == "/dev/disk/by-partlabel/APP" and c["slot.rootfs.0"]["bootname"] == "A"
    assert c["slot.rootfs.1"]["device"] == "/dev/disk/by-partlabel/APP_b" and c["slot.rootfs.1"]["bootname"] == "B"
    assert c["system"]["statusfile"] == "/var/lib/thox-data/system/rauc.status"


def _rauc_loads(tmp: Path, text: str) -> subprocess.CompletedProcess:
    """RAUC 1.8 reads the system config before it looks at the bundle: a good config gets
    as far as 'No such file' for a missing bundle, a bad one fails on the config."""
    conf = tmp / "system.conf"
    conf.write_text(text)
    return run(["rauc", f"--conf={conf}", "info", str(tmp / "missing.raucb")], check=False)


@pytest.mark.parametrize("target", ["amd64", "jetson"])
def test_rauc_loads_the_system_conf(tmp_path, request, target):
    need_tools("rauc")
    text = request.getfixturevalue(target)["system.conf"]
    p = _rauc_loads(tmp_path, text)
    assert "Failed to load system config" not in p.stderr and "No such file" in p.stdout + p.stderr, p.stderr
    # control: RAUC rejects a config it does not understand
    p = _rauc_loads(tmp_path, text.replace("bootloader=", "bootloader=no-such-"))
    assert "Failed to load system config" in p.stderr, p.stderr


def test_watchdog_and_tmpfiles(amd64):
    assert _conf(amd64["watchdog.conf"])["Manager"]["RuntimeWatchdogSec"] == "60"
    assert dict(_conf(amd64["boot-deadline.conf"])["Unit"]) == {"jobtimeoutsec": "900",
                                                                "jobtimeoutaction": "reboot-force"}
    assert "exec sleep 120'" in amd64["thox-boot-failed.service"]
    assert _lines(amd64["tmpfiles.conf"]) == {"d /var/lib/thox-data/system 0755 root root -",
                                              "d /var/lib/thox/requests 0750 thox thox -"}


def test_sshd_host_keys_on_the_data_partition(tmp_path, amd64):
    keys = [ln for ln in amd64["sshd.conf"].splitlines() if ln.startswith("HostKey ")]
    assert keys == [f"HostKey /var/lib/thox-data/system/ssh/ssh_host_{t}_key" for t in ("ed25519", "rsa", "ecdsa")]
    live = _render(tmp_path / "live", {"thox_image_build": False})["sshd.conf"]
    assert [ln for ln in live.splitlines() if ln.startswith("HostKey ")] == \
        [f"HostKey /etc/ssh/ssh_host_{t}_key" for t in ("ed25519", "rsa", "ecdsa")]


# ---------------------------------------------------------------------- D-Bus policy

DBUS_DEFAULT_POLICY = re.compile(r'  <policy context="default">.*?</policy>', re.S)


def _dbus_call(sock: Path, user: str, method: str = "de.pengutronix.rauc.Installer.GetSlotStatus", *args: str) -> str:
    p = subprocess.run(["runuser", "-u", user, "--", "dbus-send", "--system", "--print-reply", "--reply-timeout=5000",
                        "--dest=de.pengutronix.rauc", "/", method, *args],
                       capture_output=True, text=True, timeout=30, env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=f"unix:path={sock}"))
    return p.stdout + p.stderr


def _bus(tmp: Path, policies: list[Path]) -> tuple[subprocess.Popen, Path]:
    """A private dbus-daemon with the system bus's default policy, RAUC's package policy,
    ``policies``, and an activatable de.pengutronix.rauc that exits at once."""
    sock, svc = tmp / "bus.sock", tmp / "services"
    svc.mkdir()
    (svc / "de.pengutronix.rauc.service").write_text("[D-BUS Service]\nName=de.pengutronix.rauc\nExec=/bin/false\n"
                                                    "User=root\n")
    default = DBUS_DEFAULT_POLICY.search(Path("/usr/share/dbus-1/system.conf").read_text()).group(0)
    rauc_pkg = (tmp / "de.pengutronix.rauc.conf")
    rauc_pkg.write_text('<busconfig><policy context="default"><allow send_destination="de.pengutronix.rauc"/>'
                        '</policy><policy user="root"><allow own="de.pengutronix.rauc"/></policy></busconfig>\n')
    includes = "".join(f"  <include>{p}</include>\n" for p in [rauc_pkg, *policies])
    conf = tmp / "bus.conf"
    conf.write_text(f"<busconfig>\n  <type>system</type>\n  <listen>unix:path={sock}</listen>\n  <auth>EXTERNAL</auth>\n"
                    f"  <servicedir>{svc}</servicedir>\n{default}\n{includes}</busconfig>\n")
    proc = subprocess.Popen(["dbus-daemon", f"--config-file={conf}", "--nofork", "--nopidfile"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(100):
        if sock.exists():
            break
        time.sleep(0.05)
    assert sock.exists(), proc.stderr.read() if proc.poll() is not None else "no bus socket"
    return proc, sock


def test_dbus_policy_lets_root_and_the_service_user_call_rauc(tmp_path):
    """Rendered for service user `daemon` (an account this host has): root and daemon get
    through to RAUC's (here failing) activation, nobody is refused by the policy. Without
    the policy, the package's own one lets nobody through too (the control)."""
    need_root()
    need_tools("dbus-daemon", "dbus-send", "runuser")
    policy = _render(tmp_path / "r", {"thox_user": "daemon"})["thox-rauc.conf"]
    pol = tmp_path / "thox-rauc.conf"
    pol.write_text(policy)
    for policies, refused in (([pol], {"nobody"}), ([], set())):
        # other users must reach the socket: a folder outside pytest's private tmp_path
        d = Path(tempfile.mkdtemp(prefix="thox-bus-"))
        d.chmod(0o755)
        proc, sock = _bus(d, policies)
        try:
            for user in ("root", "daemon", "nobody"):
                out = _dbus_call(sock, user)
                if user in refused:
                    assert "AccessDenied" in out, (user, out)
                else:
                    assert "AccessDenied" not in out and "de.pengutronix.rauc" in out, (user, out)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            shutil.rmtree(d, ignore_errors=True)


# what `rauc status` and `rauc install` (RAUC 1.8) send over D-Bus, and what only root may
RAUC_CLIENT_CALLS = [("de.pengutronix.rauc.Installer.GetSlotStatus",),
                     ("de.pengutronix.rauc.Installer.GetPrimary",),
                     ("de.pengutronix.rauc.Installer.InstallBundle", "string:/x.raucb", "dict:string:string:"),
                     ("de.pengutronix.rauc.Installer.Install", "string:/x.raucb"),
                     ("org.freedesktop.DBus.Properties.GetAll", "string:de.pengutronix.rauc.Installer"),
                     ("org.freedesktop.DBus.Properties.Get", "string:de.pengutronix.rauc.Installer", "string:Operation"),
                     ("org.freedesktop.DBus.Introspectable.Introspect",)]
ROOT_ONLY_CALLS = [("de.pengutronix.rauc.Installer.Mark", "string:good", "string:booted"),
                   ("de.pengutronix.rauc.Installer.Mark", "string:active", "string:other"),
                   ("org.freedesktop.DBus.Properties.Set", "string:de.pengutronix.rauc.Installer", "string:Operation",
                    "variant:string:idle")]


def test_dbus_policy_lets_the_service_user_install_and_read_but_not_mark(tmp_path):
    """The service user (rendered for `daemon`) gets through with each call the rauc client makes
    for status and install; Mark (good, bad, active) and setting a property are refused to it and
    not to root."""
    need_root()
    need_tools("dbus-daemon", "dbus-send", "runuser")
    pol = tmp_path / "thox-rauc.conf"
    pol.write_text(_render(tmp_path / "r", {"thox_user": "daemon"})["thox-rauc.conf"])
    d = Path(tempfile.mkdtemp(prefix="thox-bus-"))
    d.chmod(0o755)
    proc, sock = _bus(d, [pol])
    try:
        for call in RAUC_CLIENT_CALLS:
            out = _dbus_call(sock, "daemon", *call)
            assert "AccessDenied" not in out and "de.pengutronix.rauc" in out, (call, out)
        for call in ROOT_ONLY_CALLS:
            assert "AccessDenied" in _dbus_call(sock, "daemon", *call), call
            out = _dbus_call(sock, "root", *call)
            assert "AccessDenied" not in out and "de.pengutronix.rauc" in out, (call, out)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------- the role's own checks

def _play(tmp: Path, extra: dict) -> subprocess.CompletedProcess:
    import json
    need_ansible()
    play = tmp / "play.yml"
    play.write_text(yaml.safe_dump([{"hosts": "localhost", "connection": "local", "gather_facts": False,
                                     "roles": [{"role": "thox"}, {"role": "updates"}]}]))
    p = run([str(ABIN / "ansible-playbook"), "-i", "localhost,", str(play), "--check",
             "-e", json.dumps({"thox_image_build": True, **extra})], env=ansible_env(), cwd=ANSIBLE_DIR,
            check=False, timeout=300)
    # the yaml callback wraps long messages: compare with single spaces
    p.stdout = " ".join(p.stdout.split())
    return p


def test_keyring_is_required(tmp_path):
    p = _play(tmp_path, {})
    assert p.returncode != 0
    assert "updates_keyring_cert is not set" in p.stdout, p.stdout[-3000:]


def test_keyring_must_be_a_certificate_without_a_key(tmp_path):
    need_tools("openssl")
    key, cert = tmp_path / "ca.key", tmp_path / "ca.pem"
    run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-subj", "/CN=Thox TEST keyring check", "-days", "1"])
    both = tmp_path / "both.pem"
    both.write_text(cert.read_text() + key.read_text())
    p = _play(tmp_path, {"updates_keyring_cert": str(both)})
    assert p.returncode != 0 and "must hold the CA certificate (PEM) only: it has a private key" in p.stdout, \
        p.stdout[-3000:]
    p = _play(tmp_path, {"updates_keyring_cert": str(key)})
    assert p.returncode != 0 and "it has a private key" in p.stdout, p.stdout[-3000:]


# ------------------------------------------------------------------ hung and failed boots, for real
@pytest.fixture(scope="module")
def booting_tree(tmp_path_factory):
    """The provisioning test's Debian root fs (mkrootfs.sh: systemd, built once and cached),
    unpacked, with the failed-boot unit and the boot deadline as the role renders them, at
    test timings (a 2 s wait in emergency mode, a 6 s deadline)."""
    need_root()
    need_tools("systemd-nspawn", "unshare", "tar")
    tmp = tmp_path_factory.mktemp("hung-boot")
    tarball = run([str(Path(__file__).with_name("mkrootfs.sh"))], timeout=900).stdout.strip().splitlines()[-1]
    root = tmp / "root"
    root.mkdir()
    run(["tar", "-xf", tarball, "-C", str(root)], timeout=300)
    files = _render(tmp / "render", {"updates_emergency_reset_sec": 2, "updates_boot_deadline_sec": 6})
    units = root / "etc/systemd/system"
    (units / "thox-boot-failed.service").write_text(files["thox-boot-failed.service"])
    (units / "multi-user.target.d").mkdir(parents=True, exist_ok=True)
    (units / "multi-user.target.d/thox-boot-deadline.conf").write_text(files["boot-deadline.conf"])
    for target in ("emergency.target", "rescue.target"):    # what `systemctl enable` makes
        (units / f"{target}.wants").mkdir(exist_ok=True)
        (units / f"{target}.wants/thox-boot-failed.service").symlink_to("../thox-boot-failed.service")
    return root


def _boot(root: Path, *args: str, timeout: float = 120) -> tuple[int | None, str, float]:
    """Boot the tree in a container (no network, no bus); its exit status (133: the container
    asked for a reboot; None: still running after timeout, then halted), its console and the
    seconds it ran."""
    script = NSPAWN_PREP + 'exec systemd-nspawn -q -D "$0" -b --register=no --keep-unit --private-network -- "$@"'
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as out:
        p = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(root), *args],
                             stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = None
            p.terminate()                    # nspawn halts the container
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.terminate()                # a second TERM: nspawn ends it at once
                p.wait(30)
        took = time.monotonic() - t0
        out.seek(0)
        return rc, out.read(), took


def test_a_boot_in_emergency_mode_resets_the_box(booting_tree):
    """A boot that lands in emergency mode says so on the console and reboots by itself (the
    boot loader's try flag then picks the other slot)."""
    rc, console, _ = _boot(booting_tree, "systemd.unit=emergency.target")
    assert "thox-boot: emergency mode: resetting in 2 s" in console, console[-3000:]
    assert rc == 133, f"the container did not reboot ({rc}):\n{console[-3000:]}"


def test_a_boot_that_hangs_before_multi_user_is_reset_at_the_deadline(booting_tree):
    """A unit that never finishes holds multi-user.target: the boot deadline resets the box,
    not before the deadline. Control: the same boot with the deadline's drop-in moved away
    still hangs when the deadline has passed."""
    units = booting_tree / "etc/systemd/system"
    (units / "thox-test-stuck.service").write_text(
        "[Unit]\nDescription=a unit that hangs the boot\n[Service]\nType=oneshot\nExecStart=/bin/sleep infinity\n")
    (units / "multi-user.target.wants").mkdir(exist_ok=True)
    (units / "multi-user.target.wants/thox-test-stuck.service").symlink_to("../thox-test-stuck.service")
    try:
        rc, console, took = _boot(booting_tree)
        assert rc == 133, f"the hung boot was not reset ({rc}):\n{console[-3000:]}"
        assert took >= 6, f"reset after {took:.1f}s, before the 6 s deadline"
        dropin = units / "multi-user.target.d/thox-boot-deadline.conf"
        aside = booting_tree / "deadline.conf"
        dropin.rename(aside)
        try:
            rc, console, _ = _boot(booting_tree, timeout=15)
            assert rc is None, f"without the deadline the container ended by itself ({rc}):\n{console[-3000:]}"
        finally:
            aside.rename(dropin)
    finally:
        (units / "multi-user.target.wants/thox-test-stuck.service").unlink()
        (units / "thox-test-stuck.service").unlink()
