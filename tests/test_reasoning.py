"""Reasoning models: text in <think>…</think> goes to reasoning_content in
chat (and its stream deltas), to a reasoning item in Responses, to a thinking
block in Messages and to `thinking` in Ollama, never into the content. Driven
with a tiny model that always answers <think>hm</think>OK (thinkmodel.py),
and one whose template opens <think> in the prompt (it answers hm</think>OK)."""

from __future__ import annotations

import json

import httpx
import pytest

from thinkmodel import ANSWER, REASONING, write_think_gguf
from thoxtest import Server, run_thox, sse_events

MODELS = ["think", "think-open"]
MSGS = [{"role": "user", "content": "hi"}]
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    d = tmp_path_factory.mktemp("think-models")
    home = tmp_path_factory.mktemp("think-home")
    write_think_gguf(d / "think.gguf")
    write_think_gguf(d / "think-open.gguf", forced_open=True)
    run_thox(home, "models", "import", str(d / "think.gguf"), "--id", "think")
    run_thox(home, "models", "import", str(d / "think-open.gguf"), "--id", "think-open")
    run_thox(home, "config", "set", "engine.n_ctx", "512")
    s = Server(home)
    yield s
    s.stop()


@pytest.mark.parametrize("model", MODELS)
def test_chat(thinker, openapi, model):
    from openai import OpenAI
    c = OpenAI(base_url=thinker.base_url, api_key=thinker.key, max_retries=0)
    r = c.chat.completions.create(model=model, messages=MSGS, temperature=0)
    msg = r.choices[0].message
    assert msg.content == ANSWER and msg.model_extra["reasoning_content"] == REASONING
    body = thinker.post("/chat/completions", {"model": model, "messages": MSGS, "temperature": 0}).json()
    openapi(body, "CreateChatCompletionResponse")
    # streamed: reasoning deltas first, then content; no tag anywhere
    r = thinker.post("/chat/completions", {"model": model, "messages": MSGS, "temperature": 0, "stream": True})
    chunks = [e for e in sse_events(r) if e != "[DONE]"]
    for ch in chunks:
        openapi(ch, "CreateChatCompletionStreamResponse")
    deltas = [ch["choices"][0]["delta"] for ch in chunks if ch["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == REASONING
    assert "".join(d.get("content") or "" for d in deltas) == ANSWER
    assert not any("think>" in json.dumps(d) for d in deltas)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_responses_reasoning_item(thinker, openapi):
    from openai import OpenAI
    c = OpenAI(base_url=thinker.base_url, api_key=thinker.key, max_retries=0)
    r = c.responses.create(model="think", input="hi", temperature=0)
    assert [o.type for o in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == REASONING and r.output_text == ANSWER
    raw = thinker.post("/responses", {"model": "think-open", "input": "hi", "temperature": 0, "stream": True})
    from test_responses import check_events, sse_named_events
    events = sse_named_events(raw.text)
    check_events(openapi, events)
    names = [n for n, _ in events]
    assert names.index("response.reasoning_text.delta") < names.index("response.output_text.delta")
    final = events[-1][1]["response"]
    assert [o["type"] for o in final["output"]] == ["reasoning", "message"]
    assert final["output"][0]["content"][0]["text"] == REASONING
    assert final["output"][1]["content"][0]["text"] == ANSWER
    with c.responses.stream(model="think", input="hi", temperature=0) as s:
        for _ in s:
            pass
        assert s.get_final_response().output_text == ANSWER


def test_messages_thinking_block(thinker):
    from anthropic import Anthropic
    c = Anthropic(base_url=thinker.url, api_key=thinker.key, max_retries=0)
    m = c.messages.create(model="think", max_tokens=32, messages=MSGS)
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in m.content] == \
        [("thinking", REASONING), ("text", ANSWER)]
    with c.messages.stream(model="think-open", max_tokens=32, messages=MSGS) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == ANSWER and final.content[0].type == "thinking" and final.content[0].thinking == REASONING


def test_ollama_thinking(thinker):
    from ollama import Client
    c = Client(host=thinker.url, headers={"Authorization": f"Bearer {thinker.key}"})
    r = c.chat(model="think", messages=MSGS, options={"temperature": 0}, stream=False)
    assert r.message.content == ANSWER and r.message.thinking == REASONING
    parts = list(c.chat(model="think-open", messages=MSGS, options={"temperature": 0}, stream=True))
    assert "".join(p.message.thinking or "" for p in parts) == REASONING
    assert "".join(p.message.content or "" for p in parts) == ANSWER


def test_plain_models_unchanged(server):
    """A model that does not think: no reasoning_content, content as generated."""
    r = httpx.post(server.base_url + "/chat/completions", headers=server.headers, timeout=60,
                   json={"model": "tiny", "messages": MSGS, "max_tokens": 5, "seed": 1})
    assert "reasoning_content" not in r.json()["choices"][0]["message"]


def test_splitter_holds_back_split_tags():
    from thox.api.chatbridge import ThinkSplitter
    sp = ThinkSplitter()
    out = []
    for piece in ["  <thi", "nk>ab", "c</th", "ink>", "\n\n", "Hel", "lo </think"]:
        out += sp.feed(piece)
    out += sp.flush()
    assert "".join(t for k, t in out if k == "reasoning") == "abc"
    assert "".join(t for k, t in out if k == "text") == "Hello </think"
    sp = ThinkSplitter()
    assert sp.feed("<") == [] and sp.feed("b>") == [("text", "<b>")] and sp.passthrough
