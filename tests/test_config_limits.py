"""Config files that must never run, or be reloaded: no upstream, values out of bounds,
nesting deep enough to crash a parser, bytes that are not text; and what a reload may
not change on a running zdproxy. `zdproxy check` names the field every time."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tests.conftest import free_port, pools, to_toml
from tests.test_config import UNUSED, refuses_connections, write_config, zdproxy_cli
from zdproxy.config.changes import changed_fields, reload_conflicts
from zdproxy.config.loader import ConfigError, load_settings, settings_from_mapping, too_deep
from zdproxy.config.settings import Settings

# -- files that must not run: no upstream, out of bounds, deep nesting, not text -----------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "pools: the file is empty"),
        ("# nothing but a comment\n", "pools: the file is empty"),
        ("[log]\nlevel = 'info'\n", "pools: no pool has an upstream"),
        ("[pools.blue]\nupstreams = []\n", "pools: no pool has an upstream"),
    ],
)
def test_check_refuses_a_file_without_upstreams(tmp_path: Path, text: str, message: str) -> None:
    result = zdproxy_cli("check", "--config", str(write_config(tmp_path, text)))
    assert result.returncode == 2
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_run_refuses_a_file_without_upstreams_and_does_not_listen(tmp_path: Path) -> None:
    port = free_port()
    path = write_config(tmp_path, to_toml({"proxy": {"listen": f"127.0.0.1:{port}"}}))
    ran = zdproxy_cli("run", "--config", str(path))
    assert ran.returncode == 2
    assert "pools: no pool has an upstream" in ran.stderr
    assert "listening on" not in ran.stderr
    assert refuses_connections(port)


def test_check_names_every_value_out_of_bounds(tmp_path: Path) -> None:
    """The values of the issue: each passed `check`, then broke a restart or a timer."""
    text = to_toml({"pools": pools([UNUSED])}) + (
        "[proxy]\nbacklog = 1e12\nheader_timeout = inf\nidle_timeout = nan\n"
        '[upstream]\ntimeout = "100000d"\n'
    )
    result = zdproxy_cli("check", "--config", str(write_config(tmp_path, text)))
    assert result.returncode == 2
    for line in (
        "proxy.backlog: Input should be less than or equal to 65535",
        "proxy.header_timeout: invalid duration inf: must be a finite number of seconds",
        "proxy.idle_timeout: invalid duration nan: must be a finite number of seconds",
        "upstream.timeout: Input should be less than or equal to 86400",
    ):
        assert line in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("toml", "error"),
    [
        ("[proxy]\nbacklog = inf", "proxy.backlog: Input should be a finite number"),
        ("[proxy]\nbacklog = 65536", "proxy.backlog: Input should be less than or equal"),
        ('[proxy]\nmax_header_bytes = "2MiB"', "proxy.max_header_bytes: Input should be less"),
        ('[proxy]\nmax_body_bytes = "2000GiB"', "proxy.max_body_bytes: Input should be less"),
        ('[proxy]\nshutdown_timeout = "2h"', "proxy.shutdown_timeout: Input should be less"),
        ("[upstream]\nconnect_timeout = 1e300", "upstream.connect_timeout: Input should be less"),
        ('[upstream]\ntimeout = "9' + "9" * 400 + 's"', "upstream.timeout: invalid duration"),
        ("[upstream]\nmax_idle_per_upstream = 1e9", "upstream.max_idle_per_upstream: Input"),
        ("[pools.blue.outlier]\nconsecutive_failures = 10001", "outlier.consecutive_failures:"),
        ("[log]\naccess_sample = nan", "log.access_sample: Input should be a finite number"),
        ('[split]\nbucket_cookie_max_age = "401d"', "split.bucket_cookie_max_age: Input"),
        ('[retry]\nmax_body = "1GiB"', "retry.max_body: Input should be less than or equal"),
        ("[state]\nevents_in_memory = 1e7", "state.events_in_memory: Input should be less"),
        ('[state]\nevents_file_max = "2GiB"', "state.events_file_max: Input should be less"),
        ("[plans.x]\nsteps = [{weight = nan}]", "plans.x.steps[0].weight: Input should be a fin"),
        ('[plans.x]\nsteps = [{weight = 100, hold = "8d"}]', "plans.x.steps[0].hold: Input"),
        ("[hooks.h]\ncommand = ['x']\ntimeout = inf", "hooks.h.timeout: invalid duration inf"),
    ],
)
def test_values_out_of_bounds_are_refused_naming_the_field(
    tmp_path: Path, toml: str, error: str
) -> None:
    path = write_config(tmp_path, to_toml({"pools": pools([UNUSED])}) + toml + "\n")
    with pytest.raises(ConfigError) as refused:
        load_settings(path)
    assert any(error in line for line in refused.value.errors), refused.value.errors


def test_values_at_their_bounds_are_accepted(tmp_path: Path) -> None:
    text = to_toml({"pools": pools([UNUSED])}) + (
        '[proxy]\nbacklog = 65535\nidle_timeout = "1d"\nmax_header_bytes = "1MiB"\n'
        '[split]\nbucket_cookie_max_age = "400d"\n'
    )
    settings = load_settings(write_config(tmp_path, text))
    assert (settings.proxy.backlog, settings.proxy.idle_timeout) == (65535, 86400.0)
    assert settings.split.bucket_cookie_max_age == 400 * 86400.0


def test_every_number_in_the_settings_has_an_upper_bound() -> None:
    """A new option without a bound fails here, before an operator finds the overflow."""
    schema = Settings.model_json_schema()
    unbounded = []
    for name, model in {"Settings": schema, **schema["$defs"]}.items():
        for option, spec in model.get("properties", {}).items():
            # A number, or a union with a number in it (e.g. `int | "auto"`): the bound is
            # on the option or on the number's own branch.
            for branch in (spec, *spec.get("anyOf", [])):
                bounded = {"maximum", "exclusiveMaximum"} & (set(spec) | set(branch))
                if branch.get("type") in ("integer", "number") and not bounded:
                    unbounded.append(f"{name}.{option}")
    assert unbounded == []


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("a = " + "[" * 10_000 + "]" * 10_000, "a"),
        ("[proxy]\nvia = " + "{b = " * 10_000 + "1" + "}" * 10_000, "proxy.via"),
        ("[pools.blue]\nupstreams = [\n" + "[" * 33 + "]" * 33 + "]", "pools.blue.upstreams"),
    ],
)
def test_check_names_the_field_of_deep_nesting(tmp_path: Path, text: str, field: str) -> None:
    result = zdproxy_cli("check", "--config", str(write_config(tmp_path, text + "\n")))
    assert result.returncode == 2
    assert f"{field}: nested deeper than 32 levels" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "text",
    [
        'a = "' + "[" * 40 + '"',
        "a = '" + "{" * 40 + "'",
        'a = """\n' + "[" * 40 + '\\"""\n"""',
        "a = '''\n" + "[" * 40 + "\n'''",
        "# " + "[" * 40 + "\na = 1",
        "a = [" + "[1], " * 40 + "]",  # wide, not deep
    ],
)
def test_brackets_in_strings_comments_or_side_by_side_are_not_depth(text: str) -> None:
    assert too_deep(text + "\n") is None
    assert tomllib.loads(text + "\n")  # and each is valid TOML


def test_check_refuses_a_file_that_is_not_text(tmp_path: Path) -> None:
    path = tmp_path / "zdproxy.toml"
    path.write_bytes(b"[proxy]\nvia = '\xff\xfe'\n")
    result = zdproxy_cli("check", "--config", str(path))
    assert result.returncode == 2
    assert "(top level): not UTF-8 text (byte 15 is 0xff)" in result.stderr
    assert "Traceback" not in result.stderr


# -- what a reload may not change -------------------------------------------------------------


def test_reload_lists_the_changed_options_and_refuses_to_drop_the_token(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("0123456789abcdef0123\n")
    base = {"pools": pools([UNUSED]), "admin": {"token_file": str(token)}}
    running = settings_from_mapping(base)
    moved = {**base, "split": {"live": "green"}, "proxy": {"listen": "127.0.0.1:8081"}}
    assert changed_fields(running, settings_from_mapping(moved)) == ["proxy.listen", "split.live"]
    assert changed_fields(running, running) == []

    token.write_text("another-token-0123456789\n")  # same file name, new content
    assert changed_fields(running, settings_from_mapping(base)) == ["admin.token"]

    without = settings_from_mapping({"pools": pools([UNUSED])})
    assert reload_conflicts(running, settings_from_mapping(base)) == []
    [problem] = reload_conflicts(running, without)
    assert problem.field == "admin.token_file"
    assert reload_conflicts(without, running) == []  # adding a token is fine
