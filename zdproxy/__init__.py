"""zdproxy: zero-downtime blue/green and canary deploys on plain VMs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("zdproxy")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
