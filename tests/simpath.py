"""A simulated path between the real engine (``Sweep``) and the real agent core, on a fake clock.

Everything is deterministic from a seed. The path model has what real paths have
(``realpaths.md``), with their numbers:

* firewall rules by destination and source-port range: ``accept``, ``drop``, ``reject``
  (an ICMP error from a router, through that router's ICMP rate limit: a token bucket per
  sender, Linux's one per second with a burst of six by default);
* loss per port band (or on an ECMP member: a hash of the source port), a policer of N/s
  with a burst of B packets (on everything or on a band), a UDP one-way delay (the control
  channel has its own), NAT (source port rewriting), a session limit (new flows beyond N
  are dropped: on the whole path, or a NAT pool's on one band), a hop with a small MTU
  (``fragmentation needed`` from that hop, after which the probe's kernel fragments; a rule
  may drop fragments), a policy change at time T;
* datagram mangling (duplicate, corrupt, truncate, reorder by jitter, replay of the run's
  earlier datagrams, datagrams of other runs put on the path) for the agent core's defences;
* ICMP errors that quote whole datagrams (Linux) or headers only, and forged errors;
* a NAT that spreads sources over a pool of addresses, and an agent that dies (its host then
  answers "port unreachable", and the control channel notices after a while).

The probe host's sender can refuse source ports (a local firewall, a port in use: the cell is
untested) and run out of buffer (``backpressure``: the engine sends the rest again later), as
``probe.raw`` and ``probe.sender`` report it.

``SimRun`` drives a ``Sweep`` as the trio shell does, but with events on a heap: a datagram
arrives at the agent after the UDP delay, the agent flushes every 10 ms, on request and when
a batch is full, a receipt batch or a flush reply reaches the probe after the control delay.
It keeps the ground truth of what crossed: every untouched datagram of the run the agent took
in (``genuine``), and the cells and attempts of those the engine has had receipts for
(``crossed()``): what it must credit, no more, no less.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from agent.core import AgentCore
from agent.listen import DRAIN_CHUNK
from probe.sender import GroupResult
from udpreach.core.datagram import TokenCodec, derive_run_key
from udpreach.core.framing import RECEIPT, decode_receipts, encode_receipts
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
DRAIN_AFTER = 0.0002  # an agent that drains its socket in chunks wakes this long after a datagram

Cell = tuple[int, int]


@dataclass
class Rule:
    """What a firewall does to the cells of ``dsts`` (None: all) x ``srcs`` (first, last)."""

    action: str  # accept | drop | reject
    srcs: tuple[int, int] = (0, 65535)
    dsts: tuple[int, ...] | None = None
    icmp: tuple[int, int] = (3, 13)  # type, code of a reject
    sender: str = ROUTER
    delay: float = 0.0  # a reject this far down a slow queue: it meets the datagram late

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
    loss_first: bool = False  # the loss bands are upstream of the firewall: rejects lose too
    ecmp_loss: tuple[int, float] | None = None  # (members, loss on member 0)
    police: tuple[float, float] | None = None  # rate, burst: on everything
    band_police: tuple[tuple[int, int], float, float] | None = None  # band, rate, burst
    icmp_rate: float = 1.0  # per sender: tokens per second (Linux: 1000 ms per error)
    icmp_burst: float = 6.0
    icmp_unlimited: bool = False
    icmp_drained: bool = False  # the senders' buckets are empty at the start (an earlier run)
    icmp_delay: float = 0.0  # the errors' extra delay on the way back (a router's slow path)
    quote: int = 576  # bytes of an ICMP error's whole message (RFC 1812); 28: headers only
    nat: Callable[[int], int] | None = None  # source port rewriting
    nat_address: str | None = None
    nat_pool: Callable[[int], str] | None = None  # the public address of each source port
    session_limit: int | None = None  # new flows beyond this many are dropped
    session_band: tuple[int, int] | None = None  # the limit holds these source ports only
    mtu: int | None = None  # a hop's MTU (IPv4 header + UDP header + payload must fit)
    mtu_hop: str = ROUTER
    drop_fragments: bool = False
    duplicate: float = 0.0
    corrupt: float = 0.0  # a share of the delivered datagrams with a byte changed
    truncate: float = 0.0  # a share cut short (a datagram is corrupted or truncated, not both)
    replay: float = 0.0  # per datagram sent, a chance that one that crossed earlier is replayed
    forged_icmp: float = 0.0  # an off-path forger's header-only error for this share of cells
    send_cost: float = 5e-6  # seconds the probe takes per datagram (raw mode here: ~7 us)
    agent_flush: float = AGENT_FLUSH  # the agent's flush timer
    action_cost: float = 0.0  # seconds the shell takes per Send on top (the lab's: 150-250 us)
    agent_lost_at: float | None = None
    outages: list[tuple[float, float]] = field(default_factory=list)  # (from, to): all lost
    lost_notice: float = 0.0  # how long after the agent dies the control channel says so
    dead_host_answers: bool = False  # the dead agent's host answers "port unreachable"
    seed: int = 1
    # rule_at's tables: (id and length of a rule list, dst) -> the rule each source port meets
    _tables: dict[tuple[int, int, int], list[Rule | None]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def rule_at(self, now: float, dst: int, src: int) -> Rule | None:
        rules = self.rules
        if self.later is not None and now >= self.later[0]:
            rules = self.later[1]
        key = (id(rules), len(rules), dst)
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = self._table(rules, dst)
        return table[src]

    @staticmethod
    def _table(rules: list[Rule], dst: int) -> list[Rule | None]:
        """The rule each source port of ``dst`` meets: the last of ``rules`` that matches it
        (a later rule overrides an earlier one)."""
        table: list[Rule | None] = [None] * 65536
        for r in rules:
            lo, hi = max(0, r.srcs[0]), min(65535, r.srcs[1])
            if type(r).matches is not Rule.matches:  # a rule that picks ports its own way
                for src in range(lo, hi + 1):
                    if r.matches(dst, src):
                        table[src] = r
            elif (r.dsts is None or dst in r.dsts) and hi >= lo:
                table[lo : hi + 1] = [r] * (hi - lo + 1)
        return table


class Arrival(NamedTuple):
    """A datagram reaching the agent's host: its bytes, where from, and what it is."""

    data: bytes
    addr: str
    port: int
    kind: str  # genuine (untouched) | corrupt | truncated | foreign (not this run's)
    cell: Cell  # (dst, src) it was sent for
    seq: int = -1  # its place in the probe's sending order (-1: a copy, or not the probe's)


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
        agent_core: AgentCore | None = None,  # the agent of earlier runs (it names their replays)
        intake: str = "drain",  # drain: chunks, as the agent's listener hands them over
        # (agent.listen.drain, on every platform) | one: the core's on_datagram each
        refused: Mapping[int, str] | None = None,  # source ports the probe host refuses, why
        stuck: Mapping[int, int] | None = None,  # source ports whose socket buffer is full for
        # this many send calls (bind mode: only that port's datagrams wait)
        sndbuf: int | None = None,  # datagrams one send call can queue; the rest of the call
        # waits (raw mode: sendmmsg stops at the first ENOBUFS)
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
        if intake not in ("one", "drain"):
            raise ValueError(f"intake must be 'one' or 'drain', got {intake!r}")
        self.intake = intake
        self.agent = agent_core if agent_core is not None else AgentCore()
        self.agent_run = self.agent.start_run(run_id, TokenCodec(key, size))
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
        self._refused = dict(refused or {})
        self._stuck = dict(stuck or {})
        self.sndbuf = sndbuf
        self._sent_seq = 0
        self._max_seq = -1
        self._inbox: list[Arrival] = []
        self._passed: list[tuple[bytes, Cell]] = []  # untouched datagrams past the firewall
        self._lied = False
        # What happened, for the tests to compare with what the engine concluded.
        self.delivered = 0  # genuine datagrams that reached the agent
        self.sent_to: list[tuple[float, int, int, int]] = []  # (time, dst, src, attempt)
        self.genuine: list[tuple[bytes, str, int]] = []  # untouched datagrams the agent took in
        self.arrived: Counter[str] = Counter()  # datagrams the agent took in, by Arrival.kind
        self.reordered = 0  # taken in after a datagram the probe sent later
        self.reported = 0  # how many of ``genuine`` the engine has had receipts for
        self.receipts: list[bytes] = []  # the receipt batches the engine was given
        self.batches: list[tuple[str, int]] = []  # agent batches: (timer | request | full, records)
        self.backpressured: Counter[int] = Counter()  # send calls that left a port's datagrams
        self.waited: Counter[Cell] = Counter()  # datagrams left for a full buffer, per cell
        self.refusals: Counter[int] = Counter()  # send calls that refused a port
        self._schedule(path.agent_flush, "agent_flush", None)

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
            self._arrive(at, data)
        elif kind == "drain":
            self._drain(at)
        elif kind == "agent_flush":
            if self._agent_alive(at):
                self._agent_batches(at, "timer")
                self._schedule(at + self.path.agent_flush, "agent_flush", None)
        elif kind == "flush_request":
            if self._agent_alive(at):
                mark = self._agent_batches(at, "request")
                self._schedule(at + self.path.control_delay, "flushed", (data, mark))
        elif kind == "receipts":
            payload, mark = data
            self.receipts.append(payload)
            if mark is not None:
                self.reported = max(self.reported, mark)
            sweep.on_receipts(payload, at)
        elif kind == "flushed":
            seq, mark = data
            self.reported = max(self.reported, mark)
            run = self.agent.current  # what the agent counted, as its flushed reply has it
            sweep.on_flushed(seq, at, run.stats() if run is not None else None)
        elif kind == "icmp":
            sweep.on_icmp([data], at)
        elif kind == "reject":
            self._icmp_error(at, *data)
        elif kind == "lost":
            sweep.on_agent_lost("agent 'agent' was lost during the run", at)

    # -- the agent's host ------------------------------------------------------------------------

    def _arrive(self, at: float, a: Arrival) -> None:
        if not self._agent_alive(at):
            if self.path.dead_host_answers:  # nothing listens on the port any more
                self._icmp_error(at, *a.cell, a.data, AGENT, (3, 3))
            return
        if self.agent_kind == "silent":
            return
        if self.intake == "drain":
            if not self._inbox:
                self._schedule(at + DRAIN_AFTER, "drain", None)
            self._inbox.append(a)
            return
        self._took_in(a)
        self.agent.on_datagram(a.data, a.addr, a.port)
        if self.agent_run.needs_flush():
            self._agent_batches(at, "full")

    def _took_in(self, a: Arrival) -> None:
        self.arrived[a.kind] += 1
        if a.kind == "genuine":
            self.genuine.append((a.data, a.addr, a.port))
        if a.seq >= 0:
            if a.seq < self._max_seq:
                self.reordered += 1
            else:
                self._max_seq = a.seq

    def _drain(self, at: float) -> None:
        """The listener's drain: what is queued, in chunks of one recvmmsg each."""
        inbox, self._inbox = self._inbox, []
        for i in range(0, len(inbox), DRAIN_CHUNK):
            chunk = inbox[i : i + DRAIN_CHUNK]
            for a in chunk:
                self._took_in(a)
            self.agent.on_datagrams([(a.data, (a.addr, a.port)) for a in chunk])
            if self.agent_run.needs_flush():
                self._agent_batches(at, "full")

    def _agent_batches(self, at: float, why: str) -> int:
        """The agent sends what it holds; returns how many genuine datagrams it had taken in
        by then (the receipts for them are on their way)."""
        if self._inbox:
            self._drain(at)
        mark = len(self.genuine)
        if self.agent.current is not self.agent_run:
            return mark
        if self.agent_kind == "liar":
            if not self._lied:
                self._lied = True
                self._lie(at)
            return mark
        payloads = self.agent_run.take_batches()
        for i, payload in enumerate(payloads):
            self.batches.append((why, len(decode_receipts(payload)[2]) // RECEIPT.size))
            last = i == len(payloads) - 1
            self._schedule(
                at + self.path.control_delay, "receipts", (payload, mark if last else None)
            )
        return mark

    def _lie(self, at: float) -> None:
        """A secret holder that reports every planned cell received, at every attempt."""
        records = b"".join(
            RECEIPT.pack(0, d, s, 1, s) for d in self.plan.dst_ports for s in self.plan.src_ports
        )
        for i in range(0, len(records), 8 * 8192):
            payload = encode_receipts(self.sweep.run_id, [PROBE], records[i : i + 8 * 8192])
            self._schedule(at + self.path.control_delay, "receipts", (payload, None))

    def inject(self, data: bytes, src: int, at: float) -> None:
        """Put a datagram from elsewhere (another run's, captured earlier) on the path: it
        reaches the agent at ``at`` as if sent from source port ``src``."""
        addr, port = self._observed(src)
        cell = (int.from_bytes(data[3:5], "big"), int.from_bytes(data[5:7], "big"))
        self._schedule(at, "arrive", Arrival(data, addr, port, "foreign", cell))

    # -- the path --------------------------------------------------------------------------------

    def _observed(self, src: int) -> tuple[str, int]:
        """The address and port the agent sees a datagram from source port ``src`` come from."""
        p = self.path
        addr = p.nat_pool(src) if p.nat_pool else (p.nat_address or PROBE)
        return addr, p.nat(src) if p.nat else src

    def _lost(self, src: int) -> bool:
        """Whether a datagram from ``src`` is lost in the path's loss bands."""
        for (lo, hi), rate in self.path.loss:
            if lo <= src <= hi and self.rng.random() < rate:
                return True
        return False

    def _transmit(self, t: float, dst: int, src: int, attempt: int, payload: bytes) -> None:
        p = self.path
        self.sent_to.append((t, dst, src, attempt))
        seq = self._sent_seq
        self._sent_seq += 1
        if p.replay and self._passed and self.rng.random() < p.replay:
            # A device past the firewall sends again something it saw go by earlier.
            old, (od, os_) = self._passed[self.rng.randrange(len(self._passed))]
            addr, port = self._observed(os_)
            self._schedule(
                t + p.udp_delay, "arrive", Arrival(old, addr, port, "genuine", (od, os_))
            )
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
        if (
            p.session_limit is not None
            and (dst, src) not in self._flows
            and (p.session_band is None or p.session_band[0] <= src <= p.session_band[1])
        ):
            if len(self._flows) >= p.session_limit:
                return
            self._flows.add((dst, src))
        if p.loss_first and self._lost(src):
            return
        if any(a <= t < b for a, b in p.outages):  # a link down, a reload that dropped all
            return
        rule = p.rule_at(t, dst, src)
        if rule is not None and rule.action == "drop":
            return
        if rule is not None and rule.action == "reject":
            if rule.delay:  # the sender's bucket is met in arrival order, not ours
                data = (dst, src, payload, rule.sender, rule.icmp)
                self._schedule(t + rule.delay, "reject", data)
            else:
                self._icmp_error(t, dst, src, payload, rule.sender, rule.icmp)
            return
        if self._policer is not None and not self._policer.take(t):
            return
        if p.band_police is not None:
            (lo, hi), _, _ = p.band_police
            policer = self._band_policer
            if lo <= src <= hi and policer is not None and not policer.take(t):
                return
        if not p.loss_first and self._lost(src):
            return
        if p.ecmp_loss is not None:
            members, rate = p.ecmp_loss
            if hash((src, dst, 17)) % members == 0 and self.rng.random() < rate:
                return
        addr, observed = self._observed(src)
        data = payload
        kind = "genuine"
        if p.corrupt or p.truncate:
            r = self.rng.random()
            if r < p.corrupt:
                i = self.rng.randrange(len(data))
                data = data[:i] + bytes([data[i] ^ 0x40]) + data[i + 1 :]
                kind = "corrupt"
            elif r < p.corrupt + p.truncate:
                data = data[: self.rng.randrange(len(data))]
                kind = "truncated"
        arrive = t + p.udp_delay + (self.rng.random() * p.jitter if p.jitter else 0.0)
        self._schedule(arrive, "arrive", Arrival(data, addr, observed, kind, (dst, src), seq))
        if kind == "genuine":
            self.delivered += 1
            if p.replay:
                self._passed.append((payload, (dst, src)))
        if p.duplicate and self.rng.random() < p.duplicate:
            copy = Arrival(payload, addr, observed, "genuine", (dst, src))
            self._schedule(arrive + 0.0001, "arrive", copy)

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
                bucket = self._icmp[sender] = Bucket(
                    p.icmp_rate, p.icmp_burst, tokens=0.0 if p.icmp_drained else -1.0
                )
            if not bucket.take(t):
                return
        quote = payload[: max(0, p.quote - 28 - 28)]
        report = IcmpReport(dst, src, kind[0], kind[1], sender, quote=quote, mtu=mtu)
        self._schedule(t + p.udp_delay / 2 + 0.0002 + p.icmp_delay, "icmp", report)

    # -- the probe host's sender -----------------------------------------------------------------

    def _send(self, act: Send) -> list[tuple[int, GroupResult]] | None:
        """Hand ``act`` to the sender: None when every datagram went out, else one result per
        source port, in first-appearance order (as ``probe.raw`` and ``probe.sender`` do)."""
        t = start = self.now + self.path.action_cost
        cost = self.path.send_cost
        k = 0  # datagrams handed over: the sender spaces bursts of act.burst (probe.raw)

        def when() -> float:
            if act.spacing and k and k % act.burst == 0:
                return max(t, start + k // act.burst * act.spacing)
            return t

        if self.sndbuf is None and not self._refused and not self._stuck:
            for d, attempt, srcs in act.groups:
                payloads = self.codec.encode_block(d, srcs, attempt)
                for s, payload in zip(srcs.tolist(), payloads, strict=True):
                    t = when()
                    self._transmit(t, d, s, attempt, payload)
                    t += cost
                    k += 1
            self.now = t
            return None
        results: dict[int, GroupResult] = {}
        full_now: set[int] = set()
        room = self.sndbuf
        sent = 0
        for d, attempt, srcs in act.groups:
            payloads = self.codec.encode_block(d, srcs, attempt)
            for s, payload in zip(srcs.tolist(), payloads, strict=True):
                res = results.get(s)
                if res is None:
                    res = results[s] = GroupResult([])
                    if self._stuck.get(s, 0) > 0:
                        self._stuck[s] -= 1
                        full_now.add(s)
                if s in self._refused:
                    res.untested = self._refused[s]
                elif s in full_now or (room is not None and room <= 0):
                    res.backpressure = True
                    self.waited[(d, s)] += 1
                else:
                    t = when()
                    self._transmit(t, d, s, attempt, payload)
                    t += cost
                    k += 1
                    res.sent.append(d)
                    sent += 1
                    if room is not None:
                        room -= 1
        for s, res in results.items():
            if res.backpressure:
                res.untested = None  # a refusal shows up again when it is sent again
                self.backpressured[s] += 1
            elif res.untested:
                self.refusals[s] += 1
        self.now = t
        return None if sent == act.count else list(results.items())

    # -- the shell -------------------------------------------------------------------------------

    def run(
        self, limit: float = 3600.0, stop: Callable[[Sweep], bool] | None = None
    ) -> dict[str, Any]:
        """Drive the engine until it finishes (or ``limit`` seconds of fake time pass).

        ``stop``: the requester cancels the run the first time it says so.
        """
        sweep = self.sweep
        lost_at = self.path.agent_lost_at
        if lost_at is not None:
            notice = lost_at + self.path.control_delay + self.path.lost_notice
            self._schedule(notice, "lost", None)
        while True:
            self._deliver_due()
            if self.now > limit:
                raise AssertionError(f"the run did not end within {limit} s of fake time")
            if stop is not None and stop(sweep):
                stop = None
                sweep.cancel(self.now)
            act = sweep.next_action(self.now)
            if isinstance(act, Send):
                start = self.now
                results = self._send(act)
                sweep.on_sent(act, results, start)
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

    # -- the ground truth ------------------------------------------------------------------------

    def crossed(self) -> dict[Cell, set[int]]:
        """The cells, with their attempts, of which an untouched datagram reached the agent
        and was reported to the engine: what the engine must credit, no more, no less."""
        out: dict[Cell, set[int]] = {}
        for data, _, _ in self.genuine[: self.reported]:
            cell = (int.from_bytes(data[3:5], "big"), int.from_bytes(data[5:7], "big"))
            out.setdefault(cell, set()).add(data[7])
        return out

    def receipt_records(self) -> list[tuple[int, int, int, str, int]]:
        """Every receipt the engine was given: (dst, src, attempt, address, port seen)."""
        out = []
        for payload in self.receipts:
            _, addrs, recs = decode_receipts(payload)
            for ai, dst, src, attempt, port in RECEIPT.iter_unpack(recs):
                out.append((dst, src, attempt, addrs[ai], port))
        return out


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
    """Cells whose verdict differs from ``want``. A blocked range with ``"icmp_limited": N``
    says N of its cells could not be told dropped or rejected: up to N of its cells whose
    truth is rejected count as right; if more of them are rejected in truth, all are wrong
    (as the lab's ``wrong_cells`` counts them)."""
    got = verdicts(doc)
    allowed: set[tuple[int, int]] = set()
    if limited_ok:
        for r in doc["ranges"]:
            if r["verdict"] != "blocked" or not r.get("icmp_limited"):
                continue
            cells = [(r["dst_port"], s) for s in range(r["first"], r["last"] + 1)]
            rejected = [c for c in cells if want.get(c) == "rejected"]
            if len(rejected) <= r["icmp_limited"]:
                allowed.update(rejected)
    bad = []
    for cell, v in want.items():
        g = got.get(cell)
        if g == v or cell in allowed:
            continue
        bad.append((cell, v, str(g)))
    return bad
