"""What operators expect of a daemon, checked with the real tools: JSON logs, /metrics
that match docs/admin.md (types and labels), process metrics, HEAD, the contrib/
dashboard and alerting rules against a running zdproxy's metrics, bash and zsh
completion and a man page made from the live parser, and the templated systemd units.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families as text_families

from tests.conftest import (
    Upstream,
    ZdProxy,
    admin_api,
    pools,
)
from tests.etcd_cluster import EtcdCluster
from tests.test_rollout import load
from tests.test_rollout_watch import judged, one_step
from tests.test_systemd import verify_units
from zdproxy import __commit__, __version__
from zdproxy.cli import build_parser
from zdproxy.compiled import build
from zdproxy.logs import JsonFormatter, LogfmtFormatter, reconfigure_logging
from zdproxy.manual import subcommands

REPO = Path(__file__).resolve().parent.parent
StartProxy = Callable[..., ZdProxy]
StartUpstream = Callable[..., Awaitable[Upstream]]

OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
# Labels Prometheus itself adds to every scraped series, and a histogram's bucket bound.
TARGET_LABELS = {"job", "instance"}
# Characters the log formats never write raw (zdproxy/logs.py), and lone surrogates.
RAW = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def tool(name: str) -> str:
    found = shutil.which(name)
    assert found, f"{name} is missing: `make tools` installs it (see the Makefile)"
    return found


# -- logs -------------------------------------------------------------------------------


def record(message: str = "msg", **fields: Any) -> logging.LogRecord:
    entry = logging.LogRecord("zdproxy.test", logging.INFO, __file__, 1, message, None, None)
    entry.fields = fields
    return entry


def test_json_lines_carry_the_same_fields_as_logfmt_in_order_with_their_types() -> None:
    entry = record("split_changed: live blue", event=42, actor="cli", share=0.25, hold=None)
    line = JsonFormatter(journald=False).format(entry)
    fields = json.loads(line)
    assert list(fields) == ["ts", "level", "logger", "msg", "event", "actor", "share", "hold"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", fields["ts"])  # RFC 3339
    assert fields["level"] == "info" and fields["logger"] == "zdproxy.test"
    assert (fields["event"], fields["share"], fields["hold"]) == (42, 0.25, None)
    logfmt = LogfmtFormatter(journald=False).format(entry)
    assert [pair.split("=")[0] for pair in logfmt.split(" ")[:4]] == list(fields)[:4]
    # JSON has no inf or nan: they are written as text, and the line stays JSON.
    assert (
        json.loads(JsonFormatter(journald=False).format(record(rate=float("inf"))))["rate"] == "inf"
    )


def test_json_under_journald_has_the_priority_prefix_and_keeps_ts() -> None:
    entry = record()
    entry.levelno, entry.levelname = logging.WARNING, "WARNING"
    line = JsonFormatter(journald=True).format(entry)
    assert line.startswith("<4>{")
    assert "ts" in json.loads(line[3:])
    assert not LogfmtFormatter(journald=True).format(entry)[3:].startswith("ts=")


def test_a_traceback_is_the_error_field() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        entry = logging.LogRecord(
            "zdproxy", logging.ERROR, __file__, 1, "failed", None, sys.exc_info()
        )
    fields = json.loads(JsonFormatter(journald=False).format(entry))
    assert "ValueError: boom" in fields["error"] and fields["error"].startswith("Traceback")


@pytest.mark.parametrize(
    "text",
    [
        "line\nbreak\r\ttab",
        "esc\x1b[31mred\x00",
        "del\x7f c1\x85",
        "admin\u202egnp.exe",
        "isolate\u2066x\u2069 mark\u200e\u200f\u061c",
        "undecodable \udcff byte",
        'quote " and \\ backslash',
        "café ünïcode stays readable",
    ],
)
def test_json_never_carries_control_bidi_or_surrogate_characters_raw(text: str) -> None:
    """As for logfmt (test_operations.py): a value from a client or a config file cannot
    reach a terminal or a log viewer as a control character; the JSON still reads back
    as the very text logged."""
    line = JsonFormatter(journald=False).format(record(text, value=text))
    assert RAW.search(line) is None, line
    line.encode("utf-8")  # strict: every line is valid UTF-8
    fields = json.loads(line)
    assert fields["msg"] == fields["value"] == text
    if text.startswith("café"):
        assert "café" in line  # escaped only where needed, not every non-ASCII letter


def test_a_reload_swaps_the_format_of_zdproxys_handler_only() -> None:
    root = logging.getLogger()
    ours, theirs = logging.StreamHandler(), logging.StreamHandler()
    ours.setFormatter(LogfmtFormatter(journald=True))
    foreign = logging.Formatter("%(message)s")
    theirs.setFormatter(foreign)
    level = root.level
    root.addHandler(ours)
    root.addHandler(theirs)
    try:
        reconfigure_logging("warning", "json")
        assert isinstance(ours.formatter, JsonFormatter) and ours.formatter.journald
        assert theirs.formatter is foreign
        assert root.level == logging.WARNING
    finally:
        root.removeHandler(ours)
        root.removeHandler(theirs)
        root.setLevel(level)


async def test_log_format_json_from_the_config_and_back_to_logfmt_on_reload(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    config = {"pools": pools([blue.address]), "log": {"level": "debug", "format": "json"}}
    proxy = zdproxy(config)
    lines = list(proxy.log_lines)
    assert lines
    for line in lines:
        assert list(json.loads(line))[:4] == ["ts", "level", "logger", "msg"], line
    started = next(json.loads(line) for line in lines if '"msg":"started:' in line)
    assert started["actor"] == "auto" and isinstance(started["event"], int)

    mark = len(proxy.log_lines)
    assert await proxy.reload({**config, "log": {"level": "debug", "format": "logfmt"}})
    [applied] = [line for line in proxy.log_lines[mark:] if "reload_applied" in line]
    assert applied.startswith("ts=") and "msg=" in applied


# -- metrics ----------------------------------------------------------------------------


Exposed = dict[str, tuple[str, frozenset[str]]]  # metric name -> (type, label names)


def exposed(families: Iterator[Any]) -> tuple[Exposed, dict[str, list[dict[str, str]]]]:
    """Each metric as docs/admin.md names it (a counter with _total, the info metric
    with _info) with its type and labels, and the labels of each of its samples."""
    metrics: Exposed = {}
    samples: dict[str, list[dict[str, str]]] = {}
    for family in families:
        suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
        name = family.name + suffix
        labels = {label for sample in family.samples for label in sample.labels} - {"le"}
        metrics[name] = (family.type, frozenset(labels))
        samples[name] = [sample.labels for sample in family.samples]
    return metrics, samples


def documented() -> Exposed:
    """The metric table of docs/admin.md's Metrics section."""
    text = (REPO / "docs" / "admin.md").read_text()
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    table: Exposed = {}
    for row in re.findall(r"^\| `(zdproxy_\w+)` \|([^|]*)\|([^|]*)\|", section, re.MULTILINE):
        name, kind, labels = (cell.strip() for cell in row)
        assert name not in table, f"{name} is in the table twice"
        table[name] = (kind, frozenset(label.strip() for label in labels.split(",") if label))
    assert len(table) > 20, section
    return table


async def scrape(proxy: ZdProxy, accept: str = "") -> tuple[str, str]:
    headers = {"Accept": accept} if accept else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{proxy.admin_url}/metrics", headers=headers) as response,
    ):
        assert response.status == 200
        return response.headers["Content-Type"], await response.text()


async def busy_proxy(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path, etcd: EtcdCluster
) -> ZdProxy:
    """A zdproxy with a sample in every metric family: traffic, a pinned request, an
    upstream that stays silent past upstream.timeout (a failure), a rollout the judge
    has numbers for (the caller runs it, under `load`), two data-plane workers, and
    fleet mode (the one member of a fleet on `etcd`, which leads it)."""
    blue, green = await upstream("blue"), await upstream("green")
    config = one_step(blue, green, tmp_path)
    config["proxy"] = {**config.get("proxy", {}), "workers": 2}
    config["fleet"] = {"endpoints": etcd.client_urls, "name": "only"}
    config["pins"] = [{"name": "beta", "header": "X-Beta", "values": ["1"], "to": "blue"}]
    config["upstream"] = {"timeout": "300ms"}
    proxy = zdproxy(config)
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/", headers={"X-Beta": "1"}) as response:
            assert response.status == 200
        async with session.get(proxy.url + "/slow/2000") as response:
            assert response.status == 504

    async def failures() -> bool:  # and leadership: the rollout then runs here
        _, text = await scrape(proxy)
        return "zdproxy_upstream_failures_total{" in text and "zdproxy_fleet_leader 1" in text

    async with asyncio.timeout(10):
        while not await failures():  # noqa: ASYNC110 - polls /metrics (a 100 ms tick)
            await asyncio.sleep(0.05)
    return proxy


def promql_names(expr: str) -> list[tuple[str, dict[str, str]]]:
    """Each metric an expression reads, with its equality matchers (label="value")."""
    found = []
    for match in re.finditer(r"\b((?:zdproxy|process|python)_\w+|up)\b(\{[^}]*\})?", expr):
        matchers = dict(re.findall(r'(\w+)\s*=\s*"([^"]*)"', match.group(2) or ""))
        labels = set(re.findall(r"(\w+)\s*(?:=~|!=|!~|=)", match.group(2) or ""))
        found.append((match.group(1), {**dict.fromkeys(labels, ""), **matchers}))
    return found


def contrib_expressions() -> dict[str, str]:
    """Every PromQL expression of contrib/, by where it is."""
    exprs: dict[str, str] = {}
    rules = yaml.safe_load((REPO / "contrib" / "prometheus" / "zdproxy-alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert {"alert", "expr", "labels", "annotations"} <= rule.keys(), rule
            assert rule["labels"]["severity"] in ("warning", "critical"), rule
            exprs[f"alert {rule['alert']}"] = rule["expr"]

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "definition") and isinstance(value, str):
                    exprs[f"{where}.{key}"] = value
                else:
                    walk(value, f"{where}.{node.get('title', key)}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")

    dashboard = json.loads((REPO / "contrib" / "grafana" / "zdproxy.json").read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    walk(dashboard, "dashboard")
    return exprs


def sample_names(text: str) -> set[str]:
    return {sample.name for family in text_families(text) for sample in family.samples}


async def test_metrics_are_the_documented_ones_and_contrib_reads_only_real_ones(
    etcd_node: EtcdCluster, zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    proxy = await busy_proxy(zdproxy, upstream, tmp_path, etcd_node)
    async with load(proxy.url):
        await admin_api(proxy, "POST", "/v1/rollouts", {"color": "green"})
        await judged(proxy)
        om_type, om_text = await scrape(proxy, OPENMETRICS)
        text_type, text = await scrape(proxy)
    assert om_type.startswith("application/openmetrics-text; version=1.0.0")
    assert text_type.startswith("text/plain; version=0.0.4")

    # docs/admin.md's table is what a scrape shows: names, types (OpenMetrics: info is
    # info; the classic format has no info type and says gauge) and labels.
    table = documented()
    metrics, samples = exposed(openmetrics_families(om_text))
    ours = {name: found for name, found in metrics.items() if name.startswith("zdproxy_")}
    assert ours.keys() == table.keys(), (
        f"undocumented: {sorted(ours.keys() - table.keys())}; "
        f"documented, not exposed: {sorted(table.keys() - ours.keys())}"
    )
    for name, (kind, labels) in table.items():
        assert samples[name], f"{name}: the scenario must give it a sample, to read its labels"
        assert ours[name] == (kind, labels), f"{name}: docs say {kind} {set(labels)}"
    classic, _ = exposed(text_families(text))
    for name, (kind, labels) in table.items():
        assert classic[name] == ("gauge" if kind == "info" else kind, labels), name

    info = {"version": __version__, "commit": __commit__ or "unknown", "build": build()[0]}
    assert samples["zdproxy_info"] == [info]
    process = {name for name in metrics if name.startswith("process_")}
    assert {
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    } <= process
    assert metrics["python_info"][0] == "gauge"
    section = (REPO / "docs" / "admin.md").read_text().split("\n## Metrics\n", 1)[1]
    assert set(re.findall(r"`(process_\w+|python_info)`", section)) <= metrics.keys()

    # contrib/: every metric an alert or a panel reads exists, with the labels its
    # matchers name and, for label="value", a sample with that value.
    names = sample_names(text)

    def family(name: str) -> str:
        """A histogram's family from one of its series (_bucket, _count, _sum)."""
        return next((name.removesuffix(s) for s in ("_bucket", "_count", "_sum")
                     if name.removesuffix(s) in metrics), name)  # fmt: skip

    for where, expr in contrib_expressions().items():
        assert expr.count("(") == expr.count(")"), f"{where}: unbalanced: {expr}"
        read = [(name, m) for name, m in promql_names(expr) if name != "up"]  # up: Prometheus'
        for name, matchers in read:
            assert name in names, f"{where}: {name} is not exposed"
            for label, value in matchers.items():
                if label in TARGET_LABELS:
                    continue
                assert label in metrics[family(name)][1], f"{where}: {name} has no label {label}"
                if value:
                    found = samples[family(name)]
                    missing = f"{where}: no {name} sample with {label}={value!r}"
                    assert any(s.get(label) == value for s in found), missing
        labels = set().union(*(metrics[family(name)][1] for name, _ in read))
        for group in re.findall(r"\bby \(([^)]*)\)", expr):
            unknown = {g.strip() for g in group.split(",")} - labels - TARGET_LABELS - {"le"}
            assert not unknown, f"{where}: by ({group}): no such label"


async def head(proxy: ZdProxy, path: str) -> tuple[str, dict[str, str], bytes]:
    """HEAD `path` on the admin listener: the status line, the headers and whatever
    followed them until the server closed."""
    host, _, port = proxy.admin_address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"HEAD {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n".encode())
    async with asyncio.timeout(5):
        answer = await reader.read()
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    return status, dict(line.split(": ", 1) for line in lines), body


async def test_head_metrics_and_probes_answer_headers_without_a_body(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address])})
    for path, content_type in (
        ("/metrics", "text/plain; version=0.0.4"),
        ("/readyz", "application/json"),
        ("/healthz", "application/json"),
    ):
        status, headers, body = await head(proxy, path)
        assert status == "HTTP/1.1 200 OK", (path, status)
        assert headers["Content-Type"].startswith(content_type)
        assert int(headers["Content-Length"]) > 0 and body == b"", (path, body)
    # The /v1 calls (with a token) are not probes, and do not answer HEAD.
    status, headers, _ = await head(proxy, "/v1/status")
    assert status.startswith("HTTP/1.1 405 ") and headers["Allow"] == "GET"


# -- completion and the man page ----------------------------------------------------------


@pytest.fixture(scope="module")
def manual(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `make man completion` writes, written the same way."""
    out = tmp_path_factory.mktemp("manual")
    for kind in ("man", "completion"):
        subprocess.run(
            [sys.executable, "-m", "zdproxy.manual", kind, str(out)],
            check=True,
            capture_output=True,
            timeout=60,
        )
    return out


LEVELS = list(subcommands(build_parser()))  # the live parser's, as the generator reads it


def test_the_live_parser_has_nested_subcommands() -> None:
    paths = [path for path, _ in LEVELS]
    assert () in paths and ("pool",) in paths and ("rollout",) in paths


@pytest.mark.parametrize(("path", "names"), LEVELS, ids=lambda v: " ".join(v) or "zdproxy")
def test_bash_completes_every_subcommand(
    manual: Path, path: tuple[str, ...], names: list[str]
) -> None:
    script = manual / "completion" / "bash" / "zdproxy"
    # The completion function as bash calls it at `zdproxy PATH... <TAB>`.
    words = " ".join(["zdproxy", *path, "''"])
    program = f"""
        source {script}
        function=$(complete -p zdproxy | sed -n 's/.* -F \\([^ ]*\\) .*/\\1/p')
        COMP_WORDS=({words}); COMP_CWORD={len(path) + 1}
        COMP_LINE="${{COMP_WORDS[*]}}"; COMP_POINT=${{#COMP_LINE}}
        "$function" zdproxy "" "${{COMP_WORDS[COMP_CWORD-1]}}"
        printf '%s\\n' "${{COMPREPLY[@]}}"
    """
    result = subprocess.run(
        [tool("bash"), "--norc", "--noprofile", "-c", program],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert sorted(result.stdout.split()) == sorted(names)


@pytest.mark.parametrize(("path", "names"), LEVELS, ids=lambda v: " ".join(v) or "zdproxy")
def test_zsh_completion_lists_every_subcommand(
    manual: Path, path: tuple[str, ...], names: list[str]
) -> None:
    script = (manual / "completion" / "zsh" / "_zdproxy").read_text()
    assert script.startswith("#compdef zdproxy\n")
    function = "_shtab_zdproxy" + "".join("_" + re.sub(r"\W", "_", p) for p in path)
    body = re.search(rf"^{function}_commands\(\) {{\n(.*?)^}}", script, re.MULTILINE | re.DOTALL)
    assert body, f"{function}_commands is missing"
    assert sorted(re.findall(r"^\s+([\w-]+):", body.group(1), re.MULTILINE)) == sorted(names)


def test_the_man_page_renders_without_warnings_and_has_every_command(manual: Path) -> None:
    page = manual / "man" / "zdproxy.1"
    groff = subprocess.run(
        [tool("groff"), "-man", "-Tutf8", "-ww", "-z", str(page)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert groff.returncode == 0 and groff.stderr == "", groff.stderr
    rendered = subprocess.run(
        [tool("man"), "-l", str(page)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={
            "PATH": "/usr/bin:/bin",
            "MANWIDTH": "200",
            "LC_ALL": "C.UTF-8",
            "MAN_KEEP_FORMATTING": "",
        },
    )
    assert rendered.returncode == 0 and rendered.stderr == "", rendered.stderr
    text = rendered.stdout
    assert text.startswith("ZDPROXY(1)")
    for path, names in LEVELS:
        for name in names:
            assert f"COMMAND '{' '.join(('zdproxy', *path, name))}'" in text, name
    for section in ("NAME", "SYNOPSIS", "EXIT STATUS", "ENVIRONMENT", "FILES", "SEE ALSO"):
        assert re.search(rf"^{section}$", text, re.MULTILINE), section
    assert f"zdproxy {__version__}" in text


# -- systemd ------------------------------------------------------------------------------

TEMPLATES = ("zdproxy@.service", "zdproxy@.socket", "zdproxy-admin@.socket")


def test_the_templated_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    verify_units(tmp_path, TEMPLATES, instance="shop")


def directives(unit: str) -> list[str]:
    """A unit's settings, comments and Description= left out."""
    lines = (REPO / "systemd" / unit).read_text().splitlines()
    return [
        line
        for line in lines
        if line.strip() and not line.startswith("#") and not line.startswith("Description=")
    ]


# What differs between an instance and the single zdproxy: its config file, state and
# runtime dirs, and its socket units. Nothing else may.
INSTANCE = {
    "/etc/zdproxy/%i.toml": "/etc/zdproxy/zdproxy.toml",
    "zdproxy/%i": "zdproxy",
    "/var/lib/zdproxy/%i": "/var/lib/zdproxy",
    "zdproxy@%i.socket": "zdproxy.socket",
    "zdproxy-admin@%i.socket": "zdproxy-admin.socket",
    "zdproxy@%i.service": "zdproxy.service",
}


@pytest.mark.parametrize(
    ("template", "single"),
    [
        ("zdproxy@.service", "zdproxy.service"),
        ("zdproxy@.socket", "zdproxy.socket"),
        ("zdproxy-admin@.socket", "zdproxy-admin.socket"),
    ],
)
def test_an_instance_differs_from_the_single_unit_only_where_the_app_goes(
    template: str, single: str
) -> None:
    pattern = re.compile("|".join(re.escape(key) for key in INSTANCE))
    instance = [pattern.sub(lambda m: INSTANCE[m.group()], line) for line in directives(template)]
    differ = set(instance) ^ set(directives(single))
    if template.endswith(".service"):
        assert differ == set(), differ
        for path in ("/etc/zdproxy/%i.toml", "StateDirectory=zdproxy/%i"):
            assert path in (REPO / "systemd" / template).read_text()
    else:  # a socket's address is the instance's own, and a unix socket's access
        allowed = re.compile(r"^(ListenStream|SocketUser|SocketGroup|SocketMode)=")
        assert all(allowed.match(line) for line in differ), differ
        [listen] = [line for line in directives(template) if line.startswith("ListenStream=")]
        assert "%i" in listen  # no two instances share a default address
