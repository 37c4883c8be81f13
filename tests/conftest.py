import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


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
