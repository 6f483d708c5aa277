"""What the web pages show, and how they are rendered: device status, SDK
snippets with this device's API base URL, pages with the session's flash
messages, and the small HTML error pages (never a traceback)."""

from __future__ import annotations

import logging
import time
from typing import Any

from quart import Response, render_template, request

from ..store.partial import pull_status
from ..ui import format_bytes, format_duration, format_rate
from . import admin
from .security import parse_host
from ..api.state import app_state
from .sessions import config, current_session

log = logging.getLogger("thox.web")


def request_host() -> tuple[str, int | None] | None:
    """(host, port) from this request's ``Host`` header; None when missing or malformed."""
    return parse_host(request.headers.get("Host", ""))


def api_base_url() -> str:
    """``http://<host>:<api port>/v1`` for the host the browser used. A page
    served on the extra web port (80) still points at the API port."""
    cfg = config()
    host, host_port = request_host() or ("thox.local", None)
    server = request.scope.get("server") or (None, None)
    server_port = server[1] if isinstance(server, (tuple, list)) and len(server) > 1 else None
    web_port = int(cfg.get("api.web_port") or 0)
    api_port = int(cfg.get("api.port"))
    if web_port and server_port == web_port:
        port = api_port
    else:
        port = host_port or server_port or api_port
    return f"http://{host}:{port}/v1"


def status_data() -> dict[str, Any]:
    """What ``/`` and ``/status.json`` show: models with their state, pulls
    with progress (without their URLs), version, uptime and queue length."""
    state = app_state()
    try:
        models = state.manager.status()
    except Exception:  # noqa: BLE001 - the page must render even if the engine is unhappy
        log.exception("web: model status failed")
        models = []
    try:
        pulls = pull_status(state.store)
    except Exception:  # noqa: BLE001
        log.exception("web: pull status failed")
        pulls = []
    for m in models:
        m["size_text"] = format_bytes(m.get("size"))
        m["state"] = ("broken" if m.get("broken") else "loading" if m.get("loading")
                      else "loaded" if m.get("loaded") else "on disk")
    for p in pulls:
        total, done = p.get("total"), p.get("done") or 0
        p["percent"] = round(100.0 * done / total, 1) if total else None
        p["done_text"], p["total_text"] = format_bytes(done), format_bytes(total)
        p["rate_text"] = format_rate(p.get("rate"))
        p["eta_text"] = "" if p.get("eta") is None else format_duration(p["eta"])
        p["state"] = "downloading" if p.get("active") else "interrupted (run the pull again to resume)"
        p.pop("url", None)    # mirror URLs may carry tokens; the page does not need them
    return {
        "status": "ok",
        "version": state.version,
        "uptime": int(time.time() - state.started),
        "models": models,
        "loaded": [m["id"] for m in models if m.get("loaded")],
        "queue": sum(int(m.get("queue") or 0) for m in models),
        "pulls": pulls,
    }


def default_model(models: list[dict[str, Any]]) -> str:
    """The model the snippets name: ``default_model`` when it is installed (or
    nothing is), else the first chat model, else the demo model's id."""
    try:
        name = str(config().get("default_model") or "")
    except Exception:  # noqa: BLE001
        name = ""
    ids = [m["id"] for m in models if m.get("kind", "chat") != "embedding"]
    if name and (name in ids or not ids):
        return name
    return ids[0] if ids else (name or "thox-demo")


def snippets(base_url: str, model: str) -> list[dict[str, str]]:
    """Copy-paste examples (Python, JavaScript, curl) for ``base_url`` and ``model``."""
    py = f'''from openai import OpenAI

client = OpenAI(
    base_url="{base_url}",
    api_key="YOUR_API_KEY",  # or set OPENAI_API_KEY
)
resp = client.chat.completions.create(
    model="{model}",
    messages=[{{"role": "user", "content": "Write a haiku about local AI."}}],
)
print(resp.choices[0].message.content)
'''
    js = f'''import OpenAI from "openai";

const client = new OpenAI({{
  baseURL: "{base_url}",
  apiKey: process.env.THOX_API_KEY,
}});
const resp = await client.chat.completions.create({{
  model: "{model}",
  messages: [{{ role: "user", content: "Write a haiku about local AI." }}],
}});
console.log(resp.choices[0].message.content);
'''
    curl = f'''curl {base_url}/chat/completions \\
  -H "Authorization: Bearer $THOX_API_KEY" \\
  -H "Content-Type: application/json" \\
  -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'
'''
    return [{"id": "python", "label": "Python", "code": py},
            {"id": "javascript", "label": "JavaScript", "code": js},
            {"id": "curl", "label": "curl", "code": curl}]


async def page(template: str, status: int = 200, **kw: Any) -> Response:
    """Render ``thox_web/<template>`` with the session and its flash messages (shown once)."""
    s = current_session()
    messages = list(s.flash) if s else []
    if s:
        s.flash.clear()
    html = await render_template(f"thox_web/{template}", session=s, messages=messages,
                                 version=app_state().version,
                                 password_file=str(admin.password_file(config())), **kw)
    return Response(html, status=status, content_type="text/html; charset=utf-8")


async def error_page(status: int, title: str, message: str, headers: dict[str, str] | None = None) -> Response:
    """A small HTML error page; plain text when even that fails to render."""
    try:
        resp = await page("error.html", status=status, title=title, message=message)
    except Exception:  # noqa: BLE001 - last resort: plain text, still no traceback
        log.exception("web: error page failed")
        resp = Response(f"{status} {title}\n", status=status, content_type="text/plain; charset=utf-8")
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp
