"""The plan of a run.

Theory of operation: a run request (from ``udpreach run``) is validated here against the
agent's registration and the probe's limits before anything is sent; what comes out is an
immutable ``Plan``. How a run then goes, phase by phase, is the engine's
(``udpreach.core.sweep``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from udpreach.core.datagram import MAX_SIZE, MIN_SIZE
from udpreach.core.errors import ConfigError
from udpreach.core.portspec import HIGH_FIRST, PORT_LAST, format_ports, parse_ports

DEFAULT_SRC = f"{HIGH_FIRST}-{PORT_LAST}"
DEFAULT_RATE = 100_000
AUTO_COPIES_CEILING = 32  # a 50%-loss cell is unseen after 32 attempts once in 4e9
MAX_COPIES = 255
MAX_CELLS = 64 * 64512  # 64 destination ports x every high source port
DEFAULT_CONFIDENCE = 0.01
# Seconds to tell silent cells apart under rate-limited ICMP, by default: 20 for one
# destination port and 10 more for each further one, at most 60. Each test of a reject costs
# a token of the router's limit (one a second at Linux's default), and every destination
# port's runs need their own tests (``udpreach.core.silence``).
DEFAULT_ICMP_BUDGET = 20.0
ICMP_BUDGET_PER_PORT = 10.0
ICMP_BUDGET_DEFAULT_MAX = 60.0
MAX_ICMP_BUDGET = 600.0
DEFAULT_MAX_DELAY = 1.0  # UDP one-way delay waited for before any delay was measured
MAX_MAX_DELAY = 60.0


@dataclass(frozen=True)
class Plan:
    """What a run will test and how."""

    src_ports: tuple[int, ...]
    dst_ports: tuple[int, ...]
    copies: int  # the most datagrams sent for one cell
    auto_copies: bool  # True: stop earlier once the loss estimate allows
    rate: int  # pacing ceiling, datagrams per second
    size: int  # payload bytes
    confidence: float = DEFAULT_CONFIDENCE  # target chance of any false "blocked"
    icmp_budget: float = DEFAULT_ICMP_BUDGET  # seconds for tests of silent cells
    max_delay: float = DEFAULT_MAX_DELAY  # UDP delay waited for before any is measured

    @property
    def cells(self) -> int:
        return len(self.src_ports) * len(self.dst_ports)

    @cached_property
    def src_spec(self) -> str:
        """The source ports as the shortest SPEC (a full sweep's takes milliseconds)."""
        return format_ports(self.src_ports)

    def to_json(self) -> dict[str, Any]:
        return {
            "src_ports": self.src_spec,
            "dst_ports": list(self.dst_ports),
            "copies": self.copies,
            "rate": self.rate,
            "size": self.size,
            "copies_mode": "auto" if self.auto_copies else "fixed",
            "icmp_budget": self.icmp_budget,
            "max_delay": self.max_delay,
        }


def default_icmp_budget(dst_ports: int) -> float:
    """The ICMP budget when none is given, for a plan of ``dst_ports`` destination ports."""
    extra = ICMP_BUDGET_PER_PORT * max(0, dst_ports - 1)
    return min(ICMP_BUDGET_DEFAULT_MAX, DEFAULT_ICMP_BUDGET + extra)


def _given(req: dict[str, Any], key: str, default: Any) -> Any:
    value = req.get(key)
    return default if value is None else value


def plan_from_request(
    req: dict[str, Any],
    agent_ports: tuple[int, ...],
    *,
    max_rate: int,
    max_datagrams: int,
    max_bytes: int | None = None,
    header_bytes: int = 28,
) -> tuple[Plan, list[str]]:
    """Validate a run request; return the plan and warnings (e.g. a clamped rate).

    Raises:
        ConfigError: a malformed or impossible request.
    """
    warnings: list[str] = []
    try:
        src = parse_ports(str(req.get("src_ports") or DEFAULT_SRC), allow_random=True)
        dst_spec = req.get("dst_ports")
        dst = parse_ports(str(dst_spec)) if dst_spec else tuple(agent_ports)
        copies_raw = req.get("copies")
        rate = int(_given(req, "rate", DEFAULT_RATE))
        size = int(_given(req, "size", MIN_SIZE))
        confidence = float(_given(req, "confidence", DEFAULT_CONFIDENCE))
        budget_given = req.get("icmp_budget")
        icmp_budget = float(budget_given) if budget_given is not None else -1.0
        max_delay = float(_given(req, "max_delay", DEFAULT_MAX_DELAY))
    except (TypeError, ValueError):
        raise ConfigError("malformed run request") from None
    missing = sorted(set(dst) - set(agent_ports))
    if missing:
        raise ConfigError(
            f"destination port(s) {format_ports(missing)} are not among the agent's ports "
            f"({format_ports(agent_ports)})"
        )
    if not dst:
        raise ConfigError("no destination ports to test")
    if budget_given is None:
        icmp_budget = default_icmp_budget(len(dst))
    if copies_raw is None:
        copies, auto = AUTO_COPIES_CEILING, True
    else:
        try:
            copies, auto = int(copies_raw), False
        except (TypeError, ValueError):
            raise ConfigError("--copies must be a number") from None
        if not 1 <= copies <= MAX_COPIES:
            raise ConfigError(f"--copies must be 1-{MAX_COPIES}, got {copies}")
    if rate <= 0:
        raise ConfigError(f"--rate must be positive, got {rate}")
    if rate > max_rate:
        warnings.append(f"rate {rate}/s clamped to the probe's ceiling {max_rate}/s")
        rate = max_rate
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ConfigError(f"--size must be {MIN_SIZE}-{MAX_SIZE} bytes, got {size}")
    if not 0 < confidence < 1:
        raise ConfigError("confidence must be between 0 and 1")
    if not 0 <= icmp_budget <= MAX_ICMP_BUDGET:  # NaN fails both
        raise ConfigError(f"--icmp-budget must be 0-{MAX_ICMP_BUDGET:g} seconds")
    if not 0 < max_delay <= MAX_MAX_DELAY:
        raise ConfigError(f"--max-delay must be more than 0 and at most {MAX_MAX_DELAY:g} s")
    plan = Plan(src, dst, copies, auto, rate, size, confidence, icmp_budget, max_delay)
    if plan.cells > MAX_CELLS:
        raise ConfigError(f"plan has {plan.cells} cells; the most a run may have is {MAX_CELLS}")
    if plan.cells > max_datagrams:
        raise ConfigError(
            f"plan has {plan.cells} cells, a datagram each at least; the probe allows "
            f"{max_datagrams} datagrams per run (--max-datagrams): plan fewer cells"
        )
    if plan.cells * plan.copies > max_datagrams and not auto:
        raise ConfigError(
            f"plan could send {plan.cells * plan.copies} datagrams ({plan.cells} cells, "
            f"--copies {plan.copies}); the probe allows {max_datagrams} per run "
            "(--max-datagrams): lower --copies or plan fewer cells"
        )
    wire = plan.size + header_bytes  # bytes a datagram takes on the wire
    if max_bytes is not None and plan.cells * wire > max_bytes:
        raise ConfigError(
            f"plan would send {plan.cells * wire} bytes in its first round alone; the probe "
            f"allows {max_bytes} per run (--max-bytes)"
        )
    return plan, warnings
