import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# The files that take longest (mostly waiting: ICMP rate limits, 20 s attacks, timeouts), the
# longest first. `make test` runs files whole on 4 workers (pytest-xdist, --dist loadfile),
# which hand them out in collection order: started last, two of these on one worker made the
# whole suite wait for it (212 s against 178-187 s for the other three workers). Starting them
# first leaves the short files to fill in around them. Only the order changes.
LONG_FILES = (
    "test_trust.py",
    "test_lab_paths.py",
    "test_lab_verdicts.py",
    "test_pty.py",
    "test_sweep.py",
    "test_faults.py",
    "test_trust_engine.py",
)


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
