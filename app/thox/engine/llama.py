"""The one place that knows how llama-cpp-python is laid out.

The engine calls llama.cpp's C API through ``lib()`` (llama-cpp-python's ctypes
bindings: ``llama_decode``, ``llama_batch_init``, ``llama_memory_seq_rm`` …), and
opens models and contexts here, through the package's internal owners of those
handles (``llama_cpp._internals``), which free them on close. The grammar
converter comes from here too. An upgrade of llama-cpp-python that moves any of
this touches this file only.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def lib() -> Any:
    """The llama.cpp C API (imported on first use: loading the shared library takes time)."""
    import llama_cpp
    return llama_cpp


class Model:
    """A loaded GGUF model: ``ptr`` (llama_model *), ``vocab`` (llama_vocab *), metadata."""

    def __init__(self, path: str, n_gpu_layers: int):
        from llama_cpp import _internals
        params = lib().llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        self._owner = _internals.LlamaModel(path_model=path, params=params, verbose=False)
        self.ptr = self._owner.model
        self.vocab = self._owner.vocab

    def metadata(self) -> dict[str, str]:
        return dict(self._owner.metadata())

    def close(self) -> None:
        self._owner.close()


class Context:
    """A llama_context on ``model`` made from ``params`` (a llama_context_params); ``ptr``."""

    def __init__(self, model: Model, params: Any):
        from llama_cpp import _internals
        self._owner = _internals.LlamaContext(model=model._owner, params=params, verbose=False)
        self.ptr = self._owner.ctx

    def close(self) -> None:
        self._owner.close()


def json_schema_to_gbnf(schema: str) -> str:
    """llama.cpp's JSON-schema-to-grammar converter (as bundled with llama-cpp-python)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf as convert
    return convert(schema)


def json_gbnf() -> str:
    """The grammar of any JSON value."""
    from llama_cpp.llama_grammar import JSON_GBNF
    return JSON_GBNF
