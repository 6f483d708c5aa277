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

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import openai
import pytest
from imagetest import record_times
from thoxtest import free_port
from updatestest import RangeServer, make_bundle, make_ca

from image import qemu
from image.common import DEFAULT_CACHE

pytestmark = [pytest.mark.image, pytest.mark.timeout(5400)]

REPO = Path(__file__).resolve().parents[2]
TIMES: dict[str, float] = {}
BOOT_TIMEOUT = 900            # one boot under TCG on a loaded 2-core host, API ready
BAD_SLOT_TIMEOUT = 1800       # the bad slot's boot, its health check giving up, and the boot back
CANARY = "canary-tiny"
BROKEN_API_DROPIN = "[Service]\nExecStart=\nExecStart=/bin/false\n"


@pytest.fixture(scope="module")
def bundle_server(bundles):
    """The bundles over HTTP with Range support, on the host's loopback (10.0.2.2 in the guest)."""
    srv = RangeServer(bundles["dir"])
    yield srv.url.replace("127.0.0.1", "10.0.2.2")
    srv.close()


# ------------------------------------------------------------------ the bundles
def image_bundle(built_image, version: str, out: Path, overlay: Path | None = None) -> Path:
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
    if not os.environ.get("THOX_IMAGE_TEST_REUSE"):      # a reused cache may predate the code
        assert provision and "cached" in provision.group(0), f"the root fs was provisioned again: {provision}"
    return found


def other_ca_bundle(d: Path) -> Path:
    """A bundle for the same compatible, signed by a CA the device does not trust."""
    cert, key = make_ca(d / "other-ca", "Someone Else CA")
    return make_bundle(d / "thox-amd64-other-ca.raucb", "99", cert, key)


@pytest.fixture(scope="module")
def bundles(built_image, tmp_path_factory):
    d = tmp_path_factory.mktemp("bundles")
    overlay = tmp_path_factory.mktemp("v3-overlay")
    dropin = overlay / "etc/systemd/system/thox-api.service.d"
    dropin.mkdir(parents=True)
    (dropin / "zz-broken.conf").write_text(BROKEN_API_DROPIN)
    v2 = image_bundle(built_image, "2", d)
    v3 = image_bundle(built_image, "3", d, overlay)
    truncated = d / "thox-amd64-truncated.raucb"
    with open(v2, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(v2.stat().st_size // 2))
    other = other_ca_bundle(d)
    manifest = json.loads((built_image.out / "manifest.json").read_text())
    return {"dir": d, "v2": v2, "v3": v3, "truncated": truncated, "other": other, "manifest": manifest}


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
        self.conn = 0            # the ssh connection generation: a new one for every boot

    # one multiplexed ssh connection per boot: a key exchange under TCG costs the guest about a
    # second, and this module runs a few hundred commands
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
            self.vm.ssh = (self.ssh_port, self.key, self.user)
            qemu.wait_health(self.api_port, timeout, self.proc)
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


@pytest.fixture(scope="module")
def box(built_image, tmp_path_factory):
    b = Box(built_image.image, tmp_path_factory.mktemp("update-vm"), qemu.image_ssh_user(built_image.out / "manifest.json"))
    b.start()
    TIMES["update_boot_v1_s"] = b.up()
    yield b
    if b.vm and b.proc.poll() is None:
        b.vm.power_off()
    b.new_connection()
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
        p = subprocess.run(box.ssh_argv(f"thox update install /var/lib/thox/{bundles[name].name}"),
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
    out = box.ssh_rebooting(f"thox update install {bundle_server}/{bundles['v2'].name} --reboot")
    assert "thox: error" not in out, out
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
    box.ssh_rebooting("thox update install /var/lib/thox/v3.raucb --reboot")
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
        done = [int(x) for x in re.findall(r"\b(\d{1,3})%", log)]
        if done and 40 <= max(done) < 100:
            break
        assert "thox: error" not in log and not (done and max(done) == 100), f"the install ended first: {log}"
        time.sleep(1)
    else:
        pytest.fail(f"the install never got going: {box.ssh('cat /tmp/install.log', check=False)}")
    box.kill()
    t0 = time.monotonic()
    box.start()
    TIMES["update_boot_after_power_cut_s"] = box.up()
    st = box.state()
    assert st["booted"] == "B" and st["version"] == "2", st
    assert boot_status(st["slots"]["A"]) != "good", st["slots"]["A"]
    assert st["api_key"] == v1["api_key"] and CANARY in st["models"]
    assert time.monotonic() - t0 < BOOT_TIMEOUT * 2
    box.ssh("rm -f /var/lib/thox/v2.raucb")


def test_factory_reset_makes_a_new_key_and_keeps_the_version(box, v1):
    old = box.boot_id()
    box.ssh_rebooting("thox factory-reset --yes --reboot")
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
