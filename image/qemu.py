#!/usr/bin/env python3
"""Boot the amd64 image in QEMU (TCG, UEFI/OVMF) and talk to it.

    python3 image/qemu.py run  [--image build/thox-amd64.img] [--api-port 8080] [--ssh-port 2222]
    python3 image/qemu.py demo [...]   boot, wait for /health, print base URL + API key, run until Ctrl-C

The built image is never written to: each boot runs on a qcow2 overlay (8 GiB, so the
first-boot growroot has room to grow). The SSH key to trust is handed in at run time as
the systemd credential thox.ssh_authorized_keys (SMBIOS type 11); none is in the image.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from imagecommon import REPO, BuildError, log  # noqa: E402

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
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
    """QEMU command line: q35 + OVMF, virtio disk/net/rng, user networking with the two forwards.

    -cpu max under TCG offers AVX2/FMA/F16C, which the portable llama.cpp build uses."""
    cmd = ["qemu-system-x86_64", "-machine", f"q35,accel={accel}", "-cpu", "max" if accel == "tcg" else "host",
           "-smp", str(smp), "-m", str(mem_mib), "-nodefaults", "-no-user-config",
           "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
           "-drive", f"if=pflash,format=raw,unit=1,file={vars_fd}",
           "-drive", f"if=virtio,format=qcow2,file={overlay},discard=unmap",
           "-netdev", f"user,id=n0,hostname=thox,hostfwd=tcp:127.0.0.1:{api_port}-:8080,"
                      f"hostfwd=tcp:127.0.0.1:{ssh_port}-:22",
           "-device", "virtio-net-pci,netdev=n0",
           "-device", "virtio-rng-pci",
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


def prepare(image: Path, rundir: Path, disk_gib: int = 8) -> tuple[Path, Path]:
    if not image.exists():
        raise BuildError(f"{image} does not exist: run `make image` first")
    for f in (OVMF_CODE, OVMF_VARS):
        if not f.exists():
            raise BuildError(f"{f} missing: run `make image-deps` (package ovmf)")
    rundir.mkdir(parents=True, exist_ok=True)
    overlay = rundir / "disk.qcow2"
    overlay.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image.resolve()),
                    str(overlay), f"{disk_gib}G"], check=True)
    vars_fd = rundir / "OVMF_VARS.fd"
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


def shutdown(proc: subprocess.Popen, *, port: int | None = None, key: Path | None = None, user: str = "root",
             qmp: Path | None = None, timeout: float = 120) -> str:
    """Clean power-off: `systemctl poweroff` over ssh, else ACPI power button over QMP, else kill."""
    how = "kill"
    if proc.poll() is None and port and key:
        subprocess.run(ssh_cmd(port, key, user, "sudo -n systemctl poweroff || systemctl poweroff"),
                       capture_output=True, timeout=30)
        how = "ssh poweroff"
    elif proc.poll() is None and qmp and qmp.exists():
        qmp_command(qmp, "system_powerdown")
        how = "ACPI power button"
    try:
        proc.wait(timeout=timeout)
        return how
    except subprocess.TimeoutExpired:
        if qmp and qmp.exists():
            try:
                qmp_command(qmp, "system_powerdown")
                proc.wait(timeout=60)
                return "ACPI power button"
            except (OSError, subprocess.TimeoutExpired):
                pass
        proc.kill()
        proc.wait()
        return "killed"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["run", "demo"])
    ap.add_argument("--image", default=str(REPO / "build/thox-amd64.img"))
    ap.add_argument("--rundir", default=str(REPO / "build/run"))
    ap.add_argument("--api-port", type=int, default=int(os.environ.get("API_PORT", 8080)))
    ap.add_argument("--ssh-port", type=int, default=int(os.environ.get("SSH_PORT", 2222)))
    ap.add_argument("--key", default="", help="private key whose .pub the device trusts (default: a throwaway one)")
    ap.add_argument("--mem", type=int, default=int(os.environ.get("QEMU_MEM", 2048)))
    ap.add_argument("--accel", default=os.environ.get("QEMU_ACCEL", "tcg"))
    ap.add_argument("--timeout", type=float, default=900, help="seconds to wait for the API (demo)")
    args = ap.parse_args(argv)
    rundir = Path(args.rundir)
    try:
        overlay, vars_fd = prepare(Path(args.image), rundir)
        key = Path(args.key) if args.key else ensure_key(rundir / "id_ed25519")
        pub = Path(str(key) + ".pub").read_text()
        user = image_ssh_user(Path(args.image).parent / "manifest.json")
        if args.mode == "run":
            log(f"booting {args.image} (TCG; Ctrl-A X quits). API http://127.0.0.1:{args.api_port}/v1, "
                f"ssh -i {key} -p {args.ssh_port} {user}@127.0.0.1")
            cmd = qemu_cmd(overlay, vars_fd, api_port=args.api_port, ssh_port=args.ssh_port, pubkey=pub,
                           console="stdio", mem_mib=args.mem, accel=args.accel)
            return subprocess.call(cmd)
        console = rundir / "console.log"
        qmp = rundir / "qmp.sock"
        cmd = qemu_cmd(overlay, vars_fd, api_port=args.api_port, ssh_port=args.ssh_port, pubkey=pub,
                       console=str(console), mem_mib=args.mem, accel=args.accel, qmp=qmp)
        log(f"booting {args.image} in QEMU (TCG, no KVM: a few minutes); console log {console}")
        # own session: Ctrl-C in the terminal reaches only this script, which powers the VM off cleanly
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            t = wait_health(args.api_port, args.timeout, proc)
            log(f"API ready {t:.0f}s after power-on")
            wait_ssh(args.ssh_port, key, user, 300, proc)
            apikey = subprocess.run(ssh_cmd(args.ssh_port, key, user, "sudo -n cat /var/lib/thox/api_key 2>/dev/null"
                                            " || cat /var/lib/thox/api_key"),
                                    capture_output=True, text=True, check=True).stdout.strip()
            print(f"\nThox demo is running.\n  base URL: http://127.0.0.1:{args.api_port}/v1\n"
                  f"  API key:  {apikey}\n  ssh:      ssh -i {key} -p {args.ssh_port} {user}@127.0.0.1\n"
                  f"  try:      curl -s http://127.0.0.1:{args.api_port}/v1/models -H 'Authorization: Bearer {apikey}'\n"
                  "  model:    thox-demo (the guide's Python example works with model=\"thox-demo\")\n"
                  "Ctrl-C powers it off.\n", flush=True)
            def stop(*_):
                raise KeyboardInterrupt
            signal.signal(signal.SIGTERM, stop)
            signal.signal(signal.SIGINT, stop)     # also when started with SIGINT ignored (background jobs)
            proc.wait()
        except KeyboardInterrupt:
            log("powering off ...")
        finally:
            if proc.poll() is None:
                log(f"powered off ({shutdown(proc, port=args.ssh_port, key=key, user=user, qmp=qmp)})")
        return 0
    except BuildError as e:
        log(str(e))
        return 1


def image_ssh_user(manifest: Path) -> str:
    try:
        return json.loads(manifest.read_text()).get("ssh_user") or "root"
    except (OSError, ValueError):
        return "root"


if __name__ == "__main__":
    sys.exit(main())
