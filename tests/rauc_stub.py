"""A stand-in for the `rauc` command on a machine without a RAUC service
(RAUC is an external tool; the multi-boot QEMU test runs the real one).

``info`` and the bundle check of ``install`` run the real /usr/bin/rauc with
the test CA as keyring (``RAUC_STUB_KEYRING``), so signatures, truncation and
compatibility are judged by RAUC itself. ``install`` then prints progress the
way `rauc install` does and records the bundle's version in the other slot;
``status`` prints RAUC's JSON from the state file ``RAUC_STUB_STATE``; every
call is appended to its ``calls``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

REAL = "/usr/bin/rauc"
STATE = os.environ["RAUC_STUB_STATE"]


def load() -> dict:
    with open(STATE) as f:
        return json.load(f)


def save(st: dict) -> None:
    with open(STATE + ".tmp", "w") as f:
        json.dump(st, f)
    os.replace(STATE + ".tmp", STATE)


def real_info(path: str) -> subprocess.CompletedProcess:
    return subprocess.run([REAL, "info", "--keyring", os.environ["RAUC_STUB_KEYRING"], "--output-format=json", path],
                          capture_output=True, text=True)


def status(st: dict) -> None:
    slots = []
    for name, s in sorted(st["slots"].items()):
        d = {"class": "rootfs", "device": f"/dev/disk/by-partlabel/thox-{s['bootname'].lower()}", "type": "ext4",
             "bootname": s["bootname"], "state": "booted" if s["bootname"] == st["booted"] else "inactive",
             "parent": None, "mountpoint": "/" if s["bootname"] == st["booted"] else None,
             "boot_status": "good" if s["good"] else "bad"}
        d["slot_status"] = {"bundle": {"compatible": "thox-amd64", **({"version": s["version"]} if s["version"] else {})},
                            **({"installed": {"timestamp": s["installed"], "count": 1}} if s.get("installed") else {})}
        slots.append({name: d})
    print(json.dumps({"compatible": "thox-amd64", "variant": None, "booted": st["booted"],
                      "boot_primary": st["primary"], "slots": slots}))


def install(st: dict, path: str) -> int:
    for pct, msg in ((0, "Installing"), (0, "Determining slot states"), (20, "Determining slot states done."),
                     (20, "Checking bundle"), (20, "Verifying signature")):
        print(f"{pct:3d}% {msg}", flush=True)
    info = real_info(path)
    if info.returncode != 0:
        reason = [ln for ln in info.stderr.splitlines() if ln.strip() and not ln.startswith("rauc-Message")][-1]
        print(" 40% Verifying signature failed.\n 40% Checking bundle failed.\n100% Installing failed.", flush=True)
        print(f"LastError: Failed checking bundle: {reason}")
        print(f"Installing `{path}` failed", file=sys.stderr)
        return 1
    version = json.loads(info.stdout)["version"]
    other = next(n for n, s in st["slots"].items() if s["bootname"] != st["booted"])
    for pct, msg in ((40, "Verifying signature done."), (40, "Checking bundle done."), (60, f"Copying image to {other}"),
                     (80, f"Copying image to {other} done."), (100, "Installing done.")):
        print(f"{pct:3d}% {msg}", flush=True)
        time.sleep(0.05)
    st["slots"][other].update(version=version, good=True, installed="2026-01-01T00:00:00Z")
    st["primary"] = other
    save(st)
    print(f"Installing `{path}` succeeded")
    return 0


def main(argv: list[str]) -> int:
    st = load()
    st.setdefault("calls", []).append(argv)
    save(st)
    if argv[:1] == ["info"]:
        p = real_info(argv[-1])
        sys.stdout.write(p.stdout)
        sys.stderr.write(p.stderr)
        return p.returncode
    if argv[:1] == ["install"]:
        return install(st, argv[-1])
    if argv[:3] == ["status", "mark-active", "other"]:
        other = next(n for n, s in st["slots"].items() if s["bootname"] != st["booted"])
        st["primary"] = other
        save(st)
        print(f"marked slot {other} as active")
        return 0
    if argv[:1] == ["status"]:
        status(st)
        return 0
    print(f"rauc stub: unsupported call {argv}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
