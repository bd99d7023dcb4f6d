"""zdproxy: zero-downtime blue/green and canary deploys on plain VMs."""

from zdproxy.compiled import describe

__all__ = ["__commit__", "__version__", "version_line"]

try:
    # Written by the build (setuptools-scm, from the git tag and commit); not tracked.
    from zdproxy._version import __commit_id__, __version__
except ModuleNotFoundError:  # a source tree that was never built or installed
    __version__ = "0.0.0+unknown"
    __commit_id__ = None

# The short hash of the commit built ("1a2b3c4d5"), or None when the build had no git.
__commit__ = __commit_id__.removeprefix("g") if __commit_id__ else None


def version_line() -> str:
    """What `zdproxy --version` prints: "zdproxy 0.2.0 (commit 1a2b3c4d5, pure Python)",
    or "(commit 1a2b3c4d5, compiled data plane)" for a compiled build (zdproxy.compiled)."""
    commit = f"commit {__commit__}, " if __commit__ else ""
    return f"zdproxy {__version__} ({commit}{describe()})"
