"""How many tokens of context a model is loaded with.

``engine.n_ctx`` set to a number gives every model that many tokens (never
more than it was trained for). Left at 0, each model gets its catalog entry's
``context_length`` or, for other models, its trained context up to
``CEILING``; either way halved until the model's memory estimate (weights plus
KV cache for that context) fits ``models.memory_budget``.
"""

from __future__ import annotations

from typing import Callable

CEILING = 32768          # the most an uncatalogued model gets by default
FLOOR = 512              # memory pressure never halves below this
FALLBACK = 4096          # a model that does not say what it was trained for


def catalog_context(model_id: str) -> int | None:
    from ..store.catalog import load_catalog
    try:
        cat = load_catalog()
    except Exception:  # an unreadable catalog only loses the hint
        return None
    return cat.get(model_id).context_length if model_id in cat else None


def choose_n_ctx(model_id: str, trained: int | None, configured: int, budget: int,
                 estimate: Callable[[int], int]) -> int:
    """The context for a model trained for ``trained`` tokens; ``estimate(n)``
    is its memory need with an ``n``-token context."""
    trained = trained if trained and trained > 0 else FALLBACK
    if configured > 0:
        return min(configured, trained)
    n = min(catalog_context(model_id) or CEILING, trained)
    while n > FLOOR and estimate(n) > budget:
        n = max(FLOOR, n // 2)
    return n
