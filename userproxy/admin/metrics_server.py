"""The metrics server (``--metrics-bind-address``, default 127.0.0.1:10249).

``/metrics`` (admin/metrics_scrape.py: text, or OpenMetrics and gzip as the scraper's
``Accept`` headers ask; the per-Service-port families written in slices), ``/healthz`` (as
on the health server), ``/proxyMode`` and ``/configz`` (the effective configuration as
JSON); with a status view, ``/status`` (the model of admin/status.py as JSON,
docs/status.md) and ``/`` (the same as a server-rendered HTML page, admin/status_page.py).
Both take ``q`` (a substring of ``namespace/name``) and ``page``; ``/status`` also
``page_size`` (default 0: every Service), ``/`` also ``fragment`` (only the page's
``<main>``).  ``/status/events`` and ``/status.js`` keep an open page live (admin/live.py).
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from userproxy.admin.explain_route import add_explain_route
from userproxy.admin.health import healthz_handler
from userproxy.admin.live import add_live_routes
from userproxy.admin.metrics_scrape import metrics_handler
from userproxy.admin.status import StatusView
from userproxy.admin.status_page import PAGE_SIZE, render_page
from userproxy.control.health import HealthState
from userproxy.metrics import Metrics

PROXY_MODE = "userspace"

#: Bound on ``q`` (it is matched against every Service name).
MAX_QUERY = 256


def _number(request: web.Request, name: str, default: int) -> int:
    """A non-negative integer query parameter; a bad one is a 400 naming it."""
    text = request.query.get(name, "")
    if not text:
        return default
    if not text.isdigit() or len(text) > 9:
        raise web.HTTPBadRequest(text=f"{name} must be a non-negative integer, not {text[:32]!r}\n")
    return int(text)


def metrics_app(
    metrics: Metrics,
    health: HealthState,
    configz: Mapping[str, object],
    status: StatusView | None = None,
) -> web.Application:
    async def proxy_mode(_: web.Request) -> web.Response:
        return web.Response(text=PROXY_MODE)

    async def serve_configz(_: web.Request) -> web.Response:
        return web.json_response(configz)

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler(metrics))
    app.router.add_get("/healthz", healthz_handler(health, metrics))
    app.router.add_get("/proxyMode", proxy_mode)
    app.router.add_get("/configz", serve_configz)
    if status is not None:
        view = status

        async def serve_status(request: web.Request) -> web.StreamResponse:
            page = await view.build(
                request.query.get("q", "")[:MAX_QUERY],
                _number(request, "page", 1),
                _number(request, "page_size", 0),
                as_text=True,
            )
            # Streamed piece by piece (each write may wait for the client: back-pressure).
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            await page.send(response)
            return response

        async def serve_page(request: web.Request) -> web.Response:
            page = await view.build(
                request.query.get("q", "")[:MAX_QUERY], _number(request, "page", 1), PAGE_SIZE
            )
            fragment = "fragment" in request.query
            return web.Response(text=render_page(page, fragment=fragment), content_type="text/html")

        app.router.add_get("/status", serve_status)
        app.router.add_get("/", serve_page)
        add_live_routes(app, view)  # /status/events and /status.js: admin/live.py
        add_explain_route(app, view, configz)  # /explain: admin/explain_route.py
    return app
