"""thox.config: value parsing, defaults, unknown keys, the API key file and
atomic writes, on a THOX_HOME in a temporary directory."""

from __future__ import annotations

import json
import os
import stat

import pytest

from thox.config import DEFAULT_MIRROR, KEYS, Config, atomic_write, thox_home
from thox.errors import ConfigError


@pytest.fixture
def cfg(tmp_path) -> Config:
    return Config(tmp_path / "home")


@pytest.mark.parametrize("key, raw, value", [
    ("api.max_body_bytes", "2MiB", 2 << 20),
    ("api.max_body_bytes", "1.5k", 1536),
    ("api.max_body_bytes", "3 GB", 3 << 30),
    ("api.max_body_bytes", "100", 100),
    ("models.keep_alive", "2m", 120),
    ("models.keep_alive", "1h", 3600),
    ("models.keep_alive", "45", 45),
    ("api.port", " 8081 ", 8081),
    ("engine.n_gpu_layers", "-1", -1),
    ("api.rate_limit_loopback", "yes", True),
    ("api.rate_limit_loopback", "Off", False),
    ("api.web_hosts", "Thox.Local., box  other-name", "thox.local,box,other-name"),
    ("api.web_hosts", "", ""),
    ("default_model", "my-model", "my-model"),
])
def test_set_parses_and_stores(cfg, key, raw, value):
    assert cfg.set(key, raw) == value
    assert cfg.get(key) == value
    assert Config(cfg.home).get(key) == value            # written to config.json
    assert json.loads(cfg.path.read_text())[key] == value


@pytest.mark.parametrize("key, raw, why", [
    ("api.port", "0", ">= 1"),
    ("api.port", "65536", "<= 65535"),
    ("api.port", "eighty", "invalid value"),
    ("api.port", True, "expected an integer"),
    ("api.max_body_bytes", "-1", ">= 0"),
    ("api.max_body_bytes", "lots", "invalid value"),
    ("api.rate_limit_loopback", "maybe", "expected true or false"),
    ("api.web_hosts", "bad_host!", "not a host name"),
    ("engine.n_gpu_layers", "-2", ">= -1"),
])
def test_set_refuses_bad_values_and_keeps_the_file(cfg, key, raw, why):
    cfg.set("api.port", 9000)
    before = cfg.path.read_bytes()
    with pytest.raises(ConfigError, match=why) as ei:
        cfg.set(key, raw)
    assert ei.value.param == key
    assert cfg.path.read_bytes() == before


def test_defaults_and_unset(cfg):
    assert not cfg.path.exists()
    assert cfg.get("api.port") == KEYS["api.port"].default == 8080
    assert cfg.get("models.mirror") == DEFAULT_MIRROR
    assert isinstance(cfg.get("models.memory_budget"), int) and cfg.get("models.memory_budget") > 0
    cfg.set("api.port", 9000)
    cfg.unset("api.port")
    assert cfg.get("api.port") == 8080 and "api.port" not in json.loads(cfg.path.read_text())


@pytest.mark.parametrize("op", ["get", "set", "unset"])
def test_unknown_keys_name_the_known_ones(cfg, op):
    with pytest.raises(ConfigError) as ei:
        getattr(cfg, op)("api.nope", *(["1"] if op == "set" else []))
    assert "unknown config key 'api.nope'" in ei.value.message and "api.port" in ei.value.message


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_a_broken_config_file_is_a_config_error(cfg, text):
    cfg.home.mkdir()
    cfg.path.write_text(text)
    with pytest.raises(ConfigError, match=str(cfg.path)):
        cfg.get("api.port")


def test_api_key(cfg):
    assert cfg.api_key() is None and cfg.items()["api.key"] == "(unset)"
    with pytest.raises(ConfigError, match="64 hex"):
        cfg.set_api_key("abc")
    cfg.set("api.key", "AB" * 32)
    assert cfg.api_key() == "ab" * 32 and cfg.get("api.key") == "ab" * 32
    assert cfg.key_path.read_text() == "ab" * 32 + "\n"
    assert stat.S_IMODE(cfg.key_path.stat().st_mode) == 0o600
    assert cfg.items()["api.key"] == "(set)" and cfg.items(show_secrets=True)["api.key"] == "ab" * 32
    new = cfg.generate_api_key()
    assert new != "ab" * 32 and len(new) == 64 and cfg.ensure_api_key() == new
    assert "api.key" not in (json.loads(cfg.path.read_text()) if cfg.path.exists() else {})


def test_atomic_write_replaces_whole_files_with_the_mode(tmp_path):
    p = tmp_path / "d" / "f.json"
    atomic_write(p, b"one", 0o600)
    assert p.read_bytes() == b"one" and stat.S_IMODE(p.stat().st_mode) == 0o600
    with pytest.raises(TypeError):
        atomic_write(p, "not bytes")            # fails half way: the old file stays, no temp file is left
    assert p.read_bytes() == b"one" and os.listdir(p.parent) == ["f.json"]
    atomic_write(p, b"two")
    assert p.read_bytes() == b"two" and stat.S_IMODE(p.stat().st_mode) == 0o644


def test_thox_home_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("THOX_HOME", str(tmp_path))
    assert thox_home() == tmp_path and Config().home == tmp_path
    monkeypatch.setenv("THOX_HOME", "")
    assert str(thox_home()) == "/var/lib/thox"
