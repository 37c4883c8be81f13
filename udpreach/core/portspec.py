"""Port SPECs: ``5000``, ``5000,5001,6000-6002``, ``1024-65535``, ``random:N``, ``0``.

Theory of operation: a SPEC is parsed once, at the edge, into a sorted tuple of distinct
port numbers; everything downstream works on that tuple. ``random:N`` draws N distinct high
ports (1024-65535, where a server's dynamic source ports come from) from a caller-supplied
``random.Random`` so that the choice is reproducible in tests. ``0`` (an ephemeral port chosen
by the OS) is only meaningful for an agent's listening ports. The inverse, ``format_ports``,
compresses a port set back into the shortest SPEC.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable

from udpreach.core.errors import PortSpecError

HIGH_FIRST = 1024
PORT_LAST = 65535
HIGH_PORTS = PORT_LAST - HIGH_FIRST + 1  # 64,512

_ITEM = re.compile(r"^(\d{1,5})(?:-(\d{1,5}))?$")
_NUMBER = re.compile(r"^[0-9]+$")


def parse_ports(
    spec: str,
    *,
    allow_zero: bool = False,
    allow_random: bool = False,
    rng: random.Random | None = None,
) -> tuple[int, ...]:
    """Parse a port SPEC into a sorted tuple of distinct ports.

    Args:
        spec: the text the user gave.
        allow_zero: accept ``0`` (one ephemeral port) as an item.
        allow_random: accept ``random:N``.
        rng: the source of randomness for ``random:N`` (a fresh SystemRandom if None).

    Raises:
        PortSpecError: with a one-line message naming the offending item.
    """
    text = spec.strip()
    if not text:
        raise PortSpecError("empty port spec")
    if text.startswith("random:") and "," not in text:
        if not allow_random:
            raise PortSpecError(f"'random:N' is not allowed here: {spec!r}")
        count = text.removeprefix("random:").strip()
        if not _NUMBER.match(count):
            raise PortSpecError(
                f"random:N needs N to be a number of ports (1-{HIGH_PORTS}), got {count!r}"
            )
        n = int(count) if len(count) <= 6 else HIGH_PORTS + 1  # no 5,000-digit int()
        if not 1 <= n <= HIGH_PORTS:
            raise PortSpecError(f"random:N needs 1 <= N <= {HIGH_PORTS}, got {count}")
        chooser = rng if rng is not None else random.SystemRandom()
        return tuple(sorted(chooser.sample(range(HIGH_FIRST, PORT_LAST + 1), n)))
    ports: set[int] = set()
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise PortSpecError(f"empty item in port spec {spec!r}")
        if item.startswith("random:"):
            raise PortSpecError(f"'random:N' must stand alone in a port spec: {spec!r}")
        im = _ITEM.match(item)
        if not im:
            raise PortSpecError(f"malformed port spec item {item!r} (want PORT or FIRST-LAST)")
        first = int(im.group(1))
        last = int(im.group(2)) if im.group(2) is not None else first
        if first == 0 and last == 0 and im.group(2) is None:
            if not allow_zero:
                raise PortSpecError("port 0 (ephemeral) is only allowed for an agent's --port")
            ports.add(0)
            continue
        for p in (first, last):
            if not 1 <= p <= PORT_LAST:
                raise PortSpecError(f"port {p} out of range 1-{PORT_LAST} in {item!r}")
        if last < first:
            raise PortSpecError(f"reversed range {item!r} (first must not exceed last)")
        ports.update(range(first, last + 1))
    return tuple(sorted(ports))


def ranges_of(ports: Iterable[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive ports, as (first, last) pairs, sorted."""
    if not isinstance(ports, (list, tuple, range)):
        ports = list(ports)
    if ports and min(ports) >= 0 and max(ports) <= PORT_LAST:
        # A byte per port (repeats are harmless) and the regex engine: a full sweep's
        # 64,512 ports in a few ms.
        mask = bytearray(PORT_LAST + 1)
        for p in ports:
            mask[p] = 1
        return [(m.start(), m.end() - 1) for m in _ONES.finditer(mask)]
    out: list[tuple[int, int]] = []
    for p in sorted(set(ports)):
        if out and out[-1][1] + 1 == p:
            out[-1] = (out[-1][0], p)
        else:
            out.append((p, p))
    return out


_ONES = re.compile(rb"\x01+")


def format_ports(ports: Iterable[int]) -> str:
    """The shortest SPEC for a set of ports: ``1024-2047,5000``."""
    parts = [str(a) if a == b else f"{a}-{b}" for a, b in ranges_of(ports)]
    return ",".join(parts)


def short_spec(ports: Iterable[int], limit: int = 60) -> str:
    """A port set for a message: its SPEC, or a summary of one longer than *limit*
    (``500 ports in 497 spans from 1031-65480``: a random:500 sample)."""
    ports = sorted(set(ports))
    spec = format_ports(ports)
    if len(spec) <= limit:
        return spec
    spans = ranges_of(ports)
    return f"{len(ports)} ports in {len(spans)} spans from {spans[0][0]}-{spans[-1][1]}"
