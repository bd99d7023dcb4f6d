"""The README's commands, run as a reader copies them; and docs whose links stay inside
the repository.

README.md: every command of its ```sh, ```bash and ```console blocks is run here, or
listed in NOT_RUN with the reason it cannot be. A command that is neither fails the
test, and so does an entry of NOT_RUN, EXPECT or PLACEHOLDERS that the README no longer
has. The commands of "The demo" run against a real `zdproxy demo`, restarted (with
Ctrl-C, which must end it with 0) where the README says to restart it; the others
against a real `zdproxy run`, started by the README's own `zdproxy run` lines. A
command passes when it exits 0 and prints what EXPECT says; a `zdproxy run` when it
serves and its upstreams are healthy (`zdproxy wait`), and it stops with 0 on SIGTERM;
a command that follows (`events -f`) when it prints and ends with 130 on Ctrl-C.

What the test changes in a command is PLACEHOLDERS, and only that: the demo's fixed
ports become free ones, /etc/zdproxy/zdproxy.toml is the shipped config/zdproxy.toml
with this machine's addresses, and https://app.example.com/ is that zdproxy. `pidof`
is narrowed to the process group the test started: other zdproxy processes on this
machine are not the test's to signal.

Every Markdown file: each relative link resolves to a file of the repository and its
#anchor to a heading there (GitHub's slugs), and each file it names by path is in the
repository; every `zdproxy` command of the docs parses with the CLI's own parser.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import shlex
import signal
import tomllib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from tests.conftest import Upstream, free_port, to_toml
from tests.markdown import (
    ROOT,
    Command,
    commands_of,
    link_problems,
    markdown_files,
    named_file_problem,
    named_files,
    slug,
)
from tests.reader import Shell, stop
from tests.test_demo import LAST_LINE, app_url, read_until
from zdproxy.cli import build_parser

README = ROOT / "README.md"
DEMO_SECTION = "The demo"  # its commands run against `zdproxy demo`; the others, `zdproxy run`
RESTART = "restart the demo"  # where the README says so, the demo is restarted

NOT_RUN = {
    "make demo": "sets up .venv, then runs `zdproxy demo` in the foreground until Ctrl-C; "
    "this test runs that `zdproxy demo` itself",
    "make test": "the whole suite, this test included",
}

# What the test puts in a command in place of a value that is the reader's own.
PLACEHOLDERS = {
    "127.0.0.1:8080": "the demo's proxy address, on a free port here",
    "http://127.0.0.1:PORT": "green's address, from the running demo's banner",
    "/tmp/zd.jar": "a cookie jar in the test's own directory",
    "/etc/zdproxy/zdproxy.toml": "config/zdproxy.toml with this machine's addresses",
    "--config ...": "the same file",
    "https://app.example.com/": "that zdproxy: no request leaves loopback",
}

# A command's output must contain this (for `zdproxy run`: its `zdproxy status`).
EXPECT = {
    "curl -s http://127.0.0.1:8080/": '{"color": "blue", "version": "v1"',
    'zdproxy wait --until drained:blue --timeout 30s --config .demo/zdproxy.toml && echo "safe '
    'to stop blue"': "safe to stop blue",
    'zdproxy wait --until done --config .demo/zdproxy.toml && echo "green is live, blue '
    'drained"': "green is live, blue drained",
    'zdproxy wait --until done --config .demo/zdproxy.toml; echo "exit $?"': "exit 5",
    "zdproxy rollout show --config .demo/zdproxy.toml": "rolled_back",
    "ZDPROXY_SPLIT__CANDIDATE_WEIGHT=500 zdproxy run --config zdproxy.toml": "candidate green "
    "at 5%",
    'curl -H "X-Zd-Color: $(zdproxy preview-token green --ttl 1h -c /etc/zdproxy/zdproxy.toml)" '
    "https://app.example.com/": '"name": "green"',
    "zdproxy --version": "zdproxy ",
}

# The running `zdproxy run` must log this after the command.
EXPECT_LOGGED = {'kill -HUP "$(pidof -s zdproxy)"': "reload_applied"}

RUNS_DAEMON = re.compile(r"\bzdproxy run\b")
FOLLOWS = re.compile(r"\s(-f|--follow|--watch)\b")

START_WITHIN = 20.0  # seconds for a zdproxy to serve, or a command to show it does


async def check(shell: Shell, command: Command, text: str) -> None:
    """Run a command that ends by itself, or follows until Ctrl-C, and judge it."""
    if FOLLOWS.search(command.text):
        outcome = await shell.follow(text)
        good = outcome.code == 130 and outcome.out and "Traceback" not in outcome.err
    else:
        outcome = await shell.run(text)
        good = outcome.code == 0 and EXPECT.get(command.text, "") in outcome.out
    assert good, f"{command.where()}\nran: {text}\n{outcome.explain()}"


def substitute(text: str, values: dict[str, str]) -> str:
    for placeholder, value in values.items():
        assert placeholder in PLACEHOLDERS, placeholder
        text = text.replace(placeholder, value)
    return text


class DemoSession:
    """`zdproxy demo` on free ports in the reader's home, as `make demo` starts it."""

    def __init__(self, shell: Shell) -> None:
        self.shell = shell
        self.port, self.admin_port = free_port(), free_port()
        self.process: asyncio.subprocess.Process | None = None
        self.banner = ""
        self.starts = 0

    async def run(self, command: Command) -> None:
        if self.process is None or RESTART in command.before:
            await self.restart()
        values = {
            "127.0.0.1:8080": f"127.0.0.1:{self.port}",
            "http://127.0.0.1:PORT": app_url(self.banner, "green"),
            "/tmp/zd.jar": str(self.shell.home / "zd.jar"),
        }
        await check(self.shell, command, substitute(command.text, values))

    async def restart(self) -> None:
        await self.close()
        log = self.shell.home / f"demo-{self.starts}.log"
        self.starts += 1
        with log.open("w") as stderr:
            self.process = await self.shell.start(
                f"zdproxy demo --port {self.port} --admin-port {self.admin_port}",
                asyncio.subprocess.PIPE,
                stderr,
            )
        assert self.process.stdout is not None
        try:
            self.banner = "".join(await read_until(self.process.stdout, LAST_LINE, START_WITHIN))
        except AssertionError:
            raise AssertionError(log.read_text()) from None

    async def close(self, *, clean: bool = True) -> None:
        """Ctrl-C, as the README stops it: the apps and the proxy stop, exit 0 (if `clean`)."""
        if self.process is not None:
            process, self.process = self.process, None
            code = await stop(process, signal.SIGINT)
            assert code == 0 or not clean, f"the demo ended with {code} on Ctrl-C"


class SiteSession:
    """A server as the README's `zdproxy run` commands run it: the shipped example
    config, with this machine's addresses, at zdproxy.toml in the reader's home."""

    def __init__(self, shell: Shell, upstreams: dict[str, Upstream]) -> None:
        self.shell = shell
        self.upstreams = upstreams
        self.config = shell.home / "zdproxy.toml"
        self.proxy = ""  # its address: ports are taken when the first command needs them
        self.daemon: asyncio.subprocess.Process | None = None
        self.log = shell.home / "zdproxy-0.log"
        self.starts = 0

    def write_config(self) -> None:
        home = self.shell.home
        settings = tomllib.loads((ROOT / "config" / "zdproxy.toml").read_text())
        (home / "admin.token").write_text("readme-test-admin-token-0123456789\n")
        (home / "preview.secret").write_text("readme-test-preview-secret-0123456789\n")
        self.proxy = f"127.0.0.1:{free_port()}"
        settings["proxy"]["listen"] = self.proxy
        settings["admin"].update(listen=f"127.0.0.1:{free_port()}", token_file="admin.token")
        settings["preview"]["secret_file"] = "preview.secret"
        settings["state"]["dir"] = str(home / "state")
        for color, upstream in self.upstreams.items():
            settings["pools"][color]["upstreams"] = [upstream.address]
        self.config.write_text(to_toml(settings))

    @property
    def values(self) -> dict[str, str]:
        config = str(self.config)
        return {
            "/etc/zdproxy/zdproxy.toml": config,
            "--config ...": f"--config {config}",
            "https://app.example.com/": f"http://{self.proxy}/",
        }

    async def run(self, command: Command) -> None:
        if not self.proxy:
            self.write_config()
        text = substitute(command.text, self.values)
        if RUNS_DAEMON.search(command.text):
            await self.start(command, text)
            return
        logged = EXPECT_LOGGED.get(command.text)
        before = self.log.read_text().count(logged) if logged else 0
        await check(self.shell, command, text)
        if logged:
            await until(lambda: self.log.read_text().count(logged) > before, command)

    async def start(self, command: Command, text: str) -> None:
        """The README's `zdproxy run`, in the background (the reader's other terminal),
        in place of the one running before."""
        await self.close()
        self.log = self.shell.home / f"zdproxy-{self.starts}.log"
        self.starts += 1
        with self.log.open("w") as log:
            self.daemon = daemon = await self.shell.start(text, log, log)
        self.shell.pidof_group = daemon.pid  # its own process group
        await until(lambda: "listening on" in self.log.read_text() or daemon.returncode is not None)
        assert daemon.returncode is None, f"{command.where()}\n{self.log.read_text()}"
        config = f"--config {self.config}"
        ready = await self.shell.run(
            f"zdproxy wait --until healthy:blue --until healthy:green --timeout 20s {config}"
        )
        assert ready.code == 0, f"{command.where()}\n{ready.explain()}"
        status = await self.shell.run(f"zdproxy status {config}")
        good = status.code == 0 and EXPECT.get(command.text, "") in status.out
        assert good, f"{command.where()}\nzdproxy status:\n{status.explain()}"

    async def close(self, *, clean: bool = True) -> None:
        """SIGTERM, as the README stops it: a graceful stop, exit 0 (if `clean`)."""
        if self.daemon is not None:
            daemon, self.daemon, self.shell.pidof_group = self.daemon, None, None
            code = await stop(daemon, signal.SIGTERM)
            assert code == 0 or not clean, (
                f"zdproxy run ended with {code} on SIGTERM:\n{self.log.read_text()}"
            )


async def until(condition: Callable[[], bool], command: Command | None = None) -> None:
    try:
        async with asyncio.timeout(START_WITHIN):
            while not condition():  # noqa: ASYNC110 - a file or a process, polled
                await asyncio.sleep(0.05)
    except TimeoutError:
        where = command.where() if command is not None else "zdproxy"
        raise AssertionError(f"{where}: not within {START_WITHIN} s") from None


def test_each_readme_command_is_run_or_listed_and_every_entry_is_in_the_readme() -> None:
    commands = commands_of(README)
    assert len(commands) > 20, "the README's shell blocks were not found"
    texts = {command.text for command in commands}
    stale = (NOT_RUN.keys() | EXPECT.keys() | EXPECT_LOGGED.keys()) - texts
    stale |= {p for p in PLACEHOLDERS if not any(p in text for text in texts)}
    assert not stale, f"entries for what the README no longer has: {sorted(stale)}"


async def test_the_readme_commands_work(
    tmp_path: Path, upstream: Callable[..., Awaitable[Upstream]]
) -> None:
    ready = {"status": 200, "db": "ok", "queue": "ok"}  # what config/zdproxy.toml checks
    upstreams = {color: await upstream(color, readiness=ready) for color in ("blue", "green")}
    home = tmp_path / "home"
    home.mkdir()
    shell = Shell(home, tmp_path)
    demo, site = DemoSession(shell), SiteSession(shell, upstreams)
    current: DemoSession | SiteSession = demo
    try:
        for command in commands_of(README):
            if command.text in NOT_RUN:
                continue
            session = demo if command.section == DEMO_SECTION else site
            if session is not current:
                await current.close()  # the reader is done with it
                current = session
            await session.run(command)
    except BaseException:
        await demo.close(clean=False)
        await site.close(clean=False)
        raise
    await demo.close()
    await site.close()


# -- the docs' links and paths -----------------------------------------------------------

# Files the docs name that exist only where zdproxy runs, not in the repository.
NOT_IN_REPOSITORY = {
    ".demo/zdproxy.toml": "written by `zdproxy demo`",
    "benchmarks/results/latest.json": "written by benchmarks/run.py",
    "state.dir/state.json": "the journal, in the state directory",
    "releases/42/zdproxy.toml": "an operator's release directory, as an example",
}


def test_every_link_of_the_docs_stays_in_the_repository_and_finds_its_heading() -> None:
    files = markdown_files()
    assert {ROOT / "README.md", ROOT / "docs" / "design.md"} <= set(files)
    problems = [problem for path in files for problem in link_problems(path)]
    assert not problems, "\n".join(problems)


def test_every_file_the_docs_and_config_name_is_in_the_repository() -> None:
    texts = [*markdown_files(), *sorted((ROOT / "config").glob("*.toml"))]
    named = {path: named_files(path) for path in texts}
    problems = [
        problem
        for path, names in named.items()
        for name in sorted(names - NOT_IN_REPOSITORY.keys())
        if (problem := named_file_problem(path, name)) is not None
    ]
    assert not problems, "\n".join(problems)
    stale = NOT_IN_REPOSITORY.keys() - set().union(*named.values())
    assert not stale, f"NOT_IN_REPOSITORY names what no doc names: {sorted(stale)}"


def test_the_anchors_follow_githubs_slugs() -> None:
    assert slug("State journal: what survives a restart") == "state-journal-what-survives-a-restart"
    assert slug("Out of file descriptors, and other local errors") == (
        "out-of-file-descriptors-and-other-local-errors"
    )
    assert slug("`zdproxy_info` and [the judge](docs/rollouts.md)") == "zdproxy_info-and-the-judge"


# -- the docs' zdproxy commands ----------------------------------------------------------

# Values for the shell variables the docs' commands use.
SHELL_VALUES = {"$next": "green", "$BUILD": "v42"}
SHELL_SPLIT = re.compile(r"&&|\|\||[;|]|\$\(|\)")
INVOCATION = re.compile(r"^(?:sudo\s+)?(?:\w+=\S*\s+)*zdproxy\s+(.*)$")


def zdproxy_invocations(command: str) -> Iterator[list[str]]:
    """The arguments of each `zdproxy` a shell command runs, in a $(...) too."""
    for piece in SHELL_SPLIT.split(command):
        if found := INVOCATION.match(piece.strip()):
            yield [SHELL_VALUES.get(word, word) for word in shlex.split(found.group(1))]


def test_every_zdproxy_command_of_the_docs_parses() -> None:
    problems = []
    for path in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for command in commands_of(path):
            for arguments in zdproxy_invocations(command.text):
                assert not any(word.startswith("$") for word in arguments), command.where()
                if (error := parse_error(arguments)) is not None:
                    problems.append(f"{command.where()}\n{error}")
    assert not problems, "\n".join(problems)


def parse_error(arguments: list[str]) -> str | None:
    """What the CLI's parser says about these arguments, if it refuses them."""
    said = io.StringIO()
    with contextlib.redirect_stderr(said), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args(arguments)
        except SystemExit as exc:  # --version and --help exit 0
            return said.getvalue() if exc.code else None
    return None
