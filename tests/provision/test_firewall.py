"""The firewall role's nftables ruleset, loaded only inside network namespaces
this test creates (never on the host), with veth peers on a LAN range and on a
non-LAN TEST-NET range."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ABIN, ANSIBLE_DIR, ansible_env, need_ansible, need_root, need_tools, render, run

pytestmark = pytest.mark.slow_infra
PEER = str(Path(__file__).with_name("fw_peer.py"))
PY = sys.executable


def _veth(target: str, peer: str, tname: str, pname: str, t4: str, p4: str, t6: str, p6: str) -> None:
    run(["ip", "link", "add", tname, "netns", target, "type", "veth", "peer", "name", pname, "netns", peer])
    for ns, dev, a4, a6 in ((target, tname, t4, t6), (peer, pname, p4, p6)):
        run(["ip", "-n", ns, "addr", "add", a4, "dev", dev])
        run(["ip", "-n", ns, "addr", "add", a6, "dev", dev, "nodad"])
        run(["ip", "-n", ns, "link", "set", dev, "up"])


def _tcp(ns: str, host: str, port: int) -> int:
    return run(["ip", "netns", "exec", ns, PY, PEER, "tcp", host, str(port)], check=False).returncode


@pytest.fixture
def lab(netns_factory, tmp_path):
    need_root()
    need_tools("ip", "nft")
    t, lan, wan = netns_factory("t"), netns_factory("l"), netns_factory("w")
    _veth(t, lan, "tlan", "plan", "192.168.77.1/24", "192.168.77.2/24", "fd77::1/64", "fd77::2/64")
    _veth(t, wan, "twan", "pwan", "198.51.100.1/24", "198.51.100.2/24", "2001:db8:77::1/64", "2001:db8:77::2/64")
    log = tmp_path / "udp.log"
    srv = subprocess.Popen(["ip", "netns", "exec", t, PY, PEER, "serve", str(log)])
    for _ in range(50):
        if log.exists() and "ready" in log.read_text():
            break
        time.sleep(0.1)
    else:
        srv.kill()
        pytest.fail("listener did not start")
    time.sleep(0.3)  # link-local addresses and routes settle
    yield {"t": t, "lan": lan, "wan": wan, "log": log}
    srv.kill()
    srv.wait()


@pytest.fixture(scope="module")
def ruleset(tmp_path_factory) -> Path:
    out = render(tmp_path_factory.mktemp("fw"), [("firewall/templates/nftables.conf.j2", "nftables.conf")])
    return out / "nftables.conf"


def test_ruleset_renders_the_lan_sets(ruleset):
    text = ruleset.read_text()
    for net in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "fc00::/7", "fe80::/10"):
        assert net in text
    assert "policy drop" in text and "tcp dport { 22, 80, 8080 }" in text
    assert "224.0.0.251" in text and "ff02::fb" in text


def test_lan_reaches_ssh_and_api_non_lan_is_dropped_mdns_allowed(lab, ruleset):
    t, lan, wan, log = lab["t"], lab["lan"], lab["wan"], lab["log"]
    # control: without the ruleset both peers get through (so a drop below is the firewall's)
    assert _tcp(wan, "198.51.100.1", 8080) == 0
    run(["ip", "netns", "exec", t, "nft", "-c", "-f", str(ruleset)])
    run(["ip", "netns", "exec", t, "nft", "-f", str(ruleset)])
    listed = run(["ip", "netns", "exec", t, "nft", "list", "ruleset"]).stdout
    assert "table inet thox" in listed and "policy drop" in listed

    for port in (22, 80, 8080):
        assert _tcp(lan, "192.168.77.1", port) == 0, f"LAN peer cannot reach {port}"
        assert _tcp(lan, "fd77::1", port) == 0, f"LAN v6 peer cannot reach {port}"
    for port in (22, 8080):
        assert _tcp(wan, "198.51.100.1", port) == 3, f"non-LAN peer was not dropped on {port}"
        assert _tcp(wan, "2001:db8:77::1", port) == 3, f"non-LAN v6 peer was not dropped on {port}"
    # a port nobody opened: dropped for the LAN too
    assert _tcp(lan, "192.168.77.1", 9999) == 3

    # mDNS: multicast to 224.0.0.251 / ff02::fb is accepted even from the non-LAN peer,
    # unicast to 5353 is not
    run(["ip", "netns", "exec", wan, PY, PEER, "mcast4", "198.51.100.2", "mdns4-from-wan"])
    run(["ip", "netns", "exec", wan, PY, PEER, "mcast6", "pwan", "mdns6-from-wan"])
    run(["ip", "netns", "exec", wan, PY, PEER, "udp", "198.51.100.1", "5353", "unicast-from-wan"])
    time.sleep(0.5)
    got = log.read_text()
    assert "mdns4-from-wan" in got and "mdns6-from-wan" in got
    assert "unicast-from-wan" not in got


def test_custom_lan_sets(lab, tmp_path):
    """firewall_lan_ipv4 is configurable: with only 198.51.100.0/24 as 'LAN' the roles flip."""
    out = render(tmp_path, [("firewall/templates/nftables.conf.j2", "nft.conf")],
                 {"firewall_lan_ipv4": ["198.51.100.0/24"], "firewall_lan_ipv6": ["2001:db8:77::/64"]})
    run(["ip", "netns", "exec", lab["t"], "nft", "-f", str(out / "nft.conf")])
    assert _tcp(lab["wan"], "198.51.100.1", 8080) == 0
    assert _tcp(lab["lan"], "192.168.77.1", 8080) == 3


def test_bad_ruleset_never_replaces_a_good_one(netns_factory, tmp_path):
    """The role's own task (template + validate: nft -c) keeps the old file when the
    new one does not load. Run inside a scratch namespace; nothing is loaded."""
    need_root()
    need_tools("ip", "nft")
    need_ansible()
    ns = netns_factory("v")
    conf = tmp_path / "nftables.conf"
    play = tmp_path / "play.yml"
    play.write_text(
        "- hosts: localhost\n  connection: local\n  gather_facts: false\n  tasks:\n"
        "    - ansible.builtin.include_role:\n        name: firewall\n        tasks_from: ruleset\n"
    )

    def apply(**v):
        ev = {"firewall_config_path": str(conf), "thox_image_build": True, **v}
        return run(["ip", "netns", "exec", ns, str(ABIN / "ansible-playbook"), "-i", "localhost,", str(play),
                    "-e", json.dumps(ev)], env=ansible_env(), cwd=ANSIBLE_DIR, check=False)

    good = apply()
    assert good.returncode == 0, good.stdout + good.stderr
    before = conf.read_text()
    assert "table inet thox" in before
    bad = apply(firewall_lan_ipv4=["10.0.0.0/33"])  # not a prefix nft accepts
    assert bad.returncode != 0
    assert "failed to validate" in (bad.stdout + bad.stderr)
    assert conf.read_text() == before
    # nothing was loaded in the namespace by validation
    assert "thox" not in run(["ip", "netns", "exec", ns, "nft", "list", "ruleset"]).stdout
