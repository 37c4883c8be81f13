"""``udpreach key add|list|revoke``: the coordinator's keyring of agent and operator keys.

Thin commands over ``udpreach.keyring``: each one edits or reads the keyring file (default
``$XDG_CONFIG_HOME/udpreach/keyring.json``, ``--keyring`` or ``$UDPREACH_KEYRING`` for
another) and prints one line; a running probe picks changes up by itself. Errors are one
line on stderr with the contract's exit code (2: bad name, existing key, unusable file).
"""

import shutil
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from udpreach.cli.common import mapped, path_option, print_json
from udpreach.core import schema

key_app = typer.Typer(
    name="key",
    help="Per-agent and operator keys in the coordinator's keyring (instead of one shared secret).",
    short_help="Per-agent and operator keys (instead of one shared secret).",
    no_args_is_help=True,
    rich_markup_mode=None,
)

KeyringOpt = Annotated[
    Path | None,
    path_option(
        "--keyring",
        help="The keyring file (default: $UDPREACH_KEYRING, else "
        "$XDG_CONFIG_HOME/udpreach/keyring.json).",
        show_default=False,
    ),
]


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")


@key_app.command("add")
@mapped
def add(
    name: Annotated[
        str, typer.Argument(metavar="NAME", help="The agent's name (its --name), or an operator's.")
    ],
    out: Annotated[
        Path | None,
        path_option("--out", "-o", help="Where to write the key file (default: ./NAME.key)."),
    ] = None,
    operator: Annotated[
        bool,
        typer.Option(
            "--operator", help="An operator key (for run and agents) instead of an agent key."
        ),
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing key file.")] = False,
    keyring: KeyringOpt = None,
) -> None:
    """Give NAME a key of its own and write it to a key file (mode 0600)."""
    from udpreach import keyring as kr

    target = out if out is not None else Path(f"{name}.key")
    if target.exists() and not force:
        from udpreach.core.errors import ConfigError

        raise ConfigError(f"{target} already exists (use --force to overwrite)")
    with kr.edit(keyring, create=True) as ring:
        identity = ring.add(name, "operator" if operator else "agent")
        written = kr.write_key_file(target, identity, force=force)
    if operator:
        _say(
            f"wrote operator key {name!r} to {written} (mode 0600); use it as --secret-file"
            " for udpreach run and udpreach agents"
        )
    else:
        _say(
            f"wrote agent key {name!r} to {written} (mode 0600); copy it to the agent's host"
            f" and run: udpreach agent --secret-file {written.name} ..."
        )


@key_app.command("list")
@mapped
def list_keys(
    keyring: KeyringOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """List the keys in the keyring: name, role, fingerprint, added (UTC)."""
    from udpreach.keyring import Keyring

    ring = Keyring.load(keyring)
    rows: list[dict[str, Any]] = [
        {
            "name": e.name,
            "role": e.role,
            "fingerprint": ring.fingerprint(e.name),
            "added": e.added,
        }
        for e in sorted(ring.entries.values(), key=lambda e: (e.role, e.name))
    ]
    if as_json:
        print_json({"schema": schema.KEYS, "keyring": str(ring.path), "keys": rows})
        return
    if not rows:
        _say(f"no keys in {ring.path}")
        return
    width = max(len(r["name"]) for r in rows)
    lines = []
    for r in rows:
        added = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(r["added"]))
        lines.append((f"{r['name']:<{width}}  {r['role']:<8}  {r['fingerprint']}", added))
    # One line per key (for grep), unless a terminal is too narrow for it: then the date
    # goes on a line of its own rather than wrapping mid-word.
    columns = shutil.get_terminal_size().columns if sys.stdout.isatty() else 0
    split = bool(columns) and any(len(head) + 2 + len(added) > columns for head, added in lines)
    for head, added in lines:
        sys.stdout.write(f"{head}\n  added {added}\n" if split else f"{head}  {added}\n")


@key_app.command("revoke")
@mapped
def revoke(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The key to revoke.")],
    keyring: KeyringOpt = None,
) -> None:
    """Revoke NAME's key: a running probe drops its sessions and refuses it from now on."""
    from udpreach import keyring as kr

    with kr.edit(keyring) as ring:
        role = ring.revoke(name).role
    _say(f"revoked {role} key {name!r}; a running probe drops its sessions within a second")
