"""The matrix must equal an nftables policy, port for port.

Each test builds the three-namespace lab with a policy, runs the real ``udpreach probe`` and
``udpreach agent`` processes in it, sweeps every high source port with the real CLI, expands
the JSON ranges into per-cell verdicts and compares them with the policy's ground truth:
zero mismatches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from labcli import lab_udpreach
from labkit import expand_verdicts, mismatches

pytestmark = [pytest.mark.root, pytest.mark.slow]

ROUTER_PROBE_SIDE = "198.18.2.1"


def _ok(code: int, doc: dict[str, Any], err: str, logs: str) -> None:
    assert code == 0, f"exit {code}: {err}\n{logs}"
    assert doc["complete"] is True
    assert doc["summary"]["unknown"] == 0


def _expect(doc: dict[str, Any], truth: Any) -> None:
    got = expand_verdicts(doc)
    assert len(got) == doc["summary"]["cells"]
    bad = mismatches(got, truth)
    facts = {k: doc.get(k) for k in ("duration", "warnings", "icmp_senders", "probe_stats")}
    assert bad == [], f"{len(bad)} mismatching ranges, first: {bad[:5]}; {facts}"


def test_silent_drop_is_blocked_and_nothing_else(tmp_path: Path) -> None:
    policy = 'iifname "probe0" udp sport 40000-49999 drop\n'
    with lab_udpreach(policy, tmp_path) as lr:
        code, doc, err = lr.run()
        _ok(code, doc, err, lr.logs())
    _expect(doc, lambda d, s: "blocked" if 40000 <= s <= 49999 else "open")
    blocked = [r for r in doc["ranges"] if r["verdict"] == "blocked"]
    assert [(r["first"], r["last"]) for r in blocked] == [(40000, 49999)]
    assert all(r["received"] == 0 and r["sent"] >= 2 * 10000 for r in blocked)


def test_reject_is_rejected_with_the_icmp_details(tmp_path: Path) -> None:
    policy = (
        'iifname "probe0" udp sport 30000-30999 reject with icmpx type admin-prohibited\n'
        'iifname "probe0" udp sport 31000-31999 reject with icmpx type port-unreachable\n'
    )
    with lab_udpreach(policy, tmp_path) as lr:
        code, doc, err = lr.run()
        _ok(code, doc, err, lr.logs())
    _expect(doc, lambda d, s: "rejected" if 30000 <= s <= 31999 else "open")
    rejected = {
        (r["first"], r["last"]): r["icmp"] for r in doc["ranges"] if r["verdict"] == "rejected"
    }
    assert rejected == {
        (30000, 30999): {"type": 3, "code": 13, "from": ROUTER_PROBE_SIDE, "verified": True},
        (31000, 31999): {"type": 3, "code": 3, "from": ROUTER_PROBE_SIDE, "verified": True},
    }


def test_loss_is_not_a_block(tmp_path: Path) -> None:
    policy = 'iifname "probe0" meta l4proto udp numgen random mod 100 < 20 drop\n'
    with lab_udpreach(policy, tmp_path) as lr:
        code, doc, err = lr.run()
        _ok(code, doc, err, lr.logs())
    _expect(doc, lambda d, s: "open")
    loss = doc["loss"]
    assert 0.15 <= loss["estimate"] <= 0.25, loss
    assert loss["attempts"] >= 3


def test_nat_is_visible_as_translated(tmp_path: Path) -> None:
    policy = """
table inet udpreach {
    chain raw {
        type filter hook prerouting priority raw; policy accept;
        iifname "probe0" udp sport != { 20000-21999, 24000-25999 } notrack
    }
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        iifname "probe0" oifname "agent0" udp sport 20000-21999 snat ip to 198.18.1.1:50000-53999
        iifname "probe0" oifname "agent0" udp sport 24000-25999 masquerade random
    }
}
"""
    with lab_udpreach(policy, tmp_path) as lr:
        code, doc, err = lr.run()
        _ok(code, doc, err, lr.logs())
    _expect(doc, lambda d, s: "open")
    xlat = {}
    for r in doc["ranges"]:
        for s in range(r["first"], r["last"] + 1):
            xlat[s] = r
    for s in range(1024, 65536):
        r = xlat[s]
        assert r["translated"] is (20000 <= s <= 21999 or 24000 <= s <= 25999), (s, r)
    translated = {(r["first"], r["last"]): r["observed"] for r in doc["ranges"] if r["translated"]}
    assert set(translated) == {(20000, 21999), (24000, 25999)}
    snat = translated[(20000, 21999)]
    assert snat["addresses"] == ["198.18.1.1"]
    assert 50000 <= snat["first_port"] <= snat["last_port"] <= 53999
    assert translated[(24000, 25999)]["addresses"] == ["198.18.1.1"]
    assert "198.18.1.1" in doc["observed_sources"]


def test_agent_behind_nat_is_warned_about(tmp_path: Path) -> None:
    # The agent's own connection to the coordinator is masqueraded: it registers 198.18.1.2
    # but the coordinator sees 198.18.2.1, exactly the mail-client-behind-NAT case.
    policy = """
table inet udpreach {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        iifname "agent0" oifname "probe0" meta l4proto tcp masquerade
    }
}
"""
    with lab_udpreach(policy, tmp_path) as lr:
        code, doc, err = lr.run("--src-ports", "1024-2047")
    assert doc["agent"]["registered"] == "198.18.1.2"
    assert doc["agent"]["observed"] == ROUTER_PROBE_SIDE
    assert doc["probe"]["target"] == ROUTER_PROBE_SIDE  # never the unverified address
    assert any("NAT" in w for w in doc["warnings"])
    # Nothing listens on the NAT box: every datagram is refused there, as push would be.
    assert doc["summary"]["open"] == 0, (code, err)
    # The operator vouches for the agent's network: the probe may aim at what it registered.
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    with lab_udpreach(policy, allowed, probe_args=("--allow-target", "198.18.1.0/24")) as lr:
        code, doc, err = lr.run("--src-ports", "1024-2047")
        _ok(code, doc, err, lr.logs())
    assert doc["probe"]["target"] == "198.18.1.2"
    assert doc["summary"]["open"] == 1024


def test_stateful_default_deny_blocks_everything(tmp_path: Path) -> None:
    policy = """
table inet udpreach {
    chain forward {
        type filter hook forward priority filter; policy accept;
        ct state established,related accept
        iifname "probe0" meta l4proto udp drop
    }
}
"""
    with lab_udpreach(policy, tmp_path) as lr:
        code, doc, err = lr.run()
        _ok(code, doc, err, lr.logs())
    _expect(doc, lambda d, s: "blocked")


def test_three_destination_ports_each_right(tmp_path: Path) -> None:
    policy = (
        'iifname "probe0" udp dport 5001 udp sport 1024-30000 drop\n'
        'iifname "probe0" udp dport 5002 udp sport 50000-65535 '
        "reject with icmpx type admin-prohibited\n"
    )

    def truth(d: int, s: int) -> str:
        if d == 5001 and s <= 30000:
            return "blocked"
        if d == 5002 and s >= 50000:
            return "rejected"
        return "open"

    with lab_udpreach(policy, tmp_path, ports="5000-5002") as lr:
        code, doc, err = lr.run()
        _ok(code, doc, err, lr.logs())
    assert doc["summary"]["cells"] == 3 * 64512
    _expect(doc, truth)


def test_rate_limit_is_survived(tmp_path: Path) -> None:
    """A policer on the whole path: every cell open, the pacer backed off. 20,000 source
    ports (at least 10 s at 2,000/s, where a full sweep needs 32 s: the bench's policer
    rows time full sweeps)."""
    policy = 'iifname "probe0" udp dport 5000 limit rate over 2000/second drop\n'
    with lab_udpreach(policy, tmp_path) as lr:
        code, doc, err = lr.run("--src-ports", "1024-21023", timeout=300)
        _ok(code, doc, err, lr.logs())
    assert doc["summary"]["cells"] == 20000
    _expect(doc, lambda d, s: "open")
    loss = doc["loss"]
    assert loss["rate_backoffs"] >= 1
    assert loss["rate_found"] < 20000


def test_ipv6_drop(tmp_path: Path) -> None:
    policy = 'iifname "probe0" meta nfproto ipv6 udp sport 40000-49999 drop\n'
    with lab_udpreach(policy, tmp_path, ipv6=True) as lr:
        code, doc, err = lr.run()
        _ok(code, doc, err, lr.logs())
    assert ":" in doc["agent"]["registered"]
    _expect(doc, lambda d, s: "blocked" if 40000 <= s <= 49999 else "open")
