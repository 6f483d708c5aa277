"""Hostile requests against a running server: grammar blow-ups, a model
whose chat template never ends, multi-megabyte prompts, long prompt lists,
random HTTP methods, idle connections. Each case is sent while a thread polls
/health; it must get its 4xx (or a correct 200) within its budget, /health
must answer in under HEALTH_BUDGET seconds throughout, and the server must
be the same process afterwards."""

from __future__ import annotations

import json
import os
import random
import socket
import string
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from thoxtest import THOX, Server, free_port, make_home, require, run_thox, write_tiny_gguf

HEALTH_BUDGET = 0.5

# a chat template that would run 10^10 loop steps
ENDLESS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
# a chat template that builds a gigabyte string in one operation
HUGE = "{{ 'x' * 1000000000 }}"
# a chat template whose output is a gigabyte, a little at a time
FLOOD = "{% for i in range(100000) %}{{ 'x' * 10000 }}{% endfor %}"


class HealthWatch:
    """Polls /health from a thread and records how long each answer took."""

    def __init__(self, server: Server):
        self.url = server.url + "/health"
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as c:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    ok = c.get(self.url).status_code == 200
                except httpx.HTTPError as e:
                    ok = False
                    self.failures.append(repr(e))
                self.latencies.append(time.monotonic() - t0)
                if not ok and not self.failures:
                    self.failures.append("non-200 /health")
                self._stop.wait(0.05)

    def __enter__(self) -> "HealthWatch":
        self._thread.start()
        time.sleep(0.1)
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.1)
        self._stop.set()
        self._thread.join(15)
        assert not self._thread.is_alive(), "/health poll hung"

    def check(self) -> None:
        assert not self.failures, self.failures[:3]
        assert self.latencies, "no /health answers"
        worst = max(self.latencies)
        assert worst < HEALTH_BUDGET, f"/health took {worst:.2f}s (of {len(self.latencies)} polls)"


def hostile(server: Server, path: str, body, *, budget: float, status: int = 400,
            code: str | None = None, param: str | None = None) -> httpx.Response:
    """Send ``body`` while /health is watched; check the answer, its time, the
    /health latencies and that the server process is still the same."""
    pid = server.proc.pid
    with HealthWatch(server) as watch:
        t0 = time.monotonic()
        r = server.post(path, body, timeout=120)
        took = time.monotonic() - t0
    assert r.status_code == status, (r.status_code, r.text[:500])
    if status >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
        if code is not None:
            assert err["code"] == code, err
        if param is not None:
            assert err["param"] == param, err
    assert took < budget, f"answered after {took:.2f}s (budget {budget}s)"
    watch.check()
    assert server.proc.poll() is None and server.proc.pid == pid, "the server process died"
    return r


@pytest.fixture(scope="module")
def hostile_home(tmp_path_factory, models_dir) -> Path:
    home = make_home(tmp_path_factory, models_dir, "hostile")
    for name, template in (("endless", ENDLESS), ("huge", HUGE), ("flood", FLOOD)):
        path = write_tiny_gguf(models_dir / f"{name}.gguf", chat_template=template, name=name)
        run_thox(home, "models", "import", str(path), "--id", name)
    run_thox(home, "config", "set", "api.max_body_bytes", "8M")
    return home


@pytest.fixture(scope="module")
def hserver(hostile_home):
    s = Server(hostile_home)
    yield s
    s.stop()


def chat(schema=None, **kw) -> dict:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kw}
    if schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    return body


# -- grammars ---------------------------------------------------------------------------
BLOWUPS = [
    {"type": "string", "maxLength": 50000},
    {"type": "array", "items": {"type": "integer"}, "maxItems": 50000},
    {"type": "array", "items": {"type": "integer"}, "minItems": 10, "maxItems": 50000},
    {"type": "string", "minLength": 5000000},
    {"type": "string", "pattern": "^a{50000000}$"},
    {"type": "string", "pattern": "^(ab){2,99999999999999999999}$"},
    {"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 900} for i in range(40)}},
]


@pytest.mark.parametrize("schema", BLOWUPS, ids=lambda s: json.dumps(s)[:60])
@pytest.mark.parametrize("stream", [False, True])
def test_schema_blowup_is_400(hserver, schema, stream):
    hostile(hserver, "/chat/completions", chat(schema, stream=stream), budget=1.0,
            code="schema_too_large", param="response_format.json_schema.schema")


def _tool(schema: dict, name: str = "f") -> dict:
    return {"type": "function", "function": {"name": name, "parameters": schema}}


@pytest.mark.parametrize("schema", BLOWUPS[:5], ids=lambda s: json.dumps(s)[:60])
@pytest.mark.parametrize("choice", ["required", "forced"])
def test_tool_parameter_blowup_is_400(hserver, schema, choice):
    params = {"type": "object", "properties": {"v": schema}, "required": ["v"]}
    tools = [_tool({"type": "object"}, "ok"), _tool(params, "f")]
    tool_choice = "required" if choice == "required" else {"type": "function", "function": {"name": "f"}}
    hostile(hserver, "/chat/completions", chat(tools=tools, tool_choice=tool_choice), budget=1.0,
            code="schema_too_large", param="tools[1].function.parameters")


def test_repetition_limit_is_exact(hserver):
    r = hostile(hserver, "/chat/completions",
                chat({"type": "string", "maxLength": 1000}, max_tokens=8, temperature=0), budget=30, status=200)
    content = r.json()["choices"][0]["message"]["content"]
    assert content.startswith('"'), content
    hostile(hserver, "/chat/completions", chat({"type": "string", "maxLength": 1001}), budget=1.0,
            code="schema_too_large", param="response_format.json_schema.schema")
    within = {"type": "object", "properties": {"v": {"type": "string", "maxLength": 1000}}}
    hostile(hserver, "/chat/completions", chat(tools=[_tool(within)], tool_choice="required"), budget=30, status=200)
    over = {"type": "object", "properties": {"v": {"type": "array", "minItems": 1001, "items": {}}}}
    hostile(hserver, "/chat/completions", chat(tools=[_tool(over)], tool_choice="required"), budget=1.0,
            code="schema_too_large", param="tools[0].function.parameters")


# -- chat templates ---------------------------------------------------------------------
def _broken(server: Server, model: str) -> str | None:
    models = httpx.get(server.url + "/health", timeout=10).json()["models"]
    return next(m for m in models if m["id"] == model)["broken"]


@pytest.mark.parametrize("model", ["endless", "huge", "flood"])
def test_malicious_chat_template(hserver, model):
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = hostile(hserver, "/chat/completions", body, budget=8, code="model_broken", param="messages")
    assert "chat template" in r.json()["error"]["message"]
    assert "chat template" in (_broken(hserver, model) or ""), "the model is not reported broken"
    # the second time the template is not run again
    hostile(hserver, "/chat/completions", {**body, "stream": True}, budget=1.0, code="model_broken")
    # what needs no chat template still works
    hostile(hserver, "/completions", {"model": model, "prompt": "hi", "max_tokens": 2}, budget=30, status=200)


def test_malicious_chat_template_after_restart(hostile_home):
    body = {"model": "endless", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for _ in range(2):
        s = Server(hostile_home)
        try:
            hostile(s, "/chat/completions", body, budget=8, code="model_broken")
            assert _broken(s, "endless")
        finally:
            s.stop()


def test_template_work_of_the_translation_layers_is_off_the_event_loop(tmp_path_factory, models_dir):
    """The reasoning probe (a template that mentions <think> is rendered once
    to see whether it opens it) and Anthropic's count_tokens render on the
    preparation threads: /health keeps answering, and a broken template is a
    400 that /health reports."""
    home = make_home(tmp_path_factory, models_dir, "hostile-layers")
    for name, template in (("endless-think", "{# <think> #}" + ENDLESS), ("endless-count", ENDLESS)):
        path = write_tiny_gguf(models_dir / f"{name}.gguf", chat_template=template, name=name)
        run_thox(home, "models", "import", str(path), "--id", name)
    s = Server(home)
    try:
        hi = [{"role": "user", "content": "hi"}]
        hostile(s, "/chat/completions", {"model": "endless-think", "messages": hi, "max_tokens": 2}, budget=16,
                code="model_broken")
        with HealthWatch(s) as watch:
            r = s.post("/messages/count_tokens", {"model": "endless-count", "messages": hi}, timeout=120)
        watch.check()
        assert r.status_code == 400 and r.json()["type"] == "error", r.text[:300]
        assert "chat template" in r.json()["error"]["message"]
        assert "chat template" in (_broken(s, "endless-count") or ""), "the model is not reported broken"
    finally:
        s.stop()


# -- large inputs -----------------------------------------------------------------------
def test_two_megabyte_prompt(hserver):
    big = "a" * (2 << 20)
    hostile(hserver, "/chat/completions", chat(messages=[{"role": "user", "content": big}]), budget=1.0,
            code="context_length_exceeded", param="messages")
    hostile(hserver, "/completions", {"model": "tiny", "prompt": big, "max_tokens": 2}, budget=1.0,
            code="context_length_exceeded", param="prompt")
    hostile(hserver, "/embeddings", {"model": "tiny", "input": big}, budget=1.0,
            code="context_length_exceeded", param="input")


@pytest.fixture(scope="module")
def wide_server(tmp_path_factory, models_dir):
    """A server whose models have an 8192-token context."""
    home = make_home(tmp_path_factory, models_dir, "wide")
    s = Server(home, engine__n_ctx="8192", api__max_body_bytes="8M")
    yield s
    s.stop()


def test_long_prompts_are_tokenized_off_the_loop(wide_server):
    # under 8192 * 256 characters: not refused unread, but tokenized (a second or so), then refused
    text = " ".join(random.choice(string.ascii_lowercase) for _ in range(800_000))
    hostile(wide_server, "/completions", {"model": "tiny", "prompt": text, "max_tokens": 2}, budget=20,
            code="context_length_exceeded", param="prompt")
    hostile(wide_server, "/chat/completions", chat(messages=[{"role": "user", "content": text}]), budget=20,
            code="context_length_exceeded", param="messages")
    hostile(wide_server, "/embeddings", {"model": "tiny", "input": [text[:200_000]] * 8}, budget=20,
            code="context_length_exceeded", param="input")


MANY = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hello"} for i in range(150_000)]


@pytest.mark.parametrize("path,body,param", [
    ("/chat/completions", chat(messages=MANY), "messages"),
    ("/responses", {"model": "tiny", "input": MANY}, "input"),
], ids=["chat", "responses"])
def test_many_messages(hserver, path, body, param):
    """150,000 messages are counted, not validated one by one (which holds the
    interpreter lock for a second): a 400 at once, and /health never stalls."""
    r = hostile(hserver, path, body, budget=2.0, status=400, param=param)
    assert "at most 20000 messages per request, got 150000" in r.text, r.text[:300]


@pytest.mark.parametrize("url,body", [
    ("/v1/messages", {"model": "tiny", "max_tokens": 4, "messages": MANY}),
    ("/api/chat", {"model": "tiny", "messages": MANY, "stream": False}),
], ids=["anthropic", "ollama"])
def test_many_messages_other_protocols(hserver, url, body):
    """The same bound on the Anthropic and Ollama routes, whose bodies are also
    validated off the event loop; their own error shapes."""
    pid = hserver.proc.pid
    with HealthWatch(hserver) as watch:
        t0 = time.monotonic()
        r = httpx.post(hserver.url + url, json=body, headers={"Authorization": f"Bearer {hserver.key}"},
                       timeout=60)
        took = time.monotonic() - t0
    assert r.status_code == 400 and "at most 20000 messages per request" in r.text, r.text[:300]
    assert took < 2.0, f"answered after {took:.2f}s"
    watch.check()
    assert hserver.proc.poll() is None and hserver.proc.pid == pid


def test_large_bodies_are_parsed_off_the_loop(hserver):
    many = json.dumps(chat(padding=[[] for _ in range(1_800_000)]))
    assert len(many) > 6_000_000
    hostile(hserver, "/chat/completions", many.encode(), budget=2.0, status=400)
    values = json.dumps(chat(padding=[1] * 3_000_000), separators=(",", ":"))
    hostile(hserver, "/chat/completions", values.encode(), budget=2.0, status=400)
    fine = json.dumps(chat(padding=[[] for _ in range(150_000)] + [1] * 1_000_000, temperature=0))
    r = hostile(hserver, "/chat/completions", fine.encode(), budget=30, status=200)
    assert r.json()["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("prompt", [["a"] * 100_000, [[1, 2]] * 100_000], ids=["strings", "token-arrays"])
def test_long_prompt_list(hserver, prompt):
    hostile(hserver, "/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 1}, budget=1.0,
            param="prompt")


def test_long_token_prompt(hserver):
    hostile(hserver, "/completions", {"model": "tiny", "prompt": [1] * 1_000_000, "max_tokens": 1}, budget=2.0,
            code="context_length_exceeded", param="prompt")


# -- no key needed --------------------------------------------------------------------------
def test_metrics_methods_bounded(hserver):
    pid = hserver.proc.pid
    rng = random.Random(7)
    methods = {"".join(rng.choice(string.ascii_uppercase) for _ in range(8)) for _ in range(150)}
    with HealthWatch(hserver) as watch, httpx.Client(timeout=10) as c:
        for m in methods:
            r = c.request(m, hserver.url + "/health")
            assert 400 <= r.status_code < 500, (m, r.status_code)
    watch.check()
    text = httpx.get(hserver.url + "/metrics", timeout=10).text
    series = [line for line in text.splitlines() if line.startswith("thox_requests_total{")]
    labels = {line.split('method="')[1].split('"')[0] for line in series}
    assert labels <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}, sorted(labels)[:10]
    assert "other" in labels
    assert len(series) < 60, len(series)
    assert hserver.proc.poll() is None and hserver.proc.pid == pid


@pytest.fixture(scope="module")
def capped_server(tmp_path_factory, models_dir):
    home = make_home(tmp_path_factory, models_dir, "capped")
    s = Server(home, api__max_connections_per_client="4")
    yield s
    s.stop()


def _connect_from(addr: str, port: int) -> socket.socket:
    s = socket.socket()
    s.bind((addr, 0))
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    return s


def _read_all(s: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except (ConnectionResetError, socket.timeout):
            return out
        if not chunk:
            return out
        out += chunk


def test_connections_per_client_are_capped(capped_server):
    srv = capped_server
    pid = srv.proc.pid
    with HealthWatch(srv) as watch:  # /health from 127.0.0.1, the idle connections from 127.0.0.2
        idle = [_connect_from("127.0.0.2", srv.port) for _ in range(4)]
        try:
            time.sleep(0.3)
            extra = _connect_from("127.0.0.2", srv.port)
            t0 = time.monotonic()
            answer = _read_all(extra)
            extra.close()
            assert answer.startswith(b"HTTP/1.1 429 "), answer[:200]
            assert time.monotonic() - t0 < 3
            head, _, body = answer.partition(b"\r\n\r\n")
            assert b"retry-after: 1" in head.lower()
            assert json.loads(body)["error"]["code"] == "too_many_connections"
            # a connection that is in use works as usual
            idle[0].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert _read_all(idle[0]).startswith(b"HTTP/1.1 200 ")
        finally:
            for s in idle:
                s.close()
        time.sleep(0.3)
        again = _connect_from("127.0.0.2", srv.port)
        again.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert _read_all(again).startswith(b"HTTP/1.1 200 ")
        again.close()
    watch.check()
    assert srv.proc.poll() is None and srv.proc.pid == pid


def test_idle_connections_are_closed(capped_server):
    socks = [_connect_from("127.0.0.3", capped_server.port) for _ in range(3)]
    t0 = time.monotonic()
    for s in socks:
        s.settimeout(40)
        assert _read_all(s) == b""  # closed by the server without an answer
        s.close()
    assert time.monotonic() - t0 < 30, "idle connections stay open too long"


# -- both address families ----------------------------------------------------------------
def test_default_listens_on_ipv4_and_ipv6(tmp_path):
    require(socket.has_ipv6 and Path("/proc/net/if_inet6").exists()
            and "00000000000000000000000000000001" in Path("/proc/net/if_inet6").read_text(),
            "IPv6 loopback (::1)")
    run_thox(tmp_path, "api-key", "generate")
    assert run_thox(tmp_path, "config", "get", "api.host").stdout.strip() == "::"
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    p = subprocess.Popen([THOX, "serve", "--port", str(port)], env={**os.environ, "THOX_HOME": str(tmp_path)},
                         stdout=log, stderr=subprocess.STDOUT)
    try:
        seen = set()
        deadline = time.time() + 60
        while time.time() < deadline and seen != {"4", "6"}:
            assert p.poll() is None, (tmp_path / "serve.log").read_text()
            for fam, url in (("4", f"http://127.0.0.1:{port}/health"), ("6", f"http://[::1]:{port}/health")):
                try:
                    if httpx.get(url, timeout=2).status_code == 200:
                        seen.add(fam)
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        assert seen == {"4", "6"}, seen
    finally:
        p.terminate()
        p.wait(10)
        log.close()
