"""``userproxy connect``: a cluster's Services on this machine, by name, balanced.

The command wires a ``Proxy`` (the same control plane and data path as ``userproxy
run``) to what is particular here: the source is ``ConnectSource`` (some namespaces, no
Node), seen through ``LocalServices`` (a loopback address per Service, TCP ports only,
privileged ports moved up), and its TCP listeners reach pods through the API server's
port-forward (``PortForwardDialer``), or directly with ``--direct``.  Names go to a hosts
file block or a DNS responder (names.py); the summary goes to the terminal (summary.py).

Before anything is served, what a user can get wrong is checked and reported in one line
(exit 2): the kubeconfig and its context, the API server's reachability and credentials,
the namespaces (each must exist), the selector (the server must accept it), the hosts
file and the DNS address.  After that, an API outage is survived as in ``run``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from userproxy.config import ConfigError, Settings, SettingsValues
from userproxy.connect.addresses import DEFAULT_RANGE, AddressBook
from userproxy.connect.local_services import DEFAULT_PORT_OFFSET, LocalServices
from userproxy.connect.names import DnsServer, HostsBlock, parse_dns_address, resolver_hint
from userproxy.connect.privilege import unprivileged_port_start
from userproxy.connect.summary import Summary
from userproxy.proxy import Proxy

if TYPE_CHECKING:
    from kubernetes_asyncio.client import ApiClient, Configuration

log = logging.getLogger("userproxy.connect")

__all__ = ["CONNECT_DEFAULTS", "ConnectOptions", "add_connect_arguments", "run_connect"]

#: ``connect``'s own defaults: no node name to match, no admin server unless asked for,
#: changes applied at once, a short shutdown (a developer's Ctrl-C).
CONNECT_DEFAULTS: Final[SettingsValues] = {
    "hostname": "userproxy-connect",
    "healthz_bind_address": "",
    "metrics_bind_address": "",
    "min_sync_period": 0.1,
    "shutdown_grace": 2.0,
}
#: A namespace name is a DNS label (RFC 1123).
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
#: How long the checks at start wait for the API server.
_CHECK_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class ConnectOptions:
    """What ``connect`` takes besides ``Settings`` (see ``add_connect_arguments``)."""

    kubeconfig: Path
    context: str | None = None
    namespaces: tuple[str, ...] = ()  # empty: all namespaces
    selector: str | None = None
    address_range: str = DEFAULT_RANGE
    hosts_file: Path | None = None
    dns: tuple[str, int] | None = None
    direct: bool = False
    port_offset: int = DEFAULT_PORT_OFFSET
    cluster_domain: str = "cluster.local"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ConnectOptions:
        from userproxy.sources.kubernetes import kubeconfig_context

        kubeconfig = args.kubeconfig or default_kubeconfig()
        namespaces: tuple[str, ...] = ()
        if args.namespace and not args.all_namespaces:
            namespaces = tuple(dict.fromkeys(args.namespace))
        elif not args.all_namespaces:  # the context's namespace, as kubectl takes it
            given = kubeconfig_context(kubeconfig, args.context).get("namespace")
            namespaces = (given if isinstance(given, str) and given else "default",)
        for namespace in namespaces:
            if not _NAMESPACE.match(namespace):
                raise ConfigError(f"--namespace: {namespace!r} is not a namespace name")
        dns = None
        if args.dns is not None:
            dns = parse_dns_address(args.dns, allow_remote=args.dns_allow_remote)
        try:
            AddressBook(args.address_range)
        except ValueError as exc:
            raise ConfigError(f"--address-range: {exc}") from None
        if not 0 < args.port_offset < 65535:
            raise ConfigError(f"--port-offset: {args.port_offset} is not in 1..65534")
        return cls(
            kubeconfig, args.context, namespaces, args.selector or None, args.address_range,
            args.hosts_file, dns, args.direct, args.port_offset, args.cluster_domain,
        )  # fmt: skip


def default_kubeconfig() -> Path:
    """kubectl's: the first file of ``$KUBECONFIG``, else ``~/.kube/config``."""
    paths = [p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
    return Path(paths[0]) if paths else Path.home() / ".kube" / "config"


def add_connect_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``connect`` that are not settings (flags.py adds those)."""
    add = parser.add_argument
    add(
        "--kubeconfig",
        type=Path,
        metavar="PATH",
        help="the kubeconfig (default: $KUBECONFIG's first file, else ~/.kube/config)",
    )
    add("--context", metavar="NAME", help="the kubeconfig's context (default: its current one)")
    add(
        "-n",
        "--namespace",
        action="append",
        metavar="NAMESPACE",
        help="serve this namespace's Services (repeatable; default: the context's "
        "namespace, else default); the first one's also answer to their bare name",
    )
    add("-A", "--all-namespaces", action="store_true", help="serve the Services of every namespace")
    add(
        "-l",
        "--selector",
        metavar="LABELS",
        help="only Services with these labels (as kubectl's, e.g. app=web,tier!=cache)",
    )
    add(
        "--address-range",
        default=DEFAULT_RANGE,
        metavar="CIDR",
        help=f"the loopback range the Services' addresses come from (default: {DEFAULT_RANGE})",
    )
    add(
        "--hosts-file",
        type=Path,
        metavar="PATH",
        help="write the Services' names into a managed block of PATH (e.g. /etc/hosts); "
        "removed at exit, and at the next start after a crash",
    )
    add(
        "--dns",
        metavar="ADDR:PORT",
        help="answer the Services' names over DNS at ADDR:PORT (UDP and TCP), e.g. "
        "127.0.0.1:5353; prints how to point the resolver at it",
    )
    add(
        "--dns-allow-remote",
        action="store_true",
        help="let --dns listen on an address that is not loopback",
    )
    add(
        "--cluster-domain",
        default="cluster.local",
        metavar="DOMAIN",
        help="the cluster's DNS domain, for svc.ns.svc.DOMAIN (default: cluster.local)",
    )
    add(
        "--port-offset",
        type=int,
        default=DEFAULT_PORT_OFFSET,
        metavar="N",
        help="without the privilege to bind ports below 1024, serve them this much higher "
        f"(default: {DEFAULT_PORT_OFFSET}: 80 -> {80 + DEFAULT_PORT_OFFSET})",
    )
    add("--direct", action="store_true",
        help="connect to the pods' IPs instead of through the API server's port-forward "
        "(when this machine routes to the pod network, e.g. kind on Linux with a route)",
    )  # fmt: skip


async def check_access(
    api: ApiClient, configuration: Configuration, options: ConnectOptions
) -> None:
    """Every namespace exists (when Namespaces may be read) and its Services may be
    listed with the selector: ConfigError naming the cause otherwise."""
    import aiohttp
    from kubernetes_asyncio.client import CoreV1Api
    from kubernetes_asyncio.client.exceptions import ApiException

    core = CoreV1Api(api)
    server = str(configuration.host)
    for namespace in options.namespaces or (None,):
        where = f"namespace {namespace!r}" if namespace else "all namespaces"
        try:
            async with asyncio.timeout(_CHECK_TIMEOUT):
                if namespace is None:
                    await core.list_service_for_all_namespaces(
                        label_selector=options.selector or "", limit=1
                    )
                    continue
                try:
                    await core.read_namespace(namespace)
                except ApiException as exc:
                    if exc.status != 403:  # 403: may not read Namespaces; the list tells
                        raise
                await core.list_namespaced_service(
                    namespace, label_selector=options.selector or "", limit=1
                )
        except ApiException as exc:
            raise _refused(exc, server, where, options) from None
        except TimeoutError:
            raise ConfigError(
                f"the API server at {server} did not answer within {_CHECK_TIMEOUT:g}s"
            ) from None
        except (OSError, aiohttp.ClientError) as exc:
            raise ConfigError(f"cannot reach the API server at {server}: {exc}") from None


def _refused(exc: Exception, server: str, where: str, options: ConnectOptions) -> ConfigError:
    """The one line for an API error answering the checks at start."""
    import json

    status = getattr(exc, "status", None)
    message = str(getattr(exc, "reason", "") or "")
    with contextlib.suppress(ValueError, AttributeError):
        message = json.loads(getattr(exc, "body", "") or "{}").get("message") or message
    if status == 404 and where.startswith("namespace"):
        return ConfigError(f"{where} does not exist (kubectl get namespaces lists them)")
    if status == 401:
        return ConfigError(f"the API server at {server} refused the kubeconfig's credentials")
    if status == 403:
        return ConfigError(f"not allowed to list the Services of {where}: {message}")
    if status == 400 and options.selector:
        return ConfigError(f"--selector: the API server rejected {options.selector!r}: {message}")
    return ConfigError(f"the API server at {server} answered {status}: {message}")


def _header(options: ConnectOptions, server: str, low_port_limit: int) -> str:
    scope = (
        "every namespace"
        if not options.namespaces
        else "namespace " + ", ".join(options.namespaces)
    )
    if options.selector:
        scope += f" with labels {options.selector}"
    path = (
        "connecting to the pods' IPs (--direct)"
        if options.direct
        else "reaching pods through the API server's port-forward"
    )
    lines = [f"userproxy connect: the Services of {scope} at {server}, {path}"]
    if low_port_limit:
        example = 80 + options.port_offset
        lines.append(
            f"ports below {low_port_limit} are served {options.port_offset} higher "
            f"(this process may not bind them): 80 -> {example}"
        )
    if options.hosts_file is not None:
        lines.append(f"names: in {options.hosts_file} (a managed block, removed at exit)")
    elif options.dns is None:
        lines.append(
            "names: none (give --hosts-file PATH or --dns ADDR:PORT); use the addresses below"
        )
    return "\n".join(lines) + "\n"


def _domains(options: ConnectOptions) -> list[str]:
    """The DNS domains to route to the responder: the cluster domain and each namespace."""
    return [f"svc.{options.cluster_domain}", *options.namespaces]


async def run_connect(
    settings: Settings,
    options: ConnectOptions,
    install_signals: Callable[[Proxy], Callable[[], int]],
) -> int:
    """Serve until stopped (``install_signals(proxy)`` returns the exit status's getter);
    ConfigError for what the checks at start find (see the module)."""
    from kubernetes_asyncio.client import ApiClient

    from userproxy.connect.dialer import PortForwardDialer
    from userproxy.connect.portforward import ApiEndpoint
    from userproxy.connect.source import ConnectSource
    from userproxy.sources.kubernetes import load_client_configuration

    configuration = await load_client_configuration(options.kubeconfig, options.context)
    server = str(configuration.host)
    api = ApiClient(configuration=configuration)
    hosts = HostsBlock(options.hosts_file) if options.hosts_file is not None else None
    dns: DnsServer | None = None
    dialer: PortForwardDialer | None = None
    summary: Summary | None = None
    try:
        await check_access(api, configuration, options)
        low_port_limit = unprivileged_port_start()
        proxy = Proxy(settings, feed=lambda _recorder: source.run())
        services = LocalServices(
            proxy.recorder,
            AddressBook(options.address_range),
            low_port_limit=low_port_limit,
            offset=options.port_offset,
            by_pod=not options.direct,
            primary_namespace=(options.namespaces or ("default",))[0],
            cluster_domain=options.cluster_domain,
            on_change=lambda: summary.changed() if summary is not None else None,
        )
        source = ConnectSource(
            api,
            services,
            namespaces=options.namespaces,
            selector=options.selector,
            on_event=proxy.source_event,
        )
        summary = Summary(
            services,
            after_print=lambda: hosts.update(services.hosts_entries()) if hosts else None,
        )
        if not options.direct:
            dialer = PortForwardDialer(ApiEndpoint.from_configuration(configuration))
            proxy.listeners.dialer = dialer
        if hosts is not None:
            await hosts.start()
        if options.dns is not None:
            dns = DnsServer(services.names)
            await dns.start(*options.dns)
        print(_header(options, server, low_port_limit), end="", flush=True)
        if options.dns is not None:
            print(resolver_hint(*options.dns, _domains(options)), end="", flush=True)
        exit_status = install_signals(proxy)
        first = asyncio.get_running_loop().create_task(_first_summary(proxy, summary))
        try:
            await proxy.run()
        finally:
            first.cancel()
        return exit_status()
    finally:
        if summary is not None:
            summary.close()
        if dns is not None:
            dns.close()
        if hosts is not None:
            await hosts.close()
        if dialer is not None:
            await dialer.close()
        await api.close()


async def _first_summary(proxy: Proxy, summary: Summary) -> None:
    """The summary once the first sync is applied; from then on after every change."""
    await proxy.synced.wait()
    summary.live = True
    summary.print()
