"""Load and disconnects, on loopback, bounded.

* More concurrent streaming clients than the queue holds (queue_size 2, so 3
  admitted: 1 running + 2 waiting; 12 clients, several rounds): every request
  ends in a complete stream (`data: [DONE]` after a chunk with a
  finish_reason) or a 429/503 with Retry-After in the OpenAI error shape;
  none hangs (per-request deadline), none is cut without an error. Clients
  that honour Retry-After all get their answer. The server's RSS and thread
  count return to their baseline afterwards.
* 100 clients in a row drop mid-stream: no leaked threads, memory or queue
  places (thox_queue_depth back to 0), the cancelled generations stop at the
  next token (tokens generated stay close to tokens delivered), and a
  request right after a drop gets its first token as fast as on an idle
  engine.

Runs on the demo model (real weights, so generation takes real time); about
1-2 minutes on 2 cores.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import statistics
import threading
import time
from pathlib import Path

import httpx
import pytest

from thoxtest import Server, make_home

pytestmark = pytest.mark.timeout(600)

MODEL = "thox-demo"
QUEUE = 2
CLIENTS = 12
ROUNDS = 3
MAX_TOKENS = 32
DEADLINE = 90.0          # per request, start to end of stream
MiB = 1 << 20


def body(max_tokens: int = MAX_TOKENS, **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Write a short poem about the sea."}],
            "max_tokens": max_tokens, "temperature": 0.8, "stream": True, **kw}


# -- process probes ------------------------------------------------------------------------------
def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def metric(server: Server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def settle(server: Server, timeout: float = 10.0) -> None:
    """Wait until no request is running or queued."""
    deadline = time.time() + timeout
    while metric(server, "thox_queue_depth") != 0:
        assert time.time() < deadline, "queue depth did not return to 0"
        time.sleep(0.05)


# -- one streaming client ------------------------------------------------------------------------
class Outcome:
    def __init__(self):
        self.kind = "?"          # complete | rejected | bad
        self.status = 0
        self.detail = ""
        self.ttft: float | None = None
        self.retry_after: int | None = None
        self.tokens = 0


def stream_once(server: Server, req: dict, deadline: float = DEADLINE) -> Outcome:
    out = Outcome()
    t0 = time.monotonic()
    try:
        with httpx.stream("POST", server.base_url + "/chat/completions", json=req, headers=server.headers,
                          timeout=httpx.Timeout(30.0)) as r:
            out.status = r.status_code
            if r.status_code in (429, 503):
                data = r.read()
                ra = r.headers.get("retry-after", "")
                err = json.loads(data).get("error", {}) if data.startswith(b"{") else {}
                if not ra.isdigit() or int(ra) < 1 or not {"message", "type", "param", "code"} <= set(err):
                    out.kind, out.detail = "bad", f"{r.status_code} without Retry-After/error shape: {data[:200]!r}"
                else:
                    out.kind, out.retry_after = "rejected", int(ra)
                return out
            if r.status_code != 200:
                out.kind, out.detail = "bad", f"status {r.status_code}: {r.read()[:200]!r}"
                return out
            events, finish = [], None
            for line in r.iter_lines():
                if time.monotonic() - t0 > deadline:
                    out.kind, out.detail = "bad", f"stream still running after {deadline}s (hang)"
                    return out
                if not line:
                    continue
                if not line.startswith("data: "):
                    out.kind, out.detail = "bad", f"not an SSE data line: {line[:100]!r}"
                    return out
                data = line[6:]
                events.append(data)
                if data == "[DONE]":
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    out.kind, out.detail = "bad", f"error event mid-stream: {data[:200]}"
                    return out
                for c in chunk["choices"]:
                    if c["delta"].get("content"):
                        out.tokens += 1
                        if out.ttft is None:
                            out.ttft = time.monotonic() - t0
                    finish = c.get("finish_reason") or finish
            if not events or events[-1] != "[DONE]" or finish not in ("stop", "length"):
                out.kind, out.detail = "bad", f"stream cut: last events {events[-2:]!r}, finish {finish!r}"
                return out
            out.kind = "complete"
            return out
    except httpx.HTTPError as e:
        out.kind, out.detail = "bad", f"{type(e).__name__}: {e}"
        return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


# -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def load_server(tmp_path_factory, models_dir):
    home = make_home(tmp_path_factory, models_dir, "load", demo=True)
    s = Server(home, api__queue_size=str(QUEUE), default_model=MODEL)
    # warm up: load the model, touch every code path once
    for _ in range(2):
        o = stream_once(s, body(8))
        assert o.kind == "complete", o.detail
    httpx.post(s.base_url + "/chat/completions", json={**body(4), "stream": False}, headers=s.headers,
               timeout=60).raise_for_status()
    yield s
    s.stop()


def test_overload_every_request_completes_or_is_told_to_retry(load_server):
    s = load_server
    pid = s.proc.pid
    settle(s)
    base_rss, base_threads = rss(pid), threads(pid)
    peak = [base_rss]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss(pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    outcomes: list[Outcome] = []
    t_start = time.monotonic()
    try:
        with cf.ThreadPoolExecutor(CLIENTS) as pool:
            for _ in range(ROUNDS):
                barrier = threading.Barrier(CLIENTS)

                def client(_):
                    barrier.wait(10)
                    return stream_once(s, body())
                futs = [pool.submit(client, i) for i in range(CLIENTS)]
                done, not_done = cf.wait(futs, timeout=DEADLINE + 30)
                assert not not_done, f"{len(not_done)} clients never returned (hang)"
                round_out = [f.result() for f in futs]
                outcomes += round_out
                assert sum(o.kind == "complete" for o in round_out) >= 1
                settle(s, 30)
    finally:
        stop.set()
        sampler.join()
    wall = time.monotonic() - t_start
    kinds = {k: sum(o.kind == k for o in outcomes) for k in ("complete", "rejected", "bad")}
    ttfts = [o.ttft for o in outcomes if o.ttft is not None]
    print(f"\nload: {len(outcomes)} streaming requests ({CLIENTS} concurrent x {ROUNDS} rounds, queue {QUEUE}) "
          f"in {wall:.1f}s: {kinds}; statuses "
          f"{ {st: sum(o.status == st for o in outcomes) for st in sorted({o.status for o in outcomes})} }; "
          f"TTFT p50 {pct(ttfts, .5):.3f}s p99 {pct(ttfts, .99):.3f}s; "
          f"RSS base {base_rss / MiB:.1f} MiB peak {peak[0] / MiB:.1f} MiB")
    bad = [o.detail for o in outcomes if o.kind == "bad"]
    assert not bad, f"{len(bad)} requests neither completed nor were refused properly: {bad[:5]}"
    assert kinds["rejected"] > 0, "the queue never filled: the test did not overload anything"
    assert kinds["complete"] >= ROUNDS * (QUEUE + 1) * 0.5

    # clients that honour Retry-After all get their answer, nothing is lost
    def patient(_):
        deadline = time.monotonic() + 120
        tries = 0
        while time.monotonic() < deadline:
            tries += 1
            o = stream_once(s, body(16))
            if o.kind != "rejected":
                return o, tries
            time.sleep(min(o.retry_after or 1, 5))
        return o, tries
    with cf.ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(patient, range(CLIENTS), timeout=180))
    assert all(o.kind == "complete" for o, _ in results), [o.detail for o, _ in results if o.kind != "complete"]
    print(f"retrying clients: all {CLIENTS} complete, tries {sorted(t for _, t in results)}")

    settle(s, 30)
    # memory and threads come back (a margin for allocator slack)
    deadline = time.time() + 15
    margin = max(48 * MiB, base_rss // 8)
    while rss(pid) > base_rss + margin and time.time() < deadline:
        time.sleep(0.5)
    after_rss, after_threads = rss(pid), threads(pid)
    print(f"after: RSS {after_rss / MiB:.1f} MiB (baseline {base_rss / MiB:.1f}), threads {after_threads} "
          f"(baseline {base_threads})")
    assert after_rss <= base_rss + margin, (after_rss, base_rss)
    assert after_threads <= base_threads + 4, (after_threads, base_threads)
    assert httpx.get(s.url + "/health", timeout=5).json()["status"] == "ok"


def drop_mid_stream(s: Server, after_tokens: int, max_tokens: int = 400) -> int:
    """Start a stream, read ``after_tokens`` content chunks, hang up. Returns
    the content chunks received."""
    got = 0
    with httpx.stream("POST", s.base_url + "/chat/completions", json=body(max_tokens), headers=s.headers,
                      timeout=30) as r:
        assert r.status_code == 200, r.read()[:300]
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                got += 1
                if got >= after_tokens:
                    break
    return got   # leaving the block closes the connection mid-stream


def test_disconnects_leak_nothing_and_free_the_engine(load_server):
    s = load_server
    pid = s.proc.pid
    settle(s)
    # idle-engine first-token latency and the per-token time, for comparison
    idle = [stream_once(s, body(24, temperature=0.0)) for _ in range(3)]
    assert all(o.kind == "complete" for o in idle), [o.detail for o in idle]
    idle_ttft = statistics.median(o.ttft for o in idle)

    for _ in range(10):          # warm-up drops: lazily created threads, allocator pools
        drop_mid_stream(s, 2)
    settle(s)
    base_rss, base_threads = rss(pid), threads(pid)
    tokens0 = metric(s, "thox_tokens_generated_total")
    drops0 = metric(s, "thox_client_disconnects_total")

    delivered = 0
    t0 = time.monotonic()
    after_drop = []
    for i in range(100):
        delivered += drop_mid_stream(s, 1 + i % 4)
        if i % 10 == 9:
            # the engine is free right away: the next request's first token
            # comes as fast as on an idle engine (the dropped job stops at its
            # next token, it does not run on to max_tokens)
            o = stream_once(s, body(4, temperature=0.0))
            assert o.kind == "complete", o.detail
            after_drop.append(o.ttft)
    wall = time.monotonic() - t0
    settle(s, 10)
    deadline = time.time() + 10
    while metric(s, "thox_client_disconnects_total") < drops0 + 100 and time.time() < deadline:
        time.sleep(0.1)
    drops = metric(s, "thox_client_disconnects_total") - drops0
    generated = metric(s, "thox_tokens_generated_total") - tokens0 - 10 * 4   # less the 10 probe requests
    after_rss, after_threads = rss(pid), threads(pid)
    print(f"\ndisconnects: 100 drops in {wall:.1f}s; server counted {drops:.0f}; {delivered} chunks delivered, "
          f"{generated:.0f} tokens generated for them; first token after a drop "
          f"{[round(x, 3) for x in after_drop]} vs idle {idle_ttft:.3f}s; RSS {base_rss / MiB:.1f} -> "
          f"{after_rss / MiB:.1f} MiB; threads {base_threads} -> {after_threads}")
    assert drops >= 100, f"the server saw only {drops} of 100 disconnects"
    # each dropped job generated at most a few tokens past what it delivered
    # (in flight in socket buffers when the client hung up), never max_tokens
    assert generated <= delivered + 100 * 6, (generated, delivered)
    # (a dropped job left running would hold the engine for its 400 tokens: seconds).
    # The token count above is the exact proof; timings on 2 shared cores are
    # only a loose sanity check here (speed targets live in `make bench`).
    assert statistics.median(after_drop) <= max(3 * idle_ttft, idle_ttft + 1.0), (after_drop, idle_ttft)
    assert metric(s, "thox_queue_depth") == 0
    assert after_threads <= base_threads + 2, (after_threads, base_threads)
    assert after_rss <= base_rss + max(32 * MiB, base_rss // 10), (after_rss, base_rss)
    assert stream_once(s, body(4)).kind == "complete"
