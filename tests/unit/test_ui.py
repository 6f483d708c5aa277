"""thox.ui: the one byte/rate/duration formatter and the progress renderers."""

from __future__ import annotations

import io
import math

import pytest

from thox.ui import (LineProgress, PullProgress, TerminalProgressBar, describe_progress, format_bytes,
                     format_duration, format_rate)


@pytest.mark.parametrize("n, text", [
    (None, "?"),
    (0, "0 B"),
    (1023, "1023 B"),
    (1024, "1.0 KiB"),
    (1536, "1.5 KiB"),
    (1_048_576, "1.0 MiB"),
    (4_683_073_504, "4.4 GiB"),
    (5 << 40, "5.0 TiB"),
    (1 << 50, "1024.0 TiB"),     # no unit above TiB
    (-2048, "-2.0 KiB"),
    (1.5, "2 B"),
])
def test_format_bytes_binary_units(n, text):
    assert format_bytes(n) == text


@pytest.mark.parametrize("rate, text", [(None, "--/s"), (0, "--/s"), (-1, "--/s"), (11_500_000, "11.0 MiB/s"),
                                        (512, "512 B/s")])
def test_format_rate(rate, text):
    assert format_rate(rate) == text


@pytest.mark.parametrize("s, text", [
    (None, "--"), (math.nan, "--"), (math.inf, "--"),
    (0, "0s"), (-3, "0s"), (59.4, "59s"), (59.6, "1m00s"), (121, "2m01s"), (300, "5m00s"),
    (3599, "59m59s"), (3600, "1h00m"), (3725, "1h02m"), (90_000, "25h00m"),
])
def test_format_duration(s, text):
    assert format_duration(s) == text


def test_fraction():
    assert PullProgress("m", "downloading", done=5, total=10).fraction == 0.5
    assert PullProgress("m", "downloading", done=15, total=10).fraction == 1.0
    assert PullProgress("m", "downloading", done=5).fraction is None
    assert PullProgress("m", "downloading", done=5, total=0).fraction is None


def test_describe_progress():
    p = PullProgress("thox-coder-7b", "downloading", done=1_900_000_000, total=4_683_000_000, rate=23_400_000,
                     eta=121)
    assert describe_progress(p) == "thox-coder-7b: 41% 1.8 GiB of 4.4 GiB, 22.3 MiB/s, ETA 2m01s"
    assert describe_progress(PullProgress("m", "downloading", done=2048)) == "m: 2.0 KiB, --/s, ETA --"
    assert describe_progress(PullProgress("m", "retrying", message="lost; retrying")) == "m: lost; retrying"
    assert describe_progress(PullProgress("m", "done", done=1024)) == "m: done, 1.0 KiB"
    assert describe_progress(PullProgress("m", "done", done=1024, message="already installed")) == \
        "m: done, 1.0 KiB (already installed)"


def test_line_progress_prints_each_decile_and_every_state_change():
    out = io.StringIO()
    lines = LineProgress(out, interval=3600)
    for done in (1, 5, 9, 10, 11, 55, 100):
        lines(PullProgress("m", "downloading", done=done, total=100))
    lines(PullProgress("m", "connecting"))                   # no message: nothing to say
    lines(PullProgress("m", "retrying", message="again"))
    lines(PullProgress("m", "done", done=100, total=100))
    assert [ln.split(" ")[1] for ln in out.getvalue().splitlines()[:4]] == ["1%", "10%", "55%", "100%"]
    assert out.getvalue().splitlines()[4:] == ["m: again", "m: done, 100 B"]


def test_terminal_bar_redraws_one_line():
    out = io.StringIO()
    bar = TerminalProgressBar(out, min_interval=0)
    p = PullProgress("a-model-with-a-rather-long-name-indeed", "downloading", done=50, total=100)
    line = bar.line(p)
    assert line.startswith("a-model-with-a-rather-lo [") and " 50%" in line and len(line) <= bar._width()
    drawn = line[line.index("[") + 1:line.index("]")]
    assert set(drawn) == {"#", "-"} and drawn.count("#") == len(drawn) // 2 and drawn.startswith("#")
    unknown = bar.line(PullProgress("m", "downloading", done=50))
    drawn = unknown[unknown.index("[") + 1:unknown.index("]")]
    assert drawn.count("#") == 1 and "%" not in unknown     # no length: one moving marker
    bar(p)
    bar(PullProgress("m", "verifying", message="verifying"))
    s = out.getvalue()
    assert s.startswith("\r\x1b[K" + line[:20]) and s.endswith("\r\x1b[Km: verifying\n")
