import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent

# How `make test` spreads the suite over its workers (pytest-xdist, --dist loadfile, as
# ``pytest_xdist_make_scheduler`` below refines it). A file stays on one worker (its module
# fixtures are built once, its tests never race each other for an address), except the
# files below whose tests share nothing: the real-firewall lab's (each test builds
# namespaces of its own, and mostly waits on ICMP refills and delays) and the simulated
# path's (no sockets at all), which go test by test to whichever worker is free. Units start
# in collection order (--no-loadscope-reorder): the files that take longest first, so that
# the short ones fill in around them instead of one long file starting last.
LONG_FILES = (
    "test_trust.py",
    "test_pty.py",
    "test_faults.py",
    "test_trust_engine.py",
    "test_lab_paths.py",
    "test_lab_verdicts.py",
    "test_lab_change.py",
    "test_sweep.py",
)
SPLIT_FILES = frozenset(
    {"test_lab_paths.py", "test_lab_verdicts.py", "test_lab_change.py", "test_sweep.py"}
)

# What the second pass on the machine's own Python (`make test-system`, -m "not once") leaves
# out: the verdicts over the simulated path and through the real firewall and the core's
# property tests (the same numpy and pure-Python logic on any 3.11), and the long attacks
# on the engine and the control plane (test_trust_engine.py here; test_trust.py marks its
# two 20 s floods itself). They are the long half of the suite's time. What depends on the
# Python that runs it (the CLI and its error paths, typer and rich on a pty, trio's
# cancellation and exception groups, sockets, the control plane, the probe and the agent
# end to end over loopback, the demo) runs on both.
ONCE_FILES = frozenset(
    {
        "test_lab_paths.py",
        "test_lab_verdicts.py",
        "test_lab_change.py",
        "test_sweep.py",
        "test_trust_engine.py",
        "test_ledger.py",
    }
)


def pytest_itemcollected(item: pytest.Item) -> None:
    if item.path.name in ONCE_FILES:
        item.add_marker(pytest.mark.once)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """With --dist loadfile: a file is one unit of work, but for SPLIT_FILES, whose every
    test is a unit. (xdist's loadgroup cannot do this under pytest 9: it names its groups
    by rewriting ``item._nodeid``, which pytest 9 no longer reads.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Units(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return nodeid if Path(file).name in SPLIT_FILES else file

    return Units(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    p = tmp_path / "secret"
    p.write_text("0123456789abcdef0123456789abcdef\n")
    p.chmod(0o600)
    return p


def udpreach_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "udpreach", *args]


def run_cli(*args: str, timeout: float = 60, env: dict[str, str] | None = None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run(
        udpreach_argv(*args), capture_output=True, text=True, timeout=timeout, env=e, check=False
    )
