"""One loaded GGUF model: its weights, tokenizer, generation context and
embedding context, on llama.cpp's low-level API (through ``llama.py``, the
one module that knows how llama-cpp-python is laid out).

The generation context holds ``parallel`` sequences, one per slot, each with
its own KV stream of ``n_ctx`` tokens (non-unified KV cache: a sequence's
attention never looks at another's cells, so its numbers do not depend on
what runs beside it). The decode loop that drives it is in scheduler.py; the
embedding context (embedder.py) is a second context on the same weights.
Nothing here touches asyncio.
"""

from __future__ import annotations

import ctypes
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InvalidRequest, ModelBroken
from . import llama
from .llama import lib
from .types import SamplingParams, TokenLogprob

log = logging.getLogger("thox.engine")

N_BATCH = 512              # tokens per llama_decode call (and per micro-batch)
PENALTY_LAST_N = 64        # tokens the repetition penalties look back on
EMBED_MAX_CTX = 8192       # the longest embedding input, in tokens (capped by engine.n_ctx)
EMBED_CHUNK = 256          # tokens per decode call of the embedding context


def embed_ctx(n_ctx: int) -> int:
    """Tokens of the embedding context (the longest embedding input)."""
    return min(n_ctx, EMBED_MAX_CTX)


def _quiet_llama_logs() -> None:
    """Route llama.cpp's C logging to nowhere unless THOX_DEBUG_LLAMA is set."""
    llama_cpp = lib()
    if os.environ.get("THOX_DEBUG_LLAMA") or getattr(_quiet_llama_logs, "cb", None):
        return

    @llama_cpp.llama_log_callback
    def _silent(level, text, user_data):  # noqa: ARG001
        return None

    llama_cpp.llama_log_set(_silent, ctypes.c_void_p(0))
    _quiet_llama_logs.cb = _silent  # keep a reference


@dataclass(frozen=True)
class Shape:
    """The figures of a model that size its KV cache and compute buffers."""
    n_layer: int
    n_head: int
    n_head_kv: int
    n_embd: int
    n_vocab: int
    causal: bool = True      # False for encoders (BERT-style embedding models)

    @property
    def embed_chunk(self) -> int:
        """Tokens per embedding decode: a causal model's input is pooled chunk
        by chunk; an encoder needs the whole input in one micro-batch."""
        return EMBED_CHUNK if self.causal else EMBED_MAX_CTX

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V, f16, every layer (llama.cpp's default cache type)."""
        head_dim = self.n_embd // max(1, self.n_head)
        return 2 * 2 * self.n_layer * self.n_head_kv * head_dim


    @classmethod
    def from_gguf(cls, meta: dict) -> "Shape | None":
        """From GGUF metadata (thox.store.gguf_meta.read_metadata); None when
        the figures are missing."""
        arch = meta.get("general.architecture")

        def get(key: str) -> int | None:
            v = meta.get(f"{arch}.{key}")
            return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None

        n_layer, n_head, n_embd = get("block_count"), get("attention.head_count"), get("embedding_length")
        n_vocab = meta.get("tokenizer.ggml.tokens")
        if not (n_layer and n_head and n_embd and isinstance(n_vocab, int)):
            return None
        return cls(n_layer=n_layer, n_head=n_head, n_head_kv=get("attention.head_count_kv") or n_head,
                   n_embd=n_embd, n_vocab=n_vocab, causal=meta.get(f"{arch}.attention.causal") is not False)


@dataclass(frozen=True)
class MemoryPlan:
    """What a loaded model occupies, in bytes (all of it counts in
    models.memory_budget)."""
    weights: int
    kv: int                  # the KV cache of all slots
    compute: int             # the generation context's compute and output buffers
    embed: int               # the embedding context: KV, compute and output buffers
    overhead: int = 32 << 20

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute + self.embed + self.overhead


def plan_memory(file_size: int, shape: Shape | None, n_ctx: int, parallel: int) -> MemoryPlan:
    """llama.cpp's buffers for a model with ``parallel`` slots of ``n_ctx``
    tokens: KV cache f16; a compute buffer holding the larger of one micro-
    batch's logits and its attention scores against a full context, plus
    activations; the embedding context sized the same way for its chunks,
    plus their logits. Calibrated against llama.cpp's own
    reports (sched_reserve, llama_kv_cache) on CPU."""
    n_ctx_pad = -(-n_ctx // 256) * 256
    weights = int(file_size * 1.05)
    if shape is None:        # unknown architecture: the old per-token allowance
        per_token = 160 * 1024 if file_size > (1 << 30) else 16 * 1024
        return MemoryPlan(weights, per_token * n_ctx_pad * parallel, 128 << 20,
                          per_token * embed_ctx(n_ctx_pad) + (64 << 20))
    kvt = shape.kv_bytes_per_token
    act = shape.n_embd * 128
    compute = (max(shape.n_vocab * N_BATCH * 4, N_BATCH * n_ctx_pad * shape.n_head * 4) + N_BATCH * act
               + shape.n_vocab * 4 * parallel)
    n_embed = embed_ctx(n_ctx_pad)
    chunk = min(shape.embed_chunk, n_embed)
    embed = (kvt * n_embed + max(shape.n_vocab * chunk * 4, chunk * n_embed * shape.n_head * 4)
             + shape.n_vocab * chunk * 4 + chunk * act)
    return MemoryPlan(weights, kvt * n_ctx_pad * parallel, compute, embed)


class Batch:
    """A reusable llama_batch of up to ``capacity`` tokens, one sequence each."""

    def __init__(self, capacity: int):
        llama_cpp = lib()
        self._lc = llama_cpp
        self.capacity = capacity
        self.b = llama_cpp.llama_batch_init(capacity, 0, 1)
        self.n = 0

    def clear(self) -> None:
        self.n = 0

    def add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        b, i = self.b, self.n
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits
        self.n = i + 1
        return i

    def close(self) -> None:
        if self.b is not None:
            self._lc.llama_batch_free(self.b)
            self.b = None


class LoadedModel:
    def __init__(self, model_id: str, path: Path, *, n_ctx: int = 4096, n_threads: int = 0,
                 n_gpu_layers: int = -1, parallel: int = 1):
        llama_cpp = lib()
        _quiet_llama_logs()
        self._lc = llama_cpp
        self.id = model_id
        self.path = Path(path)
        self.parallel = max(1, int(parallel))
        self.n_threads = n_threads or max(1, os.cpu_count() or 1)
        self.n_threads_batch = max(1, os.cpu_count() or 1)
        self.n_gpu_layers = n_gpu_layers
        t0 = time.monotonic()
        try:
            self.handle = llama.Model(str(path), n_gpu_layers)
        except (ValueError, RuntimeError, OSError) as e:
            raise ModelBroken(f"model '{model_id}' cannot be loaded: {e}") from None
        m = self.handle.ptr
        self._vocab = self.handle.vocab
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.n_ctx = int(n_ctx) or int(llama_cpp.llama_model_n_ctx_train(m))
        meta = self.handle.metadata()
        arch = meta.get("general.architecture", "")
        self.shape = Shape(n_layer=int(llama_cpp.llama_model_n_layer(m)), n_head=int(llama_cpp.llama_model_n_head(m)),
                           n_head_kv=int(llama_cpp.llama_model_n_head_kv(m)),
                           n_embd=int(llama_cpp.llama_model_n_embd(m)), n_vocab=self.n_vocab,
                           causal=meta.get(f"{arch}.attention.causal", "true") != "false")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = self.n_ctx * self.parallel
        cparams.n_batch = cparams.n_ubatch = N_BATCH
        cparams.n_seq_max = self.parallel
        cparams.kv_unified = False
        cparams.n_threads = self.n_threads
        cparams.n_threads_batch = self.n_threads_batch
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cparams.embeddings = False
        cparams.no_perf = True
        try:
            self._ctx = llama.Context(self.handle, cparams)
        except (ValueError, RuntimeError) as e:
            self.handle.close()
            raise ModelBroken(f"model '{model_id}' cannot be loaded: {e}") from None
        self.ctx = self._ctx.ptr
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.load_seconds = time.monotonic() - t0
        self.metadata: dict[str, str] = dict(meta)
        self.fim_tokens = tuple(int(f(self._vocab)) for f in (llama_cpp.llama_vocab_fim_pre,
                                                               llama_cpp.llama_vocab_fim_suf,
                                                               llama_cpp.llama_vocab_fim_mid))
        self.bos_id = int(llama_cpp.llama_vocab_bos(self._vocab))
        self.eos_id = int(llama_cpp.llama_vocab_eos(self._vocab))
        self._pieces: dict[tuple[int, bool], bytes] = {}
        self.bos_token = self._token_text(self.bos_id)
        self.eos_token = self._token_text(self.eos_id)
        self.embedder = None        # set by the scheduler (embedder.Embedder), shares the weights

    # -- tokens -----------------------------------------------------------
    def token_bos(self) -> int:
        return self.bos_id

    @property
    def llm(self) -> "LoadedModel":
        """Callers that ask ``model.llm.token_bos()`` get the model itself."""
        return self

    def _token_text(self, tok: int) -> str:
        if tok is None or tok < 0:
            return ""
        return self.piece(tok, special=True).decode("utf-8", errors="replace")

    @property
    def has_fim(self) -> bool:
        return all(t >= 0 for t in self.fim_tokens)

    @property
    def add_bos(self) -> bool:
        v = self.metadata.get("tokenizer.ggml.add_bos_token")
        if v is None:
            return True
        return str(v).lower() == "true"

    def tokenize(self, text: str, *, add_bos: bool | None = None, special: bool = True) -> list[int]:
        lc = self._lc
        data = text.encode("utf-8")
        bos = self.add_bos if add_bos is None else add_bos
        cap = len(data) + 8
        buf = (lc.llama_token * cap)()
        n = lc.llama_tokenize(self._vocab, data, len(data), buf, cap, bos, special)
        if n < 0:
            cap = -n
            buf = (lc.llama_token * cap)()
            n = lc.llama_tokenize(self._vocab, data, len(data), buf, cap, bos, special)
            if n < 0:
                raise InvalidRequest("the text cannot be tokenized")
        return list(buf[:n])

    def detokenize(self, tokens: list[int]) -> str:
        out = b"".join(self.piece(t) for t in tokens)
        if tokens and tokens[0] == self.bos_id and out[:1] == b" ":
            out = out[1:]
        return out.decode("utf-8", errors="replace")

    def embed_limit(self) -> int:
        return embed_ctx(self.n_ctx)

    def check_tokens(self, tokens: list[int], param: str) -> None:
        for t in tokens:
            if not 0 <= t < self.n_vocab:
                raise InvalidRequest(f"token id {t} is out of range for this model (0..{self.n_vocab - 1})",
                                     param=param)

    def fim_prompt(self, prefix: str, suffix: str) -> list[int]:
        pre, suf, mid = self.fim_tokens
        toks = [self.bos_id] if self.add_bos and self.bos_id >= 0 else []
        return (toks + [pre] + self.tokenize(prefix, add_bos=False, special=False) + [suf]
                + self.tokenize(suffix, add_bos=False, special=False) + [mid])

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token (special tokens render empty unless
        ``special``), cached."""
        key = (token, special)
        b = self._pieces.get(key)
        if b is None:
            lc = self._lc
            buf = ctypes.create_string_buffer(64)
            n = lc.llama_token_to_piece(self._vocab, token, buf, 64, 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = lc.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
            b = self._pieces[key] = buf.raw[:max(n, 0)]
        return b

    def is_eog(self, token: int) -> bool:
        return bool(self._lc.llama_vocab_is_eog(self._vocab, token))

    @property
    def memory_bytes(self) -> int:
        try:
            return int(self._lc.llama_model_size(self.handle.ptr))
        except Exception:  # pragma: no cover - informational only
            return self.path.stat().st_size

    # -- sampling ---------------------------------------------------------------
    def check_grammar(self, grammar: str, param: str) -> None:
        """Parse ``grammar`` with llama.cpp before it reaches a sampler: a
        grammar that fails to parse would otherwise crash the process."""
        lc = self._lc
        sampler = lc.llama_sampler_init_grammar(self._vocab, grammar.encode("utf-8"), b"root")
        if not sampler:
            raise InvalidRequest("this schema cannot be turned into a valid grammar (is it empty or "
                                 "self-contradictory?)", param=param)
        lc.llama_sampler_free(sampler)

    def make_sampler(self, p: SamplingParams):
        """A llama.cpp sampler chain of its own for one request: penalties,
        grammar, then greedy (temperature 0) or top-k/top-p/min-p/temperature
        and a random draw seeded with the request's seed."""
        lc = self._lc
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        add = lambda s: lc.llama_sampler_chain_add(chain, s)  # noqa: E731
        add(lc.llama_sampler_init_penalties(self.n_vocab, PENALTY_LAST_N, p.repeat_penalty,
                                            p.frequency_penalty, p.presence_penalty))
        if p.grammar:
            g = lc.llama_sampler_init_grammar(self._vocab, p.grammar.encode("utf-8"), b"root")
            if not g:
                lc.llama_sampler_free(chain)
                raise InvalidRequest("this schema cannot be turned into a valid grammar", param="response_format")
            add(g)
        if p.temperature <= 0:
            add(lc.llama_sampler_init_greedy())
        else:
            add(lc.llama_sampler_init_top_k(p.top_k))
            add(lc.llama_sampler_init_top_p(p.top_p, 1))
            add(lc.llama_sampler_init_min_p(p.min_p, 1))
            add(lc.llama_sampler_init_temp(p.temperature))
            seed = p.seed if p.seed is not None else random.randrange(0, 2**31)
            add(lc.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def free_sampler(self, chain) -> None:
        if chain:
            self._lc.llama_sampler_free(chain)

    def sample(self, chain, i: int) -> int:
        """Sample from the logits of batch entry ``i`` (the chain accepts the token)."""
        return int(self._lc.llama_sampler_sample(chain, self.ctx, i))

    def logprob(self, i: int, token: int, top_n: int) -> TokenLogprob:
        """Log-probability of ``token`` and the ``top_n`` likeliest tokens under
        the raw logits of batch entry ``i``."""
        ptr = self._lc.llama_get_logits_ith(self.ctx, i)
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float64)
        m = logits.max()
        lp = logits - (m + np.log(np.exp(logits - m).sum()))

        def entry(t: int) -> tuple[str, list[int], float]:
            b = self.piece(t, special=True)
            return b.decode("utf-8", errors="replace"), list(b), float(lp[t])

        top = []
        if top_n > 0:
            idx = np.argpartition(-lp, top_n)[:top_n]
            top = [entry(int(t)) for t in idx[np.argsort(-lp[idx])]]
        text, b, p = entry(token)
        return TokenLogprob(token=text, bytes=b, logprob=p, top=top)

    # -- KV cache and decoding (decode-loop thread only) ---------------------------
    def seq_rm(self, seq: int, p0: int, p1: int = -1) -> bool:
        return bool(self._lc.llama_memory_seq_rm(self.mem, seq, p0, p1))

    def seq_copy(self, src: int, dst: int) -> None:
        """Make sequence ``dst`` a copy of ``src`` (its whole KV stream: a
        non-unified cache copies streams whole; done before the next decode)."""
        self._lc.llama_memory_seq_cp(self.mem, src, dst, -1, -1)

    def decode(self, batch: Batch) -> int:
        """llama_decode of ``batch``; 0 on success (see llama.h for the rest)."""
        b = batch.b
        b.n_tokens = batch.n
        return int(self._lc.llama_decode(self.ctx, b))

    def decode_chunk(self, batch: Batch, tokens: Sequence[int], pos: int, seq: int,
                     logits_last: bool = False) -> int:
        """Decode ``tokens`` of sequence ``seq`` from position ``pos``; with
        ``logits_last`` the last one's logits are kept (batch entry len-1)."""
        batch.clear()
        n = len(tokens)
        for k, t in enumerate(tokens):
            batch.add(t, pos + k, seq, logits_last and k == n - 1)
        return self.decode(batch)

    def close(self) -> None:
        emb, self.embedder = self.embedder, None
        if emb is not None:
            emb.close()
        for obj in (getattr(self, "_ctx", None), getattr(self, "handle", None)):
            if obj is not None:
                try:
                    obj.close()
                except Exception:  # pragma: no cover
                    pass
        self._ctx = None
