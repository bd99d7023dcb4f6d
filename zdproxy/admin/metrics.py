"""Prometheus metrics, read at scrape time.

Nothing here runs per request: the data plane already counts into its records,
the control plane folds them into running totals on its tick, and this collector
turns the totals into metric families when /metrics is scraped.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from zdproxy import __commit__, __version__
from zdproxy.admin.handlers import ServiceState
from zdproxy.compiled import build
from zdproxy.config.settings import COLORS
from zdproxy.control.availability import effective_shares
from zdproxy.control.event_kinds import KINDS
from zdproxy.control.plane import ControlPlane
from zdproxy.control.telemetry import color_of
from zdproxy.routing.histogram import COARSE
from zdproxy.routing.local import LocalErrorKind, LocalErrorSite
from zdproxy.routing.snapshot import BASIS_POINTS

CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class ZdproxyCollector(Collector):
    def __init__(self, control: ControlPlane, service: ServiceState) -> None:
        self.control = control
        self.service = service
        self.started = time.time()
        self.build = build()[0].value  # "compiled", "pure" or "partly" (zdproxy.compiled)

    def collect(self) -> Iterator[Metric]:
        control = self.control
        info = InfoMetricFamily(
            "zdproxy", "zdproxy's version, the commit it was built from, and its data plane's build"
        )
        labels = {"version": __version__, "commit": __commit__ or "unknown"}
        info.add_metric([], {**labels, "build": self.build})
        yield info
        yield GaugeMetricFamily(
            "zdproxy_start_time_seconds", "When zdproxy started (Unix time)", value=self.started
        )
        yield from self._traffic()
        yield from self._upstreams()
        retries, overrides = control.counters()
        family = CounterMetricFamily("zdproxy_retries", "Retries by kind", labels=["kind"])
        for kind, n in retries.items():
            family.add_metric([kind], n)
        yield family
        yield self._local_errors()
        family = CounterMetricFamily(
            "zdproxy_pin_matches", "Requests routed by each pin rule", labels=["rule"]
        )
        for rule, n in overrides.pins.items():
            family.add_metric([rule], n)
        yield family
        family = CounterMetricFamily(
            "zdproxy_preview_requests",
            "Preview overrides, honoured (by proof) or ignored (by reason)",
            labels=["outcome", "why"],
        )
        for why, n in overrides.preview_honoured.items():
            family.add_metric(["honoured", why], n)
        for why, n in overrides.preview_ignored.items():
            family.add_metric(["ignored", why], n)
        yield family
        weights = GaugeMetricFamily(
            "zdproxy_split_weight", "Share of the traffic per color (0-1)", labels=["color"]
        )
        for color in COLORS:
            weights.add_metric([color], control.share(color) / 10000)
        yield weights
        effective = GaugeMetricFamily(
            "zdproxy_effective_share",
            "Share of the traffic per color as routed now: a color with nothing routable "
            "gives its share to the other (0-1)",
            labels=["color"],
        )
        shares = effective_shares(control.routing)
        for color in COLORS:
            effective.add_metric([color], shares.get(color, 0) / BASIS_POINTS)
        yield effective
        yield from self._rollouts()
        family = CounterMetricFamily(
            "zdproxy_config_reloads", "Config reloads by result", labels=["result"]
        )
        for result, n in self.service.reloads.items():
            family.add_metric([result], n)
        yield family
        yield self._events()
        yield from self._workers()
        yield from self._fleet()

    def _traffic(self) -> Iterator[Metric]:
        telemetry = self.control.telemetry
        requests = CounterMetricFamily(
            "zdproxy_requests",
            "Responses from upstreams by status class",
            labels=["color", "upstream", "class"],
        )
        failures = CounterMetricFamily(
            "zdproxy_upstream_failures",
            "Exchanges that got no complete response, by kind",
            labels=["color", "upstream", "kind"],
        )
        for upstream, totals in telemetry.totals.items():
            color = color_of(upstream)
            for i, name in enumerate(CLASSES, start=1):
                requests.add_metric([color, upstream, name], totals.by_class[i])
            for kind, n in totals.failures.items():
                failures.add_metric([color, upstream, kind], n)
        yield requests
        yield failures
        duration = HistogramMetricFamily(
            "zdproxy_request_duration_seconds",
            "Time from sending the request upstream to the end of the response, by color",
            labels=["color"],
        )
        for color, latency in telemetry.latency.items():
            cumulative, buckets = 0, []  # the fine buckets summed into COARSE ones: exact
            for bound, n in zip((*COARSE, float("inf")), latency.coarse(), strict=True):
                cumulative += n
                buckets.append((_bound(bound), cumulative))
            duration.add_metric([color], buckets, latency.total)
        yield duration

    def _events(self) -> Metric:
        """Every kind, zeros included: a first journal error is then an increase."""
        counts = self.control.events.counts
        family = CounterMetricFamily(
            "zdproxy_events",
            "Events emitted since start, by kind (GET /v1/events)",
            labels=["kind"],
        )
        for kind in sorted(KINDS | counts.keys()):
            family.add_metric([kind], counts[kind])
        return family

    def _workers(self) -> Iterator[Metric]:
        """Per data-plane worker (proxy.workers above 1); nothing with one process."""
        workers = self.control.workers()
        if not workers:
            return
        current = self.control.routing.version
        families = (
            ("zdproxy_worker_up", GaugeMetricFamily, "1 while the worker's process runs"),
            ("zdproxy_worker_connections", GaugeMetricFamily, "Client connections open"),
            ("zdproxy_worker_requests_in_flight", GaugeMetricFamily, "Requests in flight"),
            (
                "zdproxy_worker_snapshot_current",
                GaugeMetricFamily,
                "1 when the worker routes by the control plane's latest snapshot",
            ),
            (
                "zdproxy_worker_restarts",
                CounterMetricFamily,
                "Worker processes that ended unasked and were replaced",
            ),
            (
                "zdproxy_worker_lost_requests",
                CounterMetricFamily,
                "Requests in flight lost with a worker process that ended unasked",
            ),
            (
                "zdproxy_worker_cpu_seconds",
                GaugeMetricFamily,  # a gauge: a replacement starts from 0 again
                "User and system CPU time of the worker's current process",
            ),
            (
                "zdproxy_worker_resident_memory_bytes",
                GaugeMetricFamily,
                "Resident memory of the worker's current process",
            ),
        )
        made = [kind(name, text, labels=["worker"]) for name, kind, text in families]
        for worker in workers:
            label = [str(worker.index)]
            values = (
                worker.pid is not None,
                worker.connections,
                worker.requests,
                worker.version == current,
                worker.restarts,
                worker.lost,
                worker.cpu_seconds,
                worker.rss_bytes,
            )
            for family, value in zip(made, values, strict=True):
                family.add_metric(label, float(value))
        yield from made

    def _fleet(self) -> Iterator[Metric]:
        """This member in its fleet, as GET /v1/status's `fleet` has it; nothing without
        [fleet]."""
        status = self.control.fleet.status()
        if not status:
            return
        families = (
            ("store_up", GaugeMetricFamily, "available", "1 when etcd answered the last call"),
            (
                "leader",
                GaugeMetricFamily,
                "leading",
                "1 when this member leads the fleet: it holds the leadership and reaches etcd",
            ),
            (
                "applied_revision",
                GaugeMetricFamily,
                "applied_revision",
                "The revision of the fleet's state this member runs (0: none yet)",
            ),
            (
                "latest_revision",
                GaugeMetricFamily,
                "latest_revision",
                "The newest revision of the fleet's state this member has seen",
            ),
            (
                "pending",
                GaugeMetricFamily,
                "pending",
                "1 while a change made here is not in etcd yet",
            ),
            (
                "conflicts",
                CounterMetricFamily,
                "conflicts",
                "Changes made here dropped for another member's that was written first",
            ),
            (
                "store_errors",
                CounterMetricFamily,
                "store_errors",
                "etcd calls that failed: no endpoint answered in time, or no quorum",
            ),
            ("writes", CounterMetricFamily, "writes", "Writes this member made to etcd"),
            (
                "written_bytes",
                CounterMetricFamily,
                "bytes_written",
                "Bytes of the values this member wrote to etcd",
            ),
        )
        for name, kind, key, text in families:
            yield kind(f"zdproxy_fleet_{name}", text, value=float(status[key]))

    def _local_errors(self) -> Metric:
        """Every kind at every site, zeros included: a first error is then an increase."""
        counts = self.control.local_errors()
        family = CounterMetricFamily(
            "zdproxy_local_errors",
            "zdproxy's own resource errors (out of descriptors, memory or local ports), "
            "never counted against an upstream, by kind and where",
            labels=["kind", "where"],
        )
        for site in LocalErrorSite:
            for kind in LocalErrorKind:
                family.add_metric([kind, site], counts.get((site, kind), 0))
        return family

    def _upstreams(self) -> Iterator[Metric]:
        control = self.control
        up = GaugeMetricFamily(
            "zdproxy_upstream_up", "1 if the upstream is routable", labels=["color", "upstream"]
        )
        healthy = GaugeMetricFamily(
            "zdproxy_upstream_healthy",
            "Active health check verdict (1 up; 0 down or unknown; absent when checks are off)",
            labels=["color", "upstream"],
        )
        in_flight = GaugeMetricFamily(
            "zdproxy_upstream_in_flight", "Requests in flight", labels=["color", "upstream"]
        )
        drained = GaugeMetricFamily(
            "zdproxy_upstream_drained", "1 if drained by an operator", labels=["color", "upstream"]
        )
        ejections = CounterMetricFamily(
            "zdproxy_upstream_ejections",
            "Outlier ejections so far",
            labels=["color", "upstream"],
        )
        for color in COLORS:
            for target in control.targets_of(color):
                labels = [color, target.id]
                up.add_metric(labels, float(control.routable(target.id)))
                verdict = control.health.verdict(target.id)
                if verdict != "unchecked":
                    healthy.add_metric(labels, float(verdict == "up"))
                in_flight.add_metric(labels, control.in_flight(target.id)[0])
                drained.add_metric(labels, float(target.id in control.drained))
                ejections.add_metric(labels, control.outliers.ejections(target.id))
        yield from (up, healthy, in_flight, drained, ejections)

    def _rollouts(self) -> Iterator[Metric]:
        rollouts = self.control.rollouts
        ended = CounterMetricFamily(
            "zdproxy_rollouts",
            "Rollouts ended, by how: done, rolled_back, aborted, frozen, failed",
            labels=["result"],
        )
        for result, n in rollouts.counts.items():
            ended.add_metric([result], n)
        yield ended
        active = rollouts.active
        yield GaugeMetricFamily(
            "zdproxy_rollout_active", "1 while a rollout runs", value=float(active is not None)
        )
        yield GaugeMetricFamily(
            "zdproxy_rollout_step",
            "The running rollout's step (0: preflight or none)",
            value=float(active.record.step if active is not None else 0),
        )
        verdict = rollouts.verdict(active.id) if active is not None else None
        if verdict is not None:
            yield from self._judge(verdict.outcome, verdict.numbers)

    def _judge(self, outcome: str, numbers: dict[str, Any]) -> Iterator[Metric]:
        """The running rollout's judge: its verdict and the numbers behind it, as
        GET /v1/rollout's `judge` has them."""
        verdicts = GaugeMetricFamily(
            "zdproxy_judge_verdict",
            "The judge's verdict on the running rollout: 1 for the current one",
            labels=["verdict"],
        )
        for name in ("pass", "hold", "fail"):
            verdicts.add_metric([name], float(name == outcome))
        yield verdicts
        evidence = GaugeMetricFamily(
            "zdproxy_judge_evidence",
            "Share of the evidence needed to fail the candidate, by test (1 or more: failed)",
            labels=["test"],
        )
        for name, test in numbers.get("tests", {}).items():
            evidence.add_metric([name], test["evidence"])
        yield evidence
        requests = GaugeMetricFamily(
            "zdproxy_judge_requests",
            "Requests judged: the candidate's over the phase, the reference (live) color's "
            "over the rollout until promotion",
            labels=["color"],
        )
        error_rate = GaugeMetricFamily(
            "zdproxy_judge_error_rate",
            "Error rate (0-1) of those requests; absent without any",
            labels=["color"],
        )
        for color in ("candidate", "reference"):
            if (counts := numbers.get(color)) is not None:
                requests.add_metric([color], counts["requests"])
                if counts["error_rate"] is not None:
                    error_rate.add_metric([color], counts["error_rate"])
        yield from (requests, error_rate)
        if (hold := numbers.get("hold_left_seconds")) is not None:
            yield GaugeMetricFamily(
                "zdproxy_rollout_hold_left_seconds",
                "Seconds left of the running rollout's step hold or bake",
                value=hold,
            )


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


class Exporter:
    """The /metrics body: zdproxy's collector, and the process_* (CPU, memory, file
    descriptors, start time) and python_info metrics that the Prometheus client's default
    registry would have, in a registry of its own."""

    def __init__(self, control: ControlPlane, service: ServiceState) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ZdproxyCollector(control, service))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The body and its Content-Type in the format the scraper's Accept header asks
        for: OpenMetrics, which Prometheus asks for first and where zdproxy_info is typed
        `info`; else the classic text format, which has no info type (a gauge there)."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type
