"""Recommendations from a run document: which fixed port to give mail clients, and the
firewall rules that would open what the run found blocked.

Theory of operation: both answers are read off the document's ranges, never off cells.
A destination port is a *fixed-port candidate* (Outlook's ``FixedUDPPortValue``, a port in
1024-65535) when every source port tested against it came through: the server's source
port can never be pinned, so only a destination port open for all of them is safe.

For the rules, the blocked and rejected source ports of each destination port are united
into intervals; destination ports with the same intervals share one rule. The nftables
form puts the intervals into one anonymous set; iptables' ``multiport`` takes at most 15
ports per rule (a range counts as two), so its form is split into as many rules as needed.
The rules are *inserted* at the head of the chain (``nft insert``, ``iptables -I``) so that
they come before the drop or reject rule that caused the finding, and they assume the
conventional ``inet filter forward`` / ``FORWARD`` chain of a router between probe and agent.

A sampled plan (``random:N``: see ``intervals.is_sampled``) tests scattered source ports, so
its blocked samples are single ports with untested gaps between them; a rule listing them
would open exactly the samples and miss the policy. For such a plan each rule opens the
*spans* between closed samples instead: consecutive blocked or rejected samples of one
destination port, with no sample of another verdict between them, make one span from the
first to the last (the unsampled ports inside included), and the notes say so.

An incomplete run (cancelled, agent lost) recommends nothing: its closed cells are whatever
happened to settle before it ended (scattered sampled ports, in the probe's random order),
and its unknown cells, which a rule would have to cover too, were never measured. A rule
from it would open the wrong ports and miss the rest; a fixed port "open for every source
port tested" would rest on the part that happened to be tested. One note says so.
"""

from __future__ import annotations

import ipaddress
import re
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from udpreach.core import schema
from udpreach.core.intervals import (
    Interval,
    Range,
    is_sampled,
    planned_spans,
    ranges_by_dst,
    union,
)
from udpreach.core.portspec import format_ports

FIXED_PORT_FIRST = 1024  # FixedUDPPortValue must lie in 1024-65535
MULTIPORT_SLOTS = 15
OPENABLE = ("blocked", "rejected")
# "Port unreachable" (ICMP, ICMPv6), by the target's address family.
PORT_UNREACHABLE = {4: (3, 3), 6: (1, 4)}


def _items(ivs: list[Interval], sep: str) -> list[str]:
    return [str(a) if a == b else f"{a}{sep}{b}" for a, b in ivs]


def _chunks(ivs: list[Interval]) -> list[list[Interval]]:
    """Split intervals into groups that fit one ``multiport`` match (15 slots)."""
    out: list[list[Interval]] = [[]]
    used = 0
    for a, b in ivs:
        cost = 1 if a == b else 2
        if used + cost > MULTIPORT_SLOTS:
            out.append([])
            used = 0
        out[-1].append((a, b))
        used += cost
    return out


def _nft_set(ivs: list[Interval]) -> str:
    items = _items(ivs, "-")
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def _port_match(kind: str, ivs: list[Interval]) -> str:
    """iptables match for source (``s``) or destination (``d``) ports."""
    if len(ivs) == 1:
        return f"--{kind}port {_items(ivs, ':')[0]}"
    return f"-m multiport --{kind}ports {','.join(_items(ivs, ':'))}"


def nft_rule(
    family: int,
    probe: str,
    agent: str,
    sports: list[Interval],
    dports: list[int],
    chain: str = "forward",
) -> str:
    """The nftables rule accepting UDP from ``probe`` ports ``sports`` to ``agent``, in
    ``chain`` (``input``: on the agent's host itself)."""
    ip = "ip" if family == 4 else "ip6"
    return (
        f"nft insert rule inet filter {chain} {ip} saddr {probe} {ip} daddr {agent} "
        f"udp sport {_nft_set(sports)} udp dport {_nft_set(union((d, d) for d in dports))} "
        "accept"
    )


def iptables_rules(
    family: int,
    probe: str,
    agent: str,
    sports: list[Interval],
    dports: list[int],
    chain: str = "forward",
) -> list[str]:
    """The iptables (or ip6tables) rules accepting the same traffic, 15 ports a match."""
    cmd = "iptables" if family == 4 else "ip6tables"
    out = []
    for dchunk in _chunks(union((d, d) for d in dports)):
        for schunk in _chunks(sports):
            out.append(
                f"{cmd} -I {chain.upper()} -p udp -s {probe} -d {agent} "
                f"{_port_match('d', dchunk)} {_port_match('s', schunk)} -j ACCEPT"
            )
    return out


_FILLED_SPAN = re.compile(r"(\d+): (\d+)(?:-(\d+))?")


def filled_spans(doc: dict[str, Any]) -> dict[int, list[Interval]]:
    """The ranges where delivery stopped by time (a NAT pool, a session table that filled),
    per destination port, as the document's warning names them (``schema.FILLED_WARNING``;
    the first few, when there are many)."""
    out: dict[int, list[Interval]] = defaultdict(list)
    for w in doc.get("warnings") or []:
        if not isinstance(w, str) or not w.startswith(schema.FILLED_WARNING):
            continue
        named = w[len(schema.FILLED_WARNING) :].split(": the ", 1)[0]
        for item in named.split(", "):
            m = _FILLED_SPAN.fullmatch(item.split(" and ", 1)[0])
            if m:
                a = int(m.group(2))
                out[int(m.group(1))].append((a, int(m.group(3) or a)))
    return dict(out)


def _minus(iv: Interval, spans: list[Interval]) -> list[Interval]:
    """``iv`` without the ports of ``spans``."""
    parts = [iv]
    for a, z in spans:
        parts = [
            p
            for lo, hi in parts
            for p in ((lo, min(hi, a - 1)), (max(lo, z + 1), hi))
            if p[0] <= p[1]
        ]
    return parts


def _address(text: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(str(text))
    except ValueError:
        return None


def _closed_spans(rs: list[Range], keep: Callable[[Range], bool]) -> list[Interval]:
    """A sampled plan's closed spans on one destination port: runs of blocked or rejected
    samples (those ``keep`` takes) with no other sample between them, first to last."""
    out: list[Interval] = []
    extend = False
    for r in rs:
        if r["verdict"] not in OPENABLE or not keep(r):
            extend = False
            continue
        first, last = int(r["first"]), int(r["last"])
        if extend:
            out[-1] = (out[-1][0], last)
        else:
            out.append((first, last))
        extend = True
    return out


def recommend(doc: dict[str, Any]) -> dict[str, Any]:
    """Fixed-port candidates and opening rules for a run document.

    Returns:
        ``fixed_ports``: destination ports (>= 1024) open for every source port tested,
        with no cell left unknown (untested cells, which the probe could not send from,
        do not disqualify a port);
        ``ports``: per destination port, its cell count per verdict and translated cells;
        ``rules``: per group of destination ports with the same blocked/rejected source
        ports: ``dst_ports``, ``src_ports`` (a SPEC), ``cells`` (blocked and rejected cells
        the rule opens), ``verdicts``, ``sampled`` (true when ``src_ports`` spans a sampled
        plan's gaps), ``nft`` (one command) and ``iptables`` (a list of commands);
        ``notes``: caveats a person should read before pasting a rule.
        An incomplete run gets neither rules nor fixed-port candidates, and one note
        saying why.
    """
    ports: list[dict[str, Any]] = []
    fixed: list[int] = []
    unsure: list[int] = []  # open so far, but the run ended before all cells settled
    # Closed cells by where a rule would open them: "forward" (a firewall on the path),
    # "input" (the target's own firewall rejected them) and "listener" (the target said
    # port unreachable: nothing listens there, which no rule opens).
    closed: dict[str, dict[int, list[Interval]]] = defaultdict(dict)
    closed_cells: dict[str, dict[int, int]] = defaultdict(dict)
    verdicts_of: dict[int, set[str]] = defaultdict(set)
    translated_any = False
    probe_addr = _address((doc.get("probe") or {}).get("address"))
    agent = doc.get("agent") or {}
    agent_addr = _address(agent.get("observed") or agent.get("registered"))
    target = _address((doc.get("probe") or {}).get("target")) or agent_addr

    by_dst = ranges_by_dst(doc.get("ranges", []))
    # Destination ports something listens on: some source port came through to them.
    heard = {d for d, rs in by_dst.items() if any(r["verdict"] == "open" for r in rs)}

    def where(r: Range) -> str:
        icmp = r.get("icmp") or {}
        if r["verdict"] != "rejected" or target is None or _address(icmp.get("from")) != target:
            return "forward"
        said = (icmp.get("type"), icmp.get("code"))
        if said == PORT_UNREACHABLE[target.version] and int(r["dst_port"]) not in heard:
            return "listener"
        return "input"  # its own firewall (a REJECT rule says port unreachable by default)

    sampled = is_sampled(planned_spans(doc.get("ranges", [])))
    filled = filled_spans(doc)
    limited = 0  # blocked cells a limit that filled by time kept out: no rule opens them
    for d, rs in by_dst.items():
        spans = filled.get(d, [])
        counts = dict.fromkeys(schema.VERDICTS, 0)
        counts["translated"] = 0
        shut: dict[str, list[Interval]] = defaultdict(list)
        shut_cells: dict[str, int] = defaultdict(int)
        for r in rs:
            n = int(r["last"]) - int(r["first"]) + 1
            v = str(r["verdict"])
            counts[v] = counts.get(v, 0) + n
            if r.get("translated"):
                counts["translated"] += n
                translated_any = True
            if v in OPENABLE:
                parts = [(int(r["first"]), int(r["last"]))]
                if v == "blocked" and spans:
                    parts = _minus(parts[0], spans)
                    kept = sum(b - a + 1 for a, b in parts)
                    limited += n - kept
                    n = kept
                if not parts:
                    continue
                kind = where(r)
                shut[kind].extend(parts)
                shut_cells[kind] += n
                if kind != "listener":
                    verdicts_of[d].add(v)
        tested = counts["open"] + counts["blocked"] + counts["rejected"]
        ports.append(
            {"dst_port": d, "cells": sum(counts[v] for v in counts if v != "translated")} | counts
        )
        if d >= FIXED_PORT_FIRST and tested and counts["open"] == tested:
            if counts["unknown"]:
                unsure.append(d)
            else:
                fixed.append(d)
        for kind, ivs in shut.items():

            def keep(r: Range, kind: str = kind, spans: list[Interval] = spans) -> bool:
                inside = r["verdict"] == "blocked" and any(
                    a <= int(r["first"]) and int(r["last"]) <= z for a, z in spans
                )
                return where(r) == kind and not inside

            closed[kind][d] = _closed_spans(rs, keep) if sampled else union(ivs)
            closed_cells[kind][d] = shut_cells[kind]

    if not doc.get("complete"):
        unknown = sum(p["unknown"] for p in ports)
        return {
            "fixed_ports": [],
            "ports": ports,
            "rules": [],
            "notes": [
                f"no rules and no fixed-port candidate: the run is incomplete ({unknown:,} "
                "cells unknown), and rules from the cells that happened to settle would open "
                "scattered ports and miss the unknown ones; run again to completion"
            ],
        }
    notes: list[str] = []
    rules: list[dict[str, Any]] = []
    listener = closed.pop("listener", {})
    if listener and target is not None:
        n = sum(closed_cells["listener"].values())
        nat = (
            f" (the agent registered {agent.get('registered')}, but the probe reached "
            f"{target}: NAT; forward the port to the agent, or reach it without NAT)"
            if agent_addr == target and _address(agent.get("registered")) not in (None, target)
            else ""
        )
        notes.append(
            f"{n:,} cells were rejected by {target} itself with port unreachable: nothing "
            f"listens on destination port(s) {format_ports(sorted(listener))} there{nat}; "
            "no firewall rule opens that"
        )
    if closed:
        if probe_addr is None or agent_addr is None or target is None:
            notes.append("no rules: the probe's or the agent's address is missing or invalid")
        elif probe_addr.version != agent_addr.version:
            notes.append("no rules: the probe and the agent use different address families")
        else:
            fam = probe_addr.version
            for chain in ("forward", "input"):
                to = agent_addr if chain == "forward" else target
                groups: dict[tuple[Interval, ...], list[int]] = defaultdict(list)
                for d, ivs in closed.get(chain, {}).items():
                    groups[tuple(ivs)].append(d)
                for ivs_t, dsts in sorted(groups.items(), key=lambda kv: kv[1][0]):
                    ivs = list(ivs_t)
                    rules.append(
                        {
                            "dst_ports": dsts,
                            "src_ports": ",".join(_items(ivs, "-")),
                            "cells": sum(closed_cells[chain][d] for d in dsts),
                            "verdicts": sorted(set().union(*(verdicts_of[d] for d in dsts))),
                            "sampled": sampled,
                            "chain": chain,
                            "nft": nft_rule(fam, str(probe_addr), str(to), ivs, dsts, chain),
                            "iptables": iptables_rules(
                                fam, str(probe_addr), str(to), ivs, dsts, chain
                            ),
                        }
                    )
            if "forward" in closed:
                cmd = "iptables" if fam == 4 else "ip6tables"
                notes.append(
                    "the rules assume an nftables table 'inet filter' with a 'forward' chain "
                    f"({cmd}: FORWARD) on a router between probe and agent; insert them in "
                    "the chain that holds the rule that blocks (an accept in another table's "
                    "chain does not undo its drop), or better, fix that rule"
                )
            if "input" in closed:
                notes.append(
                    f"{target} itself rejected some cells (its own firewall): their rules go "
                    "in its 'input' chain (INPUT), on that host"
                )
    if limited:
        notes.append(
            f"{limited:,} blocked cells lie where delivery stopped by time (a NAT pool, a "
            "session table or a connection limit that filled: see the warnings), not where a "
            "rule drops them: no rule is given for them"
        )
    if rules and sampled:
        notes.append(
            "the plan sampled source ports: each rule opens the whole span from the first to "
            "the last of a stretch of blocked or rejected samples with no sample of another "
            "verdict between them, the untested ports inside included"
        )
    if translated_any:
        notes.append(
            "the path rewrites source ports (NAT): a firewall behind the translation sees "
            "other source ports than the rules name"
        )
    if unsure:
        notes.append(
            f"destination port(s) {', '.join(map(str, unsure))} were open for every source "
            "port tested, but the run ended before all of them were; run again to confirm"
        )
    unsettled = sum(p["untested"] + p["unknown"] for p in ports)
    if unsettled:
        notes.append(
            f"{unsettled:,} cells were untested or unknown; fixed-port candidates rest on the "
            "source ports actually tested"
        )
    return {"fixed_ports": fixed, "ports": ports, "rules": rules, "notes": notes}
