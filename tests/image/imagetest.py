"""Helpers of the image tests: the times file, the cold-cache build shared by a session and the
VM on it (`Box`: one persistent disk, many boots).
(A module of its own: several test folders have a conftest.py, so `from conftest import`
would be ambiguous.)"""
from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from thoxtest import free_port

from image import qemu
from image.common import cache_dir

REPO = Path(__file__).resolve().parents[2]
CACHE = cache_dir()
# what a cold cache starts with: the two compiled llama-cpp-python wheels (a compile takes
# 8-15 minutes each; everything else is downloaded by the build)
COMPILED_WHEELS = ("host", "portable")
TIMES_FILE = REPO / "build" / "image-e2e-times.json"
BOOT_TIMEOUT = 900            # one boot under TCG on a loaded 2-core host, API ready


def record_times(**kv) -> None:
    TIMES_FILE.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(TIMES_FILE.read_text()) if TIMES_FILE.exists() else {}
    data.update(kv)
    TIMES_FILE.write_text(json.dumps(data, indent=1) + "\n")


@dataclass
class BuiltImage:
    image: Path          # <out>/thox-amd64.img
    out: Path            # IMAGE_OUT: manifest.json, thox-amd64.img.sha256, thox-amd64.files
    cache: Path          # the cold cache the build filled (rootfs-amd64 is the tree the image was packed from)
    seconds: float       # wall time of `make image`
    seeded: list[str]    # the files the cache held before the build


def mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(prefix)]


class Box:
    """The VM on one persistent overlay disk and one firmware-variables file: `start` boots it
    (again), `kill` is the power cut."""

    def __init__(self, image: Path, rundir: Path, user: str):
        self.rundir, self.user = rundir, user
        self.overlay, self.vars_fd = qemu.prepare(image, rundir)
        self.key = qemu.ensure_key(rundir / "id_ed25519")
        self.api_port, self.ssh_port = free_port(), free_port()
        self.console = rundir / "console.log"
        self.qmp = rundir / "qmp.sock"
        self.vm: qemu.VM | None = None
        self.boots = 0
        self.first_boot_s = self.last_ssh_s = self.last_api_s = 0.0
        self.first_boot: dict[str, float] = {}     # the first boot's times (conftest.booted_image)
        self.conn = 0            # the ssh connection generation: a new one for every boot

    # one multiplexed ssh connection per boot: a key exchange under TCG costs the guest about a
    # second, and the image tests run a few hundred commands
    def _ssh_opts(self) -> list[str]:
        return [*qemu.SSH_OPTS, "-i", str(self.key), "-o", "ControlMaster=auto",
                "-o", f"ControlPath={self.rundir}/cm-{self.conn}", "-o", "ControlPersist=300",
                "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]

    def ssh_argv(self, command: str) -> list[str]:
        return ["ssh", *self._ssh_opts(), "-p", str(self.ssh_port), f"{self.user}@127.0.0.1", command]

    def new_connection(self) -> None:
        """The guest went (or goes) down: stop this boot's master connection, use a new one."""
        subprocess.run(["ssh", *self._ssh_opts(), "-O", "exit", "-p", str(self.ssh_port), f"{self.user}@127.0.0.1"],
                       capture_output=True, timeout=30)
        self.conn += 1

    def start(self) -> None:
        self.new_connection()
        cmd = qemu.qemu_cmd(self.overlay, self.vars_fd, api_port=self.api_port, ssh_port=self.ssh_port,
                            pubkey=Path(str(self.key) + ".pub").read_text(), console=str(self.console),
                            qmp=self.qmp)
        # the serial log of every power-on is kept (QEMU truncates its file: append by hand)
        self._save_console()
        self.vm = qemu.VM(cmd, self.qmp).__enter__()
        self.boots += 1

    def _save_console(self) -> None:
        if self.console.exists():
            with open(self.rundir / "console-all.log", "a") as all_, open(self.console, errors="replace") as c:
                all_.write(c.read())
            self.console.unlink()

    def serial(self) -> str:
        """Everything the serial console printed in this module, every power-on."""
        old = (self.rundir / "console-all.log").read_text(errors="replace") if (self.rundir / "console-all.log").exists() else ""
        return old + (self.console.read_text(errors="replace") if self.console.exists() else "")

    @property
    def proc(self):
        return self.vm.proc

    def ssh(self, command: str, check: bool = True, timeout: float = 600) -> str:
        p = subprocess.run(self.ssh_argv(command), capture_output=True, text=True, timeout=timeout)
        if check:
            assert p.returncode == 0, f"{command}: {p.stdout[-3000:]}{p.stderr[-3000:]}"
        return p.stdout

    def ssh_rebooting(self, command: str, timeout: float = 1800) -> str:
        """A command that ends with the guest rebooting: ssh's exit status is the command's (0) or
        255 when the connection dropped as the guest went down; anything else is a failure."""
        p = subprocess.run(self.ssh_argv(command), capture_output=True, text=True, timeout=timeout)
        assert p.returncode in (0, 255), f"{command} ({p.returncode}): {p.stdout[-3000:]}{p.stderr[-3000:]}"
        if p.returncode == 255:
            assert "thox: error" not in p.stderr, p.stderr
        return p.stdout + p.stderr

    def scp_to(self, src: Path, dst: str) -> None:
        subprocess.run(["scp", *self._ssh_opts(), "-P", str(self.ssh_port), str(src),
                        f"{self.user}@127.0.0.1:{dst}"], check=True, capture_output=True, timeout=900)

    def scp_from(self, src: str, dst: Path) -> None:
        subprocess.run(["scp", *self._ssh_opts(), "-P", str(self.ssh_port),
                        f"{self.user}@127.0.0.1:{src}", str(dst)], check=True, capture_output=True, timeout=900)

    def up(self, timeout: float = BOOT_TIMEOUT) -> float:
        """Wait for ssh and a healthy API; the seconds it took."""
        t0 = time.monotonic()
        try:
            qemu.wait_ssh(self.ssh_port, self.key, self.user, timeout, self.proc)
            self.last_ssh_s = round(time.monotonic() - t0, 1)
            self.vm.ssh = (self.ssh_port, self.key, self.user)
            qemu.wait_health(self.api_port, timeout, self.proc)
            self.last_api_s = round(time.monotonic() - t0, 1)
            self.health_checked(timeout)
        except Exception as e:
            pytest.fail(f"the box did not come up ({e}); serial tail:\n{self.serial()[-6000:]}")
        return round(time.monotonic() - t0, 1)

    def health_checked(self, timeout: float) -> str:
        """Wait until this boot's thox-health.service has given its verdict (the API answering
        comes first: the slot is marked good a poll later)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p = subprocess.run(self.ssh_argv("systemctl is-active thox-health.service"),
                               capture_output=True, text=True, timeout=60)
            state = p.stdout.strip()
            if state in ("active", "failed"):
                return state
            time.sleep(2)
        raise TimeoutError(f"thox-health.service gave no verdict within {timeout:.0f}s")

    def boot_id(self) -> str:
        return self.ssh("cat /proc/sys/kernel/random/boot_id").strip()

    def wait_rebooted(self, old_boot_id: str, timeout: float = BOOT_TIMEOUT) -> float:
        """After a reboot the guest asked for: wait until ssh answers with a new boot id and the
        API is healthy."""
        t0 = time.monotonic()
        self.new_connection()
        while time.monotonic() - t0 < timeout:
            assert self.proc.poll() is None, f"QEMU exited ({self.proc.returncode}):\n{self.serial()[-4000:]}"
            p = subprocess.run(self.ssh_argv("cat /proc/sys/kernel/random/boot_id"), capture_output=True, text=True,
                               timeout=60)
            if p.returncode == 0 and p.stdout.strip() == old_boot_id:
                self.new_connection()        # still the old boot: its connection dies with it
            if p.returncode == 0 and p.stdout.strip() and p.stdout.strip() != old_boot_id:
                break
            time.sleep(3)
        else:
            pytest.fail(f"no reboot within {timeout}s; serial tail:\n{self.serial()[-6000:]}")
        self.up(timeout)
        return round(time.monotonic() - t0, 1)

    def kill(self) -> None:
        self.vm.proc.kill()
        self.vm.proc.wait(30)
        self.new_connection()

    def rauc_status(self) -> dict:
        return json.loads(self.ssh("rauc status --detailed --output-format=json"))

    def state(self) -> dict:
        """What must survive updates and rollbacks, and what tells which slot runs."""
        st = self.rauc_status()
        slots = {}
        for entry in st["slots"]:
            for name, s in entry.items():
                slots[s.get("bootname") or name] = s
        return {
            "api_key": self.ssh("cat /var/lib/thox/api_key").strip(),
            "machine_id": self.ssh("cat /etc/machine-id").strip(),
            "host_key": self.ssh("ssh-keygen -lf /var/lib/thox-data/system/ssh/ssh_host_ed25519_key.pub").split()[1],
            "models": self.ssh("thox models list"),
            "version": re.search(r"^IMAGE_VERSION=\"?([^\"\n]*)", self.ssh("cat /etc/os-release"), re.M).group(1),
            "booted": st.get("booted"),
            "slots": slots,
        }
