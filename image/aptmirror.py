"""The Debian mirror this build host's apt already uses, so image and test
root filesystems come from the same (reachable) archive without naming a
host in the code. `python3 -m image mirror [SUITE]` prints the URI for SUITE
(default: the pinned DEBIAN_SUITE of versions.env; e.g. bookworm-security too);
THOX_DEBIAN_MIRROR / THOX_DEBIAN_SECURITY_MIRROR override."""

from __future__ import annotations

import os
from pathlib import Path

APT = Path("/etc/apt")


def _entries(apt: Path = APT):
    """(uris, suites) of every enabled `deb` source, one-line and deb822 formats."""
    files = [apt / "sources.list"] + sorted((apt / "sources.list.d").glob("*.list")) + \
        sorted((apt / "sources.list.d").glob("*.sources"))
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        if f.suffix == ".sources":
            for stanza in text.split("\n\n"):
                fields = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line:
                        continue
                    k, _, v = line.partition(":")
                    fields[k.strip().lower()] = v.split()
                if "deb" in fields.get("types", []) and fields.get("enabled", ["yes"])[0] != "no":
                    yield fields.get("uris", []), fields.get("suites", [])
        else:
            for line in text.splitlines():
                parts = line.split("#", 1)[0].split()
                if len(parts) >= 3 and parts[0] == "deb":
                    if parts[1].startswith("["):  # options
                        while parts and not parts[1].endswith("]"):
                            parts.pop(1)
                        parts.pop(1)
                    yield [parts[1]], [parts[2]]


def mirror_for(suite: str, apt: Path = APT) -> str:
    env = "THOX_DEBIAN_SECURITY_MIRROR" if suite.endswith("-security") else "THOX_DEBIAN_MIRROR"
    if os.environ.get(env):
        return os.environ[env].rstrip("/")
    for uris, suites in _entries(apt):
        if suite in suites and uris:
            return uris[0].rstrip("/")
    raise SystemExit(f"no apt source for '{suite}' on this host: set {env} to a Debian mirror URL")


def image_mirrors(suite: str) -> tuple[str, str]:
    """(main, security) mirrors for an image of ``suite``; "" where this host has none
    (the bootstrap stage says what to set then)."""
    def one(s: str) -> str:
        try:
            return mirror_for(s)
        except SystemExit:
            return ""
    main = one(suite)
    return main, one(f"{suite}-security") or main
