"""Shared-secret files: created 0600, refused when group or others can read them.

Theory of operation: the secret never travels. Both ends read it from a file (like an ssh
key: a file readable by anyone else is refused) and use it only as a MAC key for the control
handshake and for deriving per-run datagram keys.

Windows has no POSIX permission bits (``st_mode`` says 0o666 for every writable file); there
the file's ACL is what protects it (see the README), and the mode check is skipped.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from udpreach.core.errors import ConfigError
from udpreach.core.framing import parse_key_text

MIN_SECRET_BYTES = 16
ENV_VAR = "UDPREACH_SECRET_FILE"  # the CLI's --secret-file reads it (typer's envvar=)
POSIX_MODES = os.name == "posix"  # whether permission bits mean anything here


def load_secret(path: str | Path | None) -> bytes:
    """Read a secret file, refusing loose permissions.

    Raises:
        ConfigError: none named, missing, unreadable, too short, or (where permission bits
            exist) readable by group/others.
    """
    if path is None or str(path) == "":
        raise ConfigError(f"no secret file: pass --secret-file FILE or set {ENV_VAR}")
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise ConfigError(f"cannot read secret file {p}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"secret file {p} is not a regular file")
    if POSIX_MODES and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"secret file {p} is accessible by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {p}"
        )
    try:
        data = p.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read secret file {p}: {exc.strerror}") from None
    try:
        parse_key_text(data)  # a key file (udpreach key add) must be whole
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    if len(data) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"secret file {p} holds {len(data)} bytes; at least {MIN_SECRET_BYTES} are needed "
            "(create one with: udpreach secret new FILE)"
        )
    return data


def new_secret(path: str | Path, *, force: bool = False) -> Path:
    """Write a fresh 256-bit secret (hex) to *path* with mode 0600.

    Raises:
        ConfigError: the file exists (without force) or cannot be written.
    """
    p = Path(path)
    if str(path) == "-":  # a report's "-" is standard output; a secret never goes there
        raise ConfigError("give the secret file's name: a secret is written to a file (0600)")
    if p.is_dir():
        raise ConfigError(f"{p} is a folder: give the secret file's name")
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(p, flags, 0o600)
    except FileExistsError:
        raise ConfigError(f"{p} already exists (use --force to overwrite)") from None
    except OSError as exc:
        raise ConfigError(f"cannot create secret file {p}: {exc.strerror}") from None
    try:
        if hasattr(os, "fchmod"):  # not on Windows before 3.13: the ACL protects it there
            os.fchmod(fd, 0o600)
        os.write(fd, (secrets.token_hex(32) + "\n").encode())
    finally:
        os.close(fd)
    return p
