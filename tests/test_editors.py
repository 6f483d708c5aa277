"""Requests shaped the way editor extensions send them: Continue's
autocomplete (its own FIM prompt with special tokens written as text, and
about a dozen stop words) on /v1/completions, and long stop lists on chat."""

from __future__ import annotations

import pytest

# Continue's Qwen-style FIM template and its stop words for that model family
CONTINUE_STOPS = ["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                  "<|repo_name|>", "<|file_sep|>", "<|im_start|>", "<|im_end|>", "\n\n", "\r\n\r\n", "/src/",
                  "#- coding: utf-8", "```"]
PREFIX, SUFFIX = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"


def test_continue_fim_prompt_parses_special_tokens(server):
    """The special tokens in the text become the model's FIM tokens (as with
    llama-server): the prompt has exactly as many tokens as the same request
    made with `suffix`, far fewer than its characters."""
    raw = server.post("/completions", {"model": "tiny", "max_tokens": 8, "temperature": 0.01,
                                       "stop": CONTINUE_STOPS, "stream": False,
                                       "prompt": f"<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>"})
    assert raw.status_code == 200, raw.text
    via_suffix = server.post("/completions", {"model": "tiny", "max_tokens": 1, "prompt": PREFIX,
                                              "suffix": SUFFIX})
    assert via_suffix.status_code == 200, via_suffix.text
    n = raw.json()["usage"]["prompt_tokens"]
    assert n == via_suffix.json()["usage"]["prompt_tokens"]
    literal = len("<|fim_prefix|><|fim_suffix|><|fim_middle|>")
    assert n < len(PREFIX + SUFFIX) + 3 < literal + len(PREFIX + SUFFIX)


def test_continue_fim_streamed(server):
    """Continue streams its completions."""
    from thoxtest import sse_events
    r = server.post("/completions", {"model": "tiny", "max_tokens": 8, "stream": True, "stop": CONTINUE_STOPS,
                                     "prompt": f"<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>"})
    assert r.status_code == 200
    events = sse_events(r)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("path,body", [
    ("/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2}),
    ("/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}),
])
def test_stop_lists_up_to_32(server, openapi, path, body):
    stops = [f"STOP{i}" for i in range(32)]
    assert server.post(path, {**body, "stop": stops}).status_code == 200
    r = server.post(path, {**body, "stop": stops + ["one too many"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    openapi(r.json(), "ErrorResponse")


def test_openai_sdk_completion_with_many_stops(client):
    r = client.completions.create(model="tiny", prompt=f"<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>",
                                  max_tokens=8, stop=CONTINUE_STOPS)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens > 0
