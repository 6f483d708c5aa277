"""thox.engine.textstream.TextStream: UTF-8 across token boundaries, stop
strings held back until decided, capture markers (tool calls)."""

from __future__ import annotations

import pytest

from thox.engine.textstream import TextStream


def run(ts: TextStream, pieces: list[bytes]) -> tuple[list[str], str]:
    """Feed the pieces until the stream says it stopped, as the scheduler does;
    returns what each feed released and what flush released."""
    out = []
    for p in pieces:
        if ts.stopped:
            break
        out.append(ts.feed(p))
    return out, ts.flush()


def test_plain_text_passes_through_as_it_comes():
    out, tail = run(TextStream(stop=[]), [b"Hello", b", ", b"world"])
    assert out == ["Hello", ", ", "world"] and tail == ""


def test_utf8_split_across_tokens_is_joined():
    euro = "€".encode()                       # 3 bytes
    out, tail = run(TextStream(stop=[]), [b"a" + euro[:1], euro[1:2], euro[2:] + b"b"])
    assert out == ["a", "", "€b"] and tail == ""


def test_an_unfinished_utf8_sequence_at_the_end_becomes_a_replacement_character():
    out, tail = run(TextStream(stop=[]), [b"ok", "€".encode()[:2]])
    assert "".join(out) == "ok" and tail == "\ufffd"


def test_a_stop_string_split_across_tokens_is_never_shown():
    ts = TextStream(stop=["</end>"])
    out, tail = run(ts, [b"answer </e", b"nd> and more", b"never fed"])
    assert out == ["answer ", ""] and tail == "" and ts.stopped


def test_a_held_prefix_that_is_not_a_stop_string_is_released():
    ts = TextStream(stop=["STOP"])
    assert ts.feed(b"go ST") == "go "
    assert ts.feed(b"OP?") == ""              # now it is the stop string
    assert ts.stopped
    ts = TextStream(stop=["STOP"])
    assert ts.feed(b"go ST") == "go "
    assert ts.feed(b"ILL") == "STILL"          # not a stop string after all
    assert ts.feed(b" S") == " " and ts.flush() == "S" and not ts.stopped


def test_the_earliest_of_several_stop_strings_wins():
    ts = TextStream(stop=["\n\n", "###", ""])     # empty stop strings are ignored
    assert ts.feed(b"one ### two\n\nthree") == "one " and ts.stopped


def test_a_marker_captures_the_rest():
    ts = TextStream(stop=["<|end|>"], markers=["<tool_call>"])
    out, tail = run(ts, [b"Let me check.<tool", b"_call>{\"name\": \"f\"}", b"<|end|>ignored"])
    assert "".join(out) + tail == "Let me check."
    assert ts.captured == "<tool_call>{\"name\": \"f\"}" and ts.stopped


def test_text_after_the_capture_begins_is_not_released_even_at_flush():
    ts = TextStream(stop=[], markers=["[CALL]"])
    assert ts.feed(b"x [CALL] a") == "x "
    assert ts.feed(b"b") == "" and ts.flush() == ""
    assert ts.captured == "[CALL] ab" and not ts.stopped


@pytest.mark.parametrize("cut", range(1, 7))
def test_any_split_of_a_stop_string_gives_the_same_text(cut):
    data = b"abc STOP def"
    ts = TextStream(stop=["STOP"])
    out, tail = run(ts, [data[:4 + cut], data[4 + cut:]])
    assert "".join(out) + tail == "abc " and ts.stopped
