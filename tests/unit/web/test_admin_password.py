"""thox.web.admin without a server: the generated password's shape, the
password policy, and the scrypt record's check against a real admin.json."""

from __future__ import annotations

import json
import re
import stat

import pytest

from thox.config import Config
from thox.web import admin


def test_generated_passwords_are_four_groups_from_the_unambiguous_alphabet():
    seen = {admin.generate_password() for _ in range(50)}
    assert len(seen) == 50
    for pw in seen:
        assert re.fullmatch(r"[23456789abcdefghjkmnpqrstuvwxyz]{5}(-[23456789abcdefghjkmnpqrstuvwxyz]{5}){3}", pw)


@pytest.mark.parametrize("new, confirm, current, why", [
    ("correct-horse-1", "correct-horse-2", None, "do not match"),
    ("short-1", "short-1", None, "at least 10"),
    ("x" * 1025, "x" * 1025, None, "at most 1024"),
    (" padded-password", " padded-password", None, "spaces"),
    ("aaaaabbbbbb", "aaaaabbbbbb", None, "too easy"),
    ("old-password-9", "old-password-9", "old-password-9", "different from the current"),
])
def test_policy_refusals(new, confirm, current, why):
    with pytest.raises(admin.PasswordPolicyError, match=why):
        admin.check_policy(new, confirm, current)


def test_policy_accepts_a_reasonable_password():
    admin.check_policy("a new passphrase", "a new passphrase", "old-password-9")


def test_set_and_check_password(tmp_path):
    cfg = Config(tmp_path)
    assert admin.check_password(cfg, "anything") is False          # none set yet
    admin.set_password(cfg, "a new passphrase")
    rec = json.loads(admin.admin_path(cfg).read_text())
    assert rec["password"]["algorithm"] == "scrypt" and "a new passphrase" not in admin.admin_path(cfg).read_text()
    assert stat.S_IMODE(admin.admin_path(cfg).stat().st_mode) == 0o600
    assert admin.check_password(cfg, "a new passphrase") is True
    assert admin.check_password(cfg, "a new passphrasE") is False
    assert admin.check_password(cfg, "x" * 5000) is False
    assert admin.check_password(cfg, None) is False  # type: ignore[arg-type]
    assert admin.must_change(cfg) is False


def test_a_tampered_record_never_checks(tmp_path):
    cfg = Config(tmp_path)
    admin.set_password(cfg, "a new passphrase")
    rec = json.loads(admin.admin_path(cfg).read_text())
    for bad in ({"algorithm": "md5"}, {"n": 1 << 21}, {"salt": "zz"}, {"hash": None}):
        admin.admin_path(cfg).write_text(json.dumps({**rec, "password": {**rec["password"], **bad}}))
        assert admin.check_password(cfg, "a new passphrase") is False, bad


def test_ensure_creates_once_and_reset_makes_a_new_one_time_password(tmp_path):
    cfg = Config(tmp_path)
    assert admin.ensure_admin_password(cfg, echo=False) is True
    first = admin.password_file(cfg).read_text().strip()
    assert admin.must_change(cfg) and admin.check_password(cfg, first)
    assert admin.ensure_admin_password(cfg, echo=False) is False
    assert admin.password_file(cfg).read_text().strip() == first
    second = admin.reset_admin_password(cfg)
    assert second != first and admin.check_password(cfg, second) and not admin.check_password(cfg, first)
    admin.set_password(cfg, "a new passphrase")
    assert not admin.password_file(cfg).exists() and not admin.must_change(cfg)
