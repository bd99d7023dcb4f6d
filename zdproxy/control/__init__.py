"""The control plane: owns upstream state and decisions, and builds routing snapshots."""

from zdproxy.control.plane import ControlPlane

__all__ = ["ControlPlane"]
