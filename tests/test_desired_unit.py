"""Desired state in-process: which of the config file and the journal wins, item by item.

A "start" is what the daemon does (the file overlaid with the journal read from disk);
a restart is a second start from the same journal file, with nothing else carried over.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from zdproxy.config.loader import settings_from_mapping
from zdproxy.config.settings import Settings
from zdproxy.control.desired import DesiredState, Refused
from zdproxy.control.events import EventLog
from zdproxy.control.journal import Journal
from zdproxy.control.state import file_value

B1, B2, G1, G2 = "127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9101", "127.0.0.1:9102"
STAFF = {"name": "staff", "header": "x-staff", "values": ["1"], "to": "green"}
TESTERS = {"name": "testers", "path_prefix": ["/beta"], "to": "candidate"}


def config(**sections: Any) -> Settings:
    """The config file: blue live with two upstreams, green with one, no pins, no salt;
    `sections` replace whole top-level sections."""
    data: dict[str, Any] = {
        "pools": {"blue": {"upstreams": [B1, B2]}, "green": {"upstreams": [G1]}},
        "split": {"live": "blue", "candidate_weight": 0},
    }
    return settings_from_mapping({**data, **sections})


def pools(blue: list[str], green: list[str], **blue_extra: Any) -> dict[str, Any]:
    return {"pools": {"blue": {"upstreams": blue, **blue_extra}, "green": {"upstreams": green}}}


def start(tmp_path: Path, file: Settings) -> DesiredState:
    """The daemon's start: the file overlaid with the journal on disk."""
    desired = DesiredState(file, Journal(tmp_path / "state.json"), EventLog(None))
    desired.take_config(file, desired.read_journal())
    return desired


def events(desired: DesiredState, kind: str) -> list[dict[str, Any]]:
    return [e.data for e in desired.events.history(kind=kind)]


# Per item: a runtime change, and a file edit of that item.
ITEMS: dict[str, tuple[Any, dict[str, Any]]] = {
    "split": (
        {"live": "blue", "candidate_weight": 2500},
        {"split": {"live": "blue", "candidate_weight": 100}},
    ),
    "pools.green": (
        {"upstreams": [{"address": G2, "weight": 100}], "version": "v2"},
        pools([B1, B2], [G1, G2]),
    ),
    "rules": ([STAFF], {"pins": [TESTERS]}),
}


@pytest.mark.parametrize("key", ITEMS)
def test_a_runtime_change_wins_over_the_file_across_restarts(tmp_path: Path, key: str) -> None:
    value, _ = ITEMS[key]
    file = config()
    start(tmp_path, file).change({key: value}, "api")
    again = start(tmp_path, file)
    assert file_value(again.settings, key) == value
    again.take_config(file, reload=True)  # a reload of the unchanged file too
    assert file_value(again.settings, key) == value
    assert file_value(start(tmp_path, file).settings, key) == value


@pytest.mark.parametrize("how", ["restart", "reload"])
@pytest.mark.parametrize("key", ITEMS)
def test_the_files_own_edit_of_the_item_takes_over(tmp_path: Path, key: str, how: str) -> None:
    value, edit = ITEMS[key]
    original, edited = config(), config(**edit)
    desired = start(tmp_path, original)
    desired.change({key: value}, "api")
    if how == "restart":
        desired = start(tmp_path, edited)
    else:
        desired.take_config(edited, reload=True)
    assert file_value(desired.settings, key) == file_value(edited, key)
    assert events(desired, "config_takes_over") == [{"item": key}]
    # ... for good: neither the journal nor an edit back to the old value revives it
    desired.take_config(original, reload=True)
    assert file_value(desired.settings, key) == file_value(original, key)
    assert key not in start(tmp_path, original).items


@pytest.mark.parametrize("key", ITEMS)
def test_a_file_edit_of_other_items_leaves_the_runtime_change(tmp_path: Path, key: str) -> None:
    value, _ = ITEMS[key]
    others = {
        section: v for k, (_, edit) in ITEMS.items() if k != key for section, v in edit.items()
    }
    desired = start(tmp_path, config())
    desired.change({key: value}, "api")
    edited = config(**others, admin={"status_window": 30})
    desired.take_config(edited, reload=True)
    assert file_value(desired.settings, key) == value
    for other in set(ITEMS) - {key}:  # which follow the file
        assert file_value(desired.settings, other) == file_value(edited, other)
    assert file_value(start(tmp_path, edited).settings, key) == value


def test_a_pools_check_settings_are_not_its_members(tmp_path: Path) -> None:
    members = {"upstreams": [{"address": B1, "weight": 100}], "version": "v7"}
    desired = start(tmp_path, config())
    desired.change({"pools.blue": members}, "api")
    desired.take_config(config(**pools([B1, B2], [G1], health={"path": "/readyz"})), reload=True)
    assert file_value(desired.settings, "pools.blue") == members
    assert desired.settings.pools.blue.health.path == "/readyz"


def test_drain_marks_go_with_their_upstreams(tmp_path: Path) -> None:
    desired = start(tmp_path, config())
    desired.change({"drained": [f"blue/{B2}", f"green/{G1}"]}, "api")
    assert start(tmp_path, config()).drained == {f"blue/{B2}", f"green/{G1}"}
    desired.take_config(config(**pools([B1], [G1])), reload=True)  # B2 leaves the file
    assert desired.drained == {f"green/{G1}"}
    assert start(tmp_path, config(**pools([B1], [G1]))).drained == {f"green/{G1}"}
    desired.take_config(config(), reload=True)  # ... and comes back: fresh, not drained
    assert desired.drained == {f"green/{G1}"}


def test_a_reload_the_journal_does_not_fit_is_refused_and_changes_nothing(
    tmp_path: Path,
) -> None:
    desired = start(tmp_path, config())
    members = {"upstreams": [{"address": "127.0.0.1:9300", "weight": 100}], "version": ""}
    desired.change({"pools.green": members, "split": ITEMS["split"][0]}, "api")
    before = (desired.config, desired.settings, dict(desired.items), len(desired.events.history()))
    journal = (tmp_path / "state.json").read_bytes()
    # The file is fine by itself, but the journaled green pool is now its own listener;
    # its split edit would have taken over the journaled split.
    clash = config(
        proxy={"listen": "127.0.0.1:9300"}, split={"live": "green", "candidate_weight": 0}
    )
    with pytest.raises(Refused) as refused:
        desired.take_config(clash, reload=True)
    assert (refused.value.status, refused.value.field) == (400, "pools.green")
    assert "listener" in refused.value.reason
    after = (desired.config, desired.settings, dict(desired.items), len(desired.events.history()))
    assert after == before
    assert (tmp_path / "state.json").read_bytes() == journal


def test_a_change_that_does_not_fit_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    desired = start(tmp_path, config())
    journal = (tmp_path / "state.json").read_bytes()
    with pytest.raises(Refused) as refused:
        desired.change({"split": {"live": "green", "candidate_weight": 2500}, "rules": [{}]}, "api")
    assert refused.value.status == 400
    assert file_value(desired.settings, "split") == file_value(config(), "split")
    assert (tmp_path / "state.json").read_bytes() == journal


def test_the_salt_is_drawn_once_and_kept(tmp_path: Path) -> None:
    desired = start(tmp_path, config())
    salt = desired.settings.split.salt
    assert re.fullmatch(r"[0-9a-f]{32}", salt)
    assert start(tmp_path, config()).settings.split.salt == salt  # a restart
    desired.take_config(config(**pools([B1], [G1])), reload=True)  # a reload
    assert desired.settings.split.salt == salt
    desired.change({"split": ITEMS["split"][0]}, "api")  # a change of another split field
    assert start(tmp_path, config()).settings.split.salt == salt


def test_a_salt_in_the_file_wins(tmp_path: Path) -> None:
    start(tmp_path, config())
    file = config(split={"live": "blue", "candidate_weight": 0, "salt": "from-the-file"})
    desired = start(tmp_path, file)
    assert desired.settings.split.salt == "from-the-file"
    assert "salt" not in desired.items
