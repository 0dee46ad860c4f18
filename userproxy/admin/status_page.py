"""The status page (``/``): the ``/status`` model rendered as plain HTML on the server.

Readable with curl or with JavaScript off: a search form (``?q=``, a substring of
``namespace/name``), one page of Services (``?page=``, ``PAGE_SIZE`` a page, so the page
stays small with 10 000 Services), per Service port its listeners, pools and endpoints, and
the timeline of recent events.  Every value from the cluster is escaped (a Service name or
a bind error is never markup).  The layout follows HAProxy's stats page: one table per
Service, one row per endpoint.
"""

from __future__ import annotations

import time
from html import escape
from typing import Any
from urllib.parse import urlencode

from userproxy.admin.status import StatusPage

__all__ = ["PAGE_SIZE", "render_page"]

#: Services per page of ``/``.
PAGE_SIZE = 100

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1em 2em; color: #222; }
header { display: flex; align-items: baseline; gap: 1em; }
h1 { font-size: 140%; margin: 0.2em 0 0.5em; }
table { border-collapse: collapse; margin: 0.3em 0 1em; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: left; font-size: 90%; }
td { white-space: nowrap; }
th { background: #f2f2f2; }
tr.not-ready td { background: #fff3f0; }
.closed { color: #a00; } .open { color: #070; } .no { color: #999; }
h2 { margin: 1.2em 0 0.2em; font-size: 115%; border-bottom: 1px solid #ddd; }
#live { font-size: 85%; color: #777; }
#live.live { color: #070; } #live.live::before { content: "\\25CF "; }
#live.stale { color: #a00; }
"""


def _yes(value: object) -> str:
    return "yes" if value else '<span class="no">no</span>'


def _link(query: str, page: int) -> str:
    return "/?" + urlencode({"q": query, "page": page} if query else {"page": page})


def render_page(status: StatusPage, *, fragment: bool = False) -> str:
    """The whole page for one ``StatusView.build`` answer; with ``fragment``, only what
    goes inside its ``<main>`` (what admin/status.js swaps in when the page goes live)."""
    main = "\n".join(_main(status))
    if fragment:
        return main
    head = status.header
    query = str(head["query"])
    return "\n".join(
        [
            "<!DOCTYPE html><html><head><meta charset='utf-8'><title>userproxy status</title>",
            f"<style>{_STYLE}</style></head><body>",
            f"<header><h1>userproxy {escape(str(head['version']))} on node"
            f" {escape(str(head['node']))}</h1><span id='live'></span></header>",
            "<form method='get' action='/'><input type='search' name='q' "
            f"value='{escape(query, quote=True)}' placeholder='namespace/name'>"
            "<button type='submit'>Search</button></form>",
            f"<main id='status'>\n{main}\n</main>",
            # Only keeps the page live (admin/live.py); the page is whole without it.
            "<script src='/status.js'></script>",
            "</body></html>",
        ]
    )


def _main(status: StatusPage) -> list[str]:
    """The summary, the Services of the page and the timeline."""
    head = status.header
    query = str(head["query"])
    page, pages = int(str(head["page"])), int(str(head["pages"]))
    sync = head["sync"]
    assert isinstance(sync, dict)
    out = [
        f"<p>{sync['syncs']} syncs, the last took {float(sync['last_duration_seconds']) * 1000:.1f}"
        f" ms; {sync['failed_services']} Services failed. {head['services_total']} Services,"
        f" {head['services_matched']} shown on {pages} pages; at"
        f" {_time(float(str(head['generated_at'])))} UTC. <a href='/status'>JSON</a></p>",
    ]
    nav = []
    if page > 1:
        nav.append(f"<a href='{escape(_link(query, page - 1))}'>previous</a>")
    nav.append(f"page {page} of {pages}")
    if page < pages:
        nav.append(f"<a href='{escape(_link(query, page + 1))}'>next</a>")
    out.append(f"<p class='nav'>{' | '.join(nav)}</p>")
    for service in status.services:
        out.extend(_service(service))
    if not status.services:
        out.append("<p>No Service matches.</p>")
    out.append(f"<p class='nav'>{' | '.join(nav)}</p>")
    out.append(
        "<h2>Recent events</h2><table><tr><th>time (UTC)</th><th>kind</th><th>event</th></tr>"
    )
    events = head["events"]
    assert isinstance(events, list)
    for event in reversed(events):
        out.append(
            f"<tr><td>{_time(float(event['time']))}</td><td>{escape(str(event['kind']))}</td>"
            f"<td>{escape(str(event['message']))}</td></tr>"
        )
    out.append("</table>")
    return out


def _time(stamp: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(stamp))


def _service(service: dict[str, Any]) -> list[str]:
    name = f"{service['namespace']}/{service['name']}"
    affinity = service["affinity"]
    settings = f"type {service['type']}, balancer {service['balancer']}"
    if isinstance(affinity, dict):
        settings += f", ClientIP affinity {affinity['timeout_seconds']}s"
    settings += (
        f", internalTrafficPolicy {service['internal_traffic_policy']}"
        f", externalTrafficPolicy {service['external_traffic_policy']}"
    )
    out = [f"<h2 id='{escape(name, quote=True)}'>{escape(name)}</h2><p>{escape(settings)}</p>"]
    if service["error"]:
        out.append(f"<p class='closed'>not applied: {escape(str(service['error']))}</p>")
    ports = service["ports"]
    for port in ports:
        out.extend(_port(port))
    return out


def _port(port: dict[str, Any]) -> list[str]:
    counts = port["counts"]
    totals = port["totals"]
    title = f"port {port['name'] or '(unnamed)'} {port['port']}/{port['protocol']}"
    summary = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items())
    moved = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in totals.items())
    out = [f"<p><b>{escape(title)}</b>: {escape(summary)}; connections: {escape(moved)}</p>"]
    listeners = port["listeners"]
    out.append("<table><tr><th>listener</th><th>kind</th><th>state</th></tr>")
    for listener in listeners:
        state = "open" if listener["open"] else "closed"
        why = f" ({listener['reason']})" if listener["reason"] else ""
        out.append(
            f"<tr><td>{escape(str(listener['address']))}</td><td>{escape(str(listener['kind']))}"
            f"</td><td class='{state}'>{state}{escape(why)}</td></tr>"
        )
    out.append("</table>")
    pools = port["pools"]
    if pools:
        text = "; ".join(f"{k}: {', '.join(v) or 'none'}" for k, v in pools.items())
        out.append(f"<p>pools: {escape(text)}</p>")
    out.append(
        "<table><tr><th>endpoint</th><th>ready</th><th>serving</th><th>terminating</th>"
        "<th>node</th><th>zone</th><th>hints</th><th>local</th><th>ejected</th>"
        "<th>active</th><th>total</th><th>bytes up</th><th>bytes down</th><th>dial failures</th>"
        "</tr>"
    )
    endpoints = port["endpoints"]
    for e in endpoints:
        hints = ", ".join([*e["zone_hints"], *(f"node {h}" for h in e["node_hints"])])
        row = "" if e["ready"] else " class='not-ready'"
        out.append(
            f"<tr{row}><td>{escape(e['address'])}</td><td>{_yes(e['ready'])}</td>"
            f"<td>{_yes(e['serving'])}</td><td>{_yes(e['terminating'])}</td>"
            f"<td>{escape(e['node'] or '')}</td><td>{escape(e['zone'] or '')}</td>"
            f"<td>{escape(hints)}</td><td>{_yes(e['local'])}</td><td>{_yes(e['ejected'])}</td>"
            f"<td>{e['active_connections']}</td><td>{e['connections_total']}</td>"
            f"<td>{e['bytes_up']}</td><td>{e['bytes_down']}</td><td>{e['dial_failures']}</td></tr>"
        )
    out.append("</table>")
    return out
