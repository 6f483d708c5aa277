"""Fixtures' helpers for the update tests: a throwaway signing CA, signed
RAUC bundles made by the real `rauc bundle`, the `rauc` stand-in
(tests/rauc_stub.py) on PATH, an os-release with IMAGE_VERSION, and an HTTP
server that answers range requests (and can drop a connection midway)."""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from thoxtest import ROOT, require


def make_ca(d: Path, cn: str) -> tuple[Path, Path]:
    require(shutil.which("openssl"), "openssl")
    d.mkdir(parents=True, exist_ok=True)
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "3650", "-subj", f"/CN={cn}"], check=True, capture_output=True)
    return cert, key


def make_bundle(out: Path, version: str, cert: Path, key: Path, compatible: str = "thox-amd64") -> Path:
    require(shutil.which("rauc") and shutil.which("mksquashfs"), "rauc and mksquashfs (make apt-deps)")
    content = out.with_suffix(".d")
    content.mkdir(parents=True)
    (content / "rootfs.ext4").write_bytes(os.urandom(300_000))
    (content / "manifest.raucm").write_text(f"[update]\ncompatible={compatible}\nversion={version}\n\n"
                                           "[bundle]\nformat=verity\n\n[image.rootfs]\nfilename=rootfs.ext4\n")
    subprocess.run(["rauc", "bundle", "--cert", str(cert), "--key", str(key), str(content), str(out)],
                   check=True, capture_output=True)
    return out


def stub_env(d: Path, keyring: Path, booted_version: str = "1", other_good: bool = False) -> dict[str, str]:
    """Environment with the rauc stand-in first on PATH, its state (slot A
    booted, version 1; slot B empty) and an os-release."""
    d.mkdir(parents=True, exist_ok=True)
    bindir = d / "bin"
    bindir.mkdir(exist_ok=True)
    stub = bindir / "rauc"
    stub.write_text(f"#!/bin/sh\nexec {sys.executable} {ROOT / 'tests' / 'rauc_stub.py'} \"$@\"\n")
    stub.chmod(0o755)
    state = d / "rauc-state.json"
    state.write_text(json.dumps({"booted": "A", "primary": "rootfs.0", "slots": {
        "rootfs.0": {"bootname": "A", "good": True, "version": None},
        "rootfs.1": {"bootname": "B", "good": other_good, "version": "0" if other_good else None}}}))
    osr = d / "os-release"
    osr.write_text(f'PRETTY_NAME="Thox"\nIMAGE_ID=thox\nIMAGE_VERSION="{booted_version}"\n')
    return {"PATH": f"{bindir}:{os.environ['PATH']}", "RAUC_STUB_STATE": str(state),
            "RAUC_STUB_KEYRING": str(keyring), "THOX_OS_RELEASE": str(osr)}


def stub_state(env: dict[str, str]) -> dict:
    return json.loads(Path(env["RAUC_STUB_STATE"]).read_text())


class RangeServer:
    """Serves files of ``root`` over HTTP on loopback, honouring ``Range:
    bytes=N-`` (206) unless ``ranges`` is False (then plain 200, like
    python -m http.server). ``drop_after``: close the first ``drops``
    responses after that many body bytes. ``ranges_seen`` records the
    Range headers asked for."""

    def __init__(self, root: Path, ranges: bool = True, drop_after: int | None = None, drops: int = 0):
        self.root, self.ranges, self.drop_after, self.drops = root, ranges, drop_after, drops
        self.ranges_seen: list[str | None] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                path = outer.root / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                size = path.stat().st_size
                rng = self.headers.get("Range")
                outer.ranges_seen.append(rng)
                m = re.fullmatch(r"bytes=(\d+)-", rng or "")
                start = int(m.group(1)) if (m and outer.ranges) else 0
                if m and outer.ranges:
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(size - start))
                self.send_header("ETag", '"v1"')
                self.end_headers()
                limit = None
                if outer.drops > 0 and outer.drop_after is not None:
                    outer.drops -= 1
                    limit = outer.drop_after
                    self.close_connection = True
                sent = 0
                with open(path, "rb") as f:       # streamed: bundles are large
                    f.seek(start)
                    while limit is None or sent < limit:
                        buf = f.read(1 << 20 if limit is None else min(1 << 20, limit - sent))
                        if not buf:
                            break
                        self.wfile.write(buf)
                        sent += len(buf)
                self.wfile.flush()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
