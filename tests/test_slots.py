"""Slot choice and prefix reuse (thox.engine.slots), without a model."""

from __future__ import annotations

from thox.engine.slots import COPY_MIN, Slot, choose_slot, common_prefix, keep_for


def slot(seq: int, tokens: list[int], n_exact: int | None = None, last_used: float = 0.0) -> Slot:
    return Slot(seq=seq, tokens=list(tokens), n_exact=len(tokens) if n_exact is None else n_exact,
                last_used=last_used)


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([], [1]) == 0 and common_prefix([1, 2], [1, 2]) == 2


def test_keep_for_always_evaluates_at_least_the_last_two_prompt_tokens():
    assert keep_for(10, 10) == 8          # the whole prompt cached: its last two are evaluated again
    assert keep_for(10, 9) == 8 and keep_for(10, 8) == 8
    assert keep_for(10, 3) == 3
    assert keep_for(1, 5) == 0 and keep_for(2, 2) == 0 and keep_for(2, 0) == 0


def test_a_continued_conversation_takes_its_own_slot():
    a = slot(0, [1, 2, 3, 4, 5, 6, 7, 8], last_used=5.0)
    b = slot(1, [1, 2, 9, 9, 9, 9, 9, 9], last_used=1.0)
    c = choose_slot([a, b], [1, 2, 3, 4, 5, 6, 7, 8, 20, 21, 22])
    assert c.slot is a and c.keep == 8 and c.copy_from is None


def test_a_short_shared_prefix_does_not_evict_a_conversation():
    """Sharing only a system prompt's start, the request takes the least
    recently used slot (an empty one first)."""
    a = slot(0, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], last_used=5.0)
    empty = slot(1, [])
    older = slot(2, [50, 51], last_used=2.0)
    c = choose_slot([a, empty, older], [1, 2, 30, 31, 32])
    assert c.slot is empty and c.keep == 0 and c.copy_from is None
    c = choose_slot([a, older], [1, 2, 30, 31, 32])
    assert c.slot is older and c.keep == 0


def test_only_tokens_evaluated_in_prompt_chunks_are_reused():
    """Generated tokens sit in the cache beyond n_exact; they are never reused."""
    a = slot(0, [1, 2, 3, 4, 5, 6, 7, 8], n_exact=4, last_used=1.0)
    c = choose_slot([a], [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert c.slot is a and c.keep == 4


def test_a_long_shared_prefix_is_copied_into_the_least_recently_used_slot():
    """Two users with the same long system prompt: the second gets a slot of
    its own, with the system prompt copied in from the first one's cache."""
    system = list(range(100, 100 + COPY_MIN + 10))
    a = slot(0, system + [1, 2, 3] * 40, last_used=5.0)       # a long conversation after the system prompt
    empty = slot(1, [])
    c = choose_slot([a, empty], system + [7, 8, 9])
    assert c.slot is empty and c.copy_from is a and c.keep == len(system)
    short = list(range(100, 100 + COPY_MIN - 10))             # too short a prefix to be worth a copy
    c = choose_slot([slot(0, short + [1, 2, 3] * 40, last_used=5.0), slot(1, [])], short + [7, 8, 9])
    assert c.copy_from is None and c.keep == 0
