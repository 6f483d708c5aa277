"""What a provisioned Thox box must look like (pytest-testinfra).

Contract: ansible/site.yml (roles base, mdns, firewall, ssh, thox_api, models)
with the roles' defaults, and the units as the roles render them from systemd/.
THOX_API_PORT / THOX_WEB_PORT override the ports.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import urllib.request
from contextlib import nullcontext

import pytest

pytestmark = pytest.mark.slow_infra

API_PORT = int(os.environ.get("THOX_API_PORT", "8080"))
WEB_PORT = int(os.environ.get("THOX_WEB_PORT", "80"))
HOME = "/var/lib/thox"


def root(host):
    """Root for the block: sudo when logged in as another user (make verify USER=...)."""
    return nullcontext() if host.user().uid == 0 else host.sudo()


@pytest.mark.parametrize("name", [
    "avahi-daemon", "libnss-mdns", "nftables", "openssh-server", "python3-venv",
    "systemd-timesyncd", "locales", "libgomp1", "ca-certificates", "curl",
])
def test_package_installed(host, name):
    assert host.package(name).is_installed


def test_service_user(host):
    u = host.user("thox")
    assert u.exists
    assert u.uid < 1000, "thox must be a system user"
    assert u.shell in ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false")
    assert u.home == HOME
    assert u.group == "thox"


def test_thox_home(host):
    d = host.file(HOME)
    assert d.is_directory and d.user == "thox" and d.group == "thox" and d.mode == 0o750


def test_api_key_0600_owned_by_thox(host):
    with root(host):
        f = host.file(f"{HOME}/api_key")
        assert f.is_file and f.user == "thox" and f.mode == 0o600
        assert re.fullmatch(r"[0-9a-fA-F]{64}", f.content_string.strip())


def test_config_has_web_port(host):
    with root(host):
        cfg = json.loads(host.file(f"{HOME}/config.json").content_string)
    assert str(cfg.get("api", {}).get("web_port", cfg.get("api.web_port"))) == str(WEB_PORT)


def test_app_installed_in_venv(host):
    assert host.file("/opt/thox/venv/bin/thox").is_file
    r = host.run("/opt/thox/venv/bin/python -c 'import thox, llama_cpp; print(llama_cpp.__version__)'")
    assert r.rc == 0, r.stderr


@pytest.mark.parametrize("unit", ["thox-api.service", "thox-firstboot.service", "thox-lan-sets.service"])
def test_units_installed_as_the_role_renders_them(host, unit, rendered_units):
    f = host.file(f"/etc/systemd/system/{unit}")
    assert f.is_file and f.user == "root" and f.mode == 0o644
    assert f.content_string == rendered_units[unit], f"{unit} differs from its rendering from systemd/"
    # what systemd runs is that file, with nothing layered on top
    p = host.run(f"systemctl show -p FragmentPath -p DropInPaths {unit}").stdout
    assert f"FragmentPath=/etc/systemd/system/{unit}" in p and re.search(r"^DropInPaths=$", p, re.M), p


@pytest.mark.parametrize("unit", [
    "thox-api.service", "thox-firstboot.service", "avahi-daemon.service", "nftables.service", "ssh.service",
    "systemd-timesyncd.service", "thox-lan-sets.service",
])
def test_unit_enabled(host, unit):
    assert host.service(unit).is_enabled


@pytest.mark.parametrize("unit", ["thox-api.service", "avahi-daemon.service", "ssh.service", "thox-lan-sets.service"])
def test_unit_running(host, unit):
    assert host.service(unit).is_running


def _default_route_dev(host, family: str) -> str | None:
    routes = json.loads(host.check_output(f"ip -j -{family} route show default") or "[]")
    return next((r["dev"] for r in routes if r.get("dev")), None)


def _lan_dev(host, family: str) -> str | None:
    """The box's LAN link: the one holding the address the suite reached it at
    (``--hosts=ssh://192.168.1.20``), else the default route's link."""
    try:
        reached = ipaddress.ip_address(getattr(host.backend, "hostname", "") or "")
    except ValueError:
        reached = None
    if reached is not None and not reached.is_loopback and str(reached.version) == family:
        for link in json.loads(host.check_output(f"ip -j -{family} addr show") or "[]"):
            if any(a.get("local") == str(reached) for a in link.get("addr_info", [])):
                return link["ifname"]
    return _default_route_dev(host, family)


def _link_prefixes(host, dev: str, version: int) -> list:
    """The prefixes of ``dev``'s global addresses, as thox-lan-sets adds them
    (at least /16 for IPv4, /48 for IPv6; single-address prefixes aside)."""
    links = json.loads(host.check_output(f"ip -j addr show dev {dev}"))
    nets = []
    for a in (a for link in links for a in link.get("addr_info", [])):
        if a.get("scope") != "global" or a.get("dadfailed"):
            continue
        net = ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False)
        lo, hi = (16, 32) if net.version == 4 else (48, 128)
        if net.version == version and lo <= net.prefixlen < hi:
            nets.append(net)
    return nets


def _set_elements(host, name: str) -> list:
    """The elements of the nft set ``name`` in table inet thox, as networks."""
    with root(host):
        out = host.check_output(f"nft -j list set inet thox {name}")
    nets = []
    for item in json.loads(out)["nftables"]:
        for e in item.get("set", {}).get("elem", []):
            if isinstance(e, dict) and "elem" in e:     # an element with a counter or comment
                e = e["elem"]["val"]
            if isinstance(e, dict) and "prefix" in e:
                nets.append(ipaddress.ip_network(f"{e['prefix']['addr']}/{e['prefix']['len']}"))
            elif isinstance(e, dict) and "range" in e:
                lo, hi = (ipaddress.ip_address(x) for x in e["range"])
                nets.extend(ipaddress.summarize_address_range(lo, hi))
            elif isinstance(e, str):
                nets.append(ipaddress.ip_network(e))
    return nets


def test_lan_sets_hold_the_lan_links_prefix(host):
    """thox-lan-sets.service has put the prefix of the box's LAN link (the one the
    suite reached it on, else the default route's) into lan4_links (and into
    lan6_links where that link has a global IPv6 address), so the LAN the box sits on reaches it even outside the private ranges."""
    dev4 = _lan_dev(host, "4")
    assert dev4, "the box has no IPv4 default route and was not reached at an IPv4 address"
    want = {4: _link_prefixes(host, dev4, 4)}
    assert want[4], f"{dev4} has no global IPv4 address"
    dev6 = _lan_dev(host, "6") or dev4
    want[6] = _link_prefixes(host, dev6, 6)
    for version, name in ((4, "lan4_links"), (6, "lan6_links")):
        have = _set_elements(host, name)
        for net in want[version]:
            assert any(net.subnet_of(h) for h in have if h.version == version), f"{net} not in {name}: {have}"


def test_nftables_loaded(host):
    # nftables.service is a oneshot that stays "active (exited)"
    assert host.run("systemctl is-active nftables.service").stdout.strip() == "active"


def test_thox_api_hardening(host):
    props = host.run("systemctl show thox-api.service -p User -p Type -p NoNewPrivileges -p ProtectSystem "
                     "-p ProtectHome -p PrivateTmp -p PrivateDevices -p Restart -p AmbientCapabilities "
                     "-p CapabilityBoundingSet -p RestrictAddressFamilies -p StateDirectory").stdout
    p = dict(line.split("=", 1) for line in props.splitlines() if "=" in line)
    assert p["User"] == "thox" and p["Type"] == "notify" and p["Restart"] == "on-failure"
    assert p["NoNewPrivileges"] == "yes" and p["ProtectSystem"] == "strict"
    assert p["ProtectHome"] == "yes" and p["PrivateTmp"] == "yes" and p["PrivateDevices"] == "no"
    assert p["AmbientCapabilities"] == "cap_net_bind_service"
    assert p["CapabilityBoundingSet"] == "cap_net_bind_service"
    assert set(p["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    assert p["StateDirectory"] == "thox"


def test_api_runs_as_thox(host):
    pid = host.run("systemctl show -p MainPID --value thox-api.service").stdout.strip()
    assert pid not in ("", "0")
    assert host.run(f"ps -o user= -p {pid}").stdout.strip() == "thox"


@pytest.mark.parametrize("spec", [f"tcp://0.0.0.0:{API_PORT}", f"tcp://0.0.0.0:{WEB_PORT}", "tcp://0.0.0.0:22",
                                  "udp://0.0.0.0:5353"])
def test_listening(host, spec):
    assert host.socket(spec).is_listening


def test_nft_ruleset(host):
    with root(host):
        rs = host.run("nft list ruleset").stdout
    assert "table inet thox" in rs
    assert re.search(r"hook input priority filter; policy drop;", rs)
    for net in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "fc00::/7", "fe80::/10"):
        assert net in rs, net
    assert re.search(r"ip saddr @lan4 tcp dport \{ 22, 80, 8080 \} accept", rs)
    assert "224.0.0.251 udp dport 5353 accept" in rs and "ff02::fb udp dport 5353 accept" in rs


def nft_canon(ruleset: str) -> tuple[str, dict[str, set[str]]]:
    """`nft list ruleset` output without what changes at run time: counter values,
    and set elements (returned apart, per "family table set")."""
    text = re.sub(r"\bcounter packets \d+ bytes \d+", "counter", ruleset)
    elements: dict[str, set[str]] = {}

    def cut(m: re.Match) -> str:
        before = text[:m.start()]
        table = re.findall(r"^table (\S+ \S+) \{", before, re.M)[-1]
        name = re.findall(r"^\s*set (\S+) \{", before, re.M)[-1]
        elements[f"{table} {name}"] = {e.split()[0] for e in m.group(1).split(",") if e.strip()}
        return "elements = { }"

    text = re.sub(r"elements = \{([^}]*)\}", cut, text)
    return "\n".join(ln.rstrip() for ln in text.splitlines() if ln.strip() != "elements = { }"), elements


def test_nftables_conf_matches_loaded(host):
    """The kernel runs exactly the ruleset in /etc/nftables.conf: the file, loaded
    by nft into an empty network namespace, lists the same as the live box (set
    elements added at run time, e.g. the box's own prefixes, aside)."""
    f = host.file("/etc/nftables.conf")
    assert f.is_file and f.mode == 0o644 and "flush ruleset" in f.content_string
    with root(host):
        live = host.run("nft list ruleset")
        fresh = host.run("unshare --net sh -ec 'nft -f /etc/nftables.conf; nft list ruleset'")
    assert live.rc == 0 and fresh.rc == 0, live.stderr + fresh.stderr
    live_text, live_sets = nft_canon(live.stdout)
    file_text, file_sets = nft_canon(fresh.stdout)
    assert "table inet thox" in file_text
    assert live_text == file_text
    for name, want in file_sets.items():
        assert want <= live_sets.get(name, set()), f"{name}: {sorted(want - live_sets.get(name, set()))} not loaded"


def test_avahi_http_service(host):
    f = host.file("/etc/avahi/services/thox.service")
    s = f.content_string
    assert "<type>_http._tcp</type>" in s and f"<port>{API_PORT}</port>" in s
    assert "<txt-record>path=/v1</txt-record>" in s


def test_avahi_ssh_service(host):
    s = host.file("/etc/avahi/services/ssh.service").content_string
    assert "<type>_ssh._tcp</type>" in s and "<port>22</port>" in s


def test_nss_mdns(host):
    assert "mdns4_minimal" in host.file("/etc/nsswitch.conf").content_string


def test_hostname(host):
    assert host.check_output("hostname") == "thox"
    assert host.file("/etc/hostname").content_string.strip() == "thox"


def test_sshd_key_only(host):
    with root(host):
        cfg = host.run("sshd -T").stdout.lower()
    assert "passwordauthentication no" in cfg
    assert "kbdinteractiveauthentication no" in cfg
    assert re.search(r"^permitrootlogin (without-password|prohibit-password|no)$", cfg, re.M)


def test_journald_capped(host):
    s = host.file("/etc/systemd/journald.conf.d/10-thox.conf").content_string
    assert "SystemMaxUse=" in s


def test_demo_model_installed(host):
    r = host.run(f"runuser -u thox -- env THOX_HOME={HOME} /opt/thox/venv/bin/thox models list --json")
    assert r.rc == 0, r.stderr
    assert "thox-demo" in r.stdout


# ---------------------------------------------------------------------- the `thox` command on the box

def _status(host, key: str) -> str:
    """HTTP status of GET /v1/models with ``key``."""
    return host.run(f"curl -sS -o /dev/null -w '%{{http_code}}' -H 'Authorization: Bearer {key}' "
                    f"http://127.0.0.1:{API_PORT}/v1/models").stdout.strip()


def test_thox_on_path_for_root(host):
    with root(host):
        assert host.run("command -v thox").stdout.strip() == "/usr/local/bin/thox"
        key = host.run("thox config get api.key")
        assert key.rc == 0 and "Traceback" not in key.stderr, key.stderr
        assert key.stdout.strip() == host.file(f"{HOME}/api_key").content_string.strip()
        models = host.run("thox models list")
        assert models.rc == 0 and "thox-demo" in models.stdout, models.stderr
        status = host.run("thox status")
        assert status.rc == 0 and "status:  ok" in status.stdout, status.stdout + status.stderr


def test_thox_on_path_for_the_thox_user(host):
    with root(host):
        r = host.run("runuser -u thox -- thox models list --json")
        assert r.rc == 0 and "thox-demo" in r.stdout, r.stderr
        r = host.run("runuser -u thox -- thox status --json")
        assert r.rc == 0 and json.loads(r.stdout)["status"] == "ok", r.stderr


def test_key_rotation_by_root_is_live_and_survives_a_restart(host):
    """`thox api-key generate` as root: the running service takes the new key
    at once, the old one stops working, and the service still starts after a
    restart. The original key is put back (`thox config set api.key`) at the end."""
    with root(host):
        old = host.run("thox config get api.key").stdout.strip()
        assert re.fullmatch(r"[0-9a-f]{64}", old)
        try:
            r = host.run("thox api-key generate")
            new = r.stdout.strip()
            assert r.rc == 0 and re.fullmatch(r"[0-9a-f]{64}", new) and new != old, r.stderr
            f = host.file(f"{HOME}/api_key")
            assert f.user == "thox" and f.group == "thox" and f.mode == 0o600
            assert _status(host, new) == "200"
            assert _status(host, old) == "401"
            r = host.run("systemctl restart thox-api.service")
            assert r.rc == 0, r.stderr
            assert _status(host, new) == "200"
        finally:
            restored = host.run(f"thox config set api.key {old}")
        assert restored.rc == 0, restored.stderr
        assert _status(host, old) == "200"


def test_health_on_the_box(host):
    r = host.run(f"curl -fsS http://127.0.0.1:{API_PORT}/health")
    assert r.rc == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "ok"


def test_health_over_the_lan(host):
    """From the controller: the API answers across the network (the controller
    must be in a LAN range, as the firewall allows). THOX_LAN_API_URL overrides
    the address, e.g. a QEMU port forward to the image's 8080."""
    base = os.environ.get("THOX_LAN_API_URL") or f"http://{host.backend.hostname}:{API_PORT}"
    with urllib.request.urlopen(f"{base}/health", timeout=10) as r:
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"


def test_web_port_answers(host):
    r = host.run(f"curl -sS -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{WEB_PORT}/health")
    assert r.stdout.strip() == "200"


def test_v1_models_requires_key(host):
    r = host.run(f"curl -sS -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{API_PORT}/v1/models")
    assert r.stdout.strip() == "401"


def test_chat_completion_with_demo_model(host):
    body = json.dumps({"model": "thox-demo", "max_tokens": 8, "temperature": 0,
                       "messages": [{"role": "user", "content": "Say hello."}]})
    with root(host):
        r = host.run(
            f"curl -fsS --max-time 180 -H \"Authorization: Bearer $(cat {HOME}/api_key)\" "
            f"-H 'Content-Type: application/json' -d {shlex.quote(body)} "
            f"http://127.0.0.1:{API_PORT}/v1/chat/completions")
    assert r.rc == 0, r.stderr
    resp = json.loads(r.stdout)
    assert resp["object"] == "chat.completion"
    msg = resp["choices"][0]["message"]
    assert msg["role"] == "assistant" and msg["content"].strip()
    assert resp["usage"]["completion_tokens"] >= 1
