"""The model store: GGUF files plus a manifest each, under $THOX_HOME/models."""

from .store import Manifest, ModelStore, sha256_file, validate_model_id

__all__ = ["Manifest", "ModelStore", "sha256_file", "validate_model_id"]
