"""End-to-end firmware updates on the amd64 image in QEMU (TCG, UEFI, GRUB, RAUC).

From the session's cold-cache image (v1, `built_image`) and two bundles made from the same
cached root file system (`python3 -m image bundle`: v2, and a v3 whose API unit fails), one VM
on one persistent disk, the tests in this module run in order:

  1. boot v1 (slot A); record the API key, the machine-id, the SSH host key fingerprint and a
     canary model; a backup is taken (with the models) and copied off the box;
  2. bundles signed by another CA, and a truncated bundle, are refused; nothing changes;
  3. `thox update install http://... --reboot` of v2 (served with Range support from loopback):
     the box comes back on slot B, version 2, with key, identity and canary kept; OpenAI SDK call;
  4. v3 (bad) installed and rebooted into: its health check fails, the slot is marked bad and the
     box reboots by itself into v2 (serial log and `rauc status` agree); nothing is lost;
  5. power cut while a bundle is being written (QEMU killed): the box boots the old slot;
  6. `thox factory-reset --reboot`: a new key, no canary, same version;
  7. `thox backup restore` of the backup from step 1 on the reset box: key, config and models back.

Each boot's time goes to build/image-e2e-times.json (`update_*` keys). Loopback only: the
guest reaches the bundle server through QEMU's user network (10.0.2.2 is the host's loopback).
"""
from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import openai
import pytest
from imagetest import record_times
from thoxtest import free_port

from image import qemu
from image.common import DEFAULT_CACHE

pytestmark = [pytest.mark.image, pytest.mark.timeout(5400)]

REPO = Path(__file__).resolve().parents[2]
TIMES: dict[str, float] = {}
BOOT_TIMEOUT = 900            # one boot under TCG on a loaded 2-core host, API ready
BAD_SLOT_TIMEOUT = 1800       # the bad slot's boot, its health check giving up, and the boot back
CANARY = "canary-tiny"
BROKEN_API_DROPIN = "[Service]\nExecStart=\nExecStart=/bin/false\n"


# ------------------------------------------------------------------ a bundle server with Range
class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Files of one directory; honours a single `Range: bytes=a-b` (RFC 9110), which RAUC's
    streaming and `thox update install URL` both need."""

    def log_message(self, *args):
        pass

    def send_head(self):
        rng = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if not rng or not path.is_file():
            return super().send_head()
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
        size = path.stat().st_size
        if not m or (not m.group(1) and not m.group(2)):
            self.send_error(416)
            return None
        if m.group(1):
            start, end = int(m.group(1)), int(m.group(2)) if m.group(2) else size - 1
        else:
            start, end = max(0, size - int(m.group(2))), size - 1
        end = min(end, size - 1)
        if start > end:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.end_headers()
            return None
        f = open(path, "rb")
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self._remaining = end - start + 1
        return _Limited(f, end - start + 1)

    def copyfile(self, source, outputfile):
        if isinstance(source, _Limited):
            left = source.n
            while left > 0:
                buf = source.f.read(min(1 << 20, left))
                if not buf:
                    break
                outputfile.write(buf)
                left -= len(buf)
            return
        super().copyfile(source, outputfile)


class _Limited:
    def __init__(self, f, n):
        self.f, self.n = f, n

    def close(self):
        self.f.close()


@pytest.fixture(scope="module")
def bundle_server(bundles):
    handler = functools.partial(RangeHandler, directory=str(bundles["dir"]))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://10.0.2.2:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


# ------------------------------------------------------------------ the bundles
def make_bundle(built_image, version: str, out: Path, overlay: Path | None = None) -> Path:
    """`python3 -m image bundle` from the session image's cache, seen at the default cache path
    as the image's build saw it (a private mount namespace): the cached provisioned root fs and
    the test CA the image trusts are reused, nothing is provisioned again."""
    args = ["python3", "-m", "image", "bundle", "--version", version, "--out", str(out)]
    if overlay:
        args += ["--overlay", str(overlay)]
    script = 'mount --bind "$1" "$2" && shift 2 && exec env THOX_CACHE="$0" "$@"'
    t0 = time.monotonic()
    p = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(DEFAULT_CACHE),
                        str(built_image.cache), str(DEFAULT_CACHE), *args],
                       cwd=REPO, capture_output=True, text=True, timeout=1800, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, f"{' '.join(args)}:\n{p.stdout[-4000:]}{p.stderr[-4000:]}"
    TIMES[f"update_bundle_v{version}_build_s"] = round(time.monotonic() - t0, 1)
    found = out / f"thox-amd64-{version}.raucb"
    assert found.is_file(), p.stdout[-2000:] + p.stderr[-2000:]
    provision = re.search(r"stage \d+/\d+ provision done in [\d.]+s( \[.*\])?", p.stdout + p.stderr)
    assert provision and "cached" in provision.group(0), f"the root fs was provisioned again: {provision}"
    return found


def other_ca_bundle(good: Path, work: Path) -> Path:
    """A small bundle for the same compatible, signed by a CA the device does not trust."""
    work.mkdir(parents=True, exist_ok=True)
    subj = "/O=Someone Else/CN=Someone Else CA"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(work / "ca.key"),
                    "-out", str(work / "ca.pem"), "-days", "30", "-subj", subj], check=True, capture_output=True)
    content = work / "content"
    content.mkdir()
    img = content / "rootfs.ext4"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True, capture_output=True)
    (content / "manifest.raucm").write_text(
        "[update]\ncompatible=thox-amd64\nversion=99\n\n[bundle]\nformat=verity\n\n"
        "[image.rootfs]\nfilename=rootfs.ext4\n")
    out = work / "thox-amd64-other-ca.raucb"
    subprocess.run(["rauc", "bundle", "--cert", str(work / "ca.pem"), "--key", str(work / "ca.key"),
                    str(content), str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def bundles(built_image, tmp_path_factory):
    d = tmp_path_factory.mktemp("bundles")
    overlay = tmp_path_factory.mktemp("v3-overlay")
    dropin = overlay / "etc/systemd/system/thox-api.service.d"
    dropin.mkdir(parents=True)
    (dropin / "zz-broken.conf").write_text(BROKEN_API_DROPIN)
    v2 = make_bundle(built_image, "2", d)
    v3 = make_bundle(built_image, "3", d, overlay)
    truncated = d / "thox-amd64-truncated.raucb"
    with open(v2, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(v2.stat().st_size // 2))
    other = other_ca_bundle(v2, tmp_path_factory.mktemp("other-ca"))
    shutil.copy(other, d / other.name)
    manifest = json.loads((built_image.out / "manifest.json").read_text())
    return {"dir": d, "v2": v2, "v3": v3, "truncated": truncated, "other": d / other.name, "manifest": manifest}


# ------------------------------------------------------------------ one VM, one disk, many boots
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

    def start(self) -> None:
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
        p = subprocess.run(qemu.ssh_cmd(self.ssh_port, self.key, self.user, command), capture_output=True, text=True,
                           timeout=timeout)
        if check:
            assert p.returncode == 0, f"{command}: {p.stdout[-3000:]}{p.stderr[-3000:]}"
        return p.stdout

    def scp_to(self, src: Path, dst: str) -> None:
        subprocess.run(["scp", *qemu.SSH_OPTS, "-i", str(self.key), "-P", str(self.ssh_port), str(src),
                        f"{self.user}@127.0.0.1:{dst}"], check=True, capture_output=True, timeout=900)

    def scp_from(self, src: str, dst: Path) -> None:
        subprocess.run(["scp", *qemu.SSH_OPTS, "-i", str(self.key), "-P", str(self.ssh_port),
                        f"{self.user}@127.0.0.1:{src}", str(dst)], check=True, capture_output=True, timeout=900)

    def up(self, timeout: float = BOOT_TIMEOUT) -> float:
        """Wait for ssh and a healthy API; the seconds it took."""
        t0 = time.monotonic()
        try:
            qemu.wait_ssh(self.ssh_port, self.key, self.user, timeout, self.proc)
            self.vm.ssh = (self.ssh_port, self.key, self.user)
            qemu.wait_health(self.api_port, timeout, self.proc)
        except Exception as e:
            pytest.fail(f"the box did not come up ({e}); serial tail:\n{self.serial()[-6000:]}")
        return round(time.monotonic() - t0, 1)

    def boot_id(self) -> str:
        return self.ssh("cat /proc/sys/kernel/random/boot_id").strip()

    def wait_rebooted(self, old_boot_id: str, timeout: float = BOOT_TIMEOUT) -> float:
        """After a reboot the guest asked for: wait until ssh answers with a new boot id and the
        API is healthy."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            assert self.proc.poll() is None, f"QEMU exited ({self.proc.returncode}):\n{self.serial()[-4000:]}"
            p = subprocess.run(qemu.ssh_cmd(self.ssh_port, self.key, self.user, "cat /proc/sys/kernel/random/boot_id"),
                               capture_output=True, text=True)
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
            "host_key": self.ssh("ssh-keygen -lf /var/lib/thox/system/ssh/ssh_host_ed25519_key.pub").split()[1],
            "models": self.ssh("thox models list"),
            "version": re.search(r"^IMAGE_VERSION=\"?([^\"\n]*)", self.ssh("cat /etc/os-release"), re.M).group(1),
            "booted": st.get("booted"),
            "slots": slots,
        }


@pytest.fixture(scope="module")
def box(built_image, tmp_path_factory):
    b = Box(built_image.image, tmp_path_factory.mktemp("update-vm"), qemu.image_ssh_user(built_image.out / "manifest.json"))
    b.start()
    TIMES["update_boot_v1_s"] = b.up()
    yield b
    if b.vm and b.proc.poll() is None:
        b.vm.power_off()
    record_times(**TIMES)
    shutil.copy(b.rundir / "console-all.log" if (b.rundir / "console-all.log").exists() else b.console,
                REPO / "build" / "update-e2e-console.log")


def slot_state(status: dict, bootname: str) -> dict:
    return status["slots"][bootname]


def boot_status(slot: dict) -> str:
    return (slot.get("boot_status") or slot.get("slot_status", {}).get("status") or "").lower()


@pytest.fixture(scope="module")
def v1(box, tmp_path_factory):
    """v1 booted: a canary model imported and a setting changed; its state and a backup recorded."""
    from tinymodel import write_tiny_gguf
    work = tmp_path_factory.mktemp("canary")
    gguf = work / "canary.gguf"
    write_tiny_gguf(gguf)
    box.scp_to(gguf, "/tmp/canary.gguf")
    box.ssh(f"thox models import /tmp/canary.gguf --id {CANARY} && rm /tmp/canary.gguf")
    box.ssh("thox config set engine.n_ctx 1536")
    st = box.state()
    box.ssh("THOX_BACKUP_PASSPHRASE=test-pass thox backup create /tmp/v1.thoxbackup --with-models")
    backup = work / "v1.thoxbackup"
    box.scp_from("/tmp/v1.thoxbackup", backup)
    return {**st, "backup": backup}


# ------------------------------------------------------------------ the tests, in order
def test_v1_booted_slot_a_marked_good(box, v1, bundles):
    assert v1["booted"] == "A", v1
    assert v1["version"] == bundles["manifest"]["version"], (v1["version"], bundles["manifest"].get("version"))
    assert boot_status(v1["slots"]["A"]) == "good", v1["slots"]
    assert CANARY in v1["models"]
    assert "thox-health: slot A good" in box.serial()
    out = box.ssh("thox update status")
    assert "A" in out and "booted" in out.lower(), out


def test_bundles_from_another_ca_or_truncated_are_refused(box, v1, bundles):
    for name in ("other", "truncated"):
        box.scp_to(bundles[name], f"/var/lib/thox/{bundles[name].name}")
        p = subprocess.run(qemu.ssh_cmd(box.ssh_port, box.key, box.user,
                                        f"thox update install /var/lib/thox/{bundles[name].name}"),
                           capture_output=True, text=True, timeout=900)
        assert p.returncode != 0, p.stdout
        err = p.stderr.strip().splitlines()
        assert err and err[-1].startswith("thox: error:"), p.stderr
        box.ssh(f"rm -f /var/lib/thox/{bundles[name].name}")
    st = box.state()
    assert st["booted"] == "A" and boot_status(st["slots"]["A"]) == "good"
    assert boot_status(st["slots"]["B"]) != "good", st["slots"]["B"]


def test_update_to_v2_over_http_keeps_key_identity_and_models(box, v1, bundles, bundle_server):
    old = box.boot_id()
    t0 = time.monotonic()
    box.ssh(f"thox update install {bundle_server}/{bundles['v2'].name} --reboot", timeout=1800)
    TIMES["update_install_v2_s"] = round(time.monotonic() - t0, 1)
    TIMES["update_boot_v2_s"] = box.wait_rebooted(old)
    st = box.state()
    assert st["booted"] == "B" and st["version"] == "2", st
    assert boot_status(st["slots"]["B"]) == "good", st["slots"]
    for k in ("api_key", "machine_id", "host_key"):
        assert st[k] == v1[k], k
    assert CANARY in st["models"]
    assert box.ssh("thox config get engine.n_ctx").strip() == "1536"
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{box.api_port}/v1", api_key=st["api_key"], timeout=600)
    r = client.chat.completions.create(model="thox-demo", messages=[{"role": "user", "content": "Say hi."}],
                                       max_tokens=8)
    assert r.choices[0].message.content and r.usage.completion_tokens > 0


def test_bad_v3_rolls_back_to_v2_by_itself(box, v1, bundles):
    box.scp_to(bundles["v3"], "/var/lib/thox/v3.raucb")
    old = box.boot_id()
    t0 = time.monotonic()
    box.ssh("thox update install /var/lib/thox/v3.raucb --reboot && rm -f /var/lib/thox/v3.raucb", timeout=1800)
    # v3's boot, its failed health check, the reboot back into B
    TIMES["update_bad_v3_and_back_s"] = box.wait_rebooted(old, BAD_SLOT_TIMEOUT)
    deadline = time.monotonic() + BAD_SLOT_TIMEOUT
    while box.state()["booted"] != "B" and time.monotonic() < deadline:
        box.wait_rebooted(box.boot_id(), BAD_SLOT_TIMEOUT)
    TIMES["update_bad_v3_total_s"] = round(time.monotonic() - t0, 1)
    st = box.state()
    assert st["booted"] == "B" and st["version"] == "2", st
    assert boot_status(st["slots"]["A"]) == "bad", st["slots"]
    for k in ("api_key", "machine_id", "host_key"):
        assert st[k] == v1[k], k
    assert CANARY in st["models"]
    serial = box.serial()
    assert re.search(r"thox-health: slot A bad \(version 3\)", serial), serial[-6000:]
    box.ssh("rm -f /var/lib/thox/v3.raucb")


def test_power_cut_while_writing_boots_the_old_slot(box, v1, bundles):
    box.scp_to(bundles["v2"], "/var/lib/thox/v2.raucb")
    # the install runs on in the guest after ssh returns; the power is cut while it writes slot A
    box.ssh("nohup thox update install /var/lib/thox/v2.raucb > /tmp/install.log 2>&1 &")
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        log = box.ssh("cat /tmp/install.log", check=False)
        if re.search(r"\b([2-9]\d)%", log):
            break
        time.sleep(1)
    else:
        pytest.fail(f"the install never got going: {box.ssh('cat /tmp/install.log', check=False)}")
    box.kill()
    t0 = time.monotonic()
    box.start()
    TIMES["update_boot_after_power_cut_s"] = box.up()
    st = box.state()
    assert st["booted"] == "B" and st["version"] == "2", st
    assert st["api_key"] == v1["api_key"] and CANARY in st["models"]
    assert time.monotonic() - t0 < BOOT_TIMEOUT * 2
    box.ssh("rm -f /var/lib/thox/v2.raucb")


def test_factory_reset_makes_a_new_key_and_keeps_the_version(box, v1):
    old = box.boot_id()
    box.ssh("thox factory-reset --yes --reboot", check=False)
    TIMES["update_boot_factory_reset_s"] = box.wait_rebooted(old)
    st = box.state()
    assert st["version"] == "2" and st["booted"] == "B"
    assert re.fullmatch(r"[0-9a-f]{64}", st["api_key"]) and st["api_key"] != v1["api_key"]
    assert CANARY not in st["models"]
    assert "thox-demo" in st["models"]
    assert box.ssh("thox config get engine.n_ctx").strip() != "1536"


def test_backup_restore_on_the_reset_box(box, v1):
    box.scp_to(v1["backup"], "/tmp/v1.thoxbackup")
    box.ssh("THOX_BACKUP_PASSPHRASE=wrong thox backup restore /tmp/v1.thoxbackup", check=False)
    assert box.ssh("cat /var/lib/thox/api_key").strip() != v1["api_key"], "a wrong passphrase restored something"
    box.ssh("THOX_BACKUP_PASSPHRASE=test-pass thox backup restore /tmp/v1.thoxbackup", timeout=900)
    qemu.wait_health(box.api_port, BOOT_TIMEOUT, box.proc)
    st = box.state()
    assert st["api_key"] == v1["api_key"]
    assert CANARY in st["models"]
    assert box.ssh("thox config get engine.n_ctx").strip() == "1536"
    assert box.ssh("stat -c %U:%G /var/lib/thox/api_key").strip() == "thox:thox"
    r = openai.OpenAI(base_url=f"http://127.0.0.1:{box.api_port}/v1", api_key=v1["api_key"],
                      timeout=600).models.list()
    assert CANARY in [m.id for m in r.data]
