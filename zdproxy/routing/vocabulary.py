"""The words both planes and the config share: the two colors and where a pin may send.

Routing owns them (it imports nothing else of zdproxy), so the data plane, the
control plane and the settings all spell them from here.
"""

from __future__ import annotations

from typing import Literal

Color = Literal["blue", "green"]
COLORS: tuple[Color, Color] = ("blue", "green")

# A pin rule's target: a color, or a role that the snapshot resolves to one.
PinTarget = Literal["blue", "green", "candidate", "live"]
PIN_TARGETS: tuple[PinTarget, ...] = ("blue", "green", "candidate", "live")


def other(color: Color) -> Color:
    """The color that is not `color`."""
    return "green" if color == "blue" else "blue"
