"""Who may hold a control connection: budgets, per-network limits, eviction, penalties.

Theory of operation (after OpenSSH's ``MaxStartups``, ``PerSourceMaxStartups`` with
``PerSourceNetBlockSize``, and ``PerSourcePenalties``): a connection that has not
authenticated yet costs an attacker nothing, so those are counted apart from authenticated
sessions and can never crowd them out.

- **Startups** (unauthenticated connections) have a budget of their own, in all and per
  source network (a /24 for IPv4, a /64 for IPv6: one host owns many addresses). A newcomer
  is never the one turned away for want of room: when its network's share is full, that
  network's oldest startup is dropped; when the whole budget is full, the oldest startup of
  the network holding the most is. A genuine client finishes its handshake in a round trip,
  so it is always among the youngest: an attacker who holds hundreds of connections open,
  even from the client's own address, only ever evicts its own.
- **Sessions** that have authenticated move to one of two pools, agents and requesters, each
  with its own ceiling: fake agents cannot take the slots ``udpreach run`` needs, nor the
  other way round.
- **Penalties**: an address whose handshakes keep failing (wrong key, garbage, time-outs,
  hanging up before authenticating) is refused outright for a while, starting at
  ``penalty_min`` seconds and doubling up to ``penalty_max``; points leak away over time. An
  address that authenticated recently is exempt (it is a genuine client; attackers sharing
  its address, behind the same NAT, are left to eviction).

Pure: no trio, no sockets, ``now`` is an argument; the coordinator acts on the decisions.
Every table is bounded (``max_tracked`` addresses; the oldest entry goes first).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum


class Outcome(Enum):
    """How a connection ended, as far as penalties go."""

    OK = "ok"  # authenticated
    AUTH_FAILED = "auth_failed"
    TIMEOUT = "timeout"
    PROTOCOL = "protocol"  # garbage, wrong version, hung up before authenticating
    EVICTED = "evicted"  # dropped to make room: not the connection's fault
    REFUSED = "refused"


PENALIZED = {Outcome.AUTH_FAILED, Outcome.TIMEOUT, Outcome.PROTOCOL}


@dataclass
class Limits:
    startups: int = 128  # unauthenticated connections in all
    startups_per_network: int = 32
    agents: int = 512  # authenticated agent sessions
    requesters: int = 64  # authenticated requests (run, agents)
    v4_prefix: int = 24
    v6_prefix: int = 64
    penalty_points: float = 10.0  # failed handshakes that get an address refused
    leak_per_second: float = 1 / 6  # a point leaks away every 6 s
    penalty_min: float = 15.0
    penalty_max: float = 600.0
    exempt_for: float = 600.0  # an address that authenticated is never refused this long
    max_tracked: int = 8192


def network_of(address: str, limits: Limits) -> str:
    """The source network *address* counts against (an unparsable one counts alone)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    prefix = limits.v4_prefix if ip.version == 4 else limits.v6_prefix
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


@dataclass
class Decision:
    accepted: bool
    evict: list[int] = field(default_factory=list)
    reason: str = ""


@dataclass
class _Penalty:
    points: float = 0.0
    updated: float = 0.0
    until: float = 0.0
    duration: float = 0.0


class Admission:
    """The coordinator's connection bookkeeping (see the module docstring)."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._startups: dict[str, OrderedDict[int, float]] = {}  # network -> conn -> opened
        self._network: dict[int, str] = {}  # unauthenticated conn -> its network
        self._address: dict[int, str] = {}  # every live conn -> its address
        self._role: dict[int, str] = {}  # authenticated conn -> "agent" | "requester"
        self.sessions = {"agent": 0, "requester": 0}
        self._penalties: OrderedDict[str, _Penalty] = OrderedDict()
        self._trusted: OrderedDict[str, float] = OrderedDict()  # address -> last auth
        self.evictions = 0
        self.refusals = 0

    @property
    def startups(self) -> int:
        return len(self._network)

    def open(self, conn: int, address: str, now: float) -> Decision:
        """A new connection *conn* from *address*: refuse it, or admit it and say which
        startups to drop to make room."""
        lim = self.limits
        refused = self._penalized(address, now)
        if refused:
            self.refusals += 1
            return Decision(False, reason=refused)
        net = network_of(address, lim)
        evict: list[int] = []
        mine = self._startups.get(net)
        if mine is not None and len(mine) >= lim.startups_per_network:
            evict.append(next(iter(mine)))
        elif self.startups >= lim.startups:
            fullest = max(self._startups.values(), key=len)
            evict.append(next(iter(fullest)))
        for victim in evict:
            self._forget_startup(victim)
        self.evictions += len(evict)
        self._startups.setdefault(net, OrderedDict())[conn] = now
        self._network[conn] = net
        self._address[conn] = address
        return Decision(True, evict)

    def authenticated(self, conn: int, role: str, now: float) -> str | None:
        """*conn* proved a key; None if its pool has room (it now counts there), else why
        it is refused."""
        self._forget_startup(conn)
        address = self._address.get(conn, "")
        self._trusted[address] = now
        self._trusted.move_to_end(address)
        while len(self._trusted) > self.limits.max_tracked:
            self._trusted.popitem(last=False)
        self._penalties.pop(address, None)
        ceiling = self.limits.agents if role == "agent" else self.limits.requesters
        if self.sessions[role] >= ceiling:
            self.refusals += 1
            kind = "agent sessions" if role == "agent" else "requests"
            return f"connection limit reached: {ceiling} {kind} at once"
        self._role[conn] = role
        self.sessions[role] += 1
        return None

    def closed(self, conn: int, outcome: Outcome, now: float) -> None:
        """*conn* ended (it may have been evicted already: then only the outcome counts)."""
        role = self._role.pop(conn, None)
        if role is not None:
            self.sessions[role] -= 1
        self._forget_startup(conn)
        address = self._address.pop(conn, None)
        if address is not None and outcome in PENALIZED:
            self._penalize(address, now)

    def _forget_startup(self, conn: int) -> None:
        net = self._network.pop(conn, None)
        if net is None:
            return
        mine = self._startups[net]
        mine.pop(conn, None)
        if not mine:
            del self._startups[net]

    # -- penalties ----------------------------------------------------------------------------

    def _exempt(self, address: str, now: float) -> bool:
        last = self._trusted.get(address)
        return last is not None and now - last < self.limits.exempt_for

    def _penalize(self, address: str, now: float) -> None:
        if self._exempt(address, now):
            return
        lim = self.limits
        p = self._penalties.pop(address, None) or _Penalty(updated=now)
        self._penalties[address] = p  # most recent last
        while len(self._penalties) > lim.max_tracked:
            self._penalties.popitem(last=False)
        if now - p.until > lim.penalty_max:
            p.duration = 0.0  # quiet for long: the next penalty starts small again
        p.points = max(0.0, p.points - (now - p.updated) * lim.leak_per_second) + 1.0
        p.updated = now
        if p.points >= lim.penalty_points and now >= p.until:
            p.duration = min(lim.penalty_max, max(lim.penalty_min, 2 * p.duration))
            p.until = now + p.duration
            p.points = 0.0

    def _penalized(self, address: str, now: float) -> str | None:
        p = self._penalties.get(address)
        if p is None or now >= p.until or self._exempt(address, now):
            return None
        return (
            f"connection refused: too many failed handshakes from {address}; "
            f"try again in {p.until - now:.0f}s"
        )
