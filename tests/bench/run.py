"""`make bench`: thox against llama-cpp-python on the demo model, in one run.

    python -m tests.bench.run --out build/bench.json [--quick]

Engines, same prompts, same sampling (greedy: temperature 0, 128 tokens,
streaming), each at 1 and 2 threads, each figure the best of a few rounds:

  in-process   llama_cpp.Llama.create_chat_completion(stream=True), in a child
               process of its own (so its peak RSS is its own)
  llama-cpp    llama-cpp-python's server (python -m llama_cpp.server) on
               loopback, through the openai SDK
  llama-server llama.cpp's C++ server, built once by `make llama-server` from
               the llama.cpp source the llama-cpp-python sdist vendors (the same
               llama.cpp version), on loopback, through the openai SDK
  thox         `thox serve` on loopback, through the openai SDK

"Threads" is llama.cpp's n_threads (generation); prompt evaluation uses
llama.cpp's default n_threads_batch (all CPUs) in all four, as thox does.
llama-server runs like the others: one slot (-np 1), the same n_ctx and
n_batch/n_ubatch 512, flash attention off (llama-cpp-python's default), no
host-memory prompt cache (--cache-ram 0; it keeps prefix reuse in its one
slot, like the others).

Figures: decode tokens/s (chunks after the first over the time after the
first), end-to-end tokens/s, time to first token (TTFT) p50/p99 over the
rounds (every round has its own prompt, so TTFT includes prompt evaluation),
peak RSS of the serving process (VmHWM). Ratios thox/in-process,
thox/llama-cpp and thox/llama-server (and, for reference, llama-server and
llama-cpp against in-process). Then second-turn TTFT with a shared prompt of
1,000+ tokens (KV-cache reuse), for thox and for llama-server, and for thox
alone a load section (more concurrent streaming clients than the queue holds:
requests, outcomes by kind, TTFT p50/p99).

Concurrency table (also alone: --only-concurrency), at each thread count: thox with
engine.parallel=4, llama-server with -np 4 (-c 4 x n_ctx, so each slot has
n_ctx tokens) and llama-cpp-python's server (one sequence: it takes requests
one at a time), each alone on the box: 1, 2, 4 and 8 streams started together
(greedy, 128 tokens, a different prompt each): aggregate tokens/s (all tokens
over the round's wall time) and TTFT p50/p99 over all streams; the
interactive case (a 16-token request sent once a 256-token stream has its
first token, as a multiple of the same request's idle latency); peak RSS.

Prints a table and writes JSON to --out. Loopback only; bounded (about 2-4
minutes on 2 cores). Without the llama-server binary its rows say how to
build it (`make llama-server`; `make bench` builds it first).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from thox import pins

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

MODEL = "thox-demo"
ENGINES = ("in-process", "llama-cpp", "llama-server", "thox")
PARALLEL = 4                          # thox's engine.parallel and llama-server's -np in the concurrency table
STREAMS = (1, 2, 4, 8)                # concurrent streams in the concurrency table
SERVERS = ("thox", "llama-server", "llama-cpp")
MiB = 1 << 20

PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Describe a walk through a busy market in a city by the sea, with many details.",
    "Write a long letter to a friend about learning to cook.",
    "Tell the history of a small mountain village over one hundred years.",
    "Explain how rain forms, step by step, for a curious child.",
    "Write a long essay about the history of trains.",
    "Write a long story about a cat who travels around the world.",
    "Describe, in many paragraphs, a day in the life of a baker.",
    "Write a detailed guide to planting a vegetable garden.",
]   # each runs to 128 tokens under greedy decoding on thox-demo
SAMPLING = {"temperature": 0.0, "top_p": 1.0}
EXTRA = {"top_k": 40, "min_p": 0.0, "repeat_penalty": 1.0}   # llama-cpp-python's knobs, ignored by thox


def messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


# -- measurement helpers ------------------------------------------------------------------------------
def vm(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return 0


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """(CPU seconds the whole box has been busy, CPU seconds used by `pids`
    and this process), so a phase can say how much CPU others took from it."""
    hz = os.sysconf("SC_CLK_TCK")
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = (sum(f[:8]) - f[3] - f[4]) / hz     # all but idle and iowait
    own = sum(os.times()[:2])
    for pid in pids:
        try:
            st = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            own += (int(st[11]) + int(st[12])) / hz
        except (FileNotFoundError, IndexError, ValueError):
            pass
    return busy, own


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def timed_stream(chunks) -> dict[str, Any]:
    """Consume an iterator of chat.completion.chunk (objects or dicts) started
    at t0 (set by the caller just before the request); times each content piece."""
    t0 = chunks.t0
    first = last = None
    n = 0
    text = []
    usage = None
    for ch in chunks:
        u = ch.get("usage") if isinstance(ch, dict) else getattr(ch, "usage", None)
        if u:
            usage = u if isinstance(u, dict) else u.model_dump()
        choices = ch["choices"] if isinstance(ch, dict) else ch.choices
        if not choices:
            continue
        delta = choices[0]["delta"] if isinstance(ch, dict) else choices[0].delta
        content = delta.get("content") if isinstance(delta, dict) else delta.content
        if content:
            now = time.perf_counter()
            first = first if first is not None else now
            last = now
            n += 1
            text.append(content)
    end = time.perf_counter()
    if first is None:
        return {"tokens": 0, "ttft": None, "decode_tps": None, "e2e_tps": None, "text": "", "usage": usage}
    return {"tokens": n, "ttft": first - t0, "e2e_tps": n / (end - t0),
            "decode_tps": (n - 1) / (last - first) if n > 1 and last > first else None,
            "text": "".join(text), "usage": usage}


class _Timed:
    def __init__(self, it, t0: float):
        self.it, self.t0 = it, t0

    def __iter__(self):
        return iter(self.it)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ttfts = [r["ttft"] for r in runs if r["ttft"] is not None]
    dec = [r["decode_tps"] for r in runs if r["decode_tps"]]
    e2e = [r["e2e_tps"] for r in runs if r["e2e_tps"]]
    return {"rounds": len(runs), "tokens": [r["tokens"] for r in runs],
            "decode_tps_best": max(dec) if dec else None,
            "decode_tps_median": statistics.median(dec) if dec else None,
            "e2e_tps_best": max(e2e) if e2e else None,
            "ttft_p50": pct(ttfts, 0.5), "ttft_p99": pct(ttfts, 0.99), "ttft_best": min(ttfts) if ttfts else None}


# -- the three engines, each behind the same `run(prompt, max_tokens)` -------------------------------------------
def inprocess_worker(model: str, threads: int, n_ctx: int) -> None:
    """Child process: one Llama; a JSON request per stdin line, a JSON result per stdout line."""
    import llama_cpp
    llm = llama_cpp.Llama(model, n_ctx=n_ctx, n_batch=512, n_threads=threads, verbose=False)
    out = sys.stdout
    sys.stdout = sys.stderr
    for line in sys.stdin:
        req = json.loads(line)
        t0 = time.perf_counter()
        it = llm.create_chat_completion(messages(req["prompt"]), max_tokens=req["max_tokens"], stream=True,
                                        **SAMPLING, **EXTRA)
        r = timed_stream(_Timed(it, t0))
        out.write(json.dumps(r) + "\n")
        out.flush()


class InProcess:
    name = "in-process"

    def __init__(self, model: Path, threads: int, n_ctx: int, work: Path):
        self.err = open(work / f"inprocess-{threads}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.bench.run", "--inprocess-worker", str(model),
                                      "--threads", str(threads), "--n-ctx", str(n_ctx)], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True)
        self.pid = self.proc.pid

    def run(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps({"prompt": prompt, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("in-process worker died")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        stop(self.proc)
        self.err.close()


class SDKEngine:
    """A server on loopback driven through the openai SDK."""

    def __init__(self, base_url: str, key: str):
        from openai import OpenAI
        self.client = OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=300)

    def run(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        it = self.client.chat.completions.create(model=MODEL, messages=messages(prompt), max_tokens=max_tokens,
                                                 stream=True, extra_body=EXTRA, **SAMPLING)
        return timed_stream(_Timed(it, t0))


class LlamaCppServer(SDKEngine):
    name = "llama-cpp"

    def __init__(self, model: Path, threads: int, n_ctx: int, work: Path):
        from thoxtest import free_port
        port = free_port()
        log = work / f"llama-cpp-python-server-{threads}-{port}.log"
        self.log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(model),
                                      "--model_alias", MODEL, "--host", "127.0.0.1", "--port", str(port),
                                      "--n_threads", str(threads),
                                      "--n_ctx", str(n_ctx), "--n_batch", "512", "--verbose", "False"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        wait_http(f"http://127.0.0.1:{port}/v1/models", self.proc, log)
        super().__init__(f"http://127.0.0.1:{port}/v1", "none")

    def close(self) -> None:
        stop(self.proc)
        self.log.close()


# llama-cpp-python, whose sdist vendors the llama.cpp we build llama-server from (versions.env)
LLAMA_VERSION = pins.LLAMA_CPP_PYTHON_VERSION


def llama_server_bin() -> Path:
    """$THOX_LLAMA_SERVER, else the binary `make llama-server` caches."""
    if os.environ.get("THOX_LLAMA_SERVER"):
        return Path(os.environ["THOX_LLAMA_SERVER"])
    cache = Path(os.environ.get("THOX_CACHE", "/var/cache/thox-build"))
    return cache / f"llama-server-{LLAMA_VERSION}" / "bin" / "llama-server"


class LlamaServer(SDKEngine):
    """llama.cpp's own C++ server, configured like the other engines
    ($THOX_LLAMA_SERVER_ARGS: extra flags, for experiments)."""
    name = "llama-server"

    def __init__(self, model: Path, threads: int, n_ctx: int, work: Path, parallel: int = 1):
        from thoxtest import free_port
        exe = llama_server_bin()
        if not os.access(exe, os.X_OK):
            raise FileNotFoundError(f"{exe} is missing: build it with `make llama-server` "
                                    f"(or tests/bench/build_llama_server.sh; cached, a few minutes once)")
        port = free_port()
        log = work / f"llama-server-{threads}-{port}.log"
        self.log = open(log, "w")
        self.proc = subprocess.Popen([str(exe), "-m", str(model), "--alias", MODEL,
                                      "--host", "127.0.0.1", "--port", str(port),
                                      "-t", str(threads), "-tb", str(os.cpu_count() or 1),
                                      "-c", str(n_ctx * parallel), "-b", "512", "-ub", "512",
                                      "-np", str(parallel),
                                      "-fa", "off", "--cache-ram", "0", "--fit", "off", "--no-webui",
                                      *shlex.split(os.environ.get("THOX_LLAMA_SERVER_ARGS", ""))],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        wait_http(f"http://127.0.0.1:{port}/health", self.proc, log, ok=lambda code: code == 200)
        super().__init__(f"http://127.0.0.1:{port}/v1", "none")

    def close(self) -> None:
        stop(self.proc)
        self.log.close()


class Thox(SDKEngine):
    name = "thox"

    def __init__(self, home: Path, threads: int, n_ctx: int, work: Path, parallel: int = PARALLEL):
        self.server = thox_server(home, engine__n_threads=str(threads), engine__n_ctx=str(n_ctx),
                                  engine__parallel=str(parallel), api__queue_size="8")
        self.pid = self.server.proc.pid
        super().__init__(self.server.base_url, self.server.key)

    def close(self) -> None:
        self.server.stop()


def bench_speed(model: Path, home: Path, threads: int, rounds: int, max_tokens: int, n_ctx: int,
                work: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """All four engines up at once; each round runs its prompt on each engine
    in turn (rotating the order), so a burst of load from elsewhere on the box
    hits all of them alike. Returns ({engine: summary}, phase), phase saying how
    much of the box's CPU other processes took meanwhile (noise)."""
    engines, errors = [], {}
    for cls, arg in ((InProcess, model), (LlamaCppServer, model), (LlamaServer, model), (Thox, home)):
        try:
            engines.append(cls(arg, threads, n_ctx, work))
        except Exception as e:
            errors[cls.name] = {"error": f"{type(e).__name__}: {e}"}
    runs: dict[str, list] = {e.name: [] for e in engines}
    pids = [e.pid for e in engines]
    t0, (busy0, own0) = time.time(), cpu_seconds(pids)
    try:
        for e in list(engines):       # warm-up (model load, first allocation)
            try:
                e.run(PROMPTS[0], 16)
            except Exception as ex:
                errors[e.name] = {"error": f"{type(ex).__name__}: {ex}"}
                engines.remove(e)
        for i in range(rounds):
            prompt = PROMPTS[1 + i % (len(PROMPTS) - 1)]
            order = engines[i % len(engines):] + engines[:i % len(engines)] if engines else []
            for e in order:
                if e.name in errors:
                    continue
                try:
                    runs[e.name].append(e.run(prompt, max_tokens))
                except Exception as ex:
                    errors[e.name] = {"error": f"{type(ex).__name__}: {ex}"}
        out = {}
        for e in engines:
            if e.name in errors:
                continue
            out[e.name] = {**summarize(runs[e.name]), "peak_rss": vm(e.pid, "VmHWM"), "runs": runs[e.name]}
        ref = runs.get("in-process") if "in-process" not in errors else None
        for name, r in out.items():    # greedy: every engine should write the very same text
            if ref and name != "in-process":
                r["same_text_as_in_process"] = sum(a["text"] == b["text"] for a, b in zip(r["runs"], ref))
        wall, (busy1, own1) = time.time() - t0, cpu_seconds(pids)
        others = max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall * (os.cpu_count() or 1))
        return {**out, **errors}, {"threads": threads, "wall_s": wall, "other_cpu_share": others}
    finally:
        for e in engines:
            try:
                e.close()
            except Exception:
                pass


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120,
              ok=lambda code: code < 500) -> None:
    import httpx
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if ok(httpx.get(url, timeout=2).status_code):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not ready: {log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def thox_server(home: Path, **config: str):
    from thoxtest import Server
    return Server(home, **config)


# -- thox: second turn with a long shared prefix ------------------------------------------------------------
LONG_SYSTEM = ("You are the assistant of a small workshop that repairs bicycles, radios and clocks. "
               "Here are the workshop notes you must keep in mind. ")


def bench_second_turn(engine: SDKEngine) -> dict[str, Any]:
    try:
        client = engine.client
        notes = " ".join(f"Note {i}: the part numbered {i * 7} goes in drawer {i % 13}, and costs {i * 3} coins."
                         for i in range(60))
        msgs = [{"role": "system", "content": LONG_SYSTEM + notes},
                {"role": "user", "content": "Which drawer holds part 21?"}]
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        t0 = time.perf_counter()
        first = timed_stream(_Timed(client.chat.completions.create(
            model=MODEL, messages=msgs, max_tokens=24, stream=True,
            stream_options={"include_usage": True}, **SAMPLING), t0))
        # the follow-up turn a chat client sends: the whole conversation again
        msgs2 = msgs + [{"role": "assistant", "content": first["text"]},
                        {"role": "user", "content": "And which drawer holds part 35?"}]
        t0 = time.perf_counter()
        second = timed_stream(_Timed(client.chat.completions.create(
            model=MODEL, messages=msgs2, max_tokens=24, stream=True,
            stream_options={"include_usage": True}, **SAMPLING), t0))
        return {"prompt_tokens_first": first["usage"] and first["usage"]["prompt_tokens"],
                "prompt_tokens_second": second["usage"] and second["usage"]["prompt_tokens"],
                "ttft_first": first["ttft"], "ttft_second": second["ttft"],
                "ratio": second["ttft"] / first["ttft"] if first["ttft"] and second["ttft"] else None}
    finally:
        engine.close()


# -- thox under load ---------------------------------------------------------------------------------------------
def bench_load(home: Path, threads: int, clients: int, queue: int, rounds: int, max_tokens: int) -> dict[str, Any]:
    import httpx
    s = thox_server(home, engine__n_threads=str(threads), api__queue_size=str(queue))
    pid = s.proc.pid
    body = {"model": MODEL, "max_tokens": max_tokens, "stream": True, "temperature": 0.7,
            "messages": messages("Write a short poem about the sea.")}
    try:
        httpx.post(s.base_url + "/chat/completions", json={**body, "stream": False, "max_tokens": 2},
                   headers=s.headers, timeout=120).raise_for_status()
        base_rss = vm(pid, "VmRSS")

        def one(_):
            t0 = time.perf_counter()
            try:
                with httpx.stream("POST", s.base_url + "/chat/completions", json=body, headers=s.headers,
                                  timeout=120) as r:
                    if r.status_code != 200:
                        r.read()
                        kind = f"{r.status_code}" + (" with Retry-After" if r.headers.get("retry-after") else
                                                     " WITHOUT Retry-After")
                        return kind, None
                    ttft, done = None, False
                    for line in r.iter_lines():
                        if ttft is None and '"content":"' in line and '"content":""' not in line:
                            ttft = time.perf_counter() - t0
                        if line == "data: [DONE]":
                            done = True
                    return ("complete" if done else "cut"), ttft
            except httpx.HTTPError as e:
                return type(e).__name__, None

        outcomes = []
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(clients) as pool:
            for _ in range(rounds):
                outcomes += list(pool.map(one, range(clients)))
        wall = time.perf_counter() - t0
        deadline = time.time() + 15
        while vm(pid, "VmRSS") > base_rss + 48 * MiB and time.time() < deadline:
            time.sleep(0.5)
        kinds: dict[str, int] = {}
        for k, _ in outcomes:
            kinds[k] = kinds.get(k, 0) + 1
        ttfts = [t for k, t in outcomes if k == "complete" and t is not None]
        return {"clients": clients, "queue_size": queue, "rounds": rounds, "max_tokens": max_tokens,
                "requests": len(outcomes), "outcomes": kinds,
                "errors": {k: v for k, v in kinds.items() if k != "complete"},
                "ttft_p50": pct(ttfts, 0.5), "ttft_p99": pct(ttfts, 0.99), "wall_s": wall,
                "rss_before": base_rss, "rss_after": vm(pid, "VmRSS"), "peak_rss": vm(pid, "VmHWM")}
    finally:
        s.stop()


# -- concurrency: several streams at once, and a short request beside a long one ------------------------------------
def stream_once(client, prompt: str, max_tokens: int, t0: float | None = None) -> dict[str, Any]:
    """One greedy streamed chat completion; times from ``t0`` (default: now)."""
    t0 = time.perf_counter() if t0 is None else t0
    it = client.chat.completions.create(model=MODEL, messages=messages(prompt), max_tokens=max_tokens, stream=True,
                                        extra_body=EXTRA, **SAMPLING)
    r = timed_stream(_Timed(it, t0))
    r["end"] = time.perf_counter()
    return r


def bench_streams(engine: SDKEngine, n: int, rounds: int, max_tokens: int) -> dict[str, Any]:
    """``n`` streams started together, each with its own prompt, ``rounds``
    times: aggregate tokens/s (all tokens over the wall time of the round, best
    round) and TTFT p50/p99 over every stream of every round."""
    ttfts, aggs, tokens = [], [], []
    with cf.ThreadPoolExecutor(n) as pool:
        for r in range(rounds):
            prompts = [PROMPTS[(r * n + i) % len(PROMPTS)] for i in range(n)]
            t0 = time.perf_counter()
            runs = list(pool.map(lambda p: stream_once(engine.client, p, max_tokens, t0), prompts))
            wall = max(x["end"] for x in runs) - t0
            n_tok = sum(x["tokens"] for x in runs)
            aggs.append(n_tok / wall)
            tokens.append(n_tok)
            ttfts += [x["ttft"] for x in runs if x["ttft"] is not None]
    return {"streams": n, "agg_tps": max(aggs), "agg_tps_rounds": aggs, "tokens": tokens,
            "ttft_p50": pct(ttfts, 0.5), "ttft_p99": pct(ttfts, 0.99)}


def bench_interactive(engine: SDKEngine, rounds: int) -> dict[str, Any]:
    """A 16-token request alone, then while a 256-token stream runs (sent once
    that stream has its first token): its latency as a multiple of the idle one."""
    short = "Name three colours."
    idle = min(time_request(engine, short, 16) for _ in range(rounds))
    busy = []
    with cf.ThreadPoolExecutor(1) as pool:
        for i in range(rounds):
            first = threading.Event()
            long = pool.submit(_long_stream, engine, PROMPTS[1 + i % (len(PROMPTS) - 1)], first)
            first.wait(300)
            busy.append(time_request(engine, short, 16))
            long.result()
    b = statistics.median(busy)
    return {"idle_s": idle, "busy_s": b, "busy_runs": busy, "slowdown": b / idle if idle else None}


def time_request(engine: SDKEngine, prompt: str, max_tokens: int) -> float:
    t0 = time.perf_counter()
    r = stream_once(engine.client, prompt, max_tokens, t0)
    return r["end"] - t0


def _long_stream(engine: SDKEngine, prompt: str, first: threading.Event) -> None:
    it = engine.client.chat.completions.create(model=MODEL, messages=messages(prompt), max_tokens=256,
                                               stream=True, extra_body=EXTRA, **SAMPLING)
    for ch in it:
        if ch.choices and ch.choices[0].delta.content:
            first.set()
    first.set()


def bench_concurrency(model: Path, home: Path, thread_counts: list[int], rounds: int, max_tokens: int, n_ctx: int,
                      work: Path) -> dict[str, Any]:
    """thox (engine.parallel PARALLEL), llama-server (-np PARALLEL, each slot
    n_ctx) and llama-cpp-python's server (one sequence), one at a time, at each
    thread count. The ratios compare each server's best configuration too: on a
    small CPU a single stream can be fastest at fewer threads than a batch."""
    makers = {"thox": lambda t: Thox(home, t, n_ctx, work, PARALLEL),
              "llama-server": lambda t: LlamaServer(model, t, n_ctx, work, PARALLEL),
              "llama-cpp": lambda t: LlamaCppServer(model, t, n_ctx, work)}
    out: dict[str, Any] = {"thread_counts": thread_counts, "parallel": PARALLEL, "max_tokens": max_tokens,
                           "rounds": rounds, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
                           "by_threads": {}}
    for t in thread_counts:
        row: dict[str, Any] = {}
        for name, make in makers.items():
            print(f"    concurrency: {name}, {t} thread(s) ...", flush=True)
            row[name] = _concurrency_one(make, t, rounds, max_tokens)
        out["by_threads"][t] = row
    out["ratios"] = concurrency_ratios(out["by_threads"])
    return out


def _concurrency_one(make, threads: int, rounds: int, max_tokens: int) -> dict[str, Any]:
    t0 = time.time()
    try:
        e = make(threads)
    except Exception as ex:
        return {"error": f"{type(ex).__name__}: {ex}"}
    try:
        pids = [e.pid]
        busy0, own0 = cpu_seconds(pids)
        stream_once(e.client, PROMPTS[0], 8)            # warm-up
        levels = {n: bench_streams(e, n, rounds, max_tokens) for n in STREAMS}
        inter = bench_interactive(e, rounds)
        wall = time.time() - t0
        busy1, own1 = cpu_seconds(pids)
        others = max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall * (os.cpu_count() or 1))
        return {"levels": levels, "interactive": inter, "peak_rss": vm(e.pid, "VmHWM"), "wall_s": wall,
                "other_cpu_share": others}
    except Exception as ex:
        return {"error": f"{type(ex).__name__}: {ex}"}
    finally:
        e.close()


def best_level(by_threads: dict[int, dict[str, Any]], server: str, streams: int) -> tuple[float, int] | None:
    """A server's best aggregate tok/s at ``streams`` streams over the thread counts, and that count."""
    got = [(row[server]["levels"][streams]["agg_tps"], t) for t, row in by_threads.items()
           if "levels" in row.get(server, {})]
    return max(got) if got else None


def concurrency_ratios(by_threads: dict[int, dict[str, Any]]) -> dict[str, float]:
    """Per thread count (same threads for both sides), then best against best."""
    ratios: dict[str, float] = {}
    for t, row in by_threads.items():
        ok = {k: v["levels"] for k, v in row.items() if "levels" in v}
        if "thox" in ok:
            ratios[f"{t}t: thox 4 streams / thox 1 stream"] = ok["thox"][4]["agg_tps"] / ok["thox"][1]["agg_tps"]
            if "llama-server" in ok:
                ratios[f"{t}t: thox 4 streams / llama-server 4 streams"] = \
                    ok["thox"][4]["agg_tps"] / ok["llama-server"][4]["agg_tps"]
                ratios[f"{t}t: thox 1 stream / llama-server 1 stream"] = \
                    ok["thox"][1]["agg_tps"] / ok["llama-server"][1]["agg_tps"]
        if "llama-server" in ok:
            ratios[f"{t}t: llama-server 4 streams / llama-server 1 stream"] = \
                ok["llama-server"][4]["agg_tps"] / ok["llama-server"][1]["agg_tps"]
    best = {(s, n): best_level(by_threads, s, n) for s in ("thox", "llama-server") for n in (1, 4)}
    if best[("thox", 4)] and best[("thox", 1)]:
        ratios["best: thox 4 streams / thox 1 stream"] = best[("thox", 4)][0] / best[("thox", 1)][0]
    if best[("thox", 4)] and best[("llama-server", 4)]:
        ratios["best: thox 4 streams / llama-server 4 streams"] = \
            best[("thox", 4)][0] / best[("llama-server", 4)][0]
    if best[("thox", 1)] and best[("llama-server", 1)]:
        ratios["best: thox 1 stream / llama-server 1 stream"] = best[("thox", 1)][0] / best[("llama-server", 1)][0]
    if best[("llama-server", 4)] and best[("llama-server", 1)]:
        ratios["best: llama-server 4 streams / llama-server 1 stream"] = \
            best[("llama-server", 4)][0] / best[("llama-server", 1)][0]
    return ratios


def report_concurrency(c: dict[str, Any]) -> list[str]:
    out = [f"concurrency: greedy, {c['max_tokens']} tokens per stream, a different prompt each, best of "
           f"{c['rounds']} rounds, at {', '.join(map(str, c['thread_counts']))} thread(s); thox "
           f"engine.parallel={c['parallel']}, llama-server -np {c['parallel']}, llama-cpp one sequence; "
           f"OMP_WAIT_POLICY={c.get('omp_wait_policy')} for all"]
    hdr = f"{'server':<13}{'threads':>8}{'streams':>8}{'agg tok/s':>11}{'vs 1':>7}{'TTFT p50':>10}{'TTFT p99':>10}"
    out += [hdr, "-" * len(hdr)]
    rows = c["by_threads"]
    for name in SERVERS:
        for t, row in rows.items():
            r = row.get(name)
            if r is None:
                continue
            if "error" in r:
                out.append(f"{name:<13}{t:>8}  error: {r['error'][:100]}")
                continue
            one = r["levels"][1]["agg_tps"]
            for n, lv in sorted(r["levels"].items()):
                out.append(f"{name:<13}{t:>8}{n:>8}{fmt(lv['agg_tps']):>11}{fmt(lv['agg_tps'] / one, 'x', 2):>7}"
                           f"{fmt(lv['ttft_p50'], 'ms'):>10}{fmt(lv['ttft_p99'], 'ms'):>10}")
    for name in SERVERS:
        for t, row in rows.items():
            r = row.get(name)
            if r and "interactive" in r:
                i = r["interactive"]
                out.append(f"interactive ({name}, {t}t): 16-token request {fmt(i['idle_s'], 'ms')} idle, "
                           f"{fmt(i['busy_s'], 'ms')} beside a 256-token stream = {fmt(i['slowdown'], 'x', 2)}; "
                           f"peak RSS {fmt(r['peak_rss'], 'MiB')}; other processes took "
                           f"{r['other_cpu_share']:.0%} of the CPU")
    for k, v in c.get("ratios", {}).items():
        out.append(f"ratio {k:<54} {fmt(v, digits=2)}")
    return out


# -- report --------------------------------------------------------------------------------------------------------
def fmt(v: Any, unit: str = "", digits: int = 1) -> str:
    if v is None:
        return "-"
    if unit == "ms":
        return f"{v * 1000:.0f} ms"
    if unit == "MiB":
        return f"{v / MiB:.0f} MiB"
    return f"{v:.{digits}f}{unit}"


def report(res: dict[str, Any]) -> str:
    out = []
    e = res["engines"]
    out.append(f"thox bench: {res['model']} ({res['model_file']}), greedy, {res['max_tokens']} tokens, "
               f"streaming, best of {res['rounds']} rounds; {res['machine']}, "
               f"OMP_WAIT_POLICY={res.get('omp_wait_policy', 'default')}")
    hdr = f"{'engine':<13}{'threads':>8}{'decode tok/s':>14}{'e2e tok/s':>11}{'TTFT p50':>10}{'TTFT p99':>10}" \
          f"{'peak RSS':>10}  tokens per round"
    out += [hdr, "-" * len(hdr)]
    for name in ENGINES:
        for t, r in sorted(e.get(name, {}).items()):
            out.append(f"{name:<13}{t:>8}" + (
                f"  error: {r['error'][:80]}" if "error" in r else
                f"{fmt(r['decode_tps_best']):>14}{fmt(r['e2e_tps_best']):>11}{fmt(r['ttft_p50'], 'ms'):>10}"
                f"{fmt(r['ttft_p99'], 'ms'):>10}{fmt(r['peak_rss'], 'MiB'):>10}"
                f"  {'/'.join(str(x) for x in r['tokens'])}"))
    same = []
    for name in ENGINES:
        by_t = [f"{r['same_text_as_in_process']}/{r['rounds']}" for t, r in sorted(e.get(name, {}).items())
                if "same_text_as_in_process" in r]
        if by_t:
            same.append(f"{name} {' '.join(by_t)}")
    if same:
        out.append("greedy output identical to in-process (rounds, for each thread count): " + ", ".join(same))
    for ph in res.get("phases", []):
        busy = ph["other_cpu_share"] > 0.1
        out.append(f"{ph['threads']}-thread phase: {ph['wall_s']:.0f}s, other processes took "
                   f"{ph['other_cpu_share']:.0%} of the CPU" + (" (busy box: these rows are noisy, "
                                                                 "TTFT most of all; rerun when idle)" if busy else ""))
    out.append("")
    for k, v in res["best"].items():
        out.append(f"best decode tok/s {k:<12} {fmt(v['decode_tps'])} ({v['threads']} threads)")
    for k, v in res["ratios"].items():
        out.append(f"ratio {k:<24} {fmt(v, digits=2)}")
    for k, v in res.get("reference_ratios", {}).items():
        out.append(f"reference {k:<20} {fmt(v, digits=2)}")
    for name, st in (res.get("second_turn") or {}).items():
        out.append(f"second turn ({name}): " + (
            f"error: {st['error'][:200]}" if "error" in st else
            f"prompt {st['prompt_tokens_first']} -> {st['prompt_tokens_second']} tokens, sharing the first "
            f"as prefix: TTFT {fmt(st['ttft_first'], 'ms')} -> {fmt(st['ttft_second'], 'ms')} "
            f"(ratio {fmt(st['ratio'], digits=2)})"))
    ld = res.get("load")
    if ld and "error" not in ld:
        out.append(f"load (thox): {ld['clients']} concurrent streaming clients x {ld['rounds']} rounds, queue "
                   f"{ld['queue_size']} (+1 running), {ld['max_tokens']} tokens: {ld['requests']} requests, "
                   f"outcomes {ld['outcomes']}, TTFT p50 {fmt(ld['ttft_p50'], 'ms')} p99 "
                   f"{fmt(ld['ttft_p99'], 'ms')}, {fmt(ld['wall_s'], 's')}; RSS {fmt(ld['rss_before'], 'MiB')} -> "
                   f"{fmt(ld['rss_after'], 'MiB')} (peak {fmt(ld['peak_rss'], 'MiB')})")
    if ld and "error" in ld:
        out.append(f"load: error: {ld['error'][:200]}")
    if res.get("concurrency"):
        out.append("")
        out += report_concurrency(res["concurrency"])
    return "\n".join(out)


def strip_runs(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: strip_runs(v) for k, v in d.items() if k not in ("text", "usage")}
    if isinstance(d, list):
        return [strip_runs(x) for x in d]
    return d


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="build/bench.json")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--load-clients", type=int, default=12)
    ap.add_argument("--load-queue", type=int, default=2)
    ap.add_argument("--load-rounds", type=int, default=3)
    ap.add_argument("--concurrency-rounds", type=int, default=2)
    ap.add_argument("--only-concurrency", action="store_true", help="just the concurrency table")
    ap.add_argument("--quick", action="store_true", help="1 round, 2 threads only, 32 tokens")
    ap.add_argument("--inprocess-worker", metavar="GGUF", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.inprocess_worker:
        inprocess_worker(a.inprocess_worker, int(a.threads), a.n_ctx)
        return 0
    if a.quick:
        a.rounds, a.threads, a.max_tokens = 1, "2", 32
    threads = [int(x) for x in a.threads.split(",")]
    from thoxtest import run_thox
    # every engine's llama.cpp threads wait at OpenMP barriers the way thox's do (thox.engine sets
    # PASSIVE unless the environment says otherwise), so the engines differ only in their own work
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    t_start = time.time()
    work = Path(tempfile.mkdtemp(prefix="thox-bench-"))
    home = work / "home"
    home.mkdir()
    try:
        print(f"installing {MODEL} into {home} ...", flush=True)
        run_thox(home, "models", "demo")
        model = Path(run_thox(home, "models", "path", MODEL).stdout.strip())
        res: dict[str, Any] = {
            "model": MODEL, "model_file": model.name, "max_tokens": a.max_tokens, "rounds": a.rounds,
            "sampling": {**SAMPLING, **EXTRA}, "threads": threads, "prompts": [PROMPTS[1 + i % (len(PROMPTS) - 1)] for i in range(a.rounds)],
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
            "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
            "engines": {name: {} for name in ENGINES},
            "llama_server": str(llama_server_bin()),
        }
        for t in ([] if a.only_concurrency else threads):
            print(f"  [{time.time() - t_start:3.0f}s] speed, {t} thread(s): {', '.join(ENGINES)}; {a.rounds} rounds ...", flush=True)
            by_engine, phase = bench_speed(model, home, t, a.rounds, a.max_tokens, a.n_ctx, work)
            for name, r in by_engine.items():
                res["engines"][name][t] = r
            res.setdefault("phases", []).append(phase)
        best: dict[str, Any] = {}
        for name, by_t in res["engines"].items():
            ok = [(r["decode_tps_best"], t, r) for t, r in by_t.items() if r.get("decode_tps_best")]
            if ok:
                tps, t, r = max(ok, key=lambda x: x[0])
                best[name] = {"decode_tps": tps, "threads": t, "e2e_tps": r["e2e_tps_best"],
                              "ttft_best": r["ttft_best"]}
        res["best"] = best
        ratios = {}
        if "thox" in best:
            for other in ("in-process", "llama-cpp", "llama-server"):
                if other in best:
                    ratios[f"thox/{other} (decode)"] = best["thox"]["decode_tps"] / best[other]["decode_tps"]
                    if best[other]["e2e_tps"]:
                        ratios[f"thox/{other} (e2e)"] = best["thox"]["e2e_tps"] / best[other]["e2e_tps"]
        res["ratios"] = ratios
        res["reference_ratios"] = {f"{o}/in-process (decode)": best[o]["decode_tps"] / best["in-process"]["decode_tps"]
                                   for o in ("llama-server", "llama-cpp") if o in best and "in-process" in best}
        tbest = best.get("thox", {}).get("threads", threads[-1])
        res["second_turn"] = {}
        for name, make in () if a.only_concurrency else (
                ("thox", lambda: Thox(home, tbest, a.n_ctx, work)),
                ("llama-server", lambda: LlamaServer(model, tbest, a.n_ctx, work))):
            print(f"  [{time.time() - t_start:3.0f}s] {name}, second turn with a shared 1,000+ token prompt ...", flush=True)
            try:
                res["second_turn"][name] = bench_second_turn(make())
            except Exception as e:
                res["second_turn"][name] = {"error": f"{type(e).__name__}: {e}"}
        if not a.only_concurrency:
            print(f"  [{time.time() - t_start:3.0f}s] thox under load ...", flush=True)
            try:
                res["load"] = bench_load(home, tbest, a.load_clients, a.load_queue, a.load_rounds,
                                         min(a.max_tokens, 48))
            except Exception as e:
                res["load"] = {"error": f"{type(e).__name__}: {e}"}
        print(f"  [{time.time() - t_start:3.0f}s] concurrency: {', '.join(SERVERS)} at {STREAMS} streams, "
              f"{threads} thread(s) ...", flush=True)
        # every thread count: all cores is the service's default (engine.n_threads 0), but on a
        # small CPU one stream can be fastest on fewer threads, so "scaling" compares best with best
        res["concurrency"] = bench_concurrency(model, home, threads, a.concurrency_rounds, a.max_tokens,
                                               a.n_ctx, work)
        res["wall_s"] = time.time() - t_start
        text = report(res)
        print("\n" + text)
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**strip_runs(res), "table": text}, indent=1))
        logs = out.parent / "bench-logs"
        shutil.rmtree(logs, ignore_errors=True)
        logs.mkdir()
        for f in [*work.glob("*.log"), *home.glob("serve-*.log")]:
            shutil.copy(f, logs / f.name)
        print(f"\nwrote {out} ({res['wall_s']:.0f}s); server logs in {logs}/")
        failed = [f"{n}/{t}" for n, by_t in res["engines"].items() for t, r in by_t.items() if "error" in r]
        return 1 if failed else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
