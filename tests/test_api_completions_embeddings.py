"""Legacy completions (incl. fill-in-the-middle) and embeddings."""

from __future__ import annotations

import base64
import math

import numpy as np
import pytest

from thoxtest import sse_events
from test_api_basics import assert_error


def test_completion_prompt_forms(client, server, openapi):
    r = client.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=5)
    assert r.object == "text_completion" and len(r.choices) == 1 and r.usage.completion_tokens <= 5
    openapi(server.post("/completions", {"model": "tiny", "prompt": "x", "max_tokens": 3}).json(),
            "CreateCompletionResponse")
    r = client.completions.create(model="tiny", prompt=["one", "two", "three"], max_tokens=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    r = client.completions.create(model="tiny", prompt=[104, 105], max_tokens=3)
    assert r.usage.prompt_tokens == 2
    r = client.completions.create(model="tiny", prompt=[[104, 105], [106, 107, 108]], max_tokens=3)
    assert len(r.choices) == 2 and r.usage.prompt_tokens == 5
    r = client.completions.create(model="tiny", prompt="x", max_tokens=3, n=2)
    assert len(r.choices) == 2


def test_completion_default_max_tokens_is_16(client):
    """Without max_tokens a completion stops at 16 tokens (finish_reason "length"), or earlier
    where the model ends it ("stop"); the tiny model's random text reaches 16 for most seeds."""
    counts = []
    for seed in range(3, 7):
        r = client.completions.create(model="tiny", prompt="hello", temperature=1.0, seed=seed)
        n = r.usage.completion_tokens
        assert n <= 16 and r.choices[0].finish_reason == ("length" if n == 16 else "stop"), (seed, n, r.choices[0])
        counts.append(n)
    assert 16 in counts, counts


def test_completion_echo_and_logprobs(client):
    r = client.completions.create(model="tiny", prompt="Hello there", max_tokens=4, echo=True, logprobs=2)
    c = r.choices[0]
    assert c.text.startswith("Hello there")
    assert len(c.logprobs.tokens) == r.usage.completion_tokens
    assert all(len(t) <= 2 for t in c.logprobs.top_logprobs)
    assert c.logprobs.text_offset[0] == len("Hello there")


def test_fill_in_the_middle(client, server):
    prefix, suffix = "def f(x):\n    return ", "\n\nprint(f(2))"
    r = client.completions.create(model="tiny", prompt=prefix, suffix=suffix, max_tokens=6, temperature=0)
    plain = client.completions.create(model="tiny", prompt=prefix, max_tokens=1)
    # the FIM prompt is the prefix's tokens, the suffix's 12 (the tiny vocabulary is bytes plus
    # a few merges: "in" is one) and the three FIM tokens
    assert r.usage.prompt_tokens == plain.usage.prompt_tokens + 12 + 3, (r.usage, plain.usage)
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == 6 else "stop")
    assert_error(server.post("/completions", {"model": "tiny-nofim", "prompt": "a", "suffix": "b"}), 400,
                 param="suffix")


def test_completion_stream(server, client):
    r = server.post("/completions", {"model": "tiny", "prompt": "abc", "max_tokens": 5, "stream": True,
                                     "stream_options": {"include_usage": True}})
    ev = sse_events(r)
    assert ev[-1] == "[DONE]"
    assert ev[-2]["choices"] == [] and ev[-2]["usage"]["completion_tokens"] <= 5
    assert ev[-3]["choices"][0]["finish_reason"] in ("stop", "length")
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="abc", max_tokens=5, stream=True, seed=9, temperature=0.5) if c.choices)
    full = client.completions.create(model="tiny", prompt="abc", max_tokens=5, seed=9, temperature=0.5)
    assert text == full.choices[0].text


@pytest.mark.parametrize("body,param", [
    ({"model": "tiny"}, "prompt"),
    ({"model": "tiny", "prompt": []}, "prompt"),
    ({"model": "tiny", "prompt": [[]]}, "prompt"),
    ({"model": "tiny", "prompt": [1, "a"]}, "prompt"),
    ({"model": "tiny", "prompt": [999999]}, "prompt"),
    ({"model": "tiny", "prompt": [-1]}, "prompt"),
    ({"model": "tiny", "prompt": "x", "logprobs": 9}, "logprobs"),
    ({"model": "tiny", "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "echo": "yes"}, "echo"),
    ({"model": "tiny", "prompt": [1, 2], "suffix": "x"}, "suffix"),
    ({"model": "tiny", "prompt": "hello " * 2000}, "prompt"),
])
def test_completion_bad_input(server, body, param):
    r = server.post("/completions", body)
    assert r.status_code == 400, r.text
    err = assert_error(r, 400)
    assert err["param"] is not None and err["param"].startswith(param), err


def test_embeddings_forms_and_formats(client, server, openapi):
    r = client.embeddings.create(model="tiny", input="hello world")   # SDK asks for base64
    v = np.array(r.data[0].embedding)
    assert v.shape == (64,) and math.isclose(float(np.linalg.norm(v)), 1.0, rel_tol=1e-4)
    raw = server.post("/embeddings", {"model": "tiny", "input": "hello world", "encoding_format": "base64"}).json()
    vb = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    rf = server.post("/embeddings", {"model": "tiny", "input": "hello world", "encoding_format": "float"}).json()
    openapi(rf, "CreateEmbeddingResponse")
    assert np.allclose(vb, rf["data"][0]["embedding"], atol=1e-6)
    assert rf["usage"]["prompt_tokens"] == 10  # 11 bytes, one merge ("he")
    r = client.embeddings.create(model="tiny", input=["a", "bb", "ccc"])
    assert [d.index for d in r.data] == [0, 1, 2]
    r = client.embeddings.create(model="tiny", input=[104, 105])
    assert r.usage.prompt_tokens == 2
    r = client.embeddings.create(model="tiny", input=[[104, 105], [106]])
    assert len(r.data) == 2 and r.usage.prompt_tokens == 3
    r = client.embeddings.create(model="tiny", input="hello", dimensions=16)
    assert len(r.data[0].embedding) == 16


def test_embeddings_are_mean_pooled(client, server):
    """Compare with per-token vectors from llama.cpp, averaged and normalised here."""
    import llama_cpp

    from thoxtest import run_thox
    path = run_thox(server.home, "models", "path", "tiny").stdout.strip()
    llm = llama_cpp.Llama(path, embedding=True, n_ctx=256, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE,
                          verbose=False)
    toks = llm.tokenize(b"hello world", add_bos=False)
    per_token = np.array(llm.embed("hello world", normalize=False))
    assert per_token.shape[0] == len(toks)
    mean = per_token.mean(axis=0)
    mean /= np.linalg.norm(mean)
    got = np.array(client.embeddings.create(model="tiny", input=toks, encoding_format="float").data[0].embedding)
    assert np.allclose(got, mean, atol=1e-4)


@pytest.mark.parametrize("body,param", [
    ({"model": "tiny"}, "input"),
    ({"model": "tiny", "input": ""}, "input"),
    ({"model": "tiny", "input": []}, "input"),
    ({"model": "tiny", "input": [""]}, "input"),
    ({"model": "tiny", "input": 5}, "input"),
    ({"model": "tiny", "input": "x", "encoding_format": "hex"}, "encoding_format"),
    ({"model": "tiny", "input": "x", "dimensions": 0}, "dimensions"),
    ({"model": "tiny", "input": "x", "dimensions": 100000}, "dimensions"),
    ({"model": "tiny", "input": [10**9]}, "input"),
    ({"model": "tiny", "input": "word " * 3000}, "input"),
])
def test_embeddings_bad_input(server, body, param):
    err = assert_error(server.post("/embeddings", body), 400)
    assert err["param"] is not None and err["param"].startswith(param), err
