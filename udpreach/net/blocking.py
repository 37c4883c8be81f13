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
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from udpreach.core.errors import (
    AgentUnavailableError,
    ConfigError,
    ProtocolError,
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

CONNECT_TIMEOUT = 10.0
LIMIT_RETRIES = 4
STALL_TIMEOUT = 60.0  # no word from the coordinator for this long during a run: give up
READ_SIZE = 65536


class RunReply:
    """What the coordinator answers to a ``run`` request, message by message (sans-IO)."""

    def __init__(self, on_progress: Callable[[dict[str, Any]], None]) -> None:
        self._on_progress = on_progress
        self._parts: list[str] = []

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
            self._on_progress(typed.to_json())
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


class BlockingChannel:
    """A control connection over a blocking socket; every read has a deadline."""

    def __init__(self, sock: socket.socket, conn: ControlConnection) -> None:
        self.sock = sock
        self.conn = conn
        self._events: deque[Event] = deque()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.settimeout(CONNECT_TIMEOUT)
            try:
                self.sock.sendall(data)
            except TimeoutError:
                raise UnreachableError("control connection stalled (peer not reading)") from None
            except OSError as exc:
                raise UnreachableError(f"control connection lost: {exc}") from None

    def next_event(self, timeout: float, what: str) -> Event:
        """The next event from the peer, within ``timeout`` seconds.

        Raises:
            UnreachableError: nothing in time (``what`` says what was awaited), or the
                connection closed or broke.
            ProtocolError, AuthError: from the protocol core.
        """
        deadline = time.monotonic() + timeout
        while not self._events:
            left = deadline - time.monotonic()
            if left <= 0:
                raise UnreachableError(what)
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(READ_SIZE)
            except TimeoutError:
                raise UnreachableError(what) from None
            except OSError as exc:
                raise UnreachableError(f"control connection lost: {exc}") from None
            if not data:
                raise UnreachableError("control connection closed by peer")
            try:
                events = self.conn.receive_data(data)
            finally:
                # Handshake replies (challenge, auth, welcome, refusal) are queued by the core.
                with contextlib.suppress(UnreachableError):
                    self._flush()
            self._events.extend(events)
        return self._events.popleft()

    def next_message(self, timeout: float, what: str) -> Message:
        ev = self.next_event(timeout, what)
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
        raise UnreachableError(f"coordinator {host}:{port}: no address for it in {within:g}s")
    if isinstance(found[0], OSError):
        reason = found[0].strerror or str(found[0])
        raise UnreachableError(f"cannot reach coordinator {host}:{port}: {reason}")
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
        raise UnreachableError(f"coordinator {host}:{port} did not answer in {within:g}s")
    reason = error.strerror or str(error)
    raise UnreachableError(f"cannot reach coordinator {host}:{port}: {reason}")


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
                raise ConnectionLimitError(f"coordinator {host}:{port}: {exc}") from None
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
        ev = chan.next_event(within, f"coordinator {host}:{port}: handshake timed out")
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
) -> dict[str, Any]:
    """Ask the coordinator for a run and return its document (see ``RunReply.feed``)."""
    chan = connect_blocking(host, port, secret, "control", CONNECT_TIMEOUT)
    try:
        chan.send(run_request(agent, plan, wait, expect))
        reply = RunReply(on_progress)
        stall = STALL_TIMEOUT + wait
        while True:
            msg = chan.next_message(
                stall, f"coordinator sent nothing for {stall:g}s during the run"
            )
            stall = STALL_TIMEOUT
            doc = reply.feed(msg)
            if doc is not None:
                return doc
    finally:
        chan.close()
