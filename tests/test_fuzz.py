"""Fuzzing every route: schema-driven (schemathesis, from the
app's own OpenAPI document) and property-based (hypothesis) malformed and
edge-case requests, plus hand-made broken HTTP on a raw socket.

Properties, for every response:
  * no 5xx, except 503 with a Retry-After (queue full);
  * every non-2xx answer on /v1 is JSON in the OpenAI error shape
    {"error": {"message": str, "type": str, "param": str|null, "code": str|null}};
  * no traceback and never the API key in a body;
  * no request hangs (per-request timeout);
and afterwards the server still answers a normal request, logged no
internal error, and its process is alive.

Cost is bounded: a fuzz server on the tiny generated model with a 256-token
context and a 256 KiB body limit; a fixed hypothesis seed (override with
THOX_FUZZ_SEED) and a fixed number of examples per phase (scale with
THOX_FUZZ_SCALE, default 1). About 5,500 requests, ~1-2 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from thoxtest import Server, make_home

try:
    import hypothesis  # noqa: F401
    import schemathesis
except ImportError as e:  # make test installs them (mk/bench.mk: fuzz-deps)
    raise ImportError(f"{e}: run `make fuzz-deps` (hypothesis, schemathesis)") from e

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

pytestmark = pytest.mark.timeout(600)

SEED = int(os.environ.get("THOX_FUZZ_SEED", "20240607"))
SCALE = float(os.environ.get("THOX_FUZZ_SCALE", "1"))
TIMEOUT = 30.0
BODY_LIMIT = 256 * 1024
MODEL = "tiny"


def n(x: int) -> int:
    return max(1, int(x * SCALE))


def fuzz_settings(examples: int):
    return settings(max_examples=n(examples), deadline=None, database=None, derandomize=False,
                    suppress_health_check=list(HealthCheck), print_blob=False)


# -----------------------------------------------------------------------------------------------
class Tally:
    """Counts requests and collects property violations (reported together)."""

    def __init__(self, server: Server):
        self.server = server
        self.total = 0
        self.by_phase: Counter = Counter()
        self.statuses: Counter = Counter()
        self.failures: list[str] = []

    def fail(self, what: str) -> None:
        if len(self.failures) < 200:
            self.failures.append(what)

    def check(self, phase: str, method: str, path: str, status: int, headers, body: bytes,
              what: str = "") -> None:
        self.total += 1
        self.by_phase[phase] += 1
        self.statuses[status] += 1
        where = f"[{phase}] {method} {path[:120]} -> {status} {what[:300]}"
        if status >= 500 and not (status == 503 and _retry_after_ok(headers)):
            self.fail(f"{where}: 5xx: {body[:300]!r}")
        route = path.split("?")[0]
        if 400 <= status and route.startswith(("/v1", "/api/")) and method != "HEAD":
            kind = _error_kind(route)
            err = _error_shape(body, kind)
            if err:
                self.fail(f"{where}: not an {kind} error ({err}): {body[:300]!r}")
        if status in (429, 503) and not _retry_after_ok(headers):
            self.fail(f"{where}: {status} without a valid Retry-After")
        text = body.decode("utf-8", "replace")
        if "Traceback (most recent call last)" in text:
            self.fail(f"{where}: traceback in the body")
        if self.server.key and self.server.key in text:
            self.fail(f"{where}: the API key appears in the body")

    def mark(self) -> int:
        return len(self.failures)

    def assert_clean(self, since: int = 0) -> None:
        new = self.failures[since:]
        assert not new, f"{len(new)} violations, first ones:\n" + "\n".join(new[:25])


def _hdr(headers, name: str) -> str | None:
    """A header from httpx headers or schemathesis' {name: [values]} dict."""
    if headers is None:
        return None
    v = headers.get(name)
    if v is None and isinstance(headers, dict):
        v = next((val for k, val in headers.items() if k.lower() == name), None)
    if isinstance(v, list):
        v = v[0] if v else None
    return v


def _retry_after_ok(headers) -> bool:
    v = _hdr(headers, "retry-after")
    try:
        return v is not None and int(v) >= 1
    except ValueError:
        return False


def _error_kind(route: str) -> str:
    """Whose error shape the answers on ``route`` use."""
    return "Anthropic" if route.startswith("/v1/messages") else "Ollama" if route.startswith("/api/") else "OpenAI"


def _error_shape(body: bytes, kind: str = "OpenAI") -> str:
    """'' when ``body`` is an error object of ``kind``, else what is wrong: OpenAI's
    {"error": {"message", "type", "param", "code"}}, Anthropic's {"type": "error",
    "error": {"type", "message"}} or Ollama's {"error": "message"}."""
    try:
        doc = json.loads(body)
    except ValueError:
        return "not JSON"
    if kind == "Ollama":
        ok = isinstance(doc, dict) and isinstance(doc.get("error"), str) and doc["error"]
        return "" if ok else "no 'error' string"
    if not isinstance(doc, dict) or not isinstance(doc.get("error"), dict):
        return "no 'error' object"
    e = doc["error"]
    if kind == "Anthropic":
        if doc.get("type") != "error" or not isinstance(e.get("type"), str):
            return "not of type 'error' with an error type"
        return "" if isinstance(e.get("message"), str) and e["message"] else "message not a string"
    if set(e) < {"message", "type", "param", "code"}:
        return f"keys {sorted(e)}"
    if not isinstance(e["message"], str) or not e["message"] or not isinstance(e["type"], str):
        return "message/type not strings"
    if e["param"] is not None and not isinstance(e["param"], str):
        return "param not a string or null"
    if e["code"] is not None and not isinstance(e["code"], str):
        return "code not a string or null"
    return ""


# the last event of a complete stream, per route: Responses and Anthropic Messages name their events
_LAST_EVENTS = {"/v1/responses": {"response.completed", "response.incomplete", "response.failed"},
                "/v1/messages": {"message_stop", "error"}}


def _sse_ok(body: bytes, path: str = "") -> str:
    """'' when an event stream is complete or ends with an error event."""
    text = body.decode("utf-8", "replace").rstrip()
    last = text.rsplit("data: ", 1)[-1]
    ends = _LAST_EVENTS.get(path.split("?")[0])
    if ends is not None:
        try:
            kind = json.loads(last).get("type")
        except (ValueError, AttributeError):
            kind = None
        return "" if kind in ends else f"stream cut before {sorted(ends)}: ...{text[-200:]!r}"
    if text.endswith("data: [DONE]"):
        return ""
    try:
        if isinstance(json.loads(last).get("error"), dict):
            return ""
    except (ValueError, AttributeError):
        pass
    return f"stream cut without [DONE] or an error: ...{text[-200:]!r}"


# -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, models_dir):
    home = make_home(tmp_path_factory, models_dir, "fuzz")
    s = Server(home, engine__n_ctx="256", api__max_body_bytes=str(BODY_LIMIT), api__queue_size="4",
               default_model=MODEL)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tally(fuzz_server):
    t = Tally(fuzz_server)
    yield t
    by = ", ".join(f"{k} {v}" for k, v in sorted(t.by_phase.items()))
    codes = ", ".join(f"{k}: {v}" for k, v in sorted(t.statuses.items()))
    print(f"\nfuzz: {t.total} requests ({by}); statuses {codes}")


@pytest.fixture(scope="module")
def http(fuzz_server):
    with httpx.Client(base_url=fuzz_server.url, timeout=TIMEOUT) as c:
        yield c


def _send(http: httpx.Client, tally: Tally, phase: str, method: str, path: str, *,
          headers: dict | None = None, content: bytes | None = None, auth: bool = True) -> httpx.Response | None:
    h = {"Authorization": f"Bearer {tally.server.key}"} if auth else {}
    h.update(headers or {})
    try:
        r = http.request(method, path, headers=h, content=content)
    except httpx.LocalProtocolError:
        # httpx refuses to send it (e.g. a header value with edge whitespace or
        # control bytes): send the same request as raw bytes
        status, rh, body = _raw_request(tally.server.port, method, path, h, content)
        if status is None:
            tally.total += 1
            tally.fail(f"[{phase}] {method} {path[:120]} (raw): no answer within 10 s: {body[:200]!r}")
            return None
        tally.check(phase, method, path, status, rh, body, "(raw) " + repr(h)[:200])
        return httpx.Response(status, headers=rh, content=body)
    except httpx.TimeoutException:
        tally.total += 1
        tally.fail(f"[{phase}] {method} {path[:120]}: no answer within {TIMEOUT}s (hang)")
        return None
    except httpx.RemoteProtocolError as e:
        # the server may close a kept-alive connection (e.g. after a 413);
        # a client retries on a fresh one, and that one must get an answer
        try:
            with httpx.Client(base_url=tally.server.url, timeout=TIMEOUT) as fresh:
                r = fresh.request(method, path, headers=h, content=content)
        except httpx.HTTPError as e2:
            tally.total += 1
            tally.fail(f"[{phase}] {method} {path[:120]}: transport error {e!r}, then {e2!r} on a new connection")
            return None
    except httpx.HTTPError as e:
        tally.total += 1
        tally.fail(f"[{phase}] {method} {path[:120]}: transport error {e!r}")
        return None
    tally.check(phase, method, path, r.status_code, r.headers, r.content,
                (content or b"")[:200].decode("utf-8", "replace"))
    if r.status_code == 200 and r.headers.get("content-type", "").startswith("text/event-stream"):
        bad = _sse_ok(r.content, path)
        if bad:
            tally.fail(f"[{phase}] {method} {path}: {bad}")
    return r


# -- 1. schema-driven: schemathesis cases from the app's own OpenAPI document ------------------
def _operations():
    from thox.api.openapi import openapi_document
    schema = schemathesis.openapi.from_dict(openapi_document())
    schema.config.max_stream_events = 100_000   # read streams to the end (default: cut after 20 events)
    return [r.ok() for r in schema.get_all_operations()]


def _clamp(case, to_tiny: bool, small: int) -> None:
    """Point a share of the generated requests at the real model and keep
    their generation short (the server's n_ctx bounds the rest)."""
    if to_tiny and case.path_parameters and "model" in case.path_parameters:
        case.path_parameters["model"] = MODEL
    body = case.body
    if to_tiny and isinstance(body, dict):
        if "model" in body or case.path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            body["model"] = MODEL
        for k in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            if isinstance(body.get(k), int) and not isinstance(body.get(k), bool) and body[k] > small:
                body[k] = small


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis(fuzz_server, tally, mode):
    import requests
    from schemathesis import GenerationMode

    gm = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
    session = requests.Session()
    auth = {"Authorization": f"Bearer {fuzz_server.key}"}
    per_op = {"/v1/chat/completions": 260, "/v1/completions": 200, "/v1/embeddings": 140,
              "/v1/models/{model}": 100, "/v1/models": 25, "/health": 15, "/metrics": 10, "/openapi.json": 10}
    before, mark = tally.total, tally.mark()
    for op in _operations():
        try:
            strategy = op.as_strategy(generation_mode=gm)
        except Exception as e:  # nothing to negate (no parameters, no body)
            if mode == "negative":
                continue
            raise AssertionError(f"{op.label}: {e}") from e

        @seed(SEED)
        @fuzz_settings(per_op.get(op.path, 20))
        @given(case=strategy, to_tiny=st.booleans(), small=st.integers(1, 12))
        def run(case, to_tiny, small):
            _clamp(case, to_tiny, small)
            try:
                r = case.call(base_url=fuzz_server.url, session=session, headers=auth, timeout=TIMEOUT)
            except requests.Timeout:
                tally.total += 1
                tally.fail(f"[schema-{mode}] {op.label}: no answer within {TIMEOUT}s (hang): {case.body!r:.300}")
                return
            except requests.RequestException as e:
                tally.total += 1
                tally.fail(f"[schema-{mode}] {op.label}: transport error {e!r}: {case.body!r:.300}")
                return
            tally.check(f"schema-{mode}", op.method.upper(), case.formatted_path, r.status_code, r.headers,
                        r.content, repr(case.body)[:300])
            if r.status_code == 200 and (_hdr(r.headers, "content-type") or "").startswith("text/event-stream"):
                bad = _sse_ok(r.content, case.formatted_path)
                if bad:
                    tally.fail(f"[schema-{mode}] {op.label}: {bad}; {r.content.count(b'data: ')} events in "
                              f"{r.elapsed:.2f}s; request {dict(r.request.headers)!r:.300} "
                              f"{r.request.body!r:.500}")

        try:
            run()
        except Unsatisfiable:
            if mode != "negative":
                raise   # nothing in this operation can be made invalid (no parameters, no body)
    assert tally.total - before >= n(400), f"only {tally.total - before} schema-driven requests"
    tally.assert_clean(mark)


# -- 2. property-based: hand-written strategies for what schemas do not generate ----------------
NASTY_SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31 - 1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**40]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e308, -1e308, 5e-324, 0.5, -0.0, 2.0000001]),
    st.text(max_size=40),
    st.sampled_from(["", " ", "\x00", "\ud7ff", "tiny", "thox-demo", "../../etc/passwd", "%00", "null",
                     "\u202e", "A" * 5000, "🙂" * 300]),
)
NASTY = st.recursive(NASTY_SCALARS,
                     lambda kids: st.one_of(st.lists(kids, max_size=4),
                                            st.dictionaries(st.text(max_size=12), kids, max_size=4)),
                     max_leaves=12)

VALID = {
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    "/v1/completions": {"model": MODEL, "prompt": "hello", "max_tokens": 4},
    "/v1/embeddings": {"model": MODEL, "input": "hello"},
    "/v1/responses": {"model": MODEL, "input": "hi", "max_output_tokens": 4},
    "/v1/messages": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    "/api/chat": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 4}},
    "/api/generate": {"model": MODEL, "prompt": "hello", "options": {"num_predict": 4}},
}
FIELDS = {
    "/v1/chat/completions": ["model", "messages", "temperature", "top_p", "n", "stream", "stream_options", "stop",
                             "max_tokens", "max_completion_tokens", "presence_penalty", "frequency_penalty",
                             "seed", "logprobs", "top_logprobs", "response_format", "tools", "tool_choice",
                             "user", "logit_bias"],
    "/v1/completions": ["model", "prompt", "suffix", "echo", "logprobs", "best_of", "max_tokens", "n", "stream",
                        "stop", "temperature", "top_p", "seed", "stream_options"],
    "/v1/embeddings": ["model", "input", "encoding_format", "dimensions", "user"],
    "/v1/responses": ["model", "input", "instructions", "tools", "tool_choice", "text", "temperature", "top_p",
                      "max_output_tokens", "stream", "store", "previous_response_id", "metadata", "user"],
    "/v1/messages": ["model", "messages", "system", "max_tokens", "tools", "tool_choice", "stop_sequences",
                     "temperature", "top_p", "top_k", "stream", "metadata", "output_config"],
    "/api/chat": ["model", "messages", "options", "format", "stream", "tools", "think", "keep_alive"],
    "/api/generate": ["model", "prompt", "suffix", "system", "raw", "images", "options", "format", "stream"],
}
POST_ROUTES = list(VALID)


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


@st.composite
def mutated_body(draw):
    """A valid body with fields replaced, removed or nested message parts broken."""
    route = draw(st.sampled_from(POST_ROUTES))
    body = json.loads(json.dumps(VALID[route]))
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from(FIELDS[route]))
        op = draw(st.sampled_from(["set", "set", "set", "drop", "message"]))
        if op == "drop":
            body.pop(field, None)
        elif op == "message" and "messages" in VALID[route]:
            msg = draw(st.dictionaries(st.sampled_from(["role", "content", "name", "tool_calls", "tool_call_id"]),
                                       NASTY, max_size=4))
            if draw(st.booleans()):
                msg["role"] = draw(st.sampled_from(["user", "assistant", "tool", "system"]))
            body["messages"] = draw(st.sampled_from([[msg], [{"role": "user", "content": "x"}, msg], msg, []]))
        else:
            body[field] = draw(NASTY)
    if "max_tokens" in body and isinstance(body["max_tokens"], int) and not isinstance(body["max_tokens"], bool):
        if 16 < body["max_tokens"] < 2**31 and draw(st.booleans()):
            body["max_tokens"] = 8
    return route, _dump(body)


@st.composite
def raw_body(draw):
    """Bodies that are not (valid) JSON objects at all."""
    route = draw(st.sampled_from(POST_ROUTES))
    kind = draw(st.sampled_from(["bytes", "invalid-utf8", "deep", "deep-valid-prefix", "scalar", "nan",
                                 "huge-number", "surrogate", "truncated", "big-string", "dupe-keys",
                                 "bom", "latin1"]))
    valid = _dump(VALID[route])
    if kind == "bytes":
        body = draw(st.binary(max_size=300))
    elif kind == "invalid-utf8":
        bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80",
                                    b"\xe2\x82"]))
        body = valid.replace(b'"hi"', b'"h' + bad + b'i"').replace(b'"hello"', b'"he' + bad + b'llo"')
    elif kind == "deep":
        depth = draw(st.sampled_from([63, 64, 65, 200, 5000, 100000]))
        opener = draw(st.sampled_from([b"[", b"{\"a\":"]))
        closer = b"]" if opener == b"[" else b"}"
        body = opener * depth + b"1" + closer * depth
    elif kind == "deep-valid-prefix":
        depth = draw(st.sampled_from([10, 70, 3000]))
        obj = json.loads(valid)
        obj[draw(st.sampled_from(FIELDS[route]))] = "@@"
        body = _dump(obj).replace(b'"@@"', b"[" * depth + b"]" * depth)
    elif kind == "scalar":
        body = draw(st.sampled_from([b"null", b"true", b"1", b'"x"', b"[]", b"[{}]", b"{}", b" ", b"\n\n"]))
    elif kind == "nan":
        body = valid.replace(b"4", draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999"])), 1) \
            if b"4" in valid else valid[:-1] + b', "temperature": NaN}'
    elif kind == "huge-number":
        num = draw(st.sampled_from([b"9" * 5000, b"-" + b"9" * 400, b"1" + b"0" * 4300, b"1e400", b"-1e-400",
                                    b"0." + b"0" * 3000 + b"1"]))
        field = draw(st.sampled_from([b"max_tokens", b"temperature", b"n", b"seed", b"top_p", b"dimensions"]))
        body = valid[:-1] + b', "' + field + b'": ' + num + b"}"
    elif kind == "surrogate":
        body = valid.replace(b'"hi"', b'"\\ud800"').replace(b'"hello"', b'"\\udfff\\ud800x"')
    elif kind == "truncated":
        body = valid[:draw(st.integers(1, len(valid) - 1))]
    elif kind == "big-string":
        size = draw(st.sampled_from([BODY_LIMIT - 200, BODY_LIMIT + 1, 3 * BODY_LIMIT, 20_000]))
        filler = draw(st.sampled_from(["a", "é", "\u4e2d", " "]))
        obj = json.loads(valid)
        key = "messages" if "messages" in obj else ("prompt" if "prompt" in obj else "input")
        s = filler * max(1, size // len(filler.encode()))
        obj[key] = [{"role": "user", "content": s}] if key == "messages" else s
        body = _dump(obj)
    elif kind == "dupe-keys":
        body = valid[:-1] + b', "model": 5, "model": "tiny"}'
    elif kind == "bom":
        body = b"\xef\xbb\xbf" + valid
    else:  # latin1
        body = valid.replace(b'"hi"', "\"h\xe9i\"".encode("latin-1")).replace(b'"hello"', b'"h\xe9llo"')
    return route, body


CONTENT_TYPES = st.sampled_from([None, "application/json", "text/plain", "application/x-www-form-urlencoded",
                                 "multipart/form-data; boundary=x", "application/json; charset=latin-1",
                                 "application/json; charset=utf-16", "", "*/*", "application/xml"])


def test_hypothesis_bodies(fuzz_server, tally, http):
    before, mark = tally.total, tally.mark()

    @seed(SEED)
    @fuzz_settings(1800)
    @given(rb=st.one_of(mutated_body(), raw_body()), ctype=CONTENT_TYPES, stream=st.booleans())
    def run(rb, ctype, stream):
        route, body = rb
        headers = {} if ctype is None else {"Content-Type": ctype}
        if stream and body.startswith(b"{") and body.endswith(b"}") and b'"stream"' not in body:
            body = body[:-1] + b', "stream": true}'
        _send(http, tally, "bodies", "POST", route, headers=headers, content=body)

    run()
    assert tally.total - before >= n(1600)
    tally.assert_clean(mark)


# -- 3. paths, methods, headers and auth -------------------------------------------------------
PRINTABLE = st.characters(blacklist_categories=("Cc", "Cs"))
KEYLIKE = st.one_of(st.text(PRINTABLE, max_size=80), st.sampled_from(["", " ", "0" * 64, "g" * 64, "sk-" + "0" * 48,
                                                          "Bearer", "null", "undefined", "\u00e9" * 64]))


@st.composite
def auth_header(draw, key: str):
    kind = draw(st.sampled_from(["none", "empty", "scheme-only", "wrong", "basic", "upper-key", "spaces",
                                 "prefix", "suffix", "double", "lower-scheme", "random", "tab"]))
    return {
        "none": None, "empty": "", "scheme-only": "Bearer", "wrong": "Bearer " + draw(KEYLIKE),
        "basic": "Basic " + key, "upper-key": "Bearer " + key.upper(), "spaces": "Bearer    " + key + "   ",
        "prefix": "Bearer " + key[:-1], "suffix": "Bearer " + key + "0", "double": f"Bearer {key} {key}",
        "lower-scheme": "bearer " + key, "random": draw(st.text(PRINTABLE, max_size=100)), "tab": "Bearer\t" + key,
    }[kind]


PATHS = st.one_of(
    st.sampled_from(["/v1/models", "/v1/models/tiny", "/v1/models/nope", "/v1/chat/completions", "/v1/completions",
                     "/v1/embeddings", "/health", "/metrics", "/v1", "/v1/", "/v2/models", "/v1/engines",
                     "/v1/files", "/v1/images/generations", "/v1/audio/speech", "/v1/responses",
                     "/v1/models/" + "x" * 3000, "/v1/models/..%2f..%2fetc%2fpasswd", "/v1/models/%00",
                     "/v1/models/tiny/../tiny-nofim", "/v1//models", "/V1/MODELS", "/v1/models?limit=-1",
                     "/v1/chat/completions/", "/health?verbose=1&x=%ff", "/metrics/x", "/admin", "/.env",
                     "/v1/models/%F0%9F%99%82", "/v1/models/%ff%fe", "/%2e%2e/%2e%2e/etc/passwd"]),
    st.builds(lambda p: "/v1/" + p, st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e, exclude_characters="?#"),
                                             max_size=40)),
    st.builds(lambda p: "/v1/models/" + p, st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e, exclude_characters="?#"),
                                                    min_size=1, max_size=40)),
)
METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "GET", "POST", "TRACE"])


def test_paths_methods_headers_auth(fuzz_server, tally, http):
    before, mark = tally.total, tally.mark()
    key = fuzz_server.key

    @seed(SEED)
    @fuzz_settings(2300)
    @given(path=PATHS, method=METHODS, auth=st.one_of(st.just("ok"), auth_header(key)),
           extra=st.dictionaries(st.sampled_from(["Accept", "Accept-Encoding", "X-Forwarded-For", "Origin",
                                                   "Expect", "Range", "Cookie", "Content-Type",
                                                   "X-Request-Id", "User-Agent", "Connection-Token"]),
                                 st.text(alphabet=st.characters(codec="latin-1", min_codepoint=0x20,
                                                                exclude_characters="\x7f"), max_size=300),
                                 max_size=3),
           body=st.one_of(st.none(), st.just(b'{"model":"tiny","input":"x"}'), st.binary(max_size=64)))
    def run(path, method, auth, extra, body):
        headers: dict[str, Any] = {}
        for k, v in extra.items():
            headers[k] = v.encode("latin-1")
        use_key = auth == "ok"
        if not use_key and auth is not None:
            headers["Authorization"] = auth.encode("utf-8")
        if method in ("GET", "HEAD", "OPTIONS", "TRACE", "DELETE"):
            body = None if method != "DELETE" else body
        r = _send(http, tally, "paths", method, path, headers=headers, content=body, auth=use_key)
        if r is None:
            return
        base = path.split("?")[0]
        if base.startswith("/v1/") and not use_key and method != "OPTIONS" and \
                r.status_code not in (401, 404, 405, 413, 429):
            # the key check comes first on /v1 (404/405 for unknown routes is fine); a CORS
            # preflight (OPTIONS) is answered without the key
            if not (auth and auth.startswith(("Bearer " + key, "bearer " + key, "Bearer    " + key,
                                              "Bearer\t" + key, "Bearer " + key.upper()))):
                tally.fail(f"[paths] {method} {path} with Authorization {auth!r:.80}: {r.status_code}, not 401")

    run()
    assert tally.total - before >= n(2000)
    tally.assert_clean(mark)


# -- 4. broken HTTP on a raw socket ------------------------------------------------------------
def _complete(buf: bytes) -> bool:
    """True once ``buf`` holds one whole HTTP response (the server keeps
    the connection open after answering, even after our half-close)."""
    head, sep, rest = buf.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            try:
                return len(rest) >= int(value.strip())
            except ValueError:
                return True
        if name.strip().lower() == b"transfer-encoding":
            return rest.endswith(b"0\r\n\r\n")
    return True


def _raw(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` as is; return what came back until one response is
    complete, the server closes, or ``timeout`` (then '<<timeout>>' is appended)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        out = b""
        deadline = time.monotonic() + timeout
        try:
            while not _complete(out):
                s.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except (TimeoutError, socket.timeout):
            out += b"<<timeout>>"
        except ConnectionResetError:
            pass
        return out


def _raw_request(port: int, method: str, path: str, headers: dict, body: bytes | None):
    """One request as raw bytes (Connection: close) -> (status|None, headers, body)."""
    def b(x) -> bytes:
        return x if isinstance(x, bytes) else str(x).encode("utf-8")
    lines = [b(method) + b" " + b(path) + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    lines += [b(k) + b": " + b(v) for k, v in headers.items()]
    if body is not None:
        lines.append(b"Content-Length: %d" % len(body))
    out = _raw(port, b"\r\n".join(lines) + b"\r\n\r\n" + (body or b""))
    if out.endswith(b"<<timeout>>") or not out.startswith(b"HTTP/1."):
        return None, {}, out
    head, _, rest = out.partition(b"\r\n\r\n")
    hl = head.split(b"\r\n")
    rh = {}
    for line in hl[1:]:
        k, _, v = line.partition(b":")
        rh[k.strip().lower().decode("latin-1")] = v.strip().decode("latin-1")
    return int(hl[0][9:12]), rh, rest


def test_raw_http(fuzz_server, tally):
    mark = tally.mark()
    key = fuzz_server.key.encode()
    good = b'{"model":"tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":2}'
    auth = b"Authorization: Bearer " + key + b"\r\n"
    cases = [
        b"GARBAGE\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET /health\r\n\r\n",
        b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET /health HTTP/1.1\r\n\r\n",                              # no Host
        b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\n: empty-name\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX: \xff\xfe\x00\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key + b"\x00\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: " + b"A" * 70000 + b"\r\n\r\n",
        b"GET /" + b"a" * 100000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v1/models\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v1/m\xffodels HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n",
        b"GET http://evil.example/v1/models HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n",
        b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
        b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: -1\r\n\r\n" + good,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: abc\r\n\r\n" + good,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 99999999999999999999\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 10\r\n\r\n" + good,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth +
        b"Content-Length: %d\r\n\r\n" % (len(good) + 50) + good,              # short body, then EOF
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth +
        b"Content-Length: 5\r\nContent-Length: 7\r\n\r\n" + good,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth +
        b"Transfer-Encoding: chunked\r\n\r\nZZ\r\n" + good + b"\r\n0\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth +
        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(good) + good + b"\r\n0\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth +
        b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth +
        b"Transfer-Encoding: chunked\r\n\r\n" + b"1\r\n{\r\n" * 20 + b"0\r\n\r\n",
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 0\r\n\r\n",
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n" + auth +
        b"Content-Length: %d\r\n\r\n" % (BODY_LIMIT + 10) + b"x" * 1000,
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n" + auth + b"Expect: 100-continue\r\n"
        b"Content-Length: %d\r\n\r\n" % (BODY_LIMIT * 4),
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n" * 2 + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n" + auth + b"\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n" + auth + b"\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00" * 30,
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(200),  # a TLS ClientHello
        os.urandom(2000),
        b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 2000 + b"\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n",
        b"GET /health HTTP/1.0\r\n\r\n",
        b"GET /health HTTP/1.1\nHost: x\n\n",
    ]
    # h11 hints 501 for an unknown transfer coding; thox.server maps that to 400
    protocol_501 = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth +
                    b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n")
    cases.append(protocol_501)
    for data in cases:
        out = _raw(fuzz_server.port, data)
        tally.total += 1
        tally.by_phase["raw"] += 1
        if out.endswith(b"<<timeout>>"):
            tally.fail(f"[raw] {data[:80]!r}: no answer and no close within 10 s")
        for line in out.split(b"\r\n"):
            if line.startswith(b"HTTP/1.") and len(line) >= 12:
                status = int(line[9:12])
                tally.statuses[status] += 1
                if status >= 500 and status != 503:
                    tally.fail(f"[raw] {data[:80]!r}: {line!r}")
        if b"Traceback" in out:
            tally.fail(f"[raw] {data[:80]!r}: traceback")
    # a valid request through the same path works
    ok = _raw(fuzz_server.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth +
              b"Content-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(good) + good)
    assert ok.startswith(b"HTTP/1.1 200"), ok[:300]
    tally.assert_clean(mark)


# -- 5. afterwards ---------------------------------------------------------------------------------
@pytest.mark.parametrize("route,body", ids=["chat", "completions", "embeddings"], argvalues=[
    ("/v1/chat/completions", b'{"model":"tiny","messages":[{"role":"user","content":"\\ud800"}],"max_tokens":2}'),
    ("/v1/completions", b'{"model":"tiny","prompt":"a\\udfff","max_tokens":2}'),
    ("/v1/embeddings", b'{"model":"tiny","input":"\\ud800x"}'),
])
def test_lone_surrogate_is_a_400(fuzz_server, http, route, body):
    """JSON allows escaped lone surrogates ("\\ud800"); they are not Unicode
    text and must be refused (400 naming the param), not crash the tokenizer."""
    r = http.post(route, content=body, headers={**fuzz_server.headers, "Content-Type": "application/json"})
    assert r.status_code == 400, (r.status_code, r.text)
    assert _error_shape(r.content) == ""


def test_server_survives_and_total(fuzz_server, tally, http):
    from openai import OpenAI

    mark = tally.mark()

    assert fuzz_server.proc.poll() is None, "the server died"
    client = OpenAI(base_url=fuzz_server.base_url, api_key=fuzz_server.key, max_retries=0, timeout=60)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=5)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 5
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=5, stream=True))
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert len(client.embeddings.create(model=MODEL, input="x").data) == 1
    assert http.get("/health").json()["status"] == "ok"
    # no internal error was logged while fuzzing (the 500 handler logs "internal error")
    logs = fuzz_server.logs()
    bad = [line for line in logs.splitlines() if "internal error" in line or "Traceback" in line or "Error:" in line]
    assert not bad, f"{len(bad)} internal errors logged while fuzzing, e.g.:\n" + "\n".join(bad[:5])
    assert fuzz_server.key not in logs
    depth = sum(float(line.rsplit(" ", 1)[1]) for line in http.get("/metrics").text.splitlines()
                if line.startswith("thox_queue_depth{"))
    assert depth == 0
    phases = set(tally.by_phase)
    if {"schema-positive", "schema-negative", "bodies", "paths", "raw"} <= phases:
        assert tally.total >= n(5000), f"only {tally.total} fuzz requests: {dict(tally.by_phase)}"
    tally.assert_clean(mark)
