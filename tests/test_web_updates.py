"""The web page's firmware card: versions and slots for a signed-in admin,
the bundle upload (sign-in, CSRF, size cap; streamed to THOX_HOME/updates),
RAUC's verdict on a bad bundle, the install's progress and the reboot
request. A real `thox serve`; RAUC is the stand-in of tests/rauc_stub.py with
real bundles checked by the real `rauc`."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time

import httpx
import pytest

from thoxtest import Server, run_thox
from updatestest import make_bundle, make_ca, stub_env, stub_state

NEW_PASSWORD = "firmware admin passphrase"
UPLOAD_CAP = 1 << 20

pytestmark = pytest.mark.timeout(300)


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, "page has a CSRF field"
    return m.group(1)


def client(server: Server, source: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=60, follow_redirects=False,
                        transport=httpx.HTTPTransport(local_address=source))


@pytest.fixture(scope="module")
def fw(tmp_path_factory):
    d = tmp_path_factory.mktemp("fw")
    cert, key = make_ca(d / "ca", "Thox TEST web")
    other_cert, other_key = make_ca(d / "other", "Someone else")
    home = d / "home"
    home.mkdir()
    run_thox(home, "firstboot")
    first = (home / "admin-password.txt").read_text().strip()
    run_thox(home, "config", "set", "updates.max_upload_bytes", str(UPLOAD_CAP))
    run_thox(home, "config", "set", "api.max_body_bytes", "64K")   # the upload has its own, larger cap
    env = stub_env(d / "rauc", cert)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        s = Server(home)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    s.env = env
    s.good = make_bundle(d / "thox-amd64-2.raucb", "2", cert, key)
    s.foreign = make_bundle(d / "foreign.raucb", "9", other_cert, other_key)
    assert s.good.stat().st_size > 64 << 10
    with client(s, "127.0.0.21") as c:
        page = c.get("/login")
        r = c.post("/login", data={"password": first, "csrf": csrf_of(page.text)})
        assert r.headers["location"] == "/password"
        r = c.post("/password", data={"new_password": NEW_PASSWORD, "confirm_password": NEW_PASSWORD,
                                      "csrf": csrf_of(c.get("/password").text)})
        assert r.status_code == 303
    yield s
    s.stop()


@pytest.fixture
def admin(fw):
    with client(fw, "127.0.0.22") as c:
        page = c.get("/login")
        r = c.post("/login", data={"password": NEW_PASSWORD, "csrf": csrf_of(page.text)})
        assert r.status_code == 303 and r.headers["location"] == "/"
        yield c


def updates_files(fw) -> list[str]:
    d = fw.home / "updates"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def upload(c: httpx.Client, data: bytes, csrf: str | None, name: str = "bundle.raucb") -> httpx.Response:
    fields = {"csrf": csrf} if csrf is not None else {}
    return c.post("/update/upload", data=fields, files={"bundle": (name, data, "application/octet-stream")})


def test_signed_in_page_shows_booted_version_and_both_slots(fw, admin):
    html = admin.get("/").text
    card = html[html.index('id="firmware"'):]
    assert re.search(r'version <span data-field="booted-version">1</span> on slot A', card)
    rows = re.findall(r'<tr class="slot">(.*?)</tr>', card, re.S)
    assert len(rows) == 2
    assert "A (rootfs.0)" in rows[0] and "good" in rows[0] and "booted" in rows[0]
    assert "B (rootfs.1)" in rows[1] and "bad" in rows[1] and "booted" not in rows[1]
    assert 'action="/update/upload"' in card and 'enctype="multipart/form-data"' in card


def test_not_signed_in_no_card_and_no_upload(fw):
    with client(fw, "127.0.0.23") as c:
        assert 'id="firmware"' not in c.get("/").text
        token = csrf_of(c.get("/login").text)       # an anonymous session with a CSRF token
        r = upload(c, fw.good.read_bytes(), token)
        assert r.status_code == 403 and "Sign in first" in r.text
        c.cookies.clear()
        assert upload(c, fw.good.read_bytes(), token).status_code == 403
        assert c.post("/update/reboot", data={"csrf": token}).status_code == 403
    assert updates_files(fw) == []
    assert not (fw.home / "requests").exists()


def test_upload_needs_the_csrf_token(fw, admin):
    for token in (None, "not-the-token"):
        r = upload(admin, fw.good.read_bytes(), token)
        assert r.status_code == 403 and "out of date" in r.text, token
    r = admin.post("/update/upload", files={"bundle": ("b.raucb", b"x" * 10, "application/octet-stream")},
                   headers={"Origin": "http://evil.example"})
    assert r.status_code == 403
    assert updates_files(fw) == []
    assert not any(c[0] == "install" for c in stub_state(fw.env).get("calls", []))


def test_too_large_is_refused(fw, admin):
    """Sent chunked (no length announced): refused once the file passes the cap."""
    token = csrf_of(admin.get("/").text)
    boundary = "thoxtestboundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="csrf"\r\n\r\n{token}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="bundle"; filename="big.raucb"\r\n'
            f'Content-Type: application/octet-stream\r\n\r\n').encode()

    def body():
        yield head
        for _ in range(UPLOAD_CAP // 65536 + 2):
            yield os.urandom(65536)
        yield f"\r\n--{boundary}--\r\n".encode()
    r = admin.post("/update/upload", content=body(),
                   headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413 and "updates.max_upload_bytes" in r.text
    assert updates_files(fw) == []


def _chunked_upload(c: httpx.Client, token: str, size: int) -> httpx.Response:
    """A multipart upload of ``size`` random bytes sent chunked (no length announced)."""
    boundary = "thoxtestboundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="csrf"\r\n\r\n{token}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="bundle"; filename="big.raucb"\r\n'
            f'Content-Type: application/octet-stream\r\n\r\n').encode()

    def body():
        yield head
        for _ in range(size // 65536):
            yield os.urandom(65536)
        yield f"\r\n--{boundary}--\r\n".encode()
    return c.post("/update/upload", content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})


def test_a_full_data_partition_is_a_413_naming_the_free_space(fw, admin):
    """THOX_HOME/updates on a small tmpfs: an upload announced larger than the free space is
    refused before it is read; one sent chunked that runs out of space (ENOSPC) is a 413, not a 500."""
    if os.geteuid() != 0:
        pytest.fail("needs root (mount)")
    d = fw.home / "updates"
    d.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "thox-test-updates", str(d)], check=True)
    try:
        token = csrf_of(admin.get("/").text)
        r = upload(admin, os.urandom(512 << 10), token)
        assert r.status_code == 413 and "does not fit" in r.text and "free on the data partition" in r.text, r.text
        r = _chunked_upload(admin, token, 768 << 10)
        assert r.status_code == 413, r.text
        assert "Storing the bundle failed (No space left on device)" in r.text and "free on the data partition" in r.text
        assert list(d.iterdir()) == [], "the partial upload is removed"
        # the page still works and a later upload that fits goes through to RAUC
        assert admin.get("/").status_code == 200
    finally:
        subprocess.run(["umount", str(d)], check=True)


def test_a_refused_upload_is_not_read_to_its_end(fw):
    """Signed out, a body announced at 512 MiB: the 403 comes after at most about 1 MiB was
    read, with Connection: close, and the server closes the connection (the old behaviour read
    and dropped up to updates.max_upload_bytes, here raised to 4 GiB, before answering)."""
    run_thox(fw.home, "config", "set", "updates.max_upload_bytes", str(4 << 30))
    try:
        with socket.create_connection(("127.0.0.1", fw.port), timeout=60) as sock:
            sock.sendall(f"POST /update/upload HTTP/1.1\r\nHost: 127.0.0.1:{fw.port}\r\n"
                         f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {512 << 20}\r\n\r\n"
                         .encode())
            sock.sendall(b"\0" * (2 << 20))      # more than the server reads; the kernel buffers the rest
            answer = b""
            while chunk := sock.recv(65536):     # ends only when the server closes the connection
                answer += chunk
        head = answer.split(b"\r\n\r\n", 1)[0].decode().lower()
        assert head.startswith("http/1.1 403") and "connection: close" in head, head
        assert b"Sign in first" in answer
    finally:
        run_thox(fw.home, "config", "set", "updates.max_upload_bytes", str(UPLOAD_CAP))


def test_bad_bundle_shows_rauc_s_error(fw, admin):
    token = csrf_of(admin.get("/").text)
    r = upload(admin, fw.foreign.read_bytes(), token)
    assert r.status_code == 303 and r.headers["location"] == "/#firmware"
    html = admin.get("/").text
    m = re.search(r'id="update-error">(.*?)</p>', html, re.S)
    assert m and "signature verification failed" in m.group(1), html
    assert updates_files(fw) == [], "a refused bundle is removed"
    assert not any(c[0] == "install" for c in stub_state(fw.env).get("calls", []))


def test_good_bundle_installs_then_reboot_is_requested(fw, admin):
    token = csrf_of(admin.get("/").text)
    r = upload(admin, fw.good.read_bytes(), token)
    assert r.status_code == 303
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        html = admin.get("/").text
        if "is installed" in html or "Update failed" in html:
            break
        assert 'http-equiv="refresh"' in html, "the page refreshes itself while installing"
        time.sleep(0.3)
    assert "Version 2 is installed" in html, html
    rows = re.findall(r'<tr class="slot">(.*?)</tr>', html, re.S)
    assert "2" in rows[1] and "good" in rows[1] and "next boot" in rows[1]
    installs = [c for c in stub_state(fw.env)["calls"] if c[0] == "install"]
    assert len(installs) == 1 and installs[0][1].startswith(str(fw.home / "updates"))
    assert updates_files(fw) == [], "the uploaded bundle is removed after the install"
    assert admin.post("/update/reboot").status_code == 403
    assert not (fw.home / "requests" / "reboot").exists()
    r = admin.post("/update/reboot", data={"csrf": csrf_of(html)})
    assert r.status_code == 303
    assert (fw.home / "requests" / "reboot").is_file()
    assert "rebooting" in admin.get("/").text
    assert "Traceback" not in fw.logs()
