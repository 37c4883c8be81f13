"""``udpreach secret new FILE``: a fresh shared secret, mode 0600."""

from pathlib import Path
from typing import Annotated

import typer

from udpreach.cli.common import mapped, note

secret_app = typer.Typer(
    name="secret", help="Create shared secrets.", no_args_is_help=True, rich_markup_mode=None
)


@secret_app.command("new")
@mapped
def secret_new(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="File to create (mode 0600).")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a fresh random secret to FILE with mode 0600."""
    from udpreach.secret import new_secret

    made = new_secret(path, force=force)
    note(f"wrote a new secret to {made} (mode 0600); copy it to the other side")
