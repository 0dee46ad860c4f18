"""The ``explain`` sub-command's flags and entry point (the logic is in ``explain.py``).

Three sources: ``--manifests`` (planned here), ``--kubeconfig`` (one LIST of the API,
``explain_api.py``, planned here) and ``--server URL`` (a running proxy's ``/explain``,
admin/explain_route.py, which explains its live state; printed here in the same form).

Exit status 0 with the explanation on stdout; 2 when the settings, the manifests, the API
or the server cannot be used, or the target is invalid (the message, one line, lists the
Services and ports that exist).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO, TypeVar

from userproxy.config import ConfigError, Settings
from userproxy.dataplane.classify import NodeLocal
from userproxy.explain import (
    ExplainError,
    Explanation,
    Planned,
    Verdict,
    explain_planned,
    plan,
)
from userproxy.explain_api import LIST_TIMEOUT, ApiListError, list_once
from userproxy.hostnet.host_addresses import select_nodeport_addresses
from userproxy.hostnet.node import NodeAddresses
from userproxy.sources.manifest_files import load_manifests
from userproxy.sources.manifest_read import ManifestError
from userproxy.sources.manifests import deliver_all

__all__ = ["add_explain_parser", "explain_command", "node_view", "render"]

_P = TypeVar("_P", bound=argparse.ArgumentParser)


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_explain_parser(commands: argparse._SubParsersAction[_P]) -> None:
    """Register ``explain`` with the command line's subcommands."""
    parser = commands.add_parser(
        "explain",
        help="explain where a connection from a client to a Service may go, and why",
        description="Plan the manifests or the API's objects as `run` would (serving "
        "nothing), or ask a running proxy (--server), and print, step by step, the rules that "
        "decide where a connection from CLIENT to the Service port goes: its listeners, the "
        "client's traffic class, the traffic policy, topology hints, endpoint conditions, "
        "affinity and the balancer; a running proxy adds its live affinity pin, ejected "
        "endpoints and next pick. Exit 2 for an unknown Service or port.",
    )
    parser.add_argument(
        "target",
        metavar="NAMESPACE/NAME[:PORT]",
        help="the Service, and its port by name or number (needed if several)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--manifests",
        action="append",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="PATH",
        help="a manifest file or directory (repeatable)",
    )
    source.add_argument(
        "--kubeconfig",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="PATH",
        help="list the API server of this kubeconfig once, as `run --kubeconfig` lists it "
        "(neither this nor --manifests nor --server: the in-cluster configuration)",
    )
    source.add_argument(
        "--server",
        metavar="URL",
        help="a running proxy's metrics server (e.g. http://127.0.0.1:10249): explain its "
        "live state; the node flags are then the proxy's own",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=LIST_TIMEOUT,
        metavar="SECONDS",
        help=f"bound on listing the API or asking the server (default {LIST_TIMEOUT:g})",
    )
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="a KubeProxyConfiguration file, as for `run`"
    )
    parser.add_argument(
        "--from",
        dest="client",
        default="127.0.0.1",
        metavar="IP",
        help="the client's IP (default 127.0.0.1: a client on this node)",
    )
    parser.add_argument(
        "--to",
        dest="to",
        metavar="IP[:PORT]",
        help="the Service address connected to (default: the ClusterIP for a "
        "client on the node, else the first NodePort/external/load-balancer one)",
    )
    parser.add_argument(
        "--node",
        dest="hostname",
        default=argparse.SUPPRESS,
        metavar="NAME",
        help="this node's name (as --hostname-override)",
    )
    parser.add_argument(
        "--node-address",
        dest="node_addresses",
        type=_comma_list,
        metavar="IPS",
        help="the node's addresses (default: this host's)",
    )
    parser.add_argument(
        "--cluster-cidr",
        dest="cluster_cidr",
        default=argparse.SUPPRESS,
        metavar="CIDRS",
        help="the pods' CIDR range(s), as for `run`",
    )
    parser.add_argument(
        "--nodeport-addresses",
        dest="nodeport_addresses",
        type=_comma_list,
        default=argparse.SUPPRESS,
        metavar="CIDRS",
        help="as for `run`",
    )
    parser.add_argument(
        "--service-proxy-name",
        dest="service_proxy_name",
        default=argparse.SUPPRESS,
        metavar="NAME",
        help="as for `run`",
    )
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text")


def explain_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``userproxy explain`` with parsed ``args``; the exit status."""
    out = sys.stdout if out is None else out
    try:
        try:
            ipaddress.ip_address(args.client)
        except ValueError:
            raise ConfigError(f"--from {args.client!r}: not an IP address") from None
        if not args.timeout > 0:
            raise ConfigError(f"--timeout {args.timeout:g}: must be more than 0")
        if args.server is not None:
            _only_the_proxys_own(args)
            result = from_server(args.server, args.target, args.client, args.to, args.timeout)
        else:
            result = _planned_here(args)
    except (ConfigError, ExplainError, ApiListError, ValueError) as exc:
        print(f"userproxy explain: {exc}", file=sys.stderr)
        return 2
    except ManifestError as exc:
        print(f"userproxy explain: invalid manifests:\n{exc}", file=sys.stderr)
        return 2
    if args.output == "json":
        json.dump(result.as_json(), out, indent=2)
        out.write("\n")
    else:
        out.write("\n".join(render(result)) + "\n")
    return 0


#: Flags that describe the node or the proxy's settings: a running proxy has its own.
_NODE_FLAGS = {
    "config": "--config",
    "hostname": "--node",
    "node_addresses": "--node-address",
    "cluster_cidr": "--cluster-cidr",
    "nodeport_addresses": "--nodeport-addresses",
    "service_proxy_name": "--service-proxy-name",
}


def _only_the_proxys_own(args: argparse.Namespace) -> None:
    """With ``--server`` the proxy's own node and settings are explained: refuse flags
    that would suggest otherwise (silently ignoring them would explain something else)."""
    given = [flag for dest, flag in _NODE_FLAGS.items() if getattr(args, dest, None) is not None]
    if given:
        raise ConfigError(
            f"--server explains the running proxy with its own node and settings; "
            f"leave out {', '.join(given)}"
        )


def _planned_here(args: argparse.Namespace) -> Explanation:
    """Plan the manifests or one LIST of the API here and explain it."""
    from userproxy.cli import settings_from

    if "manifests" in args:
        args.manifests = tuple(args.manifests)
    settings = settings_from(args)[0]
    try:
        local, nodeport = node_view(settings, args.node_addresses)
    except Exception as exc:  # netlink refused or unavailable: say what to do instead
        raise ConfigError(
            f"cannot read this host's addresses ({exc}); pass --node-address IPS"
        ) from None
    if settings.manifests:
        state = load_manifests(settings.manifests, settings.service_proxy_name)
        proxier = plan(settings, nodeport, lambda h: deliver_all(state, h, settings.hostname))
        source = "manifests"
    else:
        proxier = plan(
            settings, nodeport, lambda h: asyncio.run(list_once(settings, h, args.timeout))
        )
        source = "api"
    planned = Planned(proxier, local, settings.cluster_cidr, source)
    return explain_planned(planned, args.target, args.client, to=args.to)


def from_server(
    server: str, target: str, client: str, to: str | None, timeout: float
) -> Explanation:
    """Ask the running proxy at ``server`` (its metrics server) for the explanation.
    Raises ExplainError with the proxy's message for an unknown Service (404) or a bad
    query (400), ValueError when it cannot be asked or its answer is not one."""
    query = {"service": target, "from": client} | ({"to": to} if to else {})
    if not server.startswith(("http://", "https://")):
        raise ValueError(f"--server {server!r}: not an http:// or https:// URL")
    url = server.rstrip("/") + "/explain?" + urllib.parse.urlencode(query)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            message = _error_of(exc.read())
        if exc.code in (400, 404) and message:
            raise ExplainError(message) from None
        raise ValueError(f"{url}: HTTP {exc.code} {message or exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(reason, OSError) and reason.strerror:
            reason = reason.strerror
        raise ValueError(f"cannot ask the proxy at {server}: {reason}") from None
    try:
        data = json.loads(body)
    except ValueError:
        raise ValueError(f"{url}: the answer is not JSON (is {server} a userproxy?)") from None
    if not isinstance(data, dict):
        raise ValueError(f"{url}: the answer is not an explanation")
    return Explanation.from_json(data)


def _error_of(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    error = data.get("error") if isinstance(data, dict) else None
    return error if isinstance(error, str) else ""


def node_view(
    settings: Settings, node_addresses: Sequence[str] | None
) -> tuple[NodeLocal, tuple[str, ...]]:
    """(the client classifier, the NodePort addresses) as ``run`` would have them.

    ``node_addresses`` None: the host's, read as ``run`` reads them (``NodeAddresses``);
    else those addresses stand for the node's ("primary" in --nodeport-addresses then
    selects nothing: it needs the host's routes)."""
    local = NodeLocal()
    cidrs = settings.cluster_cidr.split(",") if settings.cluster_cidr else ()
    if node_addresses is None:
        reader = NodeAddresses(
            local, nodeport_cidrs=settings.nodeport_addresses, cluster_cidrs=cidrs
        )
        asyncio.run(reader.refresh())
        return local, reader.nodeport_addresses()
    local.update(node_addresses, cidrs)
    chosen = [c for c in settings.nodeport_addresses if c != "primary"]
    if settings.nodeport_addresses and not chosen:
        return local, ()
    return local, select_nodeport_addresses(chosen, node_addresses)


def render(x: Explanation) -> list[str]:
    """The text form: one line per step, then the endpoints and the candidates."""
    source = _SOURCES.get(x.source, f" ({x.source})")
    lines = [
        f"explain {x.service}:{x.port} from {x.client} ({x.client_class}) on node {x.node}{source}"
    ]
    lines += [f"  {n}. [{s.rule}] {s.detail}" for n, s in enumerate(x.steps, 1)]
    if x.endpoints:
        lines.append("  endpoints:")
        lines += [f"    {_mark(v, x)} {v.address}: {v.reason}" for v in x.endpoints]
    lines.append(f"  candidates: {', '.join(x.candidates) or 'none (refused)'}")
    if x.affinity is not None:
        pin = x.affinity
        left = pin["expires_in"]
        shown = f"{left:.0f}" if isinstance(left, int | float) else str(left)
        lines.append(f"  pinned: {pin['endpoint']} ({shown}s left)")
    if x.pick:
        lines.append(f"  next pick: {x.pick}")
    return lines


#: The header's words for the source (none for manifests: the form it always had).
_SOURCES = {"manifests": "", "api": " (from the API)", "server": " (live, from the proxy)"}


def _mark(v: Verdict, x: Explanation) -> str:
    """+ a candidate; x ejected; = in the pool but not a candidate (pinned elsewhere); -."""
    if v.address in x.candidates:
        return "+"
    if v.ejected:
        return "x"
    return "=" if v.in_pool else "-"
