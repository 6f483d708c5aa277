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

from tinymodel import _byte_tokens

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

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("think-test")
    w.add_context_length(2048)
    w.add_embedding_length(n_embd)
    w.add_block_count(1)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(toktypes)
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(tid["<|endoftext|>"])
    w.add_eos_token_id(tid["<|im_end|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(FORCED_TEMPLATE if forced_open else OPEN_TEMPLATE)

    zeros = lambda *shape: np.zeros(shape, dtype=np.float32)  # noqa: E731
    w.add_tensor("token_embd.weight", np.eye(n_vocab, n_embd, dtype=np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        w.add_tensor(f"blk.0.{name}.weight", zeros(n_embd, n_embd))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.add_tensor("blk.0.ffn_gate.weight", zeros(n_ff, n_embd))
    w.add_tensor("blk.0.ffn_up.weight", zeros(n_ff, n_embd))
    w.add_tensor("blk.0.ffn_down.weight", zeros(n_embd, n_ff))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.add_tensor("output.weight", out * 4.0)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


if __name__ == "__main__":
    print(write_think_gguf(sys.argv[1] if len(sys.argv) > 1 else "think.gguf"))
