"""Durations as operators write them ("1h30m", "250ms"), in the config and on the command
line, and as zdproxy writes them back."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import run_cli
from zdproxy.config.loader import ConfigError, settings_from_mapping
from zdproxy.config.units import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1h30m", 5400.0),
        ("90s", 90.0),
        ("1.5s", 1.5),
        ("250ms", 0.25),
        ("2m30s", 150.0),
        ("1h 30m", 5400.0),
        ("1d12h", 129600.0),
        ("2m0.5s", 120.5),
        ("1s500ms", 1.5),
        ("42", 42.0),
    ],
)
def test_compound_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["30m1h", "1h1h", "1h30", "1.s", "1e3", "h", "1 w", "x" * 101])
def test_garbage_names_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match=r"invalid duration .*expected a number of seconds, or"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "0s"), (0.25, "250ms"), (1.5, "1.5s"), (90.0, "1m30s"), (5400.0, "1h30m"),
     (2592000.0, "30d"), (3600.5, "1h0.5s"), (1e-05, "0.01ms")],
)  # fmt: skip
def test_format_writes_what_an_operator_would(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


# Every float from a nanosecond to 300 years, and zero: exact, not approximately.
@given(st.just(0.0) | st.floats(min_value=1e-9, max_value=1e10))
def test_parse_reads_back_exactly_what_format_wrote(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@given(
    st.lists(st.integers(min_value=0, max_value=10_000), min_size=5, max_size=5),
)
def test_every_unit_counts_once_largest_first(parts: list[int]) -> None:
    days, hours, minutes, seconds, millis = parts
    text = f"{days}d{hours}h{minutes}m{seconds}s{millis}ms"
    expected = days * 86400 + hours * 3600 + minutes * 60 + seconds + millis / 1000
    assert parse_duration(text) == pytest.approx(expected, rel=1e-15)


def test_the_config_takes_compound_durations_and_names_the_field() -> None:
    settings = settings_from_mapping({"proxy": {"shutdown_timeout": "1m30s"}})
    assert settings.proxy.shutdown_timeout == 90.0
    with pytest.raises(ConfigError) as refused:
        settings_from_mapping({"proxy": {"shutdown_timeout": "1h30"}})
    assert "proxy.shutdown_timeout: invalid duration '1h30'" in str(refused.value)


async def test_the_cli_takes_compound_durations_and_refuses_garbage() -> None:
    # Refused while parsing the arguments: exit 2 before any admin API is looked for.
    refused = await run_cli("wait", "--until", "live:green", "--timeout", "1h30")
    assert refused.code == 2
    assert "--timeout: invalid duration '1h30': expected a number of seconds" in refused.err
    # Accepted: the same command then fails only at the (absent) admin API.
    closed = {"ZDPROXY_ADMIN_URL": "unix:/nonexistent/zdproxy-admin.sock"}
    accepted = await run_cli(
        "wait", "--until", "live:green", "--timeout", "0.5s", "--interval", "100ms", env=closed
    )
    assert accepted.code == 4, accepted.err
    assert "timed out after 500ms: cannot reach zdproxy's admin API" in accepted.err
