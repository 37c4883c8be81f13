"""The control endpoint under hostile clients, over real loopback sockets.

One in-process coordinator per test (``Coordinator(...).serve`` on 127.0.0.1, port 0) with
small limits, a real agent registered with it where the test needs one, and raw TCP clients
that misbehave: oversize length headers, silence, slow drip-feeding, half-open connections,
garbage, wrong proofs. Bad clients connect from other loopback addresses (127.0.0.5...) so
that the per-address cap applies to them and not to the well-behaved client on 127.0.0.1.
Every test runs under ``trio.fail_after``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from functools import partial
from typing import Any

import pytest
import trio

from agent.service import AgentConfig, run_agent
from probe.admission import Limits
from probe.coordinator import Coordinator, ProbeConfig
from udpreach.core.errors import UnreachableError
from udpreach.core.framing import MAX_FRAME, MAX_PREAUTH, PROTO
from udpreach.net.channel import connect
from udpreach.net.client import list_agents, request_run

SECRET = b"control-plane-test-secret-0123456789"
AGENT_NAME = "hidden-agent-7f3e"  # must never reach an unauthenticated client
DEADLINE = 30
BAD = "127.0.0.5"  # where misbehaving clients connect from


# --- harness ----------------------------------------------------------------------------


@asynccontextmanager
async def coordinator(
    *, with_agent: bool = True, limits: Limits | None = None, **settings: Any
) -> AsyncIterator[dict[str, Any]]:
    """A coordinator on 127.0.0.1 (and a registered agent, unless told otherwise).

    Penalties are off unless *limits* says otherwise: these tests send many bad handshakes
    from one address on purpose (penalties have tests of their own)."""
    cfg = ProbeConfig(
        host="127.0.0.1", port=0, secret=SECRET, source="127.0.0.2", use_store=False,
        limits=limits or Limits(penalty_points=math.inf), **settings,
    )  # fmt: skip
    coord = Coordinator(cfg)
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(coord.serve)
        if with_agent:
            acfg = AgentConfig(
                host=host, port=port, secret=SECRET, ports=(0,), name=AGENT_NAME,
                listen="127.0.0.1", once=True,
            )  # fmt: skip
            await nursery.start(run_agent, acfg)
            assert await coord.wait_agent(AGENT_NAME, 10) is not None
        yield {"coord": coord, "host": host, "port": port}
        nursery.cancel_scope.cancel()


async def raw(h: dict[str, Any], local: str = BAD) -> trio.SocketStream:
    """A plain TCP connection to the coordinator from *local*."""
    return await trio.open_tcp_stream(h["host"], h["port"], local_address=local)


async def read_to_close(stream: trio.SocketStream, within: float) -> bytes:
    """Everything the server sends until it closes; fails if it is still open after *within*."""
    buf = bytearray()
    with trio.fail_after(within):
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:  # reset: closed all the same
                break
            if not data:
                break
            buf += data
    await stream.aclose()
    return bytes(buf)


async def still_open(stream: trio.SocketStream, for_: float = 0.3) -> bool:
    """True if the server neither closes nor sends anything for *for_* seconds."""
    with trio.move_on_after(for_):
        with suppress(trio.BrokenResourceError):
            await stream.receive_some(1)
        return False
    return True


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def jframe(obj: object) -> bytes:
    return frame(b"J" + json.dumps(obj).encode())


def hello(purpose: str = "control", nonce: bytes | None = None) -> bytes:
    nonce = nonce if nonce is not None else random.randbytes(16)
    return jframe({"type": "hello", "proto": PROTO, "purpose": purpose, "nonce": nonce.hex()})


def frames(data: bytes) -> list[dict[str, Any]]:
    """Parse what the server sent before authentication: JSON frames only, nothing else."""
    out = []
    pos = 0
    while pos < len(data):
        assert len(data) - pos >= 4, f"truncated frame header: {data[pos:]!r}"
        (n,) = struct.unpack_from(">I", data, pos)
        body = data[pos + 4 : pos + 4 + n]
        assert len(body) == n, "truncated frame"
        assert body[:1] == b"J", f"non-JSON frame before authentication: {body!r}"
        out.append(json.loads(body[1:]))
        pos += 4 + n
    return out


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def coordinator_log() -> Iterator[list[logging.LogRecord]]:
    """Records of logger ``udpreach.coordinator`` (attached directly: robust to propagate)."""
    logger = logging.getLogger("udpreach.coordinator")
    handler = _Collect()
    old = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


async def good_list(h: dict[str, Any]) -> list[str]:
    return [a["name"] for a in await list_agents(h["host"], h["port"], SECRET)]


# --- size caps --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [MAX_PREAUTH + 1, 10_000_000, 0xFFFFFFFF, 0],
    ids=["just-over", "10M", "4G", "zero"],
)
async def test_oversize_length_header_before_auth_is_refused_and_closed(header: int) -> None:
    with trio.fail_after(DEADLINE):
        async with coordinator(with_agent=False, handshake_timeout=10) as h:
            s = await raw(h)
            await s.send_all(struct.pack(">I", header) + b"J{")
            t0 = trio.current_time()
            got = await read_to_close(s, within=2)
            # Refused on sight of the header, not after the 10 s handshake deadline.
            assert trio.current_time() - t0 < 1.0
            assert got == b""
            # The coordinator is unharmed.
            s2 = await raw(h)
            await s2.send_all(hello())
            assert [f["type"] for f in frames(await s2.receive_some(4096))] == ["challenge"]
            await s2.aclose()


async def test_largest_preauth_frame_is_still_parsed() -> None:
    """The cap is exactly MAX_PREAUTH: a hello padded to the limit is answered."""
    with trio.fail_after(DEADLINE):
        async with coordinator(with_agent=False) as h:
            obj = {"type": "hello", "proto": PROTO, "purpose": "control", "nonce": "ab" * 16}
            obj["x"] = ""
            obj["x"] = "p" * (MAX_PREAUTH - len(b"J" + json.dumps(obj).encode()))
            body = b"J" + json.dumps(obj).encode()
            assert len(body) == MAX_PREAUTH
            s = await raw(h)
            await s.send_all(frame(body))
            assert [f["type"] for f in frames(await s.receive_some(4096))] == ["challenge"]
            await s.aclose()


async def test_oversize_frame_after_auth_is_refused_and_closed() -> None:
    with trio.fail_after(DEADLINE):
        async with coordinator(with_agent=False, handshake_timeout=10) as h:
            chan = await connect(h["host"], h["port"], SECRET, "control", 5)
            await chan.stream.send_all(struct.pack(">I", MAX_FRAME + 1))
            t0 = trio.current_time()
            with pytest.raises(UnreachableError):
                await chan.next_event()
            assert trio.current_time() - t0 < 1.0
            await chan.aclose()


# --- time caps --------------------------------------------------------------------------


async def test_silent_client_is_dropped_after_the_handshake_timeout() -> None:
    with trio.fail_after(DEADLINE):
        async with coordinator(with_agent=False, handshake_timeout=0.5) as h:
            s = await raw(h)
            t0 = trio.current_time()
            assert await read_to_close(s, within=3) == b""
            assert 0.4 <= trio.current_time() - t0 < 2.0


async def test_slow_drip_client_is_dropped_at_the_handshake_deadline() -> None:
    """The deadline covers the whole handshake, not each read: drip-feeding does not help."""
    with trio.fail_after(DEADLINE):
        async with coordinator(with_agent=False, handshake_timeout=0.5) as h:
            s = await raw(h)
            data = hello()
            t0 = trio.current_time()
            closed_after: float | None = None
            for i in range(len(data)):  # ~100 bytes, one per 50 ms: ~5 s if never cut off
                try:
                    await s.send_all(data[i : i + 1])
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    closed_after = trio.current_time() - t0
                    break
                if not await still_open(s, 0.05):
                    closed_after = trio.current_time() - t0
                    break
            await s.aclose()
            assert closed_after is not None, "a drip-feeding client was never dropped"
            assert 0.4 <= closed_after < 2.0


@pytest.mark.parametrize("purpose", ["control", "agent"])
async def test_authenticated_but_silent_client_is_dropped(purpose: str) -> None:
    """After the handshake a control client must ask and an agent must register, in time."""
    with trio.fail_after(DEADLINE):
        async with coordinator(with_agent=False, handshake_timeout=0.5) as h:
            chan = await connect(h["host"], h["port"], SECRET, purpose, 5)
            t0 = trio.current_time()
            with pytest.raises(UnreachableError):
                with trio.fail_after(3):
                    await chan.next_event()
            assert 0.4 <= trio.current_time() - t0 < 2.0
            await chan.aclose()
            assert h["coord"].agents == {}


async def test_half_open_client_is_dropped_at_once() -> None:
    with trio.fail_after(DEADLINE):
        async with coordinator(with_agent=False, handshake_timeout=10) as h:
            s = await raw(h)
            await s.send_all(hello()[:7])  # a partial frame, then end of stream
            await s.send_eof()
            t0 = trio.current_time()
            assert await read_to_close(s, within=2) == b""
            assert trio.current_time() - t0 < 1.0


# --- connection caps ---------------------------------------------------------------------


def _limit_refusal(data: bytes) -> dict[str, Any]:
    (refusal,) = frames(data)
    assert (refusal["type"], refusal["code"]) == ("error", "limit"), refusal
    assert refusal["message"].startswith("connection limit reached"), refusal
    return refusal


async def test_startups_per_network_drop_the_oldest_not_the_newcomer() -> None:
    """A network's share of unauthenticated connections is full: its oldest connection is
    dropped (and told why), the newcomer stays; the registered agent is not counted."""
    limits = Limits(startups=100, startups_per_network=3, penalty_points=math.inf)
    with trio.fail_after(DEADLINE):
        async with coordinator(handshake_timeout=10, limits=limits) as h:
            held = [await raw(h, "127.0.0.5") for _ in range(3)]
            assert all([await still_open(s) for s in held])
            newcomer = await raw(h, "127.0.0.6")  # the same /24
            t0 = trio.current_time()
            _limit_refusal(await read_to_close(held[0], within=2))
            assert trio.current_time() - t0 < 0.5
            assert await still_open(newcomer)
            assert all([await still_open(s) for s in held[1:]])
            assert h["coord"].admission.startups == 3
            # A client from that very network still gets through, and the agent is listed.
            assert await good_list(h) == [AGENT_NAME]
            for s in [*held[1:], newcomer]:
                await s.aclose()


async def test_a_full_startup_budget_drops_from_the_network_holding_the_most() -> None:
    limits = Limits(startups=4, startups_per_network=10, v4_prefix=32, penalty_points=math.inf)
    with trio.fail_after(DEADLINE):
        async with coordinator(with_agent=False, handshake_timeout=10, limits=limits) as h:
            hog = [await raw(h, "127.0.0.5") for _ in range(3)]
            other = await raw(h, "127.0.0.6")
            assert all([await still_open(s) for s in [*hog, other]])
            late = await raw(h, "127.0.0.7")
            _limit_refusal(await read_to_close(hog[0], within=2))
            assert await still_open(other)
            assert await still_open(late)
            for s in [*hog[1:], other, late]:
                await s.aclose()


async def test_authenticated_sessions_have_slots_of_their_own() -> None:
    """Agents cannot take the requesters' slots; a full pool says so, in one line."""
    limits = Limits(agents=1, requesters=2, penalty_points=math.inf)
    with trio.fail_after(DEADLINE):
        async with coordinator(limits=limits) as h:  # its agent takes the only agent slot
            chan = await connect(h["host"], h["port"], SECRET, "agent", 5)
            try:
                refusal = (await chan.next_message()).body
            finally:
                await chan.aclose()
            assert refusal == {
                "type": "error",
                "code": "limit",
                "message": "connection limit reached: 1 agent sessions at once",
            }
            assert await good_list(h) == [AGENT_NAME]
            idle = [await connect(h["host"], h["port"], SECRET, "control", 5) for _ in range(2)]
            with pytest.raises(UnreachableError, match="connection limit reached: 2 requests"):
                await list_agents(h["host"], h["port"], SECRET)
            for c in idle:
                await c.aclose()
            for _ in range(100):
                if h["coord"].admission.sessions["requester"] == 0:
                    break
                await trio.sleep(0.02)
            assert await good_list(h) == [AGENT_NAME]


async def test_failing_addresses_are_refused_for_a_while_and_recover() -> None:
    limits = Limits(penalty_points=5, penalty_min=1.0, leak_per_second=0.0)
    with trio.fail_after(DEADLINE), coordinator_log() as records:
        async with coordinator(with_agent=False, limits=limits) as h:
            for _ in range(5):
                s = await raw(h, "127.0.0.30")
                await s.send_all(jframe({"type": "auth", "proof": "00" * 32}))
                assert await read_to_close(s, within=2) == b""
            s = await raw(h, "127.0.0.30")
            (refusal,) = frames(await read_to_close(s, within=2))
            assert refusal["code"] == "limit"
            assert "too many failed handshakes from 127.0.0.30" in refusal["message"]
            # Another address of the same network is not punished for it.
            ok = await raw(h, "127.0.0.31")
            await ok.send_all(hello())
            assert [f["type"] for f in frames(await ok.receive_some(4096))] == ["challenge"]
            await ok.aclose()
            await trio.sleep(1.1)
            again = await raw(h, "127.0.0.30")
            await again.send_all(hello())
            assert [f["type"] for f in frames(await again.receive_some(4096))] == ["challenge"]
            await again.aclose()
    assert any("too many failed handshakes" in r.getMessage() for r in records)


async def test_an_address_that_authenticated_is_never_penalized() -> None:
    """Attackers behind the client's own address (a NAT, or the same host) cannot get the
    genuine client refused by failing on purpose."""
    limits = Limits(penalty_points=3, penalty_min=60.0)
    with trio.fail_after(DEADLINE):
        async with coordinator(with_agent=False, limits=limits) as h:
            assert await good_list(h) == []  # 127.0.0.1 authenticated
            for _ in range(10):
                s = await raw(h, "127.0.0.1")
                await s.send_all(jframe({"type": "auth", "proof": "00" * 32}))
                await read_to_close(s, within=2)
            assert await good_list(h) == []


# --- bad clients never delay good ones ------------------------------------------------


async def _silent(s: trio.SocketStream) -> None:
    await trio.sleep_forever()


async def _drip(s: trio.SocketStream) -> None:
    for b in hello():
        await s.send_all(bytes([b]))
        await trio.sleep(0.2)
    await trio.sleep_forever()


async def _half_frame(s: trio.SocketStream) -> None:
    await s.send_all(struct.pack(">I", MAX_PREAUTH) + b"J" + b"x" * 100)  # body never finished
    await trio.sleep_forever()


async def _half_closed(s: trio.SocketStream) -> None:
    await s.send_all(hello())  # challenge arrives and is never read; no auth ever comes
    await trio.sleep_forever()


async def _garbage(s: trio.SocketStream) -> None:
    rng = random.Random(1)
    for _ in range(100):
        try:
            await s.send_all(rng.randbytes(4096))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            break  # the coordinator hung up on the garbage, as it should
        await trio.sleep(0.01)
    else:
        raise AssertionError("the coordinator kept reading garbage")
    await trio.sleep_forever()


async def test_bad_clients_never_delay_a_good_one() -> None:
    with trio.fail_after(DEADLINE):
        async with coordinator(handshake_timeout=20) as h:
            async with trio.open_nursery() as nursery:
                held = []
                for behave in (_silent, _drip, _half_frame, _half_closed, _garbage):
                    for _ in range(5):
                        s = await raw(h)
                        held.append(s)
                        nursery.start_soon(behave, s)
                # Authenticated clients that never ask for anything.
                idle = [await connect(h["host"], h["port"], SECRET, "control", 5) for _ in range(3)]
                await trio.sleep(0.3)
                t0 = trio.current_time()
                assert await good_list(h) == [AGENT_NAME]
                assert trio.current_time() - t0 < 1.0
                t0 = trio.current_time()
                doc = await request_run(
                    h["host"], h["port"], SECRET, agent=AGENT_NAME,
                    plan={"src_ports": "1024-4095"}, wait=0, expect=None,
                    on_progress=lambda p: None,
                )  # fmt: skip
                assert trio.current_time() - t0 < 10.0
                assert doc["complete"] is True
                assert doc["summary"]["open"] == 3072
                # The well-behaved ones really were still being held meanwhile.
                assert len(h["coord"]._live) >= 20
                for c in idle:
                    await c.aclose()
                nursery.cancel_scope.cancel()
            for s in held:
                await s.aclose()


# --- nothing revealed before authentication --------------------------------------------


def _hostile_openers() -> list[tuple[str, bytes]]:
    rng = random.Random(6)
    bad_nonce = {"type": "hello", "proto": PROTO, "purpose": "control", "nonce": 12}
    return [
        ("random", rng.randbytes(2000)),
        ("random-small-header", struct.pack(">I", 300) + rng.randbytes(300)),
        ("not-json", frame(b"J" + b"\xff\xfe{{{")),
        ("binary-kind", frame(b"R" + rng.randbytes(40))),
        ("json-list", frame(b"J[1,2,3]")),
        ("no-type", jframe({"proto": PROTO})),
        ("agents-first", jframe({"type": "agents"})),
        ("run-first", jframe({"type": "run", "agent": AGENT_NAME})),
        ("auth-first", jframe({"type": "auth", "proof": "00" * 32})),
        ("wrong-proto", jframe({"type": "hello", "proto": "udpreach/0", "purpose": "control"})),
        ("bad-nonce", jframe(bad_nonce)),
        ("bad-purpose", jframe({"type": "hello", "proto": PROTO, "purpose": "admin"})),
        ("deep-json", frame(b"J" + b"[" * 400 + b"]" * 100)),
        ("http", b"GET /agents HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("tls", bytes.fromhex("16030100a5010000a10303") + rng.randbytes(160)),
    ]


async def test_nothing_is_revealed_before_authentication() -> None:
    with trio.fail_after(DEADLINE), coordinator_log() as records:
        async with coordinator(handshake_timeout=2) as h:
            seen: dict[str, bytes] = {}
            for label, opener in _hostile_openers():
                s = await raw(h)
                await s.send_all(opener)
                seen[label] = await read_to_close(s, within=4)
            # A hello, then (instead of a valid proof) requests or a wrong proof.
            for label, follow in [
                ("wrong-proof", jframe({"type": "auth", "proof": random.randbytes(32).hex()})),
                ("agents-instead-of-auth", jframe({"type": "agents"})),
                ("short-proof", jframe({"type": "auth", "proof": "00"})),
                ("replayed-hello", hello()),
            ]:
                s = await raw(h)
                await s.send_all(hello())
                first = await s.receive_some(4096)  # the challenge, read before going on
                await s.send_all(follow)
                seen[label] = first + await read_to_close(s, within=4)
            # Another version is told which one this is (a version is no secret), and no more.
            assert frames(seen.pop("wrong-proto")) == [
                {
                    "type": "error",
                    "code": "protocol",
                    "message": f"the coordinator speaks {PROTO} and this client udpreach/0:"
                    " run the same udpreach version on both ends",
                }
            ]
            for label, got in seen.items():
                assert AGENT_NAME.encode() not in got, label
                kinds = [f["type"] for f in frames(got)]
                assert kinds in ([], ["challenge"], ["challenge", "error"]), (label, kinds)
                for f in frames(got):
                    if f["type"] == "error":
                        assert f == {
                            "type": "error",
                            "code": "auth",
                            "message": "authentication refused",
                        }
                    if f["type"] == "challenge":
                        assert set(f) == {"type", "nonce", "proof"}
            assert [f["type"] for f in frames(seen["wrong-proof"])] == ["challenge", "error"]
            # The same coordinator does tell an authenticated client (the test can fail).
            assert await good_list(h) == [AGENT_NAME]
    # Hostile input is an expected failure, never an internal error.
    errors = [r.getMessage() for r in records if r.levelno >= logging.ERROR]
    assert errors == []


# --- failed authentications are logged, with the address, rate-limited -------------------


_FAIL_RE = re.compile(r"^authentication failed from (\S+): .*?(?: \((\d+) more suppressed\))?$")


async def test_failed_authentications_are_logged_with_address_and_rate_limited() -> None:
    burst = 40
    with trio.fail_after(DEADLINE), coordinator_log() as records:
        async with coordinator(with_agent=False) as h:
            for i in range(burst):
                s = await raw(h, f"127.0.0.{10 + i % 3}")
                await s.send_all(hello())
                await s.receive_some(4096)
                await s.send_all(jframe({"type": "auth", "proof": "11" * 32}))
                await read_to_close(s, within=2)
            await trio.sleep(1.1)  # past the rate limit: the next failure reports the rest
            s = await raw(h, "127.0.0.20")
            await s.send_all(struct.pack(">I", 1 << 30))
            await read_to_close(s, within=2)
            await trio.sleep(2.1)  # room for a coordinator that reports suppressions on a timer
    lines = [r.getMessage() for r in records if "authentication" in r.getMessage()]
    assert 2 <= len(lines) <= 6, lines  # a handful, not one per failure
    assert lines[0].startswith("authentication failed from 127.0.0.10: ")
    assert "wrong secret" in lines[0]
    # Every failure is accounted for: logged with its address, or counted as suppressed
    # (with the next logged one, or on its own line).
    accounted = 0
    for m in lines:
        if (hit := _FAIL_RE.match(m)) is not None:
            accounted += 1 + int(hit.group(2) or 0)
        else:
            count = re.search(r"(\d+) more .*suppressed", m)
            assert count is not None, m
            accounted += int(count.group(1))
    assert accounted == burst + 1, lines
    assert all(r.levelno == logging.WARNING for r in records if r.getMessage() in lines)


async def test_dropped_connections_do_not_flood_the_log() -> None:
    limits = Limits(startups_per_network=1, penalty_points=math.inf)
    with trio.fail_after(DEADLINE), coordinator_log() as records:
        async with coordinator(with_agent=False, handshake_timeout=10, limits=limits) as h:
            prev = await raw(h)
            for _ in range(50):
                s = await raw(h)
                _limit_refusal(await read_to_close(prev, within=2))
                prev = s
            await prev.aclose()
    drops = [r for r in records if "dropping the oldest" in r.getMessage()]
    assert 1 <= len(drops) <= 5


async def test_suppressed_failures_are_reported_even_when_the_burst_stops() -> None:
    with trio.fail_after(DEADLINE), coordinator_log() as records:
        async with coordinator(with_agent=False) as h:
            for _ in range(20):
                s = await raw(h)
                await s.send_all(struct.pack(">I", 1 << 30))
                await read_to_close(s, within=2)
            await trio.sleep(2.5)  # no further failures
    text = " ".join(r.getMessage() for r in records)
    assert re.search(r"\b19\b.*suppressed|suppressed.*\b19\b", text), text


async def test_a_coordinator_that_closes_during_the_handshake_is_named_as_such() -> None:
    """An older coordinator closes on our hello without a word: the client's error says
    the handshake was cut and which protocol it speaks, not just "closed by peer"."""

    async def hang_up(stream: trio.SocketStream) -> None:
        with trio.move_on_after(5):
            await stream.receive_some(4096)  # the hello
        await stream.aclose()

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"), hang_up, 0)
            listener = listeners[0]
            assert isinstance(listener, trio.SocketListener)
            port = listener.socket.getsockname()[1]
            with pytest.raises(UnreachableError) as info:
                await connect("127.0.0.1", port, SECRET, "control", within=5)
            nursery.cancel_scope.cancel()
    message = str(info.value)
    assert "closed the connection during the handshake" in message
    assert PROTO in message


async def test_a_coordinator_name_that_does_not_resolve_is_said_so() -> None:
    """The agent said "coordinator X did not answer in 5s from 0.0.0.0" for a typo in the
    coordinator's name (the lookup took the whole dial's time)."""
    with trio.fail_after(DEADLINE), pytest.raises(UnreachableError) as info:
        # .invalid never resolves (RFC 2606); a resolver that cannot be reached times out
        await connect(
            "nosuchhost.invalid", 7870, SECRET, "agent", within=3, local_address="0.0.0.0"
        )
    message = str(info.value)
    assert message.startswith("cannot resolve the coordinator's host 'nosuchhost.invalid'")
    assert "0.0.0.0" not in message
    with trio.fail_after(DEADLINE), pytest.raises(UnreachableError) as info:
        await connect("a..b", 7870, SECRET, "agent", within=3)  # not even a name (IDNA)
    assert str(info.value) == "cannot resolve the coordinator's host 'a..b': not a valid host name"


async def test_partial_frames_share_one_memory_budget() -> None:
    """Many authenticated connections each holding the start of a large frame: together
    they cannot make the coordinator hold more than its budget."""
    with trio.fail_after(DEADLINE):
        async with coordinator(with_agent=False, handshake_timeout=10) as h:
            h["coord"]._budget.limit = 3 * 1024 * 1024 + 1024
            chans = [await connect(h["host"], h["port"], SECRET, "control", 5) for _ in range(5)]
            cut = set()
            for i, chan in enumerate(chans):
                # The header of a 2 MiB frame (within MAX_FRAME), then 1 MiB of its body.
                try:
                    await chan.stream.send_all(struct.pack(">I", 2 << 20) + b"J" * (1 << 20))
                except trio.BrokenResourceError:
                    cut.add(i)
                await trio.sleep(0.2)
            for i, chan in enumerate(chans):
                if not await still_open(chan.stream, 0.2):  # type: ignore[arg-type]
                    cut.add(i)
            assert len(cut) == 2, cut  # 3 MiB held, the rest refused
            assert h["coord"]._budget.held <= 3 * 1024 * 1024 + 1024
            for chan in chans:
                await chan.aclose()
            for _ in range(100):
                if h["coord"]._budget.held == 0:
                    break
                await trio.sleep(0.02)
            assert h["coord"]._budget.held == 0  # given back when connections close
            assert await good_list(h) == []


async def test_an_agent_answers_junk_then_gives_up_on_its_coordinator() -> None:
    """A coordinator that keeps sending malformed messages: the agent answers each with an
    error, and after BAD_MESSAGES of them drops the session (to reconnect) instead of
    answering forever."""
    from agent.service import BAD_MESSAGES
    from udpreach.core.errors import ProtocolError
    from udpreach.core.framing import ControlConnection, Message
    from udpreach.net.channel import Channel

    answers: list[dict[str, Any]] = []

    async def junk(stream: trio.SocketStream) -> None:
        chan = Channel(stream, ControlConnection("server", SECRET))
        try:
            await chan.server_handshake()
            await chan.next_message()
            await chan.send({"type": "registered", "observed": "127.0.0.1"})
            for _ in range(BAD_MESSAGES + 5):
                chan.conn._send_frame(b"J", b'{"type":"flush","seq":-1}')
                await chan._flush()
                ev = await chan.next_event()
                assert isinstance(ev, Message)
                answers.append(ev.body)
        except UnreachableError:
            pass
        finally:
            await chan.aclose()

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"), junk, 0)
            port = listeners[0].socket.getsockname()[1]
            cfg = AgentConfig(host="127.0.0.1", port=port, secret=SECRET, ports=(0,),
                              name="patient", listen="127.0.0.1", once=True)  # fmt: skip
            with pytest.raises(ProtocolError, match=f"sent {BAD_MESSAGES + 1} malformed"):
                await run_agent(cfg)
            nursery.cancel_scope.cancel()
    assert len(answers) == BAD_MESSAGES
    assert all(a["type"] == "error" and a["re"] == "flush" for a in answers)
    assert "'seq' must be 0-" in answers[0]["message"]
