"""Cheap checks: ansible-lint (production), --syntax-check, the systemd units
as the roles render them (systemd-analyze verify and security, the role
variables they follow), the role READMEs, and the roles' rendered files."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from .conftest import (ABIN, ANSIBLE_DIR, SYSTEMD_DIR, ansible_env, need_ansible, need_tools, render, run, unit_root,
                       verify_units)

pytestmark = pytest.mark.slow_infra
ROLES = ANSIBLE_DIR / "roles"
# every unit the roles install, and the role that installs it; each is rendered
# from systemd/<unit>.j2 with the roles' variables
UNIT_ROLES = {
    "thox-api.service": "thox_api",
    "thox-firstboot.service": "thox_api",
    "thox-jetson-clocks.service": "jetson",
    "thox-lan-sets.service": "firewall",
    "thox-growdata.service": "image",
    "thox-ssh-import.service": "image",
    "thox-ssh-hostkeys.service": "ssh",
    "thox-health.service": "updates",
    "thox-reboot.path": "updates",
    "thox-reboot.service": "updates",
    "thox-boot-failed.service": "updates",
    "thox-factory-reset.service": "updates",
}
UNITS = list(UNIT_ROLES)
# drop-ins the roles install into /etc/systemd/system (from systemd/ too): path -> role
DROPIN_ROLES = {"multi-user.target.d/thox-boot-deadline.conf": "updates"}
# non-default knobs: the units must follow them
KNOBS = {"thox_user": "svc", "thox_group": "svcgrp", "thox_home": "/srv/thox-state", "thox_prefix": "/usr/local/thox",
         "firewall_links_dir": "/run/thox-fw-links"}


def render_units(tmp: Path, extra_vars: dict | None = None) -> dict[str, str]:
    """Each unit's text as the roles install it (the roles' defaults plus ``extra_vars``)."""
    tmp.mkdir(parents=True, exist_ok=True)
    out = render(tmp, [(str(SYSTEMD_DIR / f"{name}.j2"), name) for name in UNITS], extra_vars)
    return {name: (out / name).read_text() for name in UNITS}


@pytest.fixture(scope="module")
def units(tmp_path_factory) -> dict[str, str]:
    return render_units(tmp_path_factory.mktemp("units"))


def test_ansible_lint_production():
    need_ansible()
    p = run([str(ABIN / "ansible-lint"), "--nocolor"], env=ansible_env(), cwd=ANSIBLE_DIR, check=False, timeout=300)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "Profile 'production' was required, and it passed" in p.stdout + p.stderr


def test_syntax_check():
    need_ansible()
    run([str(ABIN / "ansible-playbook"), "--syntax-check", "-i", "localhost,", "site.yml"],
        env=ansible_env(), cwd=ANSIBLE_DIR)


def test_units_verify(tmp_path, units):
    need_tools("systemd-analyze")
    assert sorted(units) == sorted(UNITS)
    p = verify_units(unit_root(tmp_path, units), UNITS)
    assert p.returncode == 0 and not p.stderr.strip(), p.stderr


def test_units_verify_catches_a_broken_unit(tmp_path, units):
    """Control: the same check fails on a unit with an unknown directive."""
    need_tools("systemd-analyze")
    bad = units["thox-api.service"].replace("[Service]", "[Service]\nExecStrat=/bin/true\n")
    p = verify_units(unit_root(tmp_path, {"thox-api.service": bad}), ["thox-api.service"])
    assert "ExecStrat" in p.stderr


def test_thox_api_security_exposure(tmp_path, units):
    need_tools("systemd-analyze")
    unit = tmp_path / "thox-api.service"
    unit.write_text(units["thox-api.service"])
    p = run(["systemd-analyze", "security", "--offline=true", "--threshold=30", str(unit)], check=False)
    m = re.search(r"Overall exposure level for thox-api.service: ([0-9.]+)", p.stdout + p.stderr)
    assert m, p.stdout + p.stderr
    print(f"thox-api.service exposure: {m.group(1)}")
    assert float(m.group(1)) <= 3.0


def test_thox_api_unit_contract(units):
    u = units["thox-api.service"]
    for line in ("User=thox", "Group=thox", "Type=notify", "Restart=on-failure", "StateDirectory=thox",
                 "ProtectSystem=strict", "NoNewPrivileges=yes", "PrivateTmp=yes", "ProtectHome=yes",
                 "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
                 "AmbientCapabilities=CAP_NET_BIND_SERVICE", "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
                 "ExecStart=/opt/thox/venv/bin/thox serve", "Environment=THOX_HOME=/var/lib/thox"):
        assert re.search(rf"^{re.escape(line)}$", u, re.M), line
    assert not re.search(r"^PrivateDevices=", u, re.M), "CUDA on Jetson needs /dev/nvhost*"
    f = units["thox-firstboot.service"]
    assert "ConditionPathExists=|!/var/lib/thox/api_key" in f and "ConditionPathExists=|!/var/lib/thox/admin.json" in f
    assert "ExecStart=/opt/thox/venv/bin/thox firstboot" in f and "User=thox" in f


def test_units_follow_the_role_variables(tmp_path):
    """thox_user, thox_group, thox_home, thox_prefix and firewall_links_dir are
    real knobs: the rendered units use them (nothing of the defaults is left)
    and still verify; a THOX_HOME outside /var/lib, or a links folder outside
    /run, is made writable with ReadWritePaths."""
    need_tools("systemd-analyze")
    units = render_units(tmp_path / "knobs", KNOBS)
    for name in ("thox-api.service", "thox-firstboot.service"):
        u = units[name]
        assert not re.search(r"/var/lib/thox\b|/opt/thox\b|=thox$", u, re.M), (name, u)
        for line in ("User=svc", "Group=svcgrp", "Environment=THOX_HOME=/srv/thox-state",
                     "ReadWritePaths=/srv/thox-state"):
            assert re.search(rf"^{re.escape(line)}$", u, re.M), (name, line)
        assert not re.search(r"^StateDirectory", u, re.M), name
        assert re.search(r"^ExecStart=/usr/local/thox/venv/bin/thox (serve|firstboot)$", u, re.M), name
    assert "ConditionPathExists=|!/srv/thox-state/api_key" in units["thox-firstboot.service"]
    root = unit_root(tmp_path, units, prefix=KNOBS["thox_prefix"])
    p = verify_units(root, UNITS)
    assert p.returncode == 0 and not p.stderr.strip(), p.stderr
    lan = units["thox-lan-sets.service"]
    assert "thox-firewall" not in lan, lan
    for line in ("ExecStart=/usr/local/sbin/thox-lan-sets --follow --dir /run/thox-fw-links",
                 "RuntimeDirectory=thox-fw-links", "RuntimeDirectoryPreserve=yes"):
        assert re.search(rf"^{re.escape(line)}$", lan, re.M), line
    other = render_units(tmp_path / "varlib", {"thox_home": "/var/lib/thox-b", "firewall_links_dir": "/var/lib/thox-links"})
    api = other["thox-api.service"]
    assert re.search(r"^StateDirectory=thox-b$", api, re.M) and "ReadWritePaths" not in api
    lan = other["thox-lan-sets.service"]
    assert re.search(r"^ReadWritePaths=/var/lib/thox-links$", lan, re.M) and "RuntimeDirectory" not in lan
    assert "--dir /var/lib/thox-links" in lan


def _role_files():
    return [p for p in ROLES.rglob("*") if p.is_file() and p.suffix in (".yml", ".j2")]


def _tasks(role: Path) -> list[dict]:
    return [t for f in sorted((role / "tasks").glob("*.yml")) for t in (yaml.safe_load(f.read_text()) or [])]


def test_roles_stay_in_their_folders():
    """No role climbs out of its folder with ../ paths; the one way out is
    thox_units_dir, defined once in the thox role's defaults."""
    definition = re.compile(r"^thox_units_dir: .*$", re.M)
    for p in _role_files():
        t = p.read_text()
        if p == ROLES / "thox/defaults/main.yml":
            assert len(definition.findall(t)) == 1, p
            t = definition.sub("", t)
        assert not re.search(r"^\s*thox_units_dir:", t, re.M), f"{p} defines thox_units_dir again"
        assert not re.search(r"role_path\s*}}\s*/\.\.|\.\./systemd", t), p


def test_units_come_from_systemd_only():
    """systemd/ holds a template for every unit the roles install, and only
    those (plus the shared state-dir include); no role keeps a unit of its own;
    each role installs its units with the template module from thox_units_dir,
    which site.yml resolves to that folder."""
    assert sorted(p.name for p in SYSTEMD_DIR.glob("*.j2") if re.search(r"\.(service|path)\.j2$", p.name)) \
        == sorted(f"{u}.j2" for u in UNITS)
    assert (SYSTEMD_DIR / "thox-state-dir.j2").is_file() and (SYSTEMD_DIR / "README.md").is_file()
    for u in UNITS:
        assert f"`{u}.j2`" in (SYSTEMD_DIR / "README.md").read_text(), u
    strays = [p for p in ROLES.rglob("*") if p.is_file() and re.search(r"\.(service|socket|timer|path)(\.j2)?$", p.name)]
    assert not strays, strays
    installed: dict[str, str] = {}
    for role in sorted(p for p in ROLES.iterdir() if p.is_dir()):
        for task in _tasks(role):
            for module in ("ansible.builtin.template", "ansible.builtin.copy", "template", "copy"):
                args = task.get(module)
                if isinstance(args, dict) and str(args.get("dest", "")).startswith("/etc/systemd/system/"):
                    assert module.endswith("template"), (role.name, task["name"])
                    src, dest = args["src"], args["dest"]
                    assert src.startswith("{{ thox_units_dir }}/"), (role.name, src)
                    rel = dest.removeprefix("/etc/systemd/system/")
                    names = [i for i in task.get("loop", [])] if "{{ item }}" in dest else [rel]
                    for n in names:
                        installed[n] = role.name
    assert installed == {**UNIT_ROLES, **DROPIN_ROLES}
    for d in DROPIN_ROLES:
        assert f"`{d.rsplit('/', 1)[1]}.j2`" in (SYSTEMD_DIR / "README.md").read_text(), d
    defaults = yaml.safe_load((ROLES / "thox/defaults/main.yml").read_text())
    where = Path(defaults["thox_units_dir"].replace("{{ playbook_dir }}", str(ANSIBLE_DIR)))
    assert (ANSIBLE_DIR / "site.yml").is_file() and where.resolve() == SYSTEMD_DIR.resolve()


def test_roles_run_the_cli_through_thox_api_cli():
    """The command line that runs the CLI as the service user is written once
    (thox_api's vars); the models role, which depends on thox_api, uses it."""
    hits = [p for p in _role_files() if "runuser" in p.read_text()]
    assert hits == [ROLES / "thox_api/vars/main.yml"], hits
    assert {"role": "thox_api"} in yaml.safe_load((ROLES / "models/meta/main.yml").read_text())["dependencies"]
    cli = [t for t in _tasks(ROLES / "models") if "ansible.builtin.command" in t]
    assert len(cli) == 4
    for t in cli:
        assert str(t["ansible.builtin.command"]["argv"]).startswith("{{ thox_api_cli + ["), t["name"]


def _defaults(role: Path) -> list[str]:
    f = role / "defaults/main.yml"
    return list(yaml.safe_load(f.read_text()) or {}) if f.exists() else []


def test_every_default_has_a_comment():
    """Each variable in defaults/main.yml sits under a comment (alone or in a group)."""
    for role in sorted(p for p in ROLES.iterdir() if p.is_dir()):
        f = role / "defaults/main.yml"
        if not f.exists():
            continue
        lines = f.read_text().splitlines()
        for name in _defaults(role):
            i = next(n for n, ln in enumerate(lines) if ln.startswith(f"{name}:"))
            j = i - 1
            while j >= 0 and lines[j].strip() and lines[j] != "---" and not lines[j].startswith("#"):
                j -= 1
            assert j >= 0 and lines[j].startswith("#"), f"{f}: {name} has no comment above it"


def test_every_role_has_a_readme_naming_its_variables():
    for role in sorted(p for p in ROLES.iterdir() if p.is_dir()):
        readme = role / "README.md"
        assert readme.is_file(), f"{role.name} has no README.md"
        text = readme.read_text()
        assert text.startswith(f"# {role.name}"), readme
        for name in _defaults(role):
            assert f"`{name}`" in text, f"{readme} does not describe {name}"


def test_no_secrets_in_repo_files():
    """No key, password or authorized key is baked into roles or units."""
    for p in ANSIBLE_DIR.rglob("*"):
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
