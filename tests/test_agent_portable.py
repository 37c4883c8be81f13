"""The agent where mail clients run: the portable paths forced on Linux, and the errors that
Windows and unprivileged hosts give.

Windows and macOS have no ``recvmmsg`` and no ``SO_RCVBUFFORCE``; these tests force the
agent onto ``recvfrom`` and ``SO_RCVBUF`` and check that it receives exactly what the fast
path receives, end to end included. Windows' ``WSAECONNRESET`` on a UDP read and its
reserved port ranges (WinError 10013) are raised by a stand-in socket.
"""

from __future__ import annotations

import errno
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from agent import listen, mmsg
from agent.core import AgentCore
from agent.listen import (
    SO_RCVBUFFORCE,
    Features,
    bind_error,
    drain,
    open_listeners,
    platform_features,
)
from agent.service import AgentConfig, AgentState, _receive_loop, run_agent
from probe.coordinator import Coordinator, ProbeConfig
from udpreach.core.datagram import TokenCodec, derive_run_key
from udpreach.core.errors import ConfigError
from udpreach.net.client import request_run

PORTABLE = Features(recvmmsg=False, rcvbufforce=False, rcvbuf_doubled=False)
SECRET = b"portable-agent-secret-0123456789"
DST = 5000  # the destination port written into the datagrams (the core reads it from them)


def _codec() -> TokenCodec:
    return TokenCodec(derive_run_key(SECRET, "r1", bytes(16), bytes(16)))


def _datagrams(codec: TokenCodec, n: int) -> list[bytes]:
    return codec.encode_many(DST, list(range(20000, 20000 + n)), 1)


@contextmanager
def _sender() -> Iterator[socket.socket]:
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        tx.bind(("127.0.0.2", 0))
        yield tx
    finally:
        tx.close()


def _received(
    features: Features, n: int, tx: socket.socket
) -> tuple[bool, list[bytes], dict[str, object]]:
    """Open a listener with *features*, send it *n* datagrams from *tx* over loopback, drain
    them into a core: (used recvmmsg, receipt batches, stats)."""
    codec = _codec()
    (li,) = open_listeners([0], "127.0.0.1", features)
    try:
        for data in _datagrams(codec, n):
            tx.sendto(data, ("127.0.0.1", li.port))
        state = AgentState()
        run = state.core.start_run("r1", codec)
        got = 0
        for _ in range(1000):
            got += drain(state, li)
            if got >= n:
                break
        return li.batch is not None, run.take_batches(), run.stats()
    finally:
        li.sock.close()


def test_platform_features_are_linux_only() -> None:
    assert platform_features("win32") == PORTABLE
    assert platform_features("darwin") == PORTABLE
    linux = platform_features("linux")
    assert linux.rcvbufforce
    assert linux.rcvbuf_doubled
    assert linux.recvmmsg == mmsg.available()


def test_recvfrom_path_receives_what_recvmmsg_receives() -> None:
    with _sender() as tx:  # one source address and port: the receipts name it
        batched, batches, stats = _received(platform_features("linux"), 300, tx)
        plain, plain_batches, plain_stats = _received(PORTABLE, 300, tx)
    assert not plain
    assert plain_stats == {"accepted": 300, "rejected": {}}
    assert plain_stats == stats
    assert b"".join(plain_batches) == b"".join(batches)
    assert batched == mmsg.available()


def test_without_rcvbufforce_only_so_rcvbuf_is_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []
    real = socket.socket.setsockopt

    def spy(self: socket.socket, level: int, opt: int, value: Any, *rest: Any) -> None:
        if level == socket.SOL_SOCKET:
            asked.append(opt)
        real(self, level, opt, value, *rest)

    monkeypatch.setattr(socket.socket, "setsockopt", spy)
    for li in open_listeners([0, 0], "127.0.0.1", PORTABLE):
        assert li.rcvbuf > 0  # what the kernel granted, as it reports it
        li.sock.close()
    assert asked == [socket.SO_RCVBUF, socket.SO_RCVBUF]
    asked.clear()
    if sys.platform.startswith("linux"):
        (li,) = open_listeners([0], "127.0.0.1", platform_features("linux"))
        li.sock.close()
        assert asked[0] == SO_RCVBUFFORCE


class ResettingSocket:
    """A real UDP socket whose ``recvfrom`` fails as Windows' does after an ICMP port
    unreachable (WSAECONNRESET) before reads number *at* (the queued datagrams stay)."""

    def __init__(self, sock: socket.socket, at: set[int]) -> None:
        self.sock = sock
        self.at = at
        self.calls = 0
        self.resets = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def recvfrom(self, bufsize: int) -> tuple[bytes, Any]:
        self.calls += 1
        if self.calls in self.at:
            self.resets += 1
            raise ConnectionResetError(10054, "An existing connection was forcibly closed")
        return self.sock.recvfrom(bufsize)


async def test_wsaeconnreset_is_not_fatal_the_listener_reads_on() -> None:
    codec = _codec()
    (li,) = open_listeners([0], "127.0.0.1", PORTABLE)
    fake = ResettingSocket(li.sock, at={1, 5, 70, 71})
    li.sock = fake  # type: ignore[assignment]
    state = AgentState()
    run = state.core.start_run("r1", codec)
    try:
        with _sender() as tx:
            for data in _datagrams(codec, 200):
                tx.sendto(data, ("127.0.0.1", li.port))
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_receive_loop, state, li, [trio.Event()])
                    for _ in range(1000):  # the listener wakes on its own; just look
                        if run.accepted >= 200:
                            break
                        await trio.sleep(0.01)
                    nursery.cancel_scope.cancel()
    finally:
        fake.sock.close()
    assert fake.resets == 4
    assert run.stats() == {"accepted": 200, "rejected": {}}


async def test_a_full_run_with_the_portable_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Coordinator, probe and an agent on recvfrom and SO_RCVBUF: every cell open."""
    monkeypatch.setattr(listen, "FEATURES", PORTABLE)
    opened: list[Any] = []
    real_open = listen.open_listeners

    def spy(*args: Any, **kwargs: Any) -> Any:
        out = real_open(*args, **kwargs)
        opened.extend(out)
        return out

    monkeypatch.setattr("agent.service.open_listeners", spy)
    coord = Coordinator(ProbeConfig(host="127.0.0.1", port=0, secret=SECRET, source="127.0.0.2"))
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(coord.serve)
            acfg = AgentConfig(
                host=host,
                port=port,
                secret=SECRET,
                ports=(0, 0),
                name="portable",
                listen="127.0.0.1",
                once=True,
            )
            await nursery.start(run_agent, acfg)
            doc = await request_run(
                host,
                port,
                SECRET,
                agent="portable",
                plan={"src_ports": "1024-65535"},
                wait=10,
                expect=None,
                on_progress=lambda p: None,
            )
            nursery.cancel_scope.cancel()
    assert opened
    assert all(li.batch is None for li in opened)
    assert doc["complete"] is True
    assert doc["summary"]["cells"] == doc["summary"]["open"] == 2 * 64512


def _oserror(code: int, winerror: int | None = None) -> OSError:
    exc = OSError(code, "refused")
    if winerror is not None:
        exc.winerror = winerror  # type: ignore[attr-defined]
    return exc


def test_reserved_port_on_windows_names_netsh() -> None:
    err = bind_error(_oserror(errno.EACCES, 10013), "0.0.0.0", 50123, "win32")
    text = str(err)
    assert isinstance(err, ConfigError)
    assert err.exit_code == 2
    assert "cannot listen on UDP 0.0.0.0:50123: permission denied" in text
    assert "netsh int ipv4 show excludedportrange protocol=udp" in text
    assert "\n" not in text


def test_privileged_port_on_linux_says_why() -> None:
    text = str(bind_error(_oserror(errno.EACCES), "0.0.0.0", 80, "linux"))
    assert "below 1024" in text
    assert "CAP_NET_BIND_SERVICE" in text
    assert "netsh" not in text


@pytest.mark.parametrize(
    ("platform", "tool"),
    [("win32", "netstat -ano -p udp"), ("darwin", "lsof -nP -iUDP"), ("linux", "ss -uapn")],
)
def test_port_in_use_names_the_tool_that_shows_who(platform: str, tool: str) -> None:
    winerror = 10048 if platform == "win32" else None
    text = str(bind_error(_oserror(errno.EADDRINUSE, winerror), "0.0.0.0", 5000, platform))
    assert "in use by another program" in text
    assert tool in text


def test_port_in_use_for_real_is_a_config_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}: the port is in use"):
            open_listeners([0, port], "127.0.0.1", PORTABLE)


def test_core_is_all_the_listener_needs() -> None:
    """``drain`` takes anything with a ``core``: the listener half has no session in it."""

    class Holder:
        def __init__(self) -> None:
            self.core = AgentCore()

    codec = _codec()
    (li,) = open_listeners([0], "127.0.0.1", PORTABLE)
    try:
        holder = Holder()
        run = holder.core.start_run("r1", codec)
        with _sender() as tx:
            for data in _datagrams(codec, 10):
                tx.sendto(data, ("127.0.0.1", li.port))
        for _ in range(100):
            drain(holder, li)
            if run.accepted == 10:
                break
        assert run.accepted == 10
    finally:
        li.sock.close()


def test_secret_file_mode_check_only_where_modes_exist(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows reports 0o666 for every writable file: its ACL protects the secret there."""
    from udpreach import secret

    p = tmp_path / "s"
    p.write_text("0123456789abcdef0123456789abcdef\n")
    p.chmod(0o666)
    with pytest.raises(ConfigError, match="chmod 600"):
        secret.load_secret(p)
    monkeypatch.setattr(secret, "POSIX_MODES", False)
    assert secret.load_secret(p) == b"0123456789abcdef0123456789abcdef"


def test_the_hosts_fragment_counters_are_read_where_linux_keeps_them(tmp_path: Path) -> None:
    """IPv4's and IPv6's counters, added up; either alone where the other is missing. What
    the host lost is its failures but the timeouts, and UDP checksum errors."""
    from agent.listen import FragmentCounters, fragment_counters

    snmp, snmp6, missing = tmp_path / "snmp", tmp_path / "snmp6", str(tmp_path / "missing")
    snmp.write_text(
        "Ip: Forwarding DefaultTTL InReceives ReasmTimeout ReasmReqds ReasmOKs ReasmFails\n"
        "Ip: 1 64 1000 3 40 10 27\n"
        "Icmp: InMsgs\nIcmp: 5\n"
        "Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors InCsumErrors\n"
        "Udp: 100 0 4 50 0 4\n"
    )
    snmp6.write_text(
        "Ip6InReceives                   \t900\n"
        "Ip6ReasmTimeout                 \t2\n"
        "Ip6ReasmFails                   \t5\n"
        "Icmp6InMsgs                     \t1\n"
        "Udp6InCsumErrors                \t1\n"
    )
    both = fragment_counters(str(snmp), str(snmp6))
    assert both == FragmentCounters(failed=32, timed_out=5, bad_checksum=5)
    assert fragment_counters(str(snmp), missing) == FragmentCounters(27, 3, 4)
    assert fragment_counters(missing, str(snmp6)) == FragmentCounters(5, 2, 1)
    assert fragment_counters(missing, missing) is None  # not Linux: not known
    later = FragmentCounters(failed=32 + 100 + 7, timed_out=5 + 100, bad_checksum=5 + 2)
    assert later.lost_since(both) == 7 + 2  # 100 timeouts: orphans, harmless
    assert later.timeouts_since(both) == 100
    snmp.write_text("Ip: Forwarding\nIp: 1\n")
    snmp6.write_text("Ip6InReceives 900\n")
    assert fragment_counters(str(snmp), str(snmp6)) is None
    if sys.platform.startswith("linux"):
        assert isinstance(fragment_counters(), FragmentCounters)


def test_the_agents_code_imports_without_the_posix_only_modules() -> None:
    """Windows has no ``fcntl``, ``resource``, ``termios``, ``pwd`` or ``grp``: the agent's
    command and everything it imports must load without them (the keyring's file lock, the
    coordinator's business, imported ``fcntl`` at the top and broke the agent there)."""
    import subprocess

    script = (
        "import sys\n"
        "BLOCKED = {'fcntl', 'resource', 'termios', 'pwd', 'grp', 'tty', 'pty'}\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name in BLOCKED:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "for name in BLOCKED: sys.modules.pop(name, None)\n"
        "import udpreach.cli, udpreach.cli.service, agent.service\n"
        "from udpreach.keyring import forbid_core_dumps\n"
        "forbid_core_dumps()\n"
        "print('imported')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "imported"
