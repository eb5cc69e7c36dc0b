"""Regenerate the reference parts of the docs from the code.

    python scripts/gen_docs.py           # rewrite the generated sections in place
    python scripts/gen_docs.py --check   # exit 1 (listing the files) if any is stale

Generated sections sit between `<!-- BEGIN GENERATED: name -->` and
`<!-- END GENERATED: name -->` markers; the prose around them is written by hand.

- docs/configuration.md, section `settings`: one row per `nbgateway.config.SETTINGS` entry.
- docs/cli.md, section `cli`: the `--help` output of every command and subcommand, rendered
  80 columns wide so the text does not depend on the terminal it is generated in.

tests/test_docs.py fails when a section is stale, with a hint to run this script.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, str(ROOT))

from nbgateway.cli import build_parser  # noqa: E402 - after the path set-up above
from nbgateway.config import SETTINGS  # noqa: E402

HELP_WIDTH = 80
CONFIGURATION = ROOT / "docs" / "configuration.md"
CLI = ROOT / "docs" / "cli.md"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def shown_default(default: str | None) -> str:
    """A setting's default as the docs show it."""
    if default is None:
        return "(required)"
    if default == "":
        return "(none)"
    return f"`{default}`"


def render_settings() -> str:
    """The settings table of docs/configuration.md."""
    lines = [
        "| Variable | TOML key | Default | Meaning | Expected format |",
        "|---|---|---|---|---|",
    ]
    for s in SETTINGS:
        lines.append(
            f"| `{s.env}` | `{s.key}` | {_cell(shown_default(s.default))} | "
            f"{_cell(s.help)} | {_cell(s.expects)} |"
        )
    return "\n".join(lines)


def command_paths(parser: argparse.ArgumentParser | None = None) -> list[list[str]]:
    """Every command path of the CLI, parents before children: [], [serve], [accounts, list]."""
    parser = parser or build_parser()
    paths: list[list[str]] = [[]]

    def walk(p: argparse.ArgumentParser, prefix: list[str]) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    paths.append([*prefix, name])
                    walk(child, [*prefix, name])

    walk(parser, [])
    return paths


@contextlib.contextmanager
def _columns(width: int) -> Iterator[None]:
    # argparse wraps help at the terminal width it reads from $COLUMNS.
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        yield
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def help_text(path: list[str]) -> str:
    """What `nbgateway {path} --help` prints."""
    out = io.StringIO()
    with _columns(HELP_WIDTH), contextlib.redirect_stdout(out):
        try:
            build_parser().parse_args([*path, "--help"])
        except SystemExit:
            pass
    return out.getvalue().rstrip() + "\n"


def render_cli() -> str:
    """The command reference of docs/cli.md."""
    parts: list[str] = []
    for path in command_paths():
        title = " ".join(["nbgateway", *path])
        level = "##" if len(path) <= 1 else "###"
        parts.append(f"{level} `{title}`\n\n```text\n$ {title} --help\n{help_text(path)}```")
    return "\n\n".join(parts)


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- BEGIN GENERATED: {name} -->", f"<!-- END GENERATED: {name} -->"


def replace_section(text: str, name: str, content: str) -> str:
    """`text` with the generated section `name` replaced by `content`."""
    begin, end = _markers(name)
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"markers for section {name!r} not found")
    return pattern.sub(lambda _m: f"{begin}\n{content}\n{end}", text, count=1)


SECTIONS: tuple[tuple[Path, str, Callable[[], str]], ...] = (
    (CONFIGURATION, "settings", render_settings),
    (CLI, "cli", render_cli),
)


def stale_files() -> list[Path]:
    """Docs whose generated sections differ from what the code produces now."""
    stale: list[Path] = []
    for path, name, render in SECTIONS:
        text = path.read_text()
        if replace_section(text, name, render()) != text:
            stale.append(path)
    return stale


def write_all() -> list[Path]:
    """Rewrite every generated section; return the files that changed."""
    changed: list[Path] = []
    for path, name, render in SECTIONS:
        text = path.read_text()
        new = replace_section(text, name, render())
        if new != text:
            path.write_text(new)
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for path in stale:
            sys.stdout.write(f"stale: {path.relative_to(ROOT)}\n")
        return 1 if stale else 0
    for path in write_all():
        sys.stdout.write(f"updated {path.relative_to(ROOT)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
