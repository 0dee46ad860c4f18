"""The health server (``--healthz-bind-address``, default 0.0.0.0:10256).

``/healthz`` and ``/livez`` as kube-proxy serves them: 200 or 503 with a JSON body carrying
``lastUpdated`` and ``currentTime`` (``/healthz`` also ``nodeEligible``).  Each answer is
counted in ``kubeproxy_proxy_healthz_total`` / ``kubeproxy_proxy_livez_total`` by code.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from userproxy.control.health import HealthState
from userproxy.metrics import Metrics


def healthz_handler(health: HealthState, metrics: Metrics) -> Handler:
    """``/healthz`` (here and on the metrics server): 200 while live and the Node eligible."""

    async def healthz(_: web.Request) -> web.Response:
        report = health.report()
        code = 200 if report.healthy else 503
        metrics.healthz.labels(str(code)).inc()
        return web.json_response(report.healthz_body(), status=code)

    return healthz


def health_app(health: HealthState, metrics: Metrics) -> web.Application:
    async def livez(_: web.Request) -> web.Response:
        report = health.report()
        code = 200 if report.live else 503
        metrics.livez.labels(str(code)).inc()
        return web.json_response(report.livez_body(), status=code)

    app = web.Application()
    app.router.add_get("/healthz", healthz_handler(health, metrics))
    app.router.add_get("/livez", livez)
    return app
