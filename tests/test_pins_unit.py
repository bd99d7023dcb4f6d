"""Pins and preview in-process: token verification, the compiled rules and their counters."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.test_pins import FAR, SECRET, sign
from zdproxy.config.loader import settings_from_mapping
from zdproxy.config.overrides import INTERPRETED_HEADERS
from zdproxy.dataplane.http import H_DROP, H_PREVIEW, REQUEST_HEADERS
from zdproxy.dataplane.route import Router, Via
from zdproxy.routing.preview import mint_token, verify_token
from zdproxy.routing.records import OverrideCounters
from zdproxy.routing.snapshot import PinRule, PreviewPolicy, RoutingSnapshot

NOW = time.time()


def test_mint_token_follows_the_spec() -> None:
    assert mint_token(SECRET, "green", FAR) == sign(SECRET, "green", FAR)
    with pytest.raises(ValueError, match="not a color"):
        mint_token(SECRET, "purple", FAR)


@pytest.mark.parametrize(
    ("token", "secret", "expected"),
    [
        (sign(SECRET, "green", FAR), SECRET, (b"green", "")),
        (sign(SECRET, "blue", FAR), SECRET, (b"blue", "")),
        (sign(SECRET, "green", FAR), b"another-secret-012345", (None, "forged")),
        (sign(SECRET, "green", FAR), b"", (None, "forged")),  # no secret: nothing is genuine
        (sign(SECRET, "green", FAR)[:-1], SECRET, (None, "forged")),
        (sign(SECRET, "blue", FAR).replace("blue", "green", 1), SECRET, (None, "forged")),
        (sign(SECRET, "green", int(NOW) - 1), SECRET, (None, "expired")),
        (sign(SECRET, "purple", FAR), SECRET, (None, "malformed")),
        (f"green.{10**13}.abc", SECRET, (None, "malformed")),
        ("green.-5.abc", SECRET, (None, "malformed")),
        (f"green.{FAR}.", SECRET, (None, "malformed")),
        ("green", SECRET, (None, "malformed")),
    ],
)
def test_verify_token(token: str, secret: bytes, expected: tuple[bytes | None, str]) -> None:
    assert verify_token(secret, token.encode(), NOW) == expected


def router(
    pins: tuple[PinRule, ...] = (), preview: PreviewPolicy | None = None
) -> tuple[Router, OverrideCounters]:
    snapshot = RoutingSnapshot(1, "blue", 0, pins=pins, preview=preview or PreviewPolicy())
    counters = OverrideCounters()
    return Router(snapshot, counters), counters


def test_preview_outcomes_are_counted_per_reason() -> None:
    policy = PreviewPolicy(allow_networks=("10.0.0.0/8",), secret=SECRET)
    compiled, counters = router(preview=policy)
    assert compiled.active

    def decide(value: str, peer: bytes = b"192.0.2.1", cookie: bool = False) -> str | None:
        if cookie:
            route = compiled.decide(b"h", b"/", b"zd_color=" + value.encode(), None, None, peer)
        else:
            route = compiled.decide(b"h", b"/", None, {H_PREVIEW: value.encode()}, None, peer)
        assert (route.via is Via.PREVIEW) == (route.to is not None)
        return route.to

    assert decide("green", peer=b"10.1.2.3") == "green"
    assert decide("green", peer=b"::ffff:10.1.2.3") == "green"  # a dual-stack listener's view
    assert decide(sign(SECRET, "blue", FAR)) == "blue"
    assert decide(sign(SECRET, "green", FAR), cookie=True) == "green"
    assert decide("green") is None
    assert decide(sign(b"x" * 20, "green", FAR)) is None
    assert decide(sign(SECRET, "green", 1)) is None
    assert decide(sign(SECRET, "green", 1), cookie=True) is None
    assert decide("purple", peer=b"10.1.2.3") is None
    assert decide("green, green", peer=b"10.1.2.3") is None  # a repeated header is ambiguous
    assert compiled.decide(b"h", b"/", b"other=1", None, None, b"10.1.2.3").to is None  # absent
    assert counters.preview_honoured == {"network": 2, "signature": 2}
    assert counters.preview_ignored == {
        "forged": 1,
        "expired": 2,
        "disallowed": 1,
        "malformed": 2,
    }


def test_nothing_to_decide_without_pins_or_an_enabled_preview() -> None:
    compiled, _ = router()
    assert not compiled.active
    assert compiled.request_headers == {**REQUEST_HEADERS, b"x-zd-color": H_DROP}  # not read
    enabled, _ = router(preview=PreviewPolicy(secret=SECRET))
    assert enabled.active and enabled.request_headers[b"x-zd-color"] == H_PREVIEW


def test_pin_matches_are_counted_by_name() -> None:
    pins = (
        PinRule("eu", "green", networks=("192.0.2.0/24",), path_prefixes=("/eu",)),
        PinRule("pins[1]", "live", cookie="plan", values=("beta",)),
    )
    compiled, counters = router(pins)
    assert compiled.decide(None, b"/eu/x", None, None, None, b"192.0.2.7").to == "green"
    assert compiled.decide(None, b"/eu/x", b"plan=beta", None, None, b"192.0.3.7").to == "live"
    assert compiled.decide(None, b"/x", b"plan=free", None, None, b"192.0.2.7").via is Via.SPLIT
    assert counters.pins == {"eu": 1, "pins[1]": 1}


def test_snapshot_round_trip_keeps_rules_and_hides_the_secret() -> None:
    pins = (
        PinRule("a", "candidate", header="X-T", values=("1", "2"), hosts=("a.example",)),
        PinRule("b", "blue", path_prefixes=("/b",), networks=("10.0.0.0/8",)),
    )
    preview = PreviewPolicy("X-P", "p", ("127.0.0.0/8",), SECRET)
    snapshot = RoutingSnapshot(3, "green", 500, pins=pins, preview=preview)
    again = RoutingSnapshot.from_dict(snapshot.to_dict())
    assert again.pins == pins and again.preview == preview
    assert SECRET.decode() not in repr(snapshot)


def test_secret_from_file_or_environment_never_in_repr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"file-secret-0123456789\n")
    settings = settings_from_mapping({"preview": {"secret_file": str(path)}})
    assert settings.preview.signing_secret == b"file-secret-0123456789"
    assert "file-secret" not in repr(settings)
    monkeypatch.setenv("ZDPROXY_PREVIEW__SECRET", SECRET.decode())
    settings = settings_from_mapping({"preview": {"secret_file": str(path)}})
    assert settings.preview.signing_secret == SECRET  # the environment overrides the file
    assert SECRET.decode() not in repr(settings)


def test_interpreted_headers_match_the_data_plane() -> None:
    assert {name.encode() for name in INTERPRETED_HEADERS} == set(REQUEST_HEADERS)
