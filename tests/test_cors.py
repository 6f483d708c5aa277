"""CORS for browser clients: preflight OPTIONS needs no key, API responses
carry Access-Control-* headers for allowed origins (``api.cors_origins``),
the web page never does; and in real Chromium a page served from another
loopback origin calls the API with fetch, plain and streaming."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from thoxtest import ROOT, Server, free_port, make_home, require, run_thox

WEB_DIR = ROOT / "tests" / "web"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ASKED_HEADERS = "authorization, content-type, x-api-key, anthropic-version, x-stainless-lang"

pytestmark = pytest.mark.timeout(300)


def preflight(server: Server, path: str, origin: str | None = "http://playground.example:3000",
              method: str = "POST") -> httpx.Response:
    headers = {"Access-Control-Request-Method": method, "Access-Control-Request-Headers": ASKED_HEADERS}
    if origin:
        headers["Origin"] = origin
    return httpx.request("OPTIONS", server.url + path, headers=headers, timeout=30)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/models", "/v1/messages", "/v1/responses",
                                  "/v1/completions", "/api/chat", "/api/tags"])
def test_preflight_needs_no_key(server, path):
    r = preflight(server, path)
    assert r.status_code == 204, r.text
    h = r.headers
    assert h["access-control-allow-origin"] == "*"
    allowed = {x.strip().lower() for x in h["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "x-api-key", "anthropic-version", "x-stainless-lang"} <= allowed
    assert {"GET", "POST", "DELETE"} <= {x.strip() for x in h["access-control-allow-methods"].split(",")}
    assert int(h["access-control-max-age"]) > 0 and "origin" in h["vary"].lower()


def test_cors_headers_on_api_responses_only(server):
    origin = {"Origin": "http://playground.example:3000"}
    r = httpx.get(server.base_url + "/models", headers={**server.headers, **origin}, timeout=30)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    assert "x-ratelimit-remaining-requests" in r.headers["access-control-expose-headers"]
    # errors are readable by the page too (a 401 says the key is wrong)
    r = httpx.get(server.base_url + "/models", headers=origin, timeout=30)
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "*"
    # no Origin, no CORS headers; an OPTIONS without Origin is still no 401
    assert "access-control-allow-origin" not in server.get("/models").headers
    assert preflight(server, "/v1/models", origin=None).status_code == 204
    # the web page (cookie sessions) never gets CORS headers
    for path in ("/", "/status.json", "/health"):
        r = httpx.get(server.url + path, headers=origin, timeout=30)
        assert "access-control-allow-origin" not in r.headers, path
    assert "access-control-allow-origin" not in preflight(server, "/login").headers


def test_origin_list(tmp_path_factory, models_dir):
    home = make_home(tmp_path_factory, models_dir, "cors-list")
    bad = run_thox(home, "config", "set", "api.cors_origins", "not an origin", check=False)
    assert bad.returncode != 0 and bad.stderr.startswith("thox: error:") and len(bad.stderr.splitlines()) == 1
    s = Server(home, api__cors_origins="http://a.example:3000, https://b.example")
    try:
        assert preflight(s, "/v1/models", "https://b.example").headers["access-control-allow-origin"] == \
            "https://b.example"
        other = preflight(s, "/v1/models", "http://evil.example")
        assert other.status_code == 204 and "access-control-allow-origin" not in other.headers
        r = httpx.get(s.base_url + "/models", headers={**s.headers, "Origin": "http://a.example:3000"}, timeout=30)
        assert r.headers["access-control-allow-origin"] == "http://a.example:3000"
        r = httpx.get(s.base_url + "/models", headers={**s.headers, "Origin": "http://evil.example"}, timeout=30)
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    finally:
        s.stop()


PAGE = """<!doctype html><meta charset="utf-8"><title>cors</title><script type="module">
const q = new URLSearchParams(location.search);
const api = q.get("api"), key = q.get("key"), denied = q.get("denied");
const json = {"Content-Type": "application/json"};
const chat = (stream) => JSON.stringify({model: "tiny", max_tokens: 6, stream,
                                          messages: [{role: "user", content: "hi"}]});
async function run() {
  const out = {};
  let r = await fetch(api + "/v1/chat/completions",
                      {method: "POST", headers: {...json, Authorization: "Bearer " + key}, body: chat(false)});
  out.plain_status = r.status;
  out.plain_object = (await r.json()).object;
  out.ratelimit = r.headers.get("x-ratelimit-remaining-requests");
  r = await fetch(api + "/v1/chat/completions",
                  {method: "POST", headers: {...json, Authorization: "Bearer " + key}, body: chat(true)});
  out.stream_status = r.status;
  const reader = r.body.getReader(), dec = new TextDecoder();
  let text = "";
  out.stream_reads = 0;
  for (;;) {
    const {done, value} = await reader.read();
    if (done) break;
    out.stream_reads++;
    text += dec.decode(value, {stream: true});
  }
  out.stream_events = text.split("\\n\\n").filter((b) => b.startsWith("data: ")).length;
  out.stream_done = text.trim().endsWith("data: [DONE]");
  r = await fetch(api + "/v1/messages", {method: "POST", body: chat(false),
                  headers: {...json, "x-api-key": key, "anthropic-version": "2023-06-01"}});
  out.messages_status = r.status;
  out.messages_type = (await r.json()).type;
  r = await fetch(api + "/v1/models", {headers: {Authorization: "Bearer " + "0".repeat(64)}});
  out.wrong_key_status = r.status;
  r = await fetch(api + "/v1/models", {headers: {Authorization: "Bearer " + key, "x-stainless-lang": "js",
                                                 "x-stainless-os": "Linux"}});
  out.stainless_status = r.status;
  try {
    await fetch(denied + "/v1/models", {headers: {Authorization: "Bearer " + key}});
    out.denied = "readable";
  } catch (e) {
    out.denied = "blocked";
  }
  window.result = out;
}
run().catch((e) => { window.result = {error: String(e)}; });
</script>
"""


def _serve_page(port: int) -> ThreadingHTTPServer:
    class Page(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            body = PAGE.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", port), Page)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def test_browser_page_on_another_origin(tmp_path_factory, models_dir):
    require(shutil.which("node"), "node is missing")
    require(os.path.exists(CHROMIUM), f"{CHROMIUM} is missing (make web-deps)")
    require((WEB_DIR / "node_modules" / "playwright-core").is_dir(), "playwright-core is missing (make web-deps)")
    page_port = free_port()
    page_origin = f"http://127.0.0.1:{page_port}"
    allowing = Server(make_home(tmp_path_factory, models_dir, "cors-allow"), api__cors_origins=page_origin,
                      api__rate_limit_loopback="true")
    denying = Server(make_home(tmp_path_factory, models_dir, "cors-deny"), api__cors_origins="")
    httpd = _serve_page(page_port)
    try:
        url = f"{page_origin}/?api={allowing.url}&key={allowing.key}&denied={denying.url}"
        p = subprocess.run(["node", str(WEB_DIR / "cors.mjs"), url], capture_output=True, text=True, timeout=240,
                           cwd=WEB_DIR, env={**os.environ, "CHROMIUM": CHROMIUM})
        assert p.returncode == 0, p.stderr[-3000:]
        res = json.loads(p.stdout.strip().splitlines()[-1])
        assert "error" not in res, res
        assert res["origin"] == page_origin and page_origin != allowing.url
        assert res["plain_status"] == 200 and res["plain_object"] == "chat.completion"
        assert res["ratelimit"] is not None                       # an exposed header
        assert res["stream_status"] == 200 and res["stream_done"] and res["stream_events"] >= 3
        assert res["messages_status"] == 200 and res["messages_type"] == "message"
        assert res["wrong_key_status"] == 401 and res["stainless_status"] == 200
        assert res["denied"] == "blocked"                         # CORS off: the browser refuses the read
    finally:
        httpd.shutdown()
        allowing.stop()
        denying.stop()
