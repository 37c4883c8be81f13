"""The trio shell around ``control.ControlConnection``: move bytes, enforce timeouts.

Every read has a deadline set by the caller; this class only owns the stream, a send
lock (several tasks may send on one connection) and the bytes-to-events plumbing.
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import Any

import trio

from udpreach.core.errors import ProtocolError, UnreachableError
from udpreach.core.framing import PROTO, Authenticated, ControlConnection, Event, Message

READ_SIZE = 65536
WRITE_TIMEOUT = 10.0


class Channel:
    """A control connection over a trio stream."""

    def __init__(self, stream: trio.abc.Stream, conn: ControlConnection) -> None:
        self.stream = stream
        self.conn = conn
        self._events: deque[Event] = deque()
        self._send_lock = trio.Lock()
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

    async def server_handshake(self) -> str:
        """Run the server side; returns the client's purpose."""
        ev = await self.next_event()
        if not isinstance(ev, Authenticated):
            raise ProtocolError("unexpected message during the handshake")
        return ev.purpose

    async def send(self, body: dict[str, Any]) -> None:
        try:
            self.conn.send(body)
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

    async def aclose(self) -> None:
        self.closed = True
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await self.stream.aclose()


async def connect(host: str, port: int, secret: bytes, purpose: str, within: float) -> Channel:
    """Dial the coordinator and authenticate, each step bounded by *within* seconds.

    Raises:
        UnreachableError: no connection or no answer in time.
        AuthError: either side failed to prove the secret.
    """
    try:
        with trio.fail_after(within):
            stream = await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        raise UnreachableError(f"coordinator {host}:{port} did not answer in {within:g}s") from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise UnreachableError(f"cannot reach coordinator {host}:{port}: {reason}") from None
    chan = Channel(stream, ControlConnection("client", secret, purpose=purpose))
    try:
        with trio.fail_after(within):
            await chan.client_handshake()
    except trio.TooSlowError:
        await chan.aclose()
        raise UnreachableError(f"coordinator {host}:{port}: handshake timed out") from None
    except UnreachableError as exc:
        await chan.aclose()
        # A coordinator of an older version closes without a word, as does one at its
        # connection limit (a newer one says which version it speaks).
        raise UnreachableError(
            f"coordinator {host}:{port} closed the connection during the handshake ({exc}):"
            f" an older udpreach version there (this one speaks {PROTO}), or too many"
            " connections from here"
        ) from None
    except BaseException:
        await chan.aclose()
        raise
    return chan
