"""The coordinator: the control endpoint that agents register with and runs are asked of.

It runs with the probe (``udpreach probe``). Every connection must authenticate before it
can say anything; then it is either an agent session (registered callback address, kept
open, receipts flowing in) or a control session (one request: list agents, or run a plan
against one agent and stream progress and the result back). Limits keep one bad client from
hurting the others: a handshake deadline, a cap on connections in total and per address,
and an idle deadline on agent sessions (they ping).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import re
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from probe.runner import RunExecution
from probe.sender import route_source
from udpreach.core.errors import (
    AgentUnavailableError,
    AuthError,
    ConfigError,
    ProtocolError,
    UnreachableError,
)
from udpreach.core.framing import ControlConnection, Message, Receipts
from udpreach.core.plan import plan_from_request
from udpreach.net.channel import Channel

log = logging.getLogger("udpreach.coordinator")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RESULT_CHUNK = 1 << 20


@dataclass
class ProbeConfig:
    host: str
    port: int
    secret: bytes
    db: str | None = None
    source: str | None = None
    max_rate: int = 1_000_000
    max_datagrams: int = 50_000_000
    allow_targets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(default_factory=list)
    handshake_timeout: float = 5.0
    idle_timeout: float = 90.0
    max_connections: int = 256
    max_per_address: int = 32
    use_store: bool = True
    send_mode: str = "auto"


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
            log.warning("%d more %s suppressed", self.suppressed, self.what)
            self.last = time.monotonic()
            self.suppressed = 0


class AgentSession:
    """A registered agent, as seen from the coordinator."""

    def __init__(
        self,
        name: str,
        chan: Channel,
        registered: str,
        observed: str,
        ports: tuple[int, ...],
        rcvbuf: int,
    ) -> None:
        self.name = name
        self.chan = chan
        self.registered = registered
        self.observed = observed
        self.ports = ports
        self.rcvbuf = rcvbuf
        self.since = time.time()
        self.lost = trio.Event()
        self.busy = trio.Lock()
        self.sink: Callable[[bytes], None] | None = None
        self._replies_send, self._replies = trio.open_memory_channel[dict[str, Any]](256)

    def deliver(self, body: dict[str, Any]) -> None:
        try:
            self._replies_send.send_nowait(body)
        except trio.WouldBlock:
            log.warning("agent %s: dropping unsolicited %r", self.name, body.get("type"))

    def close_replies(self) -> None:
        self._replies_send.close()

    async def send(self, body: dict[str, Any]) -> None:
        if self.lost.is_set():
            raise AgentUnavailableError(f"agent {self.name!r} was lost")
        try:
            await self.chan.send(body)
        except UnreachableError:
            raise AgentUnavailableError(f"agent {self.name!r} was lost") from None

    async def expect(
        self, mtype: str, within: float, check: Callable[[dict[str, Any]], bool] | None = None
    ) -> dict[str, Any]:
        """The next reply of type *mtype* (others are skipped), waiting at most *within* s.

        Raises:
            AgentUnavailableError: the agent went away or did not answer in time.
        """
        try:
            with trio.fail_after(within):
                while True:
                    body = await self._replies.receive()
                    if body.get("type") == mtype and (check is None or check(body)):
                        return body
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise AgentUnavailableError(f"agent {self.name!r} was lost during the run") from None
        except trio.TooSlowError:
            raise AgentUnavailableError(
                f"agent {self.name!r} did not answer within {within:g}s"
            ) from None

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "registered": self.registered,
            "observed": self.observed,
            "ports": list(self.ports),
            "since": self.since,
            "busy": self.busy.locked(),
            "rcvbuf": self.rcvbuf,
        }


class Coordinator:
    """Agent registry, control endpoint and run dispatcher."""

    def __init__(self, cfg: ProbeConfig, store: Any = None) -> None:
        self.cfg = cfg
        self.store = store
        self.agents: dict[str, AgentSession] = {}
        self._changed = trio.Event()
        self._conns = 0
        self._per_addr: dict[str, int] = defaultdict(int)
        self.active_runs = 0
        self._auth_failures = _Throttled("authentication failures")
        self._refusals = _Throttled("refused connections")

    # -- serving ------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[tuple[str, int]]) -> None:
        """Listen on the control endpoint; ``task_status.started`` gets the bound address."""
        try:
            listeners = await trio.open_tcp_listeners(self.cfg.port, host=self.cfg.host)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {self.cfg.host}:{self.cfg.port}: {exc.strerror or exc}"
            ) from None
        sockname = listeners[0].socket.getsockname()
        log.info("coordinator listening on %s:%d", sockname[0], sockname[1])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._handle, listeners)
            nursery.start_soon(self._report_suppressed)
            task_status.started((sockname[0], sockname[1]))

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
        if self._conns >= self.cfg.max_connections or (
            self._per_addr[addr] >= self.cfg.max_per_address
        ):
            self._refusals.note(f"refusing connection from {addr}: too many connections")
            await stream.aclose()
            return
        self._conns += 1
        self._per_addr[addr] += 1
        chan = Channel(stream, ControlConnection("server", self.cfg.secret))
        try:
            try:
                with trio.fail_after(self.cfg.handshake_timeout):
                    purpose = await chan.server_handshake()
            except AuthError:
                self._auth_failed(addr, "wrong secret")
                return
            except trio.TooSlowError:
                self._auth_failed(addr, "handshake timed out")
                return
            except (ProtocolError, UnreachableError) as exc:
                self._auth_failed(addr, str(exc))
                return
            if purpose == "agent":
                await self._agent_session(chan, addr)
            else:
                await self._control_session(chan, addr)
        except Exception as exc:  # one connection's failure never takes the coordinator down
            first: BaseException = exc
            while isinstance(first, BaseExceptionGroup) and first.exceptions:
                first = first.exceptions[0]
            if isinstance(first, (ProtocolError, UnreachableError, AuthError, trio.TooSlowError)):
                log.info("connection from %s ended: %s", addr, first or type(first).__name__)
            else:
                log.error("connection from %s failed: %s: %s", addr, type(first).__name__, first)
        finally:
            self._conns -= 1
            self._per_addr[addr] -= 1
            if self._per_addr[addr] <= 0:
                del self._per_addr[addr]
            await chan.aclose()

    def _auth_failed(self, addr: str, why: str) -> None:
        self._auth_failures.note(f"authentication failed from {addr}: {why}")

    async def _report_suppressed(self) -> None:
        """Say how many warnings were held back, even when the burst has stopped."""
        while True:
            await trio.sleep(1.0)
            self._auth_failures.flush()
            self._refusals.flush()

    # -- agents ---------------------------------------------------------------------------

    async def _agent_session(self, chan: Channel, observed: str) -> None:
        with trio.fail_after(self.cfg.handshake_timeout):
            msg = await chan.next_message()
        if msg.type != "register":
            raise ProtocolError("an agent must register first")
        name, registered, ports, rcvbuf = _parse_registration(msg.body)
        session = AgentSession(name, chan, registered, observed, ports, rcvbuf)
        old = self.agents.get(name)
        if old is not None:
            log.info("agent %s re-registered; closing its old session", name)
            old.lost.set()
            old.close_replies()
            await old.chan.aclose()
        self.agents[name] = session
        self._notify()
        await chan.send({"type": "registered", "observed": observed})
        log.info(
            "agent %s registered: callback %s ports %s, observed %s",
            name,
            registered,
            ",".join(map(str, ports)),
            observed,
        )
        if registered != observed:
            log.warning(
                "agent %s registered %s but connects from %s: it is behind NAT",
                name,
                registered,
                observed,
            )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keepalive, session)
                while True:
                    ev = await chan.next_event()
                    if isinstance(ev, Receipts):
                        if session.sink is not None:
                            session.sink(ev.payload)
                    elif isinstance(ev, Message):
                        session.deliver(ev.body)
        finally:
            session.lost.set()
            session.close_replies()
            if self.agents.get(name) is session:
                del self.agents[name]
                self._notify()
            log.info("agent %s disconnected", name)

    async def _keepalive(self, session: AgentSession) -> None:
        """Ping an idle agent; a session that stays silent too long is dropped."""
        seq = 0
        while True:
            await trio.sleep(self.cfg.idle_timeout / 3)
            if session.busy.locked():
                continue
            seq += 1
            await session.send({"type": "ping", "seq": seq})
            try:
                await session.expect("pong", self.cfg.idle_timeout / 3)
            except AgentUnavailableError:
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

    async def _control_session(self, chan: Channel, peer: str) -> None:
        with trio.fail_after(self.cfg.handshake_timeout):
            msg = await chan.next_message()
        if msg.type == "agents":
            await chan.send(
                {"type": "agents", "agents": [a.describe() for a in self.agents.values()]}
            )
            return
        if msg.type != "run":
            raise ProtocolError(f"unknown request {msg.type!r}")
        await self._run_request(chan, peer, msg.body)

    async def _supervise(self, chan: Channel, execution: RunExecution) -> dict[str, Any] | None:
        """Run *execution*; stop it if its requester goes away (then there is no document)."""
        doc: dict[str, Any] | None = None
        async with trio.open_nursery() as nursery:

            async def watch_requester() -> None:
                # {"type": "cancel"}: stop early and still send the (incomplete) document.
                with contextlib.suppress(UnreachableError, ProtocolError):
                    while True:
                        ev = await chan.next_event()
                        if not (isinstance(ev, Message) and ev.type == "cancel"):
                            break
                        log.info("requester of run %s cancelled it", execution.run_id)
                        execution.cancel()
                log.warning("requester of run %s went away; stopping it", execution.run_id)
                nursery.cancel_scope.cancel()

            async def do_run() -> None:
                nonlocal doc
                doc = await execution.execute()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_requester)
            nursery.start_soon(do_run)
        return doc

    def _rate_share(self) -> float:
        """--max-rate is global: concurrent runs share it."""
        return self.cfg.max_rate / max(1, self.active_runs)

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

    async def _run_request(self, chan: Channel, peer: str, req: dict[str, Any]) -> None:
        name = str(req.get("agent", ""))
        wait = float(req.get("wait") or 0)
        session = await self.wait_agent(name, min(wait, 3600.0))
        if session is None:
            await chan.send(
                {"type": "error", "code": "unknown_agent", "message": f"no agent named {name!r}"}
            )
            return
        try:
            plan, warnings = plan_from_request(
                req.get("plan") or {},
                session.ports,
                max_rate=self.cfg.max_rate,
                max_datagrams=self.cfg.max_datagrams,
            )
            entries = _expect_entries(req.get("expect"))
        except ConfigError as exc:
            await chan.send({"type": "error", "code": "bad_plan", "message": str(exc)})
            return
        if session.busy.locked():
            await chan.send({"type": "error", "code": "busy", "message": f"agent {name!r} is busy"})
            return
        target, twarn = self._target_for(session)
        warnings += twarn
        try:
            source = self.cfg.source or route_source(target)
        except OSError as exc:
            await chan.send(
                {"type": "error", "code": "no_route", "message": f"no route to {target}: {exc}"}
            )
            return

        async def progress(body: dict[str, Any]) -> None:
            await chan.send(body)

        log.info("run requested by %s against agent %s: %d cells", peer, name, plan.cells)
        async with session.busy:
            execution = RunExecution(
                session=session,
                plan=plan,
                secret=self.cfg.secret,
                source=source,
                target=target,
                progress=progress,
                store=self.store,
                warnings=warnings,
                sender_factory=self._sender_factory,
                max_datagrams=self.cfg.max_datagrams,
                rate_cap=self._rate_share,
            )
            self.active_runs += 1
            try:
                doc = await self._supervise(chan, execution)
            finally:
                self.active_runs -= 1
        if doc is None:
            return
        if entries:
            from udpreach.core.expect import judge

            doc["expect"] = [e.to_json() for e in entries]
            doc["deviations"] = judge(doc, entries)
            if self.store is not None:
                self.store.finish(doc["run_id"], doc)
        text = json.dumps(doc, separators=(",", ":"))
        for i in range(0, len(text), RESULT_CHUNK):
            await chan.send({"type": "result_part", "data": text[i : i + RESULT_CHUNK]})
        await chan.send({"type": "result_end", "complete": doc["complete"]})
        log.info(
            "run %s against %s done: %s",
            doc["run_id"],
            name,
            ", ".join(f"{k} {v}" for k, v in doc["summary"].items()),
        )


def _parse_registration(body: dict[str, Any]) -> tuple[str, str, tuple[int, ...], int]:
    name = body.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ProtocolError("registration: bad agent name")
    address = body.get("address")
    try:
        registered = str(ipaddress.ip_address(str(address)))
    except ValueError:
        raise ProtocolError("registration: bad callback address") from None
    ports = body.get("ports")
    if (
        not isinstance(ports, list)
        or not 1 <= len(ports) <= 1024
        or not all(isinstance(p, int) and 1 <= p <= 65535 for p in ports)
    ):
        raise ProtocolError("registration: bad port list")
    rcvbuf = body.get("rcvbuf")
    return name, registered, tuple(sorted(set(ports))), rcvbuf if isinstance(rcvbuf, int) else 0


def _expect_entries(raw: Any) -> list[Any]:
    if not raw:
        return []
    from udpreach.core.expect import ExpectEntry

    if not isinstance(raw, list):
        raise ConfigError("malformed expectations")
    try:
        return [ExpectEntry.from_json(e) for e in raw]
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"malformed expectations: {exc}") from None
