"""Shared fixtures: a THOX_HOME with generated tiny models (and the demo
model), and real `thox serve` processes on ephemeral loopback ports."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from thoxtest import SHARED, Server, _nullable, make_home, write_tiny_gguf  # noqa: E402



@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("gguf")
    write_tiny_gguf(d / "tiny.gguf")
    write_tiny_gguf(d / "tiny-nofim.gguf", fim=False, seed=1)
    return d


@pytest.fixture(scope="session")
def server(tmp_path_factory, models_dir):
    """The main test server: tiny models, the demo model, a 1 MiB body limit."""
    s = Server(make_home(tmp_path_factory, models_dir, "home", demo=True))
    yield s
    s.stop()


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI
    return OpenAI(base_url=server.base_url, api_key=server.key, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def openapi():
    """Validators for response bodies against the official OpenAI spec."""
    spec = SHARED / "reference" / "openai-openapi" / "openapi.yaml"
    if not spec.exists():
        pytest.skip("../shared/reference/openai-openapi is not present")
    import yaml
    from jsonschema import Draft202012Validator
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    doc = yaml.load(spec.read_text(), Loader=loader)
    components = _nullable(doc["components"])

    def validate(body, schema_name: str) -> None:
        schema = {"$ref": f"#/components/schemas/{schema_name}", "components": components}
        errors = sorted(Draft202012Validator(schema).iter_errors(body), key=lambda e: e.path)
        assert not errors, f"{schema_name}: " + "; ".join(
            f"{list(e.path)}: {e.message[:200]}" for e in errors[:5])
    return validate


