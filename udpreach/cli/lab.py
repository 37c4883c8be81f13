"""``udpreach lab up|down|exec``: the real-firewall lab from the command line.

Thin on purpose: each command makes one call into `udpreach.lab` and renders the result.
Results go to stdout; errors are one line on stderr through the one error mapper, with the
exit code of their `UdpreachError` family (2 for configuration, including "not root").
"""

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from udpreach.cli.common import mapped, print_json
from udpreach.core.errors import ConfigError

if TYPE_CHECKING:
    from udpreach.lab import LabInfo, Role

lab_app = typer.Typer(
    name="lab",
    help=(
        "The real-firewall lab: agent, router (an nftables firewall) and probe in three "
        "network namespaces. Needs root."
    ),
    short_help="The real-firewall lab: agent, nftables router, probe (root).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)


def _console(stderr: bool = False) -> Any:
    # rich and udpreach.lab load only when a lab command runs: `udpreach --help` stays fast.
    from udpreach.render.console import report_console

    return report_console(stderr=stderr)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


class LabRole(StrEnum):
    agent = "agent"
    router = "router"
    probe = "probe"


_ROLES: "dict[LabRole, Role]" = {
    LabRole.agent: "agent",
    LabRole.router: "router",
    LabRole.probe: "probe",
}


def _policy_text(policy: str | None) -> tuple[str, str]:
    """The policy's text and a label for it: a file, else a bundled policy's name."""
    from udpreach import lab

    if policy is None:
        return "", "none (everything forwarded)"
    path = Path(policy)
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read policy {policy}: {exc}") from None
    if policy.removesuffix(".nft") in lab.bundled_policies():
        return lab.bundled_policy(policy), f"{policy.removesuffix('.nft')} (bundled)"
    bundled = ", ".join(lab.bundled_policies())
    raise ConfigError(f"no such policy file: {policy} (bundled policies: {bundled})")


@lab_app.command()
@mapped
def up(
    policy: Annotated[
        str | None,
        typer.Option(
            "--policy",
            metavar="FILE",
            help=(
                "nftables policy for the router: a complete nft script, or forward-chain "
                "rules one per line. A bundled policy by name: 'demo', 'allow-all'. "
                "Default: forward everything."
            ),
        ),
    ] = None,
    ipv6: Annotated[
        bool, typer.Option("--ipv6", help="Also address the lab in 2001:2::/48.")
    ] = False,
    name: Annotated[
        str | None,
        typer.Option("--name", help="The lab's name (default: ur-<random>)."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the lab's description as JSON.")
    ] = False,
) -> None:
    """Build a lab and leave it running (until `udpreach lab down`)."""
    from udpreach import lab

    lab.require_root()
    text, label = _policy_text(policy)
    info = lab.lab_up(text, ipv6, name=name)
    if as_json:
        print_json(info.to_json())
        return
    _render(info, label)


def _render(info: "LabInfo", policy_label: str) -> None:
    from rich.table import Table

    out = _console()
    table = Table(title=f"lab {info.name}", title_justify="left", box=None, pad_edge=False)
    table.add_column("role")
    table.add_column("namespace")
    table.add_column("address")
    v6 = info.ipv6
    table.add_row(
        "agent",
        info.agent_ns,
        info.agent_addr + (f"  {info.agent_addr6}" if v6 else ""),
    )
    table.add_row(
        "router",
        info.router_ns,
        f"{info.router_agent_side} ({info.router_agent_if}, agent side)"
        + (f"  {info.router_agent_side6}" if v6 else ""),
    )
    table.add_row(
        "",
        "",
        f"{info.router_probe_side} ({info.router_probe_if}, probe side)"
        + (f"  {info.router_probe_side6}" if v6 else ""),
    )
    table.add_row(
        "probe",
        info.probe_ns,
        info.probe_addr + (f"  {info.probe_addr6}" if v6 else ""),
    )
    out.print(table)
    out.print(f"policy: {_escape(policy_label)}")
    n = info.name
    out.print("run commands inside it:", soft_wrap=True)
    out.print(
        f"  udpreach lab exec probe --name {n} -- "
        f"udpreach probe --control {info.probe_addr}:7000 --secret-file SECRET",
        soft_wrap=True,
    )
    out.print(
        f"  udpreach lab exec agent --name {n} -- "
        f"udpreach agent --coordinator {info.probe_addr}:7000 --secret-file SECRET --port 5000",
        soft_wrap=True,
    )
    out.print(f"  udpreach lab exec router --name {n} -- nft list ruleset", soft_wrap=True)
    out.print(f"tear it down: udpreach lab down --name {n}", soft_wrap=True)


@lab_app.command()
@mapped
def down(
    name: Annotated[
        str | None,
        typer.Option("--name", help="The lab to remove (default: the only one that is up)."),
    ] = None,
    every: Annotated[
        bool, typer.Option("--all", help="Remove every lab `up` made (when several are up).")
    ] = False,
) -> None:
    """Remove a lab: its namespaces, whatever runs in them, its firewall (and any stale lab,
    left by a demo or a test that died; one still in use is never touched)."""
    from udpreach import lab

    if name is not None and every:
        raise ConfigError("--name and --all: choose one")
    removed = lab.lab_down(name, every=every)
    if not removed:
        _console(stderr=True).print("no lab to remove")
    for lab_name in removed:
        _console().print(f"removed {lab_name}")


@lab_app.command("exec")
@mapped
def exec_(
    role: Annotated[
        LabRole, typer.Argument(metavar="ROLE", help="Where to run: agent, router or probe.")
    ],
    cmd: Annotated[
        list[str], typer.Argument(metavar="-- CMD...", help="The command to run, after --.")
    ],
    name: Annotated[
        str | None,
        typer.Option("--name", help="The lab (default: the only one that is up)."),
    ] = None,
) -> None:
    """Run a command inside one of the lab's namespaces; exits with its status."""
    from udpreach import lab

    raise typer.Exit(lab.lab_exec(_ROLES[role], cmd, name=name))
