"""Root and the owner of THOX_HOME.

Every file under ``THOX_HOME`` belongs to its owner (the device's ``thox``
service user). Run by root, the CLI becomes that user before it does
anything (``act_as_home_owner``), so nothing in that directory can make
root write elsewhere. The few commands with a system part (``update``,
``backup``, ``factory-reset``) stay root and do their file work in a child
process that has become the owner (``as_home_owner``): the system part
(systemctl, the ESP, files outside THOX_HOME) runs as root, every file
under THOX_HOME is still written by its owner.
"""

from __future__ import annotations

import os
import pwd
import sys
from typing import Callable

from .config import thox_home
from .errors import ThoxError


def act_as_home_owner() -> None:
    """As root, become the owner of THOX_HOME when that is another user
    (groups, gid, uid; saved ids too)."""
    if os.geteuid() != 0:
        return
    home = thox_home()
    try:
        st = os.stat(home)
    except FileNotFoundError:
        return
    if st.st_uid == 0:
        return
    try:
        pw: pwd.struct_passwd | None = pwd.getpwuid(st.st_uid)
    except KeyError:
        pw = None
    gid = pw.pw_gid if pw else st.st_gid
    try:
        os.setgroups(os.getgrouplist(pw.pw_name, gid) if pw else [gid])
        os.setresgid(gid, gid, gid)
        os.setresuid(st.st_uid, st.st_uid, st.st_uid)
    except OSError as e:
        raise ThoxError(f"cannot act as the owner (uid {st.st_uid}) of {home}: {e.strerror}; "
                        f"run thox as that user") from None
    if pw:
        os.environ.update({"USER": pw.pw_name, "LOGNAME": pw.pw_name})
        if os.path.isdir(pw.pw_dir):
            os.environ["HOME"] = pw.pw_dir


def _drops_to_owner() -> bool:
    if os.geteuid() != 0:
        return False
    try:
        return os.stat(thox_home()).st_uid != 0
    except FileNotFoundError:
        return False


def as_home_owner(fn: Callable[[], None]) -> None:
    """Run ``fn`` as the owner of THOX_HOME. As root (with THOX_HOME owned by
    another user) it runs in a forked child that became the owner; its
    ThoxError (or OSError) comes back to the caller as a ThoxError. Otherwise
    ``fn`` simply runs here. File descriptors opened before are shared."""
    if not _drops_to_owner():
        fn()
        return
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:      # the child: become the owner, run, report one line
        os.close(r)
        code, message = 0, ""
        try:
            act_as_home_owner()
            fn()
        except ThoxError as e:
            code, message = 1, e.message
        except OSError as e:
            code, message = 1, f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}"
        except KeyboardInterrupt:
            code, message = 130, "interrupted"
        except BaseException as e:  # noqa: BLE001 - the child must never return into the caller's code
            code, message = 1, f"{type(e).__name__}: {e}"
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
                os.write(w, message.encode()[:4000])
            finally:
                os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        message = f.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 130:
        raise KeyboardInterrupt
    if code != 0:
        raise ThoxError(message or f"the step run as the owner of {thox_home()} failed (exit {code})")
