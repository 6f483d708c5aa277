"""The bounded queue, overload answers, and client disconnects."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import httpx
import pytest

from thoxtest import Server, make_home

LONG = {"model": "thox-demo", "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 120, "temperature": 1.0, "stream": True}


@pytest.fixture(scope="module")
def small_queue(tmp_path_factory, models_dir):
    home = make_home(tmp_path_factory, models_dir, "queue", demo=True)
    s = Server(home, api__queue_size="1")
    yield s
    s.stop()


def metric(server: Server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _stream(server: Server, body: dict) -> tuple[int, dict, str]:
    with httpx.stream("POST", server.base_url + "/chat/completions", json=body, headers=server.headers,
                      timeout=120) as r:
        text = r.read().decode()
        return r.status_code, dict(r.headers), text


def test_overload_answers_503_with_retry_after(small_queue):
    s = small_queue
    with cf.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: _stream(s, LONG), range(6)))
    codes = sorted(r[0] for r in results)
    assert 200 in codes and 503 in codes, codes
    for status, headers, text in results:
        if status == 200:
            assert text.rstrip().endswith("data: [DONE]")      # complete, never cut
        else:
            assert status == 503 and int(headers["retry-after"]) >= 1
            assert '"code":"overloaded"' in text.replace(" ", "")
    # and it recovers
    assert _stream(s, {**LONG, "max_tokens": 3})[0] == 200


def test_disconnect_stops_generation(small_queue):
    s = small_queue
    before = metric(s, "thox_client_disconnects_total")
    body = {**LONG, "max_tokens": 900}
    for _ in range(5):
        with httpx.stream("POST", s.base_url + "/chat/completions", json=body, headers=s.headers,
                          timeout=60) as r:
            assert r.status_code == 200
            it = r.iter_lines()
            for _ in range(3):
                next(it)
        # leaving the block closes the connection mid-stream
    deadline = time.time() + 20
    while metric(s, "thox_client_disconnects_total") < before + 5 and time.time() < deadline:
        time.sleep(0.2)
    assert metric(s, "thox_client_disconnects_total") >= before + 5
    tokens = metric(s, "thox_tokens_generated_total")
    time.sleep(1.0)
    assert metric(s, "thox_tokens_generated_total") == tokens      # nothing still generating
    assert metric(s, "thox_queue_depth") == 0
    t0 = time.time()
    status, _, text = _stream(s, {**LONG, "max_tokens": 3})
    assert status == 200 and time.time() - t0 < 20


def test_queued_request_waits_then_completes(small_queue):
    s = small_queue
    with cf.ThreadPoolExecutor(2) as pool:
        a = pool.submit(_stream, s, {**LONG, "max_tokens": 40})
        time.sleep(0.3)
        b = pool.submit(_stream, s, {**LONG, "max_tokens": 5})
        assert a.result()[0] == 200 and b.result()[0] == 200


def test_event_loop_stays_responsive_during_generation(small_queue):
    s = small_queue
    t = threading.Thread(target=_stream, args=(s, {**LONG, "max_tokens": 150}))
    t.start()
    time.sleep(0.5)
    t0 = time.time()
    assert httpx.get(s.url + "/health", timeout=10).status_code == 200
    assert time.time() - t0 < 1.0
    t.join()
