"""The bounded queue, overload answers, client disconnects, and the slots
that generate several requests at once (batched output, prefix cache,
cancellation, embeddings beside generation, seeds)."""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
import time
from typing import Iterator

import httpx
import pytest

from thoxtest import Server, make_home

LONG = {"model": "thox-demo", "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 120, "temperature": 1.0, "stream": True}


def _demo_server(tmp_path_factory, models_dir, name: str, parallel: int, queue_size: int) -> Iterator[Server]:
    home = make_home(tmp_path_factory, models_dir, name, demo=True)
    s = Server(home, engine__parallel=str(parallel), api__queue_size=str(queue_size))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def small_queue(tmp_path_factory, models_dir):
    yield from _demo_server(tmp_path_factory, models_dir, "queue", parallel=2, queue_size=1)


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
    """Both slots busy: the third request waits in the queue, then runs."""
    s = small_queue
    with cf.ThreadPoolExecutor(3) as pool:
        a = [pool.submit(_stream, s, {**LONG, "max_tokens": 40}) for _ in range(2)]
        time.sleep(0.3)
        b = pool.submit(_stream, s, {**LONG, "max_tokens": 5})
        assert [f.result()[0] for f in a] == [200, 200] and b.result()[0] == 200


def test_event_loop_stays_responsive_during_generation(small_queue):
    s = small_queue
    t = threading.Thread(target=_stream, args=(s, {**LONG, "max_tokens": 150}))
    t.start()
    time.sleep(0.5)
    t0 = time.time()
    assert httpx.get(s.url + "/health", timeout=10).status_code == 200
    assert time.time() - t0 < 1.0
    t.join()


# -- slots: several requests generated at once ---------------------------------------------------------------
STORY = ["Write a long story about a lighthouse keeper.", "Describe a walk through a busy market.",
         "Write a long letter to a friend about cooking.", "Tell the history of a small mountain village."]


@pytest.fixture(scope="module")
def slots(tmp_path_factory, models_dir):
    yield from _demo_server(tmp_path_factory, models_dir, "slots", parallel=4, queue_size=4)


def _msgs(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _chat(s: Server, body: dict) -> dict:
    r = s.post("/chat/completions", {**body, "stream": False})
    assert r.status_code == 200, r.text
    return r.json()


def _sse(s: Server, body: dict, after_first=None) -> dict:
    """One streamed chat completion: its text, finish reason, usage, whether it
    ended with [DONE], and when its first content and its end arrived.
    ``after_first()`` runs once the first content chunk is in."""
    out = {"text": "", "finish": None, "usage": None, "done": False, "first_at": None}
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", s.base_url + "/chat/completions", json=body, headers=s.headers, timeout=300) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                out["done"] = True
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                out["usage"] = ev["usage"]
            for c in ev.get("choices", []):
                if c["delta"].get("content"):
                    out["text"] += c["delta"]["content"]
                    if out["first_at"] is None:
                        out["first_at"] = time.monotonic()
                        if after_first:
                            after_first()
                if c.get("finish_reason"):
                    out["finish"] = c["finish_reason"]
    out["end_at"] = time.monotonic()
    return out


def _slot_metric(s: Server, model: str, state: str) -> float:
    for line in httpx.get(s.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(f'thox_slots{{model="{model}",state="{state}"}}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no thox_slots sample for {model}/{state}")


def test_concurrent_streams_complete_with_correct_usage(slots):
    """Six streams at once on four slots (two wait in the queue): every one
    completes, and its usage is what the same request reports alone."""
    bodies = [{"model": "thox-demo", "messages": _msgs(STORY[i % 4] + " " * (i // 4)), "max_tokens": 24,
               "temperature": 0} for i in range(6)]
    alone = [_chat(slots, b) for b in bodies]
    with cf.ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda b: _sse(slots, b), bodies))
    for a, t in zip(alone, together):
        assert t["done"] and t["finish"] == a["choices"][0]["finish_reason"]
        assert t["usage"]["prompt_tokens"] == a["usage"]["prompt_tokens"]
        assert t["usage"]["completion_tokens"] == a["usage"]["completion_tokens"] > 0
        assert t["usage"]["total_tokens"] == t["usage"]["prompt_tokens"] + t["usage"]["completion_tokens"]


@pytest.mark.parametrize("model", ["tiny", "thox-demo"])
def test_batched_greedy_output_equals_solo(slots, model):
    bodies = [{"model": model, "messages": _msgs(p), "max_tokens": 48, "temperature": 0} for p in STORY]
    solo = [_chat(slots, b)["choices"][0]["message"]["content"] for b in bodies]
    with cf.ThreadPoolExecutor(4) as pool:
        batched = list(pool.map(lambda b: _sse(slots, b), bodies))
    assert [b["text"] for b in batched] == solo
    # they did run side by side: streams had their first token before another had ended
    assert sum(b["first_at"] < max(o["end_at"] for o in batched if o is not b) for b in batched) >= 2


def test_cancel_one_of_four_streams_the_rest_finish(slots):
    s = slots
    before = metric(s, "thox_client_disconnects_total")
    bodies = [{"model": "thox-demo", "messages": _msgs(p), "max_tokens": 150, "temperature": 0.8, "seed": i}
              for i, p in enumerate(STORY)]

    def cancelled() -> int:
        body = {**bodies[0], "stream": True}
        n = 0
        with httpx.stream("POST", s.base_url + "/chat/completions", json=body, headers=s.headers,
                          timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                n += line.startswith("data: ")
                if n >= 4:
                    break           # the client goes away mid-stream
        return n

    with cf.ThreadPoolExecutor(4) as pool:
        gone = pool.submit(cancelled)
        rest = [pool.submit(_sse, s, b) for b in bodies[1:]]
        assert gone.result() == 4
        for f in rest:
            r = f.result()
            assert r["done"] and r["finish"] in ("stop", "length") and r["usage"]["completion_tokens"] > 0
            assert r["finish"] == "stop" or r["usage"]["completion_tokens"] == 150
    deadline = time.time() + 20
    while metric(s, "thox_client_disconnects_total") < before + 1 and time.time() < deadline:
        time.sleep(0.2)
    assert metric(s, "thox_client_disconnects_total") == before + 1
    assert _slot_metric(s, "thox-demo", "busy") == 0 and _slot_metric(s, "thox-demo", "idle") == 4


def test_two_alternating_conversations_both_reuse_their_cache(slots):
    """Each conversation keeps its own slot: second turns reuse the whole first prompt."""
    a = [{"role": "system", "content": "You answer questions about the sea. " * 8},
         {"role": "user", "content": "Name a fish."}]
    b = [{"role": "system", "content": "You help with gardening questions and nothing else. " * 6},
         {"role": "user", "content": "Name a flower."}]
    body = {"model": "thox-demo", "max_tokens": 8, "temperature": 0}
    a1 = _chat(slots, {**body, "messages": a})
    b1 = _chat(slots, {**body, "messages": b})
    a += [a1["choices"][0]["message"], {"role": "user", "content": "Another one."}]
    b += [b1["choices"][0]["message"], {"role": "user", "content": "Another one."}]
    a2 = _chat(slots, {**body, "messages": a})
    b2 = _chat(slots, {**body, "messages": b})
    for first, second in ((a1, a2), (b1, b2)):
        cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert first["usage"]["prompt_tokens"] - 2 <= cached < second["usage"]["prompt_tokens"], (first, second)
    # a prompt the cache cannot have seen reports none
    fresh = _chat(slots, {**body, "messages": [{"role": "system", "content": "Zebra quartz " * 5},
                                               {"role": "user", "content": "Hi."}]})
    assert fresh["usage"]["prompt_tokens_details"]["cached_tokens"] <= 3


def test_embeddings_during_four_streams_answer_promptly(slots):
    s = slots
    emb = {"model": "thox-demo", "input": "The lighthouse keeper found a message in a bottle."}
    t0 = time.monotonic()
    assert s.post("/embeddings", emb).status_code == 200
    idle = time.monotonic() - t0
    started = threading.Barrier(5, timeout=120)
    bodies = [{"model": "thox-demo", "messages": _msgs(p), "max_tokens": 300, "temperature": 0.9, "seed": 7 + i}
              for i, p in enumerate(STORY)]
    with cf.ThreadPoolExecutor(4) as pool:
        streams = [pool.submit(_sse, s, b, lambda: started.wait()) for b in bodies]
        started.wait()                      # all four are generating
        t0 = time.monotonic()
        r = s.post("/embeddings", emb)
        answered_at = time.monotonic()
        busy = _slot_metric(s, "thox-demo", "busy")
        ends = [f.result()["end_at"] for f in streams]
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) > 0
    assert answered_at < max(ends), "the embedding waited for the generations"
    assert busy >= 1
    assert answered_at - t0 < max(5.0, 20 * idle), (answered_at - t0, idle)


def test_seeded_request_same_text_alone_twice_and_beside_others(slots):
    body = {"model": "thox-demo", "messages": _msgs("Invent a name for a red boat."), "max_tokens": 40,
            "temperature": 1.0, "seed": 1234}
    first = _chat(slots, body)["choices"][0]["message"]["content"]
    again = _chat(slots, body)        # now its prompt is in a slot's cache
    assert again["choices"][0]["message"]["content"] == first
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    others = [{**body, "messages": _msgs(p), "seed": i} for i, p in enumerate(STORY[:3])]
    with cf.ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(_sse, slots, {**o, "max_tokens": 60}) for o in others]
        beside = pool.submit(_sse, slots, body).result()
        [f.result() for f in futs]
    assert beside["text"] == first
    other_seed = _chat(slots, {**body, "seed": 99})["choices"][0]["message"]["content"]
    assert other_seed != first


def test_slots_in_metrics_health_and_status(slots):
    s = slots
    seen = {"busy": 0}

    def watch() -> None:
        seen["busy"] = max(seen["busy"], _slot_metric(s, "thox-demo", "busy"))

    r = _sse(s, {"model": "thox-demo", "messages": _msgs(STORY[0]), "max_tokens": 40, "temperature": 0},
             after_first=watch)
    assert r["done"] and seen["busy"] >= 1
    h = httpx.get(s.url + "/health", timeout=10).json()
    demo = [m for m in h["models"] if m["id"] == "thox-demo"][0]
    assert demo["slots"] == 4 and demo["busy"] == 0 and demo["idle"] == 4 and demo["kv_cache_bytes"] > 0
    from thoxtest import run_thox
    out = run_thox(s.home, "status", env={"THOX_API_URL": s.base_url, "THOX_API_KEY": s.key}).stdout
    assert "slots:   thox-demo: 0 busy, 4 idle of 4, 0 waiting" in out, out


def test_cancelled_embedding_request_stops_its_work(slots):
    """A client that gives up on a long embeddings request frees the
    embedding context: the next request does not wait for the abandoned one."""
    s = slots
    small = {"model": "thox-demo", "input": "a short text"}
    t0 = time.monotonic()
    assert s.post("/embeddings", small).status_code == 200
    idle = time.monotonic() - t0
    # about 60,000 tokens: tens of seconds of work on this model
    big = {"model": "thox-demo", "input": ["word " * 950 + str(i) for i in range(64)]}
    with pytest.raises(httpx.TimeoutException):
        s.post("/embeddings", big, timeout=1.0)
    t0 = time.monotonic()
    r = s.post("/embeddings", small)
    took = time.monotonic() - t0
    assert r.status_code == 200
    assert took < max(5.0, 20 * idle), (took, idle)


def test_shared_system_prompt_is_copied_between_slots(slots, small_queue):
    """A second user with the same long system prompt gets a slot of its own
    with that prefix copied from the first user's cache (cached_tokens), the
    first user's conversation stays cached, and the answer is the one a server
    with an empty cache gives."""
    system = {"role": "system", "content": "You are the helpdesk of a bicycle repair shop. " * 12}
    body = {"model": "thox-demo", "max_tokens": 12, "temperature": 0}
    x = [system, {"role": "user", "content": "My bike squeaks. " * 60 + "What should I do?"}]
    x1 = _chat(slots, {**body, "messages": x})
    y = [system, {"role": "user", "content": "Do you sell bells?"}]
    y1 = _chat(slots, {**body, "messages": y})
    sys_tokens = _chat(slots, {**body, "max_tokens": 1, "messages": [system]})["usage"]["prompt_tokens"]
    assert y1["usage"]["prompt_tokens_details"]["cached_tokens"] >= sys_tokens - 8, (y1["usage"], sys_tokens)
    x += [x1["choices"][0]["message"], {"role": "user", "content": "And then?"}]
    x2 = _chat(slots, {**body, "messages": x})
    assert x2["usage"]["prompt_tokens_details"]["cached_tokens"] >= x1["usage"]["prompt_tokens"] - 2
    fresh = _chat(small_queue, {**body, "messages": y})
    assert fresh["usage"]["prompt_tokens_details"]["cached_tokens"] <= 8      # the system prompt evaluated anew
    assert y1["choices"][0]["message"]["content"] == fresh["choices"][0]["message"]["content"]
