"""Generate a tiny GGUF that "reasons": greedy decoding always answers
``<think>hm</think>OK`` (or, when its chat template opens ``<think>`` in the
prompt itself, ``hm</think>OK``).

It is a bigram model: one-hot token embeddings, attention and feed-forward
weights of zero (so each position's state is its own token's embedding), and
an output matrix that maps each token of the script to the next one; every
other token leads to the end-of-turn token. ``<think>`` and ``</think>`` are
user-defined tokens (rendered as text), as in the reasoning models that use
them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from tinymodel import _byte_tokens, llama_writer, write_llama_tensors

OPEN_TEMPLATE = (
    "{# a reasoning model: it thinks in <think> tags #}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
FORCED_TEMPLATE = OPEN_TEMPLATE.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\n<think>'")
REASONING, ANSWER = "hm", "OK"


def write_think_gguf(path: Path | str, *, forced_open: bool = False) -> Path:
    import gguf

    path = Path(path)
    specials = [("<|endoftext|>", gguf.TokenType.CONTROL), ("<|im_start|>", gguf.TokenType.CONTROL),
                ("<|im_end|>", gguf.TokenType.CONTROL), ("<think>", gguf.TokenType.USER_DEFINED),
                ("</think>", gguf.TokenType.USER_DEFINED)]
    tokens = _byte_tokens() + ["Ġt"] + [t for t, _ in specials]     # one merge: llama.cpp needs some
    toktypes = [gguf.TokenType.NORMAL] * 257 + [k for _, k in specials]
    tid = {t: i for i, t in enumerate(tokens)}
    byte = {chr(b): tid[_byte_tokens()[b]] for b in range(256)}
    n_vocab = len(tokens)
    n_head = 8
    n_embd = -(-n_vocab // (2 * n_head)) * 2 * n_head     # one dimension per token, even head size
    n_ff = 16

    script = [byte["\n"], tid["<think>"]] + [byte[c] for c in REASONING] + [tid["</think>"]] + \
        [byte[c] for c in ANSWER] + [tid["<|im_end|>"]]
    follows = {a: b for a, b in zip(script, script[1:])}
    out = np.zeros((n_vocab, n_embd), dtype=np.float32)
    for tok in range(n_vocab):
        out[follows.get(tok, tid["<|im_end|>"]), tok] = 1.0

    w = llama_writer(path, name="think-test", n_ctx=2048, n_embd=n_embd, n_layer=1, n_ff=n_ff,
                     n_head=n_head, rms_eps=1e-6, tokens=tokens, toktypes=toktypes, merges=["Ġ t"],
                     bos=tid["<|endoftext|>"], eos=tid["<|im_end|>"])
    w.add_chat_template(FORCED_TEMPLATE if forced_open else OPEN_TEMPLATE)
    write_llama_tensors(w, n_layer=1, n_embd=n_embd, n_ff=n_ff,
                        token_embd=lambda: np.eye(n_vocab, n_embd, dtype=np.float32),
                        matrix=lambda *shape: np.zeros(shape, dtype=np.float32),
                        output=lambda: out * 4.0)
    return path


if __name__ == "__main__":
    print(write_think_gguf(sys.argv[1] if len(sys.argv) > 1 else "think.gguf"))
