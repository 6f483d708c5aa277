"""The pure parts of thox.store.download: header parsing, retry policy, pin
checks on LFS headers, error wording, the rate meter's ETA."""

from __future__ import annotations

import errno
import http.client
import urllib.error
from email.message import Message

import pytest

from thox.errors import StoreError
from thox.store import ModelStore
from thox.store.download import (MAX_BACKOFF, Meter, backoff_delay, check_linked, check_url, copy_changed,
                                 is_transient, keep_linked, parse_content_range, raise_disk, reason, strong_etag,
                                 unsatisfied_range_size)

SHA = "ab" * 32


@pytest.mark.parametrize("value, want", [
    ("bytes 10-19/20", (10, 20)),
    ("  Bytes 0-9/*  ", (0, None)),
    ("bytes 5-9/1234567890123", (5, 1234567890123)),
    ("bytes */20", None),
    ("bytes 10-19", None),
    ("items 0-9/20", None),
    ("", None),
    (None, None),
])
def test_parse_content_range(value, want):
    assert parse_content_range(value) == want


@pytest.mark.parametrize("value, want", [("bytes */123", 123), ("BYTES */0", 0), ("bytes 0-1/2", None), (None, None)])
def test_unsatisfied_range_size(value, want):
    assert unsatisfied_range_size(value) == want


def test_strong_etag_ignores_weak_and_missing():
    assert strong_etag({"ETag": '"v1"'}) == '"v1"'
    assert strong_etag({"ETag": 'W/"v1"'}) is None
    assert strong_etag({}) is None
    m = Message()
    m["ETag"] = '"abc"'
    assert strong_etag(m) == '"abc"'


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
def test_transient_statuses(status):
    assert is_transient(status)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 416, 451])
def test_final_statuses(status):
    assert not is_transient(status)


def test_backoff_doubles_and_is_capped():
    assert [backoff_delay(n, 1.0) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff_delay(0, 0.5) == 0.5
    assert backoff_delay(20, 1.0) == MAX_BACKOFF


@pytest.mark.parametrize("meta, etag, total, changed", [
    ({}, '"a"', 100, False),                              # nothing recorded yet
    ({"etag": '"a"', "total": 100}, '"a"', 100, False),
    ({"etag": '"a"', "total": 100}, '"b"', 100, True),    # another copy
    ({"etag": '"a"', "total": 100}, None, 100, False),    # the server stopped sending ETags: length decides
    ({"etag": '"a"', "total": 100}, '"a"', 101, True),
    ({"etag": '"a"', "total": 100}, '"a"', None, False),
])
def test_copy_changed(meta, etag, total, changed):
    assert copy_changed(meta, etag, total) is changed


@pytest.mark.parametrize("url", ["https://host/x.gguf", "http://10.0.0.1:8000/a/b"])
def test_check_url_accepts_http_and_https(url):
    assert check_url(url) == url


@pytest.mark.parametrize("url", ["ftp://host/x", "file:///etc/passwd", "http:///x", "host/x.gguf", ""])
def test_check_url_refuses_the_rest(url):
    with pytest.raises(StoreError) as ei:
        check_url(url)
    assert ei.value.code == "invalid_url"


def test_linked_headers_must_agree_with_the_pin():
    check_linked({}, "u", SHA, 10)                                            # nothing declared
    check_linked({"x-linked-etag": SHA, "x-linked-size": "10"}, "u", SHA, 10)
    check_linked({"x-linked-etag": "not-a-sha256"}, "u", SHA, 10)              # a plain ETag says nothing
    check_linked({"x-linked-size": "11"}, "u", SHA, None)                     # no pinned size: not checked
    with pytest.raises(StoreError) as ei:
        check_linked({"x-linked-etag": "cd" * 32}, "u", SHA, 10)
    assert ei.value.code == "pin_mismatch" and "cd" * 32 in ei.value.message and SHA in ei.value.message
    with pytest.raises(StoreError) as ei:
        check_linked({"x-linked-size": "11"}, "u", SHA, 10)
    assert ei.value.code == "pin_mismatch" and "11 bytes" in ei.value.message


def test_keep_linked_strips_quotes_and_weakness_and_keeps_the_first():
    into: dict[str, str] = {}
    keep_linked({"X-Linked-Etag": f'W/"{SHA}"', "X-Linked-Size": " 42 "}, into)
    keep_linked({"X-Linked-Etag": '"other"'}, into)
    assert into == {"x-linked-etag": SHA, "x-linked-size": "42"}


def test_reason_is_short():
    assert reason(urllib.error.URLError(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"))) == \
        "Connection refused"
    assert reason(urllib.error.URLError("timed out")) == "timed out"
    assert reason(http.client.IncompleteRead(b"x", 5)) == "incomplete read"
    assert reason(OSError(errno.ENOSPC, "No space left on device")) == "No space left on device"
    assert reason(TimeoutError()) == "TimeoutError"


def test_raise_disk(tmp_path):
    store = ModelStore(tmp_path)
    with pytest.raises(StoreError) as ei:
        raise_disk(OSError(errno.ENOSPC, "No space left on device"), store)
    assert ei.value.code == "insufficient_storage" and ei.value.status == 507 and "resume" in ei.value.message
    with pytest.raises(StoreError) as ei:
        raise_disk(OSError(errno.EDQUOT, "Disk quota exceeded"), store)
    assert ei.value.code == "insufficient_storage"
    with pytest.raises(StoreError) as ei:
        raise_disk(OSError(errno.EACCES, "Permission denied"), store)
    assert ei.value.code == "io_error" and "Permission denied" in ei.value.message


def test_meter_eta():
    m = Meter()
    assert m.eta(0, 100) is None            # no rate yet
    m.rate = 10.0
    assert m.eta(50, 100) == 5.0
    assert m.eta(120, 100) == 0.0
    assert m.eta(50, None) is None and m.eta(50, 0) is None
