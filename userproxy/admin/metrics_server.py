"""The metrics server (``--metrics-bind-address``, default 127.0.0.1:10249).

``/metrics`` through prometheus-client's aiohttp handler (text, or OpenMetrics and gzip as
the scraper's ``Accept`` headers ask), ``/healthz`` (as on the health server),
``/proxyMode`` and ``/configz`` (the effective configuration as JSON).
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from userproxy.admin.health import healthz_handler
from userproxy.control.health import HealthState
from userproxy.metrics import Metrics

PROXY_MODE = "userspace"


def metrics_app(
    metrics: Metrics, health: HealthState, configz: Mapping[str, object]
) -> web.Application:
    async def proxy_mode(_: web.Request) -> web.Response:
        return web.Response(text=PROXY_MODE)

    async def serve_configz(_: web.Request) -> web.Response:
        return web.json_response(configz)

    app = web.Application()
    app.router.add_get("/metrics", make_aiohttp_handler(metrics.registry))
    app.router.add_get("/healthz", healthz_handler(health, metrics))
    app.router.add_get("/proxyMode", proxy_mode)
    app.router.add_get("/configz", serve_configz)
    return app
