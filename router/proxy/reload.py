"""The proxy's part of a config reload (`router.config_reload`): what of `proxy:` applies live,
and the swap of scheduler and forwarder.

Live: the fields the forwarder, the app and the health prober read per request or per probe
(timeouts, retries, the profile, the debug headers, `max_connections`, health probing), and
`logging.access_log`. Kept until a restart: the listening address, the upstream connection
pool (`pool_per_pod`, `keepalive_s`, `connect_timeout_s`), the outlier detector's policy and
the admission gates (requests queued or in flight hold them), uvicorn's own `access_log`.

The new forwarder is built around the new scheduler; the app's reference to both is replaced
in one step (no await in between). A request already past the app holds the old forwarder and
so runs to its end on the scheduler that decided it (its hooks, retries included).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from router.config import RouterConfig
from router.config_reload import ConfigChange
from router.proxy.observe import build_forwarder

if TYPE_CHECKING:
    from router.proxy.app import ProxyApp

PROXY_LIVE_FIELDS = frozenset(
    {
        "proxy.profile",
        "proxy.first_byte_timeout_s",
        "proxy.total_timeout_s",
        "proxy.retries",
        "proxy.stream_idle_timeout_s",
        "proxy.body_read_timeout_s",
        "proxy.max_connections",
        "proxy.health_path",
        "proxy.health_interval_s",
        "proxy.health_timeout_s",
        "proxy.retry_after_s",
        "proxy.debug_header",
        "proxy.decision_header",
        "proxy.models_cache_s",
        "logging.access_log",
    }
)


def apply_proxy_reload(app: ProxyApp, config: RouterConfig, change: ConfigChange) -> None:
    """Build what `config` needs (raising leaves the app as it was), then swap it in."""
    fields = {
        name.split(".", 1)[1]: getattr(config.proxy, name.split(".", 1)[1])
        for name in change.live
        if name.startswith("proxy.")
    }
    settings = dataclasses.replace(app.settings, **fields) if fields else app.settings
    profiles = {p.name for p in config.profiles}
    if settings.profile is not None and settings.profile not in profiles:
        raise ValueError(
            f"proxy.profile '{settings.profile}' is not among the new config's "
            f"schedulingProfiles ({', '.join(sorted(profiles))})"
        )
    scheduler = app.scheduler
    if change.rebuild_scheduler:
        scheduler = app.build_scheduler(config, previous=app.scheduler)
    forwarder = app.forwarder
    if forwarder is not None and (
        scheduler is not app.scheduler or fields or "logging.access_log" in change.live
    ):
        forwarder = build_forwarder(
            app, scheduler, settings, config.logging.access_log, previous=forwarder
        )
    # The swap: no await from here to the end.
    app.config = config
    app.settings = settings
    app.scheduler = scheduler
    if app.prober is not None:
        app.prober.settings = settings
    app.forwarder = forwarder
