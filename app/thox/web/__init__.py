"""The device's web page (``/`` on the API port and on ``api.web_port``).

What it shows: device status, installed models with pull progress,
copy-paste SDK snippets with this device's base URL, and, after sign-in with
the device admin password, the API key with copy and rotate buttons.

Security model (plain HTTP on a LAN, so no ``Secure`` cookies):

* Server-side sessions in memory: the cookie ``thox_session`` carries only a
  random 256-bit id (HttpOnly, SameSite=Strict, Path=/). A new id is issued on
  sign-in and on password change (no session fixation); ids the server did not
  issue are ignored. Idle timeout 30 min, absolute 12 h; a password change
  (here or on the console) signs every other session out.
* Every POST needs the session's CSRF token (hidden field ``csrf`` or header
  ``X-CSRF-Token``, compared in constant time) and, when the browser sends
  one, an ``Origin`` matching the ``Host``; otherwise a 403 page.
* The pages answer only to the names the box has: its host name,
  ``<host name>.local`` (and avahi's ``<host name>-N.local`` after a name
  conflict), ``localhost``, any IP address literal, and the names in the
  config key ``api.web_hosts``. Any other ``Host`` gets 421 (400 when
  malformed), so a page on another site whose name an attacker re-points at
  the box (DNS rebinding) can neither read these pages nor post to them. An
  IP literal cannot be rebound: a page at ``http://192.168.1.50/`` has that
  address as its origin. The API (``/v1``, ``/health``, ``/metrics``) keeps
  answering any ``Host``: every ``/v1`` route needs the bearer key, which a
  rebinding page does not have, and API clients reach the box by names the
  box cannot know (tunnels, proxies, local DNS).
* Sign-in failures are counted per client address over a minute: after 5
  that address waits (429 with ``Retry-After``). During a storm (30 failures
  a minute from all addresses together) an address with any failure in the
  window waits as well, while an address with none may still try, so a storm
  from other addresses never locks the right password out. (Per address, not
  per IPv6 /64: the box is LAN-only, and a LAN's clients share one /64.)
  Password checks run one at a time, which bounds the guess rate overall.
* The API key appears only in the body of a page for a signed-in session
  (``Cache-Control: no-store``); never in a URL, a redirect or a log line.
  Rotation is a POST and calls ``Config.generate_api_key()``; the API
  re-reads the key file, so no restart is needed.
* Strict CSP (no inline script or style, nothing from other origins: the
  device is offline), ``X-Frame-Options: DENY``, ``Referrer-Policy: no-referrer``.
* Errors on these routes are small HTML pages, never a traceback.

``register(app)`` is all the app needs to call.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import math
import re
import secrets
import socket
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from quart import Blueprint, Quart, Response, current_app, g, redirect, render_template, request
from werkzeug.exceptions import HTTPException

from . import admin

log = logging.getLogger("thox.web")

COOKIE = "thox_session"
IDLE_TIMEOUT = 30 * 60
ABSOLUTE_TIMEOUT = 12 * 3600
MAX_SESSIONS = 2000
LOGIN_PER_CLIENT = 5       # failures per LOGIN_WINDOW per client address
LOGIN_STORM = 30           # failures per LOGIN_WINDOW from all clients together: a storm
LOGIN_MAX_CLIENTS = 10000  # client addresses tracked (the least recently failed dropped first)
LOGIN_WINDOW = 60.0

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")

blueprint = Blueprint("thox_web", __name__, template_folder="templates", static_folder="static",
                      static_url_path="/assets")


# --------------------------------------------------------------------------- state

@dataclass
class Session:
    sid: str
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    created: float = field(default_factory=time.monotonic)
    seen: float = field(default_factory=time.monotonic)
    signed_in: bool = False
    must_change: bool = False
    pw_gen: str = ""          # salt of the admin password this session signed in with
    flash: list[tuple[str, str]] = field(default_factory=list)


class Sessions:
    def __init__(self) -> None:
        self._by_id: dict[str, Session] = {}

    def _expired(self, s: Session, now: float) -> bool:
        return now - s.seen > IDLE_TIMEOUT or now - s.created > ABSOLUTE_TIMEOUT

    def get(self, sid: str | None) -> Session | None:
        if not sid or len(sid) > 128:
            return None
        s = self._by_id.get(sid)
        if s is None:
            return None
        now = time.monotonic()
        if self._expired(s, now):
            self._by_id.pop(sid, None)
            return None
        s.seen = now
        return s

    def new(self, **kw: Any) -> Session:
        now = time.monotonic()
        if len(self._by_id) >= MAX_SESSIONS:
            for sid, s in list(self._by_id.items()):
                if self._expired(s, now):
                    del self._by_id[sid]
            # still full: drop the least recently seen anonymous ones, then any
            if len(self._by_id) >= MAX_SESSIONS:
                victims = sorted(self._by_id.values(), key=lambda s: (s.signed_in, s.seen))
                for s in victims[: len(self._by_id) - MAX_SESSIONS + 1]:
                    del self._by_id[s.sid]
        s = Session(sid=secrets.token_urlsafe(32), **kw)
        self._by_id[s.sid] = s
        return s

    def drop(self, sid: str) -> None:
        self._by_id.pop(sid, None)

    def drop_all_signed_in(self) -> None:
        for sid in [sid for sid, s in self._by_id.items() if s.signed_in]:
            del self._by_id[sid]


def client_key(ip: str) -> str:
    """The address sign-in failures are counted under (IPv4-mapped IPv6 as IPv4)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


class LoginLimiter:
    """Sliding windows of sign-in failures, per client address and overall.

    An address waits once it has ``per_client`` failures in the window or,
    while failures overall reach ``storm``, once it has any. An address with
    no failure in the window may always try. An attempt counts as a failure
    from the start and is taken back when the password was right, so parallel
    attempts from one address get no more tries than sequential ones."""

    def __init__(self, per_client: int = LOGIN_PER_CLIENT, storm: int = LOGIN_STORM,
                 window: float = LOGIN_WINDOW, max_clients: int = LOGIN_MAX_CLIENTS) -> None:
        self.per_client, self.storm, self.window, self.max_clients = per_client, storm, window, max_clients
        self._clients: OrderedDict[str, deque[float]] = OrderedDict()
        self._failures: deque[float] = deque(maxlen=storm)   # the latest ones tell whether it storms

    def _trim(self, q: deque[float], now: float) -> None:
        while q and now - q[0] >= self.window:
            q.popleft()

    def retry_after(self, ip: str) -> int:
        """0 when ``ip`` may try now, else seconds to wait."""
        now = time.monotonic()
        key = client_key(ip)
        q = self._clients.get(key)
        if q is None:
            return 0
        self._trim(q, now)
        if not q:
            del self._clients[key]
            return 0
        self._trim(self._failures, now)
        if len(q) >= self.per_client:
            wait = q[-self.per_client] + self.window - now
        elif len(self._failures) >= self.storm:
            # until this client's failures age out or the storm dies down, whichever is first
            wait = min(q[-1], self._failures[0]) + self.window - now
        else:
            return 0
        return max(1, math.ceil(wait))

    def attempt(self, ip: str) -> float:
        """Count an attempt as a failure; returns the token ``succeeded`` takes back."""
        now = time.monotonic()
        key = client_key(ip)
        q = self._clients.pop(key, None) or deque()
        q.append(now)
        while len(q) > self.per_client:
            q.popleft()
        self._clients[key] = q            # the most recently failed last
        while len(self._clients) > self.max_clients:
            self._clients.popitem(last=False)
        self._failures.append(now)
        self._trim(self._failures, now)
        return now

    def succeeded(self, ip: str, token: float) -> None:
        """The attempt ``token`` had the right password: it is no failure."""
        q = self._clients.get(client_key(ip))
        for seen in (q, self._failures):
            if seen is not None and token in seen:
                seen.remove(token)


class WebState:
    def __init__(self) -> None:
        self.sessions = Sessions()
        self.limiter = LoginLimiter()
        self.hash_lock = asyncio.Lock()   # one scrypt at a time: bounded CPU and memory


def _state() -> WebState:
    return current_app.extensions["thox_web"]


def _ctx() -> dict[str, Any]:
    return current_app.extensions["thox"]


def _cfg():
    return _ctx()["config"]


def _client_ip() -> str:
    return request.remote_addr or "unknown"


async def _slow(fn, *args):
    """Run a scrypt call off the event loop, one at a time."""
    async with _state().hash_lock:
        return await asyncio.to_thread(fn, *args)


# --------------------------------------------------------------------------- pages helpers

_HOST_RE = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9-]{1,63})*\.?|\[[0-9A-Fa-f:.]+\])"
                      r"(?::(\d{1,5}))?$")


def request_host() -> tuple[str, int | None] | None:
    """(host, port) from the ``Host`` header (an IPv6 literal keeps its
    brackets); None when it is missing or malformed."""
    raw = request.headers.get("Host", "")
    m = _HOST_RE.match(raw) if len(raw) <= 260 else None
    if not m:
        return None
    if m.group(1):
        return raw[: m.start(1) - 1], int(m.group(1))
    return raw, None


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host[1:-1] if host.startswith("[") else host)
    except ValueError:
        return False
    return True


def known_host(host: str) -> bool:
    """Whether ``host`` is a name (or an address) this box answers to."""
    name = host.lower().rstrip(".")
    if _is_ip_literal(name) or name in ("localhost", "localhost.localdomain"):
        return True
    own = socket.gethostname().lower().rstrip(".")
    short = own.split(".", 1)[0]
    if name in (own, short) or re.fullmatch(rf"{re.escape(short)}(?:-\d+)?\.local", name):
        return True
    return name in str(_cfg().get("api.web_hosts") or "").split(",")


def api_base_url() -> str:
    """``http://<host>:<api port>/v1`` for the host the browser used. A page
    served on the extra web port (80) still points at the API port."""
    cfg = _cfg()
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


def _fmt_bytes(n: Any) -> str:
    if n is None:
        return "?"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _fmt_eta(s: Any) -> str:
    if s is None:
        return ""
    s = int(s)
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s}s"


def status_data() -> dict[str, Any]:
    c = _ctx()
    try:
        models = c["manager"].status()
    except Exception:  # noqa: BLE001 - the page must render even if the engine is unhappy
        log.exception("web: model status failed")
        models = []
    try:
        from ..store.pull import pull_status
        pulls = pull_status(c["store"])
    except Exception:  # noqa: BLE001
        log.exception("web: pull status failed")
        pulls = []
    for m in models:
        m["size_text"] = _fmt_bytes(m.get("size"))
        m["state"] = ("broken" if m.get("broken") else "loading" if m.get("loading")
                      else "loaded" if m.get("loaded") else "on disk")
    for p in pulls:
        total, done = p.get("total"), p.get("done") or 0
        p["percent"] = round(100.0 * done / total, 1) if total else None
        p["done_text"], p["total_text"] = _fmt_bytes(done), _fmt_bytes(total)
        p["rate_text"] = _fmt_bytes(p.get("rate") or 0) + "/s"
        p["eta_text"] = _fmt_eta(p.get("eta"))
        p["state"] = "downloading" if p.get("active") else "interrupted (run the pull again to resume)"
        p.pop("url", None)    # mirror URLs may carry tokens; the page does not need them
    started = c.get("started") or time.time()
    return {
        "status": "ok",
        "version": c["version"],
        "uptime": int(time.time() - started),
        "models": models,
        "loaded": [m["id"] for m in models if m.get("loaded")],
        "queue": sum(int(m.get("queue") or 0) for m in models),
        "pulls": pulls,
    }


def _default_model(models: list[dict]) -> str:
    try:
        name = str(_cfg().get("default_model") or "")
    except Exception:  # noqa: BLE001
        name = ""
    ids = [m["id"] for m in models if m.get("kind", "chat") != "embedding"]
    if name and (name in ids or not ids):
        return name
    return ids[0] if ids else (name or "thox-demo")


def snippets(base_url: str, model: str) -> list[dict[str, str]]:
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


def _flash(kind: str, text: str) -> None:
    s = g.get("web_session")
    if s is not None:
        s.flash.append((kind, text))


async def _page(template: str, status: int = 200, **kw: Any) -> Response:
    s: Session | None = g.get("web_session")
    messages = list(s.flash) if s else []
    if s:
        s.flash.clear()
    html = await render_template(f"thox_web/{template}", session=s, messages=messages,
                                 version=_ctx()["version"], password_file=str(admin.password_file(_cfg())),
                                 **kw)
    return Response(html, status=status, content_type="text/html; charset=utf-8")


async def _error_page(status: int, title: str, message: str, headers: dict[str, str] | None = None) -> Response:
    try:
        resp = await _page("error.html", status=status, title=title, message=message)
    except Exception:  # noqa: BLE001 - last resort: plain text, still no traceback
        log.exception("web: error page failed")
        resp = Response(f"{status} {title}\n", status=status, content_type="text/plain; charset=utf-8")
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def _new_session(**kw: Any) -> Session:
    s = _state().sessions.new(**kw)
    g.web_session = s
    g.web_cookie = s.sid
    return s


def _current_gen() -> str:
    data = admin.load(_cfg())
    return str(data["password"].get("salt", "")) if data else ""


# --------------------------------------------------------------------------- hooks

@blueprint.before_request
async def _check_host():
    """Only the box's own names reach these pages (the DNS rebinding guard)."""
    if "Host" not in request.headers:
        return None        # HTTP/1.0 without a Host header: not a browser
    parsed = None if request.scope.get(BAD_HOST) else request_host()
    if parsed is None:
        await request.get_data()
        return await _error_page(400, "Bad request", "The Host header of this request is not valid.")
    if not known_host(parsed[0]):
        await request.get_data()     # read the body, so the connection can carry the next request
        log.warning("web: request for a host name this device does not have, from %s", _client_ip())
        return await _error_page(
            421, "Misdirected request",
            "This device does not answer to that name. Open it by its own name (such as thox.local) or its "
            "IP address; `thox config set api.web_hosts NAME` adds a name.")
    return None


@blueprint.before_request
async def _load_session():
    st = _state()
    presented = request.cookies.get(COOKIE)
    s = st.sessions.get(presented)
    if presented and s is None:
        g.web_cookie = ""     # expired or never ours: tell the browser to forget it
    if s is not None and s.signed_in and s.pw_gen != _current_gen():
        # the password changed elsewhere (console reset, another browser): sign out
        st.sessions.drop(s.sid)
        s = None
        g.web_cookie = ""
    g.web_session = s
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        origin = request.headers.get("Origin")
        if origin and origin != "null":
            if origin.split("://", 1)[-1].rstrip("/").lower() != request.headers.get("Host", "").lower():
                log.warning("web: cross-origin POST refused from %s", _client_ip())
                return await _error_page(403, "Forbidden", "This form was sent from another web site.")
        form = await request.form
        token = form.get("csrf") or request.headers.get("X-CSRF-Token") or ""
        if s is None or not hmac.compare_digest(token.encode(), s.csrf.encode()):
            log.warning("web: POST %s without a valid CSRF token from %s", request.path, _client_ip())
            return await _error_page(
                403, "Forbidden",
                "Your session has expired or this form is out of date. Reload the page and try again.")
    if s is not None and s.signed_in and s.must_change and request.endpoint not in (
            "thox_web.password", "thox_web.password_post", "thox_web.logout", "thox_web.static",
            "thox_web.status_json"):
        return redirect("/password", 303)
    return None


@blueprint.after_request
async def _headers(resp: Response) -> Response:
    cookie = g.get("web_cookie")
    if cookie:
        resp.set_cookie(COOKIE, cookie, httponly=True, samesite="Strict", path="/")
    elif cookie == "":
        resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="Strict")
    if request.endpoint != "thox_web.static":
        resp.headers["Cache-Control"] = "no-store"
    resp.headers["Content-Security-Policy"] = CSP
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "no-referrer"
    return resp


@blueprint.errorhandler(HTTPException)
async def _http_error(e: HTTPException):
    status = e.code or 500
    titles = {400: "Bad request", 403: "Forbidden", 404: "Not found", 405: "Method not allowed",
              413: "Request too large", 421: "Misdirected request", 429: "Too many requests"}
    return await _error_page(status, titles.get(status, e.name), e.description or e.name)


@blueprint.errorhandler(Exception)
async def _unexpected(e: Exception):
    log.exception("web: internal error on %s %s", request.method, request.path)
    return await _error_page(500, "Something went wrong",
                             "The device could not show this page. Details are in the device log.")


# --------------------------------------------------------------------------- routes

@blueprint.get("/")
async def index():
    s: Session | None = g.web_session
    data = status_data()
    base = api_base_url()
    api_key = None
    if s is not None and s.signed_in and not s.must_change:
        api_key = _cfg().api_key()
    return await _page("index.html", status_info=data, base_url=base,
                       snippets=snippets(base, _default_model(data["models"])), api_key=api_key)


@blueprint.get("/status.json")
async def status_json():
    resp = Response(current_app.json.dumps(status_data()), content_type="application/json")
    return resp


@blueprint.get("/login")
async def login():
    s: Session | None = g.web_session
    if s is not None and s.signed_in:
        return redirect("/", 303)
    if s is None:
        s = _new_session()
    first = admin.password_file(_cfg()).exists()
    error = None
    if admin.load(_cfg()) is None:
        error = "No admin password is set on this device yet: run `thox firstboot` on the device as root."
    return await _page("login.html", first_boot=first, error=error)


@blueprint.post("/login")
async def login_post():
    st, cfg, ip = _state(), _cfg(), _client_ip()
    wait = st.limiter.retry_after(ip)
    if wait:
        log.warning("web: sign-in rate limit for %s (retry in %ss)", ip, wait)
        return await _error_page(429, "Too many sign-in attempts",
                                 f"Wait {wait} seconds before trying again.", {"Retry-After": str(wait)})
    token = st.limiter.attempt(ip)
    form = await request.form
    password = form.get("password", "")
    ok = await _slow(admin.check_password, cfg, password)
    if not ok:
        log.warning("web: failed sign-in from %s", ip)
        return await _page("login.html", status=401, first_boot=admin.password_file(cfg).exists(),
                           error="That password is not right.")
    st.limiter.succeeded(ip, token)
    # a fresh session id: whatever id the browser had before is now worthless
    old = g.web_session
    if old is not None:
        st.sessions.drop(old.sid)
    data = admin.load(cfg) or {}
    must = bool(data.get("must_change"))
    _new_session(signed_in=True, must_change=must, pw_gen=str(data.get("password", {}).get("salt", "")))
    log.info("web: signed in from %s", ip)
    if must:
        return redirect("/password", 303)
    return redirect("/", 303)


@blueprint.get("/password")
async def password():
    s: Session | None = g.web_session
    if s is None or not s.signed_in:
        return redirect("/login", 303)
    return await _page("password.html", must_change=s.must_change, error=None)


@blueprint.post("/password")
async def password_post():
    st, cfg, ip = _state(), _cfg(), _client_ip()
    s: Session = g.web_session
    if not s.signed_in:
        return redirect("/login", 303)
    form = await request.form
    new, confirm = form.get("new_password", ""), form.get("confirm_password", "")
    current = None
    if not s.must_change:
        wait = st.limiter.retry_after(ip)
        if wait:
            return await _error_page(429, "Too many attempts", f"Wait {wait} seconds before trying again.",
                                     {"Retry-After": str(wait)})
        token = st.limiter.attempt(ip)
        current = form.get("current_password", "")
        if not await _slow(admin.check_password, cfg, current):
            log.warning("web: wrong current password on change from %s", ip)
            return await _page("password.html", status=400, must_change=False,
                               error="The current password is not right.")
        st.limiter.succeeded(ip, token)
    try:
        admin.check_policy(new, confirm, current)
        if s.must_change and await _slow(admin.check_password, cfg, new):
            raise admin.PasswordPolicyError("Choose a password different from the one printed at first boot.")
    except admin.PasswordPolicyError as e:
        return await _page("password.html", status=400, must_change=s.must_change, error=str(e))
    await _slow(admin.set_password, cfg, new)
    st.sessions.drop_all_signed_in()
    st.sessions.drop(s.sid)
    _new_session(signed_in=True, pw_gen=_current_gen())
    _flash("ok", "Password changed. Other browsers have been signed out.")
    log.info("web: admin password changed from %s", ip)
    return redirect("/", 303)


@blueprint.post("/logout")
async def logout():
    s: Session | None = g.web_session
    if s is not None:
        _state().sessions.drop(s.sid)
    g.web_session = None
    g.web_cookie = ""
    return redirect("/", 303)


@blueprint.get("/logout")
async def logout_get():
    return redirect("/", 303)


@blueprint.post("/key/rotate")
async def rotate_key():
    s: Session = g.web_session
    if not s.signed_in:
        return await _error_page(403, "Sign in first", "Sign in with the admin password to rotate the API key.")
    _cfg().generate_api_key()
    log.info("web: API key rotated from %s", _client_ip())
    _flash("ok", "A new API key is active. The old key no longer works: update your apps.")
    return redirect("/#api-key", 303)


@blueprint.get("/key/rotate")
async def rotate_key_get():
    return redirect("/#api-key", 303)


BAD_HOST = "thox.bad_host"     # ASGI scope flag: the request's Host header was unusable


def _guard_host_header(asgi_app):
    """Werkzeug cannot build a request context for a Host it cannot IDNA-encode
    (an empty or over-long label) and the request would end in a 500 before any
    handler runs. Such a Host is replaced by ``invalid`` and the request flagged:
    the web pages answer 400, the API (which ignores Host) answers as usual."""
    async def guarded(scope, receive, send):
        if scope.get("type") == "http":
            headers = scope.get("headers") or []
            host = next((v for k, v in headers if k.lower() == b"host"), None)
            if host is not None:
                try:
                    host.decode("latin-1").lower().encode("idna")
                except UnicodeError:
                    headers = [(k, v) for k, v in headers if k.lower() != b"host"] + [(b"host", b"invalid")]
                    scope = {**scope, "headers": headers, BAD_HOST: True}
        await asgi_app(scope, receive, send)
    return guarded


def register(app: Quart) -> None:
    """Mount the web page on ``app`` (the API's Quart app)."""
    app.extensions["thox_web"] = WebState()
    app.register_blueprint(blueprint)
    app.asgi_app = _guard_host_header(app.asgi_app)
