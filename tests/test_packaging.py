"""The release as users get it: the wheel in a fresh venv, its dependencies from
dist/wheelhouse alone, and the Debian package, checked by lintian, installed with dpkg,
run, and purged. Slow, and the second installs a package on this machine (as root, or
with sudo), so they run on request: `make package-test` (pytest -m packaging), which
fills the wheelhouse and installs Debian's tools first.
"""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import re
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import ADMIN_TOKEN, Upstream, pools, start_zdproxy, wait_healthy
from tests.test_rollout import load, rollout_config
from zdproxy.compiled import COMPILED_MODULES

pytestmark = pytest.mark.packaging

REPO = Path(__file__).resolve().parent.parent
WHEELHOUSE = REPO / "dist" / "wheelhouse"
SUDO = () if os.geteuid() == 0 else ("sudo", "--non-interactive")
# The compiled build's wheel, for this python (which the .deb's /usr/bin/python3 must match).
ABI = f"cp{sys.version_info.major}{sys.version_info.minor}"
PREFIX = Path("/usr/lib/zdproxy")
# What the package creates besides its files, and purge removes.
STATE_DIR = Path("/var/lib/zdproxy")
CONFIG_DIR = Path("/etc/zdproxy")

StartUpstream = Callable[..., Awaitable[Upstream]]


@dataclass
class Release:
    """What `make dist` puts in dist/, built from this tree in a directory of its own."""

    dist: Path
    wheel: Path
    version: str


def run(
    *args: str | Path, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """A command, blind to pip's configuration on this machine (an index, find-links,
    constraints) and to the ZDPROXY_* variables but those in `env`: what pip installs
    comes from the places the test names."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "ZDPROXY_"))}
    result = subprocess.run(
        [str(arg) for arg in args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**clean, "PIP_CONFIG_FILE": os.devnull, **(env or {})},
    )
    assert result.returncode == 0, (
        f"{args}: exit {result.returncode}\n{result.stdout}{result.stderr}"
    )
    return result


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    # --no-isolation: the build backend and mypy are the lock's, in this venv; no network.
    # The compiled build, as `make dist` makes it where there is a C compiler.
    assert any(WHEELHOUSE.glob("*.whl")), "no dist/wheelhouse: `make wheelhouse` fills it"
    dist = tmp_path_factory.mktemp("dist")
    build = (sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, REPO)
    run(*build, timeout=600, env={"ZDPROXY_COMPILE": "1"})
    for part in ("man", "completion"):  # as `make dist` makes them, for the .deb
        run(sys.executable, "-m", "zdproxy.manual", part, dist)
    (dist / "wheelhouse").symlink_to(WHEELHOUSE)
    (wheel,) = dist.glob(f"zdproxy-*-{ABI}-{ABI}-linux_*.whl")
    assert len(list(dist.glob("zdproxy-*.tar.gz"))) == 1
    return Release(dist, wheel, version=wheel.name.split("-")[1])


def check_version(zdproxy: Path, release: Release) -> None:
    """`zdproxy --version` names the release's version, the commit it was built from,
    and its compiled data plane."""
    printed = run(zdproxy, "--version").stdout.strip()
    version = re.escape(release.version)
    match = re.fullmatch(
        rf"zdproxy {version} \(commit ([0-9a-f]{{7,}}), compiled data plane\)", printed
    )
    assert match, printed
    head = run("git", "-C", REPO, "rev-parse", "HEAD").stdout.strip()
    assert head.startswith(match.group(1)), (head, printed)


# A script: the file each module named by its arguments is imported from, one a line.
IMPORTED_FROM = """
import importlib, sys
for name in sys.argv[1:]:
    print(importlib.import_module(name).__file__)
"""


def check_compiled(python: Path, prefix: Path) -> None:
    """Each module of the compiled build's list imports from its extension, in `prefix`."""
    files = run(python, "-I", "-c", IMPORTED_FROM, *COMPILED_MODULES).stdout.split()
    assert len(files) == len(COMPILED_MODULES), files
    for module, file in zip(COMPILED_MODULES, files, strict=True):
        assert file.endswith(".so") and Path(file).is_relative_to(prefix), (module, file)


async def serve_and_shift(
    zdproxy: Path, version: str, tmp_path: Path, upstream: StartUpstream, *, deploy: bool = False
) -> None:
    """A short real run of this zdproxy: a request through it reaches blue; its CLI
    takes green live (a judged rollout of short steps with `deploy`, else a shift of
    everyone); the next request reaches green."""
    blue, green = await upstream("blue"), await upstream("green")
    config = rollout_config(blue, green, tmp_path) if deploy else {}
    config["pools"] = pools([blue.address], [green.address])
    loop = asyncio.get_running_loop()
    proxy = await loop.run_in_executor(
        None, lambda: start_zdproxy(tmp_path, config, command=(str(zdproxy),))
    )
    try:
        assert any(f"zdproxy {version} listening on" in line for line in proxy.log_lines)
        await wait_healthy(proxy, "blue")
        await wait_healthy(proxy, "green")
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{proxy.url}/") as response:
                assert response.status == 200
                assert (await response.json())["name"] == "blue"
            cli = {"ZDPROXY_ADMIN_URL": proxy.admin_address, "ZDPROXY_ADMIN__TOKEN": ADMIN_TOKEN}
            # deploy --wait ends 0 once the rollout is done: steps of 1 s, judged on the
            # traffic of a few users (without any, the judge holds).
            command = ["shift", "100"]
            if deploy:
                command = ["deploy", "green", "--wait", "--timeout", "60s"]
            async with load(proxy.url):
                taken = await asyncio.create_subprocess_exec(
                    zdproxy, *command, env={**os.environ, **cli}, stdout=subprocess.DEVNULL
                )
                async with asyncio.timeout(90):
                    assert await taken.wait() == 0
            async with session.get(f"{proxy.url}/") as response:
                assert response.status == 200
                assert (await response.json())["name"] == "green"
    finally:
        assert proxy.stop() == 0, "".join(proxy.log_lines)


@pytest.mark.timeout(300)
async def test_wheel_runs_in_a_fresh_venv_with_the_wheelhouse_alone(
    release: Release, tmp_path: Path, upstream: StartUpstream
) -> None:
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    # --no-index: every dependency of the wheel must be in the wheelhouse.
    pip = (sys.executable, "-m", "pip", "--python", venv / "bin" / "python")
    run(*pip, "install", "--no-index", "--find-links", WHEELHOUSE, release.wheel, timeout=300)
    zdproxy = venv / "bin" / "zdproxy"
    # -I: not from the current directory (this checkout), as the zdproxy command.
    imported = run(venv / "bin" / "python", "-I", "-c", "import zdproxy; print(zdproxy.__file__)")
    assert Path(imported.stdout.strip()).is_relative_to(venv), imported.stdout

    check_version(zdproxy, release)
    check_compiled(venv / "bin" / "python", venv)
    checked = run(zdproxy, "check", "--config", REPO / "config" / "zdproxy.toml")
    assert checked.stdout.strip().endswith(": ok"), checked.stdout
    # A config for one app, written by the installed zdproxy, checks as written.
    written = tmp_path / "init" / "zdproxy.toml"
    written.parent.mkdir()
    run(zdproxy, "init", "--app", "127.0.0.1:9001", "--health", "/readyz", "--output", written)
    assert run(zdproxy, "check", "--config", written).stdout.strip().endswith(": ok")
    await serve_and_shift(zdproxy, release.version, tmp_path, upstream, deploy=True)


def files_naming(paths: list[Path], under: Path) -> list[str]:
    """The files under `under` that name one of `paths`."""
    grep = subprocess.run(
        ["grep", "-rlF", *(f"-e{path}" for path in paths), str(under)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert grep.returncode in (0, 1), grep.stderr  # 1: no file matched
    return grep.stdout.splitlines()


def installed(package: str) -> bool:
    query = subprocess.run(
        ["dpkg-query", "--show", "--showformat=${db:Status-Abbrev}", package],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return query.stdout.startswith("ii")


def package_leftovers() -> list[str]:
    """What of the package is on this machine: itself, its directories, its account."""
    found = [str(path) for path in (PREFIX, CONFIG_DIR, STATE_DIR) if path.exists()]
    if installed("zdproxy"):
        found.append("the package zdproxy")
    return found + [f"the {kind} zdproxy" for kind in account_kinds()]


def account_kinds() -> list[str]:
    """ "user" and "group", for those named zdproxy that exist."""
    kinds = []
    for lookup, kind in ((pwd.getpwnam, "user"), (grp.getgrnam, "group")):
        try:
            lookup("zdproxy")
        except KeyError:
            continue
        kinds.append(kind)
    return kinds


def build_and_lint(release: Release) -> Path:
    run(REPO / "packaging" / "build-deb", release.dist, timeout=600)
    (deb,) = release.dist.glob("zdproxy_*.deb")
    lintian = run("lintian", "--fail-on", "error,warning", deb, timeout=300)
    assert not re.search(r"^[EW]: ", lintian.stdout, re.MULTILINE), lintian.stdout
    return deb


def check_installation(release: Release) -> None:
    # The venv runs on the system's python3 and names no path of the build.
    assert (PREFIX / "bin" / "python3").resolve() == Path("/usr/bin/python3").resolve()
    venv_config = (PREFIX / "pyvenv.cfg").read_text()
    assert "home = /usr/bin\n" in venv_config
    assert venv_config.rstrip().endswith(f" -m venv {PREFIX}"), venv_config
    script = (PREFIX / "bin" / "zdproxy").read_text()
    assert script.startswith(f"#!{PREFIX}/bin/python3\n"), script
    assert not files_naming([REPO, release.dist], PREFIX)
    assert Path("/usr/bin/zdproxy").resolve() == PREFIX / "bin" / "zdproxy"
    assert any(PREFIX.glob("lib/python3*/site-packages/zdproxy/__pycache__/*.pyc"))

    account = pwd.getpwnam("zdproxy")
    assert (account.pw_dir, account.pw_shell) == (str(STATE_DIR), "/usr/sbin/nologin")
    state = STATE_DIR.stat()
    owner = (state.st_uid, state.st_gid, state.st_mode & 0o777)
    assert owner == (account.pw_uid, account.pw_gid, 0o750)
    conffiles = run("dpkg-query", "--show", "--showformat=${Conffiles}", "zdproxy").stdout
    assert f"{CONFIG_DIR}/zdproxy.toml " in conffiles

    units = [
        Path("/usr/lib/systemd/system") / unit
        for unit in ("zdproxy.service", "zdproxy.socket", "zdproxy-admin.socket")
    ]
    service = units[0].read_text()
    assert "ExecStart=/usr/bin/zdproxy run --config /etc/zdproxy/zdproxy.toml\n" in service
    run("systemd-analyze", "verify", "--man=no", *units, timeout=60)
    # Installed, not enabled (the config must name the pools first), so not started.
    assert not list(Path("/etc/systemd/system").glob("*.wants/zdproxy*"))

    # The man page and the completions made from the CLI's parser.
    assert "zdproxy deploy" in run("man", "-P", "cat", "zdproxy").stdout
    for completion in (
        "/usr/share/bash-completion/completions/zdproxy",
        "/usr/share/zsh/vendor-completions/_zdproxy",
    ):
        assert "rollout" in Path(completion).read_text()

    check_version(Path("/usr/bin/zdproxy"), release)
    check_compiled(PREFIX / "bin" / "python3", PREFIX)
    run("/usr/bin/zdproxy", "check", "--config", CONFIG_DIR / "zdproxy.toml")


def check_purged() -> None:
    assert not package_leftovers()
    # deb-systemd-helper's record of the units' enablement goes with the purge too.
    assert not list(Path("/var/lib/systemd/deb-systemd-helper-enabled").rglob("*zdproxy*"))


@pytest.mark.timeout(600)
async def test_debian_package_installs_runs_and_purges(
    release: Release, tmp_path: Path, upstream: StartUpstream
) -> None:
    # Purge removes the zdproxy account and /var/lib/zdproxy: the test would take those
    # of this machine for the package's and delete them.
    assert not package_leftovers(), f"not from this test, move them away: {package_leftovers()}"
    deb = build_and_lint(release)
    run(*SUDO, "dpkg", "--install", deb, timeout=300)
    try:
        check_installation(release)
        await serve_and_shift(Path("/usr/bin/zdproxy"), release.version, tmp_path, upstream)
    finally:
        run(*SUDO, "dpkg", "--purge", "zdproxy", timeout=300)
    check_purged()
