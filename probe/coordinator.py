"""The coordinator: the control endpoint that agents register with and runs are asked of.

It runs with the probe (``udpreach probe``). Every connection must authenticate before it
can say anything, and ``probe.admission`` decides who may wait for that and for how long
(unauthenticated connections have a budget of their own, per source network, and the
oldest give way to newcomers; addresses whose handshakes keep failing are refused for a
while; agents and requesters each have slots of their own). Then a connection is either an
agent session (registered callback address, kept open, receipts flowing in) or a control
session (one request: list agents, or run a plan against one agent and stream progress and
the result back). Messages are typed (``udpreach.core.messages``) and checked as they come
in.

An agent proves its name: with a keyring only that name's own key registers it, and while an
agent answers nobody can take its name (a second registration is told "name in use"); a
session that stops answering is replaced. Replies are matched with the requests that asked
for them; what nobody asked for, or what is malformed, is paid for from a small budget
(logged at most once a second) and a session that spends it is cut off.

The run history is written through ``_GuardedStore``: a failing database (disk full,
read-only, locked) costs the history, never the run's document, which then says so.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import logging
import resource
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from probe.admission import Admission, Limits, Outcome
from probe.runner import RunExecution
from probe.sender import route_source
from udpreach.core.errors import (
    AgentUnavailableError,
    AuthError,
    ConfigError,
    ProtocolError,
    UnreachableError,
)
from udpreach.core.framing import (
    Authenticated,
    ControlConnection,
    Grant,
    KeyRoleError,
    Malformed,
    Message,
    Receipts,
)
from udpreach.core.messages import (
    FROM_AGENT,
    FROM_REQUESTER,
    NAME_RE,
    REPLY_TO,
    TO_AGENT,
    AgentInfo,
    AgentList,
    AgentsRequest,
    Cancel,
    Error,
    MessageError,
    Msg,
    Ping,
    Pong,
    Progress,
    Register,
    Registered,
    ResultEnd,
    ResultPart,
    RunRequest,
    outgoing,
    parse,
)
from udpreach.core.plan import Plan, plan_from_request
from udpreach.core.sweep import SweepSettings
from udpreach.keyring import KeyringWatch, forbid_core_dumps
from udpreach.net import hostport
from udpreach.net.channel import Channel, MemoryBudget
from udpreach.store import StoreError

__all__ = ["NAME_RE", "AgentSession", "Coordinator", "ProbeConfig"]

log = logging.getLogger("udpreach.coordinator")

RESULT_CHUNK = 1 << 20
NAME_CHECK = 3.0  # seconds an agent has to answer before another may take its name
UNSOLICITED_BURST = 100  # unsolicited or malformed messages a session may send at once...
UNSOLICITED_PER_SECOND = 5.0  # ...and then this many a second; past that it is cut off
STRAY_RECEIPTS = 256  # receipt batches outside a run let through (late ones after run_end)
KEYRING_POLL = 1.0
MAX_WAIT = 3600.0
DEFAULT_MAX_BYTES_RATE = 12_500_000  # 100 Mbit/s: a tenth of a gigabit
DEFAULT_MAX_BYTES = 4_000_000_000  # per run


@dataclass
class ProbeConfig:
    host: str
    port: int
    secret: bytes | None
    db: str | None = None
    source: str | None = None
    max_rate: int = 1_000_000
    max_datagrams: int = 50_000_000
    max_bytes_rate: int = DEFAULT_MAX_BYTES_RATE  # bytes of payload a second, all runs
    max_bytes: int = DEFAULT_MAX_BYTES  # bytes of payload in one run
    allow_targets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(default_factory=list)
    handshake_timeout: float = 5.0
    idle_timeout: float = 90.0
    limits: Limits = field(default_factory=Limits)
    keyring: str | Path | None = None  # per-agent and operator keys (None: shared secret only)
    use_store: bool = True
    send_mode: str = "auto"


def utc(ts: float | None) -> str:
    """A wall-clock time as people read it, with its zone."""
    if ts is None:
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


class _Throttled:
    """At most one warning a second; the rest are counted and reported with the next one,
    or by ``flush`` once a second has passed."""

    def __init__(self, what: str, every: float = 1.0) -> None:
        self.what = what
        self.every = every
        self.last = float("-inf")
        self.suppressed = 0

    def note(self, message: str) -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            self.suppressed += 1
            return
        extra = f" ({self.suppressed} more suppressed)" if self.suppressed else ""
        log.warning("%s%s", message, extra)
        self.last = now
        self.suppressed = 0

    def flush(self) -> None:
        if self.suppressed and time.monotonic() - self.last >= self.every:
            log.warning("%s: %d more suppressed", self.what, self.suppressed)
            self.last = time.monotonic()
            self.suppressed = 0


class _Bucket:
    """A token bucket: ``burst`` at once, then ``rate`` a second."""

    def __init__(self, burst: float, rate: float, now: float) -> None:
        self.burst = burst
        self.rate = rate
        self.tokens = burst
        self.t = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class CutOff(ProtocolError):
    """An authenticated peer spent its budget of unsolicited or malformed messages."""


class _Peer:
    """What an authenticated peer may send that nobody asked for, and the log of it."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.count = 0
        self._bucket = _Bucket(UNSOLICITED_BURST, UNSOLICITED_PER_SECOND, trio.current_time())
        self._log = _Throttled(f"messages from {label}")

    def unsolicited(self, what: str) -> None:
        """Count one; raises CutOff once the budget is spent."""
        self.count += 1
        if not self._bucket.take(trio.current_time()):
            message = (
                f"{self.label} cut off after {self.count} unsolicited or malformed messages"
                f" (the last: {what})"
            )
            log.warning("%s", message)
            raise CutOff(message)
        self._log.note(f"{self.label}: {what}")


class AgentSession:
    """A registered agent, as seen from the coordinator.

    ``send`` and ``expect`` are what a run uses: ``send`` notes which answer each request
    asks for, and only those answers reach ``expect``; everything else the agent says is
    unsolicited (see ``_Peer``).
    """

    def __init__(
        self,
        name: str,
        chan: Channel,
        registered: str,
        observed: str,
        ports: tuple[int, ...],
        rcvbuf: int,
        *,
        key_id: str | None = None,
    ) -> None:
        self.name = name
        self.chan = chan
        self.registered = registered
        self.observed = observed
        self.ports = ports
        self.rcvbuf = rcvbuf
        self.key_id = key_id  # the key it proved (None: the shared secret)
        self.since = time.time()
        self.lost = trio.Event()
        self.busy = trio.Lock()
        self.run_id: str | None = None  # the run holding it, and since when
        self.busy_since: float | None = None
        self.sink: Callable[[bytes], None] | None = None
        self.last_heard = trio.current_time()
        self._heard = trio.Event()
        self._owed: Counter[str] = Counter()
        self._replies: deque[Msg] = deque(maxlen=64)
        self._new_reply = trio.Event()
        self._ping_seq = 0
        self._stray = 0
        self.peer = _Peer(f"agent {name}")

    # -- what the agent says (the session's reader task) --------------------------------------

    def heard(self) -> None:
        self.last_heard = trio.current_time()
        self._heard.set()
        self._heard = trio.Event()

    def on_receipts(self, payload: bytes) -> None:
        if self.sink is not None:
            self._stray = 0
            self.sink(payload)
        elif self._stray < STRAY_RECEIPTS:
            self._stray += 1  # the last batches of a run that has just ended
        else:
            self.peer.unsolicited("receipts outside a run")

    def on_malformed(self, reason: str) -> None:
        self.peer.unsolicited(f"malformed message ({reason})")

    def on_message(self, body: dict[str, Any]) -> None:
        try:
            msg = parse(body, FROM_AGENT)
        except MessageError as exc:
            self.peer.unsolicited(str(exc))
            return
        if isinstance(msg, Error):
            answers = REPLY_TO.get(msg.re or "")
            if answers is not None and self._owed[answers] > 0:
                self._owed[answers] -= 1
                self._deliver(msg)
            else:
                self.peer.unsolicited(f"unsolicited error {msg.message[:100]!r}")
            return
        if self._owed[msg.TYPE] > 0:
            self._owed[msg.TYPE] -= 1
            if not isinstance(msg, Pong):  # a pong's arrival is all that counts (heard)
                self._deliver(msg)
            return
        self.peer.unsolicited(f"unsolicited {msg.TYPE!r}")

    def _deliver(self, msg: Msg) -> None:
        self._replies.append(msg)
        self._new_reply.set()
        self._new_reply = trio.Event()

    def close_replies(self) -> None:
        """The session is over: wake everyone waiting on it."""
        self.lost.set()
        self._new_reply.set()
        self._heard.set()

    # -- what a run asks ----------------------------------------------------------------------

    async def send(self, body: Msg | dict[str, Any]) -> None:
        """Send a request or notice (checked as the agent will check it).

        Raises:
            AgentUnavailableError: the agent is gone.
        """
        if self.lost.is_set():
            raise AgentUnavailableError(f"agent {self.name!r} was lost")
        msg = outgoing(body, TO_AGENT)
        answer = REPLY_TO.get(msg.TYPE)
        if answer is not None:
            self._owed[answer] += 1
        try:
            await self.chan.send(msg)
        except UnreachableError:
            raise AgentUnavailableError(f"agent {self.name!r} was lost") from None

    async def expect(
        self, mtype: str, within: float, check: Callable[[dict[str, Any]], bool] | None = None
    ) -> dict[str, Any]:
        """The next answer of type *mtype* (earlier ones are skipped), waiting at most
        *within* s; the agent's refusal of the request raises.

        Raises:
            AgentUnavailableError: the agent went away, refused, or did not answer in time.
        """
        try:
            with trio.fail_after(within):
                while True:
                    while self._replies:
                        msg = self._replies.popleft()
                        if isinstance(msg, Error):
                            if REPLY_TO.get(msg.re or "") == mtype:
                                raise AgentUnavailableError(
                                    f"agent {self.name!r} refused {msg.re!r}: {msg.message}"
                                )
                            continue
                        body = msg.to_json()
                        if mtype == msg.TYPE and (check is None or check(body)):
                            return body
                    if self.lost.is_set():
                        raise AgentUnavailableError(f"agent {self.name!r} was lost during the run")
                    await self._new_reply.wait()
        except trio.TooSlowError:
            raise AgentUnavailableError(
                f"agent {self.name!r} did not answer within {within:g}s"
            ) from None

    async def alive(self, within: float) -> bool:
        """Whether the agent says anything (it is pinged) within *within* seconds."""
        if self.lost.is_set():
            return False
        t0 = trio.current_time()
        with trio.move_on_after(within):
            self._ping_seq += 1
            try:
                await self.send(Ping(self._ping_seq))
            except AgentUnavailableError:
                return False
            while self.last_heard <= t0:
                if self.lost.is_set():
                    return False
                await self._heard.wait()
            return not self.lost.is_set()
        return False

    def describe(self) -> AgentInfo:
        return AgentInfo(
            name=self.name,
            registered=self.registered,
            observed=self.observed,
            ports=self.ports,
            since=self.since,
            busy=self.busy.locked(),
            rcvbuf=self.rcvbuf,
            run=self.run_id,
            busy_since=self.busy_since,
        )


class _GuardedStore:
    """The run history as one run sees it: a failure is noted and said, never raised.

    The first failure is logged; ``finish`` adds a warning to the document (before storing
    it, so the stored copy says it too) and, if even the document cannot be stored, another
    saying that the requester's copy is the only one. Thread-safe, for a runner that writes
    from a worker thread.
    """

    def __init__(self, store: Any) -> None:
        self._store = store
        self._lock = threading.Lock()
        self.failure: str | None = None

    def _note(self, exc: StoreError) -> None:
        with self._lock:
            first = self.failure is None
            self.failure = self.failure or str(exc)
        if first:
            log.warning("run history failed: %s; the run goes on without it", exc)

    def begin(self, *args: Any, **kwargs: Any) -> None:
        try:
            self._store.begin(*args, **kwargs)
        except StoreError as exc:
            self._note(exc)

    def checkpoint(self, *args: Any, **kwargs: Any) -> None:
        if self.failure is not None:
            return  # a failing disk is not asked again every two seconds
        try:
            self._store.checkpoint(*args, **kwargs)
        except StoreError as exc:
            self._note(exc)

    def finish(self, run_id: str, doc: dict[str, Any]) -> None:
        warnings = doc.setdefault("warnings", [])
        if self.failure is not None:
            line = f"run history: {self.failure}; checkpoints of this run were not stored"
            if line not in warnings:
                warnings.append(line)
        try:
            self._store.finish(run_id, doc)
        except StoreError as exc:
            self._note(exc)
            warnings.append(
                f"run history: {exc}; this run is not stored (this document is its only copy)"
            )


@dataclass
class _Conn:
    """A live control connection, as the coordinator tracks it."""

    id: int
    address: str
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    why: str | None = None  # why the coordinator ended it (evicted, key revoked)
    code: str = "limit"
    authenticated: bool = False
    key_id: str | None = None
    key_role: str = "shared"
    key_gen: int | None = None

    def end(self, why: str, code: str) -> None:
        if self.why is None:
            self.why, self.code = why, code
        self.scope.cancel()


@dataclass(eq=False)  # kept in a set: by identity
class _Ticket:
    """A run request in progress, as its requester's watcher sees it."""

    execution: RunExecution | None = None
    cancelled: bool = False
    why: str | None = None  # why the probe itself ended the run (None: its requester did)
    gone: bool = False
    answered: bool = False  # its last message is on its way: the requester may close now
    waiting: trio.CancelScope = field(default_factory=trio.CancelScope)

    async def answer(self, chan: Channel, msg: Msg) -> None:
        """Send the request's last message."""
        self.answered = True
        await chan.send(msg)


class Coordinator:
    """Agent registry, control endpoint and run dispatcher."""

    def __init__(self, cfg: ProbeConfig, store: Any = None) -> None:
        self.cfg = cfg
        self.store = store
        self.agents: dict[str, AgentSession] = {}
        self.admission = Admission(cfg.limits)
        self._live: dict[int, _Conn] = {}
        self._ids = itertools.count(1)
        self._budget = MemoryBudget()
        self._keys: KeyringWatch | None = None
        self._name_locks: dict[str, trio.Lock] = {}
        self._changed = trio.Event()
        self._tickets: set[_Ticket] = set()  # run requests not yet answered for good
        self._tickets_changed = trio.Event()
        self._stopping: str | None = None  # why, once the probe is winding down
        self.active_runs = 0
        self._auth_failures = _Throttled("authentication failures")
        self._refusals = _Throttled("refused connections")
        self._evictions = _Throttled("dropped unauthenticated connections")
        self._names = _Throttled("refused registrations")
        self._keyring_errors = _Throttled("keyring errors")

    # -- serving ------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[tuple[str, int]]) -> None:
        """Listen on the control endpoint; ``task_status.started`` gets the bound address.

        Raises:
            ConfigError: the endpoint cannot be listened on, or no key is configured.
        """
        forbid_core_dumps()
        _raise_open_files()
        if self.cfg.keyring is not None:
            self._keys = KeyringWatch(self.cfg.keyring)
            n = len(self._keys.ring.entries)
            log.info(
                "keyring %s: %d key%s (agents prove their names with their own keys)",
                self.cfg.keyring,
                n,
                "" if n == 1 else "s",
            )
        if not self.cfg.secret and self._keys is None:
            raise ConfigError("the probe needs a shared secret (--secret-file) or a keyring")
        self._recover_orphans()
        try:
            listeners = await trio.open_tcp_listeners(self.cfg.port, host=self.cfg.host)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {hostport(self.cfg.host, self.cfg.port)}: {exc.strerror or exc}"
            ) from None
        sockname = listeners[0].socket.getsockname()
        log.info("coordinator listening on %s", hostport(sockname[0], sockname[1]))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._handle, listeners)
            nursery.start_soon(self._report_suppressed)
            if self._keys is not None:
                nursery.start_soon(self._watch_keyring)
            task_status.started((sockname[0], sockname[1]))

    def _recover_orphans(self) -> None:
        recover = getattr(self.store, "recover_orphans", None)
        if recover is None:
            return
        try:
            found = recover()
        except StoreError as exc:
            log.warning("run history: cannot look for orphaned runs: %s", exc)
            return
        for run_id in found:
            log.warning(
                "run %s was left unfinished by a probe that stopped; marked incomplete", run_id
            )

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            peer = stream.socket.getpeername()
        except OSError:
            await stream.aclose()
            return
        addr = str(ipaddress.ip_address(peer[0].split("%")[0]))
        mapped = ipaddress.ip_address(addr)
        if isinstance(mapped, ipaddress.IPv6Address) and mapped.ipv4_mapped:
            addr = str(mapped.ipv4_mapped)
        cid = next(self._ids)
        decision = self.admission.open(cid, addr, trio.current_time())
        for victim in decision.evict:
            old = self._live.get(victim)
            if old is not None:
                self._evictions.note(
                    f"dropping the oldest unauthenticated connection from {old.address} "
                    f"for a newer one from {addr} (connection limit)"
                )
                old.end(
                    "connection limit reached: too many unauthenticated connections from your"
                    " network (the oldest give way to newer ones)",
                    "limit",
                )
        if not decision.accepted:
            self._refusals.note(f"refusing connection from {addr}: {decision.reason}")
            refused = Channel(stream, ControlConnection("server", None))
            await refused.refuse(decision.reason, "limit")
            await refused.aclose()
            return
        conn = _Conn(cid, addr)
        self._live[cid] = conn
        keys = self._lookup if self._keys is not None else None
        chan = Channel(
            stream, ControlConnection("server", self.cfg.secret, keys=keys), budget=self._budget
        )
        outcome = Outcome.PROTOCOL
        try:
            with conn.scope:
                outcome = await self._serve_connection(chan, conn)
            if conn.why is not None:
                outcome = Outcome.OK if conn.authenticated else Outcome.EVICTED
                await chan.refuse(conn.why, conn.code)
        finally:
            del self._live[cid]
            self.admission.closed(cid, outcome, trio.current_time())
            await chan.aclose()

    async def _serve_connection(self, chan: Channel, conn: _Conn) -> Outcome:
        addr = conn.address
        try:
            with trio.fail_after(self.cfg.handshake_timeout):
                auth = await chan.server_handshake()
        except KeyRoleError as exc:
            self._auth_failed(addr, str(exc))
            return Outcome.OK  # a genuine key, used for the wrong thing: no penalty
        except AuthError:
            key_id = chan.conn.key_id
            self._auth_failed(addr, f"wrong key for {key_id!r}" if key_id else "wrong secret")
            return Outcome.AUTH_FAILED
        except trio.TooSlowError:
            self._auth_failed(addr, "handshake timed out")
            return Outcome.TIMEOUT
        except UnreachableError as exc:
            # The peer closes when our proof does not match its secret: from here that
            # looks like any closed connection, so both causes are named.
            self._auth_failed(
                addr, f"{exc} during the handshake (a wrong secret or key on its side?)"
            )
            return Outcome.PROTOCOL
        except ProtocolError as exc:
            self._auth_failed(addr, str(exc))
            return Outcome.PROTOCOL
        role = "agent" if auth.purpose == "agent" else "requester"
        refused = self.admission.authenticated(conn.id, role, trio.current_time())
        if refused is not None:
            self._refusals.note(f"refusing an authenticated {role} from {addr}: {refused}")
            await chan.refuse(refused, "limit")
            return Outcome.OK
        conn.authenticated = True
        conn.key_id, conn.key_role = auth.key_id, auth.role
        if auth.key_id is not None and self._keys is not None:
            conn.key_gen = self._keys.generation(auth.key_id, auth.role)
            if conn.key_gen is None:  # revoked while it was proving it
                await chan.refuse(f"key {auth.key_id!r} was revoked", "auth")
                return Outcome.OK
        try:
            if role == "agent":
                await self._agent_session(chan, conn, auth)
            else:
                await self._control_session(chan, conn)
        except Exception as exc:  # one connection's failure never takes the coordinator down
            first: BaseException = exc
            while isinstance(first, BaseExceptionGroup) and first.exceptions:
                first = first.exceptions[0]
            expected = (ProtocolError, UnreachableError, AuthError, trio.TooSlowError)
            if isinstance(first, CutOff):
                pass  # said when it happened
            elif isinstance(first, expected):
                log.info("connection from %s ended: %s", addr, first or type(first).__name__)
            else:
                log.error("connection from %s failed: %s: %s", addr, type(first).__name__, first)
                if role == "requester":  # told, not left with "connection closed by peer"
                    await chan.refuse(
                        f"the probe failed serving this request ({type(first).__name__}: "
                        f"{first}); its log has the details",
                        "internal",
                    )
        return Outcome.OK

    def _auth_failed(self, addr: str, why: str) -> None:
        self._auth_failures.note(f"authentication failed from {addr}: {why}")

    async def _report_suppressed(self) -> None:
        """Say how many warnings were held back, even when the burst has stopped."""
        while True:
            await trio.sleep(1.0)
            for throttle in (
                self._auth_failures,
                self._refusals,
                self._evictions,
                self._names,
                self._keyring_errors,
            ):
                throttle.flush()

    # -- keys ---------------------------------------------------------------------------

    def _lookup(self, key_id: str) -> Grant | None:
        self._refresh_keys()
        assert self._keys is not None
        return self._keys.grant(key_id)

    def _refresh_keys(self) -> None:
        keys = self._keys
        if keys is None:
            return
        try:
            changed = keys.refresh()
        except ConfigError as exc:
            self._keyring_errors.note(f"{exc}; the last good keyring stays in force")
            return
        if not changed:
            return
        n = len(keys.ring.entries)
        log.info("keyring %s changed: %d key%s", keys.path, n, "" if n == 1 else "s")
        for conn in list(self._live.values()):
            if conn.key_id is None or not conn.authenticated:
                continue
            if keys.generation(conn.key_id, conn.key_role) != conn.key_gen:
                log.warning(
                    "key %r was revoked: closing its session from %s", conn.key_id, conn.address
                )
                conn.end(f"key {conn.key_id!r} was revoked", "revoked")

    async def _watch_keyring(self) -> None:
        while True:
            await trio.sleep(KEYRING_POLL)
            self._refresh_keys()

    def _run_key(self, session: AgentSession) -> bytes | None:
        """The key the agent's per-run datagram keys derive from (its own, or the shared
        secret); looked up when a run starts rather than kept with the session."""
        if session.key_id is None:
            return self.cfg.secret
        assert self._keys is not None
        return self._keys.ring.key_for(session.key_id)

    # -- agents ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _name_lock(self, name: str) -> AsyncIterator[None]:
        lock = self._name_locks.setdefault(name, trio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and self._name_locks.get(name) is lock:
                del self._name_locks[name]

    def _name_refusal(self, reg: Register, auth: Authenticated) -> str | None:
        """Why this connection may not register ``reg.name`` (None: it may)."""
        if auth.key_id is not None:
            if reg.name != auth.key_id:
                return (
                    f"this agent proved the key of {auth.key_id!r} and cannot register as"
                    f" {reg.name!r} (run it with --name {auth.key_id})"
                )
            return None
        entry = self._keys.ring.entries.get(reg.name) if self._keys is not None else None
        if entry is not None:
            if entry.role != "agent":
                return (
                    f"{reg.name!r} is the name of an operator key in the coordinator's"
                    " keyring: give this agent another --name"
                )
            return (
                f"agent name {reg.name!r} has its own key in the coordinator's keyring:"
                " run the agent with that key file as --secret-file"
            )
        return None

    async def _agent_session(self, chan: Channel, conn: _Conn, auth: Authenticated) -> None:
        observed = conn.address
        with trio.fail_after(self.cfg.handshake_timeout):
            first = await chan.next_event()
        if not isinstance(first, Message) or first.type != "register":
            raise ProtocolError("an agent must register first")
        try:
            reg = Register.from_json(first.body)
        except MessageError as exc:
            await chan.refuse(f"registration refused: {exc}", "bad_registration")
            raise
        refused = self._name_refusal(reg, auth)
        if refused is not None:
            self._names.note(f"refused registration of {reg.name!r} from {observed}: {refused}")
            await chan.send(Error("bad_name", refused, re="register"))
            return
        name = reg.name
        async with self._name_lock(name):
            old = self.agents.get(name)
            if old is not None:
                if await old.alive(NAME_CHECK):
                    self._names.note(
                        f"agent name {name!r} is in use by the agent from {old.observed};"
                        f" refused a second registration from {observed}"
                    )
                    await chan.send(
                        Error(
                            "name_in_use",
                            f"agent name {name!r} is in use by an agent connected from"
                            f" {old.observed} since {utc(old.since)}; "
                            + (
                                "its key is for one agent: give this one a key of its own"
                                " (udpreach key add)"
                                if auth.key_id is not None
                                else "give this agent another --name"
                            ),
                            re="register",
                        )
                    )
                    return
                log.warning(
                    "agent %s: the session from %s stopped answering; the one from %s takes over",
                    name,
                    old.observed,
                    observed,
                )
                old.close_replies()
                await old.chan.aclose()
            session = AgentSession(
                name, chan, reg.address, observed, reg.ports, reg.rcvbuf, key_id=auth.key_id
            )
            self.agents[name] = session
            self._notify()
        try:
            await chan.send(Registered(observed))
            log.info(
                "agent %s registered: callback %s ports %s, observed %s%s",
                name,
                reg.address,
                ",".join(map(str, reg.ports)),
                observed,
                f", key {auth.key_id!r}" if auth.key_id else "",
            )
            if reg.address != observed:
                log.warning(
                    "agent %s registered %s but connects from %s: it is behind NAT",
                    name,
                    reg.address,
                    observed,
                )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keepalive, session)
                while True:
                    ev = await chan.next_event()
                    session.heard()
                    if isinstance(ev, Receipts):
                        session.on_receipts(ev.payload)
                    elif isinstance(ev, Message):
                        session.on_message(ev.body)
                    elif isinstance(ev, Malformed):
                        session.on_malformed(ev.reason)
        finally:
            session.close_replies()
            if self.agents.get(name) is session:
                del self.agents[name]
                self._notify()
            log.info("agent %s disconnected", name)

    async def _keepalive(self, session: AgentSession) -> None:
        """Ping an agent that has been quiet; one that stays silent too long is dropped."""
        period = self.cfg.idle_timeout / 3
        while True:
            await trio.sleep(period)
            if trio.current_time() - session.last_heard < period:
                continue
            if not await session.alive(period):
                log.warning("agent %s stopped answering; dropping it", session.name)
                await session.chan.aclose()
                return

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_agent(self, name: str, wait: float) -> AgentSession | None:
        with trio.move_on_after(max(0.0, wait)):
            while name not in self.agents:
                await self._changed.wait()
        return self.agents.get(name)

    # -- control requests ---------------------------------------------------------------------

    async def _control_session(self, chan: Channel, conn: _Conn) -> None:
        with trio.fail_after(self.cfg.handshake_timeout):
            ev = await chan.next_event()
        if not isinstance(ev, Message):
            raise ProtocolError("expected a request")
        try:
            req = parse(ev.body, FROM_REQUESTER)
        except MessageError as exc:
            code = "bad_plan" if ev.type == "run" else "bad_request"
            await chan.send(Error(code, str(exc)))
            return
        if isinstance(req, AgentsRequest):
            await chan.send(AgentList(tuple(a.describe() for a in self.agents.values())))
        elif isinstance(req, RunRequest):
            await self._run_request(chan, conn.address, req)
        else:
            await chan.send(Error("bad_request", "there is no run on this connection to cancel"))

    async def _watch_requester(self, chan: Channel, ticket: _Ticket, peer: _Peer) -> None:
        """Follow the requester during its run: a cancel stops the run (its document is
        still sent), a closed connection stops it too (then there is no one to send it to)."""
        try:
            while True:
                ev = await chan.next_event()
                if isinstance(ev, Message) and ev.type == "cancel":
                    try:
                        Cancel.from_json(ev.body)
                    except MessageError as exc:  # pragma: no cover - Cancel has no fields
                        peer.unsolicited(str(exc))
                        continue
                    if not ticket.cancelled:
                        what = ticket.execution.run_id if ticket.execution else "(not started)"
                        log.info("requester of run %s cancelled it", what)
                    ticket.cancelled = True
                    if ticket.execution is not None:
                        ticket.execution.cancel()
                    ticket.waiting.cancel()
                elif isinstance(ev, Message):
                    peer.unsolicited(f"unexpected {ev.type[:40]!r} during a run")
                else:
                    peer.unsolicited("receipts or a malformed message from a requester")
        except (UnreachableError, ProtocolError):
            ticket.gone = True
            if not ticket.answered:  # (closing once answered is what a requester does)
                what = ticket.execution.run_id if ticket.execution else "(not started)"
                log.warning("requester of run %s went away; stopping it", what)
            if ticket.execution is not None:
                ticket.execution.cancel()
            ticket.waiting.cancel()

    async def _run_request(self, chan: Channel, peer: str, req: RunRequest) -> None:
        if self._stopping is not None:  # winding down: no new run
            await chan.send(Error("stopping", f"{self._stopping}: it takes no new run"))
            return
        ticket = _Ticket()
        self._tickets.add(ticket)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_requester, chan, ticket, _Peer(f"requester {peer}"))
                try:
                    await self._serve_run(chan, peer, req, ticket)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._tickets.discard(ticket)
            self._tickets_changed.set()

    def stop_runs(self, why: str) -> int:
        """End every run in progress as its requester's cancel would, and take no new one:
        each requester still gets the document of what was settled, with "``why`` during the
        run" among its warnings (a request still waiting for its agent gets an error, "``why``
        before the run started"). Returns how many requests there were."""
        self._stopping = why
        for ticket in self._tickets:
            ticket.cancelled = True
            ticket.why = why
            if ticket.execution is not None:
                ticket.execution.cancel(f"{why} during the run")
            ticket.waiting.cancel()
        return len(self._tickets)

    async def runs_answered(self) -> None:
        """Return once every run request has been answered (the caller bounds the wait)."""
        while self._tickets:
            self._tickets_changed = trio.Event()
            await self._tickets_changed.wait()

    async def _claim(
        self, name: str, wait: float, plan_req: dict[str, Any], ticket: _Ticket
    ) -> tuple[AgentSession, Plan, list[str]] | Error:
        """The agent *name*, locked for this run, and the plan for it; or the error to send.

        Waits up to *wait* seconds for the agent to register and to be free.
        """
        deadline = trio.current_time() + wait
        checked: tuple[AgentSession, Plan, list[str]] | None = None
        session: AgentSession | None = None
        with ticket.waiting:
            while True:
                session = self.agents.get(name)
                if session is not None and not session.lost.is_set():
                    if checked is None or checked[0] is not session:
                        try:
                            plan, warnings = plan_from_request(
                                plan_req,
                                session.ports,
                                max_rate=self.cfg.max_rate,
                                max_datagrams=self.cfg.max_datagrams,
                                max_bytes=self.cfg.max_bytes,
                                header_bytes=48 if ":" in session.observed else 28,
                            )
                        except ConfigError as exc:
                            return Error("bad_plan", str(exc))
                        checked = (session, plan, warnings)
                    try:
                        session.busy.acquire_nowait()
                    except trio.WouldBlock:
                        pass
                    else:
                        session.busy_since = time.time()
                        return checked
                changed = self._changed
                if trio.current_time() >= deadline:
                    break
                with trio.move_on_at(deadline):
                    await changed.wait()
        if ticket.cancelled or ticket.gone:
            why = ticket.why or "the run request was cancelled"
            return Error("cancelled", f"{why} before the run started")
        waited = f" (waited {wait:g}s)" if wait > 0 else ""
        if session is None or session.lost.is_set():
            names = sorted(self.agents)
            if names:
                shown = ", ".join(names[:20]) + (
                    f" and {len(names) - 20} more" if len(names) > 20 else ""
                )
                listed = f"registered: {shown}"
            else:
                listed = "no agent is registered"
            return Error("unknown_agent", f"no agent named {name!r}{waited}; {listed}")
        hint = "" if wait > 0 else "; --wait SECONDS waits for it"
        return Error(
            "busy",
            f"agent {name!r} is busy with run {session.run_id or '?'} since"
            f" {utc(session.busy_since)}{waited}{hint}",
        )

    async def _serve_run(self, chan: Channel, peer: str, req: RunRequest, ticket: _Ticket) -> None:
        name = req.agent
        try:
            entries = _expect_entries(list(req.expect))
        except ConfigError as exc:
            await ticket.answer(chan, Error("bad_plan", str(exc)))
            return
        claimed = await self._claim(name, min(req.wait, MAX_WAIT), req.plan.to_json(), ticket)
        if isinstance(claimed, Error):
            if not ticket.gone:
                await ticket.answer(chan, claimed)
            return
        session, plan, warnings = claimed
        try:
            doc = await self._execute(chan, peer, session, plan, warnings, ticket)
        finally:
            session.run_id = session.busy_since = None
            session.busy.release()
            self._notify()
        if doc is None:
            return
        if entries:
            from udpreach.core.expect import judge

            doc["expect"] = [e.to_json() for e in entries]
            doc["deviations"] = judge(doc, entries)
            if self.store is not None:
                _GuardedStore(self.store).finish(doc["run_id"], doc)
        log.info(
            "run %s against %s done: %s",
            doc["run_id"],
            name,
            ", ".join(f"{k} {v}" for k, v in doc["summary"].items()),
        )
        if ticket.gone:
            return
        text = json.dumps(doc, separators=(",", ":"))
        for i in range(0, len(text), RESULT_CHUNK):
            await chan.send(ResultPart(text[i : i + RESULT_CHUNK]))
        await ticket.answer(chan, ResultEnd(bool(doc["complete"])))

    async def _execute(
        self,
        chan: Channel,
        peer: str,
        session: AgentSession,
        plan: Plan,
        warnings: list[str],
        ticket: _Ticket,
    ) -> dict[str, Any] | None:
        """Run *plan* against *session* (locked by the caller); the document, or None when
        the run could not start (the requester has been told why)."""
        target, twarn = self._target_for(session)
        warnings += twarn
        try:
            source = self.cfg.source or route_source(target)
        except OSError as exc:
            await ticket.answer(chan, Error("no_route", f"no route to {target}: {exc}"))
            return None
        key = self._run_key(session)
        if key is None:
            await ticket.answer(
                chan, Error("revoked", f"the key of agent {session.name!r} was revoked")
            )
            return None

        async def progress(body: dict[str, Any]) -> None:
            if ticket.gone:
                return
            try:
                msg = Progress.from_json(body)
            except MessageError as exc:  # never let a progress line end a run
                log.debug("progress not sent: %s", exc)
                return
            await chan.send(msg)

        execution = RunExecution(
            session=session,
            plan=plan,
            secret=key,
            source=source,
            target=target,
            progress=progress,
            store=_GuardedStore(self.store) if self.store is not None else None,
            warnings=warnings,
            sender_factory=self._sender_factory,
            rate_cap=lambda: self._rate_share(plan.size + (48 if ":" in target else 28)),
            settings=SweepSettings(
                max_datagrams=self.cfg.max_datagrams,
                max_bytes=self.cfg.max_bytes,
                max_delay=plan.max_delay,
                icmp_budget=plan.icmp_budget,
            ),
        )
        del key
        session.run_id = execution.run_id
        ticket.execution = execution
        if ticket.cancelled or ticket.gone:
            execution.cancel(None if ticket.why is None else f"{ticket.why} during the run")
        log.info("run requested by %s against agent %s: %d cells", peer, session.name, plan.cells)
        self.active_runs += 1
        try:
            return await execution.execute()
        finally:
            self.active_runs -= 1

    def _rate_share(self, datagram_bytes: int) -> float:
        """--max-rate and --max-bytes-rate are global: concurrent runs share them (in
        datagrams per second, for datagrams of this many bytes on the wire)."""
        ceiling = min(self.cfg.max_rate, self.cfg.max_bytes_rate / max(1, datagram_bytes))
        return ceiling / max(1, self.active_runs)

    def _sender_factory(self, source: str, target: str, linger: float) -> Any:
        try:
            from probe.raw import make_sender
        except ImportError:  # pragma: no cover - raw mode ships with the package
            from probe.sender import BindSender

            return BindSender(source, target, linger=linger)
        return make_sender(self.cfg.send_mode, source, target, linger)

    def _target_for(self, session: AgentSession) -> tuple[str, list[str]]:
        """Where the probe may send: never anywhere the agent's own connection did not come from.

        The registered callback address is used only when it is the address the coordinator
        observed, or the operator allowed it explicitly (--allow-target); otherwise anyone with
        the secret could aim the probe at a third party.
        """
        reg, obs = session.registered, session.observed
        if reg == obs:
            return obs, []
        try:
            ip = ipaddress.ip_address(reg)
            allowed = any(ip in net for net in self.cfg.allow_targets)
        except ValueError:
            allowed = False
        if allowed:
            return reg, [f"sending to the registered address {reg} (allowed by --allow-target)"]
        return obs, [
            f"agent registered callback address {reg} but connects from {obs} (NAT): "
            f"probing the observed address {obs}; a mail server would send to {reg} and fail"
        ]


def _raise_open_files() -> None:
    """Hold as many connections as the hard limit allows (the soft one is often 1024)."""
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _expect_entries(raw: list[Any]) -> list[Any]:
    if not raw:
        return []
    from udpreach.core.expect import ExpectEntry

    try:
        return [ExpectEntry.from_json(e) for e in raw]
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"malformed expectations: {exc}") from None
