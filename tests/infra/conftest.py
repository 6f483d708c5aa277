"""The testinfra suite for a provisioned Thox box.

    make verify HOST=thox.local [USER=root]
    .venv-ansible/bin/python -m pytest tests/infra --hosts=ssh://root@thox.local

It runs only when hosts are given (and pytest-testinfra is installed): a plain
`pytest tests` skips this folder.
"""
from __future__ import annotations

import importlib.util


def _enabled(config) -> bool:
    if importlib.util.find_spec("testinfra") is None:
        return False
    try:
        return bool(config.getoption("hosts"))
    except ValueError:
        return False


def pytest_ignore_collect(collection_path, config):
    if collection_path.name.startswith("test_") and not _enabled(config):
        return True
    return None
