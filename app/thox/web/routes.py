"""The web pages' blueprint: request hooks (Host check, session, Origin and
CSRF checks, security headers), HTML error pages, and the routes: ``/``,
``/status.json``, sign-in and sign-out, password change and key rotation
(the firmware routes are in ``firmware``)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any, TypeVar

from quart import Blueprint, Response, current_app, g, redirect, request
from werkzeug.exceptions import HTTPException

from . import admin
from .firmware_view import firmware_view
from .security import BAD_HOST, csrf_ok, known_host, origin_ok, set_security_headers
from .sessions import (COOKIE, Session, client_ip, config, current_session, end_session, flash,
                       password_generation, start_session, web_state)
from .views import api_base_url, default_model, error_page, page, request_host, snippets, status_data

log = logging.getLogger("thox.web")

blueprint = Blueprint("thox_web", __name__, template_folder="templates", static_folder="static",
                      static_url_path="/assets")

# POSTs whose body the view streams (an update bundle): the view checks the CSRF token
STREAMED_ENDPOINTS = ("thox_web.update_upload",)

# what a signed-in session that must change its password may still reach
MUST_CHANGE_ENDPOINTS = ("thox_web.password", "thox_web.password_post", "thox_web.logout", "thox_web.static",
                         "thox_web.status_json")

T = TypeVar("T")


async def _hashing(fn: Callable[..., T], *args: Any) -> T:
    """Run a password (scrypt) call off the event loop, one at a time."""
    async with web_state().hash_lock:
        return await asyncio.to_thread(fn, *args)


async def _too_many(title: str, wait: int) -> Response:
    return await error_page(429, title, f"Wait {wait} seconds before trying again.", {"Retry-After": str(wait)})


# --------------------------------------------------------------------------- hooks

@blueprint.before_request
async def _check_host():
    """Only the box's own names reach these pages (the DNS rebinding guard)."""
    if "Host" not in request.headers:
        return None        # HTTP/1.0 without a Host header: not a browser
    parsed = None if request.scope.get(BAD_HOST) else request_host()
    if parsed is None:
        await request.get_data()
        return await error_page(400, "Bad request", "The Host header of this request is not valid.")
    if not known_host(parsed[0], socket.gethostname(), lambda: str(config().get("api.web_hosts") or "")):
        await request.get_data()     # read the body, so the connection can carry the next request
        log.warning("web: request for a host name this device does not have, from %s", client_ip())
        return await error_page(
            421, "Misdirected request",
            "This device does not answer to that name. Open it by its own name (such as thox.local) or its "
            "IP address; `thox config set api.web_hosts NAME` adds a name.")
    return None


@blueprint.before_request
async def _load_session():
    """Find the request's session; on a POST, check Origin and the CSRF token."""
    presented = request.cookies.get(COOKIE)
    s = g.web_session = web_state().sessions.get(presented)
    if presented and s is None:
        g.web_cookie = ""     # expired or never ours: tell the browser to forget it
    if s is not None and s.signed_in and s.pw_gen != password_generation():
        end_session()         # the password changed elsewhere (console reset, another browser)
        s = None
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        if not origin_ok(request.headers.get("Origin"), request.headers.get("Host", "")):
            log.warning("web: cross-origin POST refused from %s", client_ip())
            return await error_page(403, "Forbidden", "This form was sent from another web site.")
        if request.endpoint in STREAMED_ENDPOINTS:
            return None       # the view reads the body itself and checks the CSRF token first
        form = await request.form
        token = form.get("csrf") or request.headers.get("X-CSRF-Token") or ""
        if s is None or not csrf_ok(token, s.csrf):
            log.warning("web: POST %s without a valid CSRF token from %s", request.path, client_ip())
            return await error_page(
                403, "Forbidden",
                "Your session has expired or this form is out of date. Reload the page and try again.")
    if s is not None and s.signed_in and s.must_change and request.endpoint not in MUST_CHANGE_ENDPOINTS:
        return redirect("/password", 303)
    return None


@blueprint.after_request
async def _headers(resp: Response) -> Response:
    cookie = g.get("web_cookie")
    if cookie:
        resp.set_cookie(COOKIE, cookie, httponly=True, samesite="Strict", path="/")
    elif cookie == "":
        resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="Strict")
    set_security_headers(resp.headers, static=request.endpoint == "thox_web.static")
    return resp


@blueprint.errorhandler(HTTPException)
async def _http_error(e: HTTPException):
    status = e.code or 500
    titles = {400: "Bad request", 403: "Forbidden", 404: "Not found", 405: "Method not allowed",
              413: "Request too large", 421: "Misdirected request", 429: "Too many requests"}
    return await error_page(status, titles.get(status, e.name), e.description or e.name)


@blueprint.errorhandler(Exception)
async def _unexpected(e: Exception):
    log.exception("web: internal error on %s %s", request.method, request.path)
    return await error_page(500, "Something went wrong",
                            "The device could not show this page. Details are in the device log.")


# --------------------------------------------------------------------------- routes

@blueprint.get("/")
async def index():
    s = current_session()
    data = status_data()
    base = api_base_url()
    api_key = firmware = None
    if s is not None and s.signed_in and not s.must_change:
        api_key = config().api_key()
        firmware = await firmware_view()
    return await page("index.html", status_info=data, base_url=base,
                      snippets=snippets(base, default_model(data["models"])), api_key=api_key, firmware=firmware)


@blueprint.get("/status.json")
async def status_json():
    return Response(current_app.json.dumps(status_data()), content_type="application/json")


@blueprint.get("/login")
async def login():
    s = current_session()
    if s is not None and s.signed_in:
        return redirect("/", 303)
    if s is None:
        start_session()
    first = admin.password_file(config()).exists()
    error = None
    if admin.load(config()) is None:
        error = "No admin password is set on this device yet: run `thox firstboot` on the device as root."
    return await page("login.html", first_boot=first, error=error)


@blueprint.post("/login")
async def login_post():
    st, cfg, ip = web_state(), config(), client_ip()
    wait = st.limiter.retry_after(ip)
    if wait:
        log.warning("web: sign-in rate limit for %s (retry in %ss)", ip, wait)
        return await _too_many("Too many sign-in attempts", wait)
    token = st.limiter.attempt(ip)
    form = await request.form
    password = form.get("password", "")
    ok = await _hashing(admin.check_password, cfg, password)
    if not ok:
        log.warning("web: failed sign-in from %s", ip)
        return await page("login.html", status=401, first_boot=admin.password_file(cfg).exists(),
                          error="That password is not right.")
    st.limiter.succeeded(ip, token)
    # a fresh session id: whatever id the browser had before is now worthless
    old = current_session()
    if old is not None:
        st.sessions.drop(old.sid)
    data = admin.load(cfg) or {}
    must = bool(data.get("must_change"))
    start_session(signed_in=True, must_change=must, pw_gen=str(data.get("password", {}).get("salt", "")))
    log.info("web: signed in from %s", ip)
    if must:
        return redirect("/password", 303)
    return redirect("/", 303)


@blueprint.get("/password")
async def password():
    s = current_session()
    if s is None or not s.signed_in:
        return redirect("/login", 303)
    return await page("password.html", must_change=s.must_change, error=None)


@blueprint.post("/password")
async def password_post():
    st, cfg, ip = web_state(), config(), client_ip()
    s: Session = g.web_session      # a POST got past the CSRF check: it has a session
    if not s.signed_in:
        return redirect("/login", 303)
    form = await request.form
    new, confirm = form.get("new_password", ""), form.get("confirm_password", "")
    current = None
    if not s.must_change:
        wait = st.limiter.retry_after(ip)
        if wait:
            return await _too_many("Too many attempts", wait)
        token = st.limiter.attempt(ip)
        current = form.get("current_password", "")
        if not await _hashing(admin.check_password, cfg, current):
            log.warning("web: wrong current password on change from %s", ip)
            return await page("password.html", status=400, must_change=False,
                              error="The current password is not right.")
        st.limiter.succeeded(ip, token)
    try:
        admin.check_policy(new, confirm, current)
        if s.must_change and await _hashing(admin.check_password, cfg, new):
            raise admin.PasswordPolicyError("Choose a password different from the one printed at first boot.")
    except admin.PasswordPolicyError as e:
        return await page("password.html", status=400, must_change=s.must_change, error=str(e))
    await _hashing(admin.set_password, cfg, new)
    st.sessions.drop_all_signed_in()
    st.sessions.drop(s.sid)
    start_session(signed_in=True, pw_gen=password_generation())
    flash("ok", "Password changed. Other browsers have been signed out.")
    log.info("web: admin password changed from %s", ip)
    return redirect("/", 303)


@blueprint.post("/logout")
async def logout():
    end_session()
    return redirect("/", 303)


@blueprint.get("/logout")
async def logout_get():
    return redirect("/", 303)


@blueprint.post("/key/rotate")
async def rotate_key():
    s: Session = g.web_session      # a POST got past the CSRF check: it has a session
    if not s.signed_in:
        return await error_page(403, "Sign in first", "Sign in with the admin password to rotate the API key.")
    config().generate_api_key()
    log.info("web: API key rotated from %s", client_ip())
    flash("ok", "A new API key is active. The old key no longer works: update your apps.")
    return redirect("/#api-key", 303)


@blueprint.get("/key/rotate")
async def rotate_key_get():
    return redirect("/#api-key", 303)
