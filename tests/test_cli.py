"""The `thox` command: config, API key, models, status. Every error is one
line on stderr with a non-zero exit and no traceback."""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import site
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from thox import pins
from thoxtest import ROOT, THOX, require, run_thox

PYTHON = os.path.join(os.path.dirname(THOX), "python")


def one_line_error(p: subprocess.CompletedProcess, needle: str = "") -> str:
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 or lines[0].startswith("usage:"), p.stderr
    assert needle.lower() in p.stderr.lower(), p.stderr
    return p.stderr


def test_config_set_get_list(tmp_path):
    run_thox(tmp_path, "config", "set", "api.port", "9090")
    assert run_thox(tmp_path, "config", "get", "api.port").stdout.strip() == "9090"
    run_thox(tmp_path, "config", "set", "default_model", "thox-coder-7b")
    run_thox(tmp_path, "config", "set", "models.keep_alive", "10m")
    assert run_thox(tmp_path, "config", "get", "models.keep_alive").stdout.strip() == "600"
    listing = json.loads(run_thox(tmp_path, "config", "list", "--json").stdout)
    assert listing["api.port"] == 9090 and listing["default_model"] == "thox-coder-7b"
    assert listing["api.key"] == "(unset)"
    assert json.loads((tmp_path / "config.json").read_text())["api.port"] == 9090
    assert "api.port" in run_thox(tmp_path, "config", "list").stdout
    run_thox(tmp_path, "config", "unset", "api.port")
    assert run_thox(tmp_path, "config", "get", "api.port").stdout.strip() == "8080"


@pytest.mark.parametrize("args,needle", [
    (["config", "get", "nope.key"], "unknown config key"),
    (["config", "set", "api.port", "http"], "invalid value for api.port"),
    (["config", "set", "api.port", "70000"], "api.port"),
    (["config", "set", "api.key", "short"], "64 hex"),
    (["config", "set", "api.key", "g" * 64], "64 hex"),
    (["config", "get", "api.key"], "no API key"),
    (["models", "path", "nope"], "does not exist"),
    (["models", "import", "/nonexistent.gguf", "--id", "x"], "no such file"),
    (["models", "import", "/etc/hostname", "--id", "x"], "not a GGUF"),
    (["models", "import", "/etc/hostname", "--id", "../evil"], "invalid model id"),
    (["models", "rm", "nope"], "does not exist"),
    (["models", "pull", "nope"], "unknown model"),
])
def test_cli_errors_are_one_line(tmp_path, args, needle):
    one_line_error(run_thox(tmp_path, *args, check=False), needle)


def test_usage_errors_and_help(tmp_path):
    p = run_thox(tmp_path, "config", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    for args in (["--help"], ["config", "--help"], ["config", "set", "--help"], ["models", "--help"],
                 ["models", "pull", "--help"], ["api-key", "--help"], ["serve", "--help"], ["status", "--help"]):
        p = run_thox(tmp_path, *args)
        assert p.stdout.startswith("usage: thox")


def test_api_key_storage(tmp_path):
    key = run_thox(tmp_path, "api-key", "generate").stdout.strip()
    assert len(key) == 64 and int(key, 16) >= 0
    path = tmp_path / "api_key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert run_thox(tmp_path, "config", "get", "api.key").stdout.strip() == key
    openssl = secrets.token_hex(32).upper()  # what `openssl rand -hex 32` looks like, any case
    out = run_thox(tmp_path, "config", "set", "api.key", openssl).stdout
    assert openssl.lower() not in out.lower()
    assert run_thox(tmp_path, "config", "get", "api.key").stdout.strip() == openssl.lower()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_config_write_is_atomic(tmp_path):
    """Kill the writer between write and rename: the old file stays whole."""
    run_thox(tmp_path, "config", "set", "api.port", "1234")
    code = (
        "import os, sys\n"
        "from thox.config import Config\n"
        "real = os.replace\n"
        "def boom(a, b):\n"
        "    os.kill(os.getpid(), 9)\n"
        "os.replace = boom\n"
        "Config().set('api.port', '4321')\n")
    p = subprocess.run([os.path.join(os.path.dirname(THOX), "python"), "-c", code],
                       env={**os.environ, "THOX_HOME": str(tmp_path)})
    assert p.returncode == -9
    assert json.loads((tmp_path / "config.json").read_text())["api.port"] == 1234


def test_models_import_path_list(tmp_path, models_dir):
    out = run_thox(tmp_path, "models", "import", str(models_dir / "tiny.gguf"), "--id", "t1").stdout
    assert out.startswith("imported t1")
    path = run_thox(tmp_path, "models", "path", "t1").stdout.strip()
    assert os.path.isfile(path) and path.startswith(str(tmp_path / "models" / "t1"))
    manifest = json.loads((tmp_path / "models" / "t1" / "manifest.json").read_text())
    assert manifest["id"] == "t1" and len(manifest["sha256"]) == 64 and manifest["kind"] == "chat"
    rows = json.loads(run_thox(tmp_path, "models", "list", "--json").stdout)
    assert [r["id"] for r in rows] == ["t1"]
    assert "t1" in run_thox(tmp_path, "models", "list").stdout
    one_line_error(run_thox(tmp_path, "models", "import", str(models_dir / "tiny.gguf"), "--id", "t1",
                            check=False), "already installed")
    one_line_error(run_thox(tmp_path, "models", "import", str(models_dir / "tiny.gguf"), "--id", "t2",
                            "--sha256", "0" * 64, check=False), "sha256 mismatch")
    assert not (tmp_path / "models" / "t2").exists()
    run_thox(tmp_path, "models", "rm", "t1")
    assert "no models installed" in run_thox(tmp_path, "models", "list").stdout


def test_truncated_gguf_is_refused(tmp_path, models_dir):
    data = (models_dir / "tiny.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    one_line_error(run_thox(tmp_path, "models", "import", str(tmp_path / "cut.gguf"), "--id", "cut",
                            check=False), "truncated")


def test_demo_model(server):
    rows = json.loads(run_thox(server.home, "models", "list", "--json").stdout)
    demo = [r for r in rows if r["id"] == "thox-demo"][0]
    assert demo["sha256"] == pins.DEMO_GGUF_SHA256
    assert run_thox(server.home, "models", "demo").stdout.startswith("thox-demo installed")


def test_status_over_the_api(server):
    env_sets = [
        {"THOX_API_URL": server.base_url, "THOX_API_KEY": server.key},
        {"OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": server.key},
        {"OPENAI_API_BASE": server.base_url, "OPENAI_API_KEY": server.key},
        # THOX_* wins over OPENAI_*
        {"THOX_API_URL": server.base_url, "OPENAI_BASE_URL": "http://127.0.0.1:1/v1"},
    ]
    for env in env_sets:
        p = run_thox(server.home, "status", env=env)
        assert f"device:  {server.base_url}" in p.stdout and "status:  ok" in p.stdout
    st = json.loads(run_thox(server.home, "status", "--json", env=env_sets[0]).stdout)
    assert st["status"] == "ok" and any(m["id"] == "tiny" for m in st["models"])
    one_line_error(run_thox(server.home, "status", env={"THOX_API_URL": "http://127.0.0.1:1/v1"}, check=False),
                   "cannot reach")
    rows = json.loads(run_thox(server.home, "models", "status", "--json",
                               env={"THOX_API_URL": server.base_url}).stdout)
    assert {r["id"] for r in rows} >= {"tiny", "thox-demo"}


# --------------------------------------------------------------------------- first boot in pieces

FIRSTBOOT_KILLED_BEFORE_PASSWORD = r"""
import os, sys
import thox.web.admin as admin
def power_cut(*a, **kw):
    os.kill(os.getpid(), 9)
admin.ensure_admin_password = power_cut
from thox.cli import main
sys.exit(main(["firstboot"]))
"""

ROLES = ROOT / "ansible" / "roles"


def firstboot_unit(home: Path | str = "/var/lib/thox") -> str:
    """thox-firstboot.service as the thox_api role renders it from systemd/
    (Jinja, the roles' defaults), with THOX_HOME (``thox_home``) set to ``home``."""
    import jinja2
    import yaml
    variables: dict = {"ansible_managed": "Ansible managed", "playbook_dir": str(ROOT / "ansible")}
    for role in ("thox", "thox_api"):
        variables.update(yaml.safe_load((ROLES / role / "defaults/main.yml").read_text()))
    variables["thox_home"] = str(home)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(ROOT / "systemd"),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, keep_trailing_newline=True)

    def lookup(plugin: str, key: str, type: str = "ini", file: str = "") -> str:  # noqa: A002
        # the one lookup the roles' defaults use: a key of versions.env (a properties file)
        assert plugin == "ansible.builtin.ini" and type == "properties", (plugin, type)
        from thox.pins import read_versions
        while "{{" in file:     # "{{ playbook_dir }}/../versions.env", as Ansible resolves it
            file = env.from_string(file).render(variables)
        return read_versions(Path(file))[key]
    env.globals["lookup"] = lookup
    for _ in range(3):   # defaults that refer to other defaults ("{{ thox_prefix }}/venv")
        variables = {k: env.from_string(v).render(variables) if isinstance(v, str) else v
                     for k, v in variables.items()}
    return env.get_template("thox-firstboot.service.j2").render(variables)


def unit_would_run(home: Path) -> bool:
    """Evaluate thox-firstboot.service's conditions, rendered for THOX_HOME=``home``,
    with systemd's own evaluator."""
    conds = [ln.strip() for ln in firstboot_unit(home).splitlines() if ln.strip().startswith("Condition")]
    assert conds, "thox-firstboot.service has no condition"
    p = subprocess.run(["systemd-analyze", "condition", *conds], capture_output=True, text=True, timeout=60)
    assert p.returncode in (0, 1) and "Conditions" in p.stdout + p.stderr, p.stdout + p.stderr
    return p.returncode == 0


def test_firstboot_unit_runs_until_every_piece_exists():
    from thox.statefiles import FIRSTBOOT_FILES
    text = firstboot_unit("/srv/box-home")
    assert {f"ConditionPathExists=|!/srv/box-home/{f}" for f in FIRSTBOOT_FILES} == \
        {ln.strip() for ln in text.splitlines() if ln.startswith("Condition")}
    assert "Environment=THOX_HOME=/srv/box-home" in text and "ExecStart=/opt/thox/venv/bin/thox firstboot" in text


def test_firstboot_interrupted_after_the_key_finishes_on_the_next_boot(tmp_path):
    require(shutil.which("systemd-analyze"), "systemd-analyze (package systemd) evaluates the unit's conditions")
    home = tmp_path / "home"
    home.mkdir()
    assert unit_would_run(home)
    p = subprocess.run([PYTHON, "-c", FIRSTBOOT_KILLED_BEFORE_PASSWORD], capture_output=True, text=True,
                       env={**os.environ, "THOX_HOME": str(home)}, timeout=120)
    assert p.returncode == -9, p.stderr          # power lost between the key and the admin password
    key = (home / "api_key").read_text()
    assert not (home / "admin.json").exists()
    assert unit_would_run(home), "the next boot must run first boot again"
    out = run_thox(home, "firstboot").stdout
    assert "admin password" in out and "API key" not in out
    assert (home / "api_key").read_text() == key   # the finished piece is kept
    assert json.loads((home / "admin.json").read_text())["must_change"] is True
    assert stat.S_IMODE((home / "admin-password.txt").stat().st_mode) == 0o600
    assert not unit_would_run(home), "a finished first boot must not run again"
    assert run_thox(home, "firstboot").stdout == ""   # idempotent


# --------------------------------------------------------------------------- root against another user's THOX_HOME

def _world_can_run(path: str) -> bool:
    p = Path(os.path.realpath(path))
    return all(d.stat().st_mode & 0o001 for d in [*reversed(p.parents), p])


def cli_for_any_user() -> list[str]:
    """A command line of the CLI that still works after it became another user:
    this interpreter when anyone may run it, else the system's python of the same
    version with this venv's packages (a venv made from an interpreter under a
    private /root cannot import once it is no longer root)."""
    if _world_can_run(sys.executable):
        return [sys.executable, "-m", "thox.cli"]
    system = shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}", path="/usr/bin:/bin")
    require(system and _world_can_run(system), "a python3 that any user may run (/usr/bin/python3)")
    boot = (f"import site, sys\nfor d in {site.getsitepackages()!r}: site.addsitedir(d)\n"
            "from thox.cli import main\nsys.exit(main())\n")
    return [system, "-I", "-S", "-c", boot]   # -S: none of the system's dist-packages, only the venv's


@pytest.fixture(scope="module")
def other_user():
    """A throwaway system user and group (removed afterwards): (name, uid, gid)."""
    require(os.geteuid() == 0, "root (CI runs as root): these tests run the CLI as root")
    require(shutil.which("useradd"), "useradd (package passwd)")
    name = f"thoxt{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                    "--shell", "/usr/sbin/nologin", name], check=True, capture_output=True)
    pw = pwd.getpwnam(name)
    yield name, pw.pw_uid, pw.pw_gid
    subprocess.run(["userdel", name], capture_output=True)
    subprocess.run(["groupdel", name], capture_output=True)


@pytest.fixture
def owned_home(other_user):
    """THOX_HOME owned by the other user (0750) in a directory anyone may traverse."""
    _, uid, gid = other_user
    base = Path(tempfile.mkdtemp(prefix="thox-root-"))
    base.chmod(0o755)
    home = base / "home"
    home.mkdir(mode=0o750)
    os.chown(home, uid, gid)
    yield home
    shutil.rmtree(base, ignore_errors=True)


def as_root(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([*cli_for_any_user(), *args], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "THOX_HOME": str(home)})
    if check and p.returncode != 0:
        raise AssertionError(f"thox {' '.join(args)} (as root) failed ({p.returncode}): {p.stderr}")
    return p


def owner_and_mode(p: Path) -> tuple[int, int, int]:
    st = p.lstat()
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def test_root_writes_files_the_owner_of_thox_home_owns(owned_home, other_user):
    _, uid, gid = other_user
    home = owned_home
    key = as_root(home, "api-key", "generate").stdout.strip()
    assert owner_and_mode(home / "api_key") == (uid, gid, 0o600)
    assert as_root(home, "config", "get", "api.key").stdout.strip() == key
    as_root(home, "config", "set", "api.port", "9999")
    assert owner_and_mode(home / "config.json") == (uid, gid, 0o644)
    hexkey = secrets.token_hex(32)
    as_root(home, "config", "set", "api.key", hexkey)
    assert owner_and_mode(home / "api_key") == (uid, gid, 0o600)
    assert (home / "api_key").read_text().strip() == hexkey
    as_root(home, "firstboot")
    for name in ("admin.json", "admin-password.txt"):
        assert owner_and_mode(home / name) == (uid, gid, 0o600), name
    first = (home / "admin-password.txt").read_text().strip()
    pw = as_root(home, "admin-password", "reset").stdout.strip()
    assert pw != first and (home / "admin-password.txt").read_text().strip() == pw
    assert owner_and_mode(home / "admin-password.txt") == (uid, gid, 0o600)
    as_root(home, "models", "list")
    leftovers = [p for p in home.rglob("*") if p.lstat().st_uid != uid]
    assert leftovers == [], f"files root left behind as root: {leftovers}"


def _start_server(home: Path) -> tuple[subprocess.Popen, str]:
    import httpx
    from thoxtest import free_port
    port = free_port()
    log = open(home.parent / f"serve-{port}.log", "w")
    proc = subprocess.Popen([*cli_for_any_user(), "serve", "--host", "127.0.0.1", "--port", str(port)],
                            env={**os.environ, "THOX_HOME": str(home)}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"thox serve exited: {(home.parent / f'serve-{port}.log').read_text()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("thox serve did not become ready")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def test_rotation_by_root_takes_effect_live_and_survives_a_restart(owned_home, other_user):
    import httpx
    _, uid, _ = other_user
    home = owned_home
    old = as_root(home, "api-key", "generate").stdout.strip()
    proc, url = _start_server(home)
    try:
        assert _uid_of(proc.pid) == uid, "root's `thox serve` must run as the owner of THOX_HOME"
        auth = lambda k: {"Authorization": f"Bearer {k}"}  # noqa: E731
        assert httpx.get(url + "/v1/models", headers=auth(old), timeout=10).status_code == 200
        new = as_root(home, "api-key", "generate").stdout.strip()
        assert new != old
        assert httpx.get(url + "/v1/models", headers=auth(new), timeout=10).status_code == 200
        assert httpx.get(url + "/v1/models", headers=auth(old), timeout=10).status_code == 401
        newer = secrets.token_hex(32)
        as_root(home, "config", "set", "api.key", newer)
        assert httpx.get(url + "/v1/models", headers=auth(newer), timeout=10).status_code == 200
        assert httpx.get(url + "/v1/models", headers=auth(new), timeout=10).status_code == 401
    finally:
        _stop(proc)
    proc, url = _start_server(home)   # and the service still starts afterwards
    try:
        assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {newer}"},
                         timeout=10).status_code == 200
    finally:
        _stop(proc)


def test_symlinks_planted_by_the_owner_do_not_make_root_write(owned_home, other_user, models_dir):
    """The owner of THOX_HOME plants links at the pull lock and partial paths,
    pointing at a root-owned file; root's pulls neither follow nor truncate them."""
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
    import functools
    import hashlib
    import threading
    _, uid, gid = other_user
    home = owned_home
    victim = home.parent / "root-owned"
    victim.write_text("precious\n")
    models = home / "models"
    for d in (models, models / ".locks", models / ".partial"):
        d.mkdir()
        os.chown(d, uid, gid)
    (models / ".locks" / "x.lock").symlink_to(victim)
    os.lchown(models / ".locks" / "x.lock", uid, gid)
    serve_dir = home.parent / "www"
    serve_dir.mkdir()
    shutil.copy(models_dir / "tiny.gguf", serve_dir / "tiny.gguf")
    digest = hashlib.sha256((serve_dir / "tiny.gguf").read_bytes()).hexdigest()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0),
                                functools.partial(SimpleHTTPRequestHandler, directory=str(serve_dir)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/tiny.gguf"
    try:
        p = as_root(home, "models", "pull", "x", "--from", url, "--sha256", digest, check=False)
        one_line_error(p, "symlink")
        assert victim.read_text() == "precious\n" and owner_and_mode(victim)[0] == 0
        part = models / ".partial" / "y.gguf.part"
        part.symlink_to(victim)
        (models / ".partial" / "y.json").write_text(json.dumps({"url": url, "expected_sha256": digest}))
        as_root(home, "models", "pull", "y", "--from", url, "--sha256", digest)
        assert victim.read_text() == "precious\n" and owner_and_mode(victim)[0] == 0
        assert owner_and_mode(models / "y")[0] == uid
    finally:
        httpd.shutdown()
        httpd.server_close()
