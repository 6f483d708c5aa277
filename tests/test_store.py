"""The model store itself: model ids, GGUF header validation, and replacing an
installed model so that a crash at any point leaves one whole model."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from thox.errors import InvalidRequest, ModelBroken
from thox.store import ModelStore
from thox.store.gguf_meta import read_metadata
from thox.store.store import MODEL_ID_RE, Manifest, validate_model_id

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- hand-made GGUF bytes

def _s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def kv_str(key: str, value: str) -> bytes:
    return _s(key) + struct.pack("<I", 8) + _s(value)


def kv_u32(key: str, value: int) -> bytes:
    return _s(key) + struct.pack("<I", 4) + struct.pack("<I", value)


def kv_raw(key: str, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def gguf(*kvs: bytes, tensors: int = 0) -> bytes:
    """A GGUF v3 header with the given key/values and no tensors, padded to the default alignment."""
    head = b"GGUF" + struct.pack("<IQQ", 3, tensors, len(kvs)) + b"".join(kvs)
    return head + b"\0" * (-len(head) % 32)


def nested_arrays(depth: int) -> bytes:
    """An array of an array of ... (depth levels), the innermost holding one u32."""
    inner = struct.pack("<IQ", 4, 1) + struct.pack("<I", 7)
    for _ in range(depth - 1):
        inner = struct.pack("<IQ", 9, 1) + inner
    return inner


GOOD = (kv_str("general.architecture", "llama"), kv_u32("llama.context_length", 1024))


def test_hand_made_header_reads(tmp_path):
    p = tmp_path / "ok.gguf"
    p.write_bytes(gguf(*GOOD, kv_raw("tokenizer.ggml.scores", 9, nested_arrays(2))))
    meta = read_metadata(p, keep_arrays=True)
    assert meta["general.architecture"] == "llama" and meta["llama.context_length"] == 1024
    assert meta["tokenizer.ggml.scores"] == [[7]]


@pytest.mark.parametrize("case, blob", [
    ("arrays nested 100000 deep", gguf(*GOOD, kv_raw("x", 9, nested_arrays(100_000)))),
    ("arrays nested 5 deep", gguf(*GOOD, kv_raw("x", 9, nested_arrays(5)))),
    ("alignment is a string", gguf(*GOOD, kv_str("general.alignment", "sixteen"))),
    ("alignment is zero", gguf(*GOOD, kv_u32("general.alignment", 0))),
    ("architecture is a number", gguf(kv_u32("general.architecture", 5))),
    ("context length is a string", gguf(kv_str("general.architecture", "llama"),
                                        kv_str("llama.context_length", "lots"))),
    ("chat template is a number", gguf(*GOOD, kv_u32("tokenizer.chat_template", 1))),
    ("unknown value type", gguf(*GOOD, kv_raw("x", 77, b"\0" * 8))),
    ("array of unknown type", gguf(*GOOD, kv_raw("x", 9, struct.pack("<IQ", 99, 3)))),
    ("string longer than the file", gguf(*GOOD, kv_raw("x", 8, struct.pack("<Q", 1 << 20)))),
    ("tensor count absurd", b"GGUF" + struct.pack("<IQQ", 3, 1 << 40, 0)),
])
@pytest.mark.parametrize("keep_arrays", [False, True])
def test_malformed_headers_are_model_broken(tmp_path, case, blob, keep_arrays):
    p = tmp_path / "bad.gguf"
    p.write_bytes(blob)
    with pytest.raises(ModelBroken):
        read_metadata(p, keep_arrays=keep_arrays)


def test_import_of_a_deeply_nested_header_is_one_line(tmp_path):
    """Through the CLI: a one-line error, no RecursionError traceback."""
    from thoxtest import run_thox
    p = tmp_path / "deep.gguf"
    p.write_bytes(gguf(*GOOD, kv_raw("x", 9, nested_arrays(100_000))))
    r = run_thox(tmp_path / "home", "models", "import", str(p), "--id", "deep", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "corrupt GGUF" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- model ids

@pytest.mark.parametrize("bad", ["abc\n", "abc\r\n", "a\nb", "\nabc", "", "-x", ".hidden", "a/b", "a..b",
                                 "x" * 129, "abc ", "über"])
def test_model_id_rejects(bad):
    assert not MODEL_ID_RE.fullmatch(bad) or ".." in bad
    with pytest.raises(InvalidRequest):
        validate_model_id(bad)


@pytest.mark.parametrize("good", ["thox-demo", "qwen2.5-coder:7b", "A_b.c", "x" * 128])
def test_model_id_accepts(good):
    assert validate_model_id(good) == good


# --------------------------------------------------------------------------- replacing a model

def whole_models(store: ModelStore) -> dict[str, str]:
    """{id: sha256} of every listed model whose file is complete and verifies."""
    return {m.id: m.sha256 for m in store.list() if store.verify(m.id)}


@pytest.fixture
def two_versions(models_dir) -> tuple[Path, Path]:
    return models_dir / "tiny.gguf", models_dir / "tiny-nofim.gguf"


def _staged(store: ModelStore, src: Path, model_id: str) -> Path:
    """A complete staging directory of ``model_id`` built from ``src``, as install_file builds it."""
    other = ModelStore(store.root.parent / "elsewhere")
    m = other.import_file(src, model_id, replace=True)
    stage = store.staging_dir(model_id)
    for f in (other.root / model_id).iterdir():
        os.replace(f, stage / f.name)
    assert json.loads((stage / "manifest.json").read_text())["sha256"] == m.sha256
    return stage


def _mid_replace(tmp_path: Path, two_versions: tuple[Path, Path]) -> tuple[ModelStore, Manifest, Path]:
    """A store caught replacing model "m" after step 2: the old copy renamed to .old-m, the new one
    staged; returns the store, the old manifest and the staging directory."""
    old_src, new_src = two_versions
    store = ModelStore(tmp_path / "models")
    old = store.import_file(old_src, "m")
    stage = _staged(store, new_src, "m")
    os.replace(store.root / "m", store.root / ".old-m")
    return store, old, stage


def test_recover_after_old_renamed_away(tmp_path, two_versions):
    """Crash between steps 2 and 3: no <id>, a whole .old-<id>, a whole staging dir."""
    store, old, stage = _mid_replace(tmp_path, two_versions)
    assert [m.id for m in store.list()] == []
    store.cleanup_staging()
    assert whole_models(store) == {"m": old.sha256}
    assert sorted(p.name for p in store.root.iterdir()) == ["m"]
    assert not stage.exists()


def test_reader_recovers_without_a_restart(tmp_path, two_versions):
    old_src, _ = two_versions
    store = ModelStore(tmp_path / "models")
    old = store.import_file(old_src, "m")
    os.replace(store.root / "m", store.root / ".old-m")
    assert store.get("m").sha256 == old.sha256 and store.verify("m")


def test_recover_after_new_renamed_in(tmp_path, two_versions):
    """Crash between steps 3 and 4: the new <id> is whole, .old-<id> is left over."""
    store, _, stage = _mid_replace(tmp_path, two_versions)
    os.replace(stage, store.root / "m")
    new_sha = store.get("m").sha256
    store.cleanup_staging()
    assert whole_models(store) == {"m": new_sha}
    assert sorted(p.name for p in store.root.iterdir()) == ["m"]


def test_recover_keeps_the_whole_copy_when_the_installed_one_is_damaged(tmp_path, two_versions):
    store, old, stage = _mid_replace(tmp_path, two_versions)
    os.replace(stage, store.root / "m")
    gguf_file = store.root / "m" / store.get("m").file
    gguf_file.write_bytes(gguf_file.read_bytes()[:100])  # the new copy is cut short
    store.cleanup_staging()
    assert whole_models(store) == {"m": old.sha256}


def test_staging_only_is_removed_and_the_model_stays(tmp_path, two_versions):
    old_src, new_src = two_versions
    store = ModelStore(tmp_path / "models")
    old = store.import_file(old_src, "m")
    _staged(store, new_src, "m")
    store.cleanup_staging()
    assert whole_models(store) == {"m": old.sha256}
    assert sorted(p.name for p in store.root.iterdir()) == ["m"]


KILL_AT_NTH_REPLACE = r"""
import os, sys
from pathlib import Path
from thox.store import ModelStore
n = int(sys.argv[3])
real = os.replace
calls = 0
def replace(a, b):
    global calls
    if Path(a).parent == Path(sys.argv[1]) or Path(b).parent == Path(sys.argv[1]):
        calls += 1
        if calls == n:
            os.kill(os.getpid(), 9)
    return real(a, b)
os.replace = replace
ModelStore(sys.argv[1]).import_file(sys.argv[2], "m", replace=True)
print("finished")
"""


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_replace_killed_at_each_rename_leaves_one_whole_model(tmp_path, two_versions, n):
    """A real `import --force` process SIGKILLed at its n-th rename in the store:
    after recovery exactly one whole model, the old or the new one."""
    old_src, new_src = two_versions
    root = tmp_path / "models"
    store = ModelStore(root)
    old = store.import_file(old_src, "m")
    new_sha = ModelStore(tmp_path / "ref").import_file(new_src, "ref").sha256
    p = subprocess.run([sys.executable, "-c", KILL_AT_NTH_REPLACE, str(root), str(new_src), str(n)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode in (-9, 0), p.stderr
    store.cleanup_staging()
    models = whole_models(store)
    assert list(models) == ["m"] and models["m"] in (old.sha256, new_sha), (n, models)
    if p.returncode == 0:
        assert models["m"] == new_sha
    assert sorted(x.name for x in root.iterdir()) == ["m"]


def test_replace_without_a_crash(tmp_path, two_versions):
    old_src, new_src = two_versions
    store = ModelStore(tmp_path / "models")
    store.import_file(old_src, "m")
    new = store.import_file(new_src, "m", replace=True)
    assert whole_models(store) == {"m": new.sha256}
    assert sorted(p.name for p in store.root.iterdir()) == ["m"]
