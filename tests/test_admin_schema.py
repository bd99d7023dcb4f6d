"""Schemathesis against the admin API: requests generated from zdproxy's own
/v1/openapi.json, sent over the network to a running `zdproxy run`, every response
checked against the document.

The CLI runs as a subprocess (the way users run it); the test fails when it reports
a failure or an error. Safety: fuzzed PUT /v1/pools bodies carry arbitrary addresses,
so the zdproxy under test must never connect to an upstream. It runs with health checks
off (`health.enabled = false`: checks are on by default, a TCP connect to every
upstream) and gets no proxy traffic, so nothing connects to any upstream; the test
checks that afterwards. Schemathesis itself only talks to the
admin listener on loopback.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import ADMIN_TOKEN, ZdProxy, pools, unchecked

StartProxy = Callable[..., ZdProxy]

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# Checks on every response. Left out, with the reason:
# - positive_data_acceptance: the document cannot say everything the models check (a
#   drain target is color xor upstream, a pin rule needs a condition, an address must
#   parse), so schema-valid bodies get an honest 400.
# - negative_data_rejection: pydantic's lax mode takes 0/1 and "true" for booleans and
#   "5" for integers, which the document types strictly (see the report).
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "ignored_auth",
    "missing_required_header",
    "unsupported_method",
    "allow_header_conformance",
]
MAX_EXAMPLES = 40  # per operation and phase
SEED = 20261126  # reproducible; change it to explore
DEADLINE = 120.0  # seconds for the whole run: a bound for a hang (~10 s on a quiet 2-core box)


def schemathesis() -> str:
    beside_python = Path(sys.executable).parent / "schemathesis"
    found = str(beside_python) if beside_python.exists() else shutil.which("schemathesis")
    assert found, "schemathesis is a test dependency: pip install -e '.[test]'"
    return found


def get_json(url: str, headers: dict[str, str] | None = None) -> Any:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


def test_admin_api_conforms_to_its_openapi_document(zdproxy: StartProxy, tmp_path: Path) -> None:
    # Health checks off, no traffic: the fuzzed upstream addresses are never dialled.
    # Two colors, so that a fuzzed drain of one leaves the other (else it is refused).
    proxy = zdproxy({"pools": unchecked(pools(["127.0.0.1:9"], ["127.0.0.1:10"]))})
    document = get_json(f"{proxy.admin_url}/v1/openapi.json")
    operations = {
        f"{method.upper()} {path}" for path, item in document["paths"].items() for method in item
    }
    assert len(operations) == 26, operations  # rollouts and rolling: none can run here
    assert "POST /v1/reload" in operations  # fuzzed too: it re-reads the unchanged file

    # GET /v1/events?follow=1 and GET /v1/status?follow=1 are server-sent event streams
    # that never end: the parameter is taken out of the document the fuzzer reads, so it
    # can never send it (their other forms are fuzzed). The contract tests and
    # tests/test_dashboard.py cover follow.
    for path in ("/v1/events", "/v1/status"):
        streams = document["paths"][path]["get"]
        assert "follow" in [p["name"] for p in streams["parameters"]]
        streams["parameters"] = [p for p in streams["parameters"] if p["name"] != "follow"]
    schema = tmp_path / "openapi.json"
    schema.write_text(json.dumps(document))

    junit = tmp_path / "junit.xml"
    command = [
        schemathesis(),
        "run",
        str(schema),
        "--url",
        proxy.admin_url,
        "--header",
        f"Authorization: Bearer {ADMIN_TOKEN}",
        "--checks",
        ",".join(CHECKS),
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        "--request-timeout",
        "5",
        "--generation-database",
        "none",
        "--no-color",
        "--report",
        "junit",
        "--report-junit-path",
        str(junit),
    ]
    # cwd: anything schemathesis leaves behind stays in the test's directory.
    run = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=DEADLINE, check=False
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output

    suite = ET.parse(junit).getroot()
    assert suite.get("failures") == "0" and suite.get("errors") == "0", output
    tested = {case.get("name") for case in suite.iter("testcase")}
    # Every operation was exercised; "Stateful tests" chains them by the links schemathesis
    # infers (POST /v1/rollouts answers an id that GET /v1/rollouts/{id} takes).
    assert tested - {"Stateful tests"} == operations, output

    # The fuzzer got past the token: its valid changes were applied (actor api) ...
    kinds = {
        event["kind"]
        for event in get_json(f"{proxy.admin_url}/v1/events?limit=10000", AUTH)["events"]
        if event["actor"] == "api"
    }
    assert {"pool_changed", "split_changed", "rules_changed", "drain_started"} <= kinds, kinds
    # ... and zdproxy is alive, with no internal error logged and no upstream dialled.
    assert get_json(f"{proxy.admin_url}/healthz") == {"status": "ok"}
    assert not [line for line in proxy.log_lines if "zdproxy.admin" in line and "failed" in line]
    with urllib.request.urlopen(f"{proxy.admin_url}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    exchanges = [
        line
        for line in metrics.splitlines()
        if line.startswith(("zdproxy_requests_total{", "zdproxy_upstream_failures_total{"))
    ]
    assert exchanges == [], exchanges
    probes = [line for line in proxy.log_lines if "health:" in line or "upstream_up" in line]
    assert probes == [], probes
