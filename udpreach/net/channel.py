"""The trio shell around ``framing.ControlConnection``: move bytes, enforce timeouts.

Every read has a deadline set by the caller; this class only owns the stream, a send
lock (several tasks may send on one connection) and the bytes-to-events plumbing. A server's
channels share one ``MemoryBudget``: the bytes of frames still arriving, over all
connections together, have a ceiling, so many connections each sending the start of a large
frame cannot make the coordinator hold more than that.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
from collections import deque
from collections.abc import Mapping
from typing import Any

import trio

from udpreach.core.errors import ProtocolError, UnreachableError, leaves
from udpreach.core.framing import (
    PROTO,
    Authenticated,
    ConnectionLimitError,
    ControlConnection,
    Event,
    Message,
)
from udpreach.core.messages import Msg
from udpreach.net import hostport

READ_SIZE = 65536
WRITE_TIMEOUT = 10.0
REFUSE_TIMEOUT = 1.0
REFUSE_DRAIN = 0.2
MEMORY_BUDGET = 64 * 1024 * 1024


class MemoryBudget:
    """Bytes of partly received frames held over all of a server's connections."""

    def __init__(self, limit: int = MEMORY_BUDGET) -> None:
        self.limit = limit
        self.held = 0

    def update(self, old: int, new: int) -> None:
        """A connection's held bytes went from *old* to *new*.

        Raises:
            ProtocolError: the total would pass the limit (the growing connection is cut).
        """
        self.held += new - old
        if new > old and self.held > self.limit:
            raise ProtocolError(
                f"control-plane memory budget exhausted ({self.held} bytes of partial frames)"
            )


class Channel:
    """A control connection over a trio stream."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        conn: ControlConnection,
        budget: MemoryBudget | None = None,
    ) -> None:
        self.stream = stream
        self.conn = conn
        self._events: deque[Event] = deque()
        self._send_lock = trio.Lock()
        self._budget = budget
        self._held = 0
        self.closed = False

    async def _flush(self) -> None:
        """Write what the core queued, in order, whole, even if the caller is cancelled.

        Frames carry sequence numbers under their MAC: a frame taken from the core but never
        written (a cancelled sender) would break the connection for good. So the bytes are
        taken under the lock and written under a shield, bounded by WRITE_TIMEOUT.
        """
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + WRITE_TIMEOUT
            async with self._send_lock:
                data = self.conn.data_to_send()
                if data:
                    await self.stream.send_all(data)
        if scope.cancelled_caught:
            raise UnreachableError("control connection stalled (peer not reading)")

    async def next_event(self) -> Event:
        """The next event from the peer.

        Raises:
            ProtocolError, AuthError: from the protocol core.
            UnreachableError: the peer closed the connection or it broke.
        """
        while not self._events:
            try:
                data = await self.stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise UnreachableError(f"control connection lost: {exc}") from None
            if not data:
                raise UnreachableError("control connection closed by peer")
            try:
                events = self.conn.receive_data(bytes(data))
                if self._budget is not None:
                    held, self._held = self._held, self.conn.buffered
                    self._budget.update(held, self._held)
            finally:
                # Handshake replies (challenge, auth, welcome, refusal) are queued by the core.
                with trio.move_on_after(1):
                    with contextlib.suppress(
                        trio.BrokenResourceError, trio.ClosedResourceError, OSError
                    ):
                        await self._flush()
            self._events.extend(events)
        return self._events.popleft()

    async def client_handshake(self) -> None:
        """Run the client side of the handshake (caller sets the deadline)."""
        self.conn.initiate()
        await self._flush()
        ev = await self.next_event()
        if not isinstance(ev, Authenticated):
            raise ProtocolError("unexpected message during the handshake")

    async def server_handshake(self) -> Authenticated:
        """Run the server side; returns who the client proved to be and what it came for."""
        ev = await self.next_event()
        if not isinstance(ev, Authenticated):
            raise ProtocolError("unexpected message during the handshake")
        return ev

    async def send(self, body: Msg | Mapping[str, Any]) -> None:
        """Send a control message (typed, or a dict with a ``type``)."""
        obj = body.to_json() if isinstance(body, Msg) else dict(body)
        try:
            self.conn.send(obj)
            await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise UnreachableError(f"control connection lost: {exc}") from None

    async def send_receipts(self, payload: bytes) -> None:
        try:
            self.conn.send_receipts(payload)
            await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise UnreachableError(f"control connection lost: {exc}") from None

    async def next_message(self) -> Message:
        """The next JSON message (receipt batches are a protocol error here)."""
        ev = await self.next_event()
        if not isinstance(ev, Message):
            raise ProtocolError("expected a control message")
        return ev

    async def refuse(self, message: str, code: str) -> None:
        """Tell the peer why it is being turned away (before or after authentication), in
        at most REFUSE_TIMEOUT seconds; never raises for a peer that does not listen."""
        body = {"type": "error", "code": code, "message": message}
        with contextlib.suppress(ProtocolError, UnreachableError):
            if self.conn.is_open:
                self.conn.send(body)
            else:
                self.conn.refuse(message, code)
        with trio.move_on_after(REFUSE_TIMEOUT, shield=True):
            with contextlib.suppress(
                trio.BrokenResourceError, trio.ClosedResourceError, OSError, UnreachableError
            ):
                await self._flush()
                # Closing with the peer's bytes unread would send a reset, which can destroy
                # the refusal before the peer reads it: end our side, read theirs briefly.
                if isinstance(self.stream, trio.SocketStream):
                    await self.stream.send_eof()
                with trio.move_on_after(REFUSE_DRAIN):
                    while await self.stream.receive_some(READ_SIZE):
                        pass

    async def aclose(self) -> None:
        self.closed = True
        if self._budget is not None:
            self._budget.update(self._held, 0)
            self._held = 0
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await self.stream.aclose()


LIMIT_RETRIES = 4


async def connect(
    host: str,
    port: int,
    secret: bytes,
    purpose: str,
    within: float,
    local_address: str | None = None,
) -> Channel:
    """Dial the coordinator and authenticate, each step bounded by *within* seconds (from
    ``local_address`` when one is given: an agent that listens on one address registers
    that one, the address the coordinator sees the connection come from).

    A coordinator at a connection limit says so; then the dial is tried again a few times,
    a moment later (its limits drop the oldest unauthenticated connections, not newcomers).

    Raises:
        UnreachableError: no connection or no answer in time (``ConnectionLimitError``: the
            coordinator kept turning us away at a connection limit).
        AuthError: either side failed to prove the secret.
    """
    for attempt in range(LIMIT_RETRIES):
        try:
            return await _connect_once(host, port, secret, purpose, within, local_address)
        except ConnectionLimitError:
            if attempt == LIMIT_RETRIES - 1:
                raise
            await trio.sleep(0.05 * 2**attempt * (0.5 + random.random()))
    raise AssertionError("unreachable")  # pragma: no cover


def _why(exc: OSError) -> str:
    """Why a dial failed: trio's "all attempts to connect to X failed" keeps the reasons in
    its cause (the first one says it: refused, no route, the source address not usable)."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        for leaf in leaves(cause):
            if isinstance(leaf, OSError):  # trio's strerror repeats the address: the errno's
                return os.strerror(leaf.errno) if leaf.errno else str(leaf)
    return exc.strerror or str(exc)


async def _connect_once(
    host: str, port: int, secret: bytes, purpose: str, within: float, local_address: str | None
) -> Channel:
    # (The wildcard is where the agent listens, not an address to name.)
    source = f" from {local_address}" if local_address not in (None, "0.0.0.0", "::") else ""
    try:  # a name that does not resolve is said so, not taken for a silent coordinator
        with trio.fail_after(within):
            await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except trio.TooSlowError:
        raise UnreachableError(
            f"cannot resolve the coordinator's host {host!r} in {within:g}s"
        ) from None
    except socket.gaierror as exc:
        raise UnreachableError(
            f"cannot resolve the coordinator's host {host!r}: {exc.strerror or exc}"
        ) from None
    except UnicodeError:  # an empty label ("a..b"), or one longer than 63 characters
        raise UnreachableError(
            f"cannot resolve the coordinator's host {host!r}: not a valid host name"
        ) from None
    try:
        with trio.fail_after(within):
            stream = await trio.open_tcp_stream(host, port, local_address=local_address)
    except trio.TooSlowError:
        raise UnreachableError(
            f"coordinator {hostport(host, port)} did not answer in {within:g}s{source}"
        ) from None
    except OSError as exc:
        raise UnreachableError(
            f"cannot reach coordinator {hostport(host, port)}{source}: {_why(exc)}"
        ) from None
    chan = Channel(stream, ControlConnection("client", secret, purpose=purpose))
    try:
        with trio.fail_after(within):
            await chan.client_handshake()
    except trio.TooSlowError:
        await chan.aclose()
        raise UnreachableError(f"coordinator {hostport(host, port)}: handshake timed out") from None
    except ConnectionLimitError as exc:
        await chan.aclose()
        raise ConnectionLimitError(f"coordinator {hostport(host, port)}: {exc}") from None
    except UnreachableError as exc:
        await chan.aclose()
        # A coordinator of an older version closes without a word, as does one at its
        # connection limit (a newer one says which version it speaks).
        raise UnreachableError(
            f"coordinator {hostport(host, port)} closed the connection during the handshake "
            f"({exc}):"
            f" an older udpreach version there (this one speaks {PROTO}), or too many"
            " connections from here"
        ) from None
    except BaseException:
        await chan.aclose()
        raise
    return chan
