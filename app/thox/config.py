"""Device state and configuration under THOX_HOME.

Layout of ``$THOX_HOME`` (default ``/var/lib/thox``)::

    config.json     non-secret settings (dotted keys, see KEYS)
    api_key         the API key, 64 hex characters, mode 0600
    models/         the model store (thox.store)

Every write is atomic (temp file in the same directory, fsync, rename), so a
crash leaves the old or the new file, never a torn one.

Reading ignores what this version does not know: keys it has no ``Key``
for, and stored values its parser refuses (the default applies), so a slot
rolled back to an older version still starts with config written by a newer
one. Writing keeps them: ``set`` and ``unset`` change one key of the file
and leave every other entry as it was.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError
from .statefiles import API_KEY_FILE, DEFAULT_HOME

API_KEY_RE = re.compile(r"^[0-9a-fA-F]{64}$")
# where catalog models are downloaded from unless models.mirror names another host
DEFAULT_MIRROR = "https://huggingface.co"


def thox_home() -> Path:
    return Path(os.environ.get("THOX_HOME") or DEFAULT_HOME)


def atomic_write(path: Path, data: bytes, mode: int | None = 0o644) -> None:
    """Write ``data`` to ``path`` atomically with the given permission bits (None: the file
    system's own, as on vfat, where chmod fails)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _parse_bool(v: str) -> bool:
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _parse_int(lo: int | None = None, hi: int | None = None) -> Callable[[Any], int]:
    def parse(v: Any) -> int:
        if isinstance(v, bool):
            raise ValueError("expected an integer")
        n = int(str(v).strip())
        if lo is not None and n < lo:
            raise ValueError(f"must be >= {lo}")
        if hi is not None and n > hi:
            raise ValueError(f"must be <= {hi}")
        return n
    return parse


def _parse_str(v: Any) -> str:
    return str(v)


def _parse_scaled(units: dict[str, int], strip: str = "") -> Callable[[Any], int]:
    """A non-negative number with an optional unit suffix (case-insensitive)."""
    def parse(v: Any) -> int:
        s = str(v).strip().lower()
        for junk in strip:
            s = s.removesuffix(junk)
        mult = 1
        for suffix, m in units.items():
            if s.endswith(suffix):
                s, mult = s[: -len(suffix)], m
                break
        n = int(float(s) * mult)
        if n < 0:
            raise ValueError("must be >= 0")
        return n
    return parse


# bytes with K/M/G/T (powers of 1024; "KiB", "MB" and the like accepted); seconds with s/m/h
_parse_size = _parse_scaled({"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}, strip="bi")
_parse_duration = _parse_scaled({"h": 3600, "m": 60, "s": 1})


def _parse_hosts(v: Any) -> str:
    """Host names separated by commas or spaces; stored lowercase, comma-separated."""
    items = [h.strip().lower().rstrip(".") for h in re.split(r"[,\s]+", str(v)) if h.strip()]
    for h in items:
        if not re.fullmatch(r"[a-z0-9](?:[a-z0-9-]{0,62})(?:\.[a-z0-9-]{1,63})*", h):
            raise ValueError(f"{h!r} is not a host name")
    return ",".join(items)


MAX_PARALLEL = 64


def _parse_parallel(v: Any) -> int | str:
    """A slot count (1..MAX_PARALLEL) or ``auto``."""
    if str(v).strip().lower() == "auto":
        return "auto"
    return _parse_int(1, MAX_PARALLEL)(v)


def parse_origins(value: Any) -> list[str]:
    """``*``, or web origins (``scheme://host[:port]``) separated by commas or
    spaces; empty means none."""
    items = [s.strip().rstrip("/") for s in re.split(r"[,\s]+", str(value)) if s.strip()]
    for s in items:
        if s != "*" and not re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/\s?#]+", s, re.I):
            raise ValueError(f"{s!r} is not an origin like http://host:port (or *)")
    return items


def _parse_origins(v: Any) -> str:
    return ",".join(parse_origins(v))


@dataclass(frozen=True)
class Key:
    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    secret: bool = False


def _default_memory_budget() -> int:
    """Three quarters of physical RAM: what models may occupy by default."""
    try:
        pages = os.sysconf("SC_PHYS_PAGES")
        size = os.sysconf("SC_PAGE_SIZE")
        return int(pages * size * 3 // 4)
    except (ValueError, OSError):
        return 4 << 30


KEYS: dict[str, Key] = {k.name: k for k in [
    Key("api.key", _parse_str, None, "API key (64 hex chars); stored in $THOX_HOME/api_key, 0600", secret=True),
    Key("api.host", _parse_str, "::", "address the API listens on (:: = every address, IPv4 and IPv6)"),
    Key("api.port", _parse_int(1, 65535), 8080, "TCP port of the API and web page"),
    Key("api.web_port", _parse_int(0, 65535), 0, "extra port for the web page (80 on the device; 0 = off)"),
    Key("api.max_body_bytes", _parse_size, 8 << 20, "largest request body accepted (413 above)"),
    Key("api.queue_size", _parse_int(0, 10000), 8, "requests that may wait per model before 429"),
    Key("api.rate_limit", _parse_int(0, 1000000), 100, "requests per minute per client (0 = off)"),
    Key("api.rate_limit_loopback", _parse_bool, False, "also rate-limit clients on the box itself"),
    Key("api.cors_origins", _parse_origins, "*", "web origins whose pages may call the API with the key "
        "(comma-separated, * = any, empty = none)"),
    Key("api.ollama_keyless", _parse_bool, False, "let Ollama-API clients (/api/...) in without the API key"),
    Key("api.max_connections_per_client", _parse_int(0, 100000), 64,
        "open connections one client address may hold (0 = no limit)"),
    Key("api.web_hosts", _parse_hosts, "", "more names the web page answers to (comma-separated), besides the "
        "host name, <host name>.local, localhost and IP addresses"),
    Key("default_model", _parse_str, "thox-demo", "model used by `thox` commands when none is named"),
    Key("models.mirror", _parse_str, DEFAULT_MIRROR, "base URL that catalog downloads are fetched from"),
    Key("models.memory_budget", _parse_size, None, "bytes loaded models may use (default: 3/4 of RAM)"),
    Key("models.keep_alive", _parse_duration, 300, "seconds an idle model stays loaded"),
    Key("engine.n_ctx", _parse_int(0, 1 << 20), 0, "context window of every model (0 = per model: the "
        "catalog's, else the trained one up to 32768; halved until it fits models.memory_budget)"),
    Key("engine.n_threads", _parse_int(0, 1024), 0, "CPU threads for inference (0 = all cores)"),
    Key("engine.parallel", _parse_parallel, 4, "slots per model: requests generated at once, each with a KV "
        "cache of engine.n_ctx tokens (auto = as many as fit half of models.memory_budget, up to 8)"),
    Key("engine.n_gpu_layers", _parse_int(-1, 100000), -1, "layers offloaded to the GPU (-1 = all)"),
    Key("updates.max_upload_bytes", _parse_size, 4 << 30, "largest update bundle the web page accepts (413 above)"),
]}


def _unknown(key: str) -> ConfigError:
    return ConfigError(f"unknown config key '{key}' (known: {', '.join(sorted(KEYS))})", param=key)


class Config:
    """Typed access to config.json and the API key file under one THOX_HOME."""

    def __init__(self, home: Path | str | None = None):
        self.home = Path(home) if home else thox_home()

    @property
    def path(self) -> Path:
        return self.home / "config.json"

    @property
    def key_path(self) -> Path:
        return self.home / API_KEY_FILE

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    # -- raw file --------------------------------------------------------
    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read {self.path}: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{self.path} is not a JSON object")
        return data

    def _save(self, data: dict[str, Any]) -> None:
        atomic_write(self.path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), 0o644)

    # -- typed access ----------------------------------------------------
    def get(self, key: str) -> Any:
        if key not in KEYS:
            raise _unknown(key)
        if key == "api.key":
            return self.api_key()
        data = self._load()
        if key in data:
            try:
                return KEYS[key].parse(data[key])
            except (ValueError, TypeError):
                pass     # a value this version cannot read (written by a newer one): the default
        if key == "models.memory_budget":
            return _default_memory_budget()
        return KEYS[key].default

    def set(self, key: str, value: Any) -> Any:
        if key not in KEYS:
            raise _unknown(key)
        if key == "api.key":
            self.set_api_key(str(value))
            return "(hidden)"
        try:
            parsed = KEYS[key].parse(value)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"invalid value for {key}: {value!r} ({e})", param=key) from None
        data = self._load()
        data[key] = parsed
        self._save(data)
        return parsed

    def unset(self, key: str) -> None:
        if key not in KEYS:
            raise _unknown(key)
        data = self._load()
        data.pop(key, None)
        self._save(data)

    def items(self, show_secrets: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, key in KEYS.items():
            if key.secret:
                present = self.key_path.exists()
                out[name] = (self.api_key() if show_secrets and present else
                             ("(set)" if present else "(unset)"))
            else:
                out[name] = self.get(name)
        return out

    # -- the API key -----------------------------------------------------
    def api_key(self) -> str | None:
        try:
            return self.key_path.read_text().strip() or None
        except FileNotFoundError:
            return None
        except PermissionError:
            raise ConfigError(f"permission denied reading {self.key_path} (run as root or the thox user)") from None

    def set_api_key(self, key: str) -> None:
        key = key.strip()
        if not API_KEY_RE.match(key):
            raise ConfigError("invalid API key: expected 64 hex characters (e.g. `openssl rand -hex 32`)",
                              param="api.key")
        atomic_write(self.key_path, (key.lower() + "\n").encode(), 0o600)

    def generate_api_key(self) -> str:
        key = secrets.token_hex(32)
        self.set_api_key(key)
        return key

    def ensure_api_key(self) -> str:
        return self.api_key() or self.generate_api_key()
