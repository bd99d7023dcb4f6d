"""Configuration: the settings model, its value types, and loading with readable errors."""

from zdproxy.config.loader import ConfigError, load_settings
from zdproxy.config.settings import Settings
from zdproxy.config.units import Address

__all__ = ["Address", "ConfigError", "Settings", "load_settings"]
