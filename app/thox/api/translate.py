"""OpenAI requests → engine jobs, and engine output → the OpenAI response
models of ``response_models.py``."""

from __future__ import annotations

import base64
import json
import re
import secrets
import time
from typing import Any

import numpy as np

from .. import __version__
from ..engine import chat_template
from ..engine.model import LoadedModel
from ..engine.types import Finished, GenerationJob, SamplingParams, TokenLogprob
from ..errors import InvalidRequest
from . import grammar
from .response_models import (ChatChunkChoice, ChatCompletionChunk, ChatLogprobs, ChatTokenLogprob, CompletionChoice,
                              CompletionChunk, CompletionLogprobs, CompletionUsage, Embedding, EmbeddingList,
                              EmbeddingUsage, FinishReason, FunctionCallOut, ToolCallOut, TopLogprob)
from .schemas import ChatCompletionRequest, CompletionRequest, NamedToolChoice

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
FINGERPRINT = f"thox-{__version__}"


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def context_error(n_prompt: int, n_ctx: int, requested: int | None, param: str) -> InvalidRequest:
    if requested is None:
        msg = (f"This model's maximum context length is {n_ctx} tokens. However, your messages resulted "
               f"in {n_prompt} tokens. Please reduce the length of the messages.")
    else:
        msg = (f"This model's maximum context length is {n_ctx} tokens. However, you requested "
               f"{n_prompt + requested} tokens ({n_prompt} in the messages, {requested} in the completion). "
               f"Please reduce the length of the messages or completion.")
    return InvalidRequest(msg, param=param, code="context_length_exceeded")


def check_context(model: LoadedModel, n_prompt: int, requested: int | None, param: str) -> None:
    if n_prompt >= model.n_ctx or (requested is not None and n_prompt + requested > model.n_ctx):
        raise context_error(n_prompt, model.n_ctx, requested, param)


# No tokenizer has tokens longer than this many bytes, so a text of more than
# n * MAX_TOKEN_BYTES characters is more than n tokens: it is refused without
# tokenizing it.
MAX_TOKEN_BYTES = 256


def text_too_long(n_chars: int, n_tokens: int, param: str, what: str = "your messages") -> InvalidRequest:
    return InvalidRequest(f"This model's maximum context length is {n_tokens} tokens. However, {what} "
                          f"({n_chars} characters) resulted in more than {n_tokens} tokens. Please reduce "
                          f"the length of the messages.", param=param, code="context_length_exceeded")


def check_text_length(text: str, n_tokens: int, param: str, what: str) -> None:
    if len(text) > n_tokens * MAX_TOKEN_BYTES:
        raise text_too_long(len(text), n_tokens, param, what)


# -- chat ---------------------------------------------------------------------------
def _template_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    out = []
    for m in req.messages:
        role = "system" if m.role == "developer" else ("tool" if m.role == "function" else m.role)
        d: dict[str, Any] = {"role": role, "content": m.content if m.content is not None else ""}
        if m.name:
            d["name"] = m.name
        if m.tool_calls:
            calls = []
            for c in m.tool_calls:
                try:
                    args = json.loads(c.function.arguments or "{}")
                except ValueError:
                    args = c.function.arguments
                calls.append({"id": c.id, "type": "function",
                              "function": {"name": c.function.name, "arguments": args}})
            d["tool_calls"] = calls
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def sampling(req: ChatCompletionRequest | CompletionRequest, limit: int | None) -> SamplingParams:
    return SamplingParams(
        max_tokens=limit,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        **({"top_k": req.top_k} if req.top_k is not None else {}),
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        seed=req.seed,
        stop=req.stops(),
    )


def chat_job(req: ChatCompletionRequest, model: LoadedModel) -> GenerationJob:
    """The generation job for ``req``: renders the chat template, tokenizes,
    builds the grammar. CPU work for a preparation thread (``Service.prepare``),
    not the event loop."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
    use_tools = tools if choice != "none" else []
    grammar_text, grammar_param = None, None
    if isinstance(choice, NamedToolChoice):
        grammar_text = grammar.tool_call_grammar([(i, t) for i, t in enumerate(tools)
                                                  if t["function"]["name"] == choice.function.name])
        grammar_param = "tools"
    elif choice == "required":
        grammar_text, grammar_param = grammar.tool_call_grammar(list(enumerate(tools))), "tools"
    elif req.response_format is not None and req.response_format.type == "json_object":
        grammar_text = grammar.json_object_grammar()
    elif req.response_format is not None and req.response_format.type == "json_schema":
        grammar_param = "response_format.json_schema.schema"
        grammar_text = grammar.schema_grammar(req.response_format.json_schema.schema_ or {"type": "object"},
                                              grammar_param)
    try:
        prompt = chat_template.render(model.metadata.get("tokenizer.chat_template"), _template_messages(req),
                                      tools=use_tools or None, bos_token=model.bos_token,
                                      eos_token=model.eos_token, max_chars=model.n_ctx * MAX_TOKEN_BYTES)
    except chat_template.PromptTooLong as e:
        raise text_too_long(e.n_chars, model.n_ctx, "messages", "the prompt for your messages") from None
    tokens = model.tokenize(prompt, add_bos=model.add_bos and not prompt.startswith(model.bos_token or "\0"))
    limit = req.token_limit()
    check_context(model, len(tokens), limit, "messages")
    params = sampling(req, limit)
    params.logprobs = bool(req.logprobs)
    params.top_logprobs = req.top_logprobs or 0
    if grammar_text:
        model.check_grammar(grammar_text, grammar_param or "response_format")
        params.grammar = grammar_text
    if use_tools:
        params.capture_markers = [TOOL_OPEN]
    return GenerationJob(prompt_tokens=tokens, params=params)


_TOOL_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def parse_tool_calls(captured: str) -> list[ToolCallOut]:
    """The well-formed ``<tool_call>{"name": …, "arguments": …}</tool_call>``
    blocks of ``captured``, each with a new call id."""
    calls = []
    for body in _TOOL_RE.findall(captured):
        try:
            obj = json.loads(body)
        except ValueError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            continue
        args = obj.get("arguments", obj.get("parameters", {}))
        calls.append(ToolCallOut(id="call_" + secrets.token_hex(12), function=FunctionCallOut(
            name=obj["name"], arguments=args if isinstance(args, str) else json.dumps(args))))
    return calls


def finish_reason(fin: Finished, tool_calls: list | None) -> FinishReason:
    if tool_calls:
        return "tool_calls"
    return "length" if fin.finish_reason == "length" else "stop"


def chat_logprobs(items: list[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(content=[ChatTokenLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes, top_logprobs=[
        TopLogprob(token=a, logprob=c, bytes=b) for a, b, c in t.top]) for t in items])


def chat_chunk(rid: str, model: str, created: int, choices: list[ChatChunkChoice],
               use: CompletionUsage | None = None, with_usage_field: bool = False) -> ChatCompletionChunk:
    """A chat stream chunk; ``with_usage_field`` writes ``usage`` (null when ``use`` is None)."""
    chunk = ChatCompletionChunk(id=rid, created=created, model=model, system_fingerprint=FINGERPRINT,
                                choices=choices)
    if with_usage_field:
        chunk.usage = use
    return chunk


def completion_chunk(rid: str, model: str, created: int, choices: list[CompletionChoice],
                     use: CompletionUsage | None = None) -> CompletionChunk:
    """A completion stream chunk: choices with the fingerprint, or (``use``
    given) the last chunk, with the usage and no choices."""
    if use is not None:
        return CompletionChunk(id=rid, created=created, model=model, choices=choices, usage=use)
    return CompletionChunk(id=rid, created=created, model=model, system_fingerprint=FINGERPRINT, choices=choices)


# -- legacy completions ----------------------------------------------------------------
def completion_prompts(req: CompletionRequest, model: LoadedModel) -> list[tuple[list[int], str]]:
    """(tokens, text) per prompt; token prompts are checked against the vocabulary."""
    p = req.prompt
    if isinstance(p, str):
        items: list[str | list[int]] = [p]
    elif p and isinstance(p[0], int):
        items = [p]  # one token array
    else:
        items = list(p)
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            check_text_length(item + (req.suffix or ""), model.n_ctx, "prompt", "your prompt")
            if req.suffix is not None:
                if not model.has_fim:
                    raise InvalidRequest(f"model '{model.id}' has no fill-in-the-middle tokens; "
                                         f"'suffix' is not supported", param="suffix")
                toks = model.fim_prompt(item, req.suffix)
            else:  # special tokens written in the prompt are parsed, as llama-server does
                toks = model.tokenize(item, special=True)
                if not toks:
                    toks = [t for t in [model.llm.token_bos()] if t >= 0]
            text = item
        else:
            check_context(model, len(item), req.max_tokens or None, "prompt")
            model.check_tokens(item, "prompt")
            if req.suffix is not None:
                raise InvalidRequest("'suffix' needs a text prompt", param="suffix")
            toks, text = list(item), model.detokenize(list(item))
        if not toks:
            raise InvalidRequest("prompt is empty", param="prompt")
        check_context(model, len(toks), req.max_tokens or None, "prompt")
        out.append((toks, text))
    return out


def completion_logprobs(items: list[TokenLogprob], offset0: int) -> CompletionLogprobs:
    offs, pos = [], offset0
    for t in items:
        offs.append(pos)
        pos += len(t.token)
    return CompletionLogprobs(tokens=[t.token for t in items], token_logprobs=[t.logprob for t in items],
                              top_logprobs=[{a: c for a, _, c in t.top} for t in items], text_offset=offs)


# -- embeddings ----------------------------------------------------------------------------
def embedding_inputs(inp: Any, model: LoadedModel) -> list[list[int]]:
    if isinstance(inp, str):
        items: list = [inp]
    elif inp and isinstance(inp[0], int):
        items = [inp]
    else:
        items = list(inp)
    out = []
    limit = model.embed_limit()
    for i, item in enumerate(items):
        if isinstance(item, str):
            check_text_length(item, limit, "input", f"input[{i}]")
            toks = model.tokenize(item, special=False)
        else:
            model.check_tokens(item, "input")
            toks = list(item)
        if not toks:
            raise InvalidRequest(f"input[{i}] is empty after tokenization", param="input")
        if len(toks) > limit:
            raise InvalidRequest(f"input[{i}] has {len(toks)} tokens; this model's maximum input length is "
                                 f"{limit} tokens", param="input", code="context_length_exceeded")
        out.append(toks)
    return out


def embedding_response(model: str, vectors: list[np.ndarray], fmt: str, dims: int | None,
                       n_tokens: int) -> EmbeddingList:
    data = []
    for i, v in enumerate(vectors):
        if dims is not None:
            if dims > v.shape[0]:
                raise InvalidRequest(f"dimensions must be <= {v.shape[0]} for this model", param="dimensions")
            v = v[:dims]
            n = float(np.linalg.norm(v))
            v = v / n if n > 0 else v
        v = v.astype("<f4")
        emb = base64.b64encode(v.tobytes()).decode() if fmt == "base64" else v.tolist()
        data.append(Embedding.model_construct(index=i, embedding=emb))   # vectors are not re-validated
    return EmbeddingList(data=data, model=model, usage=EmbeddingUsage(prompt_tokens=n_tokens, total_tokens=n_tokens))


def now() -> int:
    return int(time.time())
