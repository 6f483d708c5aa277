"""The firewall role's nftables ruleset and its LAN-set updater, loaded only
inside network namespaces this test creates (never on the host).

The lab is a home network:

    box (t) --tlan--plan-- home router + LAN client (lan) --lup--pwan-- outside host (wan)

The box's link holds private addresses (192.168.77.1/24, fd77::1/64) and a
global /64 (2001:db8:1::1/64), as a home LAN with an ISP's IPv6 prefix does.
The outside host (198.51.100.2, 2a00:77:ff::2) is routed through ``lan``: it is
on none of the box's links and in none of the private ranges.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import (ABIN, ANSIBLE_DIR, SYSTEMD_DIR, ansible_env, need_ansible, need_root,
                       need_tools, render, run)

pytestmark = pytest.mark.slow_infra
PEER = str(Path(__file__).with_name("fw_peer.py"))
UPDATER = ANSIBLE_DIR / "roles/firewall/files/thox-lan-sets"
PY = sys.executable

BOX_GLOBAL, LAN_GLOBAL = "2001:db8:1::1", "2001:db8:1::2"
WAN4, WAN6 = "198.51.100.2", "2a00:77:ff::2"
CONNECTED, DROPPED = 0, 3


def _veth(a: str, b: str, aname: str, bname: str, a_addrs: list[str], b_addrs: list[str]) -> None:
    run(["ip", "link", "add", aname, "netns", a, "type", "veth", "peer", "name", bname, "netns", b])
    for ns, dev, addrs in ((a, aname, a_addrs), (b, bname, b_addrs)):
        for addr in addrs:
            run(["ip", "-n", ns, "addr", "add", addr, "dev", dev] + (["nodad"] if ":" in addr else []))
        run(["ip", "-n", ns, "link", "set", dev, "up"])


def _ns(ns: str, *cmd: str, check: bool = True, timeout: int = 60) -> subprocess.CompletedProcess:
    return run(["ip", "netns", "exec", ns, *cmd], check=check, timeout=timeout)


def _tcp(ns: str, host: str, port: int, source: str | None = None) -> int:
    """0: connected within 1 s; 2: refused; 3: no answer within 1 s (dropped)."""
    return _ns(ns, PY, PEER, "tcp", host, str(port), "1.0", *([source] if source else []), check=False).returncode


def _load(ns: str, conf: Path) -> None:
    _ns(ns, "nft", "-c", "-f", str(conf))
    _ns(ns, "nft", "-f", str(conf))


def _set(ns: str, name: str) -> str:
    return _ns(ns, "nft", "list", "set", "inet", "thox", name).stdout


def _wait_for(pred, what: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {limit:.0f} s: {what}")
        time.sleep(0.1)


@pytest.fixture
def lab(netns_factory, tmp_path):
    need_root()
    need_tools("ip", "nft")
    t, lan, wan = netns_factory("t"), netns_factory("l"), netns_factory("w")
    _veth(t, lan, "tlan", "plan", ["192.168.77.1/24", "fd77::1/64", f"{BOX_GLOBAL}/64"],
          ["192.168.77.2/24", "fd77::2/64", f"{LAN_GLOBAL}/64"])
    _veth(lan, wan, "lup", "pwan", ["198.51.100.1/24", "2a00:77:ff::1/64"], [f"{WAN4}/24", f"{WAN6}/64"])
    for k in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"):
        _ns(lan, "sysctl", "-qw", k)
    for ns, gw4, gw6 in ((t, "192.168.77.2", LAN_GLOBAL), (wan, "198.51.100.1", "2a00:77:ff::1")):
        run(["ip", "-n", ns, "route", "add", "default", "via", gw4])
        run(["ip", "-n", ns, "-6", "route", "add", "default", "via", gw6])
    log = tmp_path / "udp.log"
    srv = subprocess.Popen(["ip", "netns", "exec", t, PY, PEER, "serve", str(log)])
    try:
        _wait_for(lambda: log.exists() and "ready" in log.read_text(), "the listener starts")
        time.sleep(0.3)  # link-local addresses and routes settle
        yield {"t": t, "lan": lan, "wan": wan, "log": log, "tmp": tmp_path}
    finally:
        srv.kill()
        srv.wait()


@pytest.fixture
def ruleset(tmp_path) -> Path:
    """The role's ruleset, including links files from a folder of this test."""
    links = tmp_path / "links"
    links.mkdir()
    out = render(tmp_path, [("firewall/templates/nftables.conf.j2", "nftables.conf")],
                 {"firewall_links_dir": str(links)})
    return out / "nftables.conf"


def _updater(ns: str, links: Path, *args: str) -> subprocess.CompletedProcess:
    return _ns(ns, "/usr/bin/python3", str(UPDATER), "--dir", str(links), *args)


def test_ruleset_renders_the_lan_sets(ruleset):
    text = ruleset.read_text()
    for net in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "fc00::/7", "fe80::/10"):
        assert net in text
    assert "policy drop" in text and "tcp dport { 22, 80, 8080 }" in text
    for s in ("lan4", "lan4_links", "lan6", "lan6_links"):
        assert re.search(rf"saddr @{s} tcp dport \{{ 22, 80, 8080 \}} accept", text), s
    assert "224.0.0.251" in text and "ff02::fb" in text
    assert "ip6 saddr fe80::/10 ip6 daddr fe80::/10 udp sport 547 udp dport 546 accept" in text
    assert f'include "{ruleset.parent.parent}/links/*.nft"' in text


def test_links_dir_is_one_fact(tmp_path):
    """The role's links folder is the unit's --dir and RuntimeDirectory (the
    unit rendered from systemd/ with the role's defaults) and the script's default."""
    defaults = (ANSIBLE_DIR / "roles/firewall/defaults/main.yml").read_text()
    d = re.search(r"^firewall_links_dir: (\S+)$", defaults, re.M).group(1)
    unit = (render(tmp_path, [(str(SYSTEMD_DIR / "thox-lan-sets.service.j2"), "u")]) / "u").read_text()
    assert f"RuntimeDirectory={d.removeprefix('/run/')}" in unit and "RuntimeDirectoryPreserve=yes" in unit
    assert re.search(rf'^DEFAULT_DIR = "{re.escape(d)}"$', UPDATER.read_text(), re.M)
    assert re.search(rf"^ExecStart=/usr/local/sbin/thox-lan-sets --follow --dir {re.escape(d)}$", unit, re.M)
    tasks = (ANSIBLE_DIR / "roles/firewall/tasks/main.yml").read_text()
    assert "dest: /usr/local/sbin/thox-lan-sets" in tasks


def test_home_lan_reaches_ssh_and_api_over_global_ipv6_outside_is_dropped(lab, ruleset):
    t, lan, wan, log = lab["t"], lab["lan"], lab["wan"], lab["log"]
    # control: without a ruleset every peer gets through, over both families, so
    # each drop below is the firewall's
    assert "thox" not in _ns(t, "nft", "list", "ruleset").stdout
    for host, src_ns in (("192.168.77.1", wan), ("fd77::1", wan), (BOX_GLOBAL, wan),
                         ("192.168.77.1", lan), (BOX_GLOBAL, lan)):
        assert _tcp(src_ns, host, 8080) == CONNECTED, f"no-ruleset control: {src_ns} -> {host}"

    _load(t, ruleset)
    listed = _ns(t, "nft", "list", "ruleset").stdout
    assert "table inet thox" in listed and "policy drop" in listed
    assert "2001:db8:1::/64" not in _set(t, "lan6_links")
    # before the updater has run, the box's global /64 is not yet the LAN
    assert _tcp(lan, BOX_GLOBAL, 8080) == DROPPED
    _updater(t, lab["tmp"] / "links")
    assert "2001:db8:1::/64" in _set(t, "lan6_links") and "192.168.77.0/24" in _set(t, "lan4_links")

    for port in (22, 80, 8080):
        assert _tcp(lan, "192.168.77.1", port) == CONNECTED, f"LAN peer cannot reach {port}"
        assert _tcp(lan, "fd77::1", port) == CONNECTED, f"LAN ULA peer cannot reach {port}"
        assert _tcp(lan, BOX_GLOBAL, port) == CONNECTED, f"LAN peer on the global /64 cannot reach {port}"
    for port in (22, 8080):
        for host in ("192.168.77.1", "fd77::1", BOX_GLOBAL):
            assert _tcp(wan, host, port) == DROPPED, f"outside peer was not dropped on {host} {port}"
    # a port nobody opened: dropped for the LAN too
    assert _tcp(lan, "192.168.77.1", 9999) == DROPPED
    assert _tcp(lan, BOX_GLOBAL, 9999) == DROPPED

    # mDNS: multicast to 224.0.0.251 / ff02::fb is accepted on the link whatever
    # the source address (here one outside every LAN set); unicast to 5353 is not
    run(["ip", "-n", lan, "addr", "add", "203.0.113.9/32", "dev", "plan"])
    _ns(lan, PY, PEER, "mcast4", "203.0.113.9", "mdns4-odd-source")
    _ns(lan, PY, PEER, "mcast6", "plan", "mdns6-on-link")
    _ns(wan, PY, PEER, "udp", "192.168.77.1", "5353", "unicast4-from-wan")
    _ns(wan, PY, PEER, "udp", BOX_GLOBAL, "5353", "unicast6-from-wan")
    _wait_for(lambda: "mdns6-on-link" in log.read_text() and "mdns4-odd-source" in log.read_text(),
              "the multicast datagrams arrive")
    time.sleep(0.5)
    got = log.read_text()
    assert "unicast4-from-wan" not in got and "unicast6-from-wan" not in got


def test_dhcpv6_exchange(lab, ruleset, tmp_path):
    """The box as a DHCPv6 client: Solicit/Advertise and Request/Reply with a
    server on its link. The replies come from the server's link-local address to
    the box's, which conntrack cannot tie to the multicast requests."""
    t, lan = lab["t"], lab["lan"]

    def exchange() -> subprocess.CompletedProcess:
        srv = subprocess.Popen(["ip", "netns", "exec", lan, PY, PEER, "dhcp6-server", "plan", "2001:db8:1::100"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert srv.stdout.readline().strip() == "ready"
            return _ns(t, PY, PEER, "dhcp6-client", "tlan", check=False)
        finally:
            srv.kill()
            srv.wait()

    _load(t, ruleset)
    got = exchange()
    assert got.returncode == 0, got.stdout + got.stderr
    lease, server = got.stdout.split()
    assert lease == "2001:db8:1::100" and server.startswith("fe80::")
    # control: the same exchange with the DHCP client rule left out gets no answer
    (tmp_path / "closed").mkdir()
    closed = render(tmp_path / "closed", [("firewall/templates/nftables.conf.j2", "nftables.conf")],
                    {"firewall_allow_dhcp_client": False, "firewall_links_dir": str(tmp_path / "links")})
    _load(t, closed / "nftables.conf")
    got = exchange()
    assert got.returncode == 3, got.stdout + got.stderr


def test_updater_follows_address_changes(lab, ruleset):
    """thox-lan-sets --follow adds a prefix the box gains and drops one it loses;
    a reload of the ruleset keeps what it wrote."""
    t, lan, links = lab["t"], lab["lan"], lab["tmp"] / "links"
    _load(t, ruleset)
    proc = subprocess.Popen(["ip", "netns", "exec", t, "/usr/bin/python3", str(UPDATER), "--follow",
                             "--dir", str(links)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: "2001:db8:1::/64" in _set(t, "lan6_links"), "the updater loads the box's /64")
        # a client on a prefix the box does not have yet: dropped
        run(["ip", "-n", lan, "addr", "add", "192.0.2.2/24", "dev", "plan"])
        run(["ip", "-n", lan, "addr", "add", "2001:db8:2::2/64", "dev", "plan", "nodad"])
        assert _tcp(lan, "192.168.77.1", 8080, source="192.0.2.2") == DROPPED
        assert _tcp(lan, BOX_GLOBAL, 8080, source="2001:db8:2::2") == DROPPED
        # the box gains both prefixes (a renumbered LAN): the updater follows
        run(["ip", "-n", t, "addr", "add", "192.0.2.1/24", "dev", "tlan"])
        run(["ip", "-n", t, "addr", "add", "2001:db8:2::1/64", "dev", "tlan", "nodad"])
        _wait_for(lambda: "192.0.2.0/24" in _set(t, "lan4_links") and "2001:db8:2::/64" in _set(t, "lan6_links"),
                  "the updater adds the new prefixes")
        assert _tcp(lan, "192.168.77.1", 8080, source="192.0.2.2") == CONNECTED
        assert _tcp(lan, BOX_GLOBAL, 22, source="2001:db8:2::2") == CONNECTED
        assert _tcp(lan, "2001:db8:2::1", 8080) == CONNECTED
        # reloading the whole ruleset (flush ruleset) keeps them: it includes links/*.nft
        _ns(t, "nft", "-f", str(ruleset))
        assert "2001:db8:2::/64" in _set(t, "lan6_links") and "192.0.2.0/24" in _set(t, "lan4_links")
        # the box loses the IPv6 prefix: it leaves the set, and its clients are dropped again
        run(["ip", "-n", t, "addr", "del", "2001:db8:2::1/64", "dev", "tlan"])
        _wait_for(lambda: "2001:db8:2::/64" not in _set(t, "lan6_links"), "the updater drops the old prefix")
        assert "2001:db8:1::/64" in _set(t, "lan6_links")
        assert _tcp(lan, BOX_GLOBAL, 8080, source="2001:db8:2::2") == DROPPED
        assert proc.poll() is None, "the updater exited"
    finally:
        proc.terminate()
        out = proc.communicate(timeout=10)[0]
    assert "lan6_links = {2001:db8:1::/64" in out, out


def test_updater_prefix_rules(netns_factory, tmp_path):
    """Which prefixes count as the box's links: addresses and on-link routes
    (a DHCPv6 /128 with its /64 from a router advertisement, a point-to-point
    peer), never a default or catch-all route, loopback, or link-local."""
    need_root()
    need_tools("ip")
    t, o = netns_factory("p"), netns_factory("o")
    _veth(t, o, "eth0", "peer0", ["10.9.0.5/24", "2001:db8:5::77/128"], ["10.9.0.6/24"])
    _veth(t, o, "ptp0", "ptp1", [], [])
    for cmd in (["addr", "add", "100.77.0.1", "peer", "100.77.0.2/30", "dev", "ptp0"],
                ["addr", "add", "127.0.0.9/8", "dev", "lo"],
                ["-6", "route", "add", "2001:db8:5::/64", "dev", "eth0", "proto", "ra"],
                ["-6", "route", "add", "2001:db8:ff00::/40", "dev", "eth0"],   # shorter than /48
                ["route", "add", "0.0.0.0/1", "dev", "eth0"],                 # a VPN's catch-all
                ["route", "add", "default", "via", "10.9.0.6"],
                ["-6", "route", "add", "default", "dev", "eth0"]):
        run(["ip", "-n", t, *cmd])
    out = _updater(t, tmp_path, "--print").stdout
    v4 = re.search(r"add element inet thox lan4_links \{ (.*) \}", out).group(1).split(", ")
    v6 = re.search(r"add element inet thox lan6_links \{ (.*) \}", out).group(1).split(", ")
    assert sorted(v4) == ["10.9.0.0/24", "100.77.0.0/30"], out
    assert v6 == ["2001:db8:5::/64"], out
    assert out.startswith("flush set inet thox lan4_links\n")
    assert not list(tmp_path.iterdir()), "--print changes nothing"


def test_custom_lan_sets(lab, tmp_path):
    """firewall_lan_ipv4/6 are configurable: with only the outside prefixes as 'LAN' the roles flip."""
    out = render(tmp_path, [("firewall/templates/nftables.conf.j2", "nft.conf")],
                 {"firewall_lan_ipv4": ["198.51.100.0/24"], "firewall_lan_ipv6": ["2a00:77:ff::/64"],
                  "firewall_links_dir": str(tmp_path / "links")})
    _load(lab["t"], out / "nft.conf")
    assert _tcp(lab["wan"], "192.168.77.1", 8080) == CONNECTED
    assert _tcp(lab["wan"], BOX_GLOBAL, 8080) == CONNECTED
    assert _tcp(lab["lan"], "192.168.77.1", 8080) == DROPPED
    assert _tcp(lab["lan"], "fd77::1", 8080) == DROPPED


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
        ev = {"firewall_config_path": str(conf), "thox_image_build": True,
              "firewall_links_dir": str(tmp_path / "links"), **v}
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
