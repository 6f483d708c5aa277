"""How sizes, rates, durations and download progress are written for people:
the CLI, its progress bar and the web page all use these.

Sizes use binary units (1 KiB = 1024 B). Durations read ``42s``, ``2m01s``,
``1h05m``. An unknown value is ``?`` (size) or ``--`` (rate, duration).
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Callable, TextIO

SIZE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(n: float | None) -> str:
    """``0 B``, ``512 B``, ``1.5 KiB``, ``4.4 GiB``; ``?`` when unknown."""
    if n is None:
        return "?"
    x, i = float(n), 0
    while abs(x) >= 1024 and i < len(SIZE_UNITS) - 1:
        x /= 1024
        i += 1
    return f"{x:.0f} B" if i == 0 else f"{x:.1f} {SIZE_UNITS[i]}"


def format_rate(bytes_per_second: float | None) -> str:
    """``22.3 MiB/s``; ``--/s`` while no rate is known."""
    if not bytes_per_second or bytes_per_second <= 0:
        return "--/s"
    return f"{format_bytes(bytes_per_second)}/s"


def format_duration(seconds: float | None) -> str:
    """``42s``, ``2m01s``, ``1h05m``; ``--`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "--"
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


# --------------------------------------------------------------------------- download progress

@dataclass
class PullProgress:
    """One progress report of a model download. ``phase`` is ``connecting``,
    ``resuming`` (hashing the bytes a previous attempt left), ``downloading``,
    ``retrying``, ``verifying`` or ``done``. ``total`` is None when the server
    sends no length; ``rate`` is bytes/second (smoothed); ``eta`` seconds or None."""

    model: str
    phase: str
    done: int = 0
    total: int | None = None
    rate: float = 0.0
    eta: float | None = None
    attempt: int = 1
    message: str = ""
    url: str = ""

    @property
    def fraction(self) -> float | None:
        if not self.total:
            return None
        return min(1.0, self.done / self.total)


ProgressCallback = Callable[[PullProgress], None]
_NOTICE_PHASES = ("retrying", "connecting", "verifying", "resuming")


def describe_progress(p: PullProgress) -> str:
    """One line: ``thox-coder-7b: 41% 1.8 GiB of 4.4 GiB, 22.3 MiB/s, ETA 2m01s``."""
    if p.phase in _NOTICE_PHASES and p.message:
        return f"{p.model}: {p.message}"
    if p.phase == "done":
        return f"{p.model}: done, {format_bytes(p.done)}" + (f" ({p.message})" if p.message else "")
    frac = p.fraction
    pct = f"{frac * 100:.0f}% " if frac is not None else ""
    of = f" of {format_bytes(p.total)}" if p.total else ""
    return f"{p.model}: {pct}{format_bytes(p.done)}{of}, {format_rate(p.rate)}, ETA {format_duration(p.eta)}"


class TerminalProgressBar:
    """Redraws one terminal line: name, bar, percent, bytes, rate, ETA. State
    changes (retry, verify, done) are printed as lines of their own."""

    def __init__(self, stream: TextIO | None = None, min_interval: float = 0.1):
        self.stream = stream or sys.stderr
        self.min_interval = min_interval
        self._last = 0.0
        self._drawn = False

    def _width(self) -> int:
        return max(40, shutil.get_terminal_size((80, 20)).columns - 1)

    def line(self, p: PullProgress) -> str:
        width = self._width()
        frac = p.fraction
        stats = (f" {frac * 100:3.0f}%" if frac is not None else "") + \
            f" {format_bytes(p.done)}/{format_bytes(p.total)} {format_rate(p.rate)} ETA {format_duration(p.eta)}"
        label = p.model[:24]
        barw = max(10, width - len(label) - len(stats) - 4)
        if frac is None:   # no length known: a marker that moves
            pos = int(time.monotonic() * 8) % barw
            bar = "-" * pos + "#" + "-" * (barw - pos - 1)
        else:
            filled = int(frac * barw)
            bar = "#" * filled + "-" * (barw - filled)
        return f"{label} [{bar}]{stats}"[:width]

    def __call__(self, p: PullProgress) -> None:
        if p.phase == "downloading":
            now = time.monotonic()
            if now - self._last < self.min_interval:
                return
            self._last = now
            self.stream.write("\r\x1b[K" + self.line(p))
            self._drawn = True
        else:
            if self._drawn:
                self.stream.write("\r\x1b[K")
                self._drawn = False
            if p.phase == "done" or p.message:
                self.stream.write(describe_progress(p) + "\n")
        self.stream.flush()


class LineProgress:
    """Plain lines for logs and pipes: one every ``interval`` seconds or every
    10 percent, plus one per state change (retry, verify, done)."""

    def __init__(self, stream: TextIO | None = None, interval: float = 10.0):
        self.stream = stream or sys.stderr
        self.interval = interval
        self._last = 0.0
        self._last_decile = -1

    def __call__(self, p: PullProgress) -> None:
        if p.phase == "downloading":
            now = time.monotonic()
            frac = p.fraction
            decile = int(frac * 10) if frac is not None else -1
            if now - self._last < self.interval and decile == self._last_decile:
                return
            self._last, self._last_decile = now, decile
        elif not p.message and p.phase != "done":
            return
        self.stream.write(describe_progress(p) + "\n")
        self.stream.flush()


def progress_renderer(stream: TextIO | None = None) -> ProgressCallback:
    """A progress bar on a terminal, plain lines otherwise (stderr by default)."""
    stream = stream or sys.stderr
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return TerminalProgressBar(stream) if tty else LineProgress(stream)


class StepProgress:
    """Progress of a job that reports a percentage and a step name (a
    firmware install): a redrawn bar on a terminal, else one line per new
    step. Call ``end()`` after the last report."""

    def __init__(self, label: str, stream: TextIO | None = None):
        self.label = label
        self.stream = stream or sys.stderr
        try:
            self.tty = self.stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self._last: tuple[int, str] | None = None

    def __call__(self, percent: int, step: str) -> None:
        if (percent, step) == self._last:
            return
        self._last = (percent, step)
        if self.tty:
            width = max(40, shutil.get_terminal_size((80, 20)).columns - 1)
            stats = f" {percent:3d}% {step}"
            barw = max(10, min(40, width - len(self.label) - len(stats) - 4))
            filled = int(percent * barw / 100)
            self.stream.write(f"\r\x1b[K{self.label} [{'#' * filled}{'-' * (barw - filled)}]{stats}"[:width + 5])
        else:
            self.stream.write(f"{self.label}: {percent}% {step}\n")
        self.stream.flush()

    def end(self) -> None:
        if self.tty and self._last is not None:
            self.stream.write("\n")
            self.stream.flush()


__all__ = [
    "SIZE_UNITS", "format_bytes", "format_rate", "format_duration", "PullProgress", "ProgressCallback",
    "describe_progress", "TerminalProgressBar", "LineProgress", "progress_renderer", "StepProgress",
]
