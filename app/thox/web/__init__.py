"""The device's web page (``/`` on the API port and on ``api.web_port``).

What it shows: device status, installed models with pull progress,
copy-paste SDK snippets with this device's base URL, and, after sign-in with
the device admin password, the API key with copy and rotate buttons.

Security model (plain HTTP on a LAN, so no ``Secure`` cookies):

* Server-side sessions in memory (``sessions``): the cookie ``thox_session``
  carries only a random 256-bit id (HttpOnly, SameSite=Strict, Path=/). A new
  id is issued on sign-in and on password change (no session fixation); ids
  the server did not issue are ignored. Idle timeout 30 min, absolute 12 h; a
  password change (here or on the console) signs every other session out.
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

Modules: ``security`` (Host check, CSRF and Origin, headers, sign-in
limiter), ``sessions`` (session store, per-app web state), ``views`` (page
data and rendering), ``routes`` (the blueprint: hooks and routes), ``admin``
(the admin password), ``firmware`` (versions, bundle upload and install,
reboot request). ``register(app)`` is all the app needs to call.
"""

from __future__ import annotations

from quart import Quart

from .routes import blueprint
from .security import guard_host_header
from .sessions import WebState


def register(app: Quart) -> None:
    """Mount the web pages on ``app`` (the API's Quart app), with the Host
    header guard in front of the whole app."""
    from . import firmware     # adds the firmware routes to the blueprint
    app.extensions["thox_web"] = WebState()
    app.request_class = firmware.upload_request_class(app.request_class)
    app.register_blueprint(blueprint)
    app.asgi_app = guard_host_header(app.asgi_app)
