"""thox.store.gguf_meta on GGUF headers written byte by byte here, so every
malformation is exact: magic, version, lengths, nesting, types, alignment,
tensor data that the file does not hold."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from thox.errors import ModelBroken
from thox.store.gguf_meta import describe, read_metadata

U8, U32, I32, F32, BOOL, STR, ARR, U64 = 0, 4, 5, 6, 7, 8, 9, 10


def s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def val(vtype: int, v) -> bytes:
    if vtype == STR:
        return s(v)
    if vtype == ARR:
        itype, items = v
        return struct.pack("<IQ", itype, len(items)) + b"".join(val(itype, x) for x in items)
    return struct.pack({U8: "<B", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q"}[vtype], v)


def kv(key: str, vtype: int, v) -> bytes:
    return s(key) + struct.pack("<I", vtype) + val(vtype, v)


def gguf(kvs: list[bytes], tensors: list[tuple[str, list[int], int, int]] = (), version: int = 3,
         data: int = 0, align: int = 32) -> bytes:
    """A GGUF file: header, key/values, tensor infos (name, dims, type, offset),
    padding to ``align`` and ``data`` bytes of tensor data."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs)) + b"".join(kvs)
    for name, dims, ttype, offset in tensors:
        out += s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ttype, offset)
    out += b"\0" * ((-len(out)) % align)
    return out + b"\0" * data


def write(tmp_path: Path, data: bytes) -> Path:
    p = tmp_path / "m.gguf"
    p.write_bytes(data)
    return p


LLAMA = [kv("general.architecture", STR, "llama"), kv("general.name", STR, "tiny"),
         kv("llama.context_length", U32, 4096), kv("tokenizer.chat_template", STR, "{{ messages }}"),
         kv("tokenizer.ggml.fim_pre_token_id", U32, 1)]


def test_reads_keys_and_describes_a_chat_model(tmp_path):
    meta = read_metadata(write(tmp_path, gguf(LLAMA)))
    assert meta["general.architecture"] == "llama" and meta["llama.context_length"] == 4096
    assert meta["gguf.version"] == 3 and meta["gguf.tensor_count"] == 0
    assert describe(meta) == {"architecture": "llama", "name": "tiny", "context_length": 4096,
                              "chat_template": True, "fim": True, "kind": "chat"}


def test_arrays_are_counted_unless_kept(tmp_path):
    p = write(tmp_path, gguf(LLAMA + [kv("tokenizer.ggml.scores", ARR, (F32, [0.5, 1.0, 2.0])),
                                      kv("tokenizer.ggml.tokens", ARR, (STR, ["a", "b"]))]))
    assert read_metadata(p)["tokenizer.ggml.scores"] == 3
    assert read_metadata(p)["tokenizer.ggml.tokens"] == 2
    kept = read_metadata(p, keep_arrays=True)
    assert kept["tokenizer.ggml.scores"] == [0.5, 1.0, 2.0] and kept["tokenizer.ggml.tokens"] == ["a", "b"]


def test_tensor_data_must_be_in_the_file(tmp_path):
    tensors = [("w", [4, 2], 0, 0)]          # 8 f32 = 32 bytes at offset 0
    meta = read_metadata(write(tmp_path, gguf(LLAMA, tensors, data=32)))
    assert meta["gguf.data_end"] == (tmp_path / "m.gguf").stat().st_size
    with pytest.raises(ModelBroken, match="truncated GGUF file"):
        read_metadata(write(tmp_path, gguf(LLAMA, tensors, data=31)))


@pytest.mark.parametrize("data, message", [
    (b"GGML" + b"\0" * 20, "bad magic"),
    (gguf(LLAMA, version=1), "unsupported GGUF version 1"),
    (gguf(LLAMA)[:40], "truncated GGUF header"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 65 << 20), "string length"),
    (gguf([s("x") + struct.pack("<I", 99)]), "value type 99"),
    (gguf([kv("general.architecture", U32, 7)]), "general.architecture is int, expected str"),
    (gguf([kv("general.architecture", STR, "llama"), kv("llama.context_length", BOOL, True)]),
     "llama.context_length is bool"),
    (gguf(LLAMA + [kv("general.alignment", U32, 0)]), "general.alignment 0"),
])
def test_malformed_headers_are_model_broken(tmp_path, data, message):
    with pytest.raises(ModelBroken, match=message):
        read_metadata(write(tmp_path, data))


def test_nesting_is_bounded(tmp_path):
    inner = (U8, [1])
    for _ in range(3):
        inner = (ARR, [inner])
    ok = gguf(LLAMA + [kv("deep", ARR, inner)])                 # four levels of arrays
    assert read_metadata(write(tmp_path, ok), keep_arrays=True)["deep"] == [[[[1]]]]
    too_deep = gguf(LLAMA + [kv("deep", ARR, (ARR, [inner]))])  # five
    with pytest.raises(ModelBroken, match="nested deeper"):
        read_metadata(write(tmp_path, too_deep), keep_arrays=True)


def test_a_missing_file_is_model_broken(tmp_path):
    with pytest.raises(ModelBroken, match="cannot read"):
        read_metadata(tmp_path / "absent.gguf")


@pytest.mark.parametrize("meta, kind", [
    ({"general.architecture": "bert"}, "embedding"),
    ({"general.architecture": "nomic-bert", "nomic-bert.pooling_type": 1}, "embedding"),
    ({"general.architecture": "gemma", "gemma.pooling_type": 1}, "embedding"),
    ({"general.architecture": "qwen2", "qwen2.pooling_type": 1}, "chat"),   # rerank/pooling flag on a chat arch
    ({"general.architecture": "gemma", "gemma.pooling_type": 0}, "chat"),
    ({}, "chat"),
])
def test_describe_kind(meta, kind):
    d = describe(meta)
    assert d["kind"] == kind
    assert d["fim"] is False and d["chat_template"] is False


def test_describe_fim_from_either_token_and_no_context_when_not_an_int():
    assert describe({"tokenizer.ggml.prefix_token_id": 5})["fim"] is True
    d = describe({"general.architecture": "llama", "llama.context_length": "4096"})
    assert d["context_length"] is None and d["architecture"] == "llama" and d["name"] is None
