"""Applying ansible/site.yml into a root directory over Ansible's chroot connection: the same
roles as a live box, with thox_image_build=true (the image role readies the tree for its
first boot). For amd64 the provisioned tree is cached under the digest of every input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .common import REPO, BuildError, key_of, log, pins, run, sha256_file, source_date_epoch, tree_digest
from .context import Context

PLAYBOOK = REPO / "ansible" / "site.yml"
# where systemd-resolved's stub file lives; /etc/resolv.conf links to it in an image
STUB_RESOLV = "run/systemd/resolve/stub-resolv.conf"


def _link_target(root: Path, link: Path) -> Path:
    """Where a symbolic link inside root points, as a path under root."""
    dest = os.readlink(link)
    inside = dest if dest.startswith("/") else os.path.join("/", link.parent.relative_to(root), dest)
    return root / os.path.normpath(inside).lstrip("/")


@contextmanager
def chroot_mounts(root: Path) -> Iterator[None]:
    """/proc, /sys, /dev, /dev/pts and a /run tmpfs for package installs inside root, and the
    build host's name servers there. The tmpfs gets them as systemd-resolved's stub file, so an
    /etc/resolv.conf that links to it (as the image role makes it) resolves throughout; any
    other /etc/resolv.conf is replaced for the run and put back afterwards."""
    mounted: list[Path] = []
    resolv = root / "etc/resolv.conf"
    saved: tuple[str, bytes | str | None] | None = None
    try:
        for src, dst, args in [("proc", "proc", ["-t", "proc"]), ("sysfs", "sys", ["-t", "sysfs"]),
                               ("/dev", "dev", ["--bind"]), ("/dev/pts", "dev/pts", ["--bind"]),
                               ("tmpfs", "run", ["-t", "tmpfs"])]:
            target = root / dst
            target.mkdir(parents=True, exist_ok=True)
            run(["mount", *args, src, str(target)])
            mounted.append(target)
        stub = root / STUB_RESOLV
        stub.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile("/etc/resolv.conf", stub)
        if not (resolv.is_symlink() and _link_target(root, resolv).exists()):
            if resolv.is_symlink():
                saved = ("link", os.readlink(resolv))
            else:
                saved = ("file", resolv.read_bytes()) if resolv.exists() else ("none", None)
            resolv.unlink(missing_ok=True)
            shutil.copyfile("/etc/resolv.conf", resolv)
        yield
    finally:
        if saved and not resolv.is_symlink():      # still the host's copy: put the tree's back
            resolv.unlink(missing_ok=True)
            if saved[0] == "link":
                os.symlink(saved[1], resolv)
            elif saved[0] == "file":
                resolv.write_bytes(saved[1])
        for target in reversed(mounted):
            subprocess.run(["umount", "-l", str(target)], check=False)


def ansible_playbook_bin() -> str:
    for cand in [os.environ.get("ANSIBLE_PLAYBOOK", ""), str(REPO / ".venv-ansible/bin/ansible-playbook"),
                 shutil.which("ansible-playbook") or ""]:
        if cand and os.access(cand, os.X_OK):
            return cand
    raise BuildError("ansible-playbook not found: run `make image-deps` (installs it into .venv-ansible)")


def ansible_version(use_ansible: bool = True) -> str:
    """The Ansible that applies the roles is an input of the provisioned root fs."""
    if not use_ansible:
        return "-"
    p = subprocess.run([ansible_playbook_bin(), "--version"], capture_output=True, text=True)
    return (p.stdout.splitlines() or ["?"])[0].strip()


def ansible_inventory(root: Path) -> str:
    # The host is the root directory; it is in the group `thox` as well as `all`.
    return json.dumps({"all": {"children": {"thox": {"hosts": {str(root): {
        "ansible_connection": "community.general.chroot",
        "ansible_python_interpreter": "/usr/bin/python3"}}}}}}, indent=1)


def ansible_cmd(ctx: Context, inventory: Path, playbook_bin: str = "ansible-playbook") -> list[str]:
    """The command that applies the site playbook into ctx.root (the same roles as provisioning
    a running box; thox_image_build=true skips the runtime-only steps)."""
    return [playbook_bin, "-i", str(inventory), str(PLAYBOOK), "-e", json.dumps(ctx.ansible_vars(), sort_keys=True)]


def apply_roles(ctx: Context) -> str:
    """ansible/site.yml into ctx.root, with the chroot's mounts and name servers for the run."""
    if not PLAYBOOK.exists():
        raise BuildError(f"{PLAYBOOK} is missing; build a plain Debian image with --no-ansible")
    inventory = ctx.root.parent / f"inventory-{ctx.target}.json"
    inventory.write_text(ansible_inventory(ctx.root))
    with chroot_mounts(ctx.root):
        # ansible.cfg next to the playbook is honoured (ANSIBLE_CONFIG); no host key checks apply to chroot
        run(ansible_cmd(ctx, inventory, ansible_playbook_bin()), logfile=ctx.logdir / f"ansible-{ctx.target}.log",
            cwd=REPO / "ansible",
            env={"ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_NOCOLOR": "1", "PYTHONUNBUFFERED": "1",
                 # reaches the commands run in the chroot (e.g. update-initramfs clamps its mtimes)
                 "SOURCE_DATE_EPOCH": str(source_date_epoch()),
                 "ANSIBLE_CONFIG": str(REPO / "ansible" / "ansible.cfg")})
    return "roles applied"


def provision_inputs(ctx: Context, base_tar: Path) -> dict[str, str]:
    """Everything the provisioned tree is made of, each as a short digest or name."""
    wheels = ((sha256_file(ctx.llama_wheel) if ctx.llama_wheel else "-")
              + (sha256_file(ctx.wheelhouse) if ctx.wheelhouse else "-")
              + (pins.DEMO_WHEEL_SHA256 if ctx.demo_wheel else "-"))
    return {"base": base_tar.name,
            "ansible": f"{ctx.use_ansible} {ansible_version(ctx.use_ansible)}",
            "wheels": wheels,
            "ansible_vars": json.dumps(ctx.ansible_vars(), sort_keys=True),
            # the keyring's path is a variable; its content goes into the image too
            "keyring": sha256_file(ctx.keyring) if ctx.keyring else "-",
            # app/ holds versions.env; systemd/ the unit templates
            "ansible_app_systemd": tree_digest([REPO / "ansible", REPO / "app", REPO / "systemd"])
            if ctx.use_ansible else "-",
            "builder": tree_digest([Path(__file__).resolve().parent])}


def stage_provision(ctx: Context, base_tar: Path, finalize: Callable[[Context], None]) -> tuple[Path, str]:
    """Extract the base into ctx.root, apply the roles, finalize. The result is cached under
    the digest of every input, so a rebuild with unchanged inputs skips it."""
    work = ctx.root
    stamp = work.with_name(work.name + ".key")
    parts = provision_inputs(ctx, base_tar)
    digest = key_of("provision-v2", *parts.values())
    old = {}
    if stamp.exists():
        try:
            old = json.loads(stamp.read_text()).get("parts", {})
        except ValueError:
            pass
    if not ctx.refresh and work.is_dir() and old and key_of("provision-v2", *old.values()) == digest:
        return work, f"cached ({digest})"
    if old:
        log(f"provision inputs changed: {', '.join(sorted(k for k in parts if old.get(k) != parts[k]))}")
    stamp.unlink(missing_ok=True)
    if work.exists():
        subprocess.run(["umount", "-R", "-l", str(work)], capture_output=True)
        shutil.rmtree(work)
    work.mkdir(parents=True)
    run(["tar", "-C", str(work), "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf", str(base_tar)])
    if ctx.use_ansible:
        apply_roles(ctx)
    finalize(ctx)
    stamp.write_text(json.dumps({"digest": digest, "parts": parts}, indent=1) + "\n")
    return work, f"built ({digest})"
