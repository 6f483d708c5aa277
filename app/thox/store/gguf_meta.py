"""Read a GGUF file's header and key/value metadata (not the tensors).

Used to validate files before they enter the store and to learn a model's
architecture, context length, chat template and FIM tokens without loading it.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import ModelBroken

GGUF_MAGIC = b"GGUF"
# GGUF value types
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_STRING = 64 << 20
_MAX_ARRAY = 1 << 24
_MAX_DEPTH = 4          # arrays of arrays: real files nest at most once
_MAX_ALIGNMENT = 1 << 16


class _Reader:
    def __init__(self, f: BinaryIO, path: Path):
        self.f, self.path = f, path

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise ModelBroken(f"{self.path.name}: truncated GGUF header")
        return b

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > _MAX_STRING:
            raise ModelBroken(f"{self.path.name}: corrupt GGUF string length {n}")
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int, keep_arrays: bool, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            if depth >= _MAX_DEPTH:
                raise ModelBroken(f"{self.path.name}: corrupt GGUF header (arrays nested deeper than {_MAX_DEPTH})")
            itype, count = self.unpack("<I"), self.unpack("<Q")
            if count > _MAX_ARRAY:
                raise ModelBroken(f"{self.path.name}: corrupt GGUF array length {count}")
            if not keep_arrays and itype in _SCALARS:  # skip quickly
                self.f.seek(struct.calcsize(_SCALARS[itype]) * count, 1)
                return count
            items = [self.value(itype, keep_arrays, depth + 1) for _ in range(count)]
            return items if keep_arrays else count
        raise ModelBroken(f"{self.path.name}: corrupt GGUF value type {vtype}")


def read_metadata(path: Path | str, keep_arrays: bool = False) -> dict[str, Any]:
    """Return the GGUF metadata dict. Arrays are replaced by their length
    unless ``keep_arrays``. Raises ModelBroken for anything that is not a
    well-formed GGUF header, or whose tensor data is shorter than declared."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            r = _Reader(f, path)
            if f.read(4) != GGUF_MAGIC:
                raise ModelBroken(f"{path.name}: not a GGUF file (bad magic)")
            version = r.unpack("<I")
            if version not in (2, 3):
                raise ModelBroken(f"{path.name}: unsupported GGUF version {version}")
            n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
            if n_kv > 1 << 20 or n_tensors > 1 << 24:
                raise ModelBroken(f"{path.name}: corrupt GGUF header")
            meta: dict[str, Any] = {"gguf.version": version, "gguf.tensor_count": n_tensors}
            for _ in range(n_kv):
                key = r.string()
                meta[key] = r.value(r.unpack("<I"), keep_arrays)
            _check_types(meta, path)
            meta["gguf.data_end"] = _tensor_data_end(r, n_tensors, meta)
            size = path.stat().st_size
            if meta["gguf.data_end"] > size:
                raise ModelBroken(f"{path.name}: truncated GGUF file ({size} of "
                                  f"{meta['gguf.data_end']} bytes)")
            return meta
    except OSError as e:
        raise ModelBroken(f"{path.name}: cannot read: {e.strerror}") from None
    except (ValueError, TypeError, OverflowError, RecursionError, struct.error) as e:
        # anything a malformed header can still provoke is the same finding: not a usable GGUF
        raise ModelBroken(f"{path.name}: corrupt GGUF header ({type(e).__name__})") from None


def _check_types(meta: dict[str, Any], path: Path) -> None:
    """The keys this package reads must have the types the GGUF spec gives them."""
    arch = meta.get("general.architecture", "unknown")
    want: dict[str, type] = {"general.architecture": str, "general.name": str, "tokenizer.chat_template": str,
                             "general.alignment": int}
    if isinstance(arch, str):
        want[f"{arch}.context_length"] = int
    for key, typ in want.items():
        v = meta.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, typ)):
            raise ModelBroken(f"{path.name}: corrupt GGUF header ({key} is {type(v).__name__}, "
                              f"expected {typ.__name__})")


# bytes per block and elements per block of ggml types (enough to size tensors)
_TYPE_SIZE = {0: (4, 1), 1: (2, 1), 2: (18, 32), 3: (20, 32), 6: (22, 32), 7: (24, 32), 8: (34, 32),
              9: (36, 32), 10: (84, 256), 11: (110, 256), 12: (144, 256), 13: (176, 256),
              14: (210, 256), 15: (292, 256), 24: (1, 1), 25: (2, 1), 26: (4, 1), 27: (8, 1),
              28: (8, 1), 30: (2, 1)}


def _tensor_data_end(r: _Reader, n_tensors: int, meta: dict[str, Any]) -> int:
    end = 0
    for _ in range(n_tensors):
        r.string()
        n_dims = r.unpack("<I")
        if n_dims > 8:
            raise ModelBroken(f"{r.path.name}: corrupt GGUF tensor info")
        dims = [r.unpack("<Q") for _ in range(n_dims)]
        ttype, offset = r.unpack("<I"), r.unpack("<Q")
        n = 1
        for d in dims:
            n *= d
        if ttype in _TYPE_SIZE:
            bsize, bel = _TYPE_SIZE[ttype]
            end = max(end, offset + n * bsize // bel)
        else:  # unknown type: at least the offset must exist
            end = max(end, offset)
    align = meta.get("general.alignment", 32)
    if isinstance(align, bool) or not isinstance(align, int) or not 0 < align <= _MAX_ALIGNMENT:
        raise ModelBroken(f"{r.path.name}: corrupt GGUF header (general.alignment {align!r})")
    start = r.f.tell()
    start += (-start) % align
    return start + end


def describe(meta: dict[str, Any]) -> dict[str, Any]:
    """Capabilities the service cares about, derived from metadata."""
    arch = str(meta.get("general.architecture", "unknown"))
    ctx = meta.get(f"{arch}.context_length")
    pooling = meta.get(f"{arch}.pooling_type")
    is_embedding = arch in ("bert", "nomic-bert", "jina-bert-v2") or (pooling not in (None, 0)
                                                                     and arch not in ("llama", "qwen2"))
    has_fim = "tokenizer.ggml.fim_pre_token_id" in meta or "tokenizer.ggml.prefix_token_id" in meta
    return {
        "architecture": arch,
        "name": meta.get("general.name"),
        "context_length": int(ctx) if isinstance(ctx, int) else None,
        "chat_template": bool(meta.get("tokenizer.chat_template")),
        "fim": bool(has_fim),
        "kind": "embedding" if is_embedding else "chat",
    }
