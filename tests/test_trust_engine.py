"""Issue 15's rows that the run engine answers, with real processes and real sockets.

- row 3: off-path forged ICMP errors (no secret) quoting the right ports: never a verified
  reject, and lossy open cells stay open;
- row 5: an authenticated agent with nothing listening that reports every cell received:
  its receipts for datagrams never sent are refused, and the run is not complete;
- row 9: ``--size 65507``: the probe's byte ceilings (per second and per run) hold.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prockit import loopback_services, wait_log
from test_trust import attack, attack_result, figure, run

from udpreach.lab import lab_available

ROOT_LAB = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("nft") is None,
    reason="needs root and nftables for the real-firewall lab",
)


def test_an_agent_that_reports_cells_never_sent_is_refused_and_flagged(
    tmp_path: Path, secret_file: Path
) -> None:
    """Row 5: a secret holder with nothing listening reports every cell received (today:
    64,512 open, exit 0, although the probe had sent 128)."""
    with loopback_services(tmp_path, secret_file, agent=False) as svc:
        cfg = {
            "host": svc.host, "port": svc.port, "secret": secret_file.read_text().strip(),
            "name": svc.agent_name, "agent_port": 9, "seconds": 60,
            "src_first": 1024, "src_last": 65535,
        }  # fmt: skip
        with attack("liar", cfg) as proc:
            wait_log(svc.probe_log, rf"agent {svc.agent_name} registered", timeout=20)
            got = run(svc, "--json", "--icmp-budget", "0", timeout=120)
            stats = attack_result(proc, 70)
    doc = json.loads(got.stdout)
    figure("liar", f"exit {got.returncode}, summary {doc['summary']}, refused "
           f"{doc['probe_stats']['refused_receipts']} of {stats['reported']} reported")  # fmt: skip
    assert got.returncode == 3, got.stderr
    assert doc["complete"] is False
    assert doc["probe_stats"]["refused_receipts"] > 0
    assert any("never sent" in w for w in doc["warnings"])
    # Nothing listens on its port: its host answers every datagram "port unreachable", so a
    # receipt it claims for a datagram that was sent is contradicted, and said to be.
    assert any("cannot be trusted" in w and "port-unreachable" in w for w in doc["warnings"])
    # Whatever it claimed, a cell counts only for a datagram the probe really sent.
    assert doc["summary"]["open"] <= doc["probe_stats"]["sent"]


def test_the_probes_byte_ceilings_hold_for_the_largest_datagrams(
    tmp_path: Path, secret_file: Path
) -> None:
    """Row 9: ``--size 65507`` (today: 131 MB sent in 0.32 s from a 156-byte request;
    --max-rate counted datagrams, not bytes)."""
    rate = 8_000_000  # bytes a second on the wire
    with loopback_services(
        tmp_path, secret_file, probe_args=("--max-bytes-rate", str(rate), "--max-bytes", "3000000")
    ) as svc:
        wait_log(svc.agent_log, rf"registered as '{svc.agent_name}'", timeout=20)
        too_big = run(svc, "--src-ports", "1024-1123", "--size", "65507", "--json")
        ok = run(svc, "--src-ports", "1024-1063", "--size", "65507", "--json", timeout=120)
    assert too_big.returncode == 2, too_big.stderr  # 100 x 65,535 bytes: over --max-bytes
    assert "--max-bytes" in too_big.stderr
    doc = json.loads(ok.stdout)
    sent_bytes = doc["probe_stats"]["bytes"]
    figure("bytes", f"{sent_bytes:,} bytes in {doc['duration']:.2f}s with --max-bytes-rate "
           f"{rate:,}: {sent_bytes / doc['duration']:,.0f} B/s")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert doc["summary"]["open"] == 40
    assert sent_bytes <= 3_000_000
    # Sending 40 x 65,535 bytes at 8 MB/s takes 0.33 s at least (the rest is the run's).
    assert doc["duration"] >= 0.9 * 40 * 65535 / rate


FORGER = Path(__file__).with_name("icmp_forger.py")


@ROOT_LAB
def test_off_path_forged_icmp_never_makes_a_verified_reject(tmp_path: Path) -> None:
    """Row 3: forged header-only "admin-prohibited" errors for a dropped range and a lossy
    open range (today: 1,755 of 10,000 dropped cells and 42 of 1,000 lossy open cells
    reported rejected, exit 0)."""
    if lab_available() is not None:
        pytest.skip(f"no lab here: {lab_available()}")
    from labcli import lab_udpreach

    policy = (
        'iifname "probe0" udp sport 40000-44999 drop\n'
        'iifname "probe0" udp sport 20000-20999 numgen random mod 100 < 30 drop\n'
    )
    forger = FORGER
    with lab_udpreach(policy, tmp_path) as lr:
        info = lr.lab.info
        # From the router (on the path's address plan, 198.18.0.0/15): errors to the probe
        # for every cell of both ranges, many times over, while the run goes.
        argv = lr.lab.ns_argv(
            "router",
            [sys.executable, str(forger), info.probe_addr, info.agent_addr, "20000", "20999",
             "25"],
        )  # fmt: skip
        forged = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        forged2 = subprocess.Popen(
            lr.lab.ns_argv(
                "router",
                [sys.executable, str(forger), info.probe_addr, info.agent_addr, "40000",
                 "44999", "25"],
            ),
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            time.sleep(0.5)
            code, doc, err = lr.run("--src-ports", "15000-49999", timeout=200)
        finally:
            for p in (forged, forged2):
                p.kill()
                p.communicate(timeout=10)
    assert code in (0, 1), err
    cells = {(r["dst_port"], s): r for r in doc["ranges"] for s in range(r["first"], r["last"] + 1)}
    lossy_open = [cells[(5000, s)]["verdict"] for s in range(20000, 21000)]
    rejected = [r for r in doc["ranges"] if r["verdict"] == "rejected"]
    figure("forged-icmp", f"lossy open cells open: {lossy_open.count('open')}/1000; rejected "
           f"ranges {len(rejected)}, all unverified: "
           f"{all(not r['icmp']['verified'] for r in rejected)}; "
           f"unverified errors {doc['probe_stats']['icmp_unverified']}")  # fmt: skip
    assert lossy_open.count("open") == 1000  # weak evidence never stops a retry
    assert all(r["icmp"]["verified"] is False for r in rejected)  # and is said to be weak
    dropped = [cells[(5000, s)]["verdict"] for s in range(40000, 45000)]
    assert set(dropped) <= {"blocked", "rejected"}
    assert doc["probe_stats"]["icmp_unverified"] > 0
