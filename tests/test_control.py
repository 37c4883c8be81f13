"""The control channel without sockets: a client and a server object with bytes shuttled
between them (h11's ConnectionPair), the handshake, MACed frames, limits and receipts."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from udpreach.core.errors import AuthError, ProtocolError
from udpreach.core.framing import (
    MAX_FRAME,
    MAX_PREAUTH,
    PROTO,
    RECEIPT,
    Authenticated,
    ConnectionLimitError,
    ControlConnection,
    Event,
    Grant,
    Malformed,
    Message,
    Receipts,
    decode_receipts,
    encode_receipts,
)

SECRET = b"correct horse battery staple 0123456789"
WRONG = b"incorrect donkey battery staple 987654"


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def jframe(obj: object) -> bytes:
    return frame(b"J" + json.dumps(obj).encode())


class Pair:
    """A client and a server; every byte either one sends is kept in ``wire``."""

    def __init__(
        self,
        purpose: str = "agent",
        client_secret: bytes = SECRET,
        server_secret: bytes = SECRET,
    ) -> None:
        self.client = ControlConnection("client", client_secret, purpose=purpose)
        self.server = ControlConnection("server", server_secret)
        self.wire = bytearray()

    def c2s(self, *, chunk: int | None = None) -> list[Event]:
        data = self.client.data_to_send()
        self.wire += data
        return feed(self.server, data, chunk)

    def s2c(self, *, chunk: int | None = None) -> list[Event]:
        data = self.server.data_to_send()
        self.wire += data
        return feed(self.client, data, chunk)

    def handshake(self, *, chunk: int | None = None) -> None:
        self.client.initiate()
        assert self.c2s(chunk=chunk) == []  # hello -> challenge queued
        assert self.s2c(chunk=chunk) == []  # challenge -> auth queued
        assert self.c2s(chunk=chunk) == [Authenticated(self.client.purpose)]
        assert self.s2c(chunk=chunk) == [Authenticated(self.client.purpose)]


def feed(conn: ControlConnection, data: bytes, chunk: int | None) -> list[Event]:
    if chunk is None:
        return conn.receive_data(data)
    events: list[Event] = []
    for i in range(0, len(data), chunk):
        events += conn.receive_data(data[i : i + chunk])
    return events


def assert_secret_not_on_wire(wire: bytes, *secrets: bytes) -> None:
    for s in secrets:
        assert s not in wire
        assert s.hex().encode() not in wire
        assert s.hex().upper().encode() not in wire


# --- handshake ----------------------------------------------------------------------


@pytest.mark.parametrize("purpose", ["agent", "control"])
def test_handshake_and_messages_both_ways(purpose: str) -> None:
    p = Pair(purpose)
    p.handshake()
    assert p.client.is_open
    assert p.server.is_open
    assert p.server.purpose == purpose
    p.client.send({"type": "register", "name": "pc-17", "ports": [5000]})
    p.client.send_receipts(b"\x01\x02\x03")
    assert p.c2s() == [
        Message({"type": "register", "name": "pc-17", "ports": [5000]}),
        Receipts(b"\x01\x02\x03"),
    ]
    p.server.send({"type": "registered"})
    (ev,) = p.s2c()
    assert isinstance(ev, Message)
    assert ev.type == "registered"
    assert_secret_not_on_wire(bytes(p.wire), SECRET)


def test_purpose_is_authenticated_by_the_server() -> None:
    p = Pair("control")
    p.handshake()
    assert p.server.purpose == "control"


def test_hello_says_which_protocol() -> None:
    c = ControlConnection("client", SECRET, purpose="agent")
    c.initiate()
    out = c.data_to_send()
    (n,) = struct.unpack_from(">I", out)
    assert len(out) == 4 + n
    hello = json.loads(out[5:])
    assert hello["type"] == "hello"
    assert hello["proto"] == PROTO
    assert hello["purpose"] == "agent"


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_byte_at_a_time_delivery(chunk: int) -> None:
    p = Pair()
    p.handshake(chunk=chunk)
    p.client.send({"type": "a"})
    p.client.send_receipts(bytes(range(40)))
    p.client.send({"type": "b", "x": "y" * 300})
    assert p.c2s(chunk=chunk) == [
        Message({"type": "a"}),
        Receipts(bytes(range(40))),
        Message({"type": "b", "x": "y" * 300}),
    ]


def test_welcome_and_first_messages_in_one_chunk() -> None:
    """The server may send its welcome and a big message back to back."""
    p = Pair()
    p.client.initiate()
    p.c2s()
    p.s2c()
    assert p.c2s() == [Authenticated("agent")]
    p.server.send({"type": "run_start", "blob": "z" * (MAX_PREAUTH * 4)})
    events = p.s2c()
    assert events == [
        Authenticated("agent"),
        Message({"type": "run_start", "blob": "z" * (MAX_PREAUTH * 4)}),
    ]


def test_send_before_handshake_is_refused() -> None:
    c = ControlConnection("client", SECRET)
    with pytest.raises(ProtocolError):
        c.send({"type": "x"})
    c.initiate()
    with pytest.raises(ProtocolError):
        c.send_receipts(b"")
    with pytest.raises(ProtocolError):
        c.initiate()


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="peer"):
        ControlConnection("peer", SECRET)
    with pytest.raises(ValueError, match="admin"):
        ControlConnection("client", SECRET, purpose="admin")


# --- wrong secrets ------------------------------------------------------------------


def test_server_with_wrong_secret_is_detected_by_the_client() -> None:
    p = Pair(client_secret=SECRET, server_secret=WRONG)
    p.client.initiate()
    assert p.c2s() == []
    with pytest.raises(AuthError, match="secret"):
        p.s2c()
    # the client revealed nothing: no auth frame queued, connection closed
    assert p.client.data_to_send() == b""
    assert not p.client.is_open
    with pytest.raises(ProtocolError):
        p.client.receive_data(b"\0\0\0\1J")
    assert_secret_not_on_wire(bytes(p.wire), SECRET, WRONG)


def test_client_without_the_secret_is_refused_by_the_server() -> None:
    """A client that skips its own check and guesses a proof: the server refuses it."""
    server = ControlConnection("server", SECRET)
    hello = {"type": "hello", "proto": PROTO, "purpose": "agent", "nonce": "11" * 16}
    assert server.receive_data(jframe(hello)) == []
    challenge = json.loads(server.data_to_send()[5:])
    assert challenge["type"] == "challenge"
    wire = bytearray(jframe(hello))
    auth = jframe({"type": "auth", "proof": "00" * 32})
    wire += auth
    with pytest.raises(AuthError):
        server.receive_data(auth)
    refusal = server.data_to_send()
    wire += refusal
    msg = json.loads(refusal[5:])
    assert msg["type"] == "error"
    assert msg["code"] == "auth"
    assert not server.is_open
    with pytest.raises(ProtocolError):
        server.receive_data(jframe({"type": "x"}))
    assert_secret_not_on_wire(bytes(wire), SECRET)


def test_client_turns_a_refusal_into_an_auth_error() -> None:
    p = Pair()
    p.client.initiate()
    p.c2s()
    p.s2c()
    p.client.data_to_send()  # the auth is lost; the server refuses instead
    with pytest.raises(AuthError, match="go away"):
        p.client.receive_data(jframe({"type": "error", "code": "auth", "message": "go away"}))


def test_refusal_before_the_challenge_is_an_auth_error() -> None:
    c = ControlConnection("client", SECRET)
    c.initiate()
    with pytest.raises(AuthError, match="not allowed"):
        c.receive_data(jframe({"type": "error", "message": "not allowed"}))


def test_secret_stays_off_the_wire_in_a_full_session() -> None:
    p = Pair()
    p.handshake()
    for i in range(20):
        p.client.send({"type": "ping", "i": i})
        p.server.send({"type": "pong", "i": i})
        p.c2s()
        p.s2c()
    assert_secret_not_on_wire(bytes(p.wire), SECRET)


# --- after the handshake: tamper, replay, reorder, splice ---------------------------


def open_pair() -> Pair:
    p = Pair()
    p.handshake()
    return p


def two_frames(p: Pair) -> tuple[bytes, bytes]:
    p.client.send({"type": "one"})
    first = p.client.data_to_send()
    p.client.send({"type": "two"})
    second = p.client.data_to_send()
    return first, second


def test_replayed_frame_is_refused() -> None:
    p = open_pair()
    first, _ = two_frames(p)
    assert p.server.receive_data(first) == [Message({"type": "one"})]
    with pytest.raises(ProtocolError):
        p.server.receive_data(first)
    assert not p.server.is_open


def test_reordered_frames_are_refused() -> None:
    p = open_pair()
    _first, second = two_frames(p)
    with pytest.raises(ProtocolError):
        p.server.receive_data(second)


def test_dropped_frame_is_noticed() -> None:
    p = open_pair()
    _first, second = two_frames(p)
    p.client.send({"type": "three"})
    third = p.client.data_to_send()
    with pytest.raises(ProtocolError):
        p.server.receive_data(second + third)


@pytest.mark.parametrize("where", [4, 5, 10, -1, -16])
def test_tampered_frame_is_refused(where: int) -> None:
    p = open_pair()
    first, _ = two_frames(p)
    bad = bytearray(first)
    bad[where] ^= 0x20
    with pytest.raises(ProtocolError):
        p.server.receive_data(bytes(bad))


def test_kind_byte_swap_is_refused() -> None:
    p = open_pair()
    p.client.send_receipts(b'{"type":"x"}')
    data = bytearray(p.client.data_to_send())
    assert data[4:5] == b"R"
    data[4:5] = b"J"
    with pytest.raises(ProtocolError):
        p.server.receive_data(bytes(data))


def test_frame_from_another_connection_is_refused() -> None:
    a, b = open_pair(), open_pair()
    a.client.send({"type": "one"})
    with pytest.raises(ProtocolError):
        b.server.receive_data(a.client.data_to_send())


def test_reflected_frame_is_refused() -> None:
    """A server frame sent back to the server does not verify (per-direction keys)."""
    p = open_pair()
    p.server.send({"type": "one"})
    with pytest.raises(ProtocolError):
        p.server.receive_data(p.server.data_to_send())


def test_unmaced_json_after_handshake_is_refused() -> None:
    p = open_pair()
    with pytest.raises(ProtocolError):
        p.server.receive_data(jframe({"type": "hello"}))


def test_short_frame_after_handshake_is_refused() -> None:
    p = open_pair()
    with pytest.raises(ProtocolError):
        p.server.receive_data(frame(b"J" + bytes(5)))


# --- limits -------------------------------------------------------------------------


def test_oversize_preauth_frame_refused_from_its_header() -> None:
    server = ControlConnection("server", SECRET)
    with pytest.raises(ProtocolError, match="does not speak udpreach's control protocol"):
        server.receive_data(struct.pack(">I", MAX_PREAUTH + 1))


def test_another_protocol_on_the_port_is_named_not_read_as_a_length() -> None:
    """A coordinator address that points at a web server: "wrong port?" and what it said,
    not "a frame of 1213486160 bytes" (b"HTTP" read as a length)."""
    c = ControlConnection("client", SECRET)
    c.initiate()
    with pytest.raises(ProtocolError) as info:
        c.receive_data(b"HTTP/1.0 400 Bad Request\r\nServer: x\r\n\r\n")
    assert str(info.value) == (
        "the other end does not speak udpreach's control protocol (wrong port?): it sent "
        "'HTTP/1.0 400 Bad Request'"
    )


def test_preauth_limit_is_inclusive() -> None:
    server = ControlConnection("server", SECRET)
    assert server.receive_data(struct.pack(">I", MAX_PREAUTH) + b"J") == []


def test_oversize_preauth_frame_refused_by_the_client_too() -> None:
    c = ControlConnection("client", SECRET)
    c.initiate()
    with pytest.raises(ProtocolError):
        c.receive_data(struct.pack(">I", 100_000))


def test_oversize_frame_after_handshake_refused_from_its_header() -> None:
    p = open_pair()
    with pytest.raises(ProtocolError, match=str(MAX_FRAME)):
        p.server.receive_data(struct.pack(">I", MAX_FRAME + 1))


def test_big_frame_after_handshake_is_accepted() -> None:
    p = open_pair()
    blob = bytes(MAX_FRAME // 2)
    p.client.send_receipts(blob)
    assert p.c2s(chunk=1 << 20) == [Receipts(blob)]


def test_oversize_send_is_refused() -> None:
    p = open_pair()
    with pytest.raises(ProtocolError):
        p.client.send_receipts(bytes(MAX_FRAME))


def test_zero_length_frame_is_refused() -> None:
    server = ControlConnection("server", SECRET)
    with pytest.raises(ProtocolError):
        server.receive_data(b"\0\0\0\0")


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: coordinator\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
        b"SSH-2.0-OpenSSH_9.6\r\n",
        frame(b"not json at all"),
        frame(b"J{not json"),
        frame(b"J\xff\xfe\xfd"),
        frame(b"J[1, 2, 3]"),
        frame(b'J{"no_type": 1}'),
        frame(b'J{"type": 5}'),
        frame(b"R" + bytes(20)),
        jframe({"type": "auth", "proof": "00" * 32}),  # auth before hello
        jframe({"type": "welcome"}),
        jframe({"type": "hello", "proto": PROTO, "purpose": "root", "nonce": "11" * 16}),
        jframe({"type": "hello", "proto": PROTO, "purpose": ["agent"], "nonce": "11" * 16}),
        jframe({"type": "hello", "proto": PROTO, "purpose": "agent", "nonce": "11" * 15}),
        jframe({"type": "hello", "proto": PROTO, "purpose": "agent", "nonce": "zz" * 16}),
        jframe({"type": "hello", "proto": PROTO, "purpose": "agent", "nonce": 12}),
        jframe({"type": "hello", "proto": PROTO, "purpose": "agent"}),
    ],
)
def test_garbage_to_a_fresh_server_is_a_protocol_error(data: bytes) -> None:
    server = ControlConnection("server", SECRET)
    with pytest.raises(ProtocolError):
        server.receive_data(data)
    assert server.data_to_send() == b""


@pytest.mark.parametrize("proto", ["udpreach/2", "udpreach/1", "udpreach/0", None, 7])
def test_a_client_of_another_version_is_told_so(proto: object) -> None:
    """An older agent would verify datagrams differently and see every cell blocked: the
    server refuses its hello, and says why in a plain error the client reports."""
    server = ControlConnection("server", SECRET)
    hello = {"type": "hello", "proto": proto, "purpose": "agent", "nonce": "11" * 16}
    with pytest.raises(ProtocolError, match="unsupported protocol"):
        server.receive_data(jframe(hello))
    client = ControlConnection("client", SECRET, purpose="agent")
    client.initiate()
    with pytest.raises(AuthError, match=f"speaks {PROTO} and this client {proto}: run the same"):
        client.receive_data(server.data_to_send())


def test_second_hello_is_refused() -> None:
    server = ControlConnection("server", SECRET)
    hello = jframe({"type": "hello", "proto": PROTO, "purpose": "agent", "nonce": "11" * 16})
    server.receive_data(hello)
    with pytest.raises(ProtocolError):
        server.receive_data(hello)


@pytest.mark.parametrize(
    "reply",
    [
        {"type": "welcome"},
        {"type": "challenge", "nonce": "11" * 16},
        {"type": "challenge", "nonce": "11" * 16, "proof": "00" * 31},
        {"type": "hello", "proto": PROTO, "purpose": "agent", "nonce": "11" * 16},
    ],
)
def test_bad_replies_to_the_client(reply: dict[str, object]) -> None:
    c = ControlConnection("client", SECRET)
    c.initiate()
    with pytest.raises(ProtocolError):
        c.receive_data(jframe(reply))


def test_client_refuses_an_unauthenticated_welcome() -> None:
    p = Pair()
    p.client.initiate()
    p.c2s()
    p.s2c()
    with pytest.raises(ProtocolError):
        p.client.receive_data(frame(b"J" + b'{"type":"welcome"}' + bytes(16)))


settings_fuzz = settings(max_examples=120, deadline=None)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3)
    ),
    max_leaves=8,
)
handshakeish = st.fixed_dictionaries(
    {"type": st.sampled_from(["hello", "auth", "challenge", "welcome", "error", "x"])},
    optional={
        "proto": st.sampled_from([PROTO, "udpreach/2"]) | json_values,
        "purpose": st.sampled_from(["agent", "control", "x"]) | json_values,
        "nonce": st.binary(min_size=15, max_size=17).map(bytes.hex) | json_values,
        "proof": st.binary(min_size=31, max_size=33).map(bytes.hex) | json_values,
        "message": json_values,
    },
)
fuzz_input = st.one_of(
    st.binary(max_size=600),
    st.binary(max_size=300).map(frame),
    st.binary(max_size=300).map(lambda b: frame(b"J" + b)),
    handshakeish.map(jframe),
    st.lists(handshakeish.map(jframe), min_size=1, max_size=4).map(b"".join),
)


@settings_fuzz
@given(fuzz_input, st.integers(1, 64))
def test_fuzz_fresh_server_raises_only_protocol_errors(data: bytes, chunk: int) -> None:
    server = ControlConnection("server", SECRET)
    try:
        events = feed(server, data, chunk)
    except (ProtocolError, AuthError):
        assert not server.is_open
        return
    assert events == []  # nobody authenticates without the secret
    assert not server.is_open


@settings_fuzz
@given(fuzz_input)
def test_fuzz_waiting_client_raises_only_protocol_errors(data: bytes) -> None:
    client = ControlConnection("client", SECRET)
    client.initiate()
    try:
        events = client.receive_data(data)
    except (ProtocolError, AuthError):
        return
    assert events == []
    assert not client.is_open


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_open_server_never_yields_events_from_forged_bytes(data: bytes) -> None:
    p = open_pair()
    try:
        events = p.server.receive_data(data)
    except ProtocolError:
        return
    assert events == []


# --- receipt batches ----------------------------------------------------------------


def test_receipts_round_trip() -> None:
    records = RECEIPT.pack(0, 5000, 40000, 1, 40000) + RECEIPT.pack(1, 5001, 1024, 3, 61000)
    payload = encode_receipts("run-7", ["198.18.2.2", "2001:2:0:99::1"], records)
    run_id, addrs, recs = decode_receipts(payload)
    assert run_id == "run-7"
    assert addrs == ["198.18.2.2", "2001:2:0:99::1"]
    assert list(RECEIPT.iter_unpack(recs)) == [
        (0, 5000, 40000, 1, 40000),
        (1, 5001, 1024, 3, 61000),
    ]


def test_receipts_through_the_channel() -> None:
    p = open_pair()
    payload = encode_receipts("r", ["198.19.0.1"], RECEIPT.pack(0, 1, 2, 3, 4))
    p.client.send_receipts(payload)
    (ev,) = p.c2s()
    assert isinstance(ev, Receipts)
    assert decode_receipts(ev.payload)[0] == "r"


def test_too_many_addresses_refused() -> None:
    with pytest.raises(ValueError, match="255"):
        encode_receipts("r", [f"198.19.{i // 256}.{i % 256}" for i in range(256)], b"")


GOOD = encode_receipts(
    "run-7", ["198.18.2.2", "198.19.11.1"], RECEIPT.pack(0, 5000, 40000, 1, 40000)
)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x00",
        b"\x00\x05run",  # run id cut short
        b"\x00\x03run",  # no address count
        b"\x00\x03run\x01",  # an address announced, none given
        b"\x00\x03run\x01\x09short",  # address cut short
        b"\x00\x02\xff\xfe\x00",  # run id not UTF-8
        b"\x00\x01r\x01\x02\xff\xfe",  # address not UTF-8
        GOOD + b"\x01",  # a partial record
        GOOD[:-1],
        GOOD[:-7],
    ],
)
def test_malformed_receipts(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_receipts(payload)


@settings(max_examples=100)
@given(
    run_id=st.text(max_size=40),
    addrs=st.lists(st.text(max_size=30).filter(lambda a: len(a.encode()) < 256), max_size=6),
    records=st.lists(
        st.tuples(
            st.integers(0, 255),
            st.integers(0, 65535),
            st.integers(0, 65535),
            st.integers(0, 255),
            st.integers(0, 65535),
        ),
        max_size=20,
    ),
)
def test_receipts_round_trip_property(
    run_id: str, addrs: list[str], records: list[tuple[int, int, int, int, int]]
) -> None:
    raw = b"".join(RECEIPT.pack(*r) for r in records)
    got_id, got_addrs, recs = decode_receipts(encode_receipts(run_id, addrs, raw))
    assert (got_id, got_addrs) == (run_id, addrs)
    assert list(RECEIPT.iter_unpack(recs)) == records


@settings(max_examples=300)
@given(st.binary(max_size=80))
def test_decode_receipts_raises_only_protocol_errors(payload: bytes) -> None:
    try:
        _run_id, _addrs, recs = decode_receipts(payload)
    except ProtocolError:
        return
    assert len(recs) % RECEIPT.size == 0


# --- malformed content in authentic frames, refusals at a limit -----------------------------


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b'{"type":"run_start","size":Infinity}', "Infinity is not a JSON number"),
        (b'{"type":"run_start","size":NaN}', "NaN is not a JSON number"),
        (b'{"type":"run_start","size":1e400}', "out of range"),
        (b"[1,2]", "not an object with a type"),
        (b'{"size":16}', "not an object with a type"),
        (b"\xff\xfe", "not JSON"),
        (b"[" * 50_000, "not JSON"),
    ],
)
def test_an_authentic_but_malformed_message_is_an_event_not_a_break(
    payload: bytes, why: str
) -> None:
    p = open_pair()
    p.server._send_frame(b"J", payload)  # as a buggy or hostile peer would
    p.server.send({"type": "ping", "seq": 1})
    events = p.s2c()
    assert len(events) == 2
    assert isinstance(events[0], Malformed)
    assert why in events[0].reason
    assert events[1] == Message({"type": "ping", "seq": 1})  # the connection goes on
    assert p.client.is_open


def test_non_finite_numbers_are_never_sent() -> None:
    p = open_pair()
    with pytest.raises(ProtocolError, match="non-finite"):
        p.client.send({"type": "flushed", "seq": float("inf")})


def test_a_refusal_at_a_connection_limit_is_its_own_error() -> None:
    server = ControlConnection("server", SECRET)
    server.refuse("connection limit reached: too many", code="limit")
    client = ControlConnection("client", SECRET)
    client.initiate()
    with pytest.raises(ConnectionLimitError, match="connection limit reached: too many"):
        client.receive_data(server.data_to_send())


def test_the_long_term_key_is_dropped_after_the_handshake() -> None:
    p = open_pair()
    for conn in (p.client, p.server):
        assert conn._secret == b""
        assert conn._key == b""


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.none(), st.integers(), st.text(max_size=80), st.lists(st.integers(), max_size=3)),
    st.sampled_from(["agent", "control"]),
)
def test_fuzz_key_ids_in_a_hello_raise_only_protocol_errors(key_id: object, purpose: str) -> None:
    """Whatever a stranger puts in the hello's ``id``, the server answers a challenge (for an
    id it does not know, with a proof nobody can check) or refuses as a protocol error."""
    grants = {"pc-17": Grant("agent", b"k" * 32)}
    server = ControlConnection("server", None, keys=grants.get)
    hello = {"type": "hello", "proto": PROTO, "purpose": purpose, "nonce": "11" * 16, "id": key_id}
    try:
        events = server.receive_data(jframe(hello))
    except ProtocolError:
        return
    assert events == []
    (reply,) = [json.loads(server.data_to_send()[5:])]
    assert set(reply) == {"type", "nonce", "proof"}
