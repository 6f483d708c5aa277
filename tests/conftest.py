"""Shared fixtures: a THOX_HOME with generated tiny models (and the demo
model), and real `thox serve` processes on ephemeral loopback ports."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from thoxtest import ALLOW_SKIP, SHARED, Server, _nullable, make_home, require, write_tiny_gguf  # noqa: E402


# `make test` runs the suite on pytest-xdist workers (TEST_WORKERS in the Makefile). Each test
# belongs to a scope, and a scope runs on one worker, in order (the scheduler below):
#   image-vm   the modules on the session's image (`built_image`: one cold build, VMs one at a
#              time); their processes (the build, QEMU) run niced, as background work beside the rest
#   provision  tests/provision (one ansible home, one provisioned tree)
#   <module>   every other module (its module-scoped servers started once)
# The scopes go by module path because the controller sees node ids only; a test that uses
# `built_image` from a module not listed here stops the run at collection.
IMAGE_VM_MODULES = ("tests/image/test_image_e2e.py", "tests/image/test_run_image_stop.py",
                    "tests/image/test_updates_e2e.py")
IMAGE_VM = "image-vm"
IMAGE_NICE = 10


def xdist_scope(nodeid: str) -> str:
    module = nodeid.split("::")[0]
    if module in IMAGE_VM_MODULES:
        return IMAGE_VM
    if module.startswith("tests/provision/"):
        return "provision"
    return module


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ScopeScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid)
    return ScopeScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    stray = [i.nodeid for i in items if "built_image" in i.fixturenames and xdist_scope(i.nodeid) != IMAGE_VM]
    if stray:
        raise pytest.UsageError(f"{stray[0]} uses built_image: add its module to IMAGE_VM_MODULES (tests/conftest.py)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """On an xdist worker, an image-vm test (and what it starts: the build, QEMU) runs at nice
    IMAGE_NICE: the API tests' latency bounds see the CPU they are written for."""
    background = os.environ.get("PYTEST_XDIST_WORKER") and xdist_scope(item.nodeid) == IMAGE_VM
    if background:
        before = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority(os.PRIO_PROCESS, 0, max(before, IMAGE_NICE))
    try:
        yield
    finally:
        if background:
            os.setpriority(os.PRIO_PROCESS, 0, before)


def pytest_sessionfinish(session, exitstatus):
    """A run with any skipped test fails (a skip hides a check that did not run),
    unless THOX_ALLOW_SKIP=1 allows skips explicitly."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped and not ALLOW_SKIP and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = terminalreporter.stats.get("skipped", [])
    if skipped and not ALLOW_SKIP:
        terminalreporter.write_line(f"FAILED: {len(skipped)} test(s) skipped; a run passes only with none "
                                    f"(THOX_ALLOW_SKIP=1 allows skips)", red=True, bold=True)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("gguf")
    write_tiny_gguf(d / "tiny.gguf")
    write_tiny_gguf(d / "tiny-nofim.gguf", fim=False, seed=1)
    return d


@pytest.fixture(scope="session")
def server(tmp_path_factory, models_dir):
    """The main test server: tiny models, the demo model, a 1 MiB body limit."""
    s = Server(make_home(tmp_path_factory, models_dir, "home", demo=True))
    yield s
    s.stop()


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI
    return OpenAI(base_url=server.base_url, api_key=server.key, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def openapi():
    """Validators for response bodies against the official OpenAI spec."""
    spec = SHARED / "reference" / "openai-openapi" / "openapi.yaml"
    require(spec.exists(), f"{spec} is not present (the OpenAI spec in ../shared beside the clone)")
    import yaml
    from jsonschema import Draft202012Validator
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    doc = yaml.load(spec.read_text(), Loader=loader)
    components = _nullable(doc["components"])

    def validate(body, schema_name: str) -> None:
        schema = {"$ref": f"#/components/schemas/{schema_name}", "components": components}
        errors = sorted(Draft202012Validator(schema).iter_errors(body), key=lambda e: e.path)
        assert not errors, f"{schema_name}: " + "; ".join(
            f"{list(e.path)}: {e.message[:200]}" for e in errors[:5])
    return validate


