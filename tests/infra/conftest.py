"""The testinfra suite for a provisioned Thox box.

    make verify HOST=thox.local [USER=root]
    .venv-ansible/bin/python -m pytest tests/infra --hosts=ssh://root@thox.local

It runs only when hosts are given (and pytest-testinfra is installed): a plain
`pytest tests` skips this folder.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# units site.yml installs on every box (thox_api and firewall roles), rendered
# from their templates in systemd/
UNITS = ["thox-api.service", "thox-firstboot.service", "thox-lan-sets.service"]


def _enabled(config) -> bool:
    if importlib.util.find_spec("testinfra") is None:
        return False
    try:
        return bool(config.getoption("hosts"))
    except ValueError:
        return False


def pytest_ignore_collect(collection_path, config):
    if collection_path.name.startswith("test_") and not _enabled(config):
        return True
    return None


@pytest.fixture(scope="session")
def rendered_units(tmp_path_factory) -> dict[str, str]:
    """The units as the roles render them from systemd/ with the roles' defaults
    (what `site.yml` installs when no variable is overridden), rendered by
    this venv's ansible-playbook with tests/provision/render.yml."""
    out = tmp_path_factory.mktemp("units")
    playbook = Path(sys.executable).with_name("ansible-playbook")
    assert playbook.exists(), f"{playbook} missing: run the suite with the ansible venv (make provision-deps)"
    extra = {"outdir": str(out), "items": [{"src": str(REPO / "systemd" / f"{name}.j2"), "dest": name} for name in UNITS]}
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible/ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_LOCAL_TEMP": str(out / ".ansible-tmp"), "ANSIBLE_HOME": str(out / ".ansible-home")}
    p = subprocess.run([str(playbook), "-i", "localhost,", "-c", "local", str(REPO / "tests/provision/render.yml"),
                        "-e", json.dumps(extra)], capture_output=True, text=True, env=env, cwd=REPO / "ansible",
                       timeout=300)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    return {name: (out / name).read_text() for name in UNITS}
