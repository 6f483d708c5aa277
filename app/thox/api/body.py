"""Request bodies: the JSON object a POST carries, checked for size and
shape before it is parsed, and validated against a pydantic model when the
route gives one. Every problem is a 400 in the OpenAI error shape."""

from __future__ import annotations

import asyncio
import json
import re
from typing import TypeVar, overload

import numpy as np
from pydantic import BaseModel
from quart import request

from ..errors import InvalidRequest

MAX_JSON_DEPTH = 64
MAX_JSON_CONTAINERS = 200_000
MAX_JSON_VALUES = 2_000_000
INLINE_BODY_BYTES = 64 << 10  # larger bodies are parsed on a worker thread
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = bytes(c for c in range(256) if c not in b"[]{}")
M = TypeVar("M", bound=BaseModel)


def check_json_shape(data: bytes) -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH or with more arrays,
    objects or values than parsing may build while it holds the interpreter
    lock (strings left out; vectorized: a body of megabytes takes milliseconds)."""
    bare = _STRING.sub(b"", data)
    brackets = bare.translate(None, _NOT_BRACKET)
    if not brackets:
        return
    opens = np.frombuffer(brackets, dtype=np.uint8)
    is_open = (opens == 0x5B) | (opens == 0x7B)
    steps = np.where(is_open, np.int8(1), np.int8(-1))
    if int(np.cumsum(steps, dtype=np.int32).max()) > MAX_JSON_DEPTH:
        raise InvalidRequest(f"JSON body is nested more than {MAX_JSON_DEPTH} levels deep.")
    if int(is_open.sum()) > MAX_JSON_CONTAINERS:
        raise InvalidRequest(f"JSON body has more than {MAX_JSON_CONTAINERS} arrays and objects.")
    if bare.count(b",") >= MAX_JSON_VALUES:
        raise InvalidRequest(f"JSON body has more than {MAX_JSON_VALUES} values.")


@overload
def parse_body(data: bytes, model: None = None) -> dict: ...
@overload
def parse_body(data: bytes, model: type[M]) -> M: ...


def parse_body(data: bytes, model: type[M] | None = None) -> dict | M:
    """``data`` as a JSON object (validated as ``model`` when given), or a 400
    that says what is wrong."""
    if not data or not data.strip():
        raise InvalidRequest("We could not parse the JSON body of your request: the body is empty. "
                             "Send a JSON object with Content-Type: application/json.")
    check_json_shape(data)
    try:
        body = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidRequest("We could not parse the JSON body of your request: it is not valid UTF-8.") from None
    except (ValueError, RecursionError) as e:
        raise InvalidRequest(f"We could not parse the JSON body of your request: {e}.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The JSON body must be an object.")
    try:  # JSON may escape lone UTF-16 surrogates ("\ud800"), which are not text
        if SURROGATE_ESCAPE.search(data):  # only then is the whole body re-encoded
            json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest("The JSON body contains a lone UTF-16 surrogate escape, which is not "
                             "valid Unicode text.") from None
    return body if model is None else model.model_validate(body)


@overload
async def json_body(model: None = None) -> dict: ...
@overload
async def json_body(model: type[M]) -> M: ...


async def json_body(model: type[M] | None = None) -> dict | M:
    """The request body as a JSON object, validated as ``model`` when given;
    a large body is parsed off the event loop."""
    data = await request.get_data(cache=False)
    if len(data) > INLINE_BODY_BYTES:
        return await asyncio.to_thread(parse_body, data, model)
    return parse_body(data, model)
