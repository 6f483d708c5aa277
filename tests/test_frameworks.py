"""Agent frameworks pointed at the box with only base URL, key and model set:
langchain-openai (invoke, stream with usage, bind_tools,
with_structured_output, embeddings, and its Responses mode) and litellm
(completion, stream, tools, embedding, responses)."""

from __future__ import annotations

import os
from typing import Literal

import pytest
from pydantic import BaseModel, Field

DEMO = "thox-demo"
# litellm would fetch its model price list from the internet at import
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
pytestmark = pytest.mark.timeout(300)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"]}}}


class Paint(BaseModel):
    """A paint choice."""
    color: Literal["red", "green", "blue"]
    coats: Literal[1, 2, 3]


# -- langchain-openai ------------------------------------------------------------------
@pytest.fixture(scope="module")
def lc_chat(server):
    from langchain_openai import ChatOpenAI
    return ChatOpenAI(model=DEMO, base_url=server.base_url, api_key=server.key, max_tokens=16, max_retries=0, temperature=0,
                      timeout=120)


def test_langchain_invoke_and_stream(lc_chat):
    msg = lc_chat.invoke("Say hello.")
    assert isinstance(msg.content, str) and msg.content
    assert msg.usage_metadata["output_tokens"] > 0 and msg.response_metadata["finish_reason"] in ("stop", "length")
    from langchain_openai import ChatOpenAI
    streaming = ChatOpenAI(model=DEMO, base_url=lc_chat.openai_api_base, api_key=lc_chat.openai_api_key,
                           max_tokens=16, stream_usage=True, max_retries=0)
    total = None
    for chunk in streaming.stream("Count to three."):
        total = chunk if total is None else total + chunk
    assert total.content and total.usage_metadata["output_tokens"] > 0 and total.usage_metadata["input_tokens"] > 0


def test_langchain_tools_and_structured_output(lc_chat):
    from langchain_core.tools import tool

    class WeatherArgs(BaseModel):
        city: str = Field(max_length=20)

    @tool(args_schema=WeatherArgs)
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return f"sunny in {city}"

    from langchain_openai import ChatOpenAI
    llm = ChatOpenAI(model=DEMO, base_url=lc_chat.openai_api_base, api_key=lc_chat.openai_api_key,
                     max_tokens=160, max_retries=0, timeout=120)
    msg = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Paris?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather" and "city" in msg.tool_calls[0]["args"]
    paint = llm.with_structured_output(Paint).invoke("Pick a paint color and a number of coats.")
    assert isinstance(paint, Paint)


def test_langchain_responses_mode(server):
    from langchain_openai import ChatOpenAI
    llm = ChatOpenAI(model=DEMO, base_url=server.base_url, api_key=server.key, max_tokens=16, max_retries=0,
                     use_responses_api=True)
    msg = llm.invoke("Say hello.")
    assert msg.text and msg.usage_metadata["output_tokens"] > 0


def test_langchain_embeddings(server):
    from langchain_openai import OpenAIEmbeddings
    # check_embedding_ctx_length=False: the documented setting for OpenAI-compatible
    # servers (otherwise texts are sent as OpenAI tiktoken ids)
    emb = OpenAIEmbeddings(model="tiny", base_url=server.base_url, api_key=server.key,
                           check_embedding_ctx_length=False, max_retries=0)
    docs = emb.embed_documents(["hello", "world"])
    assert len(docs) == 2 and len(docs[0]) == 64
    assert len(emb.embed_query("hello")) == 64


# -- litellm ---------------------------------------------------------------------------------
def _ll(server) -> dict:
    return {"api_base": server.base_url, "api_key": server.key}


def test_litellm_completion_stream_tools(server):
    import litellm
    r = litellm.completion(model=f"openai/{DEMO}", messages=[{"role": "user", "content": "Say hello."}],
                           max_tokens=8, **_ll(server))
    assert r.choices[0].message.content and r.usage.completion_tokens > 0
    chunks = list(litellm.completion(model=f"openai/{DEMO}", messages=[{"role": "user", "content": "Count."}],
                                     max_tokens=8, stream=True, stream_options={"include_usage": True},
                                     **_ll(server)))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    r = litellm.completion(model=f"openai/{DEMO}", messages=[{"role": "user", "content": "Weather in Paris?"}],
                           tools=[WEATHER], tool_choice="required", max_tokens=160, **_ll(server))
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and r.choices[0].finish_reason == "tool_calls"


def test_litellm_embedding_and_responses(server):
    import litellm
    e = litellm.embedding(model="openai/tiny", input=["hello", "world"], **_ll(server))
    assert len(e.data) == 2 and len(e.data[0]["embedding"]) == 64
    r = litellm.responses(model=f"openai/{DEMO}", input="Say hello.", max_output_tokens=8, **_ll(server))
    assert r.output and r.usage.output_tokens > 0
    text = "".join(p.text for o in r.output if o.type == "message" for p in o.content)
    assert text
