"""The requesting side of the control channel without trio: what ``udpreach run`` and
``udpreach agents`` use.

Theory of operation: a request is one TCP connection, a handshake, one request and a stream
of answers; nothing else happens at the same time in the requesting process. So the CLI
drives the sans-IO ``ControlConnection`` with a plain blocking socket whose every read has a
deadline, and never imports trio (about a quarter of a second of start-up on a small
machine). The interpretation of the coordinator's answers (``RunReply``, ``agents_from``) is
shared with the trio client in ``udpreach.net.client``, which the services' tests and library
users drive from inside a trio program.
"""

from __future__ import annotations

import contextlib
import random
import select
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from types import FrameType, TracebackType
from typing import Any

from udpreach.core.errors import (
    AgentUnavailableError,
    ConfigError,
    ConnectionLostError,
    ProtocolError,
    UdpreachError,
    UnreachableError,
)
from udpreach.core.framing import (
    Authenticated,
    ConnectionLimitError,
    ControlConnection,
    Event,
    Message,
)
from udpreach.core.messages import (
    TO_REQUESTER,
    AgentList,
    Error,
    Progress,
    ResultEnd,
    ResultPart,
    check_document,
    loads,
    parse,
)
from udpreach.net import hostport

CONNECT_TIMEOUT = 10.0
LIMIT_RETRIES = 4
STALL_TIMEOUT = 60.0  # no word from the coordinator for this long during a run: give up
CANCEL_GRACE = 5.0  # after Ctrl-C, how long to wait for the coordinator's partial document
READ_SIZE = 65536


class RunInterruptedError(UdpreachError):
    """The user interrupted a run before its document could be had (exit 3)."""


class RunReply:
    """What the coordinator answers to a ``run`` request, message by message (sans-IO)."""

    def __init__(self, on_progress: Callable[[dict[str, Any]], None]) -> None:
        self._on_progress = on_progress
        self._parts: list[str] = []
        self.run_id: str | None = None  # from the first progress message

    def feed(self, msg: Message) -> dict[str, Any] | None:
        """Take one message; the run document once it is complete, else None.

        Raises:
            ConfigError: the coordinator refused the plan (exit 2).
            AgentUnavailableError: unknown or busy agent (exit 3).
            UnreachableError: any other refusal (exit 3).
            ProtocolError: a malformed message or result (exit 3).
        """
        typed = parse(msg.body, TO_REQUESTER)  # MessageError is a ProtocolError
        if isinstance(typed, Progress):
            body = typed.to_json()
            if self.run_id is None and isinstance(body.get("run_id"), str):
                self.run_id = body["run_id"]
            self._on_progress(body)
        elif isinstance(typed, ResultPart):
            self._parts.append(typed.data)
        elif isinstance(typed, ResultEnd):
            try:
                doc = loads("".join(self._parts))
            except ValueError:
                raise ProtocolError("coordinator sent a malformed result (not JSON)") from None
            return check_document(doc)
        elif isinstance(typed, Error):
            text = typed.message or "refused"
            if typed.code == "bad_plan":
                raise ConfigError(text)
            if typed.code in ("unknown_agent", "busy"):
                raise AgentUnavailableError(text)
            raise UnreachableError(f"coordinator: {text}")
        else:
            raise ProtocolError(f"unexpected {typed.TYPE!r} message during a run")
        return None


def run_request(
    agent: str, plan: dict[str, Any], wait: float, expect: list[Any] | None
) -> dict[str, Any]:
    return {"type": "run", "agent": agent, "plan": plan, "wait": wait, "expect": expect or []}


def agents_from(msg: Message) -> list[dict[str, Any]]:
    """The agent list in the coordinator's answer to an ``agents`` request."""
    typed = parse(msg.body, TO_REQUESTER)
    if isinstance(typed, Error):
        raise UnreachableError(f"coordinator: {typed.message or 'refused'}")
    if not isinstance(typed, AgentList):
        raise ProtocolError("unexpected answer to the agents request")
    return [a.to_json() for a in typed.agents]


#: SIGINTs closer together than this count as one (see ``Interrupts``).
SIGINT_SAME = 0.05


#: What interrupts a run: Ctrl-C, and SIGTERM (``timeout`` in a CI job, ``kill``, a service
#: manager): each asks the coordinator to stop the run and prints what was settled, so that
#: a pipeline still gets its document (or, with --json, an error document).
INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While the body runs (in the main thread), SIGTERM raises KeyboardInterrupt as Ctrl-C
    does: before a run has started (dialling, the handshake: up to CONNECT_TIMEOUT with a
    silent coordinator) a ``timeout`` still ends ``run`` with its one line and exit 3, and
    with --json its error document. ``Interrupts`` takes SIGTERM over during the run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class Interrupts:
    """Counts SIGINTs and SIGTERMs while active and wakes a waiting ``select`` when one
    arrives.

    The handler only counts: the requester decides at a safe point what an interrupt means
    (ask the coordinator to cancel, or give up). ``signal.set_wakeup_fd`` writes to a socket
    pair, so the same ``select`` that waits for the coordinator wakes on Ctrl-C, on Windows
    as well. Outside the main thread (where signals cannot be handled) it stays inert.
    """

    def __init__(self) -> None:
        self.count = 0
        self._last = -SIGINT_SAME
        self._pair: tuple[socket.socket, socket.socket] | None = None
        self._old_handlers: dict[int, Any] = {}
        self._old_fd: int | None = None  # set while ours is the wakeup fd

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is not threading.main_thread():
            return self
        pair = socket.socketpair()
        for s in pair:
            s.setblocking(False)
        try:
            self._old_fd = signal.set_wakeup_fd(pair[1].fileno(), warn_on_full_buffer=False)
            for sig in INTERRUPT_SIGNALS:
                self._old_handlers[sig] = signal.signal(sig, self._on_sigint)
        except (ValueError, OSError):
            self._restore()
            for s in pair:
                s.close()
            return self
        self._pair = pair
        return self

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        # One interrupt can arrive twice: GNU ``timeout`` (a CI job's time limit) signals
        # the command and then its process group. A second signal within SIGINT_SAME of the
        # first is the same one; a person's second press comes later.
        now = time.monotonic()
        if now - self._last < SIGINT_SAME:
            return
        self._last = now
        self.count += 1

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._pair is None:
            return
        self._restore()
        for s in self._pair:
            s.close()
        self._pair = None

    def _restore(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()
        if self._old_fd is not None:
            signal.set_wakeup_fd(self._old_fd)
            self._old_fd = None

    def fileno(self) -> int | None:
        """The socket that becomes readable when a signal arrives (None when inert)."""
        return self._pair[0].fileno() if self._pair is not None else None

    def drain(self) -> None:
        if self._pair is not None:
            with contextlib.suppress(OSError):
                while self._pair[0].recv(64):
                    pass


class _Woken(Exception):
    """A wait ended early because a signal arrived."""


class BlockingChannel:
    """A control connection over a blocking socket; every read has a deadline."""

    def __init__(self, sock: socket.socket, conn: ControlConnection) -> None:
        self.sock = sock
        self.conn = conn
        self._events: deque[Event] = deque()
        try:  # named in the errors: the user may talk to more than one coordinator
            host, port = sock.getpeername()[:2]
            self.peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        except (OSError, ValueError, TypeError):
            self.peer = "?"

    def _lost(self, why: str) -> UnreachableError:
        return UnreachableError(f"coordinator {self.peer}: control connection {why}")

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.settimeout(CONNECT_TIMEOUT)
            try:
                self.sock.sendall(data)
            except TimeoutError:
                raise self._lost("stalled (it is not reading)") from None
            except OSError as exc:
                raise self._lost(f"lost: {exc}") from None

    def next_event(self, timeout: float, what: str, wake: Interrupts | None = None) -> Event:
        """The next event from the peer, within ``timeout`` seconds.

        Raises:
            UnreachableError: nothing in time (``what`` says what was awaited), or the
                connection closed or broke.
            ProtocolError, AuthError: from the protocol core.
            _Woken: a signal arrived on *wake* first.
        """
        deadline = time.monotonic() + timeout
        wake_fd = wake.fileno() if wake is not None else None
        while not self._events:
            left = deadline - time.monotonic()
            if left <= 0:
                raise UnreachableError(what)
            if wake is not None and wake_fd is not None:
                ready, _, _ = select.select([self.sock.fileno(), wake_fd], [], [], left)
                if wake_fd in ready:
                    wake.drain()
                    raise _Woken
                if not ready:
                    continue
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(READ_SIZE)
            except TimeoutError:
                raise UnreachableError(what) from None
            except OSError as exc:
                raise self._lost(f"lost: {exc}") from None
            if not data:
                raise self._lost("closed by peer")
            try:
                events = self.conn.receive_data(data)
            finally:
                # Handshake replies (challenge, auth, welcome, refusal) are queued by the core.
                with contextlib.suppress(UnreachableError):
                    self._flush()
            self._events.extend(events)
        return self._events.popleft()

    def next_message(self, timeout: float, what: str, wake: Interrupts | None = None) -> Message:
        ev = self.next_event(timeout, what, wake)
        if not isinstance(ev, Message):
            raise ProtocolError("expected a control message")
        return ev

    def send(self, body: dict[str, Any]) -> None:
        self.conn.send(body)
        self._flush()

    def close(self) -> None:
        self.sock.close()


def _addresses(host: str, port: int, within: float) -> list[Any]:
    """``getaddrinfo`` within a deadline: a numeric address at once, a name in a helper
    thread that is left behind if the resolver hangs (the C call cannot be interrupted)."""
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        pass
    found: list[Any] = []
    done = threading.Event()

    def lookup() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            found.append(exc)
        finally:
            done.set()

    threading.Thread(target=lookup, name="udpreach-resolve", daemon=True).start()
    if not done.wait(within):
        raise UnreachableError(
            f"coordinator {hostport(host, port)}: no address for it in {within:g}s"
        )
    if isinstance(found[0], OSError):
        reason = found[0].strerror or str(found[0])
        raise UnreachableError(f"cannot reach coordinator {hostport(host, port)}: {reason}")
    result: list[Any] = found[0]
    return result


def _dial(host: str, port: int, within: float) -> socket.socket:
    """A TCP connection to the coordinator, every address tried within one deadline."""
    deadline = time.monotonic() + within
    error: OSError | None = None
    for family, kind, proto, _, address in _addresses(host, port, within):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(left)
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    if error is None or isinstance(error, TimeoutError):
        raise UnreachableError(f"coordinator {hostport(host, port)} did not answer in {within:g}s")
    reason = error.strerror or str(error)
    raise UnreachableError(f"cannot reach coordinator {hostport(host, port)}: {reason}")


def connect_blocking(
    host: str, port: int, secret: bytes, purpose: str, within: float
) -> BlockingChannel:
    """Dial the coordinator and authenticate, each step bounded by *within* seconds.

    A coordinator at a connection limit is asked again a few times, a moment later.

    Raises:
        UnreachableError: no connection or no answer in time (``ConnectionLimitError``:
            turned away at a connection limit every time).
        AuthError: either side failed to prove the secret.
    """
    for attempt in range(LIMIT_RETRIES):
        try:
            return _connect_once(host, port, secret, purpose, within)
        except ConnectionLimitError as exc:
            if attempt == LIMIT_RETRIES - 1:
                raise ConnectionLimitError(f"coordinator {hostport(host, port)}: {exc}") from None
            time.sleep(0.05 * 2**attempt * (0.5 + random.random()))
    raise AssertionError("unreachable")  # pragma: no cover


def _connect_once(
    host: str, port: int, secret: bytes, purpose: str, within: float
) -> BlockingChannel:
    sock = _dial(host, port, within)
    chan = BlockingChannel(sock, ControlConnection("client", secret, purpose=purpose))
    try:
        chan.conn.initiate()
        chan._flush()
        ev = chan.next_event(within, f"coordinator {hostport(host, port)}: handshake timed out")
        if not isinstance(ev, Authenticated):
            raise ProtocolError("unexpected message during the handshake")
    except BaseException:
        chan.close()
        raise
    return chan


def list_agents(host: str, port: int, secret: bytes) -> list[dict[str, Any]]:
    chan = connect_blocking(host, port, secret, "control", CONNECT_TIMEOUT)
    try:
        chan.send({"type": "agents"})
        msg = chan.next_message(CONNECT_TIMEOUT, "coordinator did not answer the agents request")
    finally:
        chan.close()
    return agents_from(msg)


def request_run(
    host: str,
    port: int,
    secret: bytes,
    *,
    agent: str,
    plan: dict[str, Any],
    wait: float,
    expect: list[dict[str, Any]] | None,
    on_progress: Callable[[dict[str, Any]], None],
    on_cancel: Callable[[float], None] = lambda grace: None,
    cancel_grace: float = CANCEL_GRACE,
) -> dict[str, Any]:
    """Ask the coordinator for a run and return its document (see ``RunReply.feed``).

    Until the run has started (its first progress message), the coordinator may be waiting
    up to *wait* seconds for the agent to register or to be free, so the read deadline is
    that much longer. A first Ctrl-C (in the main thread) asks the coordinator to cancel the
    run, calls ``on_cancel(cancel_grace)``, and waits up to *cancel_grace* seconds for the
    incomplete document, which it returns; a second one, or no document in time, gives up
    at once.

    Raises:
        RunInterruptedError: interrupted, and no document to show (exit 3).
        UdpreachError: as ``RunReply.feed`` and ``connect_blocking``.
    """
    chan = connect_blocking(host, port, secret, "control", CONNECT_TIMEOUT)
    with Interrupts() as interrupts:
        try:
            return _follow_run(
                chan,
                run_request(agent, plan, wait, expect),
                RunReply(on_progress),
                wait,
                interrupts,
                on_cancel,
                cancel_grace,
            )
        finally:
            chan.close()


def _follow_run(
    chan: BlockingChannel,
    request: dict[str, Any],
    reply: RunReply,
    wait: float,
    interrupts: Interrupts,
    on_cancel: Callable[[float], None],
    grace: float,
) -> dict[str, Any]:
    if interrupts.count:
        raise RunInterruptedError("interrupted before the run started")
    chan.send(request)
    start_by = time.monotonic() + wait + STALL_TIMEOUT
    started = False
    cancel_by: float | None = None
    seen = 0
    while True:
        if interrupts.count > seen:
            seen = interrupts.count
            if not started:
                raise RunInterruptedError("interrupted before the run started")
            if cancel_by is not None:
                raise RunInterruptedError("interrupted again: quit without the partial report")
            try:
                chan.send({"type": "cancel"})
            except UnreachableError as exc:
                raise RunInterruptedError(f"interrupted; and {exc}") from None
            on_cancel(grace)
            cancel_by = time.monotonic() + grace
        now = time.monotonic()
        if cancel_by is not None:
            timeout = cancel_by - now
            what = f"interrupted: no partial report from the coordinator within {grace:g}s"
        elif not started:
            timeout = max(STALL_TIMEOUT, start_by - now)
            what = f"coordinator sent nothing for {timeout:g}s: the run did not start"
        else:
            timeout = STALL_TIMEOUT
            what = f"coordinator sent nothing for {timeout:g}s"  # "during run R" follows
        try:
            msg = chan.next_message(max(0.0, timeout), what, interrupts)
        except _Woken:
            continue
        except UnreachableError as exc:
            if cancel_by is not None:
                text = str(exc)
                raise RunInterruptedError(
                    text if text.startswith("interrupted") else f"interrupted; {text}"
                ) from None
            if started and reply.run_id:  # the probe went away mid-run: say which run
                raise ConnectionLostError(
                    f"{exc} during run {reply.run_id} (did the probe stop?); its last "
                    f"checkpoint: udpreach show {reply.run_id}"
                ) from None
            raise
        if msg.type == "progress":
            started = True
        doc = reply.feed(msg)
        if doc is not None:
            return doc
