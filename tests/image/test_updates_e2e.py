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
  5. power cut while a bundle (v3 again) is being written (QEMU killed): the box boots the old slot;
  6. `thox factory-reset --reboot`: a new key, no canary, same version;
  7. `thox backup restore` of the backup from step 1 on the reset box: key, config and models back;
  8. `systemctl poweroff`: QEMU exits by itself with status 0.

Step 1 is the session's first boot of the image (conftest.booted_image), which test_image_e2e
checked before.

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
from imagetest import BOOT_TIMEOUT, record_times
from updatestest import RangeServer, make_bundle, make_ca

from image import qemu
from image.common import DEFAULT_CACHE

pytestmark = [pytest.mark.image, pytest.mark.timeout(5400)]

REPO = Path(__file__).resolve().parents[2]
TIMES: dict[str, float] = {}
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
    truncated = d / "thox-amd64-truncated.raucb"      # a download cut short: the first 64 MiB
    with open(v2, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(64 << 20))
    other = other_ca_bundle(d)
    manifest = json.loads((built_image.out / "manifest.json").read_text())
    return {"dir": d, "v2": v2, "v3": v3, "truncated": truncated, "other": other, "manifest": manifest}


@pytest.fixture(scope="module")
def box(booted_image):
    """The session's booted image (`booted_image`: its first boot, shared with test_image_e2e)."""
    TIMES["update_boot_v1_s"] = booted_image.first_boot_s
    yield booted_image
    record_times(**TIMES)
    shutil.copy(booted_image.rundir / "console-all.log" if (booted_image.rundir / "console-all.log").exists()
                else booted_image.console, REPO / "build" / "update-e2e-console.log")


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
    # v3.raucb stays on the box for the power cut (one copy less through ssh)


def test_power_cut_while_writing_boots_the_old_slot(box, v1, bundles):
    # v3 again (left on the box by the test before), into slot A; the install runs on in the guest
    # after ssh returns, and the power is cut while it writes the slot
    box.ssh("nohup thox update install /var/lib/thox/v3.raucb > /tmp/install.log 2>&1 &")
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
    box.ssh("rm -f /var/lib/thox/v3.raucb")


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


def test_clean_shutdown(box):
    """Last on the session's VM: `systemctl poweroff` over ssh, QEMU exits by itself with status 0."""
    t = time.monotonic()
    how = box.vm.power_off()
    TIMES["shutdown_s"] = round(time.monotonic() - t, 1)
    assert how == "ssh poweroff" and box.proc.returncode == 0, how
    assert "reboot: Power down" in box.serial()
