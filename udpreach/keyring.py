"""The coordinator's keyring: one key per agent, and operator keys for requesters.

Theory of operation: the shared secret (``udpreach secret new``) is the simple mode, one
probe and one agent; anyone holding it can be any agent and ask for any run. A keyring gives
each agent its own key, which proves its name and nothing else, and gives people and CI
their own operator keys, which may ask for runs and list agents but never register an agent
(as SmokePing gives each slave its own secret and WireGuard each peer its own key).

The keyring file (JSON, mode 0600, ``$XDG_CONFIG_HOME/udpreach/keyring.json`` unless
``--keyring`` says otherwise) holds one random master key and the list of names with their
role and generation; a name's key is ``HMAC(master, role | name | generation)``. So the
only key material the coordinator keeps is the master key, however many agents there are;
``udpreach key add NAME`` writes NAME's key to a key file (mode 0600) for the agent's host,
and ``udpreach key revoke NAME`` drops the name and remembers its generation, so that adding
the name again makes a new key and the old key file stays useless. A running probe notices
a changed file (``KeyringWatch.refresh``) and drops the sessions of revoked keys.

Changes are made under an exclusive lock (``fcntl.flock`` on ``keyring.json.lock``) and
written whole to a temporary file that is renamed over the old one, so a probe never reads
half a keyring. Core dumps are switched off before any key is read (``forbid_core_dumps``).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from udpreach.core import schema
from udpreach.core.errors import ConfigError
from udpreach.core.framing import KEY_ROLES, Grant, KeyIdentity
from udpreach.core.messages import NAME_RE

SCHEMA = schema.KEYRING
ENV_VAR = "UDPREACH_KEYRING"
MAX_KEYS = 100_000


def forbid_core_dumps() -> None:
    """No core dump of this process may ever hold a key: RLIMIT_CORE 0 and, on Linux, not
    dumpable at all (``PR_SET_DUMPABLE`` 0 also keeps other users' debuggers out)."""
    try:
        import resource

        # The soft limit is what the kernel dumps by; the hard one is left for children.
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    except (ImportError, ValueError, OSError):  # pragma: no cover - not on POSIX
        pass
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        # The process's own symbols, libc's among them: ctypes.util.find_library would
        # run /sbin/ldconfig, a process start for every command that reads a key.
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_dumpable = 4
        libc.prctl(pr_set_dumpable, 0, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - a libc without prctl
        pass


def default_path() -> Path:
    """``$UDPREACH_KEYRING``, else ``$XDG_CONFIG_HOME/udpreach/keyring.json``."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".config"
    return root / "udpreach" / "keyring.json"


@dataclass(frozen=True)
class KeyEntry:
    name: str
    role: str  # "agent" or "operator"
    gen: int
    added: float


class Keyring:
    """The keyring's content. ``load`` reads one; ``edit`` changes one under its lock."""

    def __init__(
        self, path: Path, master: bytes, entries: dict[str, KeyEntry], gens: dict[str, int]
    ):
        self.path = path
        self._master = master
        self.entries = entries
        self._gens = gens  # the last generation of every name ever added (revoked ones too)

    # -- reading -----------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path | None = None) -> Keyring:
        """Read the keyring at *path* (None: ``default_path()``).

        Raises:
            ConfigError: missing, readable by group or others, or malformed.
        """
        forbid_core_dumps()
        p = Path(path) if path is not None else default_path()
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise ConfigError(
                f"no keyring at {p} (create one with: udpreach key add NAME)"
            ) from None
        except OSError as exc:
            raise ConfigError(f"cannot read keyring {p}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"keyring {p} is not a regular file")
            if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ConfigError(
                    f"keyring {p} is accessible by group or others "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {p}"
                )
            raw = b""
            while chunk := os.read(fd, 1 << 20):
                raw += chunk
        finally:
            os.close(fd)
        return cls._parse(p, raw)

    @classmethod
    def _parse(cls, path: Path, raw: bytes) -> Keyring:
        bad = f"keyring {path} is malformed"
        try:
            data = json.loads(raw)
        except ValueError:
            raise ConfigError(f"{bad} (not JSON)") from None
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise ConfigError(f"{bad} (not a {SCHEMA} file)")
        try:
            master = bytes.fromhex(str(data["master"]))
            keys = data.get("keys") or {}
            gens = data.get("generations") or {}
            if len(master) != 32 or not isinstance(keys, dict) or not isinstance(gens, dict):
                raise ValueError
            entries = {}
            for name, e in keys.items():
                role, gen, added = e["role"], e["gen"], e["added"]
                if not NAME_RE.fullmatch(name) or role not in KEY_ROLES:
                    raise ValueError
                if not isinstance(gen, int) or not isinstance(added, int | float):
                    raise ValueError
                entries[name] = KeyEntry(name, role, gen, float(added))
            gen_map = {str(n): int(g) for n, g in gens.items()}
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ConfigError(bad) from None
        return cls(path, master, entries, gen_map)

    def key_for(self, name: str) -> bytes | None:
        """The current key of *name*, None if it has none (never added, or revoked)."""
        entry = self.entries.get(name)
        if entry is None:
            return None
        msg = b"udpreach/3 key\0" + entry.role.encode() + b"\0" + name.encode()
        msg += b"\0" + str(entry.gen).encode()
        return hmac.new(self._master, msg, hashlib.sha256).digest()

    def identity(self, name: str) -> KeyIdentity | None:
        key = self.key_for(name)
        if key is None:
            return None
        return KeyIdentity(self.entries[name].role, name, key)

    def grant(self, name: str) -> Grant | None:
        """What the control handshake checks a client that says it is *name* against."""
        key = self.key_for(name)
        if key is None:
            return None
        return Grant(self.entries[name].role, key)

    def fingerprint(self, name: str) -> str:
        """A short public digest of *name*'s key, to tell key files apart (like ssh-keygen -l)."""
        key = self.key_for(name)
        if key is None:
            return "-"
        digest = hashlib.blake2b(key, digest_size=8, person=b"udpreach-fp").hexdigest()
        return ":".join(digest[i : i + 4] for i in range(0, 16, 4))

    # -- changing ----------------------------------------------------------------------------

    def add(self, name: str, role: str) -> KeyIdentity:
        """Give *name* a new key; returns it (the caller writes the key file and saves)."""
        if not NAME_RE.fullmatch(name):
            raise ConfigError(f"key name {name!r}: use letters, digits, '.', '_' or '-' (<= 64)")
        if role not in KEY_ROLES:
            raise ConfigError(f"key role must be one of {', '.join(KEY_ROLES)}")
        if name in self.entries:
            raise ConfigError(
                f"{name!r} already has a key in {self.path}; revoke it first "
                f"(udpreach key revoke {name}) to issue a new one"
            )
        if len(self.entries) >= MAX_KEYS:
            raise ConfigError(f"keyring {self.path} is full ({MAX_KEYS} keys)")
        gen = self._gens.get(name, 0) + 1
        self._gens[name] = gen
        self.entries[name] = KeyEntry(name, role, gen, time.time())
        identity = self.identity(name)
        assert identity is not None
        return identity

    def revoke(self, name: str) -> KeyEntry:
        entry = self.entries.pop(name, None)
        if entry is None:
            raise ConfigError(f"no key named {name!r} in {self.path}")
        return entry

    def _dump(self) -> bytes:
        data: dict[str, Any] = {
            "schema": SCHEMA,
            "master": self._master.hex(),
            "keys": {
                e.name: {"role": e.role, "gen": e.gen, "added": e.added}
                for e in sorted(self.entries.values(), key=lambda e: e.name)
            },
            "generations": dict(sorted(self._gens.items())),
        }
        return (json.dumps(data, indent=1) + "\n").encode()

    def _save(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, self._dump())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


@contextlib.contextmanager
def edit(path: str | Path | None = None, *, create: bool = False) -> Iterator[Keyring]:
    """The keyring at *path* for changing, under an exclusive lock; saved when the block
    ends without an error. With *create*, a missing keyring is made (a fresh master key).

    Raises:
        ConfigError: as ``Keyring.load``, or the file or its directory cannot be written.
    """
    try:
        import fcntl  # here, not at the top: Windows has none, and the agent imports this
    except ImportError:
        raise ConfigError(
            "a keyring is edited where the coordinator runs (Linux or macOS): this system "
            "has no fcntl file locks"
        ) from None

    forbid_core_dumps()
    p = Path(path) if path is not None else default_path()
    if path is not None and not p.parent.is_dir():
        # A path given is taken as given (as ``probe --db``): a typo makes no directories.
        raise ConfigError(f"cannot use keyring {p}: no directory {p.parent}")
    try:
        p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock_fd = os.open(p.with_name(p.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot use keyring {p}: {exc.strerror}") from None
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        if create and not p.exists():
            ring = Keyring(p, secrets.token_bytes(32), {}, {})
        else:
            ring = Keyring.load(p)
        yield ring
        try:
            ring._save()
        except OSError as exc:
            raise ConfigError(f"cannot write keyring {p}: {exc.strerror}") from None
    finally:
        os.close(lock_fd)


def write_key_file(path: str | Path, identity: KeyIdentity, *, force: bool = False) -> Path:
    """Write *identity* as a key file (mode 0600), refusing to overwrite without *force*.

    Raises:
        ConfigError: the file exists (without force) or cannot be written.
    """
    p = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(p, flags, 0o600)
    except FileExistsError:
        raise ConfigError(f"{p} already exists (use --force to overwrite)") from None
    except OSError as exc:
        raise ConfigError(f"cannot create key file {p}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, identity.text() + b"\n")
    finally:
        os.close(fd)
    return p


class KeyringWatch:
    """The keyring as a running coordinator sees it: re-read whenever the file changes.

    ``refresh`` costs one ``stat`` when nothing changed. A keyring that becomes unreadable
    (deleted, malformed, loose permissions) is an error the caller logs; the last good
    content stays in use rather than letting everyone in or nobody.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int, int, int] | None = None
        self.ring = Keyring.load(self.path)
        self._stamp = self._stat()

    def _stat(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def refresh(self) -> bool:
        """Re-read the keyring if its file changed; True if it did.

        Raises:
            ConfigError: the changed file cannot be used (the old content stays in force).
        """
        stamp = self._stat()
        if stamp == self._stamp:
            return False
        ring = Keyring.load(self.path)
        self.ring, self._stamp = ring, stamp
        return True

    def grant(self, name: str) -> Grant | None:
        return self.ring.grant(name)

    def generation(self, name: str, role: str) -> int | None:
        """The generation of *name*'s current key of *role*, None if it has none."""
        entry = self.ring.entries.get(name)
        return entry.gen if entry is not None and entry.role == role else None
