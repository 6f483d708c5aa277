"""Boot the amd64 image in QEMU (TCG, UEFI/OVMF) and talk to it.

    python3 -m image run  [--image build/thox-amd64.img] [--api-port 8080] [--ssh-port 2222]
    python3 -m image demo [...]   boot, wait for /health, print base URL + API key, run until Ctrl-C

The built image is never written to: it boots from a qcow2 overlay (8 GiB, so the first-boot
growth of the data partition has room), <rundir>/disk.qcow2, made anew for each run; with
--disk FILE the overlay is FILE, made when missing and kept otherwise, so the same disk boots
again in a later run (a writable raw or qcow2 disk of your own works too). A reboot inside the
guest restarts the VM on the same disk (no -no-reboot): the A/B updates switch slots that way,
and the i6300esb watchdog resets a hung guest. The SSH key to trust is handed in at run time as
the systemd credential thox.ssh_authorized_keys (SMBIOS type 11); none is in the image.

QEMU runs in its own session, so a terminal's signals reach only this script, and every way
the command ends powers the VM off:
  - SIGTERM, SIGHUP (the terminal closed) or SIGINT here: ACPI power-off over QMP (ssh
    `systemctl poweroff` once the demo is up), then QEMU is killed after QEMU_STOP_TIMEOUT
    seconds (default 30); a second signal kills it at once;
  - the parent make stopping: GNU make, on SIGHUP or SIGINT, waits for its children without
    passing the signal on; that is seen in its signal handlers (watch_parent) and treated as
    SIGTERM here; the parent exiting sends SIGTERM (PR_SET_PDEATHSIG);
  - this process dying in any way: the kernel sends QEMU SIGTERM (setpriv --pdeathsig).
"""
from __future__ import annotations

import argparse
import base64
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

from .common import REPO, BuildError, log, terminate

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
STOP_TIMEOUT = float(os.environ.get("QEMU_STOP_TIMEOUT", 30))
PR_SET_PDEATHSIG = 1
SSH_OPTS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            "-o", "ConnectTimeout=10", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes"]


def ensure_key(keyfile: Path) -> Path:
    """A throwaway ed25519 key for this run (made once per run dir)."""
    if not keyfile.exists():
        keyfile.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "thox-image-run", "-f", str(keyfile)],
                       check=True)
    return keyfile


def qemu_cmd(overlay: Path, vars_fd: Path, *, api_port: int, ssh_port: int, pubkey: str | None,
             console: str, mem_mib: int = 2048, smp: int = 2, accel: str = "tcg",
             qmp: Path | None = None) -> list[str]:
    """QEMU command line: q35 + OVMF, virtio disk/net/rng, watchdogs that reset the guest,
    user networking with the two forwards. The disk is qcow2 unless its name ends otherwise (raw).

    -cpu max under TCG offers AVX2/FMA/F16C, which the portable llama.cpp build uses."""
    fmt = "qcow2" if overlay.suffix == ".qcow2" else "raw"
    cmd = ["qemu-system-x86_64", "-machine", f"q35,accel={accel}", "-cpu", "max" if accel == "tcg" else "host",
           "-smp", str(smp), "-m", str(mem_mib), "-nodefaults", "-no-user-config",
           "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
           "-drive", f"if=pflash,format=raw,unit=1,file={vars_fd}",
           "-drive", f"if=virtio,format={fmt},file={overlay},discard=unmap",
           "-netdev", f"user,id=n0,hostname=thox,hostfwd=tcp:127.0.0.1:{api_port}-:8080,"
                      f"hostfwd=tcp:127.0.0.1:{ssh_port}-:22",
           "-device", "virtio-net-pci,netdev=n0",
           "-device", "virtio-rng-pci",
           # both watchdogs reset the guest: the i6300esb and q35's own iTCO (which QEMU leaves unable
           # to reboot unless told; the guest's watchdog0, the one systemd uses)
           "-device", "i6300esb", "-global", "ICH9-LPC.noreboot=false", "-action", "watchdog=reset",
           "-display", "none", "-vga", "none"]
    if console == "stdio":
        cmd += ["-serial", "mon:stdio"]
    else:
        cmd += ["-serial", f"file:{console}", "-monitor", "none"]
    if qmp:
        cmd += ["-qmp", f"unix:{qmp},server=on,wait=off"]
    if pubkey:
        b64 = base64.b64encode(pubkey.strip().encode() + b"\n").decode()
        cmd += ["-smbios", f"type=11,value=io.systemd.credential.binary:thox.ssh_authorized_keys={b64}",
                "-smbios", f"type=11,value=io.systemd.credential.binary:ssh.authorized_keys.root={b64}"]
    return cmd


def prepare(image: Path, rundir: Path, disk_gib: int = 8, disk: Path | None = None) -> tuple[Path, Path]:
    """The writable disk to boot and the firmware's variables. disk None: a new qcow2 overlay of
    image, <rundir>/disk.qcow2. A disk given that exists is kept as it is (with the variables of
    its earlier runs), one that does not is made as that overlay."""
    for f in (OVMF_CODE, OVMF_VARS):
        if not f.exists():
            raise BuildError(f"{f} missing: run `make image-deps` (package ovmf)")
    rundir.mkdir(parents=True, exist_ok=True)
    vars_fd = rundir / "OVMF_VARS.fd"
    overlay = disk or rundir / "disk.qcow2"
    if disk is not None and disk.exists():
        if not vars_fd.exists():
            shutil.copyfile(OVMF_VARS, vars_fd)
        return disk, vars_fd
    if not image.exists():
        raise BuildError(f"{image} does not exist: run `make image` first")
    overlay.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image.resolve()),
                    str(overlay), f"{disk_gib}G"], check=True)
    shutil.copyfile(OVMF_VARS, vars_fd)
    return overlay, vars_fd


def wait_health(port: int, timeout: float, proc: subprocess.Popen | None = None) -> float:
    t0 = time.monotonic()
    url = f"http://127.0.0.1:{port}/health"
    while time.monotonic() - t0 < timeout:
        if proc and proc.poll() is not None:
            raise BuildError(f"QEMU exited with status {proc.returncode} before the API answered")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200 and json.loads(r.read()).get("status") == "ok":
                    return time.monotonic() - t0
        except (OSError, ValueError):
            pass
        time.sleep(2)
    raise BuildError(f"{url} did not answer within {timeout:.0f}s")


def wait_ssh(port: int, key: Path, user: str, timeout: float, proc: subprocess.Popen | None = None) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc and proc.poll() is not None:
            raise BuildError(f"QEMU exited with status {proc.returncode} before ssh answered")
        r = subprocess.run(ssh_cmd(port, key, user, "true"), capture_output=True)
        if r.returncode == 0:
            return time.monotonic() - t0
        time.sleep(3)
    raise BuildError(f"ssh on 127.0.0.1:{port} did not answer within {timeout:.0f}s")


def ssh_cmd(port: int, key: Path, user: str, *remote: str) -> list[str]:
    return ["ssh", *SSH_OPTS, "-i", str(key), "-p", str(port), f"{user}@127.0.0.1", *remote]


def qmp_command(sock_path: Path, command: str) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(sock_path))
    f = s.makefile("rw")
    f.readline()
    for c in ("qmp_capabilities", command):
        f.write(json.dumps({"execute": c}) + "\n")
        f.flush()
        f.readline()
    s.close()


# ---------------------------------------------------------------- stopping
class Stopped(Exception):
    """A stop signal arrived (SIGTERM, SIGHUP, SIGINT), or the parent make is going down."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"got {signal.Signals(signum).name}")


def _raise_stopped(signum, _frame):
    raise Stopped(signum)


def install_stop_handlers() -> None:
    """TERM, HUP and INT raise Stopped. A SIGHUP ignored from the start (nohup) stays ignored;
    SIGINT is caught even when ignored (a background job's Ctrl-C is meant for the VM too)."""
    for sig in STOP_SIGNALS:
        if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
            continue
        signal.signal(sig, _raise_stopped)


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel for sig when the parent exits (PR_SET_PDEATHSIG); False when the
    parent is already gone."""
    ppid = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    return os.getppid() == ppid


def _caught_signals(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return int(line.split()[1], 16)
    return 0


_stopping = threading.Event()


def watch_parent(interval: float = 0.5) -> None:
    """When the parent is make: send this process SIGTERM once make is going down.

    On SIGHUP, SIGINT or SIGQUIT, GNU make resets that signal to its default action and waits
    for its children before re-raising it; the child hears nothing. A stop signal's handler that
    make held at the start and no longer holds is that moment (SigCgt in /proc)."""
    ppid = os.getppid()
    try:
        if Path(f"/proc/{ppid}/comm").read_text().strip() not in ("make", "gmake"):
            return
        held = _caught_signals(ppid) & sum(1 << (s - 1) for s in (*STOP_SIGNALS, signal.SIGQUIT))
    except OSError:
        return
    if not held:
        return

    def loop() -> None:
        while not _stopping.is_set():
            time.sleep(interval)
            try:
                if os.getppid() == ppid and _caught_signals(ppid) & held == held:
                    continue
            except OSError:
                pass
            if not _stopping.is_set():
                os.kill(os.getpid(), signal.SIGTERM)
            return
    threading.Thread(target=loop, name="watch-make", daemon=True).start()


class VM:
    """A QEMU process in its own session that is powered off when the `with` block ends, and
    that the kernel stops (SIGTERM) if this process dies first."""

    def __init__(self, cmd: list[str], qmp: Path, *, stdin=subprocess.DEVNULL):
        self.cmd, self.qmp, self.stdin = cmd, qmp, stdin
        self.ssh: tuple[int, Path, str] | None = None      # (port, key, user) once ssh answers
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "VM":
        self.qmp.unlink(missing_ok=True)
        self.proc = subprocess.Popen(["setpriv", "--pdeathsig", "TERM", "--", *self.cmd],
                                     stdin=self.stdin, start_new_session=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            log("powering the VM off ...")
            log(f"VM powered off ({self.power_off()})")

    def wait(self) -> int:
        return self.proc.wait()

    def power_off(self, timeout: float = STOP_TIMEOUT) -> str:
        """ssh `systemctl poweroff` (when ssh answered) or the ACPI power button, wait up to
        timeout seconds, then SIGTERM and SIGKILL. Any stop signal meanwhile: kill at once."""
        _stopping.set()
        hurry = threading.Event()
        saved = {sig: signal.signal(sig, lambda *_: hurry.set()) for sig in STOP_SIGNALS}
        try:
            how = self._ask_power_off(hurry)
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and not hurry.is_set() and time.monotonic() < deadline:
                time.sleep(0.2)
            if self.proc.poll() is None:
                how = "killed"
                terminate(self.proc, 5)
            return how
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)

    def _ask_power_off(self, hurry: threading.Event) -> str:
        how = "ACPI power button"
        if self.ssh:
            port, key, user = self.ssh
            try:
                # the connection drops as the guest goes down: exit status 255 is expected then
                if subprocess.run(ssh_cmd(port, key, user, "sudo -n systemctl poweroff || systemctl poweroff"),
                                  capture_output=True, timeout=20).returncode in (0, 255):
                    how = "ssh poweroff"
            except subprocess.TimeoutExpired:
                pass
        try:
            qmp_command(self.qmp, "system_powerdown")
        except OSError:
            if how != "ssh poweroff":
                hurry.set()
                how = "killed"
        return how


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of `python -m image run` and `python -m image demo`."""
    ap.add_argument("--image", default=str(REPO / "build/thox-amd64.img"))
    ap.add_argument("--rundir", default=str(REPO / "build/run"))
    ap.add_argument("--disk", default=None,
                    help="the writable disk to boot: made as an overlay of --image when missing, kept when present "
                         "(default: a new <rundir>/disk.qcow2 each run)")
    ap.add_argument("--api-port", type=int, default=int(os.environ.get("API_PORT", 8080)))
    ap.add_argument("--ssh-port", type=int, default=int(os.environ.get("SSH_PORT", 2222)))
    ap.add_argument("--key", default="", help="private key whose .pub the device trusts (default: a throwaway one)")
    ap.add_argument("--mem", type=int, default=int(os.environ.get("QEMU_MEM", 2048)))
    ap.add_argument("--accel", default=os.environ.get("QEMU_ACCEL", "tcg"))
    ap.add_argument("--timeout", type=float, default=900, help="seconds to wait for the API (demo)")


def main(args: argparse.Namespace) -> int:
    """Boot the image: args.mode "run" (console on this terminal) or "demo" (wait for the API,
    print how to reach it, run until stopped)."""
    install_stop_handlers()
    if not die_with_parent(signal.SIGTERM):
        log("the parent process is gone; not starting the VM")
        return 1
    rundir = Path(args.rundir)
    try:
        overlay, vars_fd = prepare(Path(args.image), rundir, disk=Path(args.disk).resolve() if args.disk else None)
        key = Path(args.key) if args.key else ensure_key(rundir / "id_ed25519")
        pub = Path(str(key) + ".pub").read_text()
        user = image_ssh_user(Path(args.image).parent / "manifest.json")
        qmp = rundir / "qmp.sock"
        if args.mode == "run":
            cmd = qemu_cmd(overlay, vars_fd, api_port=args.api_port, ssh_port=args.ssh_port, pubkey=pub,
                           console="stdio", mem_mib=args.mem, accel=args.accel, qmp=qmp)
            log(f"booting {args.image} (TCG; Ctrl-A X quits). API http://127.0.0.1:{args.api_port}/v1, "
                f"ssh -i {key} -p {args.ssh_port} {user}@127.0.0.1")
            with VM(cmd, qmp, stdin=None) as vm:
                watch_parent()
                return vm.wait()
        console = rundir / "console.log"
        cmd = qemu_cmd(overlay, vars_fd, api_port=args.api_port, ssh_port=args.ssh_port, pubkey=pub,
                       console=str(console), mem_mib=args.mem, accel=args.accel, qmp=qmp)
        log(f"booting {args.image} in QEMU (TCG, no KVM: a few minutes); console log {console}")
        with VM(cmd, qmp) as vm:
            watch_parent()
            t = wait_health(args.api_port, args.timeout, vm.proc)
            log(f"API ready {t:.0f}s after power-on")
            wait_ssh(args.ssh_port, key, user, 300, vm.proc)
            vm.ssh = (args.ssh_port, key, user)
            apikey = subprocess.run(ssh_cmd(args.ssh_port, key, user, "sudo -n cat /var/lib/thox/api_key 2>/dev/null"
                                            " || cat /var/lib/thox/api_key"),
                                    capture_output=True, text=True, check=True).stdout.strip()
            print(f"\nThox demo is running.\n  base URL: http://127.0.0.1:{args.api_port}/v1\n"
                  f"  API key:  {apikey}\n  ssh:      ssh -i {key} -p {args.ssh_port} {user}@127.0.0.1\n"
                  f"  try:      curl -s http://127.0.0.1:{args.api_port}/v1/models -H 'Authorization: Bearer {apikey}'\n"
                  "  model:    thox-demo (the guide's Python example works with model=\"thox-demo\")\n"
                  "Ctrl-C powers it off.\n", flush=True)
            vm.wait()
        return 0
    except Stopped as e:
        log(f"{e}: stopped")
        return 0 if e.signum == signal.SIGINT else 128 + e.signum
    except (BuildError, subprocess.CalledProcessError) as e:
        log(str(e))
        return 1


def image_ssh_user(manifest: Path) -> str:
    try:
        return json.loads(manifest.read_text()).get("ssh_user") or "root"
    except (OSError, ValueError):
        return "root"

