"""The ``explain`` sub-command's flags and entry point (the logic is in ``explain.py``).

Exit status 0 with the explanation on stdout; 2 when the settings, the manifests or the
target are invalid (the message lists the Services and ports that exist).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO, TypeVar

from userproxy.config import ConfigError, Settings
from userproxy.dataplane.classify import NodeLocal
from userproxy.explain import ExplainError, Explanation, explain
from userproxy.hostnet.host_addresses import select_nodeport_addresses
from userproxy.hostnet.node import NodeAddresses
from userproxy.sources.manifest_files import load_manifests
from userproxy.sources.manifest_read import ManifestError

__all__ = ["add_explain_parser", "explain_command", "node_view", "render"]

_P = TypeVar("_P", bound=argparse.ArgumentParser)


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_explain_parser(commands: argparse._SubParsersAction[_P]) -> None:
    """Register ``explain`` with the command line's subcommands."""
    parser = commands.add_parser(
        "explain",
        help="explain where a connection from a client to a Service may go, and why",
        description="Plan the manifests as `run` would (serving nothing) and print, step by "
        "step, the rules that decide where a connection from CLIENT to the Service port goes: "
        "its listeners, the client's traffic class, the traffic policy, topology hints, "
        "endpoint conditions, affinity and the balancer. Exit 2 for an unknown Service or port.",
    )
    parser.add_argument(
        "target",
        metavar="NAMESPACE/NAME[:PORT]",
        help="the Service, and its port by name or number (needed if several)",
    )
    parser.add_argument(
        "--manifests",
        action="append",
        type=Path,
        required=True,
        metavar="PATH",
        help="a manifest file or directory (repeatable)",
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
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text")


def explain_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``userproxy explain`` with parsed ``args``; the exit status."""
    from userproxy.cli import settings_from

    out = sys.stdout if out is None else out
    args.manifests = tuple(args.manifests)
    try:
        settings = settings_from(args)[0]
        state = load_manifests(settings.manifests, settings.service_proxy_name)
        try:
            ipaddress.ip_address(args.client)
        except ValueError:
            raise ConfigError(f"--from {args.client!r}: not an IP address") from None
        try:
            local, nodeport = node_view(settings, args.node_addresses)
        except Exception as exc:  # netlink refused or unavailable: say what to do instead
            raise ConfigError(
                f"cannot read this host's addresses ({exc}); pass --node-address IPS"
            ) from None
        result = explain(
            state,
            settings,
            args.target,
            args.client,
            local=local,
            nodeport_addresses=nodeport,
            to=args.to,
        )
    except (ConfigError, ExplainError, ValueError) as exc:
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
    lines = [f"explain {x.service}:{x.port} from {x.client} ({x.client_class}) on node {x.node}"]
    lines += [f"  {n}. [{s.rule}] {s.detail}" for n, s in enumerate(x.steps, 1)]
    if x.endpoints:
        lines.append("  endpoints:")
        lines += [f"    {'+' if v.in_pool else '-'} {v.address}: {v.reason}" for v in x.endpoints]
    lines.append(f"  candidates: {', '.join(x.candidates) or 'none (refused)'}")
    if x.pick:
        lines.append(f"  next pick: {x.pick}")
    return lines
