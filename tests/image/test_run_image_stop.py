"""Every way `make run-image` ends powers the VM off: SIGTERM to make (`kill`), SIGHUP to
make alone, SIGHUP to the whole job (a terminal closing hangs up its process group), SIGKILL
of make, SIGKILL of `python3 -m image run`. Each case: QEMU is gone and its forwarded ports are free
within STOP_BOUND_S, and make has ended.

QEMU runs on the image built once per session (`built_image`, shared with the end-to-end
test); the VM is stopped while its firmware still boots, so the ACPI power button goes
unanswered and the kill after QEMU_STOP_TIMEOUT is what ends it."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from thoxtest import free_port

pytestmark = [pytest.mark.image, pytest.mark.timeout(3600)]

REPO = Path(__file__).resolve().parents[2]
STOP_TIMEOUT_S = 3           # QEMU_STOP_TIMEOUT: the power-off wait before the kill
STOP_BOUND_S = 45            # from the signal to QEMU gone and its ports free


def _qemu_pids(rundir: Path) -> list[int]:
    """QEMU processes whose command line names this run's directory (its overlay disk)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if argv and argv[0].endswith(b"qemu-system-x86_64") and str(rundir).encode() in b" ".join(argv) \
                and state != "Z":
            pids.append(int(d.name))
    return pids


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _wait(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.2)
    return cond()


CASES = {
    "SIGTERM to make": lambda make, runner: os.kill(make, signal.SIGTERM),
    "SIGHUP to make": lambda make, runner: os.kill(make, signal.SIGHUP),
    "SIGHUP to the job (terminal closed)": lambda make, runner: os.killpg(make, signal.SIGHUP),
    "SIGINT to make": lambda make, runner: os.kill(make, signal.SIGINT),
    "SIGKILL to make": lambda make, runner: os.kill(make, signal.SIGKILL),
    "SIGKILL to python3 -m image run": lambda make, runner: os.kill(runner, signal.SIGKILL),
}


@pytest.mark.parametrize("how", list(CASES))
def test_run_image_powers_off_when_stopped(built_image, tmp_path, how):
    api_port, ssh_port = free_port(), free_port()
    rundir = tmp_path / "run"
    log = open(tmp_path / "make.log", "w")
    # its own process group (as a terminal's job), with default signal handling as from a shell
    make = subprocess.Popen(
        ["env", "--default-signal=HUP,INT,TERM", "make", "--no-print-directory", "run-image",
         f"IMAGE_OUT={built_image.out}", f"RUNDIR={rundir}", f"API_PORT={api_port}", f"SSH_PORT={ssh_port}"],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "QEMU_STOP_TIMEOUT": str(STOP_TIMEOUT_S)})
    try:
        assert _wait(lambda: _qemu_pids(rundir) and not _port_free(api_port) and not _port_free(ssh_port), 120), \
            f"QEMU did not start: {(tmp_path / 'make.log').read_text()[-3000:]}"
        qemu = _qemu_pids(rundir)
        runner = [p for p in _children(make.pid) if b"\0-m\0image\0run\0" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(qemu) == 1 and len(runner) == 1, (qemu, runner)
        t0 = time.monotonic()
        CASES[how](make.pid, runner[0])
        gone = _wait(lambda: not _qemu_pids(rundir) and _port_free(api_port) and _port_free(ssh_port), STOP_BOUND_S)
        took = round(time.monotonic() - t0, 1)
        assert gone, f"{how}: QEMU still running or its ports held {STOP_BOUND_S}s later"
        make.wait(timeout=30)
        log.flush()
        if "SIGKILL" not in how:
            assert "VM powered off" in (tmp_path / "make.log").read_text(), (tmp_path / "make.log").read_text()[-2000:]
        print(f"{how}: VM gone in {took}s")
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait()
        for pid in _qemu_pids(rundir):
            os.kill(pid, signal.SIGKILL)
        log.close()
