"""The data plane's limits, built from the settings here, outside the data plane: it
takes a plain frozen value and never imports the settings machinery (pydantic)."""

from __future__ import annotations

from zdproxy.config.settings import Settings
from zdproxy.dataplane.limits import Limits


def dataplane_limits(settings: Settings) -> Limits:
    proxy, upstream, retry, log = settings.proxy, settings.upstream, settings.retry, settings.log
    return Limits(
        header_timeout=proxy.header_timeout,
        idle_timeout=proxy.idle_timeout,
        max_header_bytes=proxy.max_header_bytes,
        max_body_bytes=proxy.max_body_bytes,
        trusted_proxies=tuple(proxy.trusted_proxies),
        via=proxy.via,
        forward_proxy_authorization=proxy.forward_proxy_authorization,
        request_id=proxy.request_id,
        connect_timeout=upstream.connect_timeout,
        upstream_timeout=upstream.timeout,
        upstream_idle_timeout=upstream.idle_timeout,
        max_idle_per_upstream=upstream.max_idle_per_upstream,
        tunnel_idle_timeout=upstream.tunnel_idle_timeout,
        retry_on_live=retry.on_live_pool,
        retry_statuses=retry.status_codes,
        retry_max_body=retry.max_body,
        retry_budget_percent=retry.budget_percent,
        access_log=log.access,
        access_sample=log.access_sample,
    )
