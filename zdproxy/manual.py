"""The man page and the bash and zsh completion of `zdproxy`, made from the command
line's own parser (zdproxy.cli.build_parser): they list what the command accepts, and
change with it.

    python -m zdproxy.manual man DIR          # DIR/man/zdproxy.1
    python -m zdproxy.manual completion DIR   # DIR/completion/bash/zdproxy, .../zsh/_zdproxy

`make man completion` runs both into dist/ (MANUAL_DIR). The files are named as they are
installed: /usr/share/man/man1/zdproxy.1, /usr/share/bash-completion/completions/zdproxy,
/usr/share/zsh/vendor-completions/_zdproxy. shtab writes the completion and
argparse-manpage the man page (both from the test extra, not runtime dependencies:
zdproxy itself never imports this module).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import shtab
from argparse_manpage.manpage import Manpage  # type: ignore[import-untyped]

from zdproxy import __version__
from zdproxy.cli import build_parser
from zdproxy.cli.common import ENVIRONMENT, EXIT_CODES
from zdproxy.config.settings import Settings

SHELLS = {"bash": Path("bash/zdproxy"), "zsh": Path("zsh/_zdproxy")}


def subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[tuple[str, ...], list[str]]]:
    """(path, names) for every level of subcommands: ((), ["run", "check", ...]),
    (("pool",), ["show", "set"]), ..."""

    def walk(
        parser: argparse.ArgumentParser, path: tuple[str, ...]
    ) -> Iterator[tuple[tuple[str, ...], list[str]]]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                yield path, list(action.choices)
                for name, child in action.choices.items():
                    yield from walk(child, (*path, name))

    return walk(parser, ())


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def completion(shell: str) -> str:
    """The completion script for `shell` (bash or zsh); options that name a file
    (--config, a FILE argument) complete file names."""
    parser = build_parser()
    for each in _parsers(parser):
        for action in each._actions:
            if action.dest == "config" or action.metavar == "FILE":
                action.complete = shtab.FILE  # type: ignore[attr-defined]
    return shtab.complete(parser, shell=shell)


def _preformatted(help_text: str) -> str:
    """A block of the CLI's help ("exit codes:" and its lines) as roff, kept as laid out
    and without its heading (the man page's section has one)."""
    body = help_text.split("\n", 1)[1]
    # \& first: a line that starts with "." or "'" is text, not a roff request.
    lines = ("\\&" + line.replace("\\", "\\e").replace("-", "\\-") for line in body.splitlines())
    return ".nf\n" + "\n".join(lines) + "\n.fi"


def man_page() -> str:
    """The roff source of zdproxy(1): every command with its options, then the exit
    status, the environment, the files and where to read on."""
    parser = build_parser()
    page = Manpage(parser)
    page.source = f"zdproxy {__version__}"
    page.manual = "zdproxy manual"
    summary = (parser.description or "").rstrip(".")  # the NAME line: "zdproxy - ..."
    page.description = summary[:1].lower() + summary[1:]
    prefix = Settings.model_config.get("env_prefix", "")
    delimiter = Settings.model_config.get("env_nested_delimiter", "")
    sections = {
        "exit status": _preformatted(EXIT_CODES),
        "environment": _preformatted(
            f"{ENVIRONMENT}\n  {prefix}SECTION{delimiter}OPTION  any option of the config file, "
            f"e.g. {prefix}PROXY{delimiter}LISTEN\n{'':24}for proxy.listen; the environment "
            "wins over the file"
        ),
        "files": (
            ".TP\n\\fI/etc/zdproxy/zdproxy.toml\\fR\n"
            "The config file (\\fBzdproxy check\\fR validates it).\n"
            ".TP\n\\fI/var/lib/zdproxy\\fR\n"
            "The state directory (\\fBstate.dir\\fR): the state journal and the event log."
        ),
        "see also": (
            "\\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1), \\fBsystemd.socket\\fR(5); "
            "docs/operations.md, docs/admin.md and docs/rollouts.md in zdproxy's source."
        ),
    }
    for heading, content in sections.items():
        page.add_section(heading, ">", content)
    return str(page)


def write(kind: str, out: Path) -> list[Path]:
    """Write the man page or the completion scripts under `out`; the paths written."""
    if kind == "man":
        files = {out / "man" / "zdproxy.1": man_page()}
    else:
        files = {out / "completion" / path: completion(shell) for shell, path in SHELLS.items()}
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zdproxy.manual", description=__doc__)
    parser.add_argument("kind", choices=["man", "completion"])
    parser.add_argument("out", type=Path, help="the directory to write into")
    args = parser.parse_args(argv)
    for path in write(args.kind, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
