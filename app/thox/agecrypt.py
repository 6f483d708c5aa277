"""Encryption of backups with the `age` command (and compression with `zstd`).

A backup is encrypted either with a passphrase (age's scrypt recipient) or
to age recipients (public keys, ``-r``/``-R``; restored with the matching
identity, ``-i``). age reads a passphrase only from a terminal, never from a
file or the environment, so a passphrase the caller already has (from
``--passphrase-file``, ``THOX_BACKUP_PASSPHRASE`` or a prompt) is typed into
age's own pseudo-terminal. Files given by path (identity, recipients) are
read by the caller and handed to age through pipes, so a child process that
no longer has the caller's rights can still use them.
"""

from __future__ import annotations

import getpass
import os
import select
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import IO

from .errors import BackupError

PASSPHRASE_ENV = "THOX_BACKUP_PASSPHRASE"


@dataclass
class Secret:
    """How a backup is encrypted or decrypted."""
    passphrase: bytes | None = None
    recipients: list[str] = field(default_factory=list)   # age -r values
    recipients_file: bytes | None = None                    # contents for age -R
    identity: bytes | None = None                           # contents for age -i


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20)
    except OSError as e:
        raise BackupError(f"cannot read the {what} {path}: {e.strerror}") from None


def secret_from_args(passphrase_file: str | None, recipients: list[str] | None, recipients_file: str | None,
                     identity: str | None, confirm: bool) -> Secret:
    """The Secret the options ask for: a passphrase file, else the
    ``THOX_BACKUP_PASSPHRASE`` environment variable, else recipients or an
    identity, else a passphrase typed at the terminal (twice with ``confirm``)."""
    keyed = bool(recipients or recipients_file or identity)
    if passphrase_file:
        if keyed:
            raise BackupError("use either a passphrase or age keys (-r, -R, -i), not both")
        pw = _read(passphrase_file, "passphrase file").rstrip(b"\r\n")
    elif keyed:
        return Secret(recipients=list(recipients or []),
                      recipients_file=_read(recipients_file, "recipients file") if recipients_file else None,
                      identity=_read(identity, "identity file") if identity else None)
    elif os.environ.get(PASSPHRASE_ENV):
        pw = os.environ[PASSPHRASE_ENV].encode()
    elif sys.stdin.isatty():
        pw = getpass.getpass("Backup passphrase: ").encode()
        if confirm and getpass.getpass("Passphrase again: ").encode() != pw:
            raise BackupError("the two passphrases differ")
    else:
        raise BackupError(f"no passphrase: give --passphrase-file FILE, set {PASSPHRASE_ENV}, "
                          f"or use age keys (-r/-R to encrypt, -i to decrypt)")
    if not pw or b"\n" in pw:
        raise BackupError("the passphrase must be one non-empty line")
    return Secret(passphrase=pw)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BackupError(f"`{name}` is not installed (apt-get install {name})")
    return path


def _pipe_with(data: bytes) -> int:
    """The read end of a pipe that holds ``data`` (small: within the pipe buffer)."""
    r, w = os.pipe()
    try:
        os.write(w, data)
    finally:
        os.close(w)
    return r


class Age:
    """One running age process, typing the passphrase into its terminal when
    it asks. ``stdin``/``stdout`` as for subprocess.Popen."""

    def __init__(self, secret: Secret, decrypt: bool, stdin: int | IO[bytes], stdout: int | IO[bytes]):
        args = [tool("age")]
        fds: list[int] = []
        if decrypt:
            args.append("-d")
            if secret.identity is not None:
                fds.append(_pipe_with(secret.identity))
                args += ["-i", f"/dev/fd/{fds[-1]}"]
        elif secret.passphrase is not None:
            args.append("-p")
        else:
            for r in secret.recipients:
                args += ["-r", r]
            if secret.recipients_file is not None:
                fds.append(_pipe_with(secret.recipients_file))
                args += ["-R", f"/dev/fd/{fds[-1]}"]
        self._pw = secret.passphrase
        self._master = self._slave = -1
        preexec = None
        if self._pw is not None:
            self._master, self._slave = os.openpty()
            name = os.ttyname(self._slave)
            preexec = lambda: os.close(os.open(name, os.O_RDWR))  # noqa: E731 - age's controlling terminal
        try:
            self.proc = subprocess.Popen(args, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE,
                                         pass_fds=fds, start_new_session=self._pw is not None,
                                         preexec_fn=preexec)
        finally:
            for fd in fds:
                os.close(fd)
        self._stop = threading.Event()
        self._typist = None
        if self._pw is not None:
            self._typist = threading.Thread(target=self._type, daemon=True)
            self._typist.start()

    def _type(self) -> None:
        seen = b""
        while not self._stop.is_set():
            if not select.select([self._master], [], [], 0.1)[0]:
                continue
            try:
                seen += os.read(self._master, 4096)
            except OSError:
                return
            while b": " in seen:                 # each prompt ends in ": "
                seen = seen.split(b": ", 1)[1]
                os.write(self._master, self._pw + b"\n")

    def finish(self) -> str | None:
        """Wait for age; None when it succeeded, else its error (one line)."""
        err = self.proc.stderr.read() if self.proc.stderr and not self.proc.stderr.closed else b""
        rc = self.proc.wait()
        self.close()
        if rc == 0:
            return None
        lines = [ln.strip() for ln in err.decode(errors="replace").splitlines()
                 if ln.strip() and "report unexpected or unhelpful errors" not in ln]
        msg = lines[0] if lines else f"age exited with {rc}"
        return msg.removeprefix("age: error: ").removeprefix("age: ")

    def kill(self) -> None:
        """Stop age (its error, if any, is still read by ``finish``)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self._stop.set()
        if self._typist is not None:
            self._typist.join()
            self._typist = None
        for fd in (self._master, self._slave):
            if fd >= 0:
                os.close(fd)
        self._master = self._slave = -1
        if self.proc.stderr:
            self.proc.stderr.close()


def zstd(decompress: bool, stdin: int | IO[bytes], stdout: int | IO[bytes]) -> subprocess.Popen:
    args = [tool("zstd"), "-q", "-c"] + (["-d"] if decompress else ["-3", "-T0"])
    return subprocess.Popen(args, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE)


def zstd_error(proc: subprocess.Popen) -> str | None:
    err = proc.stderr.read() if proc.stderr else b""
    rc = proc.wait()
    if proc.stderr:
        proc.stderr.close()
    if rc == 0:
        return None
    lines = [ln.strip() for ln in err.decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else f"zstd exited with {rc}"
