"""The real-firewall lab: agent, router and probe in three network namespaces.

Theory of operation
-------------------
A lab is three network namespaces joined by two veth pairs, the router in the middle::

    <name>-agent             <name>-router (the firewall)              <name>-probe
    eth0 198.18.1.2/24 ---- agent0 198.18.1.1    probe0 198.18.2.1 ---- eth0 198.18.2.2/24
    2001:2:0:1::2/64        2001:2:0:1::1        2001:2:0:2::1          2001:2:0:2::2/64

The veth pairs are created inside the router namespace with their peers moved straight into
the agent and probe namespaces, so nothing is ever added to the host's own namespace and
deleting the three namespaces removes every trace. Addresses come from the benchmarking
ranges 198.18.0.0/15 and 2001:2::/48 (IPv6 only with ``ipv6=True``); since namespaces isolate
them, every lab uses the same addresses and only the names differ (``ur-<6 hex>``).

The router forwards and holds the policy, an nftables script loaded with ``flush ruleset``
in front of it in one ``nft -f`` transaction: reloading is atomic, and a policy nft rejects
leaves the previous one in place. The router keeps the kernel's ICMP rate limits (one
error a second per destination after a burst of six, as every Linux router has them): a
``rejected`` verdict there rests on a few verified errors and paced tests, as on a real path.

Every lab is recorded in a JSON state file under ``STATE_DIR`` *before* its first namespace
exists: the owning process id for a transient lab (`Lab.create`), or "persistent" for one
made by ``udpreach lab up``. Namespaces named like a lab's whose state file is missing, or
whose owner has died, are stale; `remove_stale_labs` clears them and never touches a live lab.

Everything here is synchronous and shells out to ``ip`` and ``nft``; callers that need
trio run ``Lab.ns_argv(...)`` with ``trio.run_process``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Literal, get_args

from udpreach.core import schema
from udpreach.core.errors import ConfigError, UdpreachError

__all__ = [
    "STATE_DIR",
    "Lab",
    "LabError",
    "LabInfo",
    "LabRecord",
    "Role",
    "bundled_policies",
    "bundled_policy",
    "lab_available",
    "lab_down",
    "lab_exec",
    "lab_up",
    "list_labs",
    "list_namespaces",
    "remove_stale_labs",
    "render_policy",
    "require_root",
    "stale_labs",
]

Role = Literal["agent", "probe", "router"]
ROLES: tuple[Role, ...] = get_args(Role)

#: Where each lab's state file lives; read at call time, so tests may point it elsewhere.
STATE_DIR = Path("/run/udpreach/labs")

NAME_PREFIX = "ur-"
ROUTER_AGENT_IF = "agent0"
ROUTER_PROBE_IF = "probe0"
HOST_IF = "eth0"

AGENT_ADDR, ROUTER_AGENT_SIDE = "198.18.1.2", "198.18.1.1"
PROBE_ADDR, ROUTER_PROBE_SIDE = "198.18.2.2", "198.18.2.1"
AGENT_ADDR6, ROUTER_AGENT_SIDE6 = "2001:2:0:1::2", "2001:2:0:1::1"
PROBE_ADDR6, ROUTER_PROBE_SIDE6 = "2001:2:0:2::2", "2001:2:0:2::1"
PREFIX4, PREFIX6 = 24, 64

_STATE_SCHEMA = schema.LAB_STATE
_NAME_RE = re.compile(r"^ur-[a-z0-9](?:[a-z0-9-]{0,22}[a-z0-9])?$")
_NS_RE = re.compile(r"^(ur-[a-z0-9-]+)-(agent|router|probe)$")
_NFT_ERROR_RE = re.compile(r"^[^:\n]*:(\d+):\d+(?:-\d+)?: (Error: .*)$")
_SCRIPT_WORDS = frozenset(
    {"table", "add", "create", "insert", "flush", "delete", "destroy", "define", "include"}
)
_CMD_TIMEOUT = 30.0

# (key, value, required). Forwarding is the point of the router. Everything else stays as
# the kernel has it, ICMP error rate limits included: every real router keeps them, and a
# verdict that holds only without them is wrong.
_ROUTER_SYSCTLS: tuple[tuple[str, str, bool], ...] = (("net.ipv4.ip_forward", "1", True),)
_ROUTER_SYSCTLS6: tuple[tuple[str, str, bool], ...] = (("net.ipv6.conf.all.forwarding", "1", True),)
# Socket buffer ceilings are read-only inside a namespace on most kernels; try anyway.
_HOST_SYSCTLS: tuple[tuple[str, str, bool], ...] = (
    ("net.core.rmem_max", "16777216", False),
    ("net.core.wmem_max", "16777216", False),
)
# No duplicate address detection: addresses are usable at once, no settling delay.
_NODAD_SYSCTLS: tuple[tuple[str, str, bool], ...] = (
    ("net.ipv6.conf.all.accept_dad", "0", False),
    ("net.ipv6.conf.default.accept_dad", "0", False),
)


class LabError(UdpreachError):
    """The lab could not be built or torn down (a failing ``ip`` or ``nft``): exit 3."""


@dataclass(frozen=True)
class LabInfo:
    """Names and addresses of one lab, and what was tuned in it."""

    name: str
    agent_ns: str
    router_ns: str
    probe_ns: str
    agent_addr: str
    probe_addr: str
    router_agent_side: str
    router_probe_side: str
    ipv6: bool
    agent_addr6: str | None = None
    probe_addr6: str | None = None
    router_agent_side6: str | None = None
    router_probe_side6: str | None = None
    router_agent_if: str = ROUTER_AGENT_IF
    router_probe_if: str = ROUTER_PROBE_IF
    #: sysctls applied, as "role: key=value".
    tuned: tuple[str, ...] = ()
    #: best-effort sysctls the kernel refused or lacks, same form.
    untuned: tuple[str, ...] = ()

    def ns(self, role: Role) -> str:
        """The namespace name for ``role``."""
        if role == "agent":
            return self.agent_ns
        if role == "router":
            return self.router_ns
        if role == "probe":
            return self.probe_ns
        raise ConfigError(f"unknown lab role {role!r} (want agent, router or probe)")

    @property
    def namespaces(self) -> tuple[str, str, str]:
        return (self.agent_ns, self.router_ns, self.probe_ns)

    def to_json(self) -> dict[str, object]:
        doc = asdict(self)
        doc["tuned"] = list(self.tuned)
        doc["untuned"] = list(self.untuned)
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, object]) -> LabInfo:
        """Rebuild from `to_json` output. Raises ConfigError on a malformed document."""

        def text(key: str) -> str:
            value = doc.get(key)
            if not isinstance(value, str):
                raise ConfigError(f"lab state: {key!r} missing or not a string")
            return value

        def opt(key: str) -> str | None:
            value = doc.get(key)
            return value if isinstance(value, str) else None

        def texts(key: str) -> tuple[str, ...]:
            value = doc.get(key, [])
            if not isinstance(value, list):
                raise ConfigError(f"lab state: {key!r} is not a list")
            return tuple(str(v) for v in value)

        return cls(
            name=text("name"),
            agent_ns=text("agent_ns"),
            router_ns=text("router_ns"),
            probe_ns=text("probe_ns"),
            agent_addr=text("agent_addr"),
            probe_addr=text("probe_addr"),
            router_agent_side=text("router_agent_side"),
            router_probe_side=text("router_probe_side"),
            ipv6=doc.get("ipv6") is True,
            agent_addr6=opt("agent_addr6"),
            probe_addr6=opt("probe_addr6"),
            router_agent_side6=opt("router_agent_side6"),
            router_probe_side6=opt("router_probe_side6"),
            router_agent_if=opt("router_agent_if") or ROUTER_AGENT_IF,
            router_probe_if=opt("router_probe_if") or ROUTER_PROBE_IF,
            tuned=texts("tuned"),
            untuned=texts("untuned"),
        )


@dataclass(frozen=True)
class LabRecord:
    """A lab's state file: its info, and who keeps it alive."""

    info: LabInfo
    persistent: bool
    pid: int | None
    created: float


# ---------------------------------------------------------------------------------------
# Preconditions


def lab_available() -> str | None:
    """None when the lab can be built here, else the reason (for skip messages)."""
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces, nftables)"
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    if missing:
        return f"the lab needs {' and '.join(missing)} on PATH (iproute2, nftables)"
    return _probe_kernel()


_kernel_verdict: list[str | None] = []


def _probe_kernel() -> str | None:
    # Root is not enough in every container: check once that a namespace and an nftables
    # table can really be made.
    if _kernel_verdict:
        return _kernel_verdict[0]
    # Named like a lab's namespace, so that if we die here `remove_stale_labs` finds it.
    ns = f"{NAME_PREFIX}chk{secrets.token_hex(3)}-probe"
    reason: str | None = None
    try:
        made = _run(["ip", "netns", "add", ns], check=False)
        if made.returncode != 0:
            reason = f"cannot create a network namespace: {_first_line(made.stderr)}"
        else:
            nft = _run(["ip", "netns", "exec", ns, "nft", "list", "ruleset"], check=False)
            if nft.returncode != 0:
                reason = f"nftables unusable in a namespace: {_first_line(nft.stderr)}"
    except UdpreachError as exc:
        reason = str(exc)
    finally:
        _run(["ip", "netns", "del", ns], check=False)
    _kernel_verdict.append(reason)
    return reason


def require_root() -> None:
    """Raise ConfigError (exit 2) with a one-line reason unless the lab can be built."""
    reason = lab_available()
    if reason is not None:
        raise ConfigError(reason)


# ---------------------------------------------------------------------------------------
# Policies


def render_policy(text: str) -> tuple[str, int]:
    """Turn a policy into the complete nft script loaded into the router.

    Two forms are accepted. A complete nft script (any line starting with ``table``,
    ``add``, ``flush``, ``define``, ``include``...) is loaded as is. Anything else is a list
    of rules, one per line (``#`` comments allowed), placed into
    ``table inet udpreach { chain forward { type filter hook forward priority filter;
    policy accept; ... } }``; an empty policy therefore accepts everything. Either way
    ``flush ruleset`` goes in front, so loading replaces the previous ruleset atomically.

    Returns:
        The script, and how many lines were put in front of the user's first line (to map
        nft's error positions back to the policy).
    """
    lines = text.splitlines()
    is_script = any(
        line.split(maxsplit=1)[0] in _SCRIPT_WORDS
        for line in lines
        if line.strip() and not line.lstrip().startswith("#")
    )
    if is_script:
        head = ["flush ruleset"]
        return "\n".join([*head, *lines, ""]), len(head)
    head = [
        "flush ruleset",
        "table inet udpreach {",
        "\tchain forward {",
        "\t\ttype filter hook forward priority filter; policy accept;",
    ]
    body = [f"\t\t{line.strip()}" for line in lines]
    return "\n".join([*head, *body, "\t}", "}", ""]), len(head)


def _nft_error(stderr: str, offset: int, policy_lines: int) -> str:
    for line in stderr.splitlines():
        m = _NFT_ERROR_RE.match(line.strip())
        if m:
            where = int(m.group(1)) - offset
            if 1 <= where <= policy_lines:
                return f"policy rejected by nft: line {where}: {m.group(2)}"
            return f"policy rejected by nft: {m.group(2)}"
    for line in stderr.splitlines():
        if "Error" in line:
            return f"policy rejected by nft: {line.strip()}"
    return f"policy rejected by nft: {_first_line(stderr) or 'no message'}"


def bundled_policies() -> list[str]:
    """Names of the sample policies shipped with udpreach (``demo``, ``allow-all``)."""
    folder = resources.files("udpreach").joinpath("policies")
    return sorted(
        entry.name.removesuffix(".nft") for entry in folder.iterdir() if entry.name.endswith(".nft")
    )


def bundled_policy(name: str) -> str:
    """The text of a bundled sample policy, by name (``demo`` or ``demo.nft``)."""
    stem = name.removesuffix(".nft")
    if stem not in bundled_policies():
        raise ConfigError(
            f"no bundled policy {name!r} (bundled: {', '.join(bundled_policies()) or 'none'})"
        )
    return resources.files("udpreach").joinpath("policies", f"{stem}.nft").read_text("utf-8")


# ---------------------------------------------------------------------------------------
# The lab


class Lab:
    """Three namespaces and a firewall between them. A context manager: leaving it tears
    the lab down, whatever happened inside."""

    def __init__(self, info: LabInfo, *, persistent: bool = False) -> None:
        """Wrap an existing lab; use `create` or `attach` rather than this."""
        self.info = info
        self.persistent = persistent
        # The namespaces this object made or adopted: the only ones `destroy` removes.
        self._owned: list[str] = []

    @classmethod
    def create(
        cls,
        policy: str = "",
        *,
        ipv6: bool = False,
        name: str | None = None,
        persistent: bool = False,
    ) -> Lab:
        """Build a lab and load ``policy`` into its router.

        Args:
            policy: an nft script or a list of forward rules (see `render_policy`).
            ipv6: also address everything in 2001:2::/48.
            name: the lab's name (``ur-`` is put in front if missing); random if None.
            persistent: keep it after this process exits (``udpreach lab up``); only
                `lab_down` or `destroy` remove it.

        Raises:
            ConfigError: not root, a bad name, a name in use, or a policy nft rejects.
            LabError: ``ip`` failed while building. Nothing is left behind in either case.
        """
        require_root()
        lab_name = _normalize_name(name) if name is not None else _fresh_name()
        lab = cls(_plan(lab_name, ipv6), persistent=persistent)
        clash = set(lab.info.namespaces) & set(list_namespaces())
        if clash:
            raise ConfigError(
                f"a lab named {lab_name} already exists ({sorted(clash)[0]} is in use)"
            )
        _claim(lab.info, persistent)  # raises ConfigError if the name is taken
        try:
            lab._build(policy)
        except BaseException:
            with contextlib.suppress(UdpreachError):
                lab.destroy()
            raise
        return lab

    @classmethod
    def attach(cls, name: str | None = None) -> Lab:
        """A running lab by name; None picks the only persistent one.

        Raises:
            ConfigError: no such lab, or several persistent labs and no name.
        """
        record = _resolve(name)
        lab = cls(record.info, persistent=record.persistent)
        lab._owned = list(record.info.namespaces)
        return lab

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    def ns_argv(self, role: Role, argv: list[str]) -> list[str]:
        """The command line that runs ``argv`` inside ``role``'s namespace."""
        return ["ip", "netns", "exec", self.info.ns(role), *argv]

    def run(
        self,
        role: Role,
        argv: list[str],
        *,
        input: str | None = None,
        timeout: float = _CMD_TIMEOUT,
        check: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in ``role``'s namespace, capturing text output (bounded by timeout).

        Raises:
            LabError: on timeout, or a non-zero exit with ``check``.
        """
        return _run(self.ns_argv(role, argv), input=input, timeout=timeout, check=check)

    def load_policy(self, text: str) -> None:
        """Replace the router's whole ruleset with ``text`` in one transaction.

        Raises:
            ConfigError: nft rejected the policy (its first error, with the policy's line
                number); the previous ruleset is still in force.
        """
        script, offset = render_policy(text)
        proc = self.run("router", ["nft", "-f", "-"], input=script)
        if proc.returncode != 0:
            raise ConfigError(_nft_error(proc.stderr, offset, len(text.splitlines())))

    def ruleset(self) -> str:
        """The router's ruleset as nft lists it."""
        return self.run("router", ["nft", "list", "ruleset"], check=True).stdout

    def destroy(self) -> None:
        """Remove the lab: stop what runs in it, delete its namespaces (and with them the
        veths), forget its state. Idempotent, and safe on a half-built lab.

        Raises:
            LabError: a namespace could not be deleted (it is left recorded).
        """
        for ns in self._owned:
            _kill_ns_processes(ns)
        existing = set(list_namespaces())
        for ns in self._owned:
            if ns in existing:
                _run(["ip", "netns", "del", ns], check=False)
        existing = set(list_namespaces())
        self._owned = [ns for ns in self._owned if ns in existing]
        if self._owned:
            raise LabError(f"could not delete namespace(s) {', '.join(self._owned)}")
        _state_path(self.info.name).unlink(missing_ok=True)

    # -- building ------------------------------------------------------------------------

    def _build(self, policy: str) -> None:
        info = self.info
        for ns in info.namespaces:
            _run(["ip", "netns", "add", ns])
            self._owned.append(ns)

        tuned: list[str] = []
        untuned: list[str] = []
        plan: list[tuple[Role, tuple[tuple[str, str, bool], ...]]] = [
            ("router", _ROUTER_SYSCTLS),
            ("agent", _HOST_SYSCTLS),
            ("probe", _HOST_SYSCTLS),
        ]
        if info.ipv6:
            plan += [("router", _ROUTER_SYSCTLS6)]
            plan += [(role, _NODAD_SYSCTLS) for role in ROLES]
        for role, settings in plan:
            ok, failed = _apply_sysctls(info.ns(role), settings)
            tuned += [f"{role}: {s}" for s in ok]
            untuned += [f"{role}: {s}" for s in failed]

        a, r, p = info.agent_ns, info.router_ns, info.probe_ns
        router = [
            f"link add {ROUTER_AGENT_IF} type veth peer name {HOST_IF} netns {a}",
            f"link add {ROUTER_PROBE_IF} type veth peer name {HOST_IF} netns {p}",
            "link set lo up",
            f"link set {ROUTER_AGENT_IF} up",
            f"link set {ROUTER_PROBE_IF} up",
            f"addr add {ROUTER_AGENT_SIDE}/{PREFIX4} dev {ROUTER_AGENT_IF}",
            f"addr add {ROUTER_PROBE_SIDE}/{PREFIX4} dev {ROUTER_PROBE_IF}",
        ]
        agent = _host_batch(AGENT_ADDR, ROUTER_AGENT_SIDE)
        probe = _host_batch(PROBE_ADDR, ROUTER_PROBE_SIDE)
        if info.ipv6:
            router += [
                f"addr add {ROUTER_AGENT_SIDE6}/{PREFIX6} dev {ROUTER_AGENT_IF} nodad",
                f"addr add {ROUTER_PROBE_SIDE6}/{PREFIX6} dev {ROUTER_PROBE_IF} nodad",
            ]
            agent += _host_batch6(AGENT_ADDR6, ROUTER_AGENT_SIDE6)
            probe += _host_batch6(PROBE_ADDR6, ROUTER_PROBE_SIDE6)
        for ns, batch in ((r, router), (a, agent), (p, probe)):
            _run(["ip", "-n", ns, "-batch", "-"], input="\n".join(batch) + "\n")

        self.load_policy(policy)
        self.info = replace(info, tuned=tuple(tuned), untuned=tuple(untuned))
        _write_state(self.info, self.persistent, replace_existing=True)


def _host_batch(addr: str, gateway: str) -> list[str]:
    return [
        "link set lo up",
        f"link set {HOST_IF} up",
        f"addr add {addr}/{PREFIX4} dev {HOST_IF}",
        f"route add default via {gateway}",
    ]


def _host_batch6(addr: str, gateway: str) -> list[str]:
    return [
        f"addr add {addr}/{PREFIX6} dev {HOST_IF} nodad",
        f"route add default via {gateway}",
    ]


def _plan(name: str, ipv6: bool) -> LabInfo:
    return LabInfo(
        name=name,
        agent_ns=f"{name}-agent",
        router_ns=f"{name}-router",
        probe_ns=f"{name}-probe",
        agent_addr=AGENT_ADDR,
        probe_addr=PROBE_ADDR,
        router_agent_side=ROUTER_AGENT_SIDE,
        router_probe_side=ROUTER_PROBE_SIDE,
        ipv6=ipv6,
        agent_addr6=AGENT_ADDR6 if ipv6 else None,
        probe_addr6=PROBE_ADDR6 if ipv6 else None,
        router_agent_side6=ROUTER_AGENT_SIDE6 if ipv6 else None,
        router_probe_side6=ROUTER_PROBE_SIDE6 if ipv6 else None,
    )


def _apply_sysctls(
    ns: str, settings: Iterable[tuple[str, str, bool]]
) -> tuple[list[str], list[str]]:
    # Written straight to /proc/sys from a shell in the namespace: sysctl(8) exits 0 even
    # when the kernel refuses a value, so its status cannot tell us what took effect.
    ok: list[str] = []
    failed: list[str] = []
    for key, value, required in settings:
        path = "/proc/sys/" + key.replace(".", "/")
        proc = _run(
            ["ip", "netns", "exec", ns, "sh", "-c", 'printf %s "$1" > "$2"', "sh", value, path],
            check=False,
        )
        setting = f"{key}={value}"
        if proc.returncode == 0:
            ok.append(setting)
        elif required:
            raise LabError(f"cannot set {setting} in {ns}: {_first_line(proc.stderr)}")
        else:
            failed.append(setting)
    return ok, failed


# ---------------------------------------------------------------------------------------
# Persistent labs (the CLI) and stale namespaces


def lab_up(policy_text: str, ipv6: bool, name: str | None = None) -> LabInfo:
    """Build a lab that outlives this process (``udpreach lab up``); see `Lab.create`."""
    return Lab.create(policy_text, ipv6=ipv6, name=name, persistent=True).info


def lab_down(name: str | None = None, *, every: bool = False) -> list[str]:
    """Remove the lab ``name``; without a name the only persistent lab (as ``lab exec``
    picks it), or with ``every`` all of them; either way also every stale one (its owner
    is gone).

    Returns:
        The names of the labs removed (empty when there was nothing to remove).

    Raises:
        ConfigError: no lab has the name given; or several labs are up and neither a name
            nor ``every`` says which: on a shared host the others may be someone else's.
    """
    require_root()
    if name is not None:
        lab_name = _normalize_name(name)
        found = _read_state(lab_name) is not None or any(
            _lab_of(ns) == lab_name for ns in list_namespaces()
        )
        if not found:  # a mistyped name must not pass for a lab removed: ``lab exec`` agrees
            up = sorted(rec.info.name for rec in list_labs())
            raise ConfigError(
                f"no lab named {lab_name} ({'labs up: ' + ', '.join(up) if up else 'none is up'})"
            )
        _remove(lab_name)
        return [lab_name]
    removed = [rec.info.name for rec in list_labs() if rec.persistent]
    if len(removed) > 1 and not every:
        raise ConfigError(
            f"{len(removed)} labs are up ({', '.join(sorted(removed))}): choose one with "
            "--name, or remove them all with --all"
        )
    for lab_name in removed:
        _remove(lab_name)
    return sorted({*removed, *remove_stale_labs()})


def lab_exec(role: Role, argv: list[str], name: str | None = None) -> int:
    """Run ``argv`` inside ``role``'s namespace of a lab, with this process's stdio.

    Returns:
        The command's exit status (128 + N when killed by signal N, as a shell reports it).
    """
    require_root()
    if role not in ROLES:
        raise ConfigError(f"unknown lab role {role!r} (want agent, router or probe)")
    if not argv:
        raise ConfigError("nothing to run: give the command after --")
    lab = Lab.attach(name)
    missing = sorted(set(lab.info.namespaces) - set(list_namespaces()))
    if missing:
        raise ConfigError(f"lab {lab.info.name} is broken ({missing[0]} is gone): lab down")
    argv = [_command(argv[0]), *argv[1:]]
    try:
        child = subprocess.Popen(lab.ns_argv(role, argv))
    except OSError as exc:
        raise LabError(f"cannot run ip netns exec: {exc}") from None

    # A SIGTERM for `lab exec` (kill, a CI job's timeout) is the command's: handed on, as
    # the terminal hands Ctrl-C to both; the command then ends as it does on its own (a run
    # prints what was settled) and `lab exec` reports its status.
    def hand_on(signum: int, frame: object) -> None:
        with contextlib.suppress(OSError):
            child.send_signal(signum)

    try:
        old_term = signal.signal(signal.SIGTERM, hand_on)
    except ValueError:  # not the main thread: nothing to hand on
        old_term = None
    try:
        while True:
            try:
                code = child.wait()
                break
            except KeyboardInterrupt:
                # The terminal sent SIGINT to the command too: like a shell, let it decide
                # how to end (an agent shuts down cleanly) and report its status, not ours.
                continue
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    return 128 - code if code < 0 else code


def _command(cmd: str) -> str:
    """The program ``lab exec`` runs: ``cmd`` as PATH finds it. ``udpreach`` itself is
    this one when PATH has none (a venv not activated, or ``sudo``'s reset PATH).

    Raises:
        ConfigError: no such program.
    """
    if os.sep in cmd:
        if not os.access(cmd, os.X_OK) or os.path.isdir(cmd):
            raise ConfigError(f"lab exec: {cmd} is not a program that can be run")
        return cmd
    found = shutil.which(cmd)
    if found:
        return found
    if cmd == "udpreach":
        mine = shutil.which("udpreach", path=os.path.dirname(sys.executable))
        if mine:
            return mine
    raise ConfigError(f"lab exec: no program {cmd!r} on PATH (give its full path)")


def list_namespaces() -> list[str]:
    """Every named network namespace on this host (``ip netns list``)."""
    proc = _run(["ip", "netns", "list"], check=True)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def list_labs() -> list[LabRecord]:
    """Every lab with a readable state file, oldest first."""
    records = []
    for path in _state_dir().glob(f"{NAME_PREFIX}*.json"):
        record = _read_state(path.stem)
        if record is not None:
            records.append(record)
    return sorted(records, key=lambda r: r.created)


def stale_labs(prefix: str = NAME_PREFIX) -> list[str]:
    """Labs left behind by a process that died: namespaces with no state file, or a state
    file whose owning process is gone (persistent labs are never stale).

    Args:
        prefix: only labs whose names start with this (all udpreach labs by default).
    """
    names = {lab for ns in list_namespaces() if (lab := _lab_of(ns)) is not None}
    names |= {path.stem for path in _state_dir().glob(f"{NAME_PREFIX}*.json")}
    names = {lab_name for lab_name in names if lab_name.startswith(prefix)}
    stale = []
    for lab_name in sorted(names):
        record = _read_state(lab_name)
        if record is None or (
            not record.persistent and (record.pid is None or not _alive(record.pid))
        ):
            stale.append(lab_name)
    return stale


def remove_stale_labs(prefix: str = NAME_PREFIX) -> list[str]:
    """Remove every stale lab (see `stale_labs`); returns their names."""
    removed = stale_labs(prefix)
    for lab_name in removed:
        _remove(lab_name)
    return removed


def _remove(lab_name: str) -> None:
    lab = Lab(_plan(lab_name, ipv6=False))
    lab._owned = list(lab.info.namespaces)
    lab.destroy()


def _lab_of(ns: str) -> str | None:
    m = _NS_RE.match(ns)
    return m.group(1) if m else None


def _resolve(name: str | None) -> LabRecord:
    if name is not None:
        lab_name = _normalize_name(name)
        record = _read_state(lab_name)
        if record is None:
            raise ConfigError(f"no lab named {lab_name} (start one with: udpreach lab up)")
        return record
    persistent = [rec for rec in list_labs() if rec.persistent]
    if not persistent:
        raise ConfigError("no lab is up (start one with: udpreach lab up)")
    if len(persistent) > 1:
        names = ", ".join(rec.info.name for rec in persistent)
        raise ConfigError(f"{len(persistent)} labs are up ({names}): choose one with --name")
    return persistent[0]


def _normalize_name(name: str) -> str:
    lab_name = name if name.startswith(NAME_PREFIX) else NAME_PREFIX + name
    if not _NAME_RE.fullmatch(lab_name):
        raise ConfigError(
            f"bad lab name {name!r}: lowercase letters, digits and '-', at most 24 characters"
        )
    return lab_name


def _fresh_name() -> str:
    return NAME_PREFIX + secrets.token_hex(3)


def _state_dir() -> Path:
    return STATE_DIR


def _state_path(lab_name: str) -> Path:
    return _state_dir() / f"{lab_name}.json"


def _claim(info: LabInfo, persistent: bool) -> None:
    try:
        _write_state(info, persistent, replace_existing=False)
    except FileExistsError:
        raise ConfigError(f"a lab named {info.name} already exists") from None


def _write_state(info: LabInfo, persistent: bool, *, replace_existing: bool) -> None:
    # Written to a temporary file first, so readers never see half a document; linked into
    # place (fails if it exists) to claim a name, renamed over it to update.
    folder = _state_dir()
    folder.mkdir(parents=True, exist_ok=True)
    doc = {
        "schema": _STATE_SCHEMA,
        "persistent": persistent,
        "pid": None if persistent else os.getpid(),
        "created": time.time(),
        "info": info.to_json(),
    }
    final = _state_path(info.name)
    tmp = folder / f".{info.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    try:
        if replace_existing:
            tmp.replace(final)
        else:
            os.link(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def _read_state(lab_name: str) -> LabRecord | None:
    try:
        doc = json.loads(_state_path(lab_name).read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or doc.get("schema") != _STATE_SCHEMA:
            return None
        info = doc.get("info")
        if not isinstance(info, dict):
            return None
        pid = doc.get("pid")
        created = doc.get("created")
        return LabRecord(
            info=LabInfo.from_json(info),
            persistent=doc.get("persistent") is True,
            pid=pid if isinstance(pid, int) else None,
            created=float(created) if isinstance(created, int | float) else 0.0,
        )
    except (OSError, ValueError, ConfigError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_ns_processes(ns: str, grace: float = 1.0) -> None:
    # Whatever still runs inside would keep the namespace (and its veths) alive after its
    # name is deleted: ask it to stop, then insist.
    def pids() -> list[int]:
        proc = _run(["ip", "netns", "pids", ns], check=False)
        return [int(tok) for tok in proc.stdout.split() if tok.isdigit()]

    running = pids()
    if not running:
        return
    for pid in running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while running and time.monotonic() < deadline:
        time.sleep(0.02)
        running = pids()
    for pid in running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _run(
    argv: list[str],
    *,
    input: str | None = None,
    timeout: float = _CMD_TIMEOUT,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(argv[:4])} timed out after {timeout:g}s") from None
    except OSError as exc:
        raise LabError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    if check and proc.returncode != 0:
        message = _first_line(proc.stderr) or f"exit status {proc.returncode}"
        raise LabError(f"{' '.join(argv[:6])}: {message}")
    return proc


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")
