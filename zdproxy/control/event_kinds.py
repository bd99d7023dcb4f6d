"""The kinds of event zdproxy emits: what `GET /v1/events?kind=` and `zdproxy events
--kind` filter on, and what the CLI checks a kind against before it asks.

A test (tests/test_cli_scripting.py) reads every `emit(...)` of the package and fails
on a kind missing here.
"""

from __future__ import annotations

from zdproxy.control.phases import Phase

KINDS = frozenset(
    {
        "started",
        "stopped",
        "split_changed",
        "pool_changed",
        "rules_changed",
        "drain_started",
        "drained",
        "drain_cut",
        "undrained",
        "upstream_up",
        "upstream_down",
        "upstream_ejected",
        "upstream_returned",
        "ejection_skipped",
        "reload_applied",
        "reload_refused",
        "restart_refused",
        "tls_reloaded",
        "tls_reload_refused",
        "config_held",
        "config_takes_over",
        "journal_corrupt",
        "journal_rejected",
        "journal_unreadable",
        "journal_unwritable",
        "journal_stale",
        "journal_caught_up",
        "journal_reserve_spent",
        "journal_reserve_missing",
        "events_skipped",
        "evacuated",
        "worker_exited",
        "hook",
        "rolling_started",
        "rolling_done",
        "rolling_failed",
        "rollout_resumed",
        "fleet_joined",
        "fleet_applied",
        "fleet_conflict",
        "fleet_rejected",
        "fleet_leader",
        "fleet_leadership_lost",
        "fleet_store_unavailable",
        "fleet_store_available",
        "fleet_watch_restarted",
        *(f"rollout_{phase}" for phase in Phase),  # one per transition
    }
)
