"""``GET /explain`` on the metrics server: ``userproxy explain`` over the live proxy.

Query parameters: ``service`` (required, ``NAMESPACE/NAME[:PORT]``), ``from`` (the
client's IP, default 127.0.0.1) and ``to`` (``IP`` or ``IP:PORT``, default as for the
command).  The answer is the ``-o json`` object of ``userproxy explain`` (docs/explain.md)
with ``source`` "server": the same explanation (``explain.explain_planned``) over what the
proxier applied (``Proxier.state`` and ``plans``, the node's NodePort addresses of the
last sync, the listener set's client classifier), plus the live parts
(``explain_live.ProxyLive``: ejections, the client's affinity pin, the next pick).

Statuses: 200 with the explanation; 404 ``{"error": ...}`` for an unknown Service, port
or address (the message lists what exists); 400 ``{"error": ...}`` for a malformed query.

Invariants: read-only (nothing is picked, pinned or counted); one Service's work, on the
loop, with no await in between, so the state explained is one moment's.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from aiohttp import web

from userproxy.admin.status import StatusView
from userproxy.explain import ExplainError, Planned, explain_planned
from userproxy.explain_live import ProxyLive

__all__ = ["add_explain_route"]

#: Bound on every query parameter (a Service name is at most 253 + 63 + a port name).
MAX_PARAMETER = 512


def add_explain_route(
    app: web.Application, status: StatusView, configz: Mapping[str, object]
) -> None:
    """Serve ``/explain`` on ``app`` over the proxy ``status`` views; ``configz`` is the
    proxy's ``/configz`` mapping (kept current by reloads: ``--cluster-cidr`` is read from
    it at each request)."""

    async def serve_explain(request: web.Request) -> web.Response:
        query = request.query
        target = query.get("service", "")
        client = query.get("from", "127.0.0.1") or "127.0.0.1"
        to = query.get("to") or None
        if not target:
            return _error(400, "service is required (NAMESPACE/NAME[:PORT])")
        if any(len(v) > MAX_PARAMETER for v in (target, client, to or "")):
            return _error(400, f"a parameter is longer than {MAX_PARAMETER} characters")
        try:
            ipaddress.ip_address(client)
        except ValueError:
            return _error(400, f"from {client[:64]!r}: not an IP address")
        planned = Planned(
            status.proxier, status.listeners.node_local, _cluster_cidr(configz), "server"
        )
        live = ProxyLive(status.listeners, status.registry)
        try:
            result = explain_planned(planned, target, client, to=to, live=live)
        except ExplainError as exc:
            return _error(404, str(exc))
        return web.json_response(result.as_json())

    app.router.add_get("/explain", serve_explain)


def _cluster_cidr(configz: Mapping[str, object]) -> str | None:
    own = configz.get("userproxy.io")
    value = own.get("cluster_cidr") if isinstance(own, Mapping) else None
    return value if isinstance(value, str) and value else None


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
