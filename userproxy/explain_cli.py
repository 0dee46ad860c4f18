"""The ``explain`` sub-command's flags and entry point (the logic is in ``explain.py``).

Exit status 0 with the explanation on stdout; 2 when the settings, the manifests or the
target are invalid (the message lists the Services and ports that exist).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO, TypeVar

from userproxy.config import ConfigError
from userproxy.explain import ExplainError, explain, node_view, render
from userproxy.sources.manifest_files import load_manifests
from userproxy.sources.manifest_read import ManifestError

__all__ = ["add_explain_parser", "explain_command"]

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
    parser.add_argument("target", metavar="NAMESPACE/NAME[:PORT]",
                        help="the Service, and its port by name or number (needed if several)")  # fmt: skip
    parser.add_argument("--manifests", action="append", type=Path, required=True, metavar="PATH",
                        help="a manifest file or directory (repeatable)")  # fmt: skip
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="a KubeProxyConfiguration file, as for `run`")  # fmt: skip
    parser.add_argument("--from", dest="client", default="127.0.0.1", metavar="IP",
                        help="the client's IP (default 127.0.0.1: a client on this node)")  # fmt: skip
    parser.add_argument("--to", dest="to", metavar="IP[:PORT]",
                        help="the Service address connected to (default: the ClusterIP for a "
                        "client on the node, else the first NodePort/external/load-balancer one)")  # fmt: skip
    parser.add_argument("--node", dest="hostname", default=argparse.SUPPRESS, metavar="NAME",
                        help="this node's name (as --hostname-override)")  # fmt: skip
    parser.add_argument("--node-address", dest="node_addresses", type=_comma_list,
                        metavar="IPS", help="the node's addresses (default: this host's)")  # fmt: skip
    parser.add_argument("--cluster-cidr", dest="cluster_cidr", default=argparse.SUPPRESS,
                        metavar="CIDRS", help="the pods' CIDR range(s), as for `run`")  # fmt: skip
    parser.add_argument("--nodeport-addresses", dest="nodeport_addresses", type=_comma_list,
                        default=argparse.SUPPRESS, metavar="CIDRS", help="as for `run`")  # fmt: skip
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text")


def explain_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``userproxy explain`` with parsed ``args``; the exit status."""
    from userproxy.cli import settings_from

    out = sys.stdout if out is None else out
    args.manifests = tuple(args.manifests)
    try:
        settings = settings_from(args)[0]
        state = load_manifests(settings.manifests, settings.service_proxy_name)
        local, nodeport = node_view(settings, args.node_addresses)
        result = explain(state, settings, args.target, args.client, local, nodeport, args.to)
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
