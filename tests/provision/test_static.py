"""Cheap checks: ansible-lint (production), --syntax-check, the systemd units
(systemd-analyze verify and security), and the roles' rendered files."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from .conftest import ABIN, ANSIBLE_DIR, SYSTEMD_DIR, ansible_env, need_ansible, need_tools, render, run

pytestmark = pytest.mark.slow_infra
UNITS = ["thox-api.service", "thox-firstboot.service", "thox-jetson-clocks.service", "thox-lan-sets.service"]


def test_ansible_lint_production():
    need_ansible()
    p = run([str(ABIN / "ansible-lint"), "--nocolor"], env=ansible_env(), cwd=ANSIBLE_DIR, check=False, timeout=300)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "Profile 'production' was required, and it passed" in p.stdout + p.stderr


def test_syntax_check():
    need_ansible()
    run([str(ABIN / "ansible-playbook"), "--syntax-check", "-i", "localhost,", "site.yml"],
        env=ansible_env(), cwd=ANSIBLE_DIR)


def _verify_root(tmp_path: Path, units: dict[str, str]) -> Path:
    """A scratch root for `systemd-analyze verify --root`: the distribution's
    units, stub executables for the paths our units run, and our units."""
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    for exe in ("opt/thox/venv/bin/thox", "usr/bin/jetson_clocks", "usr/sbin/nvpmodel", "usr/local/sbin/thox-lan-sets"):
        p = root / exe
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("#!/bin/sh\n")
        p.chmod(0o755)
    d = root / "etc/systemd/system"
    d.mkdir(parents=True)
    for name, text in units.items():
        (d / name).write_text(text)
    return root


def test_units_verify(tmp_path):
    need_tools("systemd-analyze")
    root = _verify_root(tmp_path, {u: (SYSTEMD_DIR / u).read_text() for u in UNITS})
    p = run(["systemd-analyze", "verify", "--man=no", f"--root={root}", *[f"/etc/systemd/system/{u}" for u in UNITS]],
            check=False)
    assert p.returncode == 0 and not p.stderr.strip(), p.stderr


def test_units_verify_catches_a_broken_unit(tmp_path):
    """Control: the same check fails on a unit with an unknown directive."""
    need_tools("systemd-analyze")
    bad = (SYSTEMD_DIR / "thox-api.service").read_text().replace("[Service]", "[Service]\nExecStrat=/bin/true\n")
    root = _verify_root(tmp_path, {"thox-api.service": bad})
    p = run(["systemd-analyze", "verify", "--man=no", f"--root={root}", "/etc/systemd/system/thox-api.service"],
            check=False)
    assert "ExecStrat" in p.stderr


def test_thox_api_security_exposure():
    need_tools("systemd-analyze")
    p = run(["systemd-analyze", "security", "--offline=true", "--threshold=30", str(SYSTEMD_DIR / "thox-api.service")],
            check=False)
    m = re.search(r"Overall exposure level for thox-api.service: ([0-9.]+)", p.stdout + p.stderr)
    assert m, p.stdout + p.stderr
    print(f"thox-api.service exposure: {m.group(1)}")
    assert float(m.group(1)) <= 3.0


def test_thox_api_unit_contract():
    u = (SYSTEMD_DIR / "thox-api.service").read_text()
    for line in ("User=thox", "Type=notify", "Restart=on-failure", "StateDirectory=thox", "ProtectSystem=strict",
                 "NoNewPrivileges=yes", "PrivateTmp=yes", "ProtectHome=yes",
                 "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
                 "AmbientCapabilities=CAP_NET_BIND_SERVICE", "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
                 "ExecStart=/opt/thox/venv/bin/thox serve", "Environment=THOX_HOME=/var/lib/thox"):
        assert re.search(rf"^{re.escape(line)}$", u, re.M), line
    assert not re.search(r"^PrivateDevices=", u, re.M), "CUDA on Jetson needs /dev/nvhost*"
    f = (SYSTEMD_DIR / "thox-firstboot.service").read_text()
    assert "ConditionPathExists=|!/var/lib/thox/api_key" in f and "ConditionPathExists=|!/var/lib/thox/admin.json" in f
    assert "ExecStart=/opt/thox/venv/bin/thox firstboot" in f and "User=thox" in f


def test_no_secrets_in_repo_files():
    """No key, password or authorized key is baked into roles or units."""
    for p in list(ANSIBLE_DIR.rglob("*")) + list(SYSTEMD_DIR.glob("*")):
        if p.is_file() and p.suffix in (".yml", ".j2", ".service", ".cfg", ""):
            t = p.read_text(errors="replace")
            assert not re.search(r"ssh-(ed25519|rsa) AAAA[0-9A-Za-z+/]{20,}", t), p
            assert not re.search(r"\b[0-9a-f]{64}\b", t), p


def test_rendered_mdns_ssh_and_jetson_files(tmp_path):
    out = render(tmp_path, [
        ("mdns/templates/thox.service.xml.j2", "thox.service"),
        ("mdns/templates/ssh.service.xml.j2", "ssh.service"),
        ("ssh/templates/sshd_thox.conf.j2", "sshd.conf"),
        ("jetson/templates/nvidia-l4t-apt-source.sources.j2", "l4t.sources"),
        ("jetson/templates/thox-jetson.env.j2", "thox-jetson"),
    ], {"jetson_apt_key_fingerprint": "0123456789ABCDEF0123456789ABCDEF01234567", "jetson_nvpmodel_mode": 2})
    http = (out / "thox.service").read_text()
    assert "<type>_http._tcp</type>" in http and "<port>8080</port>" in http and "path=/v1" in http
    assert "<type>_ssh._tcp</type>" in (out / "ssh.service").read_text()
    sshd = (out / "sshd.conf").read_text()
    assert "PasswordAuthentication no" in sshd and "PermitRootLogin prohibit-password" in sshd
    src = (out / "l4t.sources").read_text()
    assert "URIs: https://repo.download.nvidia.com/jetson/common" in src
    assert "URIs: https://repo.download.nvidia.com/jetson/t234" in src
    assert src.count("Suites: r36.4") == 2 and src.count("Signed-By: /usr/share/keyrings/nvidia-jetson.asc") == 2
    assert "THOX_NVPMODEL_MODE=2" in (out / "thox-jetson").read_text()
    if shutil.which("sshd"):
        k = tmp_path / "hostkey"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(k)])
        run(["sshd", "-t", "-f", str(out / "sshd.conf"), "-h", str(k)])
    if shutil.which("xmllint"):
        run(["xmllint", "--noout", str(out / "thox.service")])
