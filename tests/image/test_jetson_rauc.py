"""The RAUC custom bootloader backend for Jetson (ansible/roles/jetson/files/thox-rauc-nvbootctrl),
run as RAUC runs it, against a stand-in for NVIDIA's nvbootctrl on PATH. The stand-in keeps the
rootfs slots' state in a JSON file and each slot's UEFI status in an efivarfs-style file
(RootfsStatusSlotA/B: 4 attribute bytes, then the 32-bit status; non-zero is unbootable), the
same files the backend resets. `power_cycle` plays the UEFI's part at a reboot."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from image.common import REPO

BACKEND = REPO / "ansible/roles/jetson/files/thox-rauc-nvbootctrl"
GUID = "781e084c-a330-417c-b678-38e696380cb9"

FAKE_NVBOOTCTRL = r'''#!PYTHON
"""Stand-in for NVIDIA's nvbootctrl, rootfs slots only (-t rootfs)."""
import json, os, sys
from pathlib import Path

state_file = Path(os.environ["FAKE_NVB_STATE"])
efivars = Path(os.environ["THOX_EFIVARS"])
guid = "GUID"
with open(os.environ["FAKE_NVB_LOG"], "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\n")
args = sys.argv[1:]
if args[:2] != ["-t", "rootfs"]:
    sys.exit("fake nvbootctrl: only -t rootfs is handled here")
cmd, rest = (args[2] if len(args) > 2 else ""), args[3:]
if cmd == os.environ.get("FAKE_NVB_FAIL"):
    sys.exit(f"fake nvbootctrl: {cmd}: failed as asked")
st = json.loads(state_file.read_text())
names = "AB"

def var(n):
    return efivars / f"RootfsStatusSlot{names[n]}-{guid}"

def status(n):
    v = var(n)
    return "unbootable" if v.exists() and v.read_bytes()[4:8] != b"\0\0\0\0" else "normal"

def slot_arg():
    if len(rest) != 1 or rest[0] not in ("0", "1"):
        sys.exit("fake nvbootctrl: a slot number, 0 or 1, is required")
    return int(rest[0])

if cmd == "get-current-slot":
    print(os.environ.get("FAKE_NVB_CURRENT_PRINTS", st["current"]))
elif cmd == "dump-slots-info":
    print(f"Current rootfs slot: {names[st['current']]}")
    if not os.environ.get("FAKE_NVB_NO_ACTIVE_LINE"):
        print(f"Active rootfs slot: {names[st['active']]}")
    print("num_slots: 2")
    for n in (0, 1):
        print(f"slot: {n},             retry_count: {st['retry'][n]},             status: {status(n)}")
elif cmd == "set-active-boot-slot":
    n = slot_arg()
    if not os.environ.get("FAKE_NVB_IGNORE_SET_ACTIVE"):
        st["active"] = n
        st["retry"][n] = 3
elif cmd == "mark-boot-successful":
    st["retry"][st["current"]] = 3
elif cmd == "set-slot-as-unbootable":
    n = slot_arg()
    var(n).write_bytes(b"\x07\0\0\0\xff\0\0\0")
    st["retry"][n] = 0
elif cmd == "is-slot-bootable":
    sys.exit(0 if status(slot_arg()) == "normal" else 1)
else:
    sys.exit(f"fake nvbootctrl: unknown command {cmd!r}")
state_file.write_text(json.dumps(st))
'''


class Board:
    """A Jetson's rootfs slot state as the fake nvbootctrl and the backend see it."""

    def __init__(self, tmp: Path):
        self.bin = tmp / "bin"
        self.bin.mkdir()
        fake = self.bin / "nvbootctrl"
        fake.write_text(FAKE_NVBOOTCTRL.replace("#!PYTHON", "#!" + sys.executable).replace('"GUID"', repr(GUID)))
        fake.chmod(0o755)
        self.efivars = tmp / "efivars"
        self.efivars.mkdir()
        self.state = tmp / "slots.json"
        self.state.write_text(json.dumps({"current": 0, "active": 0, "retry": [3, 3]}))
        self.log = tmp / "nvbootctrl.log"
        self.log.write_text("")
        self.env = {**os.environ, "PATH": f"{self.bin}:{os.environ['PATH']}", "THOX_EFIVARS": str(self.efivars),
                    "FAKE_NVB_STATE": str(self.state), "FAKE_NVB_LOG": str(self.log)}

    def backend(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BACKEND), *args], env={**self.env, **env}, capture_output=True, text=True,
                              timeout=60)

    def ok(self, *args: str) -> str:
        p = self.backend(*args)
        assert p.returncode == 0, f"{args}: rc {p.returncode}: {p.stderr}"
        assert p.stderr == ""
        return p.stdout.strip()

    def slots(self) -> dict:
        return json.loads(self.state.read_text())

    def status_var(self, name: str) -> bytes | None:
        f = self.efivars / f"RootfsStatusSlot{name}-{GUID}"
        return f.read_bytes() if f.exists() else None

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines()

    def power_cycle(self) -> str:
        """The UEFI at boot: the active slot if bootable, else the other one (fail-over); every
        boot takes one from the chosen slot's retry count, and one that reaches 0 is unbootable."""
        st = self.slots()

        def bootable(n: int) -> bool:
            v = self.status_var("AB"[n])
            return v is None or v[4:8] == b"\0\0\0\0"
        chosen = st["active"] if bootable(st["active"]) else 1 - st["active"]
        assert bootable(chosen), "neither slot is bootable: the board would not boot"
        st["active"] = st["current"] = chosen
        st["retry"][chosen] -= 1
        if st["retry"][chosen] == 0:
            (self.efivars / f"RootfsStatusSlot{'AB'[chosen]}-{GUID}").write_bytes(b"\x07\0\0\0\xff\0\0\0")
        self.state.write_text(json.dumps(st))
        return "AB"[chosen]


@pytest.fixture
def board(tmp_path) -> Board:
    return Board(tmp_path)


def test_backend_is_installed_by_the_jetson_role():
    assert os.access(BACKEND, os.X_OK)
    tasks = (REPO / "ansible/roles/jetson/tasks/jetson.yml").read_text()
    assert "thox-rauc-nvbootctrl" in tasks and "/usr/local/sbin/thox-rauc-nvbootctrl" in tasks


def test_get_current_and_get_primary(board):
    assert board.ok("get-current") == "A"
    assert board.ok("get-primary") == "A"
    st = board.slots()
    st.update(current=1, active=0)
    board.state.write_text(json.dumps(st))
    assert board.ok("get-current") == "B"
    assert board.ok("get-primary") == "A"
    assert all(c.startswith("-t rootfs ") for c in board.calls()), board.calls()


def test_get_state_reads_the_slot_status(board):
    assert board.ok("get-state", "A") == "good" and board.ok("get-state", "B") == "good"
    (board.efivars / f"RootfsStatusSlotB-{GUID}").write_bytes(b"\x07\0\0\0\xff\0\0\0")
    assert board.ok("get-state", "B") == "bad" and board.ok("get-state", "A") == "good"


def test_set_primary_resets_the_status_and_switches(board):
    (board.efivars / f"RootfsStatusSlotB-{GUID}").write_bytes(b"\x07\0\0\0\xff\0\0\0")
    assert board.ok("set-primary", "B") == ""
    assert board.status_var("B") == b"\x07\0\0\0\0\0\0\0"
    assert board.slots()["active"] == 1
    assert "-t rootfs set-active-boot-slot 1" in board.calls()
    assert board.ok("get-primary") == "B" and board.ok("get-state", "B") == "good"


def test_set_state_good_on_the_booted_slot_marks_the_boot_successful(board):
    st = board.slots()
    st["retry"][0] = 1
    board.state.write_text(json.dumps(st))
    assert board.ok("set-state", "A", "good") == ""
    assert "-t rootfs mark-boot-successful" in board.calls()
    assert board.slots()["retry"][0] == 3


def test_set_state_good_on_the_other_slot_makes_it_bootable(board):
    (board.efivars / f"RootfsStatusSlotB-{GUID}").write_bytes(b"\x07\0\0\0\xff\0\0\0")
    board.ok("set-state", "B", "good")
    assert board.ok("get-state", "B") == "good"
    assert "-t rootfs mark-boot-successful" not in board.calls(), "B is not the booted slot"


def test_set_state_bad_of_the_active_slot_hands_the_next_boot_to_the_other(board):
    board.ok("set-state", "A", "bad")
    assert "-t rootfs set-slot-as-unbootable 0" in board.calls()
    assert board.ok("get-state", "A") == "bad"
    assert board.ok("get-primary") == "B"


def test_set_state_bad_of_an_inactive_slot_keeps_the_active_one(board):
    board.ok("set-state", "B", "bad")
    assert board.ok("get-state", "B") == "bad" and board.ok("get-primary") == "A"
    assert not any("set-active-boot-slot" in c for c in board.calls())


@pytest.mark.parametrize("args, rc, message", [
    ((), 2, "usage: thox-rauc-nvbootctrl"),
    (("reboot",), 2, "usage: thox-rauc-nvbootctrl"),
    (("get-state",), 2, "usage:"),
    (("set-state", "A"), 2, "usage:"),
    (("get-primary", "A"), 2, "usage:"),
    (("set-primary", "C"), 1, "unknown slot 'C' (the bootnames are A and B)"),
    (("get-state", "0"), 1, "unknown slot '0'"),
    (("set-state", "A", "maybe"), 1, "unknown state 'maybe' (good or bad)"),
])
def test_bad_arguments_exit_non_zero_with_one_line(board, args, rc, message):
    p = board.backend(*args)
    assert p.returncode == rc and p.stdout == ""
    assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert board.slots() == {"current": 0, "active": 0, "retry": [3, 3]}


@pytest.mark.parametrize("args, env, message", [
    (("get-current",), {"FAKE_NVB_FAIL": "get-current-slot"}, "nvbootctrl -t rootfs get-current-slot failed"),
    (("get-primary",), {"FAKE_NVB_FAIL": "dump-slots-info"}, "nvbootctrl -t rootfs dump-slots-info failed"),
    (("get-state", "B"), {"FAKE_NVB_FAIL": "dump-slots-info"}, "dump-slots-info failed"),
    (("set-primary", "B"), {"FAKE_NVB_FAIL": "set-active-boot-slot"}, "set-active-boot-slot 1 failed"),
    (("set-state", "A", "good"), {"FAKE_NVB_FAIL": "mark-boot-successful"}, "mark-boot-successful failed"),
    (("set-state", "B", "bad"), {"FAKE_NVB_FAIL": "set-slot-as-unbootable"}, "set-slot-as-unbootable 1 failed"),
    (("get-current",), {"FAKE_NVB_CURRENT_PRINTS": "2"}, "nvbootctrl reported slot '2', expected 0 or 1"),
    (("get-primary",), {"FAKE_NVB_NO_ACTIVE_LINE": "1"}, "no 'Active rootfs slot:' line"),
    (("set-primary", "B"), {"FAKE_NVB_IGNORE_SET_ACTIVE": "1"}, "set-active-boot-slot 1 left slot A active"),
    (("get-current",), {"THOX_NVBOOTCTRL": "/nonexistent/nvbootctrl"}, "nvbootctrl -t rootfs get-current-slot failed"),
])
def test_nvbootctrl_failures_are_errors(board, args, env, message):
    p = board.backend(*args, **env)
    assert p.returncode != 0 and p.stdout == ""
    assert message in p.stderr, p.stderr


def test_update_then_failed_boot_falls_back_then_next_update_works(board):
    """RAUC's order for an install into the other slot (mark it bad, write it, make it primary),
    a reboot into the update, the health check marking it bad, a reboot back into the old slot;
    then a second install into the same slot boots and is marked good."""
    assert board.ok("get-current") == "A"
    # install v2 into B
    board.ok("set-state", "B", "bad")
    assert board.ok("get-primary") == "A", "a half-written B is never the next boot"
    board.ok("set-primary", "B")
    assert board.power_cycle() == "B"
    assert board.ok("get-current") == "B"
    # the health check fails: `rauc status mark-bad booted`, then a reboot
    board.ok("set-state", "B", "bad")
    assert board.ok("get-primary") == "A"
    assert board.power_cycle() == "A"
    assert board.ok("get-current") == "A" and board.ok("get-state", "B") == "bad"
    board.ok("set-state", "A", "good")
    # install v3 into B again: the slot marked bad before is bootable once rewritten
    board.ok("set-state", "B", "bad")
    board.ok("set-primary", "B")
    assert board.power_cycle() == "B"
    board.ok("set-state", "B", "good")
    assert board.ok("get-state", "B") == "good" and board.ok("get-primary") == "B"
    assert board.slots()["retry"][1] == 3
    assert board.power_cycle() == "B"
    assert all(c.startswith("-t rootfs ") for c in board.calls())


def test_hung_update_falls_back_when_its_retries_run_out(board):
    """A boot that never reaches the health check (hang, watchdog reset) is not marked good:
    the UEFI's retry count runs out and the old slot boots, which the backend then reports."""
    board.ok("set-state", "B", "bad")
    board.ok("set-primary", "B")
    assert [board.power_cycle() for _ in range(4)] == ["B", "B", "B", "A"]
    assert board.ok("get-current") == "A" and board.ok("get-primary") == "A"
    assert board.ok("get-state", "B") == "bad"
