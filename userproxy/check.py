"""``userproxy check``: validate manifests and print what would be served, serving nothing.

Like ``nginx -t`` and ``haproxy -c``: the manifests are read and validated exactly as
``userproxy run --manifests`` reads them (``sources.manifest_files.load_manifests``, the
same label selector and warnings), then planned by the real control plane: the objects go
through a ``ChangeRecorder`` into a ``Proxier`` given ``NoEffects`` (it changes
nothing), and the listeners printed are its plans.  What is printed is therefore what
``run`` would ask of its data plane, not a second interpretation of the semantics.

Invariants: no socket is opened or bound, no address or device is touched, no event loop
runs, and the node's addresses are not read (NodePorts are shown on "<node addresses>").
Exit status 0 when valid (warnings allowed), 2 when not or the settings are invalid; the
problems go to stderr, the report to stdout, bounded per Service port and warning category.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO, TypeVar

from userproxy.balancers.registry import BalancerRegistry
from userproxy.config import ConfigError, Settings
from userproxy.control.proxier import NoEffects, Proxier
from userproxy.control.trackers import ChangeRecorder
from userproxy.model import AddressKind, Endpoint, IPFamily, ListenerSpec, ServiceKey, ServiceType
from userproxy.proxy_setup import balancer_registry
from userproxy.sources.manifest_files import ManifestState, load_manifests
from userproxy.sources.manifest_read import MAX_SHOWN_PROBLEMS, ManifestError
from userproxy.sources.manifest_warnings import summarize
from userproxy.sources.manifests import deliver_all

__all__ = ["add_check_parser", "check", "check_command", "plan_manifests"]

_P = TypeVar("_P", bound=argparse.ArgumentParser)

#: Endpoints listed per listener; the rest are counted.
SHOWN_ENDPOINTS = 20

#: Stand-ins for "every node address" of each family: the proxier plans NodePort
#: listeners per node address, and check reads none of the real ones.
_NODE_PLACEHOLDERS = {"0.0.0.0": IPFamily.IPv4, "::": IPFamily.IPv6}


def add_check_parser(commands: argparse._SubParsersAction[_P]) -> None:
    """Register ``check`` with the command line's subcommands."""
    parser = commands.add_parser(
        "check",
        help="validate manifests and print what would be served, serving nothing "
        "(exit 0: valid, warnings allowed; 2: invalid)",
        description="Read and validate the manifests as `run --manifests` would, then print "
        "the Services, their ports, addresses and endpoints, and the warnings. Binds and "
        "serves nothing. Exit status 0 when valid (warnings allowed), 2 when invalid.",
    )
    parser.add_argument(
        "--manifests",
        dest="manifests",
        action="append",
        type=Path,
        required=True,
        metavar="PATH",
        help="a manifest file or a directory of *.yaml, *.yml, *.json (repeatable)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="a KubeProxyConfiguration (and optionally a UserProxyConfiguration) YAML file, "
        "for the settings that change what is served (hostnameOverride, nodePortAddresses, "
        "the service proxy name); flags override it",
    )
    # Absent flags (SUPPRESS) leave the config file's value, as `run`'s flags do.
    for name, dest, text in (
        ("--hostname-override", "hostname",
         "this node's name (Local traffic policies, topology hints)"),
        ("--service-proxy-name", "service_proxy_name",
         "check only objects labelled service.kubernetes.io/service-proxy-name=NAME"),
    ):  # fmt: skip
        parser.add_argument(name, dest=dest, default=argparse.SUPPRESS, metavar="NAME", help=text)


def check_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``userproxy check`` with parsed ``args``: the settings, then :func:`check`."""
    # Imported here: the command line imports this module to register the command.
    from userproxy.cli import settings_from

    args.manifests = tuple(args.manifests)
    try:
        # [0]: the settings (the rest is what `run` logs about the config file).
        settings = settings_from(args)[0]
    except ConfigError as exc:
        print(f"userproxy: {exc}", file=sys.stderr)
        return 2
    return check(settings, sys.stdout if out is None else out)


def plan_manifests(
    state: ManifestState, settings: Settings, registry: BalancerRegistry | None = None
) -> dict[ServiceKey, tuple[ListenerSpec, ...]]:
    """The listeners ``run`` would want for ``state``: one sync of the real proxier, with
    ``registry`` (``run``'s, from the settings' default balancer) or the default one.

    NodePort listeners carry the stand-in addresses of :data:`_NODE_PLACEHOLDERS`.
    """
    recorder = ChangeRecorder(settings.hostname, lambda: None)
    deliver_all(state, recorder, settings.hostname)
    proxier = Proxier(
        recorder,
        NoEffects(),
        registry or BalancerRegistry(),
        node_addresses=lambda: tuple(_NODE_PLACEHOLDERS),
    )
    proxier.sync()
    return proxier.specs


def check(settings: Settings, out: TextIO) -> int:
    """Validate ``settings.manifests`` and write the report to ``out``; the exit status."""
    if not settings.manifests:
        print("userproxy: check needs --manifests PATH (it checks manifests)", file=sys.stderr)
        return 2
    try:
        state = load_manifests(settings.manifests, settings.service_proxy_name)
    except ManifestError as exc:
        print(f"userproxy: invalid manifests:\n{exc}", file=sys.stderr)
        out.write(
            f"userproxy check: {_count(len(exc.problems), 'problem')} in the manifests; "
            "invalid, nothing would be served\n"
        )
        return 2
    try:
        registry = balancer_registry(settings)  # an unknown default balancer: as `run`
    except ConfigError as exc:
        print(f"userproxy: {exc}", file=sys.stderr)
        return 2
    specs = plan_manifests(state, settings, registry)
    for line in _report(state, specs, settings):
        out.write(line + "\n")
    return 0


def _report(
    state: ManifestState,
    specs: dict[ServiceKey, tuple[ListenerSpec, ...]],
    settings: Settings,
) -> Iterator[str]:
    served = 0
    addresses: set[tuple[object, ...]] = set()
    unproxied = 0
    for key in sorted(state.services, key=str):
        service = state.services[key]
        if not service.is_proxied:
            unproxied += 1
            external = service.type is ServiceType.EXTERNAL_NAME
            why = "ExternalName" if external else "headless or no clusterIP"
            yield f"Service {key}: not proxied ({why})"
            continue
        served += 1
        yield f"Service {key} ({service.type})"
        listeners = specs.get(key, ())
        addresses.update(spec.key for spec in listeners)
        for port in service.ports:
            yield f"  port {port.name or '(unnamed)'}/{port.protocol}"
            mine = [spec for spec in listeners if spec.spn == service.port_name(port)]
            if not mine:
                yield "    no listeners"
            for spec in mine:
                yield f"    {_address(spec, settings)} ({spec.kind}): {_pools(spec)}"
    node = state.nodes.get(settings.hostname)
    yield (
        f"own node {settings.hostname}: "
        + ("found" if node is not None else "not in the manifests (no endpoint is local)")
    )
    for entry in state.skipped:
        yield f"skipped: {entry}"
    warnings = len(state.warnings)
    if warnings:
        yield f"{_count(warnings, 'warning')}:"
        for line in summarize(state.warnings, MAX_SHOWN_PROBLEMS):
            yield f"  {line}"
    yield (
        f"userproxy check: valid: {_count(served, 'Service')} served on "
        f"{_count(len(addresses), 'address', 'addresses')}, {unproxied} not proxied, "
        f"{_count(len(state.slices), 'EndpointSlice')}, {_count(warnings, 'warning')}"
    )


def _count(n: int, noun: str, plural: str = "") -> str:
    """ "1 warning", "2 warnings" ("2 addresses" with ``plural``)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def _address(spec: ListenerSpec, settings: Settings) -> str:
    if spec.kind is AddressKind.NODE_PORT and spec.ip in _NODE_PLACEHOLDERS:
        family = _NODE_PLACEHOLDERS[spec.ip]
        where = f"<node {family} addresses"
        if settings.nodeport_addresses:
            where += f" in {','.join(settings.nodeport_addresses)}"
        return f"{where}>:{spec.port}"
    return f"[{spec.ip}]:{spec.port}" if ":" in spec.ip else f"{spec.ip}:{spec.port}"


def _endpoints(endpoints: Sequence[Endpoint]) -> str:
    if not endpoints:
        return "no endpoints (connections are refused)"
    shown = [f"{e}{' (terminating)' if e.terminating else ''}" for e in endpoints[:SHOWN_ENDPOINTS]]
    if len(endpoints) > SHOWN_ENDPOINTS:
        shown.append(f"and {len(endpoints) - SHOWN_ENDPOINTS} more")
    return ", ".join(shown)


def _pools(spec: ListenerSpec) -> str:
    """The endpoints each kind of client gets (the node's own only when they differ)."""
    text = _endpoints(spec.pool.endpoints)
    node_pool = spec.node_pool
    if node_pool is not None and node_pool.endpoints != spec.pool.endpoints:
        text += f"; from this node and the cluster: {_endpoints(node_pool.endpoints)}"
    if spec.source_ranges:
        text += f"; only from {','.join(spec.source_ranges)}"
    return text
