"""The control channel: length-prefixed frames, a mutual challenge-response, MACed messages.

Theory of operation: agents (and the ``run``/``agents`` commands) dial the coordinator over
TCP, as a mail client logs on to its server. Everything here is sans-IO: bytes in through
``receive_data``, events out, bytes to write from ``data_to_send``; it never touches a socket
or a clock, so the trio shell and the tests drive it the same way.

Frames are ``u32 length | body``. Before authentication a body is ``b"J" + JSON`` and at most
``MAX_PREAUTH`` bytes, so a stranger can make us hold very little. The handshake::

    client -> hello     {purpose, nonce_c, id?}
    server -> challenge {nonce_s, proof_s = HMAC(key, "server", purpose, id, nonce_c, nonce_s)}
    client -> auth      {proof_c = HMAC(key, "client", purpose, id, nonce_c, nonce_s)}
    server -> welcome   (the first MACed frame)

``key`` is the shared secret (the simple mode: one probe, one agent; no ``id``) or the key of
the identity ``id`` names: an agent's own key or an operator's (see ``udpreach.keyring``; a
key file reads ``udpreach-key-v1 ROLE NAME HEX``). The server looks the id up and, for an id
it does not know, carries on with a random key, so a stranger learns nothing about which
names exist: the proofs simply fail. An agent's key may only register that agent, an
operator's only make requests; the server says so once the client has proved the key.
The client checks the server's proof before revealing its own, both checks are
constant-time, and no key ever crosses the wire. After it, each frame body is
``kind | payload | MAC16`` where the MAC (BLAKE2b under a per-direction session key derived
from both nonces) also covers a frame sequence number, so frames cannot be forged, replayed,
reordered or moved between connections by anyone on the path. ``kind`` is ``J`` (a JSON
object with a ``type``) or ``R`` (a binary batch of datagram receipts, see ``encode_receipts``).
An authentic frame whose JSON is malformed (not an object, ``NaN``, a number that overflows)
is a ``Malformed`` event, not a broken connection: the receiver can answer it and go on.

A server refuses before authentication with ``{"type": "error", "code", "message"}``:
``auth`` (a failed proof), ``protocol`` (another version) or ``limit`` (a connection limit;
the client raises ``ConnectionLimitError`` and may try again).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from udpreach.core.errors import AuthError, ConfigError, ProtocolError, UnreachableError
from udpreach.core.messages import NAME_RE, loads

# 2: datagram MACs from SHAKE128 chunks (udpreach.core.datagram); 3: key ids in the hello.
PROTO = "udpreach/3"
MAX_PREAUTH = 512
MAX_FRAME = 8 * 1024 * 1024
NONCE_LEN = 16
MAC_LEN = 16
PURPOSES = ("agent", "control")
KEY_HEADER = b"udpreach-key-v1"
KEY_ROLES = ("agent", "operator")
_LEN = struct.Struct(">I")
_SEQ = struct.Struct(">Q")


class ConnectionLimitError(UnreachableError):
    """The coordinator turned the connection away at one of its connection limits."""


class KeyRoleError(AuthError):
    """The client proved a key that may not be used for what it came for."""


@dataclass(frozen=True)
class KeyIdentity:
    """What a key file holds: whose key it is, for which role, and the key itself."""

    role: str  # "agent" or "operator"
    name: str
    key: bytes

    def text(self) -> bytes:
        """The key file's one line."""
        return b" ".join(
            (KEY_HEADER, self.role.encode(), self.name.encode(), self.key.hex().encode())
        )


def parse_key_text(text: bytes) -> KeyIdentity | None:
    """The identity in a key file's text, or None for a plain shared secret.

    Raises:
        ConfigError: the text says it is a key file but is malformed.
    """
    if not text.startswith(KEY_HEADER + b" "):
        return None
    parts = text.split()
    try:
        role, name, key = parts[1].decode(), parts[2].decode(), bytes.fromhex(parts[3].decode())
    except (IndexError, UnicodeDecodeError, ValueError):
        raise ConfigError("malformed udpreach key file") from None
    if len(parts) != 4 or role not in KEY_ROLES or not NAME_RE.fullmatch(name) or len(key) != 32:
        raise ConfigError("malformed udpreach key file")
    return KeyIdentity(role, name, key)


def client_key(secret: bytes) -> bytes:
    """The key that *secret* (a shared secret or a key file's text) stands for: what the
    handshake proves and per-run datagram keys derive from."""
    identity = parse_key_text(secret)
    return identity.key if identity is not None else secret


@dataclass(frozen=True)
class Grant:
    """What the server's key lookup returns for a key id: the role and the key."""

    role: str  # "shared", "agent" or "operator"
    key: bytes


KeyLookup = Callable[[str], Grant | None]


class Phase(Enum):
    START = "start"
    HELLO_SENT = "hello_sent"  # client
    AUTH_SENT = "auth_sent"  # client
    CHALLENGE_SENT = "challenge_sent"  # server
    OPEN = "open"
    CLOSED = "closed"


# (role, phase, incoming message type) -> next phase. Anything else is a protocol error.
_TRANSITIONS: dict[tuple[str, Phase, str], Phase] = {
    ("server", Phase.START, "hello"): Phase.CHALLENGE_SENT,
    ("server", Phase.CHALLENGE_SENT, "auth"): Phase.OPEN,
    ("client", Phase.HELLO_SENT, "challenge"): Phase.AUTH_SENT,
}


@dataclass(frozen=True)
class Authenticated:
    """The handshake finished; ``purpose`` is what the client came for, ``role`` and
    ``key_id`` say which key it proved (``shared`` and None for the shared secret)."""

    purpose: str
    role: str = "shared"
    key_id: str | None = None


@dataclass(frozen=True)
class Message:
    """A JSON control message (a dict with a ``type``)."""

    body: dict[str, Any]

    @property
    def type(self) -> str:
        return str(self.body.get("type", ""))


@dataclass(frozen=True)
class Receipts:
    """A binary batch of datagram receipts (decode with ``decode_receipts``)."""

    payload: bytes


@dataclass(frozen=True)
class Malformed:
    """An authentic frame whose content is not a control message (``reason`` says why)."""

    reason: str


Event = Authenticated | Message | Receipts | Malformed


def _proof(key: bytes, label: bytes, purpose: str, key_id: str, nc: bytes, ns: bytes) -> bytes:
    msg = b"udpreach/3 " + label + b"\0" + purpose.encode() + b"\0" + key_id.encode() + b"\0"
    return hmac.new(key, msg + nc + ns, hashlib.sha256).digest()


def _stranger(start: bytes) -> str:
    """What to say of a peer whose first bytes are no udpreach handshake frame."""
    text = start.split(b"\r")[0].split(b"\n")[0]
    shown = ""
    if text and all(32 <= c < 127 for c in text):
        shown = f": it sent {text.decode()!r}"
    return f"the other end does not speak udpreach's control protocol (wrong port?){shown}"


def _frame(body: bytes) -> bytes:
    return _LEN.pack(len(body)) + body


def _json(obj: dict[str, Any]) -> bytes:
    try:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:
        raise ProtocolError(
            f"refusing to send a non-finite number in {obj.get('type')!r}"
        ) from None


def _decode(raw: bytes) -> dict[str, Any] | str:
    """The JSON object in *raw*, or why it is not a control message."""
    try:
        obj = loads(raw)
    except ValueError as exc:
        return f"not JSON ({str(exc)[:80]})"
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        return "not an object with a type"
    return obj


def _parse_json(raw: bytes) -> dict[str, Any]:
    obj = _decode(raw)
    if isinstance(obj, str):
        raise ProtocolError(f"malformed control message ({obj})")
    return obj


def _refusal(msg: dict[str, Any]) -> Exception:
    """The client-side error for a server's refusal before authentication."""
    text = str(msg.get("message", "refused by peer"))[:200]
    if msg.get("code") == "limit":
        return ConnectionLimitError(text)
    return AuthError(text)


class ControlConnection:
    """One end of a control connection, without I/O.

    Args:
        role: ``"client"`` (dials) or ``"server"`` (the coordinator).
        secret: for a client, the shared secret or a key file's text; for a server, the
            shared secret, or None when only keys from ``keys`` are accepted.
        purpose: for a client, ``"agent"`` or ``"control"``.
        nonce: a source of fresh random bytes (tests may pin it).
        keys: for a server, the lookup of a key id (None: shared secret only).
        max_frame: the largest authenticated frame accepted.
    """

    def __init__(
        self,
        role: str,
        secret: bytes | None,
        *,
        purpose: str = "control",
        nonce: Callable[[int], bytes] = secrets.token_bytes,
        keys: KeyLookup | None = None,
        max_frame: int = MAX_FRAME,
    ) -> None:
        if role not in ("client", "server"):
            raise ValueError(role)
        if purpose not in PURPOSES:
            raise ValueError(purpose)
        self.role = role
        self.purpose = purpose
        self.phase = Phase.START
        self.key_id: str | None = None
        self.key_role = "shared"
        self._secret = secret or b""
        if role == "client":
            if not secret:
                raise ValueError("a client needs a secret")
            identity = parse_key_text(secret)
            if identity is not None:
                self.key_id, self.key_role, self._secret = (
                    identity.name,
                    identity.role,
                    identity.key,
                )
        self._keys = keys
        self._key = b""  # the key this connection proves (server: found in the hello)
        self._max_frame = max_frame
        self._nonce = nonce
        self._nc = b""
        self._ns = b""
        self._inbuf = bytearray()
        self._out = bytearray()
        self._send_key = b""
        self._recv_key = b""
        self._send_seq = 0
        self._recv_seq = 0

    # -- output -------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Bytes the shell should write to the peer now."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def initiate(self) -> None:
        """Client: queue the hello."""
        if self.role != "client" or self.phase is not Phase.START:
            raise ProtocolError("initiate() is for a fresh client connection")
        self._nc = self._nonce(NONCE_LEN)
        hello = {"type": "hello", "proto": PROTO, "purpose": self.purpose, "nonce": self._nc.hex()}
        if self.key_id is not None:
            hello["id"] = self.key_id
        self._out += _frame(b"J" + _json(hello))
        self.phase = Phase.HELLO_SENT

    def send(self, body: dict[str, Any]) -> None:
        """Queue an authenticated JSON message."""
        self._send_frame(b"J", _json(body))

    def send_receipts(self, payload: bytes) -> None:
        """Queue an authenticated binary receipt batch."""
        self._send_frame(b"R", payload)

    def refuse(self, message: str, code: str = "auth") -> None:
        """Server: queue a plain error before authentication and close."""
        self._out += _frame(b"J" + _json({"type": "error", "code": code, "message": message}))
        self.phase = Phase.CLOSED

    def _send_frame(self, kind: bytes, payload: bytes) -> None:
        if self.phase is not Phase.OPEN:
            raise ProtocolError(f"cannot send before the handshake is done ({self.phase.value})")
        mac = self._mac(self._send_key, self._send_seq, kind, payload)
        self._send_seq += 1
        body = kind + payload + mac
        if len(body) > self._max_frame:
            raise ProtocolError(f"control message too large ({len(body)} bytes)")
        self._out += _frame(body)

    @staticmethod
    def _mac(key: bytes, seq: int, kind: bytes, payload: bytes) -> bytes:
        m = hashlib.blake2b(key=key, digest_size=MAC_LEN)
        m.update(_SEQ.pack(seq))
        m.update(kind)
        m.update(payload)
        return m.digest()

    # -- input --------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer; return the complete events they hold.

        Raises:
            ProtocolError: bad framing, oversize frame, unexpected message.
            AuthError: the peer failed to prove the secret, or refused ours.
        """
        if self.phase is Phase.CLOSED:
            raise ProtocolError("connection is closed")
        self._inbuf += data
        events: list[Event] = []
        while len(self._inbuf) >= 4:
            (n,) = _LEN.unpack_from(self._inbuf)
            cap = self._max_frame if self.phase is Phase.OPEN else MAX_PREAUTH
            if n > cap or n == 0:
                authenticated = self.phase is Phase.OPEN
                self.phase = Phase.CLOSED
                if not authenticated:  # not a udpreach peer at all, most likely
                    raise ProtocolError(_stranger(bytes(self._inbuf[:64])))
                raise ProtocolError(f"control frame of {n} bytes refused (limit {cap})")
            if len(self._inbuf) < 4 + n:
                break
            body = bytes(self._inbuf[4 : 4 + n])
            del self._inbuf[: 4 + n]
            try:
                ev = self._handle(body)
            except (ProtocolError, AuthError):
                self.phase = Phase.CLOSED
                raise
            if ev is not None:
                events.append(ev)
        return events

    def _handle(self, body: bytes) -> Event | None:
        if self.phase is Phase.OPEN:
            return self._handle_open(body)
        if self.phase is Phase.AUTH_SENT:
            return self._client_expect_welcome(body)
        if body[:1] != b"J":
            raise ProtocolError("unexpected binary frame during the handshake")
        msg = _parse_json(body[1:])
        mtype = msg["type"]
        if mtype == "error":
            raise _refusal(msg)
        if (self.role, self.phase, mtype) not in _TRANSITIONS:
            raise ProtocolError(f"unexpected {mtype!r} message in phase {self.phase.value}")
        if self.role == "server":
            return self._server_step(mtype, msg)
        return self._client_step(mtype, msg)

    def _hex_field(self, msg: dict[str, Any], key: str, length: int) -> bytes:
        value = msg.get(key)
        try:
            raw = bytes.fromhex(value) if isinstance(value, str) else b""
        except ValueError:
            raw = b""
        if len(raw) != length:
            raise ProtocolError(f"handshake field {key!r} malformed")
        return raw

    def _server_step(self, mtype: str, msg: dict[str, Any]) -> Event | None:
        if mtype == "hello":
            proto = str(msg.get("proto"))[:40]
            if proto != PROTO:
                # Said before authentication (a version is no secret): a peer of another
                # version would otherwise take the closed connection for a wrong secret.
                self.refuse(
                    f"the coordinator speaks {PROTO} and this client {proto}: run the same"
                    " udpreach version on both ends",
                    code="protocol",
                )
                raise ProtocolError(f"unsupported protocol {proto!r}")
            purpose = msg.get("purpose")
            if purpose not in PURPOSES:
                raise ProtocolError("unknown purpose in hello")
            self.purpose = str(purpose)
            self._nc = self._hex_field(msg, "nonce", NONCE_LEN)
            self._choose_key(msg.get("id"))
            self._ns = self._nonce(NONCE_LEN)
            proof = _proof(self._key, b"server", self.purpose, self._id, self._nc, self._ns)
            reply = {"type": "challenge", "nonce": self._ns.hex(), "proof": proof.hex()}
            self._out += _frame(b"J" + _json(reply))
            self.phase = Phase.CHALLENGE_SENT
            return None
        # auth
        got = self._hex_field(msg, "proof", 32)
        want = _proof(self._key, b"client", self.purpose, self._id, self._nc, self._ns)
        if not hmac.compare_digest(got, want):
            self.refuse("authentication refused")
            raise AuthError(
                "client failed to prove its key"
                if self.key_id
                else "client failed to prove the shared secret"
            )
        # The client proved the key: it may be told what that key may not do.
        if self.key_role == "agent" and self.purpose != "agent":
            why = (
                f"key {self.key_id!r} is an agent's key: agent keys cannot start runs or list"
                " agents (use an operator key: udpreach key add NAME --operator)"
            )
            self.refuse(why)
            raise KeyRoleError(why)
        if self.key_role == "operator" and self.purpose == "agent":
            why = f"key {self.key_id!r} is an operator's key: an agent registers with its own key"
            self.refuse(why)
            raise KeyRoleError(why)
        self._derive_session_keys()
        self.phase = Phase.OPEN
        self.send({"type": "welcome"})
        return Authenticated(self.purpose, self.key_role, self.key_id)

    @property
    def _id(self) -> str:
        return self.key_id or ""

    def _choose_key(self, key_id: Any) -> None:
        """Server: the key the hello asks to be checked against. An id nobody knows gets a
        random key (the proofs then fail as for a wrong key, revealing nothing)."""
        grant: Grant | None
        if key_id is None:
            grant = Grant("shared", self._secret) if self._secret else None
        else:
            if not isinstance(key_id, str) or not NAME_RE.fullmatch(key_id):
                raise ProtocolError("malformed key id in hello")
            self.key_id = key_id
            grant = self._keys(key_id) if self._keys is not None else None
        if grant is None:
            grant = Grant("unknown", secrets.token_bytes(32))
        self.key_role = grant.role
        self._key = grant.key

    def _client_step(self, mtype: str, msg: dict[str, Any]) -> Event | None:
        if mtype == "challenge":
            self._ns = self._hex_field(msg, "nonce", NONCE_LEN)
            got = self._hex_field(msg, "proof", 32)
            self._key = self._secret
            want = _proof(self._key, b"server", self.purpose, self._id, self._nc, self._ns)
            if not hmac.compare_digest(got, want):
                if self.key_id is not None:
                    raise AuthError(
                        f"the coordinator does not know key {self.key_id!r} (not in its"
                        " keyring, revoked, or a key for another coordinator)"
                    )
                raise AuthError(
                    "the coordinator does not know our secret (wrong --secret-file on one side?)"
                )
            proof = _proof(self._key, b"client", self.purpose, self._id, self._nc, self._ns)
            self._out += _frame(b"J" + _json({"type": "auth", "proof": proof.hex()}))
            self._derive_session_keys()
            self.phase = Phase.AUTH_SENT
            return None
        raise ProtocolError(f"unexpected {mtype!r} message")

    def _client_expect_welcome(self, body: bytes) -> Event:
        """Client: the welcome is the first MACed frame; a plain error means refusal."""
        if len(body) > 1 + MAC_LEN:
            kind, payload, mac = body[:1], body[1:-MAC_LEN], body[-MAC_LEN:]
            want = self._mac(self._recv_key, self._recv_seq, kind, payload)
            if hmac.compare_digest(mac, want):
                self._recv_seq += 1
                msg = _parse_json(payload) if kind == b"J" else {}
                if msg.get("type") != "welcome":
                    raise ProtocolError("expected a welcome after authentication")
                self.phase = Phase.OPEN
                return Authenticated(self.purpose, self.key_role, self.key_id)
        if body[:1] == b"J":
            refusal = _decode(body[1:])
            if isinstance(refusal, dict) and refusal.get("type") == "error":
                raise _refusal(refusal)
        raise ProtocolError("the coordinator's welcome failed authentication")

    def _derive_session_keys(self) -> None:
        base = _proof(self._key, b"session", self.purpose, self._id, self._nc, self._ns)
        c2s = hashlib.blake2b(b"c2s", key=base, digest_size=32).digest()
        s2c = hashlib.blake2b(b"s2c", key=base, digest_size=32).digest()
        self._send_key, self._recv_key = (s2c, c2s) if self.role == "server" else (c2s, s2c)
        # Past the handshake only the session keys are needed: hold no long-term key.
        self._key = self._secret = b""
        self._keys = None

    def _handle_open(self, body: bytes) -> Event:
        if len(body) < 1 + MAC_LEN:
            raise ProtocolError("control frame too short")
        kind, payload, mac = body[:1], body[1:-MAC_LEN], body[-MAC_LEN:]
        want = self._mac(self._recv_key, self._recv_seq, kind, payload)
        if not hmac.compare_digest(mac, want):
            raise ProtocolError("control frame failed authentication (tampered or out of order)")
        self._recv_seq += 1
        if kind == b"R":
            return Receipts(payload)
        if kind != b"J":
            raise ProtocolError("unknown control frame kind")
        obj = _decode(payload)
        if isinstance(obj, str):
            return Malformed(obj)
        return Message(obj)

    @property
    def is_open(self) -> bool:
        return self.phase is Phase.OPEN

    @property
    def buffered(self) -> int:
        """Bytes received and held: the start of a frame not yet complete."""
        return len(self._inbuf)


RECEIPT = struct.Struct(">BHHBH")  # addr index, dst port, sent src port, attempt, observed port


def encode_receipts(run_id: str, addrs: list[str], records: bytes) -> bytes:
    """A receipt batch: the run, the observed source addresses, then 8-byte records.

    Each record is ``addr_index u8 | dst u16 | src_sent u16 | attempt u8 | observed_port u16``
    (the middle five bytes are copied straight out of the verified datagram).
    """
    if len(addrs) > 255:
        raise ValueError("at most 255 observed addresses per batch")
    rid = run_id.encode()
    out = bytearray(struct.pack(">H", len(rid)) + rid + bytes([len(addrs)]))
    for a in addrs:
        ab = a.encode()
        out += bytes([len(ab)]) + ab
    out += records
    return bytes(out)


def decode_receipts(payload: bytes) -> tuple[str, list[str], memoryview]:
    """Inverse of ``encode_receipts``. Raises ProtocolError on malformed input."""
    try:
        (n,) = struct.unpack_from(">H", payload, 0)
        pos = 2 + n
        run_id = payload[2:pos].decode()
        count = payload[pos]
        pos += 1
        addrs = []
        for _ in range(count):
            ln = payload[pos]
            addrs.append(payload[pos + 1 : pos + 1 + ln].decode())
            pos += 1 + ln
    except (IndexError, struct.error, UnicodeDecodeError):
        raise ProtocolError("malformed receipt batch") from None
    if pos > len(payload) or (len(payload) - pos) % RECEIPT.size:
        raise ProtocolError("malformed receipt batch (partial record)")
    return run_id, addrs, memoryview(payload)[pos:]
