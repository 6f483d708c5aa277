"""`thox update install|status|rollback` and `thox factory-reset`. RAUC is an
external tool: bundles are made and checked by the real `rauc` (signature,
truncation), and a stand-in (tests/rauc_stub.py) plays the RAUC service for
install, status and mark-active. Downloads come from a loopback HTTP server."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from thoxtest import one_line_error, run_thox
from updatestest import RangeServer, make_bundle, make_ca, stub_env, stub_state


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    d = tmp_path_factory.mktemp("bundles")
    cert, key = make_ca(d / "ca", "Thox TEST updates")
    other_cert, other_key = make_ca(d / "other-ca", "Someone else")
    good = make_bundle(d / "thox-amd64-2.raucb", "2", cert, key)
    foreign = make_bundle(d / "foreign.raucb", "9", other_cert, other_key)
    truncated = d / "truncated.raucb"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return {"ca": cert, "good": good, "foreign": foreign, "truncated": truncated, "dir": d}


@pytest.fixture
def env(tmp_path, bundles):
    return stub_env(tmp_path / "rauc", bundles["ca"])


def test_without_rauc_every_update_command_is_one_line_error(tmp_path, bundles):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    for args in (["update", "status"], ["update", "rollback"], ["update", "install", str(bundles["good"])]):
        one_line_error(run_thox(tmp_path, *args, check=False, env={"PATH": str(empty)}), "RAUC is not installed")


def test_status_shows_both_slots_versions_booted_and_good(tmp_path, env):
    out = run_thox(tmp_path, "update", "status", env=env).stdout
    assert "booted:  slot A, version 1" in out
    a_line = next(ln for ln in out.splitlines() if ln.startswith("slot A"))
    b_line = next(ln for ln in out.splitlines() if ln.startswith("slot B"))
    assert "version 1" in a_line and "good" in a_line and "booted" in a_line and "primary" in a_line
    assert "unknown" in b_line and "bad" in b_line and "booted" not in b_line
    doc = json.loads(run_thox(tmp_path, "update", "status", "--json", env=env).stdout)
    assert doc["booted"] == "A" and doc["booted_version"] == "1"
    assert [(s["bootname"], s["good"], s["booted"]) for s in doc["slots"]] == [("A", True, True), ("B", False, False)]


def test_install_file_shows_progress_then_status_has_the_new_slot(tmp_path, env, bundles):
    p = run_thox(tmp_path, "update", "install", str(bundles["good"]), env=env)
    assert "bundle: thox-amd64 version 2" in p.stdout
    assert "install: 60% Copying image to rootfs.1" in p.stderr and "install: 100% Installing done." in p.stderr
    assert "installed version 2 into slot B" in p.stdout and "reboot to activate" in p.stdout
    assert bundles["good"].exists(), "a bundle given as a file is left where it was"
    st = json.loads(run_thox(tmp_path, "update", "status", "--json", env=env).stdout)
    b = next(s for s in st["slots"] if s["bootname"] == "B")
    assert b["version"] == "2" and b["good"] is True and b["primary"] is True


@pytest.mark.parametrize("which,needle", [("foreign", "signature verification failed"),
                                          ("truncated", "invalid bundle format")])
def test_install_refuses_what_rauc_refuses(tmp_path, env, bundles, which, needle):
    line = one_line_error(run_thox(tmp_path, "update", "install", str(bundles[which]), check=False, env=env),
                          needle)
    assert line.startswith("thox: error: rauc: ")
    assert not any(c[0] == "install" for c in stub_state(env).get("calls", [])), "refused before installing"


def test_install_missing_file(tmp_path, env):
    one_line_error(run_thox(tmp_path, "update", "install", str(tmp_path / "nope.raucb"), check=False, env=env),
                   "no such bundle file")


def test_install_url_resumes_a_dropped_download_with_range(tmp_path, env, bundles):
    size = bundles["good"].stat().st_size
    srv = RangeServer(bundles["dir"], drop_after=size // 3, drops=1)
    try:
        p = run_thox(tmp_path, "update", "install", f"{srv.url}/thox-amd64-2.raucb", env=env)
    finally:
        srv.close()
    assert "installed version 2" in p.stdout, p.stderr
    assert srv.ranges_seen[0] == "bytes=0-" and srv.ranges_seen[1] == f"bytes={size // 3}-", srv.ranges_seen
    assert "retrying" in p.stderr
    installed = [c for c in stub_state(env).get("calls", []) if c[0] == "install"]
    assert installed and installed[0][-1] == str(tmp_path / "updates" / "thox-amd64-2.raucb")
    assert list((tmp_path / "updates").iterdir()) == [], "the downloaded bundle is removed after the install"


def test_install_url_refuses_a_server_without_range_support(tmp_path, env, bundles):
    srv = RangeServer(bundles["dir"], ranges=False)
    try:
        p = run_thox(tmp_path, "update", "install", f"{srv.url}/thox-amd64-2.raucb", check=False, env=env)
    finally:
        srv.close()
    one_line_error(p, "does not support HTTP range requests")
    assert not [f for f in (tmp_path / "updates").iterdir() if f.suffix == ".part"]
    assert not any(c[0] == "install" for c in stub_state(env).get("calls", []))


def test_rollback_needs_a_good_other_slot(tmp_path, env, bundles):
    one_line_error(run_thox(tmp_path, "update", "rollback", check=False, env=env), "marked bad")
    good_env = stub_env(tmp_path / "rauc-good", bundles["ca"], other_good=True)
    out = run_thox(tmp_path, "update", "rollback", env=good_env).stdout
    assert "slot B" in out and "a reboot activates it" in out
    assert stub_state(good_env)["primary"] == "rootfs.1"
    assert ["status", "mark-active", "other"] in stub_state(good_env)["calls"]


def test_factory_reset_writes_the_one_shot_flag(tmp_path):
    esp = tmp_path / "esp" / "thox"
    flag = esp / "factory-reset"
    env = {"THOX_FACTORY_RESET_FLAG": str(flag)}
    one_line_error(run_thox(tmp_path, "factory-reset", "--yes", check=False, env=env), "does not exist")
    esp.mkdir(parents=True)
    one_line_error(run_thox(tmp_path, "factory-reset", check=False, env=env, stdin=open(os.devnull)), "--yes")
    assert not flag.exists()
    out = run_thox(tmp_path, "factory-reset", "--yes", env=env).stdout
    assert flag.is_file() and "next boot erases" in out and "reboot to perform it" in out
    assert not [p for p in esp.iterdir() if p.name != "factory-reset"]


def test_help_names_the_range_requirement(tmp_path):
    out = run_thox(tmp_path, "update", "install", "--help").stdout
    assert "range requests" in out
    for args in (["update", "--help"], ["backup", "create", "--help"], ["backup", "restore", "--help"],
                 ["factory-reset", "--help"]):
        assert run_thox(tmp_path, *args).stdout.startswith("usage: thox")


def test_rollback_names_the_config_snapshot_when_the_config_changed(tmp_path, bundles):
    """The pre-install handler's snapshot lies in THOX_SYSTEM_DIR of updates.conf: rollback
    names it when config.json differs from it, and says nothing of it when they match."""
    home, sysdir = tmp_path / "home", tmp_path / "data/system"
    home.mkdir()
    sysdir.mkdir(parents=True)
    conf = tmp_path / "updates.conf"
    conf.write_text(f"THOX_HOME={home}\nTHOX_SYSTEM_DIR={sysdir}\n")
    snapshot = sysdir / "config-before-update.json"
    snapshot.write_text('{"api.port": 8080}\n')
    (home / "config.json").write_text('{\n  "api.port": 8080\n}\n')
    env = {**stub_env(tmp_path / "rauc", bundles["ca"], other_good=True), "THOX_UPDATES_CONF": str(conf)}
    out = run_thox(home, "update", "rollback", env=env).stdout
    assert "slot B" in out and "config-before-update.json" not in out
    run_thox(home, "config", "set", "api.port", "8181")
    env = {**stub_env(tmp_path / "rauc2", bundles["ca"], other_good=True), "THOX_UPDATES_CONF": str(conf)}
    out = run_thox(home, "update", "rollback", env=env).stdout
    assert f"kept in {snapshot} " in out and str(home / "config.json") in out
    assert snapshot.read_text() == '{"api.port": 8080}\n', "read only"
    # no updates.conf (not a Thox image): nothing said
    env["THOX_UPDATES_CONF"] = str(tmp_path / "none.conf")
    assert "kept in" not in run_thox(home, "update", "rollback", env=env).stdout


def test_factory_reset_flag_path_comes_from_updates_conf(tmp_path):
    """updates.conf (written by the updates role) names the flag; the environment overrides it."""
    esp = tmp_path / "esp"
    (esp / "thox").mkdir(parents=True)
    conf = tmp_path / "updates.conf"
    conf.write_text(f"THOX_HOME={tmp_path}\nTHOX_FACTORY_RESET_FLAG={esp}/thox/reset-flag\n")
    env = {"THOX_UPDATES_CONF": str(conf), "THOX_FACTORY_RESET_FLAG": ""}
    out = run_thox(tmp_path, "factory-reset", "--yes", env=env).stdout
    assert (esp / "thox/reset-flag").is_file() and str(esp / "thox/reset-flag") in out
    env["THOX_FACTORY_RESET_FLAG"] = str(esp / "thox/other")
    run_thox(tmp_path, "factory-reset", "--yes", env=env)
    assert (esp / "thox/other").is_file()


def test_factory_reset_makes_its_folder_on_a_mounted_esp(tmp_path):
    """A Jetson's ESP (made by NVIDIA's flash tools) has no thox/ folder: on a mounted ESP
    (a tmpfs here) it is made; on a folder that is no mount point it is not."""
    if os.geteuid() != 0:
        pytest.fail("needs root (mount)")
    esp = tmp_path / "boot-efi"
    esp.mkdir()
    env = {"THOX_FACTORY_RESET_FLAG": str(esp / "thox/factory-reset")}
    one_line_error(run_thox(tmp_path, "factory-reset", "--yes", check=False, env=env), "does not exist")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "thox-test-esp", str(esp)], check=True)
    try:
        run_thox(tmp_path, "factory-reset", "--yes", env=env)
        assert (esp / "thox/factory-reset").is_file()
    finally:
        subprocess.run(["umount", str(esp)], check=True)
