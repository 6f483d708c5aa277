"""The device web page: real `thox serve` processes on loopback, driven over
HTTP with httpx and in a real browser (Debian's chromium via the npm package
playwright-core, `make web-deps`). The pure parts (limiter, Host matching,
CSRF helpers, session store) have unit tests in tests/unit/web.

Three servers, each with its own THOX_HOME made by `thox firstboot`:
``web`` for the HTTP-level sign-in/CSRF/rotation tests (run in file order),
``limited`` for sign-in rate limiting (it ends up globally locked) and error
pages, ``browsed`` for the browser walk-through.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import stat
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from thoxtest import ROOT, Server, free_port, run_thox

WEB_DIR = ROOT / "tests" / "web"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
NEW_PASSWORD = "correct horse battery staple"
COOKIE = "thox_session"

pytestmark = pytest.mark.timeout(300)


# --------------------------------------------------------------------------- helpers

def firstboot_home(tmp_path_factory, models_dir: Path, name: str) -> tuple[Path, str]:
    """A THOX_HOME after `thox firstboot`, with one model and two pulls (one
    running, one interrupted). Returns (home, the printed admin password)."""
    home = tmp_path_factory.mktemp(name)
    out = run_thox(home, "firstboot").stdout
    password = (home / "admin-password.txt").read_text().strip()
    assert password in out, "firstboot prints the one-time password on the console"
    run_thox(home, "models", "import", str(models_dir / "tiny.gguf"), "--id", "tiny")
    partial = home / "models" / ".partial"
    partial.mkdir(parents=True)
    for model, total, done, rate, eta in (("thox-coder-7b", 4_683_073_504, 1_234_567_890, 11_500_000, 300),
                                          ("thox-embed", 84_106_624, 0, 0, None)):
        part = partial / f"{model}.gguf.part"
        with open(part, "wb") as f:
            f.truncate(done or 31_457_280)   # sparse: costs no disk
        (partial / f"{model}.json").write_text(json.dumps({
            "url": f"https://mirror.example/{model}.gguf?token=SECRET", "total": total, "done": done,
            "rate": rate, "eta": eta, "updated": 0}))
    return home, password


def hold_pull_lock(home: Path, model: str):
    """Hold the pull lock like a running `thox models pull` (so it shows as active)."""
    locks = home / "models" / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    fd = os.open(locks / f"{model}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def client(server: Server, source: str = "127.0.0.1", **kw) -> httpx.Client:
    """A browser-like client (cookie jar, no auto-redirects) from a loopback source address."""
    return httpx.Client(base_url=server.url, timeout=30, follow_redirects=False,
                        transport=httpx.HTTPTransport(local_address=source), **kw)


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, "page has a CSRF field"
    return m.group(1)


def sign_in(c: httpx.Client, password: str) -> httpx.Response:
    page = c.get("/login")
    assert page.status_code == 200, page.text
    return c.post("/login", data={"password": password, "csrf": csrf_of(page.text)})


def shown_key(html: str) -> str | None:
    m = re.search(r'id="key"[^>]*>([0-9a-f]{64})<', html)
    return m.group(1) if m else None


def set_cookie_header(resp: httpx.Response) -> str:
    headers = [v for k, v in resp.headers.multi_items() if k.lower() == "set-cookie" and v.startswith(COOKIE + "=")]
    assert headers, f"no {COOKIE} cookie set: {resp.headers}"
    return headers[-1]


def api_status(server: Server, key: str) -> int:
    return httpx.get(server.base_url + "/models", headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code


def assert_no_secrets_in_log(server: Server, secrets: list[str]) -> None:
    log = server.logs()
    assert "Traceback" not in log
    for s in secrets:
        assert s and s not in log, "a secret reached the server log"


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def web(tmp_path_factory, models_dir):
    home, password = firstboot_home(tmp_path_factory, models_dir, "web")
    web_port = free_port()
    fd = hold_pull_lock(home, "thox-coder-7b")
    s = Server(home, api__web_port=str(web_port), api__web_hosts="thox.local, Thox.Example.LAN")
    s.web_port = web_port
    s.first_password = password
    s.secrets = [password, s.key]
    if httpx.get(s.url + "/", timeout=10).status_code == 404:
        s.stop()
        pytest.fail("the web page is not mounted: create_app must call thox.web.register(app)")
    yield s
    s.stop()
    os.close(fd)


@pytest.fixture(scope="module")
def limited(tmp_path_factory, models_dir):
    home, password = firstboot_home(tmp_path_factory, models_dir, "web-limited")
    s = Server(home)
    s.first_password = password
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browsed(tmp_path_factory, models_dir):
    home, password = firstboot_home(tmp_path_factory, models_dir, "web-browser")
    fd = hold_pull_lock(home, "thox-coder-7b")
    s = Server(home)
    s.first_password = password
    yield s
    s.stop()
    os.close(fd)


# --------------------------------------------------------------------------- first boot

def test_firstboot_admin_password(web):
    home = web.home
    pw_file, admin_file = home / "admin-password.txt", home / "admin.json"
    for p in (pw_file, admin_file):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert re.fullmatch(r"[2-9a-hjkmnp-z]{5}(-[2-9a-hjkmnp-z]{5}){3}", web.first_password)
    data = json.loads(admin_file.read_text())
    assert web.first_password not in admin_file.read_text()
    assert data["must_change"] is True
    h = data["password"]
    assert h["algorithm"] == "scrypt" and h["n"] >= 1 << 15 and h["r"] >= 8 and len(bytes.fromhex(h["salt"])) >= 16
    # idempotent: a second firstboot changes nothing and prints no password
    before = admin_file.read_bytes()
    out = run_thox(home, "firstboot").stdout
    assert web.first_password not in out and admin_file.read_bytes() == before


# --------------------------------------------------------------------------- public page

def test_index_public(web):
    with client(web) as c:
        r = c.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "Thox" in html and ">ok<" in html
    assert f"http://127.0.0.1:{web.port}/v1" in html          # base URL from the Host header
    assert ">tiny<" in html                                    # installed model
    assert "thox-coder-7b" in html and "downloading" in html   # running pull with progress
    assert "1.1 GiB of 4.4 GiB" in html and "11.0 MiB/s" in html and "5m00s left" in html
    assert "thox-embed" in html and "interrupted" in html
    assert "SECRET" not in html                                # pull URLs are not shown
    for lang in ("from openai import OpenAI", "import OpenAI from", "curl http://127.0.0.1"):
        assert lang in html
    assert web.key not in html and 'id="key"' not in html     # no key without sign-in
    # offline device: nothing is loaded from another origin
    assert not re.search(r'(src|href)="(https?:)?//', html)
    h = r.headers
    assert h["cache-control"] == "no-store" and h["x-frame-options"] == "DENY"
    assert "script-src 'self'" in h["content-security-policy"] and "unsafe-inline" not in h["content-security-policy"]
    assert h["referrer-policy"] == "no-referrer" and h["x-content-type-options"] == "nosniff"
    assert "set-cookie" not in h                               # browsing needs no session
    for asset in ("/assets/thox.css", "/assets/thox.js"):
        assert httpx.get(web.url + asset, timeout=10).status_code == 200


def test_status_json(web):
    r = httpx.get(web.url + "/status.json", timeout=10)
    assert r.status_code == 200
    s = r.json()
    assert s["status"] == "ok" and s["version"] and [m["id"] for m in s["models"]] == ["tiny"]
    pulls = {p["model"]: p for p in s["pulls"]}
    assert pulls["thox-coder-7b"]["active"] and pulls["thox-coder-7b"]["percent"] == pytest.approx(26.4, abs=0.1)
    assert not pulls["thox-embed"]["active"]
    assert web.key not in r.text and "SECRET" not in r.text


def test_base_url_follows_host_header_and_web_port(web):
    r = httpx.get(web.url + "/", headers={"Host": "thox.local"}, timeout=10)
    assert "http://thox.local:%d/v1" % web.port in r.text
    r = httpx.get(web.url + "/", headers={"Host": "192.168.1.50:%d" % web.port}, timeout=10)
    assert "http://192.168.1.50:%d/v1" % web.port in r.text
    # the page on the extra web port (80 on the device) points at the API port
    r = httpx.get(f"http://127.0.0.1:{web.web_port}/", headers={"Host": "thox.local"}, timeout=10)
    assert r.status_code == 200 and "http://thox.local:8080/v1" in r.text
    # a hostile Host header is refused, not reflected
    r = httpx.get(web.url + "/", headers={"Host": 'x"><script>alert(1)</script>'}, timeout=10)
    assert r.status_code == 400 and "<script>alert" not in r.text


def test_pages_answer_only_to_the_box_s_names(web):
    """DNS rebinding: a page on evil.example whose name now points at the box
    sends `Host: evil.example`; the web pages refuse it, the API (key needed) does not."""
    own = socket.gethostname().lower()
    short = own.split(".", 1)[0]
    for host in ("localhost", f"localhost:{web.port}", "LOCALHOST.", "127.0.0.1", f"127.0.0.1:{web.port}",
                 "192.168.1.50", "[::1]", f"[fe80::1]:{web.port}", "[2001:db8:1::1]", own, f"{short}.local",
                 f"{short}-2.local:{web.port}", "thox.local", "thox.example.lan"):
        r = httpx.get(web.url + "/", headers={"Host": host}, timeout=10)
        assert r.status_code == 200, host
    with client(web, source="127.0.0.7") as c:
        token = csrf_of(c.get("/login").text)
        for host in ("evil.example", f"evil.example:{web.port}", "thox.local.evil.example", "localhost.evil",
                     f"{short}x.local", "127.0.0.1.nip.io", "thox.localhost"):
            for method, path in (("GET", "/"), ("GET", "/status.json"), ("GET", "/login"),
                                 ("GET", "/assets/thox.js"), ("POST", "/key/rotate"), ("POST", "/login")):
                r = c.request(method, path, headers={"Host": host},
                              data={"csrf": token, "password": web.first_password} if method == "POST" else None)
                assert r.status_code == 421, (host, method, path, r.status_code)
                assert r.headers["content-type"].startswith("text/html") and web.key not in r.text
                assert "does not answer to that name" in r.text and "evil" not in r.text
        for host in ("", "a b", "thox.local:99999x", "[::1", "x" * 300, "x" * 70 + ".local", "a..b"):
            r = httpx.get(web.url + "/", headers={"Host": host}, timeout=10)
            assert r.status_code == 400 and "Traceback" not in r.text, repr(host)
            # a Host the web framework cannot even parse is no 500 for the API
            r = httpx.get(web.base_url + "/models", headers={**web.headers, "Host": host}, timeout=10)
            assert r.status_code == 200, repr(host)
    # the API answers any Host: it needs the key, which a rebinding page has not got
    for host in ("evil.example", "api.internal.example:8443"):
        r = httpx.get(web.base_url + "/models", headers={**web.headers, "Host": host}, timeout=10)
        assert r.status_code == 200, host
        assert httpx.get(web.base_url + "/models", headers={"Host": host}, timeout=10).status_code == 401
        assert httpx.get(web.url + "/health", headers={"Host": host}, timeout=10).status_code == 200
    # extra names are checked when set; a bad one is a one-line CLI error
    bad = run_thox(web.home, "config", "set", "api.web_hosts", "thox.local, evil_name!", check=False)
    assert bad.returncode != 0 and bad.stderr.startswith("thox: error:") and len(bad.stderr.strip().splitlines()) == 1
    assert run_thox(web.home, "config", "get", "api.web_hosts").stdout.strip().strip('"') == "thox.local,thox.example.lan"


def test_unknown_and_api_paths_unchanged(web):
    assert httpx.get(web.url + "/v1/models", timeout=10).status_code == 401   # the API still needs the key
    assert api_status(web, web.key) == 200
    assert httpx.get(web.url + "/health", timeout=10).json()["status"] == "ok"


# --------------------------------------------------------------------------- sessions, CSRF

def test_session_cookie_flags(web):
    with client(web) as c:
        r = c.get("/login")
    assert r.status_code == 200
    cookie = set_cookie_header(r)
    parts = [p.strip().lower() for p in cookie.split(";")]
    value = cookie.split(";", 1)[0].split("=", 1)[1]
    assert len(value) >= 40
    assert "httponly" in parts and "samesite=strict" in parts and "path=/" in parts
    assert not any(p.startswith("domain=") for p in parts)
    assert not any(p.startswith(("expires=", "max-age=")) for p in parts)   # a browser-session cookie


def test_csrf_required_on_every_post(web):
    with client(web, source="127.0.0.2") as c:
        # no session at all
        for path in ("/login", "/password", "/key/rotate", "/logout"):
            r = c.post(path, data={"password": web.first_password})
            assert r.status_code == 403 and "text/html" in r.headers["content-type"], path
            assert "Traceback" not in r.text
        page = c.get("/login")
        token = csrf_of(page.text)
        # session but no / wrong token
        assert c.post("/login", data={"password": web.first_password}).status_code == 403
        assert c.post("/login", data={"password": web.first_password, "csrf": token[:-1] + "x"}).status_code == 403
        # right token from another origin
        r = c.post("/login", data={"password": web.first_password, "csrf": token},
                   headers={"Origin": "http://evil.example"})
        assert r.status_code == 403
    # none of those counted as a sign-in or changed anything
    assert json.loads((web.home / "admin.json").read_text())["must_change"] is True


def test_preset_session_id_is_not_adopted(web):
    with client(web, source="127.0.0.3") as c:
        c.cookies.set(COOKIE, "attacker-chosen-session-id-0123456789abcdef")
        r = c.get("/login")
        assert "attacker-chosen" not in set_cookie_header(r)


# --------------------------------------------------------------------------- the sign-in flow (stateful, in order)

def test_sign_in_must_change_then_rotate(web):
    with client(web, source="127.0.0.4") as c:
        # wrong password
        page = c.get("/login")
        r = c.post("/login", data={"password": "not-the-password", "csrf": csrf_of(page.text)})
        assert r.status_code == 401 and "not right" in r.text
        # right password: a NEW session id, and straight to the must-change page
        pre = c.cookies.get(COOKIE)
        r = c.post("/login", data={"password": web.first_password, "csrf": csrf_of(page.text)})
        assert r.status_code == 303 and r.headers["location"] == "/password"
        post = c.cookies.get(COOKIE)
        assert post and post != pre
        # fixation: the id the browser had before sign-in is worthless now
        with client(web, source="127.0.0.4") as other:
            other.cookies.set(COOKIE, pre)
            assert other.get("/password").headers.get("location") == "/login"
        # until the password is changed, the key is not shown anywhere
        r = c.get("/")
        assert r.status_code == 303 and r.headers["location"] == "/password"
        form = c.get("/password")
        assert form.status_code == 200 and "current_password" not in form.text
        token = csrf_of(form.text)
        for new, confirm, why in (("short1", "short1", "at least"),
                                  (NEW_PASSWORD, NEW_PASSWORD + "x", "do not match"),
                                  (web.first_password, web.first_password, "different")):
            r = c.post("/password", data={"new_password": new, "confirm_password": confirm, "csrf": token})
            assert r.status_code == 400 and why in r.text, why
        r = c.post("/password", data={"new_password": NEW_PASSWORD, "confirm_password": NEW_PASSWORD,
                                      "csrf": token})
        assert r.status_code == 303 and r.headers["location"] == "/"
        assert c.cookies.get(COOKIE) != post                    # new id again after the change
        assert not (web.home / "admin-password.txt").exists()  # the one-time file is gone
        admin = json.loads((web.home / "admin.json").read_text())
        assert admin["must_change"] is False and NEW_PASSWORD not in json.dumps(admin)
        assert stat.S_IMODE((web.home / "admin.json").stat().st_mode) == 0o600

        # the key, in the page body only
        r = c.get("/")
        assert r.status_code == 200 and shown_key(r.text) == web.key
        assert r.headers["cache-control"] == "no-store"
        old_key = web.key

        # rotation: CSRF needed, then a new key; the API accepts only the new one
        assert c.post("/key/rotate").status_code == 403
        assert c.post("/key/rotate", data={"csrf": "nope"}).status_code == 403
        assert web.home.joinpath("api_key").read_text().strip() == old_key
        r = c.post("/key/rotate", data={"csrf": csrf_of(c.get("/").text)})
        assert r.status_code == 303 and old_key not in r.headers["location"]
        new_key = web.home.joinpath("api_key").read_text().strip()
        assert new_key != old_key
        assert stat.S_IMODE(web.home.joinpath("api_key").stat().st_mode) == 0o600
        page = c.get(r.headers["location"])
        assert shown_key(page.text) == new_key and "no longer works" in page.text
        assert api_status(web, old_key) == 401
        assert api_status(web, new_key) == 200
        web.key = new_key
        web.secrets += [new_key, NEW_PASSWORD]

        # the first-boot password no longer works; the new one does (and needs no change)
        with client(web, source="127.0.0.5") as c2:
            assert sign_in(c2, web.first_password).status_code == 401
            r = sign_in(c2, NEW_PASSWORD)
            assert r.status_code == 303 and r.headers["location"] == "/"
            assert shown_key(c2.get("/").text) == new_key
            # a voluntary change needs the current password
            token = csrf_of(c2.get("/password").text)
            r = c2.post("/password", data={"current_password": "wrong wrong wrong",
                                           "new_password": "another fine passphrase",
                                           "confirm_password": "another fine passphrase", "csrf": token})
            assert r.status_code == 400 and "current password" in r.text
            r = c2.post("/password", data={"current_password": NEW_PASSWORD,
                                           "new_password": "another fine passphrase",
                                           "confirm_password": "another fine passphrase", "csrf": token})
            assert r.status_code == 303 and r.headers["location"] == "/"
            web.password = "another fine passphrase"
            web.secrets.append(web.password)
            # the change signed every other browser out, including `c`
            r = c.get("/")
            assert r.status_code == 200 and shown_key(r.text) is None
            assert sign_in(c, web.password).status_code == 303

        # sign out: the session is gone server-side, not just in the browser
        sid = c.cookies.get(COOKIE)
        r = c.post("/logout", data={"csrf": csrf_of(c.get("/").text)})
        assert r.status_code == 303 and f"{COOKIE}=" in r.headers.get("set-cookie", "")
        with client(web, source="127.0.0.4") as replay:
            replay.cookies.set(COOKIE, sid)
            assert shown_key(replay.get("/").text) is None


def test_console_password_reset_signs_sessions_out(web):
    """A password changed outside this session (console reset) ends it."""
    from thox.config import Config
    from thox.web.admin import reset_admin_password, set_password
    with client(web, source="127.0.0.6") as c:
        assert sign_in(c, web.password).status_code == 303
        assert shown_key(c.get("/").text) == web.key
        one_time = reset_admin_password(Config(web.home))
        assert (web.home / "admin-password.txt").read_text().strip() == one_time
        r = c.get("/")
        assert r.status_code == 200 and shown_key(r.text) is None
        set_password(Config(web.home), web.password)       # back to the known one


def test_key_never_in_urls_or_logs(web):
    log = web.logs()
    assert "POST /key/rotate" in log and "signed in from" in log   # the log did record the flow
    assert_no_secrets_in_log(web, web.secrets)
    for line in log.splitlines():
        assert not re.search(r"[0-9a-f]{64}", line), line


# --------------------------------------------------------------------------- rate limiting, errors

def _attempt(limited, source: str, password: str) -> httpx.Response:
    with client(limited, source=source) as c:
        return sign_in(c, password)


def _assert_wait(r: httpx.Response) -> None:
    assert r.status_code == 429 and "text/html" in r.headers["content-type"], r.status_code
    assert 1 <= int(r.headers["retry-after"]) <= 60


def test_sign_in_rate_limit(limited):
    """5 failures a minute per address; during a storm (30 failures a minute from
    all addresses) only addresses that failed wait: the right password from an
    address that has not failed still signs in."""
    right = limited.first_password
    # per address: 5 failures, then 429 with Retry-After (even for the right password)
    with client(limited, source="127.0.0.10") as c:
        for i in range(5):
            assert sign_in(c, f"wrong-{i}").status_code == 401
        _assert_wait(sign_in(c, right))
    # another address is not affected by that one
    assert _attempt(limited, "127.0.0.11", "wrong").status_code == 401
    # parallel attempts from one address get no more than 5 tries
    with client(limited, source="127.0.0.12") as c:
        token = csrf_of(c.get("/login").text)
        with ThreadPoolExecutor(8) as pool:
            codes = sorted(pool.map(lambda i: c.post("/login", data={"password": f"par-{i}", "csrf": token}).status_code,
                                    range(8)))
    assert codes == [401] * 5 + [429] * 3, codes
    failures = 5 + 1 + 5
    # a storm: one failure each from 18 more addresses (29 in all), then a 30th
    for n in range(13, 31):
        assert _attempt(limited, f"127.0.0.{n}", f"storm-{n}").status_code == 401
        failures += 1
    assert failures == 29
    assert _attempt(limited, "127.0.0.13", "storm-again").status_code == 401   # below the storm line
    # storm: every address that failed waits, the right password included
    for source in ("127.0.0.13", "127.0.0.14", "127.0.0.11"):
        _assert_wait(_attempt(limited, source, right))
    # ... but an address that has not failed signs in with the right password
    r = _attempt(limited, "127.0.0.40", right)
    assert r.status_code == 303 and r.headers["location"] == "/password"
    # a fresh address gets its try; once it fails it waits like the others
    assert _attempt(limited, "127.0.0.41", "wrong").status_code == 401
    _assert_wait(_attempt(limited, "127.0.0.41", right))
    assert _attempt(limited, "127.0.0.42", right).status_code == 303
    assert_no_secrets_in_log(limited, [limited.first_password, limited.key])


def test_error_pages_are_html_without_traceback(limited):
    cfg = limited.home / "config.json"
    saved = cfg.read_bytes() if cfg.exists() else None
    cfg.write_text("{ not json")
    try:
        r = httpx.get(limited.url + "/", timeout=10)
    finally:
        if saved is None:
            cfg.unlink()
        else:
            cfg.write_bytes(saved)
    assert r.status_code == 500 and r.headers["content-type"].startswith("text/html")
    assert "Traceback" not in r.text and "Something went wrong" in r.text
    assert httpx.get(limited.url + "/", timeout=10).status_code == 200
    r = httpx.post(limited.url + "/login", content=b"\xff" * 100,
                   headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=10)
    assert r.status_code == 403 and "Traceback" not in r.text


# --------------------------------------------------------------------------- a real browser

def _browser_ready() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing (make web-deps)"
    if not (WEB_DIR / "node_modules" / "playwright-core").is_dir():
        return "tests/web/node_modules/playwright-core is missing (make web-deps)"
    if not shutil.which("node"):
        return "node is missing"
    return None


def test_browser_sign_in_change_password_rotate(browsed, tmp_path):
    missing = _browser_ready()
    if missing:
        pytest.fail(missing)
    old_key = browsed.key
    p = subprocess.run(["node", str(WEB_DIR / "browser.mjs"), browsed.url, browsed.first_password,
                        NEW_PASSWORD, str(tmp_path)], capture_output=True, text=True, timeout=180,
                       cwd=WEB_DIR, env={**os.environ, "CHROMIUM": CHROMIUM})
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert "error" not in res, res.get("error")
    assert res["console_errors"] == []                         # no CSP violations or JS errors
    assert res["health"] == "ok" and res["base_url_shown"] == browsed.base_url
    assert res["models_shown"] == ["tiny"]
    assert any("thox-coder-7b" in t and "downloading" in t for t in res["pulls_shown"])
    assert res["key_visible_anonymous"] == 0
    assert res["curl_visible"] and res["python_hidden"] and browsed.base_url in res["curl_snippet"]
    assert res["must_change_url"].endswith("/password")
    assert res["key_before"] == old_key and res["clipboard"] == old_key
    assert res["document_cookie"] == ""                        # HttpOnly: invisible to scripts
    assert {"name": COOKIE, "httpOnly": True, "sameSite": "Strict", "path": "/", "secure": False} in res["cookies"]
    new_key = (browsed.home / "api_key").read_text().strip()
    assert res["key_after"] == new_key != old_key
    assert all(old_key not in u and new_key not in u for u in [res["url_after_rotate"], *res["history"]])
    assert res["key_visible_after_signout"] == 0
    assert api_status(browsed, old_key) == 401 and api_status(browsed, new_key) == 200
    assert_no_secrets_in_log(browsed, [old_key, new_key, browsed.first_password, NEW_PASSWORD])
    shot = tmp_path / "web-screenshot.png"
    assert shot.stat().st_size > 20_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (ROOT / "build").mkdir(exist_ok=True)
    shutil.copy(shot, ROOT / "build" / "web-screenshot.png")
