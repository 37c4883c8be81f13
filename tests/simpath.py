"""A simulated path between the real engine (``Sweep``) and the real agent core, on a fake clock.

Everything is deterministic from a seed. The path model has what real paths have
(``realpaths.md``), with their numbers:

* firewall rules by destination and source-port range: ``accept``, ``drop``, ``reject``
  (an ICMP error from a router, through that router's ICMP rate limit: a token bucket per
  sender, Linux's one per second with a burst of six by default);
* loss per port band (or on an ECMP member: a hash of the source port), a policer of N/s
  with a burst of B packets (on everything or on a band), a UDP one-way delay (the control
  channel has its own), NAT (source port rewriting), a session limit (new flows beyond N
  are dropped), a hop with a small MTU (``fragmentation needed`` from that hop, after which
  the probe's kernel fragments; a rule may drop fragments), a policy change at time T;
* datagram mangling (duplicate, corrupt, truncate, replay) for the agent core's defences;
* ICMP errors that quote whole datagrams (Linux) or headers only, and forged errors.

``SimRun`` drives a ``Sweep`` as the trio shell does, but with events on a heap: a datagram
arrives at the agent after the UDP delay, the agent flushes every 10 ms and on request, a
receipt batch or a flush reply reaches the probe after the control delay.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.core import AgentCore
from udpreach.core.datagram import TokenCodec, derive_run_key
from udpreach.core.plan import Plan, plan_from_request
from udpreach.core.sweep import (
    Checkpoint,
    Finished,
    Flush,
    IcmpReport,
    Send,
    Sweep,
    SweepSettings,
    Wait,
)

SECRET = b"0123456789abcdef0123456789abcdef"
PROBE = "198.18.2.2"
AGENT = "198.18.1.2"
ROUTER = "198.18.2.1"
AGENT_FLUSH = 0.01  # the agent sends its receipts this often (agent.service.FLUSH_INTERVAL)


@dataclass
class Rule:
    """What a firewall does to the cells of ``dsts`` (None: all) x ``srcs`` (first, last)."""

    action: str  # accept | drop | reject
    srcs: tuple[int, int] = (0, 65535)
    dsts: tuple[int, ...] | None = None
    icmp: tuple[int, int] = (3, 13)  # type, code of a reject
    sender: str = ROUTER

    def matches(self, dst: int, src: int) -> bool:
        return (self.dsts is None or dst in self.dsts) and self.srcs[0] <= src <= self.srcs[1]


@dataclass
class Bucket:
    """A token bucket: ``rate`` tokens per second, at most ``burst`` held."""

    rate: float
    burst: float
    tokens: float = -1.0
    at: float = 0.0

    def take(self, now: float) -> bool:
        if self.tokens < 0:
            self.tokens = self.burst
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass
class Path:
    """The path model (see the module docstring). Times are seconds of the fake clock."""

    rules: list[Rule] = field(default_factory=list)
    later: tuple[float, list[Rule]] | None = None  # the policy from time T on
    udp_delay: float = 0.0005
    jitter: float = 0.0
    control_delay: float = 0.0005  # one way, agent <-> coordinator
    loss: list[tuple[tuple[int, int], float]] = field(default_factory=list)  # band, rate
    ecmp_loss: tuple[int, float] | None = None  # (members, loss on member 0)
    police: tuple[float, float] | None = None  # rate, burst: on everything
    band_police: tuple[tuple[int, int], float, float] | None = None  # band, rate, burst
    icmp_rate: float = 1.0  # per sender: tokens per second (Linux: 1000 ms per error)
    icmp_burst: float = 6.0
    icmp_unlimited: bool = False
    quote: int = 576  # bytes of an ICMP error's whole message (RFC 1812); 28: headers only
    nat: Callable[[int], int] | None = None  # source port rewriting
    nat_address: str | None = None
    session_limit: int | None = None  # new flows beyond this many are dropped
    mtu: int | None = None  # a hop's MTU (IPv4 header + UDP header + payload must fit)
    mtu_hop: str = ROUTER
    drop_fragments: bool = False
    duplicate: float = 0.0
    corrupt: float = 0.0
    truncate: float = 0.0
    forged_icmp: float = 0.0  # an off-path forger's header-only error for this share of cells
    send_cost: float = 5e-6  # seconds the probe takes per datagram (raw mode here: ~7 us)
    agent_lost_at: float | None = None
    seed: int = 1

    def rule_at(self, now: float, dst: int, src: int) -> Rule | None:
        rules = self.rules
        if self.later is not None and now >= self.later[0]:
            rules = self.later[1]
        for r in reversed(rules):  # a later rule overrides an earlier one
            if r.matches(dst, src):
                return r
        return None


class SimRun:
    """One run of the real engine over a ``Path`` (see the module docstring)."""

    def __init__(
        self,
        path: Path,
        *,
        src_ports: str = "1024-65535",
        dst_ports: Sequence[int] = (5000,),
        settings: SweepSettings | None = None,
        seed: int = 7,
        size: int = 16,
        rate: int = 100_000,
        copies: int | None = None,
        run_id: str = "sim-run",
        agent: str = "agent",  # agent | silent: reports nothing | liar: every cell received
    ) -> None:
        self.path = path
        self.rng = random.Random(path.seed)
        req: dict[str, Any] = {"src_ports": src_ports, "rate": rate, "size": size}
        if copies is not None:
            req["copies"] = copies
        self.plan: Plan
        self.plan, _ = plan_from_request(req, tuple(dst_ports), max_rate=10**7, max_datagrams=10**9)
        key = derive_run_key(SECRET, run_id, b"c" * 16, b"a" * 16)
        self.codec = TokenCodec(key, size)
        self.agent_kind = agent
        self.agent = AgentCore()
        self.agent.start_run(run_id, TokenCodec(key, size))
        base = settings or SweepSettings()
        self.settings = SweepSettings(**{**base.__dict__, "control_rtt": 2 * path.control_delay})
        self.now = 0.0
        self.sweep = Sweep(
            self.plan,
            self.codec,
            now=0.0,
            seed=seed,
            settings=self.settings,
            run_id=run_id,
            source=PROBE,
            target=AGENT,
        )
        self._events: list[tuple[float, int, str, Any]] = []
        self._seq = itertools.count()
        self._icmp: dict[str, Bucket] = {}
        self._policer = Bucket(*path.police) if path.police else None
        self._band_policer = Bucket(*path.band_police[1:]) if path.band_police else None
        self._flows: set[tuple[int, int]] = set()
        self._pmtu_known = False
        self.delivered = 0  # genuine datagrams that reached the agent
        self.sent_to: list[tuple[float, int, int, int]] = []  # (time, dst, src, attempt)
        self.lost_notified = False
        self._lied = False
        self._schedule(AGENT_FLUSH, "agent_flush", None)

    # -- the event heap ------------------------------------------------------------------------

    def _schedule(self, at: float, kind: str, data: Any) -> None:
        heapq.heappush(self._events, (at, next(self._seq), kind, data))

    def _agent_alive(self, at: float) -> bool:
        lost = self.path.agent_lost_at
        return lost is None or at < lost

    def _deliver_due(self) -> None:
        while self._events and self._events[0][0] <= self.now:
            at, _, kind, data = heapq.heappop(self._events)
            self._event(at, kind, data)

    def _event(self, at: float, kind: str, data: Any) -> None:
        sweep = self.sweep
        if kind == "arrive":
            if self._agent_alive(at) and self.agent_kind != "silent":
                self.agent.on_datagrams([data])
        elif kind == "agent_flush":
            if self._agent_alive(at):
                self._agent_batches(at)
                self._schedule(at + AGENT_FLUSH, "agent_flush", None)
        elif kind == "flush_request":
            if self._agent_alive(at):
                self._agent_batches(at)
                self._schedule(at + self.path.control_delay, "flushed", data)
        elif kind == "receipts":
            sweep.on_receipts(data, at)
        elif kind == "flushed":
            sweep.on_flushed(data, at, None)
        elif kind == "icmp":
            sweep.on_icmp([data], at)
        elif kind == "lost":
            sweep.on_agent_lost("agent 'agent' was lost during the run", at)

    def _agent_batches(self, at: float) -> None:
        run = self.agent.current
        if run is None:
            return
        if self.agent_kind == "liar":
            if not self._lied:
                self._lied = True
                self._lie(at)
            return
        for payload in run.take_batches():
            self._schedule(at + self.path.control_delay, "receipts", payload)

    def _lie(self, at: float) -> None:
        """A secret holder that reports every planned cell received, at every attempt."""
        from udpreach.core.framing import RECEIPT, encode_receipts

        records = b"".join(
            RECEIPT.pack(0, d, s, 1, s) for d in self.plan.dst_ports for s in self.plan.src_ports
        )
        for i in range(0, len(records), 8 * 8192):
            payload = encode_receipts(self.sweep.run_id, [PROBE], records[i : i + 8 * 8192])
            self._schedule(at + self.path.control_delay, "receipts", payload)

    # -- the path --------------------------------------------------------------------------------

    def _transmit(self, t: float, dst: int, src: int, attempt: int, payload: bytes) -> None:
        p = self.path
        self.sent_to.append((t, dst, src, attempt))
        size = len(payload) + 28
        if p.mtu is not None and size > p.mtu:
            if not self._pmtu_known:
                # DF set, too big for the hop: "fragmentation needed", and the kernel learns
                # the path MTU (its later sends go fragmented).
                self._pmtu_known = True
                self._icmp_error(t, dst, src, payload, p.mtu_hop, (3, 4), mtu=p.mtu)
                return
            if p.drop_fragments:
                return
        if p.forged_icmp and self.rng.random() < p.forged_icmp:
            self._schedule(t + 0.0002, "icmp", IcmpReport(dst, src, 3, 13, "198.18.9.9", quote=b""))
        if p.session_limit is not None and (dst, src) not in self._flows:
            if len(self._flows) >= p.session_limit:
                return
            self._flows.add((dst, src))
        rule = p.rule_at(t, dst, src)
        if rule is not None and rule.action == "drop":
            return
        if rule is not None and rule.action == "reject":
            self._icmp_error(t, dst, src, payload, rule.sender, rule.icmp)
            return
        if self._policer is not None and not self._policer.take(t):
            return
        if p.band_police is not None:
            (lo, hi), _, _ = p.band_police
            policer = self._band_policer
            if lo <= src <= hi and policer is not None and not policer.take(t):
                return
        for (lo, hi), rate in p.loss:
            if lo <= src <= hi and self.rng.random() < rate:
                return
        if p.ecmp_loss is not None:
            members, rate = p.ecmp_loss
            if hash((src, dst, 17)) % members == 0 and self.rng.random() < rate:
                return
        observed = p.nat(src) if p.nat else src
        addr = p.nat_address or PROBE
        data = payload
        if p.corrupt and self.rng.random() < p.corrupt:
            i = self.rng.randrange(len(data))
            data = data[:i] + bytes([data[i] ^ 0x40]) + data[i + 1 :]
        if p.truncate and self.rng.random() < p.truncate:
            data = data[: self.rng.randrange(len(data))]
        arrive = t + p.udp_delay + (self.rng.random() * p.jitter if p.jitter else 0.0)
        self._schedule(arrive, "arrive", (data, (addr, observed)))
        if data == payload:
            self.delivered += 1
        if p.duplicate and self.rng.random() < p.duplicate:
            self._schedule(arrive + 0.0001, "arrive", (payload, (addr, observed)))

    def _icmp_error(
        self,
        t: float,
        dst: int,
        src: int,
        payload: bytes,
        sender: str,
        kind: tuple[int, int],
        mtu: int = 0,
    ) -> None:
        p = self.path
        if not p.icmp_unlimited:
            bucket = self._icmp.get(sender)
            if bucket is None:
                bucket = self._icmp[sender] = Bucket(p.icmp_rate, p.icmp_burst)
            if not bucket.take(t):
                return
        quote = payload[: max(0, p.quote - 28 - 28)]
        report = IcmpReport(dst, src, kind[0], kind[1], sender, quote=quote, mtu=mtu)
        self._schedule(t + p.udp_delay / 2 + 0.0002, "icmp", report)

    # -- the shell -------------------------------------------------------------------------------

    def run(self, limit: float = 3600.0) -> dict[str, Any]:
        """Drive the engine until it finishes (or ``limit`` seconds of fake time pass)."""
        sweep = self.sweep
        lost_at = self.path.agent_lost_at
        if lost_at is not None:
            self._schedule(lost_at + self.path.control_delay, "lost", None)
        while True:
            self._deliver_due()
            if self.now > limit:
                raise AssertionError(f"the run did not end within {limit} s of fake time")
            act = sweep.next_action(self.now)
            if isinstance(act, Send):
                t = self.now
                for d, attempt, srcs in act.groups:
                    payloads = self.codec.encode_block(d, srcs, attempt)
                    for s, payload in zip(srcs.tolist(), payloads, strict=True):
                        self._transmit(t, d, s, attempt, payload)
                        t += self.path.send_cost
                sweep.on_sent(act, None, self.now)
                self.now = t
            elif isinstance(act, Flush):
                self._schedule(self.now + self.path.control_delay, "flush_request", act.seq)
            elif isinstance(act, Wait):
                nxt = self._events[0][0] if self._events else act.until
                self.now = max(self.now, min(act.until, nxt))
            elif isinstance(act, Checkpoint):
                continue
            elif isinstance(act, Finished):
                break
        return sweep.document(
            agent={"name": "agent", "registered": AGENT, "observed": AGENT, "ports": [5000]},
            probe={"address": PROBE, "target": AGENT, "send_mode": "sim"},
            started=0.0,
            finished=self.now,
        )


def verdicts(doc: dict[str, Any]) -> dict[tuple[int, int], str]:
    """Every cell's verdict in a run document."""
    out: dict[tuple[int, int], str] = {}
    for r in doc["ranges"]:
        for s in range(r["first"], r["last"] + 1):
            out[(r["dst_port"], s)] = r["verdict"]
    return out


def truth(
    path: Path, dsts: Sequence[int], srcs: Sequence[int], at: float = 0.0
) -> dict[tuple[int, int], str]:
    """What the path's policy (at time ``at``) says each cell is."""
    out: dict[tuple[int, int], str] = {}
    names = {"accept": "open", "drop": "blocked", "reject": "rejected"}
    for d in dsts:
        for s in srcs:
            rule = path.rule_at(at, d, s)
            out[(d, s)] = names[rule.action] if rule is not None else "open"
    return out


def mismatches(
    doc: dict[str, Any], want: dict[tuple[int, int], str], *, limited_ok: bool = True
) -> list[tuple[tuple[int, int], str, str]]:
    """Cells whose verdict differs from ``want``. A cell of a blocked range's icmp_limited
    count is right where the truth is rejected or blocked (the budget could not tell)."""
    got = verdicts(doc)
    limited: set[tuple[int, int]] = set()
    if limited_ok:
        for r in doc["ranges"]:
            if r["verdict"] == "blocked" and r.get("icmp_limited"):
                limited.update((r["dst_port"], s) for s in range(r["first"], r["last"] + 1))
    bad = []
    for cell, v in want.items():
        g = got.get(cell)
        if g == v:
            continue
        if cell in limited and v in ("rejected", "blocked") and g == "blocked":
            continue
        bad.append((cell, v, str(g)))
    return bad
