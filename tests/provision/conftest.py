"""Shared helpers for the provisioning tests (ansible, units, firewall, nspawn).

These tests need root, iproute2, nftables, systemd-container, mmdebstrap and the
ansible venv (`make provision-deps`). Where something is missing they fail
(thoxtest.require: a skip only where THOX_ALLOW_SKIP=1 is set).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from thoxtest import require  # noqa: E402,F401
ANSIBLE_DIR = REPO / "ansible"
SYSTEMD_DIR = REPO / "systemd"
AVENV = Path(os.environ.get("THOX_ANSIBLE_VENV", REPO / ".venv-ansible"))
ABIN = AVENV / "bin"
CACHE = Path(os.environ.get("THOX_CACHE", "/var/cache/thox-build"))


def need_root() -> None:
    require(os.geteuid() == 0, "needs root (network namespaces, nspawn)")


def need_tools(*tools: str) -> None:
    for t in tools:
        require(shutil.which(t) is not None, f"{t} not installed (make provision-deps)")


def need_ansible() -> None:
    require((ABIN / "ansible-playbook").exists(), f"{ABIN}/ansible-playbook missing (make provision-deps)")


def ansible_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(
        PATH=f"{ABIN}:{env.get('PATH', '')}",
        ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"),
        ANSIBLE_ROLES_PATH=str(ANSIBLE_DIR / "roles"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_LOCAL_TEMP="/tmp/thox-ansible-local",
        ANSIBLE_HOME=str(CACHE / "ansible-home"),
    )
    env.update(extra)
    return env


def run(cmd, *, check=True, timeout=120, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd!r} exited {p.returncode}\n--- stdout\n{p.stdout[-6000:]}\n--- stderr\n{p.stderr[-4000:]}")
    return p


def render(tmp: Path, templates: list[tuple[str, str]], extra_vars: dict | None = None) -> Path:
    """Render role templates with the roles' defaults (and extra vars) into tmp."""
    import json
    need_ansible()
    out = tmp / "rendered"
    out.mkdir(exist_ok=True)
    ev = {"outdir": str(out), "items": [{"src": s, "dest": d} for s, d in templates]}
    ev.update(extra_vars or {})
    run([str(ABIN / "ansible-playbook"), "-i", "localhost,", "-c", "local",
         str(Path(__file__).with_name("render.yml")), "-e", json.dumps(ev)],
        env=ansible_env(), cwd=ANSIBLE_DIR)
    return out


@pytest.fixture
def netns_factory():
    """Create network namespaces (deleted afterwards); returns a function name -> name."""
    made: list[str] = []

    def make(name: str) -> str:
        full = f"thox{os.getpid() % 10000}{name}"
        subprocess.run(["ip", "netns", "del", full], capture_output=True)
        run(["ip", "netns", "add", full])
        made.append(full)
        run(["ip", "-n", full, "link", "set", "lo", "up"])
        for k in ("net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"):
            run(["ip", "netns", "exec", full, "sysctl", "-qw", k])
        return full

    yield make
    for ns in reversed(made):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


# what the units run, as stub executables in unit_root (the ones under the prefix are added there)
UNIT_EXES = ("usr/bin/jetson_clocks", "usr/sbin/nvpmodel", "usr/local/sbin/thox-lan-sets", "usr/local/sbin/thox-growdata",
             "usr/local/sbin/thox-ssh-import", "usr/bin/ssh-keygen", "usr/local/sbin/thox-ssh-hostkeys",
             "usr/local/lib/thox/thox-health", "usr/local/lib/thox/thox-factory-reset", "usr/bin/rm", "usr/bin/systemctl",
             "bin/sh")
# systemd-nspawn on this host (no systemd running): a tmpfs for its propagation folder, in the
# private mount namespace `unshare --mount` gives the shell this prefixes
NSPAWN_PREP = "mkdir -p /run/systemd/nspawn && mount -t tmpfs tmpfs /run/systemd/nspawn && "


def unit_root(tmp: Path, units: dict[str, str], prefix: str = "/opt/thox") -> Path:
    """A scratch root for `systemd-analyze verify --root`: the distribution's units, stub
    executables for the paths our units run, and our units (name -> text)."""
    root = tmp / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    for exe in (f"{prefix.strip('/')}/venv/bin/thox", *UNIT_EXES):
        p = root / exe
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("#!/bin/sh\n")
        p.chmod(0o755)
    d = root / "etc/systemd/system"
    d.mkdir(parents=True)
    for name, text in units.items():
        (d / name).write_text(text)
    return root


def verify_units(root: Path, names: list[str]) -> subprocess.CompletedProcess:
    """`systemd-analyze verify` of units installed under root's /etc/systemd/system."""
    return run(["systemd-analyze", "verify", "--man=no", f"--root={root}", *[f"/etc/systemd/system/{u}" for u in names]],
               check=False)
