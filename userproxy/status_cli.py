"""``userproxy status``: what a running proxy serves, in the terminal, like ``ipvsadm -Ln``.

Reads ``/status`` (admin/status.py, schema in docs/status.md) from the proxy's metrics
server: ``--server URL``, else the ``metricsBindAddress`` of ``--config FILE``, else the
default ``--metrics-bind-address`` (127.0.0.1:10249; a wildcard bind is asked on loopback).
Prints one line per Service port with its endpoint counts by state, then its listeners and
endpoints, as ``ipvsadm -Ln`` prints a virtual service and its real servers.

Exit status 0 when the proxy answered, 1 when it could not be read (the reason on stderr),
2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO, TypeVar
from urllib.parse import urlencode

__all__ = ["add_status_parser", "default_server", "format_status", "status_command"]

_P = TypeVar("_P", bound=argparse.ArgumentParser)

#: Seconds to wait for the proxy's answer.
TIMEOUT = 10.0


def add_status_parser(commands: argparse._SubParsersAction[_P]) -> None:
    """Register ``status`` with the command line's subcommands."""
    parser = commands.add_parser(
        "status",
        help="print what a running proxy serves: every Service port with its endpoint "
        "counts by state (like ipvsadm -Ln)",
        description="Read /status from a running proxy's metrics server and print every "
        "Service port, its endpoint counts by state, its listeners and its endpoints. "
        "Exit status 0, or 1 when the proxy cannot be read.",
    )
    parser.add_argument(
        "--server",
        metavar="URL",
        help="the proxy's metrics server (default: the metricsBindAddress of --config, "
        "else http://127.0.0.1:10249)",
    )
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="the proxy's config file (for its address)"
    )
    parser.add_argument(
        "-q", "--query", default="", metavar="TEXT", help="only Services whose namespace/name "
        "contains TEXT"
    )  # fmt: skip
    parser.add_argument(
        "--no-endpoints",
        dest="endpoints",
        action="store_false",
        help="print the counts only, not each listener and endpoint",
    )
    parser.add_argument(
        "--events",
        type=int,
        default=10,
        metavar="N",
        help="print the last N events of the timeline (default 10; 0: none)",
    )


def default_server(config: Path | None) -> str:
    """The URL of the local metrics server, from the config file or the default setting."""
    from userproxy.config import Settings
    from userproxy.config_rules import host_port

    address = str(Settings.__dataclass_fields__["metrics_bind_address"].default)
    if config is not None:
        from userproxy.configfile import load_config_file

        address = str(load_config_file(config).values.get("metrics_bind_address", address))
    if not address:
        raise ValueError("the metrics server is off (metricsBindAddress is empty)")
    parsed = host_port(address if ":" in address else f"{address}:10249")
    if parsed is None:
        raise ValueError("the metrics server is off (its port is 0)")
    host, port = parsed
    if host in ("0.0.0.0", "::"):  # a wildcard bind is reached on loopback
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def fetch_status(server: str, query: str = "") -> dict[str, Any]:
    url = server.rstrip("/") + "/status" + (f"?{urlencode({'q': query})}" if query else "")
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        data: dict[str, Any] = json.loads(response.read())
    return data


def format_status(
    data: dict[str, Any], *, endpoints: bool = True, events: int = 0
) -> Iterator[str]:
    """The report: a header, then per Service port a line of counts (and its details),
    then the last ``events`` events of the timeline (UTC times)."""
    yield (
        f"userproxy {data['version']} on node {data['node']}: {data['services_total']} "
        f"Services, {data['sync']['syncs']} syncs"
    )
    yield f"{'Prot':<4} {'Service port':<41} {'Balancer':<15} Endpoints"
    for service in data["services"]:
        name = f"{service['namespace']}/{service['name']}"
        balancer = service["balancer"]
        if service["affinity"]:
            balancer += f" +affinity {service['affinity']['timeout_seconds']}s"
        for port in service["ports"]:
            label = f"{name}:{port['name']}" if port["name"] else name
            c = port["counts"]
            yield (
                f"{port['protocol']:<4} {label:<41} {balancer:<15} {c['endpoints']} endpoints: "
                f"{c['ready']} ready, {c['serving']} serving, {c['terminating']} terminating, "
                f"{c['not_ready']} not ready, {c['ejected']} ejected"
            )
            if not endpoints:
                continue
            for listener in port["listeners"]:
                state = "open" if listener["open"] else "closed"
                why = f" ({listener['reason']})" if listener["reason"] else ""
                yield f"  listen {listener['address']:<30} {listener['kind']:<13} {state}{why}"
            for e in port["endpoints"]:
                flags = [
                    name
                    for name, on in (
                        ("ready" if e["ready"] else "not-ready", True),
                        ("serving", e["serving"]),
                        ("terminating", e["terminating"]),
                        ("local", e["local"]),
                        ("ejected", e["ejected"]),
                    )
                    if on
                ]
                node = f" node {e['node']}" if e["node"] else ""
                yield (
                    f"  -> {e['address']:<30} {','.join(flags):<28} "
                    f"active {e['active_connections']} total {e['connections_total']} "
                    f"bytes {e['bytes_up']}/{e['bytes_down']} "
                    f"dial-fail {e['dial_failures']}{node}"
                )
        if service["error"]:
            yield f"  ! not applied: {service['error']}"
    timeline = data["events"][-events:] if events > 0 else []
    if timeline:
        yield f"Last {len(timeline)} of {len(data['events'])} events:"
    for event in timeline:
        when = time.strftime("%H:%M:%S", time.gmtime(event["time"]))
        yield f"  {when} {event['kind']:<9} {event['message']}"


def status_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``userproxy status`` with parsed ``args``; the exit status."""
    out = sys.stdout if out is None else out
    if args.events < 0:
        print(f"userproxy status: --events must be 0 or more, not {args.events}", file=sys.stderr)
        return 2
    try:
        server = args.server or default_server(args.config)
    except Exception as exc:  # a bad config file or address: say which, exit 2
        print(f"userproxy status: {exc}", file=sys.stderr)
        return 2
    try:
        data = fetch_status(server, args.query)
    except (OSError, ValueError) as exc:  # HTTPError and URLError are OSErrors
        reason = getattr(exc, "reason", exc)
        print(f"userproxy status: cannot read {server}/status: {reason}", file=sys.stderr)
        return 1
    for line in format_status(data, endpoints=args.endpoints, events=args.events):
        print(line, file=out)
    return 0
