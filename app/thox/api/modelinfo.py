"""What clients read about a model before using it: the context window it is
served with and what it can do. Shared by ``/v1/models`` and Ollama's
``/api/show``."""

from __future__ import annotations

from ..engine.manager import ModelManager
from ..store.store import Manifest


def context_length(manager: ModelManager, m: Manifest) -> int:
    """The context the model has when loaded (or will have when it loads)."""
    w = manager.workers.get(m.id)
    if w is not None and not w.closed:
        return int(w.model.n_ctx)
    return manager.n_ctx_for(m)


def capabilities(m: Manifest) -> dict[str, bool]:
    chat = m.kind != "embedding"
    return {"chat": chat, "completion": chat, "fim": bool(m.fim) and chat, "tools": chat,
            "embeddings": m.kind == "embedding", "vision": False}
