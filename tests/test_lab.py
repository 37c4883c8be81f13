"""The real-firewall lab: namespaces come and go cleanly, and the policy is what the
datagrams meet. Tests marked ``root`` build real labs and skip, saying why, elsewhere."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import typer
from typer.testing import CliRunner

from udpreach import lab as labmod
from udpreach.cli.lab import lab_app
from udpreach.core.errors import ConfigError
from udpreach.lab import Lab, _command, bundled_policy, list_namespaces, render_policy

try:
    from labkit import (
        DEMO_BLOCKED,
        DEMO_NAT_PORTS,
        DEMO_NATED,
        DEMO_REJECTED,
        demo_expected,
        demo_translated,
        exchange,
        expand_verdicts,
        make_lab,
        mismatches,
        skip_without_lab,
    )
except ImportError:  # tests/ is a package
    from tests.labkit import (
        DEMO_BLOCKED,
        DEMO_NAT_PORTS,
        DEMO_NATED,
        DEMO_REJECTED,
        demo_expected,
        demo_translated,
        exchange,
        expand_verdicts,
        make_lab,
        mismatches,
        skip_without_lab,
    )

DROP_41000 = "udp sport 41000 drop  # one port, silently"
REJECT_31000 = "udp sport 31000 reject with icmpx type admin-prohibited"


def _ours(lab: Lab) -> list[str]:
    return [ns for ns in list_namespaces() if ns in lab.info.namespaces]


def _state(name: str):
    # The real state directory on purpose: stale-lab detection is only right when every
    # lab on the host records itself in the same place.
    return labmod.STATE_DIR / f"{name}.json"


# --- without root ------------------------------------------------------------------------


def test_rule_list_goes_into_an_inet_forward_chain():
    script, offset = render_policy("# keep 40000+ out\nudp sport 40000-49999 drop\n")
    lines = script.splitlines()
    assert lines[0] == "flush ruleset"
    assert "table inet udpreach {" in lines
    assert "type filter hook forward priority filter; policy accept;" in lines[offset - 1]
    assert lines[offset + 1].strip() == "udp sport 40000-49999 drop"


def test_complete_script_is_loaded_as_is_after_a_flush():
    text = bundled_policy("demo")
    script, offset = render_policy(text)
    assert offset == 1
    assert script == "flush ruleset\n" + text.rstrip("\n") + "\n"


def test_cli_without_root_is_a_one_line_error_exit_2(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    app = typer.Typer()
    app.add_typer(lab_app)
    app.command()(lambda: None)  # a second command, so "lab" stays a subcommand
    result = CliRunner().invoke(app, ["lab", "up"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "udpreach: the lab needs root (network namespaces, nftables)"
    assert result.stdout == ""


def test_expand_verdicts_and_mismatches_as_ranges():
    doc = {
        "ranges": [
            {"dst_port": 5000, "first": 1024, "last": 29999, "verdict": "open"},
            {"dst_port": 5000, "first": 30000, "last": 30999, "verdict": "open"},
            {"dst_port": 5000, "first": 31000, "last": 65535, "verdict": "blocked"},
        ]
    }
    cells = expand_verdicts(doc)
    assert len(cells) == 65535 - 1024 + 1
    assert mismatches(cells, demo_expected) == [
        (5000, 30000, 30999, "open", "rejected"),
        (5000, 31000, 39999, "blocked", "open"),
        (5000, 50000, 65535, "blocked", "open"),
    ]


# --- with root: real namespaces and nftables -----------------------------------------------


@pytest.mark.root
def test_lab_leaves_no_namespace_behind_even_when_the_body_raises():
    seen: list[Lab] = []

    def use_then_fail() -> None:
        with make_lab() as lab:
            seen.append(lab)
            assert sorted(_ours(lab)) == sorted(lab.info.namespaces)
            assert _state(lab.info.name).exists()
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        use_then_fail()
    [lab] = seen
    assert _ours(lab) == []
    assert not _state(lab.info.name).exists()
    lab.destroy()  # idempotent


@pytest.mark.root
def test_allow_all_passes_and_a_drop_rule_drops():
    with make_lab(bundled_policy("allow-all")) as lab:
        before = exchange(lab, [41000, 41001])
        assert all(o.received and o.icmp is None for o in before.values())
        assert before[41000].observed == (lab.info.probe_addr, 41000)

        lab.load_policy(DROP_41000)
        after = exchange(lab, [41000, 41001], wait=0.3)
        assert after[41000].verdict == "blocked"
        assert after[41001].verdict == "open"


@pytest.mark.root
def test_reject_reaches_the_sender_as_icmp_admin_prohibited():
    with make_lab(REJECT_31000) as lab:
        out = exchange(lab, [31000, 31001])
    assert out[31001].verdict == "open"
    assert out[31000].verdict == "rejected"
    assert out[31000].icmp == {
        "errno": errno.EHOSTUNREACH,
        "type": 3,
        "code": 13,
        "from": lab.info.router_probe_side,
    }


@pytest.mark.root
def test_ipv6_lab_forwards_and_rejects_with_icmpv6():
    with make_lab(REJECT_31000, ipv6=True) as lab:
        out = exchange(lab, [31000, 31001], ipv6=True)
    assert out[31001].observed == (lab.info.probe_addr6, 31001)
    assert out[31000].icmp is not None
    assert (out[31000].icmp["type"], out[31000].icmp["code"]) == (1, 1)
    assert out[31000].icmp["from"] == lab.info.router_probe_side6


@pytest.mark.root
def test_invalid_policy_is_a_config_error_and_leaves_nothing():
    skip_without_lab()
    name = f"ur-t{os.getpid() % 10000:04d}bad"
    with pytest.raises(ConfigError, match=r"line 2: Error: syntax error"):
        Lab.create("# fine\nudp sport 40000 frobnicate\n", name=name)
    assert [ns for ns in list_namespaces() if ns.startswith(name + "-")] == []
    assert not _state(name).exists()


@pytest.mark.root
def test_rejected_reload_keeps_the_previous_policy():
    with make_lab(DROP_41000) as lab:
        with pytest.raises(ConfigError, match="policy rejected by nft"):
            lab.load_policy("udp sport 1-2-3 drop")
        assert "udp sport 41000 drop" in lab.ruleset()
        lab.load_policy("")
        assert "41000" not in lab.ruleset()


@pytest.mark.root
def test_demo_policy_matches_its_ground_truth():
    probes = [
        1024,
        DEMO_NATED[0],
        DEMO_NATED[-1],
        DEMO_REJECTED[0],
        DEMO_REJECTED[-1],
        DEMO_BLOCKED[0],
        DEMO_BLOCKED[-1],
        DEMO_BLOCKED[-1] + 1,
        65535,
    ]
    with make_lab(bundled_policy("demo")) as lab:
        out = exchange(lab, probes)
    actual = {(5000, sport): o.verdict for sport, o in out.items()}
    assert mismatches(actual, demo_expected) == []
    for sport, o in out.items():
        if not o.received:
            continue
        assert o.observed is not None
        translated = o.observed[1] != sport
        assert translated == demo_translated(sport), (sport, o.observed)
        if translated:
            assert o.observed == (lab.info.router_agent_side, o.observed[1])
            assert o.observed[1] in DEMO_NAT_PORTS


def test_lab_exec_finds_udpreach_off_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """``sudo`` resets PATH and a venv may not be activated: ``lab exec ... -- udpreach``
    still runs this udpreach; other programs are PATH's, or a clear error."""
    mine = shutil.which("udpreach", path=os.path.dirname(sys.executable))
    if mine is None:
        pytest.skip("no udpreach script next to this Python")
    monkeypatch.setenv("PATH", "/nonexistent-ur")
    assert _command("udpreach") == mine
    with pytest.raises(ConfigError, match="no program 'sh' on PATH"):
        _command("sh")
    assert _command("/bin/sh") == "/bin/sh"
    with pytest.raises(ConfigError, match="/nonexistent-ur/x is not a program"):
        _command("/nonexistent-ur/x")


@pytest.mark.root
def test_cli_up_exec_down():
    skip_without_lab()
    app = typer.Typer()
    app.add_typer(lab_app)
    app.command()(lambda: None)
    runner = CliRunner()
    name = f"ur-t{os.getpid() % 10000:04d}cli"
    name2 = f"ur-t{os.getpid() % 10000:04d}cli2"
    try:
        up = runner.invoke(app, ["lab", "up", "--policy", "demo", "--name", name, "--json"])
        assert up.exit_code == 0, up.stderr
        info = json.loads(up.stdout)
        assert info["name"] == name
        assert {info["agent_ns"], info["router_ns"], info["probe_ns"]} <= set(list_namespaces())

        again = runner.invoke(app, ["lab", "up", "--name", name])
        assert again.exit_code == 2
        assert "already exists" in again.stderr

        # exec runs inside the namespace and passes the command's exit status through.
        ran = runner.invoke(
            app, ["lab", "exec", "agent", "--name", name, "--", "sh", "-c", "exit 7"]
        )
        assert ran.exit_code == 7
        # A program that is nowhere: one line naming it, exit 2 (not ip's "exec of ...
        # failed"); ``udpreach`` is found next to this Python even off PATH (sudo, a venv).
        nowhere = runner.invoke(
            app, ["lab", "exec", "agent", "--name", name, "--", "no-such-program-ur"]
        )
        assert nowhere.exit_code == 2
        assert "no program 'no-such-program-ur' on PATH" in nowhere.stderr
        listed = subprocess.run(
            ["ip", "netns", "exec", info["router_ns"], "nft", "list", "ruleset"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        assert "sport 30000-30999 reject" in listed.stdout

        # SIGTERM for `lab exec` (kill, a CI job's timeout) is handed on to the command,
        # whose status it then reports; it used to end alone and orphan the command.
        ready = f"/tmp/{name}-trap"
        script = f"trap 'exit 42' TERM; : > {ready}; sleep 30 & wait"
        proc = subprocess.Popen(
            [sys.executable, "-m", "udpreach", "lab", "exec", "agent", "--name", name, "--",
             "sh", "-c", script],
        )  # fmt: skip
        try:
            for _ in range(200):
                if os.path.exists(ready):
                    break
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 42
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(ready)

        # With two labs up (or more: other labs on the host only add to them), `lab down`
        # without a name removes none: one of them may be someone else's. It removed all.
        second = runner.invoke(app, ["lab", "up", "--name", name2])
        assert second.exit_code == 0, second.stderr
        refused = runner.invoke(app, ["lab", "down"])
        assert refused.exit_code == 2
        assert "labs are up (" in refused.stderr
        assert name in refused.stderr
        assert name2 in refused.stderr
        assert "--all" in refused.stderr
        assert {f"{name}-router", f"{name2}-router"} <= set(list_namespaces())
    finally:
        down = runner.invoke(app, ["lab", "down", "--name", name])
        down2 = runner.invoke(app, ["lab", "down", "--name", name2])
    assert down.exit_code == 0
    assert down.stdout.strip() == f"removed {name}"
    assert down2.exit_code == 0
    assert [ns for ns in list_namespaces() if ns.startswith((name + "-", name2 + "-"))] == []
    # A mistyped (or already removed) name is an error, as for `lab exec`: exit 0 let a
    # user believe the lab was gone while it stayed up.
    again = runner.invoke(app, ["lab", "down", "--name", name])
    assert again.exit_code == 2
    assert f"no lab named {name}" in again.stderr


@pytest.mark.root
def test_stale_lab_of_a_dead_process_is_removed_live_one_kept():
    with make_lab() as live:
        # A lab whose owner died: record it under a pid that cannot be alive.
        stale = Lab.create(name=f"t{os.getpid() % 10000:04d}stale")
        record = json.loads(_state(stale.info.name).read_text())
        record["pid"] = 2**22 + 1  # above the kernel's pid_max limit
        _state(stale.info.name).write_text(json.dumps(record))
        try:
            assert live.info.name not in labmod.stale_labs()
            # Scoped by prefix so that the test touches no other lab on the host.
            mine = stale.info.name
            assert labmod.stale_labs(prefix=mine) == [mine]
            assert labmod.remove_stale_labs(prefix=mine) == [mine]
            assert _ours(stale) == []
            assert sorted(_ours(live)) == sorted(live.info.namespaces)
        finally:
            stale.destroy()
