"""The agent's recvmmsg reader against real UDP sockets: exactly what recvfrom would give."""

import contextlib
import errno
import socket
from collections.abc import Iterator

import pytest

from agent import mmsg
from agent.mmsg import SLOT_SIZE, SLOTS, BatchReader

pytestmark = pytest.mark.skipif(not mmsg.available(), reason="recvmmsg needs LP64 Linux")


@contextlib.contextmanager
def udp(host: str, family: int = socket.AF_INET) -> Iterator[socket.socket]:
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        s.bind((host, 0))
        s.setblocking(False)
        yield s
    finally:
        s.close()


def read_all(reader: BatchReader, sock: socket.socket) -> list[tuple[bytes, tuple[str, int]]]:
    out: list[tuple[bytes, tuple[str, int]]] = []
    for _ in range(10_000):
        got = reader.read(sock)
        assert len(got) <= SLOTS
        if not got:
            return out
        out += got
    raise AssertionError("the socket never ran dry")


def test_reads_every_datagram_in_order_with_its_source() -> None:
    reader = BatchReader()
    sizes = [0, 1, 16, 17, 1472, 9000, 65507]
    with (
        udp("127.0.0.1") as rx,
        udp("127.0.0.1") as a,
        udp("127.0.0.2") as b,
        udp("127.0.0.3") as c,
    ):
        assert reader.read(rx) == []  # nothing waiting: no wait either
        dest = rx.getsockname()
        want = []
        for i in range(3 * SLOTS + 5):  # several calls' worth, and a partial last one
            tx = (a, b, c)[i % 3]
            payload = bytes([i % 251]) * sizes[i % len(sizes)]
            tx.sendto(payload, dest)
            want.append((payload, tx.getsockname()[:2]))
        assert read_all(reader, rx) == want


def test_a_small_want_reads_no_more() -> None:
    reader = BatchReader()
    with udp("127.0.0.1") as rx, udp("127.0.0.1") as tx:
        for i in range(10):
            tx.sendto(b"%d" % i, rx.getsockname())
        first = reader.read(rx, want=3)
        rest = read_all(reader, rx)
    assert [d for d, _ in first] == [b"0", b"1", b"2"]
    assert [d for d, _ in rest] == [b"%d" % i for i in range(3, 10)]


def test_dual_stack_listener_spells_v4_sources_as_recvfrom_does() -> None:
    reader = BatchReader()
    with contextlib.ExitStack() as stack:
        try:
            rx = stack.enter_context(udp("::", socket.AF_INET6))
        except OSError as exc:
            pytest.skip(f"no IPv6 here: {exc}")
        tx = stack.enter_context(udp("127.0.0.1"))
        dest = ("127.0.0.1", rx.getsockname()[1])
        tx.sendto(b"first", dest)
        tx.sendto(b"second", dest)
        data, addr = rx.recvfrom(SLOT_SIZE)  # loopback delivers before sendto returns
        got = read_all(reader, rx)
    assert data == b"first"
    assert got == [(b"second", (addr[0], addr[1]))]
    assert addr[0] == "::ffff:127.0.0.1"


def test_a_closed_socket_is_an_error_not_silence() -> None:
    reader = BatchReader()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.close()
    with pytest.raises(OSError, match="Bad file descriptor") as info:
        reader.read(s)
    assert info.value.errno == errno.EBADF
