"""Incremental text assembly for a token stream: UTF-8 across token
boundaries, stop strings, and capture markers (tool calls).

Text that might be the beginning of a stop string or marker is held back
until it is known not to be one, so a client never sees part of a stop
sequence."""

from __future__ import annotations

import codecs


class TextStream:
    def __init__(self, stop: list[str], markers: list[str] | None = None):
        self.stop = [s for s in stop if s]
        self.markers = [m for m in (markers or []) if m]
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""        # decoded, not yet released
        self.captured: str | None = None   # set once a marker is seen
        self.stopped = False

    def _watch(self) -> list[str]:
        return self.stop + (self.markers if self.captured is None else [])

    def feed(self, data: bytes) -> str:
        """Add the bytes of one token; return the text that may be shown now."""
        text = self._dec.decode(data)
        if self.captured is not None:
            return self._feed_captured(text)
        self._pending += text
        return self._release(final=False)

    def _feed_captured(self, text: str) -> str:
        self.captured += text
        for s in self.stop:
            i = self.captured.find(s)
            if i >= 0:
                self.captured = self.captured[:i]
                self.stopped = True
        return ""

    def _release(self, final: bool) -> str:
        buf = self._pending
        # earliest complete stop string or marker
        best, which = -1, None
        for s in self._watch():
            i = buf.find(s)
            if i >= 0 and (best < 0 or i < best):
                best, which = i, s
        if which is not None:
            out = buf[:best]
            self._pending = ""
            if which in self.stop:
                self.stopped = True
            else:
                self.captured = ""
                self._feed_captured(buf[best:])
            return out
        if final:
            self._pending = ""
            return buf
        # hold back the longest suffix that is a prefix of a watched string
        hold = 0
        for s in self._watch():
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out, self._pending = buf[:len(buf) - hold], buf[len(buf) - hold:]
        return out

    def flush(self) -> str:
        """End of generation: release whatever is still held."""
        tail = self._dec.decode(b"", final=True)
        if self.captured is not None:
            self._feed_captured(tail)
            return ""
        self._pending += tail
        return self._release(final=True)
