"""The real CLI inside the real-firewall lab: a probe in the probe's namespace, an agent in
the agent's, ``udpreach run --json`` from the probe's side, every process stopped and the lab
torn down whatever happens."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import udpreach_argv
from labkit import make_lab
from prockit import stop

from udpreach.lab import Lab

CONTROL_PORT = 7000
AGENT_NAME = "lab-agent"


@dataclass
class LabRun:
    lab: Lab
    control: str
    secret: Path
    tmp: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def run(self, *args: str, timeout: float = 400) -> tuple[int, dict[str, Any], str]:
        """``udpreach run --json`` from the probe's namespace: (exit code, document, stderr)."""
        argv = self.lab.ns_argv(
            "probe",
            udpreach_argv(
                "run", "--coordinator", self.control, "--secret-file", str(self.secret),
                "--agent", AGENT_NAME, "--wait", "20", "--json", *args,
            ),
        )  # fmt: skip
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        doc = json.loads(proc.stdout) if proc.stdout.strip() else {}
        return proc.returncode, doc, proc.stderr

    def logs(self) -> str:
        out = []
        for name in ("probe.log", "agent.log"):
            p = self.tmp / name
            if p.exists():
                out.append(f"--- {name}\n" + "\n".join(p.read_text().splitlines()[-30:]))
        return "\n".join(out)


def _start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as fh:
        return subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT)


@contextmanager
def lab_udpreach(
    policy: str,
    tmp: Path,
    *,
    ports: str = "5000",
    ipv6: bool = False,
    probe_args: tuple[str, ...] = (),
) -> Iterator[LabRun]:
    secret = tmp / "secret"
    secret.write_text("lab-secret-0123456789abcdef0123456789\n")
    secret.chmod(0o600)
    with make_lab(policy, ipv6=ipv6) as lab, ExitStack() as stack:
        info = lab.info
        host = f"[{info.probe_addr6}]" if ipv6 else info.probe_addr
        control = f"{host}:{CONTROL_PORT}"
        ready = tmp / "ready.json"
        probe = _start(
            lab.ns_argv(
                "probe",
                udpreach_argv(
                    "probe", "--control", control, "--secret-file", str(secret),
                    "--db", str(tmp / "runs.sqlite3"), "--ready-file", str(ready),
                    "--log-level", "debug", *probe_args,
                ),
            ),
            tmp / "probe.log",
        )  # fmt: skip
        stack.callback(stop, probe)
        deadline = time.monotonic() + 20
        while not (ready.exists() and ready.stat().st_size):
            assert probe.poll() is None, (tmp / "probe.log").read_text()
            assert time.monotonic() < deadline, "probe never listened"
            time.sleep(0.05)
        agent = _start(
            lab.ns_argv(
                "agent",
                udpreach_argv(
                    "agent", "--coordinator", control, "--secret-file", str(secret),
                    "--port", ports, "--name", AGENT_NAME, "--log-level", "debug",
                ),
            ),
            tmp / "agent.log",
        )  # fmt: skip
        stack.callback(stop, agent)
        yield LabRun(lab, control, secret, tmp, [probe, agent])
