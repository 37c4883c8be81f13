"""The agent's trio shell: UDP listeners and the control connection to the coordinator.

The agent binds its UDP ports first (as a mail client does at start-up), then logs on to the
coordinator, registers its callback address and stays connected, reconnecting with
exponential backoff. Listeners drain their socket without awaiting between datagrams (read
until it would block, then wait for readability) and hand every datagram to the sync core;
receipts go to the coordinator in batches, on a short timer or when asked to flush. The agent
never sends UDP: its sockets are only ever read.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import random
import secrets
from dataclasses import dataclass, field
from typing import Any

import trio

from agent.core import AgentCore
from agent.listen import DRAIN_CHUNK as DRAIN_CHUNK
from agent.listen import (
    DRAIN_MAX,
    RCVBUF_WANTED,
    FragmentCounters,
    Listener,
    coalesce_wait,
    drain,
    fragment_counters,
    normalize_addr,
    open_listeners,
)
from udpreach.core.datagram import TokenCodec, derive_run_key
from udpreach.core.errors import (
    AuthError,
    ConfigError,
    ProtocolError,
    UdpreachError,
    UnreachableError,
)
from udpreach.core.errors import leaves as error_leaves
from udpreach.core.framing import Malformed, Message, client_key, parse_key_text
from udpreach.core.messages import (
    REPLY_TO,
    TO_AGENT,
    AgentStats,
    Error,
    Flush,
    Flushed,
    MessageError,
    Ping,
    Pong,
    Register,
    Registered,
    RunDone,
    RunEnd,
    RunReady,
    RunStart,
    Tick,
    parse,
)
from udpreach.keyring import forbid_core_dumps
from udpreach.net.channel import Channel, connect

log = logging.getLogger("udpreach.agent")

FLUSH_INTERVAL = 0.01
COORDINATOR_SILENCE = 120.0  # the coordinator pings every 30 s when idle, ticks every 10 s in runs
BAD_MESSAGES = 50  # malformed messages from the coordinator before the agent reconnects


class NameInUseError(UdpreachError):
    """The coordinator refused our name: another agent that answers holds it, or our key
    is for another name (retrying would not help)."""


@dataclass
class AgentConfig:
    host: str
    port: int
    secret: bytes
    ports: tuple[int, ...]
    name: str
    listen: str | None = None
    connect_timeout: float = 5.0
    backoff_max: float = 10.0
    once: bool = False  # tests: give up instead of reconnecting


@dataclass
class AgentState:
    core: AgentCore = field(default_factory=AgentCore)
    listeners: list[Listener] = field(default_factory=list)
    chan: Channel | None = None
    connected_since: float | None = None
    registrations: int = 0
    bad_messages: int = 0  # in this session
    last_warning: float = float("-inf")
    frag_base: FragmentCounters | None = None  # the host's fragment counters at the run's start
    flush_wake: list[trio.Event] | None = None  # the session's flusher's wake-up (see _flusher)
    source: str | None = None  # the control connection's source address (callback_source)


def reconnect_delay(backoff: float, ceiling: float, draw: float) -> float:
    """The wait before logging on again: ``backoff`` jittered by half either way (agents
    that lost one coordinator do not all come back at once, ``draw`` in [0, 1)), never past
    ``ceiling`` (the README's "up to 10 s apart")."""
    return min(ceiling, backoff * (0.5 + draw))


def drain_all(state: AgentState) -> None:
    for li in state.listeners:
        while drain(state, li) == DRAIN_MAX:
            pass


async def _receive_loop(state: AgentState, listener: Listener, wake: list[trio.Event]) -> None:
    last = float("-inf")
    while True:
        await trio.lowlevel.wait_readable(listener.sock)
        now = trio.current_time()
        read = drain(state, listener)
        run = state.core.current
        if run is None:
            continue
        if run.needs_flush():
            wake[0].set()
        if listener.batch is None:
            continue  # recvfrom, one at a time (not Linux): no pauses (see coalesce_wait)
        # Fewer, fuller reads while a run's datagrams trickle in (see coalesce_wait).
        pause = coalesce_wait(read, now - last, listener.rcvbuf, run.codec.size)
        last = now
        if pause:
            await trio.sleep(pause)


async def _send_batches(state: AgentState, chan: Channel) -> None:
    run = state.core.current
    if run is None:
        return
    for payload in run.take_batches():
        await chan.send_receipts(payload)


async def _flusher(state: AgentState, chan: Channel, wake_box: list[trio.Event]) -> None:
    """Send receipts every FLUSH_INTERVAL during a run, or at once when a listener wakes it
    (a batch is full). Between runs it sleeps until a run starts: an idle agent, which may
    run for months on a client, never wakes (it woke 100 times a second)."""
    while True:
        if state.core.current is None:
            await wake_box[0].wait()  # set when a run starts
        else:
            with trio.move_on_after(FLUSH_INTERVAL):
                await wake_box[0].wait()
        wake_box[0] = trio.Event()
        await _send_batches(state, chan)


def _stats(state: AgentState, run: Any) -> AgentStats | None:
    if run is None:
        return None
    stats = AgentStats.from_json(run.stats())
    now, base = fragment_counters(), state.frag_base
    if now is not None and base is not None:
        stats = dataclasses.replace(
            stats,
            reassembly_failures=now.lost_since(base),
            reassembly_timeouts=now.timeouts_since(base),
        )
    return stats


async def _refuse_message(state: AgentState, chan: Channel, mtype: Any, why: str) -> None:
    """Answer a message from the coordinator that does not hold up, and go on; past
    BAD_MESSAGES in one session, give up on the session (the agent reconnects)."""
    state.bad_messages += 1
    now = trio.current_time()
    if now - state.last_warning >= 1.0:
        state.last_warning = now
        log.warning("refused a message from the coordinator: %s", why)
    if state.bad_messages > BAD_MESSAGES:
        raise ProtocolError(f"the coordinator sent {state.bad_messages} malformed messages")
    re = mtype if isinstance(mtype, str) and mtype in REPLY_TO else None
    await chan.send(Error("bad_message", why[:500], re=re))


async def _handle(
    state: AgentState, cfg: AgentConfig, chan: Channel, msg: Message | Malformed
) -> None:
    """Act on one message from the coordinator (checked here: a malformed one is answered
    with an error naming what is wrong, never a crash)."""
    if isinstance(msg, Malformed):
        await _refuse_message(state, chan, None, f"malformed message ({msg.reason})")
        return
    try:
        typed = parse(msg.body, TO_AGENT)
    except MessageError as exc:
        await _refuse_message(state, chan, msg.body.get("type"), str(exc))
        return
    core = state.core
    if isinstance(typed, RunStart):
        drain_all(state)
        await _send_batches(state, chan)
        nonce_a = secrets.token_bytes(16)
        key = derive_run_key(client_key(cfg.secret), typed.run_id, typed.nonce, nonce_a)
        core.start_run(typed.run_id, TokenCodec(key, typed.size))
        del key
        if state.flush_wake is not None:
            state.flush_wake[0].set()  # the flusher's timer runs again
        state.frag_base = fragment_counters()
        log.info("run %s started by the coordinator (%d-byte datagrams)", typed.run_id, typed.size)
        await chan.send(RunReady(typed.run_id, nonce_a))
    elif isinstance(typed, Flush):
        drain_all(state)
        await _send_batches(state, chan)
        await chan.send(Flushed(typed.seq, _stats(state, core.current)))
    elif isinstance(typed, RunEnd):
        drain_all(state)
        await _send_batches(state, chan)
        run = core.end_run()
        if run is not None:
            log.info(
                "run %s ended: %d accepted, rejected %s",
                run.run_id,
                run.accepted,
                dict(run.rejected) or "none",
            )
        await chan.send(RunDone(typed.run_id, _stats(state, run)))
    elif isinstance(typed, Ping):
        await chan.send(Pong(typed.seq))
    elif isinstance(typed, Error):
        raise ProtocolError(f"coordinator: {typed.message[:200]}")
    elif isinstance(typed, Tick | Registered):
        log.debug("ignoring control message %r", typed.TYPE)


def callback_source(bound: str, host: str, listen: str | None = None) -> str | None:
    """Where the control connection must leave from, given the address the listeners are
    bound to (``bound``, as ``getsockname`` gives it). The coordinator registers the address
    a connection comes from (as a mail server does), so an agent that listens on one address
    of a multi-homed host, or on 127.0.0.3, and connected from another would have its
    datagrams sent where nothing listens. None: any source will do (``::`` takes both
    families).

    Raises:
        ConfigError: the listening address cannot take datagrams to any address the agent
            could register with this coordinator (another address family).
    """
    ip = ipaddress.ip_address(normalize_addr(bound))  # IPv4-mapped: the IPv4 it stands for
    try:
        peer: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(
            host.split("%", 1)[0]
        )
    except ValueError:
        peer = None  # a coordinator by name: its address family is known once connected
    shown = listen or str(ip)
    if ip.is_unspecified:
        if ip.version == 6:
            return None  # dual-stack: both families arrive
        if peer is not None and peer.version == 6:
            raise ConfigError(
                f"--listen {shown} takes IPv4 only and the coordinator {host} is IPv6: the "
                "agent registers the address it connects from (listen on :: for both)"
            )
        return "0.0.0.0" if peer is None else None  # by name: reached over IPv4 only
    if peer is not None and peer.version != ip.version:
        raise ConfigError(
            f"--listen {shown} is IPv{ip.version} and the coordinator {host} is IPv"
            f"{peer.version}: an agent registers the address it connects from, so it listens "
            "on an address of the coordinator's family (or on all addresses: leave out --listen)"
        )
    if listen and "%" in listen and ip.is_link_local:
        return listen  # the scope the user named, for the kernel to bind with
    return str(ip)


async def _session(state: AgentState, cfg: AgentConfig) -> None:
    chan = await connect(
        cfg.host,
        cfg.port,
        cfg.secret,
        "agent",
        cfg.connect_timeout,
        local_address=state.source,
    )
    try:
        sockname = chan.stream.socket.getsockname()  # type: ignore[attr-defined]
        local = normalize_addr(sockname[0])
        ports = tuple(li.port for li in state.listeners)
        await chan.send(Register(cfg.name, local, ports, min(li.rcvbuf for li in state.listeners)))
        with trio.fail_after(cfg.connect_timeout):
            reply = await chan.next_message()
        try:
            answer = parse(reply.body, {"registered": Registered, "error": Error})
        except MessageError as exc:
            raise ProtocolError(f"registration: {exc}") from None
        if isinstance(answer, Error):
            if answer.code in ("name_in_use", "bad_name"):
                raise NameInUseError(answer.message)
            raise ProtocolError(f"registration refused: {answer.message}")
        assert isinstance(answer, Registered)
        observed = answer.observed
        state.chan = chan
        state.bad_messages = 0
        state.connected_since = trio.current_time()
        state.registrations += 1
        log.info(
            "registered as %r: callback %s ports %s (coordinator sees us as %s)",
            cfg.name,
            local,
            ",".join(str(li.port) for li in state.listeners),
            observed,
        )
        if observed != local:
            log.warning(
                "the coordinator sees this agent as %s, not %s: a NAT sits in between, "
                "so a mail server would send its notifications to the wrong address",
                observed,
                local,
            )
        wake_box = [trio.Event()]
        state.flush_wake = wake_box
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_flusher, state, chan, wake_box)
                for li in state.listeners:
                    nursery.start_soon(_receive_loop, state, li, wake_box)
                while True:
                    # The coordinator pings an idle agent and ticks during long runs; total
                    # silence means a dead or half-open connection: reconnect.
                    try:
                        with trio.fail_after(COORDINATOR_SILENCE):
                            ev = await chan.next_event()
                    except trio.TooSlowError:
                        raise UnreachableError(
                            f"coordinator silent for {COORDINATOR_SILENCE:g}s"
                        ) from None
                    if isinstance(ev, Message | Malformed):
                        await _handle(state, cfg, chan, ev)
                    else:
                        await _refuse_message(state, chan, None, "unexpected frame")
        except BaseExceptionGroup as group:
            # The nursery wraps even one failure in a group; the reconnect loop decides on
            # the failure itself (a lost connection is retried, anything else is not).
            failure = _session_failure(group)
            if failure is None:
                raise
            raise failure from None
    finally:
        state.chan = None
        state.flush_wake = None
        state.core.end_run()
        await chan.aclose()


_SESSION_FAILURES = (UnreachableError, ProtocolError, AuthError, trio.TooSlowError, OSError)


def _session_failure(group: BaseExceptionGroup[Any]) -> BaseException | None:
    """The first expected failure in *group* if that is all it holds (Cancelled aside),
    else None (the group is then re-raised as it is)."""
    leaves = error_leaves(group)
    failures = [e for e in leaves if not isinstance(e, trio.Cancelled)]
    if failures and all(isinstance(e, _SESSION_FAILURES) for e in failures):
        return failures[0]
    return None


async def run_agent(
    cfg: AgentConfig, *, task_status: trio.TaskStatus[list[int]] = trio.TASK_STATUS_IGNORED
) -> None:
    """Listen, log on, serve runs; reconnect with backoff until cancelled.

    Raises:
        ConfigError: the ports cannot be bound, or the key file is not this agent's.
        AuthError: the coordinator refused our secret (retrying would not help).
        NameInUseError: another agent that answers holds our name.
    """
    forbid_core_dumps()
    identity = parse_key_text(cfg.secret)
    if identity is not None and identity.role != "agent":
        raise ConfigError(
            f"the key file holds the operator key of {identity.name!r}; an agent needs its own"
            " agent key (udpreach key add NAME on the coordinator's host)"
        )
    if identity is not None and identity.name != cfg.name:
        raise ConfigError(
            f"--name {cfg.name!r} does not match the key file, which is the key of agent "
            f"{identity.name!r}"
        )
    listen = cfg.listen or ("::" if ":" in cfg.host else "0.0.0.0")
    state = AgentState()
    state.listeners = open_listeners(cfg.ports, listen)
    try:
        # Where it connects from, for the callback it registers (a name is bound once, to
        # the address it resolved to); an address that cannot be registered fails here.
        bound = str(state.listeners[0].sock.getsockname()[0])
        state.source = callback_source(bound, cfg.host, cfg.listen)
        granted = min(li.rcvbuf for li in state.listeners)
        if granted < 8 * 1024 * 1024:
            log.warning(
                "receive buffer is %d KiB (asked for %d MiB): fast sweeps may lose datagrams; "
                "raise net.core.rmem_max or run as root",
                granted // 1024,
                RCVBUF_WANTED // (1024 * 1024),
            )
        task_status.started([li.port for li in state.listeners])
        backoff = 0.25
        while True:
            started = trio.current_time()
            try:
                await _session(state, cfg)
            except (AuthError, NameInUseError):
                raise
            except (UnreachableError, ProtocolError, trio.TooSlowError, OSError) as exc:
                if cfg.once:
                    raise
                if trio.current_time() - started > 30:
                    backoff = 0.25
                delay = reconnect_delay(backoff, cfg.backoff_max, random.random())
                log.warning("%s; reconnecting in %.1fs", exc, delay)
                await trio.sleep(delay)
                backoff = min(cfg.backoff_max, backoff * 2)
    finally:
        for li in state.listeners:
            li.sock.close()
