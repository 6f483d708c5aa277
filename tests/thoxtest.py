"""Helpers shared by the API, CLI, web, fuzz, load and bench tests: start a
real `thox serve` on an ephemeral loopback port, run the `thox` CLI, parse
SSE. (A module of its own: several test folders have a conftest.py, so
`from thoxtest import ...` would be ambiguous.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from tinymodel import write_tiny_gguf  # noqa: E402,F401

from image.common import terminate  # noqa: E402

THOX = str(Path(sys.executable).with_name("thox"))
# A test whose prerequisite is missing fails; it may skip only where THOX_ALLOW_SKIP=1
# is set explicitly (a developer's partial run). `.ci/run` never sets it.
ALLOW_SKIP = os.environ.get("THOX_ALLOW_SKIP") == "1"
SHARED = ROOT.parent / "shared"


def require(condition: object, why: str) -> None:
    """Fail the calling test unless `condition` holds: a missing prerequisite is a
    failure, not a skip, unless THOX_ALLOW_SKIP=1 is set."""
    if condition:
        return
    import pytest
    if ALLOW_SKIP:
        pytest.skip(why)
    pytest.fail(f"missing prerequisite: {why} (THOX_ALLOW_SKIP=1 turns this into a skip)", pytrace=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_thox(home: Path, *args: str, check: bool = True, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    e = {**os.environ, "THOX_HOME": str(home), **(env or {})}
    p = subprocess.run([THOX, *args], capture_output=True, text=True, env=e, timeout=300, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"thox {' '.join(args)} failed ({p.returncode}): {p.stderr}")
    return p


class Server:
    def __init__(self, home: Path, **config: str):
        self.home = home
        for k, v in config.items():
            run_thox(home, "config", "set", k.replace("__", "."), str(v))
        self.key = run_thox(home, "config", "get", "api.key", check=False).stdout.strip() or \
            run_thox(home, "api-key", "generate").stdout.strip()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        self.log = open(home / f"serve-{self.port}.log", "w")
        self.proc = subprocess.Popen([THOX, "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                                     env={**os.environ, "THOX_HOME": str(home)}, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"thox serve exited: {(home / f'serve-{self.port}.log').read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("thox serve did not become ready")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def post(self, path: str, body, **kw) -> httpx.Response:
        kw.setdefault("timeout", 120)
        headers = {**self.headers, **kw.pop("headers", {})}
        if isinstance(body, (dict, list)):
            return httpx.post(self.base_url + path, json=body, headers=headers, **kw)
        return httpx.post(self.base_url + path, content=body, headers=headers, **kw)

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.base_url + path, headers=self.headers, timeout=60, **kw)

    def logs(self) -> str:
        return (self.home / f"serve-{self.port}.log").read_text()

    def stop(self) -> None:
        terminate(self.proc, 10)
        self.log.close()


def make_home(tmp_path_factory, models_dir: Path, name: str, demo: bool = False) -> Path:
    home = tmp_path_factory.mktemp(name)
    run_thox(home, "models", "import", str(models_dir / "tiny.gguf"), "--id", "tiny")
    run_thox(home, "models", "import", str(models_dir / "tiny-nofim.gguf"), "--id", "tiny-nofim")
    if demo:
        run_thox(home, "models", "demo")
    run_thox(home, "config", "set", "engine.n_ctx", "1024")
    run_thox(home, "config", "set", "api.max_body_bytes", "1M")
    return home


def _nullable(node):
    """The spec marks optional-null fields OpenAPI-3.0 style (`nullable: true`);
    turn that into JSON Schema's anyOf-null so a validator understands it."""
    if isinstance(node, list):
        return [_nullable(x) for x in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable(v) for k, v in node.items()}
    if node.pop("nullable", False) is True:
        return {"anyOf": [node, {"type": "null"}]}
    return node


def sse_events(resp: httpx.Response) -> list:
    """Parse an SSE body into JSON objects (and the literal '[DONE]')."""
    out = []
    for block in resp.text.split("\n\n"):
        block = block.strip()
        if not block:
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def one_line_error(p, needle: str) -> str:
    """A CLI run that failed with one `thox: error: ...` line naming needle (no traceback)."""
    assert p.returncode != 0, p.stdout
    assert "Traceback" not in p.stderr
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("thox: error: "), p.stderr
    assert needle.lower() in p.stderr.lower(), p.stderr
    return lines[0]
