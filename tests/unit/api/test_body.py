"""thox.api.body.parse_body: the JSON object of a request, or a 400 that
says what is wrong (checked before parsing builds anything large)."""

from __future__ import annotations

import pytest

from thox.api.body import MAX_JSON_CONTAINERS, MAX_JSON_DEPTH, parse_body
from thox.api.schemas import EmbeddingRequest
from thox.errors import InvalidRequest


def test_object_and_model():
    assert parse_body(b'{"a": [1, {"b": "]]]["}]}') == {"a": [1, {"b": "]]]["}]}
    req = parse_body(b'{"model": "m", "input": "x"}', EmbeddingRequest)
    assert isinstance(req, EmbeddingRequest) and req.input == "x"


@pytest.mark.parametrize("data, words", [
    (b"", "empty"), (b"  \n", "empty"), (b"[1]", "must be an object"), (b'"x"', "must be an object"),
    (b'{"a": "\xff"}', "not valid UTF-8"), (b'{"a": 1', "could not parse"),
    (b'{"a": "\\ud800"}', "surrogate"),
])
def test_refused(data, words):
    with pytest.raises(InvalidRequest) as e:
        parse_body(data)
    assert words in e.value.message and e.value.status == 400


def test_depth_limit_is_exact_and_strings_do_not_count():
    ok = b'{"a":' + b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1) + b"}"
    assert isinstance(parse_body(ok), dict)
    with pytest.raises(InvalidRequest, match="nested more than"):
        parse_body(b'{"a":' + b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH + b"}")
    assert parse_body(b'{"a": "' + b"[" * 10_000 + b'"}')["a"] == "[" * 10_000


def test_container_limit():
    with pytest.raises(InvalidRequest, match="arrays and objects"):
        parse_body(b'{"a": [' + b",".join([b"[]"] * (MAX_JSON_CONTAINERS + 1)) + b"]}")
