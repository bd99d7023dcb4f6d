"""Markdown as a reader meets it: the shell commands of its fenced blocks, its links and
their anchors, and the files it names by path. tests/test_readme.py runs and checks them.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SHELL_BLOCKS = {"sh", "bash", "shell", "console"}
FENCE = re.compile(r"^(```+|~~~+)\s*([\w-]*)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)[\s#]*$")
TRAILING_COMMENT = re.compile(r"\s+#\s.*$")

FENCED = re.compile(r"^(```+|~~~+).*?^\1\s*$", re.MULTILINE | re.DOTALL)
CODE = re.compile(rf"{FENCED.pattern}|(`+)(?:.+?)\2", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|^\s*\[[^\]]+\]:\s*(\S+)", re.M)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # https:, mailto:
# A file named by path: a Markdown file, or a source, config or unit file with its folder.
NAMED_FILE = re.compile(
    r"(?<![\w/.:~$-])((?:[\w.-]+/)*[\w.@-]+\.md"
    r"|(?:[\w.-]+/)+[\w.@-]+\.(?:py|toml|json|ya?ml|service|socket|lock))\b"
)
SKIPPED_DIRS = {"dist", "build", "node_modules"}  # build output, not the repository's


@dataclass(frozen=True)
class Command:
    """One shell command of a fenced block (```sh, ```bash, ```shell; a ```console
    block's `$ ` lines)."""

    text: str  # as written, without its trailing comment; a continued one joined
    source: str  # the file's name
    line: int
    section: str  # the heading it is under
    before: str  # the prose and comment lines since the previous command

    def where(self) -> str:
        return f"{self.source}:{self.line}: {self.text}"


def commands_of(path: Path) -> list[Command]:
    commands: list[Command] = []
    fence, language, section, before = "", "", "", ""
    pending: Command | None = None  # a line that ends in a backslash, and its start
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not fence:
            if found := FENCE.match(line):
                fence, language = found.groups()
            elif found := HEADING.match(line):
                section, before = found.group(1), ""
            else:
                before += line + "\n"
            continue
        if line.startswith(fence):
            fence = ""
            continue
        if language not in SHELL_BLOCKS:
            continue
        if language == "console" and pending is None:
            if not line.startswith("$ "):
                continue  # output
            line = line[2:]
        if pending is None and (line.lstrip().startswith("#") or not line.strip()):
            before += line + "\n"
            continue
        text = TRAILING_COMMENT.sub("", line).strip()
        if pending is not None:
            text = pending.text + " " + text
        command = Command(text, path.name, pending.line if pending else number, section, before)
        if text.endswith("\\"):
            pending = Command(text[:-1].rstrip(), path.name, command.line, section, before)
            continue
        commands.append(command)
        pending, before = None, ""
    return commands


def markdown_files() -> list[Path]:
    """Every Markdown file of the repository: not those of the venv, the tools' caches or
    build output."""
    found: list[Path] = []
    for directory, subdirectories, files in os.walk(ROOT):
        subdirectories[:] = [
            d
            for d in subdirectories
            if not d.startswith(".") and d not in SKIPPED_DIRS and not d.endswith(".egg-info")
        ]
        found += [Path(directory, name) for name in files if name.endswith(".md")]
    return sorted(found)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text lowercased, punctuation but '-' and '_'
    dropped, spaces made '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings; a repeated one gets -1, -2, ..."""
    seen: Counter[str] = Counter()
    found = set()
    for line in CODE.sub("", path.read_text()).splitlines():
        if heading := HEADING.match(line):
            base = slug(heading.group(1))
            found.add(f"{base}-{seen[base]}" if seen[base] else base)
            seen[base] += 1
    return found


def in_repository(path: Path) -> bool:
    return path.resolve().is_relative_to(ROOT) and path.exists()


def link_problems(path: Path) -> Iterator[str]:
    """Each relative link must lead to a file of the repository without leaving the
    document's folder (a doc is read from its folder too: a package's docs), and its
    #anchor to a heading of that file."""
    where = path.relative_to(ROOT)
    for found in LINK.finditer(CODE.sub("", path.read_text())):
        target = found.group(1) or found.group(2)
        if EXTERNAL.match(target):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file) if file else path
        if "../" in file:
            yield f"{where}: link {target!r} leaves the document's folder"
        elif not in_repository(linked):
            yield f"{where}: link {target!r}: no such file in the repository"
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            yield f"{where}: link {target!r}: no heading with that anchor in {file or where}"


def named_files(path: Path) -> set[str]:
    """The files a text names by path outside its fenced blocks and its URLs
    (`docs/admin.md`, zdproxy/ops/daemon.py, control/ports.py)."""
    text = re.sub(r"\bhttps?://\S+", "", FENCED.sub("", path.read_text()))
    return set(NAMED_FILE.findall(text))


def named_file_problem(path: Path, name: str) -> str | None:
    """A named file must be in the repository, relative to the text, to the repository's
    root or to the package, and not outside the text's folder."""
    where = path.relative_to(ROOT)
    if "../" in name:
        return f"{where}: names {name!r}, outside the document's folder"
    if not any(in_repository(base / name) for base in (path.parent, ROOT, ROOT / "zdproxy")):
        return f"{where}: names {name!r}, which is not in the repository"
    return None
