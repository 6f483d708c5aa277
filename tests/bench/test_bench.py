"""Fast checks of the benchmark harness (not the benchmark: that is `make bench`).

Under a second: the report renders all four engines and the ratios, a missing
llama-server binary says how to build it, and the cached llama-server (`make test`
builds it: `make llama-server`) accepts every flag the bench passes it.
"""

from __future__ import annotations

import inspect
import re
import subprocess
from pathlib import Path

import pytest

from bench import run
from thoxtest import require


def _row(tps: float) -> dict:
    return {"rounds": 2, "tokens": [128, 128], "decode_tps_best": tps, "decode_tps_median": tps,
            "e2e_tps_best": tps * 0.95, "ttft_p50": 0.05, "ttft_p99": 0.06, "ttft_best": 0.05,
            "peak_rss": 200 << 20}


def test_report_has_every_engine_and_ratio():
    res = {"model": "thox-demo", "model_file": "m.gguf", "max_tokens": 128, "rounds": 2, "machine": "x",
           "engines": {"in-process": {1: _row(150)}, "llama-cpp": {1: _row(130)},
                       "llama-server": {1: _row(165), 2: {"error": "FileNotFoundError: build it"}},
                       "thox": {1: _row(160)}},
           "best": {n: {"decode_tps": t, "threads": 1} for n, t in
                    (("in-process", 150), ("llama-cpp", 130), ("llama-server", 165), ("thox", 160))},
           "ratios": {"thox/in-process (decode)": 160 / 150, "thox/llama-server (decode)": 160 / 165},
           "reference_ratios": {"llama-server/in-process (decode)": 1.1},
           "second_turn": {"thox": {"prompt_tokens_first": 1500, "prompt_tokens_second": 1530, "ttft_first": 4.0,
                                    "ttft_second": 0.08, "ratio": 0.02},
                           "llama-server": {"error": "FileNotFoundError: x"}}}
    text = run.report(res)
    for needle in ("llama-server        1         165.0", "llama-server        2  error: FileNotFoundError",
                   "ratio thox/llama-server (decode) 0.97", "reference llama-server/in-process (decode) 1.10",
                   "second turn (thox): prompt 1500 -> 1530", "second turn (llama-server): error"):
        assert needle in text, text


def test_missing_llama_server_says_how_to_build(tmp_path, monkeypatch):
    monkeypatch.setenv("THOX_LLAMA_SERVER", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="make llama-server"):
        run.LlamaServer(tmp_path / "m.gguf", 1, 2048, tmp_path)


def test_cached_llama_server_knows_our_flags():
    """Every flag the bench's LlamaServer passes (read from its code) is one llama-server lists."""
    exe = run.llama_server_bin()
    require(exe.exists(), f"{exe} is not built (make llama-server)")
    help_text = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=30).stdout
    known = set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", help_text))
    ours = re.findall(r'"(--?[a-z][a-z-]*)"', inspect.getsource(run.LlamaServer.__init__))
    assert len(ours) >= 10 and "--cache-ram" in ours, ours
    assert not set(ours) - known, sorted(set(ours) - known)


def _levels(one: float, four: float) -> dict:
    return {"levels": {n: {"agg_tps": v, "ttft_p50": 0.1, "ttft_p99": 0.2} for n, v in
                       ((1, one), (2, (one + four) / 2), (4, four), (8, four))},
            "interactive": {"idle_s": 0.3, "busy_s": 0.45, "slowdown": 1.5}, "peak_rss": 300 << 20,
            "other_cpu_share": 0.0}


def test_concurrency_ratios_compare_each_thread_count_and_best_with_best():
    """A server whose single stream is fastest at 1 thread is measured against that, not its 2-thread figure."""
    by_threads = {1: {"thox": _levels(150, 180), "llama-server": _levels(152, 170), "llama-cpp": {"error": "x"}},
                  2: {"thox": _levels(40, 112), "llama-server": _levels(45, 108), "llama-cpp": _levels(42, 40)}}
    r = run.concurrency_ratios(by_threads)
    assert r["2t: thox 4 streams / thox 1 stream"] == 112 / 40
    assert r["best: thox 4 streams / thox 1 stream"] == 180 / 150
    assert r["best: thox 4 streams / llama-server 4 streams"] == 180 / 170
    assert r["best: llama-server 4 streams / llama-server 1 stream"] == 170 / 152
    text = "\n".join(run.report_concurrency({"max_tokens": 128, "rounds": 2, "thread_counts": [1, 2], "parallel": 4,
                                             "by_threads": by_threads, "ratios": r}))
    for needle in ("thox                1       4      180.0", "llama-cpp           1  error: x",
                   "interactive (thox, 2t)", "ratio best: thox 4 streams / thox 1 stream"):
        assert needle in text, text
