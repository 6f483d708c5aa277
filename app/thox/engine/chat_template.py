"""Render chat messages to a prompt with the model's own Jinja chat template
(from the GGUF metadata), the way Hugging Face tokenizers do. Models without a
template get ChatML."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import InvalidRequest

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TOOL_SYSTEM = (
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}}\n</tool_call>"
)


def _raise(msg: str) -> None:
    raise TemplateError(msg)


@lru_cache(maxsize=16)
def _compile(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda v, indent=None, ensure_ascii=False, **_: json.dumps(
        v, indent=indent, ensure_ascii=ensure_ascii)
    return env.from_string(source)


def render(template: str | None, messages: list[dict[str, Any]], *, tools: list[dict] | None,
           bos_token: str, eos_token: str) -> str:
    """Prompt text for ``messages``. ``tools`` are OpenAI tool dicts; a
    template that does not know about tools gets them as a system message."""
    source = template or CHATML
    msgs = [dict(m) for m in messages]
    template_knows_tools = "tools" in source
    if tools and not template_knows_tools:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        block = TOOL_SYSTEM.format(tools=listing)
        if msgs and msgs[0]["role"] == "system":
            msgs[0]["content"] = msgs[0]["content"] + "\n\n" + block
        else:
            msgs.insert(0, {"role": "system", "content": block})
    if not template_knows_tools:
        msgs = [_plain(m) for m in msgs]
    try:
        return _compile(source).render(messages=msgs, tools=tools or None, add_generation_prompt=True,
                                       bos_token=bos_token, eos_token=eos_token)
    except TemplateError as e:
        raise InvalidRequest(f"the model's chat template rejected these messages: {e}",
                             param="messages") from None


def _plain(m: dict[str, Any]) -> dict[str, Any]:
    """Tool traffic as plain text, for templates without tool support."""
    if m.get("tool_calls"):
        calls = "\n".join("<tool_call>\n" + json.dumps({"name": c["function"]["name"],
                                                          "arguments": c["function"]["arguments"]},
                                                         ensure_ascii=False) + "\n</tool_call>"
                          for c in m["tool_calls"])
        return {"role": "assistant", "content": ((m.get("content") or "") + "\n" + calls).strip()}
    if m["role"] == "tool":
        return {"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
    return {"role": m["role"], "content": m.get("content") or ""}
