"""The raw-socket sender (probe.raw) on loopback, and the choice of send mode.

Loopback checks UDP checksums, so a datagram that arrives also proves its checksum right.
Every wait is bounded: sockets have timeouts and ICMP errors are polled against a deadline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import probe.raw
from probe.raw import RawSender, make_sender, raw_available
from probe.sender import BindSender, CellBatch, GroupResult, IcmpEvent, fd_runs
from udpreach.core.block import Block
from udpreach.core.errors import ConfigError

RAW4 = raw_available()
RAW6 = raw_available(ipv6=True)
needs_raw4 = pytest.mark.skipif(RAW4 is not None, reason=f"raw IPv4 sockets: {RAW4}")
needs_raw6 = pytest.mark.skipif(RAW6 is not None, reason=f"raw IPv6 sockets: {RAW6}")

SRC4, DST4 = "127.0.0.2", "127.0.0.1"
WAIT = 3.0


def _ipv6_loopback() -> str | None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError as exc:
        return f"no IPv6 loopback: {exc}"
    return None


NO_V6 = _ipv6_loopback()
needs_v6 = pytest.mark.skipif(NO_V6 is not None, reason=str(NO_V6))


@contextlib.contextmanager
def udp(addr: str, port: int = 0) -> Iterator[socket.socket]:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)  # a burst must fit
        s.bind((addr, port))
        s.settimeout(WAIT)
        yield s


@contextlib.contextmanager
def raw(source: str, target: str) -> Iterator[RawSender]:
    sender = RawSender(source, target)
    try:
        yield sender
    finally:
        sender.close()


def closed_port(addr: str) -> int:
    """A port nothing listens on (just released by the kernel)."""
    with udp(addr) as s:
        return int(s.getsockname()[1])


def receive(sock: socket.socket, count: int) -> dict[bytes, tuple[str, int]]:
    got: dict[bytes, tuple[str, int]] = {}
    for _ in range(count):
        data, addr = sock.recvfrom(2048)  # times out after WAIT: a lost datagram fails
        got[data] = (addr[0], addr[1])
    return got


def collect(sender: RawSender, want: int, wait: float = WAIT) -> list[IcmpEvent]:
    """Reap until ``want`` events arrived or ``wait`` passed, then once more for strays;
    without their arrival stamps (``test_raw_mode_stamps_...`` checks those)."""
    events: list[IcmpEvent] = []
    deadline = time.monotonic() + wait

    def reap(**kw: bool) -> list[IcmpEvent]:
        got = sender.reap(time.monotonic(), **kw)
        return [dataclasses.replace(e, at=None) for e in got]

    while len(events) < want and time.monotonic() < deadline:
        events += reap()
        time.sleep(0.01)
    time.sleep(0.05)
    events += reap(everything=True)
    return events


def by_dst(groups: list[tuple[int, list[tuple[int, bytes]]]], blocks: bool = False) -> CellBatch:
    """The sender's batch form from per-source-port groups [(src, [(dst, payload)])]; with
    ``blocks`` each port's payloads (of one length) come as a Block, as the runner's do."""
    out: dict[int, tuple[list[int], list[bytes]]] = {}
    for src, items in groups:
        for dst, payload in items:
            srcs, payloads = out.setdefault(dst, ([], []))
            srcs.append(src)
            payloads.append(payload)
    if blocks:
        return {d: (ss, Block(b"".join(ps), len(ps[0]))) for d, (ss, ps) in out.items()}
    return out


# -- IPv4 ---------------------------------------------------------------------------------


@needs_raw4
def test_raw_ipv4_delivers_exact_payloads_from_the_chosen_source_ports() -> None:
    with udp(DST4) as rx, udp(SRC4) as busy, raw(SRC4, DST4) as sender:
        port = rx.getsockname()[1]
        busy_port = busy.getsockname()[1]  # bound on this host: bind mode could not use it
        results = sender.send_cells(
            by_dst([(busy_port, [(port, b"from-a-busy-port")]), (1024, [(port, b"lowest-high")])])
        )
        single = sender.send_group(65535, [(port, b"highest" * 3)], 0.0)
        assert results is None  # everything went out
        assert single == GroupResult([port])
        assert receive(rx, 3) == {
            b"from-a-busy-port": (SRC4, busy_port),
            b"lowest-high": (SRC4, 1024),
            b"highest" * 3: (SRC4, 65535),
        }
        assert sender.sent == 3


def test_bind_mode_cannot_use_the_busy_port_that_raw_mode_can() -> None:
    with udp(SRC4) as busy, udp(DST4) as rx:
        bind = BindSender(SRC4, DST4)
        busy_port, port = busy.getsockname()[1], rx.getsockname()[1]
        try:
            result = bind.send_group(busy_port, [(9, b"x" * 16)], 0.0)
            free = closed_port(SRC4)
            batch = by_dst([(free, [(port, b"y" * 16)]), (busy_port, [(port, b"z" * 16)])])
            results = bind.send_cells(batch, 0.0)
            bind.reap(1.0, everything=True)  # closes the lingering socket of ``free``
            assert bind.send_cells(by_dst([(free, [(port, b"w" * 16)])]), 0.1) is None
            assert receive(rx, 2) == {b"y" * 16: (SRC4, free), b"w" * 16: (SRC4, free)}
        finally:
            bind.close()
    assert result.sent == []
    assert result.untested is not None
    assert "in use" in result.untested
    assert results is not None
    assert dict(results)[free] == GroupResult([port])
    assert dict(results)[busy_port].sent == []
    assert "in use" in (dict(results)[busy_port].untested or "")


def test_bind_mode_sends_again_from_a_port_whose_socket_still_lingers() -> None:
    """The rest of a group held back by backpressure goes out from the same lingering
    socket; binding the port anew would fail against our own socket ("in use")."""
    bind = BindSender(SRC4, DST4, linger=10.0)
    try:
        with udp(DST4) as rx:
            port = rx.getsockname()[1]
            src = closed_port(SRC4)
            first = bind.send_group(src, [(port, b"first" * 4)], 0.0)
            again = bind.send_group(src, [(port, b"again" * 4)], 0.1)
            assert first == again == GroupResult([port])
            assert receive(rx, 2) == {b"first" * 4: (SRC4, src), b"again" * 4: (SRC4, src)}
            assert bind.free_slots() == bind.max_open - 1  # one socket, lingering once
            bind.reap(100.0)
            assert bind.free_slots() == bind.max_open
            assert bind.send_group(src, [(port, b"later" * 4)], 101.0) == GroupResult([port])
    finally:
        bind.close()


def test_bind_mode_maps_port_unreachable_to_its_cell_and_reads_only_flagged_sockets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bind mode: the error comes back on the lingering socket of its source port; reap
    reads the error queue of exactly the sockets poll() flags, and closes them all."""
    dead = closed_port(DST4)
    bind = BindSender(SRC4, DST4, linger=0.0)
    drained: list[int] = []
    real_drain = bind._drain

    def spy(src: int, s: Any) -> list[IcmpEvent]:
        drained.append(src)
        return real_drain(src, s)

    monkeypatch.setattr(bind, "_drain", spy)
    try:
        with udp(DST4) as rx:
            live = rx.getsockname()[1]
            srcs = [closed_port(SRC4) for _ in range(3)]
            batch = by_dst([(srcs[0], [(dead, b"a" * 16)]), (srcs[1], [(live, b"b" * 16)])])
            assert bind.send_cells(batch, 0.0) is None
            assert bind.send_cells(by_dst([(srcs[2], [(dead, b"c" * 16)])]), 0.0) is None
            assert receive(rx, 1) == {b"b" * 16: (SRC4, srcs[1])}
            time.sleep(0.2)  # the port-unreachable errors are back by now (loopback)
            events = bind.reap(time.monotonic())
    finally:
        bind.close()
    assert sorted(events, key=lambda e: e.src_port) == sorted(
        [
            IcmpEvent(dead, srcs[0], 3, 3, DST4, quote=b"a" * 16),
            IcmpEvent(dead, srcs[2], 3, 3, DST4, quote=b"c" * 16),
        ],
        key=lambda e: e.src_port,
    )
    assert sorted(drained) == sorted([srcs[0], srcs[2]])  # not the socket with no error
    assert bind.free_slots() == bind.max_open  # every socket closed


@needs_raw4
@pytest.mark.parametrize("blocks", [False, True])
def test_raw_ipv4_many_groups_many_destinations_in_one_batch(blocks: bool) -> None:
    with udp(DST4) as rx1, udp(DST4) as rx2, raw(SRC4, DST4) as sender:
        p1, p2 = rx1.getsockname()[1], rx2.getsockname()[1]
        srcs = range(20000, 20200)
        batch = [(s, [(p1, b"1:%d" % s), (p2, b"2:%d" % s)]) for s in srcs]
        assert sender.send_cells(by_dst(batch, blocks)) is None
        assert sender.syscalls < 10  # batched, not one call per datagram
        assert receive(rx1, len(srcs)) == {b"1:%d" % s: (SRC4, s) for s in srcs}
        assert receive(rx2, len(srcs)) == {b"2:%d" % s: (SRC4, s) for s in srcs}


@needs_raw4
def test_raw_ipv4_port_unreachable_is_mapped_to_its_cell() -> None:
    dead = closed_port(DST4)
    with udp(DST4) as rx, raw(SRC4, DST4) as sender:
        live = rx.getsockname()[1]
        sender.send_cells(
            by_dst([(3001, [(dead, b"a" * 16), (live, b"b" * 16)]), (3002, [(dead, b"c")])])
        )
        events = collect(sender, want=2)
    assert sorted(events, key=lambda e: e.src_port) == [
        IcmpEvent(dead, 3001, 3, 3, DST4, quote=b"a" * 16),  # the quote: what a MAC is read from
        IcmpEvent(dead, 3002, 3, 3, DST4, quote=b"c"),
    ]


@needs_raw4
def test_raw_mode_stamps_an_error_with_its_arrival_not_its_reading() -> None:
    """A busy probe host reads a burst's errors in bunches; the engine times the router's
    ICMP limit by their arrivals, which the kernel stamps (SO_TIMESTAMPNS)."""
    dead = closed_port(DST4)
    with raw(SRC4, DST4) as sender:
        sent = time.monotonic()
        sender.send_cells(by_dst([(3001, [(dead, b"a" * 16)])]))
        time.sleep(0.3)  # the error arrived within a millisecond; read 0.3 s later
        now = time.monotonic()
        (event,) = sender.reap(now, everything=True)
    assert event.at is not None
    # (Earlier by however long the host kept the reader from the clock: a loaded machine.)
    assert sent - 0.2 <= event.at <= now - 0.25


@needs_raw4
def test_icmp_errors_for_datagrams_we_did_not_send_are_ignored() -> None:
    dead = closed_port(DST4)
    with raw(SRC4, DST4) as ours, raw("127.0.0.3", DST4) as other:
        ours.send_group(4001, [(dead, b"ours")], 0.0)
        other.send_group(4002, [(dead, b"another source address")], 0.0)
        # The same addresses but a source port this sender never used (a bind-mode socket).
        with udp(SRC4) as plain:
            plain.sendto(b"not from the raw sender", (DST4, dead))
        mine = collect(ours, want=1)
        theirs = collect(other, want=1)
    assert [(e.dst_port, e.src_port) for e in mine] == [(dead, 4001)]
    assert [(e.dst_port, e.src_port) for e in theirs] == [(dead, 4002)]
    assert ours.icmp_foreign >= 2


@needs_raw4
@pytest.mark.parametrize("blocks", [False, True])
def test_partial_batches_report_backpressure_and_refusals_per_group(
    monkeypatch: pytest.MonkeyPatch, blocks: bool
) -> None:
    # The kernel's answers, scripted: 1 sent then a refusal; then the rest runs out of buffer.
    answers = [(1, errno.EPERM), (1, errno.ENOBUFS)]

    def fake_send(packed: Any, start: int) -> tuple[int, int]:
        return answers.pop(0) if answers else (len(packed.packets) - start, 0)

    with raw(SRC4, DST4) as sender:
        monkeypatch.setattr(sender._tx, "send_packed", fake_send)
        # Packets go out grouped by destination port: (g0,7) (g1,7) (g2,7) (g0,8) (g2,8).
        results = sender.send_cells(
            by_dst(
                [
                    (2000, [(7, b"a"), (8, b"b")]),
                    (2001, [(7, b"c")]),
                    (2002, [(7, b"d"), (8, b"e")]),
                ],
                blocks,
            )
        )
    assert results is not None
    assert [src for src, _ in results] == [2000, 2001, 2002]
    got = dict(results)
    assert got[2000] == GroupResult([7], backpressure=True)
    assert got[2001].sent == []
    assert got[2001].untested == "sending refused on the probe host (local firewall)"
    assert got[2002] == GroupResult([7], backpressure=True)


@needs_raw4
@pytest.mark.parametrize("blocks", [False, True])
@pytest.mark.parametrize("bad", [70000, -1])
def test_a_source_port_out_of_range_is_refused_before_anything(blocks: bool, bad: int) -> None:
    with raw(SRC4, DST4) as sender:
        with pytest.raises(ValueError, match="source port"):
            sender.send_cells(by_dst([(2000, [(9, b"x")]), (bad, [(9, b"y")])], blocks))
        assert sender.sent == 0
        assert not any(sender._sent_src)  # nothing marked as ours either


@needs_raw4
def test_closed_sender_sends_nothing_reaps_nothing_and_closes_twice() -> None:
    sender = RawSender(SRC4, DST4)
    sender.close()
    sender.close()
    assert sender.reap(0.0, everything=True) == []
    with pytest.raises(OSError, match="closed"):
        sender.send_cells(by_dst([(2000, [(9, b"x")])]))
    with pytest.raises(OSError, match="closed"):
        sender.send_group(2000, [(9, b"x")], 0.0)


# -- IPv6 ---------------------------------------------------------------------------------


@needs_raw6
@needs_v6
def test_raw_ipv6_delivers_and_maps_port_unreachable() -> None:
    dead = closed_port("::1")
    with udp("::1") as rx, udp("::1") as busy, raw("::1", "::1") as sender:
        port = rx.getsockname()[1]
        busy_port = busy.getsockname()[1]
        results = sender.send_cells(
            by_dst(
                [(busy_port, [(port, b"six-busy"), (dead, b"x" * 16)]), (40000, [(port, b"six")])]
            )
        )
        assert results is None
        got = receive(rx, 2)
        events = collect(sender, want=1)
    assert got == {b"six-busy": ("::1", busy_port), b"six": ("::1", 40000)}
    assert events == [IcmpEvent(dead, busy_port, 1, 4, "::1", quote=b"x" * 16, ipv6=True)]


@needs_raw6
@needs_v6
def test_raw_ipv6_block_batch_arrives_with_valid_checksums() -> None:
    """The runner's form over IPv6, where the checksum is ours: a wrong one is dropped."""
    with udp("::1") as rx1, udp("::1") as rx2, raw("::1", "::1") as sender:
        p1, p2 = rx1.getsockname()[1], rx2.getsockname()[1]
        srcs = range(30000, 30100)
        batch = [(s, [(p1, b"v6-1:%d" % s), (p2, b"v6-2:%d" % s)]) for s in srcs]
        assert sender.send_cells(by_dst(batch, blocks=True)) is None
        assert receive(rx1, len(srcs)) == {b"v6-1:%d" % s: ("::1", s) for s in srcs}
        assert receive(rx2, len(srcs)) == {b"v6-2:%d" % s: ("::1", s) for s in srcs}


# -- choosing a mode ----------------------------------------------------------------------


def test_make_sender_bind_mode_needs_no_privilege() -> None:
    sender = make_sender("bind", SRC4, DST4, 0.05)
    try:
        assert isinstance(sender, BindSender)
        assert sender.mode == "bind"
        assert sender.linger == 0.05
    finally:
        sender.close()


def test_make_sender_auto_falls_back_to_bind_without_raw(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe.raw, "raw_available", lambda ipv6=False: "no CAP_NET_RAW here")
    sender = make_sender("auto", SRC4, DST4, 0.05)
    try:
        assert isinstance(sender, BindSender)
    finally:
        sender.close()
    with pytest.raises(ConfigError, match="no CAP_NET_RAW here"):
        make_sender("raw", SRC4, DST4, 0.05)


def test_make_sender_rejects_an_unknown_mode() -> None:
    with pytest.raises(ConfigError, match="auto, raw, bind"):
        make_sender("fast", SRC4, DST4, 0.05)


@needs_raw4
@pytest.mark.parametrize("mode", ["auto", "raw"])
def test_make_sender_uses_raw_where_available(mode: str) -> None:
    sender = make_sender(mode, SRC4, DST4, 0.2)
    try:
        assert isinstance(sender, RawSender)
        assert sender.mode == "raw"
        assert sender.linger == 0.2
        assert sender.free_slots() > 60000
        assert sender.oldest_age(5.0) == 0.0
    finally:
        sender.close()


@needs_raw4
def test_raw_mode_refuses_a_source_address_that_is_not_ours() -> None:
    # 198.19.2.1 (TEST-NET-1) is not on this host: the probe must not forge it, and nothing
    # is sent (the check is a bind).
    with pytest.raises(ConfigError, match="send mode raw"):
        make_sender("raw", "198.19.2.1", DST4, 0.05)
    sender = make_sender("auto", "127.0.0.2", DST4, 0.05)
    sender.close()


@needs_raw4
def test_a_batch_of_payloads_of_many_lengths_arrives_exact() -> None:
    """The general path: payloads one by one, each of its own length, laid out in one
    buffer for sendmmsg (more than one call's worth) with iovecs of their lengths."""
    payloads = [bytes([n % 251]) * n for n in range(1, 1301)]
    srcs = list(range(20000, 20000 + len(payloads)))
    with udp(DST4) as rx, raw(SRC4, DST4) as sender:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 24)
        port = rx.getsockname()[1]
        assert sender.send_cells({port: (srcs, payloads)}) is None
        got = receive(rx, len(payloads))
    assert got == {p: (SRC4, s) for s, p in zip(srcs, payloads, strict=True)}


# -- bind mode: the usual batch's fast path, and the closer thread --------------------------


def test_fd_runs_cover_exactly_the_descriptors_given() -> None:
    assert fd_runs([]) == []
    assert fd_runs([7]) == [(7, 7)]
    assert fd_runs([9, 3, 4, 5, 10, 12]) == [(3, 5), (9, 10), (12, 12)]
    fds = [40, 41, 43, 44, 45, 47, 100, 42]
    covered = {n for a, b in fd_runs(fds) for n in range(a, b + 1)}
    assert covered == set(fds)  # never a number that was not handed over


@pytest.mark.parametrize("width", [1, 3])
def test_aligned_batches_send_every_datagram_and_report_only_what_failed(width: int) -> None:
    """The runner's batch form (a list of groups sharing their source ports): a busy port in
    the middle is ``untested`` and every other datagram arrives, from its own source port,
    to every destination port."""
    with contextlib.ExitStack() as stack:
        busy = stack.enter_context(udp(SRC4))
        rxs = [stack.enter_context(udp(DST4)) for _ in range(width)]
        dsts = [rx.getsockname()[1] for rx in rxs]
        busy_port = busy.getsockname()[1]
        srcs = [closed_port(SRC4) for _ in range(4)]
        srcs.insert(2, busy_port)
        batch = [(d, srcs, [b"%d>%d" % (s, d) for s in srcs]) for d in dsts]
        bind = BindSender(SRC4, DST4, linger=10.0)
        try:
            results = bind.send_cells(batch, 0.0)
            for d, rx in zip(dsts, rxs, strict=True):
                want = {b"%d>%d" % (s, d): (SRC4, s) for s in srcs if s != busy_port}
                assert receive(rx, len(want)) == want
            everything = bind.send_cells(
                [(d, srcs[:2], [b"again"] * 2) for d in dsts], 1.0
            )  # the lingering sockets of the first two ports send again
        finally:
            bind.close()
    assert results is not None
    assert [s for s, _ in results] == srcs
    got = dict(results)
    assert got[busy_port].sent == []
    assert "in use" in (got[busy_port].untested or "")
    assert all(got[s] == GroupResult(dsts) for s in srcs if s != busy_port)
    assert everything is None


def test_a_port_whose_spent_socket_waits_for_the_closer_is_not_in_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Closing happens on the closer's thread; binding the same source port again before it
    got there waits for it (the port is ours, not "in use"), and the descriptor budget
    counts the sockets still waiting to be closed."""
    import probe.sender

    gate = threading.Event()
    real = os.closerange

    def slow_closerange(first: int, last: int) -> None:
        gate.wait(WAIT)
        real(first, last)

    monkeypatch.setattr(probe.sender.os, "closerange", slow_closerange)
    bind = BindSender(SRC4, DST4, linger=0.0)
    bind.max_open = 6
    timer = threading.Timer(0.2, gate.set)
    try:
        with udp(DST4) as rx:
            port = rx.getsockname()[1]
            srcs = [closed_port(SRC4) for _ in range(4)]
            assert bind.send_cells([(port, srcs, [b"one"] * 4)], 0.0) is None
            bind.reap(1.0)  # all four handed to the closer, which is held at the gate
            assert bind._closer.pending == 4
            assert bind._closer.holds(srcs[0])
            timer.start()
            t0 = time.monotonic()
            # 4 waiting + 4 new > 6: the send waits for the closer, then binds the same ports
            assert bind.send_cells([(port, srcs, [b"two"] * 4)], 2.0) is None
            assert time.monotonic() - t0 >= 0.15
            assert bind._closer.pending == 0
            got = [rx.recvfrom(64) for _ in range(8)]
    finally:
        timer.cancel()
        gate.set()
        bind.close()
    assert sorted(a[1] for _, a in got) == sorted(srcs * 2)
    assert bind._closer.pending == 0


def test_spent_sockets_are_closed_and_nothing_else_is() -> None:
    """The closer closes runs of consecutive descriptors with one call: only ever the
    descriptors handed to it, not a neighbour opened between them."""
    bind = BindSender(SRC4, DST4, linger=0.0)
    foreign: list[socket.socket] = []
    fds: list[int] = []
    try:
        with udp(DST4) as rx:
            port = rx.getsockname()[1]
            for _ in range(6):
                src = closed_port(SRC4)
                assert bind.send_cells([(port, [src], [b"x"])], 0.0) is None
                fds.append(bind._lingering[src].fileno())
                foreign.append(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            bind.reap(1.0)
            assert bind._closer.wait(0)
            for fd in fds:
                with pytest.raises(OSError, match=rf"\[Errno {errno.EBADF}\]"):
                    os.fstat(fd)
            for s in foreign:
                os.fstat(s.fileno())  # still open
    finally:
        bind.close()
        for s in foreign:
            s.close()


# -- bind mode: spare sockets opened ahead ---------------------------------------------------


def test_spare_sockets_are_opened_as_wanted_bound_by_the_sends_and_closed_at_the_end() -> None:
    """Time the sender would wait opens spare sockets, as many as the runner wants and the
    descriptor budget allows; the sends bind them (datagrams leave from the right ports), a
    port that cannot be bound is ``untested`` and leaves its spare in the pool, fewer wanted
    closes the surplus, and ``close`` closes the spares left."""
    bind = BindSender(SRC4, DST4, linger=10.0)
    try:
        assert bind.prepare(time.perf_counter() + 1.0) == 0  # none wanted: none opened
        bind.spare_wanted = 5
        assert bind.prepare(time.perf_counter() + 1.0) == 5
        assert bind.spare_room() == 0
        spares = {s.fileno() for s in bind._spare}
        with udp(SRC4) as busy, udp(DST4) as rx:
            port, busy_port = rx.getsockname()[1], busy.getsockname()[1]
            srcs = [closed_port(SRC4) for _ in range(3)]
            srcs.insert(1, busy_port)
            results = bind.send_cells([(port, srcs, [b"%d" % s for s in srcs])], 0.0)
            want = {b"%d" % s: (SRC4, s) for s in srcs if s != busy_port}
            assert receive(rx, 3) == want
        assert results is not None
        assert "in use" in (dict(results)[busy_port].untested or "")
        assert {bind._lingering[s].fileno() for s in srcs if s != busy_port} <= spares
        assert len(bind._spare) == 2  # the failed bind gave its spare back
        bind.max_open = len(bind._open) + 2  # the budget: 3 open and the 2 spares, no more
        assert bind.spare_room() == 0
        assert bind.prepare(time.perf_counter() + 1.0) == 0
        bind.spare_wanted = 1  # fewer wanted now: the surplus is closed
        surplus = bind._spare[1].fileno()
        bind.trim_spares()
        assert len(bind._spare) == 1
        assert bind._closer.wait(0)
        with pytest.raises(OSError, match=rf"\[Errno {errno.EBADF}\]"):
            os.fstat(surplus)
        left = [s.fileno() for s in bind._spare]
    finally:
        bind.close()
    for fd in left:
        with pytest.raises(OSError, match=rf"\[Errno {errno.EBADF}\]"):
            os.fstat(fd)


def test_a_paced_batch_opens_spare_sockets_between_its_datagrams(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Paced sending (the pilot: one datagram at a time) opens spare sockets while it waits
    for the next datagram's time, and every datagram still arrives from its port. When no
    more descriptors can be had, the sender stops asking for spares and sends on."""
    bind = BindSender(SRC4, DST4, linger=10.0)
    bind.spare_wanted = 40
    try:
        with udp(DST4) as rx:
            port = rx.getsockname()[1]
            srcs = [closed_port(SRC4) for _ in range(4)]
            got = bind.send_cells([(port, srcs, [b"%d" % s for s in srcs])], 0.0, pace=(1, 0.005))
            assert got is None
            assert receive(rx, 4) == {b"%d" % s: (SRC4, s) for s in srcs}
            assert 0 < len(bind._spare) <= 40

            def no_more(self: BindSender) -> Any:
                raise OSError(errno.EMFILE, "Too many open files")

            monkeypatch.setattr(BindSender, "_new_socket", no_more)
            bind.spare_wanted = len(bind._spare) + 10
            assert bind.prepare(time.perf_counter() + 1.0) == 0
            bind.spare_wanted = len(bind._spare) + 10  # as the runner says before each wait
            assert bind.spare_room() == 0  # so a wait sleeps rather than retrying in a loop
    finally:
        bind.close()


@pytest.mark.parametrize("mode", ["bind", pytest.param("raw", marks=needs_raw4)])
def test_the_waits_of_a_paced_batch_go_to_the_idle_work_and_end_before_each_send(
    mode: str,
) -> None:
    """Between paced datagrams the sender hands its wait to ``idle`` (the engine's work
    ahead) with a deadline before the next send is due, and still sends every datagram from
    its port; a sender given no idle work just waits. (A wait a busy host already spent,
    descheduled, has no time left to hand over: the suite's load once took one of three, so
    the batch may be sent up to three times for one whose every wait was its own.)"""
    sender: Any = BindSender(SRC4, DST4, linger=10.0) if mode == "bind" else RawSender(SRC4, DST4)
    spacing = 0.01
    deadlines: list[tuple[float, float]] = []  # (when called, the deadline given)

    def idle(until: float) -> None:
        deadlines.append((time.perf_counter(), until))

    try:
        with udp(DST4) as rx:
            port = rx.getsockname()[1]
            sender.idle = idle
            for _ in range(3):
                deadlines.clear()
                srcs = [closed_port(SRC4) for _ in range(4)]
                got = sender.send_cells(
                    [(port, srcs, [b"%d" % s for s in srcs])], 0.0, pace=(1, spacing)
                )
                assert got is None
                assert receive(rx, 4) == {b"%d" % s: (SRC4, s) for s in srcs}
                for called, until in deadlines:
                    assert called < until < called + spacing
                if len(deadlines) == 3:
                    break
            # The first datagram goes at once; each later one is due ``spacing`` after the
            # one before, and its wait went to the idle work, which had to end early.
            assert len(deadlines) == 3
            sender.idle = None
            more = [closed_port(SRC4) for _ in range(2)]
            got = sender.send_cells(
                [(port, more, [b"%d" % s for s in more])], 0.0, pace=(1, spacing)
            )
            assert got is None
            assert receive(rx, 2) == {b"%d" % s: (SRC4, s) for s in more}
            assert len(deadlines) == 3  # none more: no idle work given
    finally:
        sender.close()
