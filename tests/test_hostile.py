"""The harness must never become a reflector or a flooder, and must survive hostile datagrams.

- The probe aims only where the agent's own connection came from, unless the operator
  allows the registered address (``--allow-target``).
- ``--max-rate`` clamps every run (and the document says so); ``--max-datagrams`` refuses a
  plan that could exceed it.
- The agent never sends UDP, even while it is flooded.
- Forged, truncated, oversize, empty and replayed datagrams, sent to the agent from inside a
  blocked source-port range during a full sweep, open nothing; the agent counts them by
  reason.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
from labcli import lab_udpreach
from labkit import expand_verdicts, mismatches
from prockit import Background, loopback_services, wait_log

from agent.service import (
    AgentConfig,
    AgentState,
    _flusher,
    _handle,
    _receive_loop,
    open_listeners,
)
from probe.coordinator import Coordinator, ProbeConfig
from udpreach.net.channel import connect
from udpreach.net.client import request_run

SECRET = b"hostile-test-secret-0123456789abcdef"


# --- where the probe aims ---------------------------------------------------------------


def _coordinator(*allowed: str) -> Coordinator:
    nets = [ipaddress.ip_network(n) for n in allowed]
    return Coordinator(ProbeConfig(host="127.0.0.1", port=0, secret=SECRET, allow_targets=nets))


def _session(registered: str, observed: str) -> Any:
    return SimpleNamespace(registered=registered, observed=observed)


@pytest.mark.parametrize(
    ("registered", "observed", "allowed", "target", "warn"),
    [
        ("198.18.1.2", "198.18.1.2", (), "198.18.1.2", None),
        # Behind NAT: the registered address is unverified; the probe uses the observed one.
        ("198.18.1.2", "198.18.2.1", (), "198.18.2.1", "NAT"),
        # A registered address anywhere else is never a target without the operator's word.
        ("198.19.100.7", "198.18.2.1", ("198.18.1.0/24",), "198.18.2.1", "NAT"),
        ("198.18.1.2", "198.18.2.1", ("198.18.1.0/24",), "198.18.1.2", "--allow-target"),
        ("198.18.1.2", "198.18.2.1", ("198.18.1.2/32",), "198.18.1.2", "--allow-target"),
        ("2001:2:0:1::2", "2001:2:0:2::1", (), "2001:2:0:2::1", "NAT"),
        ("2001:2:0:1::2", "2001:2:0:2::1", ("2001:2:0:1::/64",), "2001:2:0:1::2", "--allow"),
        # An IPv6 allowance does not cover an IPv4 address, nor the other way round.
        ("198.18.1.2", "198.18.2.1", ("2001:2::/48",), "198.18.2.1", "NAT"),
        ("not-an-address", "198.18.2.1", ("0.0.0.0/0",), "198.18.2.1", "NAT"),
    ],
)
def test_target_is_the_observed_address_unless_allowed(
    registered: str, observed: str, allowed: tuple[str, ...], target: str, warn: str | None
) -> None:
    got, warnings = _coordinator(*allowed)._target_for(_session(registered, observed))
    assert got == target
    if warn is None:
        assert warnings == []
    else:
        assert len(warnings) == 1
        assert warn in warnings[0]


async def _nat_agent(
    host: str, port: int, registered: str, *, task_status: trio.TaskStatus[int]
) -> None:
    """The real agent's receive path, registering a callback address it does not have (as
    an agent behind NAT does): its UDP socket is on 127.0.0.1, it says 127.0.0.9."""
    cfg = AgentConfig(host=host, port=port, secret=SECRET, ports=(0,), name="natted")
    state = AgentState(listeners=open_listeners((0,), "127.0.0.1"))
    chan = await connect(host, port, SECRET, "agent", 5)
    try:
        await chan.send(
            {
                "type": "register",
                "name": "natted",
                "address": registered,
                "ports": [state.listeners[0].port],
                "rcvbuf": state.listeners[0].rcvbuf,
            }
        )
        reply = await chan.next_message()
        assert reply.body == {"type": "registered", "observed": "127.0.0.1"}
        task_status.started(state.listeners[0].port)
        wake = [trio.Event()]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_flusher, state, chan, wake)
            nursery.start_soon(_receive_loop, state, state.listeners[0], wake)
            while True:
                await _handle(state, cfg, chan, await chan.next_message())
    finally:
        for li in state.listeners:
            li.sock.close()
        await chan.aclose()


@pytest.mark.parametrize("allowed", [False, True])
async def test_probe_aims_at_the_observed_address_unless_allowed(allowed: bool) -> None:
    nets = [ipaddress.ip_network("127.0.0.9/32")] if allowed else []
    cfg = ProbeConfig(
        host="127.0.0.1", port=0, secret=SECRET, source="127.0.0.2", allow_targets=nets
    )
    coord = Coordinator(cfg)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(coord.serve)
            dst = await nursery.start(_nat_agent, host, port, "127.0.0.9")
            doc = await request_run(
                host, port, SECRET, agent="natted", plan={"src_ports": "1024-2047"}, wait=5,
                expect=None, on_progress=lambda p: None,
            )  # fmt: skip
            nursery.cancel_scope.cancel()
    assert doc["agent"]["registered"] == "127.0.0.9"
    assert doc["agent"]["observed"] == "127.0.0.1"
    assert doc["plan"]["dst_ports"] == [dst]
    if allowed:
        # Aimed at 127.0.0.9, where nothing listens: nothing arrives, and the reason is said.
        assert doc["probe"]["target"] == "127.0.0.9"
        assert doc["summary"]["open"] == 0
        assert any("--allow-target" in w for w in doc["warnings"]), doc["warnings"]
    else:
        assert doc["probe"]["target"] == "127.0.0.1"
        assert doc["summary"]["open"] == 1024
        assert any("NAT" in w for w in doc["warnings"]), doc["warnings"]


# --- rate and volume ceilings, through the CLI -----------------------------------------


def test_probe_ceilings_clamp_rate_and_refuse_big_plans(tmp_path: Path, secret_file: Path) -> None:
    probe_args = ("--max-rate", "2000", "--max-datagrams", "5000")
    with loopback_services(tmp_path, secret_file, probe_args=probe_args) as svc:

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                svc.run_argv(*args), capture_output=True, text=True, timeout=60, check=False
            )

        # Asking for 100,000/s gets the probe's 2,000/s, and the document says so.
        t0 = time.monotonic()
        ok = run("--src-ports", "1024-3071", "--copies", "2", "--rate", "100000", "--json")
        took = time.monotonic() - t0
        assert ok.returncode == 0, ok.stderr
        doc = json.loads(ok.stdout)
        assert doc["plan"]["rate"] == 2000
        assert any("clamped" in w and "2000" in w for w in doc["warnings"]), doc["warnings"]
        assert doc["summary"]["open"] == 2048
        # 2,048 datagrams at 2,000/s take a second; at the asked-for rate, 20 ms.
        assert doc["probe_stats"]["sent"] >= 2048
        assert took >= 0.9, f"run took {took:.2f}s: the ceiling was not applied"
        assert doc["duration"] >= 0.9

        # A plan that could send more than --max-datagrams is refused before anything is sent.
        big = run("--src-ports", "1024-3071", "--copies", "3", "--json")  # 6,144 > 5,000
        assert big.returncode == 2, big.stderr
        refusal = json.loads(big.stdout)  # --json: the error document, and nothing else
        assert refusal["schema"] == "udpreach/error-v1"
        assert refusal["exit"] == 2
        assert "Traceback" not in big.stderr
        assert len(big.stderr.strip().splitlines()) == 1
        assert "--max-datagrams" in big.stderr
        assert "6144" in big.stderr.replace(",", "")
        assert "lower --copies" in big.stderr  # and what to do about it

        # Auto copies (no --copies): 8,192 cells cannot even get one datagram each.
        auto = run("--src-ports", "1024-9215", "--json")
        assert auto.returncode == 2, auto.stderr
        assert "--max-datagrams" in auto.stderr
        assert "8192 cells, a datagram each at least" in auto.stderr


# --- the lab: hostile datagrams during a full sweep, and no UDP from the agent ------------

POLICY = 'iifname "probe0" udp sport 40000-49999 drop\n'
BLOCKED = range(40000, 50000)

# In the agent's namespace: nft counters of every UDP datagram and every ICMP error or echo
# reply the namespace sends (IPv6 neighbour discovery is the kernel's own business).
WATCH = """
table inet watch {
    chain out {
        type filter hook output priority 0; policy accept;
        meta l4proto udp counter
        meta l4proto icmp counter
        icmpv6 type { destination-unreachable, packet-too-big, time-exceeded,
                      parameter-problem, echo-reply } counter
    }
}
"""

# In the agent's namespace: record the UDP payloads sent to the agent's port, as they arrive
# (an AF_PACKET socket sees them beside the agent's own socket), until stdin closes.
SNIFFER = r"""
import json, select, socket, struct, sys, time
cfg = json.loads(sys.argv[1])
s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 24)
s.bind(("eth0", 0))
print("ready", flush=True)
got = []
deadline = time.monotonic() + cfg["limit"]
def take():
    pkt = s.recv(65535)
    if pkt[9] != 17:
        return
    ihl = (pkt[0] & 15) * 4
    sport, dport, ln = struct.unpack_from(">HHH", pkt, ihl)
    if dport == cfg["dport"]:
        got.append(pkt[ihl + 8 : ihl + ln].hex())
while time.monotonic() < deadline:
    ready, _, _ = select.select([s, sys.stdin], [], [], 0.5)
    if s in ready:
        take()
    if sys.stdin in ready and not sys.stdin.buffer.read1(1):
        s.setblocking(False)
        try:
            while True:
                take()
        except BlockingIOError:
            pass
        break
print(json.dumps(got), flush=True)
"""

# In the router's namespace: its own datagrams leave through OUTPUT, not FORWARD, so the
# policy does not drop them. Sends each kind from source ports inside the blocked range.
FLOOD = r"""
import json, os, random, socket, sys, time
cfg = json.loads(sys.argv[1])
rng = random.Random(cfg["seed"])
socks = []
for p in range(40000, 50000, 250):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((cfg["src"], p))
    socks.append(s)
n = cfg["n"]
kinds = {
    "random": [rng.randbytes(16) for _ in range(n)],
    "truncated": [rng.randbytes(rng.randint(1, 15)) for _ in range(n)],
    "empty": [b""] * (n // 5),
    "oversize": [rng.randbytes(rng.randint(17, 2000)) for _ in range(n)],
    "replay": [bytes.fromhex(h) for h in cfg["replays"]],
}
order = [(k, d) for k, ds in kinds.items() for d in ds]
rng.shuffle(order)
sent = {k: 0 for k in kinds}
for i, (kind, data) in enumerate(order):
    socks[i % len(socks)].sendto(data, (cfg["dst"], cfg["dport"]))
    sent[kind] += 1
    if i % 200 == 199:
        time.sleep(0.01)
print(json.dumps(sent), flush=True)
"""


def _counters(lab: Any) -> list[int]:
    text = lab.run("agent", ["nft", "list", "table", "inet", "watch"], check=True).stdout
    return [int(n) for n in re.findall(r"packets (\d+)", text)]


@pytest.mark.root
@pytest.mark.slow
def test_hostile_datagrams_open_nothing_and_are_counted(tmp_path: Path) -> None:
    with lab_udpreach(POLICY, tmp_path) as lr:
        lab = lr.lab
        lab.run("agent", ["nft", "-f", "-"], input=WATCH, check=True)

        # Run 1 (allowed source ports), recording its genuine datagrams on the way in.
        sniffer = subprocess.Popen(
            lab.ns_argv("agent", [sys.executable, "-c", SNIFFER,
                                  json.dumps({"dport": 5000, "limit": 60})]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            assert sniffer.stdout is not None
            assert sniffer.stdout.readline().strip() == b"ready"
            code, _, err = lr.run("--src-ports", "1024-2047", timeout=60)
            assert code == 0, err
            out, serr = sniffer.communicate(input=b"", timeout=10)
        finally:
            if sniffer.poll() is None:
                sniffer.kill()
                sniffer.wait(timeout=5)
        replays = [h for h in json.loads(out) if len(h) == 32]
        assert len(replays) >= 1000, (len(replays), serr)

        # Run 2, a full sweep, flooded from the router once the agent has started it.
        flood_out: dict[str, Any] = {}

        def flood() -> None:
            wait_log(tmp_path / "agent.log", r"started by the coordinator", timeout=40, count=2)
            cfg = {"src": "198.18.1.1", "dst": "198.18.1.2", "dport": 5000, "n": 1000,
                   "seed": 7, "replays": replays}  # fmt: skip
            proc = lab.run("router", [sys.executable, "-c", FLOOD, json.dumps(cfg)], timeout=30)
            flood_out["rc"] = proc.returncode
            flood_out["err"] = proc.stderr
            flood_out["sent"] = json.loads(proc.stdout) if proc.returncode == 0 else {}
            flood_out["done"] = time.monotonic()

        flooder = Background(flood)
        code, doc, err = lr.run("--rate", "20000", timeout=120)
        ended = time.monotonic()
        flooder.result(timeout=45)
        logs = lr.logs()
        out_packets = _counters(lab)

    assert flood_out["rc"] == 0, flood_out["err"]
    assert flood_out["done"] < ended, "the flood did not end before the run did"
    assert code == 0, f"exit {code}: {err}\n{logs}"
    assert doc["complete"] is True

    # The matrix is the policy, port for port: the forgeries opened nothing.
    cells = expand_verdicts(doc)
    assert len(cells) == 64512
    assert mismatches(cells, lambda d, s: "blocked" if s in BLOCKED else "open") == []
    assert [(r["first"], r["last"]) for r in doc["ranges"] if r["verdict"] == "blocked"] == [
        (40000, 49999)
    ]

    # The agent says what it threw away, and why.
    sent = flood_out["sent"]
    rejected = doc["agent_stats"]["rejected"]
    want = {
        "bad_mac": sent["random"],
        "malformed": sent["truncated"] + sent["empty"] + sent["oversize"],
        "other_run": sent["replay"],
    }
    print(f"flood sent {sent}; agent rejected {rejected}; accepted "
          f"{doc['agent_stats']['accepted']}")  # fmt: skip
    for reason, n in want.items():
        assert 0.95 * n <= rejected.get(reason, 0) <= n, (reason, rejected, sent)
    assert rejected.get("duplicate", 0) == 0, rejected
    assert doc["agent_stats"]["accepted"] == sum(r["received"] for r in doc["ranges"])

    # Never a reflector: nothing UDP or ICMP left the agent's namespace, through two runs
    # and a flood.
    assert out_packets == [0, 0, 0], out_packets


@pytest.mark.root
@pytest.mark.slow
def test_max_datagrams_holds_when_retries_pile_up(tmp_path: Path) -> None:
    """20,000 cells, 10,000 of them blocked, and a ceiling of 25,000 datagrams: retrying
    every blocked cell even once would break the ceiling."""
    limit = 25_000
    with lab_udpreach(POLICY, tmp_path, probe_args=("--max-datagrams", str(limit))) as lr:
        code, doc, err = lr.run("--src-ports", "35000-54999", timeout=120)
    assert code in (0, 2, 3), err
    if code == 2:
        assert "--max-datagrams" in err
        return
    cells = expand_verdicts(doc)
    # Whatever it does at the ceiling, it never calls an open cell blocked.
    assert all(v == "open" for (d, s), v in cells.items() if s not in BLOCKED)
    assert all(v in ("blocked", "unknown") for (d, s), v in cells.items() if s in BLOCKED)
    sent = doc["probe_stats"]["sent"]
    print(f"ceiling {limit}: exit {code}, {sent} sent, {doc['summary']}, loss {doc['loss']}")
    assert sent <= limit, f"{sent} datagrams sent with --max-datagrams {limit}"
    # It stopped short of a full retry, says so, and claims no confidence it does not have.
    assert any(str(limit) in w for w in doc["warnings"]), doc["warnings"]
    assert doc["loss"]["confidence_reached"] is False, doc["loss"]
