"""The run history: every run the coordinator makes, in one SQLite file.

Theory of operation: one row per run. ``begin`` writes the plan, the agent and the probe
with status ``running``; ``checkpoint`` replaces the row's record of the settled cells (a
compressed ledger snapshot from the coordinator, or a list of settled ranges; each call is
its own committed transaction, so a crash of the coordinator loses nothing that was already
settled); ``finish`` stores the final run document and the status ``complete`` or
``incomplete``. A row still ``running`` when read is either live (another process is
writing it) or orphaned (its coordinator died): ``load`` rebuilds a document from the last
checkpoint with every unsettled planned cell ``unknown`` and ``complete: false``; its
``status`` says ``incomplete`` (the word a finished run that did not complete gets too) when
the owning process is known to be gone (same host, pid no longer alive), else ``running``.

The database runs in WAL mode so that ``history``/``show`` read while a probe writes, with
``synchronous=NORMAL``: a committed checkpoint survives a crash of the process (not
necessarily a power cut, which is not worth an fsync per checkpoint). The schema version
lives in ``PRAGMA user_version`` and grows only through ``MIGRATIONS``; a file written by a
newer udpreach is refused rather than guessed at. Nothing secret is ever stored: only run
documents, which contain addresses, ports and counters.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import socket
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from udpreach import __version__
from udpreach.core import schema
from udpreach.core.errors import ConfigError, PortSpecError, UdpreachError
from udpreach.core.expect import merge_ranges, planned_intervals, subtract, summarize, union
from udpreach.core.ledger import Ledger, SnapshotError
from udpreach.core.portspec import parse_ports

SCHEMA = schema.RUN

# Each migration is a list of statements (or functions of the connection); migration N
# (1-based) brings user_version to N.
Migration = list["str | Callable[[sqlite3.Connection], None]"]
MIGRATIONS: list[Migration] = [
    [
        """CREATE TABLE runs (
            run_id      TEXT PRIMARY KEY,
            started     REAL NOT NULL,
            finished    REAL,
            status      TEXT NOT NULL
                        CHECK (status IN ('running', 'complete', 'incomplete')),
            owner       TEXT,
            agent_name  TEXT,
            plan        TEXT NOT NULL,
            agent       TEXT NOT NULL,
            probe       TEXT NOT NULL,
            checkpoint  TEXT,
            checkpoint_at REAL,
            summary     TEXT,
            deviations  INTEGER,
            doc         TEXT
        )""",
        "CREATE INDEX runs_by_started ON runs (started DESC)",
    ],
    [
        "ALTER TABLE runs ADD COLUMN digest TEXT",
        # Rows written before digests existed are sealed as they are (trust on first use).
        lambda conn: _seal_all(conn),
    ],
]
# What a row's digest covers: every column a reader uses.
SEALED = (
    "run_id",
    "started",
    "finished",
    "status",
    "owner",
    "agent_name",
    "plan",
    "agent",
    "probe",
    "checkpoint",
    "summary",
    "deviations",
    "doc",
)


class StoreError(UdpreachError):
    """The run database failed while in use (disk full, I/O error, locked too long)."""


class DamagedRunError(StoreError):
    """A stored run does not match its digest, or cannot be read back (exit 3)."""


class UnknownRunError(ConfigError):
    """No stored run matches the given id or prefix, or more than one does (exit 2)."""


def default_path() -> Path:
    """``$XDG_DATA_HOME/udpreach/runs.sqlite3`` (XDG's default: ``~/.local/share``)."""
    base = os.environ.get("XDG_DATA_HOME", "")
    # The XDG spec says to ignore a relative value.
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".local" / "share"
    return root / "udpreach" / "runs.sqlite3"


_INCARNATION = secrets.token_hex(4)  # tells this process from an earlier one with its pid


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{_INCARNATION}"


def _owner_gone(owner: str | None) -> bool:
    """True when the owning process ran on this host and no longer exists."""
    if not owner:
        return False
    parts = owner.split(":")
    host, pid_text = parts[0], parts[1] if len(parts) > 1 else ""
    incarnation = parts[2] if len(parts) > 2 else None
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        # Our pid: an earlier process that had it (a container's pid 1 restarted) is gone.
        return incarnation is not None and incarnation != _INCARNATION
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


def _canonical(value: Any) -> bytes:
    if value is None:
        return b"N"
    if isinstance(value, bytes):
        return b"B%d:" % len(value) + value
    if isinstance(value, str):
        raw = value.encode("utf-8", "surrogatepass")
        return b"S%d:" % len(raw) + raw
    if isinstance(value, int | float):
        return b"R" + repr(value).encode()
    raise TypeError(f"unexpected column value {type(value).__name__}")


def row_digest(row: Mapping[str, Any] | sqlite3.Row) -> str:
    """The digest of a row's sealed columns, as SQLite returns them."""
    h = hashlib.blake2b(digest_size=16, person=b"udpreach-run-v1")
    for col in SEALED:
        h.update(col.encode() + b"=" + _canonical(row[col]) + b"\0")
    return h.hexdigest()


def _seal(conn: sqlite3.Connection, run_id: str) -> None:
    row = conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    if row is not None:
        conn.execute("UPDATE runs SET digest = ? WHERE run_id = ?", (row_digest(row), run_id))


def _seal_all(conn: sqlite3.Connection) -> None:
    for (run_id,) in list(conn.execute("SELECT run_id FROM runs")):
        _seal(conn, run_id)


def _deviating_cells(doc: dict[str, Any]) -> int | None:
    devs = doc.get("deviations")
    if not isinstance(devs, list):
        return None
    return sum(int(r["last"]) - int(r["first"]) + 1 for r in devs)


class RunStore:
    """The run history in one SQLite file. Use ``RunStore.open``; close it when done."""

    def __init__(self, conn: sqlite3.Connection, path: Path, *, readonly: bool = False) -> None:
        self._conn = conn
        self.path = path
        self.readonly = readonly
        self._lock = threading.RLock()
        self._version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        self.problems: list[str] = []  # one line per row ``history`` had to skip

    # -- lifecycle ------------------------------------------------------------------------

    @classmethod
    def open(
        cls, path: str | Path | None = None, *, create: bool = True, readonly: bool | None = None
    ) -> RunStore:
        """Open (and create or migrate) the run database.

        Args:
            path: the database file; None for ``default_path()``.
            create: create the file and its directories when missing; with False a missing
                file is an error (for commands that only read the history).
            readonly: open without the right to write (default: ``not create``); the file
                is then neither migrated nor changed in any way.

        Raises:
            ConfigError: the path cannot be used (not a database, unwritable directory, a
                schema newer than this udpreach, or missing with ``create=False``).
        """
        p = Path(path).expanduser() if path is not None else default_path()
        readonly = (not create) if readonly is None else readonly
        if not create and not p.exists():
            raise ConfigError(
                f"no run database at {p} (runs are recorded where `udpreach probe` runs; "
                "--db chooses another file)"
            )
        if p.exists() and p.is_dir():
            raise ConfigError(f"run database {p} is a directory")
        if readonly:
            return cls._open_readonly(p)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            # Only its owner reads the history (addresses, policies found): 0600, and
            # SQLite gives its -wal and -shm files the database file's mode.
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT, 0o600))
        except OSError as exc:
            raise ConfigError(f"cannot write the run database {p}: {exc.strerror or exc}") from None
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(p, timeout=5.0, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout = 5000")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            _migrate(conn, p)
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            raise ConfigError(f"cannot use run database {p}: {exc}") from None
        except ConfigError:
            if conn is not None:
                conn.close()
            raise
        return cls(conn, p)

    @classmethod
    def _open_readonly(cls, p: Path) -> RunStore:
        uri = "file:" + urllib.parse.quote(str(p.absolute()))  # not resolve(): /proc/PID/root
        last: sqlite3.Error | None = None
        # On read-only media SQLite cannot make the WAL index: read the file as it is.
        for query in ("?mode=ro", "?mode=ro&immutable=1"):
            conn: sqlite3.Connection | None = None
            try:
                conn = sqlite3.connect(
                    uri + query, uri=True, timeout=5.0, isolation_level=None,
                    check_same_thread=False,
                )  # fmt: skip
                conn.row_factory = sqlite3.Row
                conn.execute("PRAGMA busy_timeout = 5000")
                version = int(conn.execute("PRAGMA user_version").fetchone()[0])
                if version > len(MIGRATIONS):
                    conn.close()
                    raise ConfigError(
                        f"run database {p} has schema version {version}, newer than this"
                        f" udpreach understands ({len(MIGRATIONS)}); upgrade udpreach"
                    )
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
                return cls(conn, p, readonly=True)
            except sqlite3.Error as exc:
                if conn is not None:
                    conn.close()
                last = exc
        raise ConfigError(f"cannot use run database {p}: {last}")

    def close(self) -> None:
        """Close the database (idempotent)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- writing (the coordinator) --------------------------------------------------------

    def _write(self, run_id: str, change: Callable[[sqlite3.Connection], int]) -> int:
        """Run *change* and reseal *run_id*'s row in one transaction.

        Raises:
            StoreError: anything failed (the transaction is rolled back).
        """
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    n = change(conn)
                    _seal(conn, run_id)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StoreError(f"run database {self.path}: {exc}") from None
            except (OSError, ValueError, TypeError) as exc:
                raise StoreError(f"run database {self.path}: {exc}") from None
        return n

    def begin(
        self,
        run_id: str,
        *,
        started: float,
        plan: dict[str, Any],
        agent: dict[str, Any],
        probe: dict[str, Any],
    ) -> None:
        """Record a new run (status ``running``).

        ``plan["src_ports"]`` should be a concrete SPEC (the ports actually planned, not
        ``random:N``) so that an interrupted run can name its unsettled cells.

        Raises:
            StoreError: the run id exists already, or the database failed.
        """

        def change(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "INSERT INTO runs (run_id, started, status, owner, agent_name, plan, agent,"
                " probe) VALUES (?, ?, 'running', ?, ?, ?, ?, ?)",
                (
                    run_id,
                    float(started),
                    _owner(),
                    agent.get("name"),
                    _dumps(plan),
                    _dumps(agent),
                    _dumps(probe),
                ),
            ).rowcount

        self._write(run_id, change)

    def checkpoint(self, run_id: str, settled: bytes | list[dict[str, Any]]) -> None:
        """Replace the run's checkpoint: every cell settled so far, as a ledger snapshot
        (``Ledger.snapshot``, what the coordinator writes: cheap however scattered the
        settled cells are) or as the ranges of the settled cells.

        Committed before returning.

        Raises:
            StoreError: no such run, or the database failed.
        """

        def change(conn: sqlite3.Connection) -> int:
            value = settled if isinstance(settled, bytes) else _dumps(settled)
            return conn.execute(
                "UPDATE runs SET checkpoint = ?, checkpoint_at = ? WHERE run_id = ?",
                (value, time.time(), run_id),
            ).rowcount

        if self._write(run_id, change) == 0:
            raise StoreError(f"checkpoint for unknown run {run_id!r}")

    def finish(self, run_id: str, doc: dict[str, Any]) -> None:
        """Store the final document; status ``complete`` or ``incomplete`` per
        ``doc["complete"]``. Works without a prior ``begin`` (the row is created).

        Raises:
            StoreError: the database failed (or the document cannot be stored as JSON).
        """

        def change(conn: sqlite3.Connection) -> int:
            status = "complete" if doc.get("complete") else "incomplete"
            agent = doc.get("agent") or {}
            return conn.execute(
                "INSERT INTO runs (run_id, started, finished, status, owner, agent_name, plan,"
                " agent, probe, summary, deviations, doc) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT (run_id) DO UPDATE SET finished = excluded.finished,"
                " status = excluded.status, agent_name = excluded.agent_name,"
                " plan = excluded.plan, agent = excluded.agent, probe = excluded.probe,"
                " summary = excluded.summary, deviations = excluded.deviations,"
                " doc = excluded.doc, checkpoint = NULL",
                (
                    run_id,
                    float(doc.get("started") or time.time()),
                    doc.get("finished", time.time()),
                    status,
                    _owner(),
                    agent.get("name"),
                    _dumps(doc.get("plan") or {}),
                    _dumps(agent),
                    _dumps(doc.get("probe") or {}),
                    _dumps(doc.get("summary") or {}),
                    _deviating_cells(doc),
                    _dumps(doc),
                ),
            ).rowcount

        try:
            self._write(run_id, change)
        except (KeyError, AttributeError) as exc:  # a document without its ranges' fields
            raise StoreError(f"run {run_id}: the document cannot be stored ({exc})") from None

    def recover_orphans(self) -> list[str]:
        """Store the runs that a dead probe on this host left ``running`` as ``incomplete``
        (rebuilt from their last checkpoint, with a warning); returns their ids.

        Raises:
            StoreError: the database failed.
        """
        rows = self._read(
            "SELECT * FROM runs WHERE status = 'running' AND doc IS NULL ORDER BY started"
        )
        found = []
        for row in rows:
            if not _owner_gone(row["owner"]) or not self._intact(row):
                continue
            doc = _recover(row)
            doc.pop("status", None)
            note = doc.pop("note", "")
            now = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
            doc["warnings"] = [
                f"the probe stopped before this run finished ({note}); found and marked"
                f" incomplete by the probe started {now}"
            ]
            doc["finished"] = row["checkpoint_at"] or row["started"]
            self.finish(str(row["run_id"]), doc)
            found.append(str(row["run_id"]))
        return found

    # -- reading --------------------------------------------------------------------------

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        if self._version == 0:
            return []  # an empty database file: no runs yet
        with self._lock:
            try:
                return list(self._conn.execute(sql, args))
            except sqlite3.Error as exc:
                raise StoreError(f"run database {self.path}: {exc}") from None

    def _intact(self, row: sqlite3.Row) -> bool:
        """Whether *row* matches its digest (rows of a schema without digests pass)."""
        if "digest" not in row.keys() or row["digest"] is None:  # noqa: SIM118 (Row)
            return self._version < 2
        try:
            return bool(row_digest(row) == row["digest"])
        except TypeError:
            return False

    def _damaged(self, run_id: str, why: str) -> DamagedRunError:
        return DamagedRunError(
            f"run {run_id} is damaged in the run database {self.path} ({why}); not shown"
        )

    def resolve(self, run_id_or_prefix: str) -> str:
        """The full run id for an id, or a unique prefix of one, or a unique end of one
        (its random part).

        Raises:
            UnknownRunError: nothing matches, or more than one run does.
        """
        key = run_id_or_prefix.strip()
        if not key:
            raise UnknownRunError("empty run id")
        if self._read("SELECT 1 FROM runs WHERE run_id = ?", (key,)):
            return key
        escaped = key.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = self._read(
            "SELECT run_id FROM runs WHERE run_id LIKE ? ESCAPE '\\' ORDER BY started DESC LIMIT 6",
            (escaped + "%",),
        )
        # LIKE is case-insensitive for ASCII; run ids are not.
        ids = [str(r["run_id"]) for r in rows if str(r["run_id"]).startswith(key)]
        if not ids:
            # The end of an id (its random part, ``...-8c6c6b``) tells runs of one day
            # apart, where the start does not.
            rows = self._read(
                "SELECT run_id FROM runs WHERE run_id LIKE ? ESCAPE '\\' "
                "ORDER BY started DESC LIMIT 6",
                ("%" + escaped,),
            )
            ids = [str(r["run_id"]) for r in rows if str(r["run_id"]).endswith(key)]
        if not ids:
            raise UnknownRunError(f"no stored run matches {key!r} (see `udpreach history`)")
        if len(ids) > 1:
            shown = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
            raise UnknownRunError(f"run id {key!r} is ambiguous: {shown}")
        return ids[0]

    def load(self, run_id_or_prefix: str) -> dict[str, Any]:
        """The run document for an id or unique prefix.

        A run still marked running comes back rebuilt from its last checkpoint, with every
        unsettled planned cell ``unknown``, ``complete: false`` and ``status`` set to
        ``running`` or ``incomplete``.

        Raises:
            UnknownRunError: nothing matches, or more than one run does.
            DamagedRunError: the stored run does not match its digest or cannot be read.
        """
        run_id = self.resolve(run_id_or_prefix)
        rows = self._read("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        if not rows:
            raise UnknownRunError(f"no stored run matches {run_id!r} (see `udpreach history`)")
        row = rows[0]
        if not self._intact(row):
            raise self._damaged(run_id, "its record does not match its digest")
        try:
            if row["doc"] is not None:
                doc = json.loads(row["doc"])
                if not isinstance(doc, dict):
                    raise ValueError("not an object")
                return doc
            return _recover(row)
        except (ValueError, TypeError, KeyError) as exc:
            raise self._damaged(run_id, f"unreadable: {exc}") from None

    def _summarize(self, row: sqlite3.Row) -> dict[str, Any]:
        if row["doc"] is None:
            doc = _recover(row)
            summary = doc["summary"]
            status = doc["status"]
        else:
            summary = json.loads(row["summary"]) if row["summary"] else {}
            status = str(row["status"])
        plan = json.loads(row["plan"])
        if not isinstance(summary, dict) or not isinstance(plan, dict):
            raise ValueError("summary or plan is not an object")
        return {
            "run_id": row["run_id"],
            "started": row["started"],
            "finished": row["finished"],
            "agent": row["agent_name"],
            "status": status,
            "complete": status == "complete",
            "plan": {
                "src_ports": plan.get("src_ports"),
                "dst_ports": plan.get("dst_ports"),
            },
            "summary": summary,
            "deviations": row["deviations"],
        }

    def _rowids(self) -> list[int]:
        """Every row's rowid, newest first (by table scan if the index is damaged)."""
        try:
            return [
                r[0]
                for r in self._read("SELECT rowid FROM runs ORDER BY started DESC, run_id DESC")
            ]
        except StoreError as exc:
            self.problems.append(f"the run index is unreadable ({exc}); runs are unsorted")
        return [r[0] for r in self._read("SELECT rowid FROM runs")]

    def history(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Stored runs, newest first: ``run_id``, ``started``, ``finished``, ``agent``
        (name), ``status`` (complete, incomplete, running), ``complete``,
        ``plan``, ``summary`` and ``deviations`` (deviating cells; None when the run was
        not judged against expectations).

        A row that is damaged (its digest does not match) or unreadable is skipped, and
        ``problems`` gets a line saying which and why.

        Raises:
            StoreError: the table itself cannot be read.
        """
        self.problems = []
        out: list[dict[str, Any]] = []
        for rowid in self._rowids():
            if limit is not None and len(out) >= limit:
                break
            try:
                rows = self._read("SELECT * FROM runs WHERE rowid = ?", (rowid,))
            except StoreError as exc:
                self.problems.append(f"stored run #{rowid} is unreadable ({exc}); skipped")
                continue
            if not rows:
                continue
            row = rows[0]
            label = str(row["run_id"])[:64]
            if not self._intact(row):
                self.problems.append(
                    f"run {label} is damaged in the database (its record does not match its"
                    " digest); skipped"
                )
                continue
            try:
                out.append(self._summarize(row))
            except (ValueError, TypeError, KeyError) as exc:
                self.problems.append(f"run {label} is unreadable ({exc}); skipped")
        return out


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > len(MIGRATIONS):
        raise ConfigError(
            f"run database {path} has schema version {version}, newer than this udpreach "
            f"understands ({len(MIGRATIONS)}); upgrade udpreach or use another --db"
        )
    if version == len(MIGRATIONS):
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Another process may have migrated while we waited for the lock.
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        for n in range(version, len(MIGRATIONS)):
            for step in MIGRATIONS[n]:
                if isinstance(step, str):
                    conn.execute(step)
                else:
                    step(conn)
            conn.execute(f"PRAGMA user_version = {n + 1}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _recover(row: sqlite3.Row) -> dict[str, Any]:
    """A document for a run that never finished: the checkpoint plus unknown cells."""
    plan: dict[str, Any] = json.loads(row["plan"])
    note = "the coordinator did not finish this run; cells not settled are unknown"
    checkpoint = row["checkpoint"]
    settled: list[dict[str, Any]] = []
    if isinstance(checkpoint, bytes):
        try:
            src_ports = parse_ports(str(plan["src_ports"]))
            led = Ledger.from_snapshot(checkpoint, src_ports)
            settled = [dict(r) for r in led.ranges(settled_only=True)]
        except (SnapshotError, PortSpecError, KeyError) as exc:
            note = f"the coordinator did not finish this run; its checkpoint is unreadable ({exc})"
    elif checkpoint:
        settled = json.loads(checkpoint)
    ranges = list(settled)
    try:
        planned = planned_intervals(plan)
    except (PortSpecError, KeyError, TypeError, ValueError):
        planned = {}
        note = (
            "the coordinator did not finish this run and its plan cannot be expanded; "
            "only the settled cells are listed"
        )
    for d, ivs in planned.items():
        done = union((int(r["first"]), int(r["last"])) for r in settled if r["dst_port"] == d)
        for a, b in subtract(ivs, done):
            ranges.append(
                {
                    "dst_port": d,
                    "first": a,
                    "last": b,
                    "verdict": "unknown",
                    "translated": False,
                    "sent": 0,
                    "received": 0,
                }
            )
    ranges = merge_ranges(ranges)
    status = "incomplete" if _owner_gone(row["owner"]) else "running"
    return {
        "schema": SCHEMA,
        "version": __version__,  # this reader's: the run's own went with the probe
        "run_id": row["run_id"],
        "complete": False,
        "agent": json.loads(row["agent"]),
        "probe": json.loads(row["probe"]),
        "plan": plan,
        "summary": summarize(ranges),
        "ranges": ranges,
        "started": row["started"],
        "warnings": [note],
        "status": status,
        "note": note,
    }
