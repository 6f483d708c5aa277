"""Embeddings on a context of their own, so they never wait behind generation.

A second llama context on the model's weights (mmap'd, shared): one
sequence, mean pooling, no flash attention (vectors match llama.cpp's own
embeddings). An input to a causal model is decoded in chunks of
``EMBED_CHUNK`` tokens: llama.cpp pools each chunk, and with causal attention
the length-weighted mean of the chunk means is the mean over the whole input,
while the compute and output buffers stay sized for one chunk (a whole input
in one micro-batch would also compute n_vocab logits for each of its tokens:
gigabytes). An encoder (non-causal attention) gets each input in one
micro-batch, as llama.cpp requires. It runs on its own thread; a cancelled
request stops before its next input, and a decode in progress is aborted
through llama.cpp's abort callback. Its memory is part of the model's
memory plan (model.plan_memory).
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np

from ..errors import ModelBroken
from . import llama
from .llama import lib
from .model import Batch, LoadedModel, embed_ctx


class Embedder:
    def __init__(self, model: LoadedModel):
        self.model = model
        self.n_ctx = embed_ctx(model.n_ctx)
        self.chunk = min(model.shape.embed_chunk, self.n_ctx)
        self._ctx = None
        self._batch = None
        self._lock = threading.Lock()
        self._cancel: threading.Event | None = None

        def _abort(_data) -> bool:
            c = self._cancel
            return bool(c is not None and c.is_set())

        self._abort_cb = lib().ggml_abort_callback(_abort)

    def _context(self):
        if self._ctx is None:
            llama_cpp = lib()
            m = self.model
            p = llama_cpp.llama_context_default_params()
            p.n_ctx = self.n_ctx
            p.n_batch = p.n_ubatch = self.chunk
            p.n_seq_max = 1
            p.n_threads = m.n_threads
            p.n_threads_batch = m.n_threads_batch
            p.embeddings = True
            p.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
            p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
            p.no_perf = True
            try:
                self._ctx = llama.Context(m.handle, p)
            except (ValueError, RuntimeError) as e:
                raise ModelBroken(f"model '{m.id}' cannot make embeddings: {e}") from None
            llama_cpp.llama_set_abort_callback(self._ctx.ptr, self._abort_cb, ctypes.c_void_p(0))
            self._batch = Batch(self.chunk)
            self._mem = llama_cpp.llama_get_memory(self._ctx.ptr)
        return self._ctx

    def embed(self, inputs: list[list[int]], cancel: threading.Event) -> list[np.ndarray]:
        """Unit-length mean-pooled vectors, one per input; stops early (fewer
        vectors) when ``cancel`` is set."""
        llama_cpp = lib()
        with self._lock:
            ctx = self._context()
            n_embd = llama_cpp.llama_model_n_embd(self.model.handle.ptr)
            self._cancel = cancel
            out: list[np.ndarray] = []
            try:
                for toks in inputs:
                    if cancel.is_set():
                        break
                    llama_cpp.llama_memory_clear(self._mem, True)
                    total = np.zeros(n_embd, dtype=np.float64)
                    for at in range(0, len(toks), self.chunk):
                        if cancel.is_set():
                            return out
                        chunk = toks[at:at + self.chunk]
                        self._batch.clear()
                        for i, t in enumerate(chunk):
                            self._batch.add(t, at + i, 0, True)
                        self._batch.b.n_tokens = self._batch.n
                        rc = llama_cpp.llama_decode(ctx.ptr, self._batch.b)
                        if rc != 0:
                            if cancel.is_set():
                                return out
                            raise RuntimeError(f"llama_decode failed ({rc}) while embedding")
                        ptr = llama_cpp.llama_get_embeddings_seq(ctx.ptr, 0)
                        total += np.array(ptr[:n_embd], dtype=np.float64) * len(chunk)
                    v = (total / max(1, len(toks))).astype(np.float32)
                    norm = float(np.linalg.norm(v))
                    out.append(v / norm if norm > 0 else v)
            finally:
                self._cancel = None
            return out

    def close(self) -> None:
        with self._lock:
            if self._batch is not None:
                self._batch.close()
                self._batch = None
            if self._ctx is not None:
                self._ctx.close()
                self._ctx = None
