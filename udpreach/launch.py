"""The console script's entry point: ``--help`` without importing typer.

Python's start-up plus typer's import take 100-150 ms on a small VM, before the CLI has
done anything. A help page only needs text, so ``udpreach [COMMAND...] --help`` prints
the page typer rendered for this very source tree (``udpreach/helppages.py``, written by
``make help-pages``) and imports nothing else. Anything else, and any doubt, goes to the
typer CLI, which then renders the page itself:

* the pages are keyed by a hash of the sources they are rendered from (``SOURCES``: the
  CLI modules) and of typer's and click's installed versions; an edited CLI (a changed
  option, a new default) no longer matches and takes the slow path;
* click wraps help to the terminal's width, capped at 80 columns, and the pages are
  rendered at that cap: a narrower terminal takes the slow path;
* only the exact forms ``udpreach --help`` and ``udpreach CMD [SUBCMD] --help`` qualify,
  and only under the console script's own name.

The test suite renders every page through typer and compares it with the stored one.
"""

import hashlib
import os
import sys
from pathlib import Path

# click's help width: min(terminal columns, 80) - 2. The pages are rendered at 80 columns.
PAGE_COLUMNS = 80
PAGES_MODULE = "helppages.py"
# Everything help is rendered from: the modules `--help` imports (a test checks that it
# imports no other module of ours) and typer, whose __init__ names its version.
SOURCES = (
    "udpreach/__init__.py",
    "udpreach/cli.py",
    "udpreach/cli_history.py",
    "udpreach/cli_lab.py",
    "udpreach/errors.py",
    "udpreach/launch.py",
    "typer/__init__.py",
)
OWN_PACKAGES = ("udpreach", "agent", "probe")
RENDERERS = ("typer", "click")  # their versions are part of the key as well


def _locate(rel: str, root: Path) -> Path:
    if rel.split("/", 1)[0] in OWN_PACKAGES:
        return root / rel
    for entry in sys.path:  # a third-party package: where the import system finds it
        path = Path(entry or ".") / rel
        if path.is_file():
            return path
    raise FileNotFoundError(rel)


def installed_versions(names: tuple[str, ...] = RENDERERS) -> list[str]:
    """The installed distributions of ``names`` as ``name-version`` (their dist-info
    directories, first on ``sys.path`` as the import system finds them)."""
    found: dict[str, str] = {}
    for entry in sys.path:
        try:
            listing = os.listdir(entry or ".")
        except OSError:
            continue
        for item in listing:
            if not item.endswith(".dist-info"):
                continue
            name = item.split("-", 1)[0].lower()
            if name in names and name not in found:
                found[name] = item.removesuffix(".dist-info")
    return sorted(found.values())


def source_key(root: Path | None = None, sources: tuple[str, ...] = SOURCES) -> str:
    """A hash of the files the help pages are rendered from, and of the versions of the
    libraries that render them (typer, and click where typer does not bundle it)."""
    root = root or Path(__file__).resolve().parent.parent
    h = hashlib.blake2b(digest_size=16)
    for rel in sources:
        h.update(rel.encode() + b"\0")
        h.update(_locate(rel, root).read_bytes())
        h.update(b"\0")
    for dist in installed_versions():
        h.update(dist.encode() + b"\0")
    return h.hexdigest()


def terminal_columns() -> int:
    """The width click's help formatter sees (the logic of ``shutil.get_terminal_size``)."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


def stored_page(argv: list[str]) -> str | None:
    """The stored help page for this command line, or None when typer must answer."""
    if len(argv) < 2 or argv[-1] != "--help" or len(argv) > 4:
        return None
    if os.path.basename(argv[0]) != "udpreach" or terminal_columns() < PAGE_COLUMNS:
        return None
    path = tuple(argv[1:-1])
    if any(p.startswith("-") for p in path):
        return None
    try:
        from udpreach import helppages
    except ImportError:
        return None
    page = helppages.PAGES.get(path)
    if page is None or source_key() != helppages.KEY:
        return None
    return page


def main() -> None:
    """Console-script entry point: a stored help page, or the typer CLI."""
    try:
        page = stored_page(sys.argv)
    except OSError:  # an unreadable source file: let typer answer
        page = None
    if page is not None:
        try:
            sys.stdout.write(page)
            sys.stdout.flush()
        except BrokenPipeError:  # `udpreach --help | head`: as quiet as click
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    from udpreach.cli import main as cli_main

    cli_main()


def render_pages() -> dict[tuple[str, ...], str]:
    """Every command's help page as the typer CLI prints it on a terminal of
    ``PAGE_COLUMNS`` columns (typer's CliRunner forces its own width: not used)."""
    import contextlib
    import io

    import typer.main

    from udpreach.cli import app

    root = typer.main.get_command(app)
    paths: list[tuple[str, ...]] = []

    def walk(cmd: object, path: tuple[str, ...]) -> None:
        paths.append(path)
        list_commands = getattr(cmd, "list_commands", None)
        if list_commands is None:
            return
        for name in list_commands(None):
            walk(cmd.get_command(None, name), (*path, name))  # type: ignore[attr-defined]

    walk(root, ())
    pages: dict[tuple[str, ...], str] = {}
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(PAGE_COLUMNS)
    try:
        for path in paths:
            out = io.StringIO()
            code: object = None
            with contextlib.redirect_stdout(out):
                try:
                    root.main([*path, "--help"], prog_name="udpreach")
                except SystemExit as exc:
                    code = exc.code
            if code not in (0, None):
                raise RuntimeError(f"udpreach {' '.join(path)} --help exited {code}")
            pages[path] = out.getvalue()
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved
    return pages


def pages_source(pages: dict[tuple[str, ...], str], key: str) -> str:
    """The text of ``helppages.py`` for these pages."""
    lines = [
        '"""Help pages rendered by typer for this source tree: `make help-pages` writes this."""',
        "",
        f"KEY = {key!r}",
        "",
        "PAGES: dict[tuple[str, ...], str] = {",
    ]
    for path, text in sorted(pages.items()):
        lines.append(f"    {path!r}: {text!r},")
    lines += ["}", ""]
    return "\n".join(lines)


def write_pages() -> Path:
    """Render every page and write ``helppages.py`` next to this module."""
    target = Path(__file__).resolve().with_name(PAGES_MODULE)
    target.write_text(pages_source(render_pages(), source_key()))
    return target


if __name__ == "__main__":
    print(f"wrote {write_pages()}")
