"""Generate a tiny llama-architecture GGUF with random weights.

Byte-level BPE vocabulary (256 byte tokens + ChatML and FIM special tokens),
a ChatML chat template, 2 layers, 64-dim: loads in milliseconds and produces
(random) text, enough to drive the whole API.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    import gguf

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "(message['content'] if message['content'] is string else '') + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>", "<|fim_suffix|>",
            "<|fim_middle|>"]


def _byte_tokens() -> list[str]:
    """GPT-2's bytes_to_unicode mapping: the token text for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def llama_writer(path: Path, *, name: str, n_ctx: int, n_embd: int, n_layer: int, n_ff: int,
                 n_head: int, rms_eps: float, tokens: list[str], toktypes: list, merges: list[str],
                 bos: int, eos: int) -> gguf.GGUFWriter:
    """A GGUF writer for a llama model with a GPT-2 style BPE vocabulary, its metadata added
    (the caller may add more keys, then calls write_llama_tensors)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(rms_eps)
    w.add_file_type(0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(toktypes)
    w.add_token_merges(merges)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_add_bos_token(False)
    return w


def write_llama_tensors(w: gguf.GGUFWriter, *, n_layer: int, n_embd: int, n_ff: int,
                        token_embd: Callable[[], np.ndarray], matrix: Callable[..., np.ndarray],
                        output: Callable[[], np.ndarray]) -> None:
    """Add a llama model's tensors (norms all ones; ``matrix(rows, cols)`` gives each weight
    matrix of the blocks, called in file order) and write the file out."""
    ones = np.ones(n_embd, dtype=np.float32)
    w.add_tensor("token_embd.weight", token_embd())
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{part}.weight", matrix(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.ffn_gate.weight", matrix(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", matrix(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", matrix(n_embd, n_ff))
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", output())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_tiny_gguf(path: Path | str, *, fim: bool = True, chat_template: bool | str = True,
                    n_embd: int = 64, n_layer: int = 2, n_ctx: int = 2048, seed: int = 0,
                    name: str = "tiny-test") -> Path:
    import gguf

    path = Path(path)
    rng = np.random.default_rng(seed)
    pairs = [("Ġ", "t"), ("h", "e"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"), ("Ġt", "he")]
    merged = [a + b for a, b in pairs]
    specials = SPECIALS if fim else SPECIALS[:3]
    tokens = _byte_tokens() + merged + specials
    n_vocab = len(tokens)
    n_normal = 256 + len(merged)
    toktypes = [gguf.TokenType.NORMAL] * n_normal + [gguf.TokenType.CONTROL] * len(specials)
    sid = {t: n_normal + i for i, t in enumerate(specials)}
    n_head, n_ff = 4, 128

    w = llama_writer(path, name=name, n_ctx=n_ctx, n_embd=n_embd, n_layer=n_layer, n_ff=n_ff,
                     n_head=n_head, rms_eps=1e-5, tokens=tokens, toktypes=toktypes,
                     merges=[f"{a} {b}" for a, b in pairs], bos=sid["<|endoftext|>"],
                     eos=sid["<|im_end|>"])
    if fim:
        w.add_uint32("tokenizer.ggml.fim_pre_token_id", sid["<|fim_prefix|>"])
        w.add_uint32("tokenizer.ggml.fim_suf_token_id", sid["<|fim_suffix|>"])
        w.add_uint32("tokenizer.ggml.fim_mid_token_id", sid["<|fim_middle|>"])
    if chat_template:  # True: ChatML; a string: that template
        w.add_chat_template(CHATML if chat_template is True else chat_template)

    def random(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    write_llama_tensors(w, n_layer=n_layer, n_embd=n_embd, n_ff=n_ff,
                        token_embd=lambda: random(n_vocab, n_embd, scale=1.0), matrix=random,
                        output=lambda: random(n_vocab, n_embd, scale=1.0))
    return path


if __name__ == "__main__":
    print(write_tiny_gguf(sys.argv[1] if len(sys.argv) > 1 else "tiny.gguf"))
