"""One loaded GGUF model and the synchronous work done on it.

Everything here runs on the model's worker thread (see scheduler.py); nothing
here touches asyncio. Generation reuses the KV cache for the longest common
prompt prefix with the previous request (llama_cpp.Llama.generate does the
prefix match; we keep one sequence per model so follow-up turns hit it).
"""

from __future__ import annotations

import ctypes
import logging
import os
import random
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import InvalidRequest, ModelBroken
from .textstream import TextStream
from .types import Finished, GenerationJob, Piece, SamplingParams, TokenLogprob

log = logging.getLogger("thox.engine")

Emit = Callable[[Piece | Finished], None]


def _quiet_llama_logs() -> None:
    """Route llama.cpp's C logging to nowhere unless THOX_DEBUG_LLAMA is set."""
    import llama_cpp
    if os.environ.get("THOX_DEBUG_LLAMA"):
        return

    @llama_cpp.llama_log_callback
    def _silent(level, text, user_data):  # noqa: ARG001
        return None

    llama_cpp.llama_log_set(_silent, ctypes.c_void_p(0))
    _quiet_llama_logs.cb = _silent  # keep a reference


class LoadedModel:
    def __init__(self, model_id: str, path: Path, *, n_ctx: int = 4096, n_threads: int = 0,
                 n_gpu_layers: int = -1):
        import llama_cpp
        _quiet_llama_logs()
        self.id = model_id
        self.path = Path(path)
        self._n_threads = n_threads or max(1, os.cpu_count() or 1)
        self._n_gpu_layers = n_gpu_layers
        t0 = time.monotonic()
        try:
            self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=512, n_threads=self._n_threads,
                                       n_gpu_layers=n_gpu_layers, verbose=False)
        except (ValueError, RuntimeError, OSError) as e:
            raise ModelBroken(f"model '{model_id}' cannot be loaded: {e}") from None
        self.load_seconds = time.monotonic() - t0
        self.n_ctx = self.llm.n_ctx()
        self.n_vocab = self.llm.n_vocab()
        self.metadata: dict[str, str] = dict(self.llm.metadata)
        vocab = self.llm._model.vocab
        self._vocab = vocab
        self._llama_cpp = llama_cpp
        self.fim_tokens = tuple(int(f(vocab)) for f in (llama_cpp.llama_vocab_fim_pre,
                                                         llama_cpp.llama_vocab_fim_suf,
                                                         llama_cpp.llama_vocab_fim_mid))
        self.bos_token = self._token_text(self.llm.token_bos())
        self.eos_token = self._token_text(self.llm.token_eos())
        self._embedder = None
        self._embed_lock = threading.Lock()
        self._cache_tokens: list[int] = []     # what the KV cache of sequence 0 holds
        self._pieces: dict[int, bytes] = {}

    # -- tokens -----------------------------------------------------------
    def _token_text(self, tok: int) -> str:
        if tok is None or tok < 0:
            return ""
        return self.llm.detokenize([tok], special=True).decode("utf-8", errors="replace")

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
        return self.llm.tokenize(text.encode("utf-8"),
                                 add_bos=self.add_bos if add_bos is None else add_bos, special=special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).decode("utf-8", errors="replace")

    def check_tokens(self, tokens: list[int], param: str) -> None:
        for t in tokens:
            if not 0 <= t < self.n_vocab:
                raise InvalidRequest(f"token id {t} is out of range for this model (0..{self.n_vocab - 1})",
                                     param=param)

    def fim_prompt(self, prefix: str, suffix: str) -> list[int]:
        pre, suf, mid = self.fim_tokens
        toks = [self.llm.token_bos()] if self.add_bos and self.llm.token_bos() >= 0 else []
        return (toks + [pre] + self.tokenize(prefix, add_bos=False, special=False) + [suf]
                + self.tokenize(suffix, add_bos=False, special=False) + [mid])

    @property
    def memory_bytes(self) -> int:
        try:
            return int(self._llama_cpp.llama_model_size(self.llm._model.model))
        except Exception:  # pragma: no cover - informational only
            return self.path.stat().st_size

    # -- generation ---------------------------------------------------------
    def check_grammar(self, grammar: str, param: str) -> None:
        """Parse ``grammar`` with llama.cpp before it reaches a sampler: a
        grammar that fails to parse would otherwise crash the process."""
        lc = self._llama_cpp
        sampler = lc.llama_sampler_init_grammar(self._vocab, grammar.encode("utf-8"), b"root")
        if not sampler:
            raise InvalidRequest("this schema cannot be turned into a valid grammar (is it empty or "
                                 "self-contradictory?)", param=param)
        lc.llama_sampler_free(sampler)

    def _make_grammar(self, params: SamplingParams):
        if not params.grammar:
            return None
        from llama_cpp.llama_grammar import LlamaGrammar
        self.check_grammar(params.grammar, "response_format")
        return LlamaGrammar.from_string(params.grammar, verbose=False)

    def _logprob(self, token: int, top_n: int) -> TokenLogprob:
        ptr = self._llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float64)
        m = logits.max()
        lse = m + np.log(np.exp(logits - m).sum())
        lp = logits - lse

        def entry(t: int) -> tuple[str, list[int], float]:
            b = self.llm.detokenize([t], special=True)
            return b.decode("utf-8", errors="replace"), list(b), float(lp[t])

        top = []
        if top_n > 0:
            idx = np.argpartition(-lp, top_n)[:top_n]
            top = [entry(int(t)) for t in idx[np.argsort(-lp[idx])]]
        text, b, p = entry(token)
        return TokenLogprob(token=text, bytes=b, logprob=p, top=top)

    def piece(self, token: int) -> bytes:
        """The bytes of one token (special tokens render empty), cached."""
        b = self._pieces.get(token)
        if b is None:
            lc = self._llama_cpp
            buf = ctypes.create_string_buffer(64)
            n = lc.llama_token_to_piece(self._vocab, token, buf, 64, 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = lc.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
            b = self._pieces[token] = buf.raw[:max(n, 0)]
        return b

    def _evaluate_prompt(self, prompt: list[int]) -> int:
        """Bring the KV cache to ``prompt``, reusing the longest common prefix
        with what it holds; returns how many prompt tokens were reused."""
        n = 0
        for a, b in zip(self._cache_tokens, prompt):
            if a != b:
                break
            n += 1
        if n == len(prompt):
            n -= 1  # the last prompt token is decoded again to get fresh logits
        ctx = self.llm._ctx
        if n < len(self._cache_tokens) and not ctx.kv_cache_seq_rm(0, n, -1):
            ctx.kv_cache_clear()
            n = 0
        self._cache_tokens = prompt[:n]
        batch, step = self.llm._batch, self.llm.n_batch
        try:
            for i in range(n, len(prompt), step):
                chunk = prompt[i:i + step]
                batch.set_batch(batch=chunk, n_past=i, logits_all=False)
                ctx.decode(batch)
                self._cache_tokens.extend(chunk)
        except RuntimeError:
            ctx.kv_cache_clear()
            self._cache_tokens = []
            raise
        return n

    def generate(self, job: GenerationJob, emit: Emit, cancel: threading.Event) -> Finished:
        """Run one generation, calling ``emit`` with Pieces and finally a Finished.

        The token loop is lean on purpose: sampling runs in llama.cpp's sampler
        chain, one reusable single-token batch is decoded per step, token bytes
        come from a cache, and logits are only read when logprobs are asked for."""
        lc = self._llama_cpp
        p = job.params
        prompt = job.prompt_tokens
        n_prompt = len(prompt)
        room = self.n_ctx - n_prompt
        limit = room if p.max_tokens is None else min(p.max_tokens, room)
        grammar = self._make_grammar(p)
        self.llm.set_seed(p.seed if p.seed is not None else random.randrange(0, 2**31))
        stream = TextStream(p.stop, p.capture_markers)
        if job.prefix_text:
            emit(Piece(job.prefix_text))
        n_out, first_at, reason, cached = 0, None, "length", 0
        if limit > 0 and not cancel.is_set():
            cached = self._evaluate_prompt(prompt)
            sampler = self.llm._init_sampler(top_k=p.top_k, top_p=p.top_p, min_p=p.min_p, temp=p.temperature,
                                             repeat_penalty=p.repeat_penalty,
                                             frequency_penalty=p.frequency_penalty,
                                             presence_penalty=p.presence_penalty, grammar=grammar)
            smpl, ctx, vocab = sampler.sampler, self.llm._ctx.ctx, self._vocab
            sample, decode, is_eog = lc.llama_sampler_sample, lc.llama_decode, lc.llama_vocab_is_eog
            one = (lc.llama_token * 1)()
            batch_one = lc.llama_batch_get_one(one, 1)
            cache, piece, feed = self._cache_tokens, self.piece, stream.feed
            while True:
                if cancel.is_set():
                    reason = "cancelled"
                    break
                tok = sample(smpl, ctx, -1)
                if is_eog(vocab, tok):
                    reason = "stop"
                    break
                n_out += 1
                if first_at is None:
                    first_at = time.monotonic()
                lp = [self._logprob(tok, p.top_logprobs)] if p.logprobs else []
                text = feed(piece(tok))
                if text or lp:
                    emit(Piece(text, lp))
                if stream.stopped:
                    reason = "stop"
                    break
                if n_out >= limit:
                    reason = "length"
                    break
                one[0] = tok
                if decode(ctx, batch_one) != 0:
                    self.llm._ctx.kv_cache_clear()
                    self._cache_tokens = []
                    raise RuntimeError("llama_decode failed during generation")
                cache.append(tok)
        tail = stream.flush()
        if tail:
            emit(Piece(tail))
        if stream.captured is not None and reason == "stop":
            reason = "capture"
        fin = Finished(reason, n_prompt, n_out, captured=stream.captured or "", cached_tokens=cached,
                       first_token_at=first_at)
        emit(fin)
        return fin

    # -- embeddings -------------------------------------------------------------
    def _embedding_context(self):
        """A second llama context on the same model, in embedding mode with mean
        pooling (weights are mmap'd, so they are shared)."""
        if self._embedder is None:
            import llama_cpp
            n = min(self.n_ctx, 8192)
            self._embedder = llama_cpp.Llama(str(self.path), embedding=True, n_ctx=n, n_batch=n, n_ubatch=n,
                                             n_threads=self._n_threads, n_gpu_layers=self._n_gpu_layers,
                                             pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, verbose=False)
        return self._embedder

    def embed_limit(self) -> int:
        return min(self.n_ctx, 8192)

    def embed(self, inputs: list[list[int]], cancel: threading.Event) -> list[np.ndarray]:
        import llama_cpp
        with self._embed_lock:
            emb = self._embedding_context()
            n_embd = emb.n_embd()
            out = []
            for toks in inputs:
                if cancel.is_set():
                    break
                emb._ctx.kv_cache_clear()
                emb._batch.set_batch(batch=toks, n_past=0, logits_all=True)
                emb._ctx.decode(emb._batch)
                ptr = llama_cpp.llama_get_embeddings_seq(emb._ctx.ctx, 0)
                v = np.array(ptr[:n_embd], dtype=np.float32)
                norm = float(np.linalg.norm(v))
                out.append(v / norm if norm > 0 else v)
                emb._batch.reset()
            return out

    def close(self) -> None:
        for llm in (self._embedder, getattr(self, "llm", None)):
            if llm is not None:
                try:
                    llm.close()
                except Exception:  # pragma: no cover
                    pass
        self._embedder = None
