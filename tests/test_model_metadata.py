"""What agents read from /v1/models (context_length, max_model_len,
capabilities), and the context each model is loaded with: engine.n_ctx when
set, else the catalog's (32k for the code models) or the trained context up
to 32k, halved until the model's memory plan fits models.memory_budget."""

from __future__ import annotations

import pytest

from thoxtest import Server, run_thox, write_tiny_gguf

pytestmark = pytest.mark.timeout(300)


def test_models_list_metadata(server, openapi):
    body = server.get("/models").json()
    openapi(body, "ListModelsResponse")
    by_id = {m["id"]: m for m in body["data"]}
    for m in by_id.values():
        assert m["context_length"] == m["max_model_len"] == 1024   # engine.n_ctx of the test server
        assert set(m["capabilities"]) >= {"fim", "tools", "embeddings", "vision"}
    assert by_id["tiny"]["capabilities"]["fim"] is True and by_id["tiny-nofim"]["capabilities"]["fim"] is False
    assert by_id["thox-demo"]["capabilities"] == {"chat": True, "completion": True, "fim": False, "tools": True,
                                                  "embeddings": False, "vision": False}
    one = server.get("/models/tiny").json()
    openapi(one, "Model")
    assert one == by_id["tiny"]


def test_openai_sdk_sees_the_fields(client):
    m = client.models.retrieve("thox-demo")
    assert m.context_length == 1024 and m.capabilities["tools"] is True


@pytest.fixture(scope="module")
def auto_ctx(tmp_path_factory):
    """A server with engine.n_ctx unset: a catalog code model (trained for
    32k), an uncatalogued model trained for 128k and one trained for 2k."""
    d = tmp_path_factory.mktemp("ctx-models")
    home = tmp_path_factory.mktemp("ctx-home")
    for name, n_ctx in (("thox-coder-7b", 32768), ("long", 131072), ("short", 2048)):
        write_tiny_gguf(d / f"{name}.gguf", n_ctx=n_ctx)
        run_thox(home, "models", "import", str(d / f"{name}.gguf"), "--id", name)
    s = Server(home)
    yield s
    s.stop()


def test_context_per_model(auto_ctx):
    ctx = {m["id"]: m["context_length"] for m in auto_ctx.get("/models").json()["data"]}
    assert ctx == {"thox-coder-7b": 32768, "long": 32768, "short": 2048}
    # the loaded model has what was announced: a 3,000-token prompt fits the code model, not the short one
    prompt = [65] * 3000
    r = auto_ctx.post("/completions", {"model": "thox-coder-7b", "prompt": prompt, "max_tokens": 1})
    assert r.status_code == 200, r.text
    r = auto_ctx.post("/completions", {"model": "short", "prompt": prompt, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "2048" in r.json()["error"]["message"]
    loaded = {m["id"]: m["context_length"] for m in auto_ctx.get("/models").json()["data"]}
    assert loaded == ctx


def test_context_halved_to_fit_memory(tmp_path_factory):
    from thox.engine.manager import estimate_memory
    from thox.engine.model import Shape
    from thox.store import ModelStore
    from thox.store.gguf_meta import read_metadata

    d = tmp_path_factory.mktemp("ctx-mem")
    home = tmp_path_factory.mktemp("ctx-mem-home")
    write_tiny_gguf(d / "coder.gguf", n_ctx=32768)
    run_thox(home, "models", "import", str(d / "coder.gguf"), "--id", "thox-coder-14b")
    run_thox(home, "config", "set", "engine.parallel", "2")
    store = ModelStore(home / "models")
    m = store.get("thox-coder-14b")
    shape = Shape.from_gguf(read_metadata(store.path(m.id)))
    budget = (estimate_memory(m, 8192, 2, shape) + estimate_memory(m, 16384, 2, shape)) // 2
    s = Server(home, models__memory_budget=str(budget))
    try:
        [model] = s.get("/models").json()["data"]
        assert model["context_length"] == 8192
        assert s.post("/completions", {"model": m.id, "prompt": "x", "max_tokens": 1}).status_code == 200
    finally:
        s.stop()


def test_choose_n_ctx_rules():
    from thox.engine.context import CEILING, FLOOR, choose_n_ctx
    fits = lambda n: 0   # noqa: E731 - memory is never the limit
    assert choose_n_ctx("anything", 131072, 0, 1, fits) == CEILING
    assert choose_n_ctx("anything", 2048, 0, 1, fits) == 2048
    assert choose_n_ctx("anything", None, 0, 1, fits) == 4096
    assert choose_n_ctx("thox-demo", 131072, 0, 1, fits) == 8192           # the catalog's figure
    assert choose_n_ctx("anything", 131072, 1024, 1, fits) == 1024          # engine.n_ctx wins ...
    assert choose_n_ctx("anything", 512, 1024, 1, fits) == 512              # ... up to the trained context
    assert choose_n_ctx("anything", 131072, 0, 100, lambda n: n) == FLOOR   # never below the floor
    assert choose_n_ctx("anything", 32768, 0, 5000, lambda n: n) == 4096

