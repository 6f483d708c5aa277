"""Slots: the KV-cache sequences of one model's generation context.

Each slot owns one llama.cpp sequence (``seq``) of ``n_ctx`` tokens and
remembers which tokens its KV cache holds, so a new request can continue from
the longest prefix it shares with an idle slot.

Only part of what a slot holds may be reused. llama.cpp computes a token's
K/V slightly differently (different matmul kernels, different rounding) when
it is evaluated alone than when it is evaluated in a chunk of two or more
tokens of its sequence. A fresh request evaluates its prompt in chunks, so
only the leading tokens that were themselves evaluated in such chunks
(``n_exact``) are reused: results then never depend on what the cache held.
Generated tokens (evaluated one at a time) are not reused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Slot:
    seq: int
    tokens: list[int] = field(default_factory=list)   # what this sequence's KV cache holds, from position 0
    n_exact: int = 0            # leading tokens evaluated in prompt chunks of two or more (reusable)
    last_used: float = 0.0      # time.monotonic() when its last request ended (0: never used)
    active: Any = None          # the request running in it, None when idle

    def reusable(self, prompt: Sequence[int]) -> int:
        """How many leading tokens of ``prompt`` this slot's cache can supply."""
        return common_prefix(self.tokens[:self.n_exact], prompt)


def keep_for(prompt_len: int, reusable: int) -> int:
    """How many cached tokens a request with a ``prompt_len``-token prompt keeps,
    given ``reusable`` matching ones: never the last two, so the chunk that
    gives the first token's logits has two or more tokens however much of the
    prompt was cached."""
    return max(0, min(reusable, prompt_len - 2))


COPY_MIN = 64      # a prefix at least this much longer than the chosen slot's is copied from another slot


@dataclass
class Choice:
    slot: Slot
    keep: int                       # cached tokens the request keeps (after the copy, if any)
    copy_from: Slot | None = None   # copy this idle slot's cache first (its longer prefix)


def choose_slot(idle: list[Slot], prompt: Sequence[int]) -> Choice:
    """The idle slot for ``prompt`` and how many of its cached tokens to keep.

    The slot with the longest reusable prefix wins when the request keeps at
    least half of that slot's reusable cache (a continued conversation, a
    repeated fill-in-the-middle prefix); otherwise the least recently used
    slot is taken (an empty one first), so two users who share only a system
    prompt do not evict each other's conversations. Then, when the best slot
    shares at least ``COPY_MIN`` more tokens than the one taken, its cache is
    copied over (llama_memory_seq_cp) instead of evaluating that prefix again."""
    now = time.monotonic()
    scored = [(s.reusable(prompt), s) for s in idle]
    n, best = max(scored, key=lambda x: (x[0], now - x[1].last_used, -x[1].seq))
    if n > 0 and 2 * n >= best.n_exact:
        return Choice(best, keep_for(len(prompt), n))
    lru = min(idle, key=lambda s: (s.last_used, s.seq))
    keep = keep_for(len(prompt), lru.reusable(prompt))
    via = keep_for(len(prompt), n)
    if best is not lru and via - keep >= COPY_MIN:
        return Choice(lru, via, copy_from=best)
    return Choice(lru, keep)
