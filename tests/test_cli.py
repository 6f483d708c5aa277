"""The `thox` command: config, API key, models, status. Every error is one
line on stderr with a non-zero exit and no traceback."""

from __future__ import annotations

import json
import os
import secrets
import stat
import subprocess

import pytest

from thoxtest import THOX, run_thox


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
    assert demo["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
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
