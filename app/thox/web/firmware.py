"""Firmware on the web page (signed in only): the booted version and both
root slots (``updates.rauc.system_status``), a bundle upload that RAUC then
installs, and a reboot request once it is installed.

The upload (``POST /update/upload``, multipart) is streamed to
``$THOX_HOME/updates/`` and never parsed into memory or /tmp: the request
hooks leave its body alone (``STREAMED_ENDPOINTS``) and this module reads
the form part by part. Its ``csrf`` field must come before the file (it does
in the page's form); a file part without a valid token before it is a 403.
The body may be as large as ``updates.max_upload_bytes`` (413 above; a
body announced larger is refused before it is read), and must fit in the free
space of ``$THOX_HOME/updates/`` (413 naming the free space: announced larger,
or a write failing on the way, ENOSPC or EIO). Before a refusal is answered, up
to ``DRAIN_BYTES`` of the rest of the body are read and dropped, so a client
still sending a small form gets to read it; a longer body is not read on: the
answer says ``Connection: close`` and the connection is closed after it. After
the upload, RAUC checks the bundle (``rauc info``: signature, compatible) and
installs it in the background; the page shows the progress and RAUC's error
if any. The reboot button writes the request file that the root unit
``thox-reboot.path`` acts on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from quart import Request, g, redirect, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.http import parse_options_header
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData

from ..config import Config
from ..errors import ThoxError
from ..ui import format_bytes
from ..updates import device, rauc
from .routes import blueprint
from .security import csrf_ok
from .firmware_view import FirmwareJob, job
from .sessions import Session, client_ip, config, flash
from .views import error_page

log = logging.getLogger("thox.web")

UPLOAD_PATH = "/update/upload"
UPLOAD_NAME = "web-upload.raucb"
MAX_FIELD = 4096
# the most of a refused upload's remaining body read (and dropped) before the answer
DRAIN_BYTES = 1 << 20


def upload_request_class(base: type[Request]) -> type[Request]:
    """``base`` with a body limit of ``updates.max_upload_bytes`` (instead of
    ``api.max_body_bytes``) for a POST to the upload path."""
    class UploadRequest(base):  # type: ignore[misc, valid-type]
        def __init__(self, method: str, scheme: str, path: str, *args: Any, **kw: Any) -> None:
            if method == "POST" and path == UPLOAD_PATH:
                try:
                    kw["max_content_length"] = int(Config().get("updates.max_upload_bytes"))
                except ThoxError:
                    pass
            super().__init__(method, scheme, path, *args, **kw)
    return UploadRequest


def _signed_in() -> Session | None:
    s: Session | None = g.get("web_session")
    return s if s is not None and s.signed_in else None


async def _stream_upload(s: Session, dest_dir: Path, cap: int) -> Path:
    """Read the multipart body: the csrf field, then the bundle into dest_dir."""
    ctype, opts = parse_options_header(request.headers.get("Content-Type", ""))
    if ctype != "multipart/form-data" or not opts.get("boundary"):
        raise _Refused(400, "Bad request", "Send the bundle with the page's upload form (multipart/form-data).")
    # no max_form_memory_size: it bounds the decoder's input buffer (one body chunk), not a field;
    # fields are bounded below (MAX_FIELD), the file by `cap`
    decoder = MultipartDecoder(opts["boundary"].encode(), max_parts=8)
    dest_dir.mkdir(parents=True, exist_ok=True)
    declared = request.content_length
    if declared is not None and declared > _free_bytes(dest_dir):
        raise _no_space(dest_dir, f"The upload ({format_bytes(declared)}) does not fit")
    part = dest_dir / f".upload-{secrets.token_hex(6)}.part"
    fields: dict[str, bytearray] = {}
    current: bytearray | None = None
    out = None
    total = 0
    token = request.headers.get("X-CSRF-Token")
    got_file = False
    try:
        async for chunk in request.body:
            decoder.receive_data(chunk)
            while not isinstance(event := decoder.next_event(), (NeedData, Epilogue)):
                if isinstance(event, Field):
                    current = fields.setdefault(event.name, bytearray())
                elif isinstance(event, File):
                    token = token or fields.get("csrf", bytearray()).decode(errors="replace")
                    if event.name != "bundle" or got_file:
                        raise _Refused(400, "Bad request", "The form carries one bundle file, field 'bundle'.")
                    if not token or not csrf_ok(token, s.csrf):
                        raise _Refused(403, "Forbidden", "Your session has expired or this form is out of date. "
                                                         "Reload the page and try again.")
                    got_file, current = True, None
                    out = open(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "wb")
                elif isinstance(event, Data):
                    if current is not None:
                        current += event.data
                        if len(current) > MAX_FIELD:
                            raise _Refused(400, "Bad request", "A form field is too long.")
                    elif out is not None:
                        total += len(event.data)
                        if total > cap:
                            raise RequestEntityTooLarge()
                        _write(out, event.data, dest_dir)
        decoder.receive_data(None)
        if out is None or total == 0:
            raise _Refused(400, "No bundle", "Choose a bundle file (.raucb) to upload.")
        try:
            out.flush()
            os.fsync(out.fileno())
            out.close()
            dest = dest_dir / UPLOAD_NAME
            os.replace(part, dest)
        except OSError as e:
            raise _no_space(dest_dir, f"Storing the bundle failed ({e.strerror})") from None
        return dest
    finally:
        if out is not None and not out.closed:
            out.close()
        part.unlink(missing_ok=True)


class _Refused(Exception):
    def __init__(self, status: int, title: str, message: str):
        super().__init__(message)
        self.status, self.title, self.message = status, title, message


def _free_bytes(d: Path) -> int:
    try:
        return shutil.disk_usage(d).free
    except OSError:
        return 0


def _no_space(d: Path, what: str) -> _Refused:
    return _Refused(413, "Not enough space", f"{what}: {format_bytes(_free_bytes(d))} free on the data "
                                             f"partition ({d}). Delete models to make room, then try again.")


def _write(out: Any, data: bytes, dest_dir: Path) -> None:
    """Write a piece of the bundle; a failing write (ENOSPC, EIO) is a refusal naming the free space."""
    try:
        out.write(data)
    except OSError as e:
        raise _no_space(dest_dir, f"Storing the bundle failed ({e.strerror})") from None


async def _install(path: Path, j: FirmwareJob) -> None:
    def progress(percent: int, step: str) -> None:
        j.percent, j.step = percent, step
    try:
        await asyncio.to_thread(rauc.install, path, progress)
        j.state, j.percent, j.step = "installed", 100, "done"
        log.info("web: firmware version %s installed", j.version)
    except ThoxError as e:
        j.state, j.error = "failed", e.message
        log.warning("web: firmware install failed: %s", e.message)
    finally:
        path.unlink(missing_ok=True)


async def _drain(limit: int) -> bool:
    """Read and drop the rest of the body, up to ``limit`` bytes; True when it ended."""
    n = 0
    try:
        async for chunk in request.body:
            n += len(chunk)
            if n > limit:
                return False
    except HTTPException:
        return False
    return True


async def _refuse(status: int, title: str, message: str):
    """The error page, once the rest of a short body is read; after a long one the
    connection is closed (the rest of the body is never read)."""
    ended = await _drain(DRAIN_BYTES)
    return await error_page(status, title, message, None if ended else {"Connection": "close"})


@blueprint.post(UPLOAD_PATH)
async def update_upload():
    cap = int(config().get("updates.max_upload_bytes"))
    s = _signed_in()
    if s is None:
        return await _refuse(403, "Sign in first", "Sign in with the admin password to install an update.")
    j = job()
    if j.busy or j.lock.locked():
        return await _refuse(409, "Update in progress", "An update is being uploaded or installed already.")
    async with j.lock:
        j.state, j.error, j.percent, j.step, j.version = "uploading", None, 0, "uploading", None
        try:
            path = await _stream_upload(s, config().home / "updates", cap)
        except _Refused as e:
            j.state = "idle"
            return await _refuse(e.status, e.title, e.message)
        except RequestEntityTooLarge:
            j.state = "idle"
            if request.content_length is not None and request.content_length > cap:
                raise        # announced too large: answered at once, nothing read
            return await _refuse(413, "Request too large", f"The bundle is larger than the limit "
                                 f"(updates.max_upload_bytes = {cap} bytes).")
        except BaseException:
            j.state = "idle"
            raise
        try:
            info = await asyncio.to_thread(rauc.bundle_info, path)
        except ThoxError as e:
            path.unlink(missing_ok=True)
            j.state, j.error = "failed", f"The bundle was refused: {e.message}"
            return redirect("/#firmware", 303)
        j.state, j.version, j.step = "installing", str(info.get("version")), "starting"
        log.info("web: installing firmware version %s uploaded from %s", j.version, client_ip())
        asyncio.get_running_loop().create_task(_install(path, j))
    return redirect("/#firmware", 303)


@blueprint.post("/update/reboot")
async def update_reboot():
    s = _signed_in()
    if s is None:
        return await error_page(403, "Sign in first", "Sign in with the admin password to reboot the device.")
    try:
        path = device.write_reboot_request(config().home)
    except OSError as e:
        flash("error", f"Could not request the reboot: {e.strerror}")
        return redirect("/#firmware", 303)
    log.info("web: reboot requested from %s (%s)", client_ip(), path)
    flash("ok", "The device is rebooting into the new version. Reload this page in a minute or two.")
    return redirect("/#firmware", 303)


@blueprint.get("/update/upload")
@blueprint.get("/update/reboot")
async def update_get():
    return redirect("/#firmware", 303)


