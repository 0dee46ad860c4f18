"""Command line: argument parsing, logging, signals and the event-loop choice.

This is the only module that reads ``sys.argv``, installs signal handlers or picks the loop.
Exit status: 0 after a clean shutdown, 2 for invalid flags or manifests at start.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from userproxy import __version__
from userproxy.check import add_check_parser, check_command
from userproxy.config import LOG_FORMATS, LOG_LEVELS, LOOPS, ConfigError, Settings
from userproxy.configfile import describe, load_config_file, parse_go_duration
from userproxy.logs import setup_logging
from userproxy.proxy import Proxy
from userproxy.sources.manifests import ManifestError

log = logging.getLogger(__name__)


def _duration(text: str) -> float:
    """Seconds: a plain number, or a Go duration as kube-proxy takes (``1s``, ``250ms``,
    ``1m0s``)."""
    try:
        value = float(text)
    except ValueError:
        try:
            value = parse_go_duration(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a duration (e.g. 1s, 250ms, 1m0s)"
            ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def _flag(parser: argparse.ArgumentParser, name: str, field: str, help: str, **kwargs: Any) -> None:
    """A flag that sets Settings.``field``; absent flags leave the file's or default value."""
    default = Settings.__dataclass_fields__[field].default
    shown = "" if default in (None, "", ()) or callable(default) else f" (default: {default})"
    parser.add_argument(name, dest=field, default=argparse.SUPPRESS, help=help + shown, **kwargs)


def _add_common(parser: argparse.ArgumentParser) -> None:
    _flag(parser, "--hostname-override", "hostname", "this node's name", metavar="NAME")
    _flag(parser, "--loop", "loop", "event loop (auto: uvloop when installed)", choices=LOOPS)
    _flag(parser, "--log-level", "log_level", "log level", choices=LOG_LEVELS)
    _flag(parser, "--log-format", "log_format", "log format", choices=LOG_FORMATS)
    duration: dict[str, Any] = {"type": _duration, "metavar": "DURATION"}
    _flag(
        parser,
        "--min-sync-period",
        "min_sync_period",
        "at most one sync per this period on average, burst 2 (0: every change)",
        **duration,
    )
    _flag(parser, "--sync-period", "sync_period", "at least one sync per this period", **duration)
    _flag(
        parser,
        "--shutdown-grace",
        "shutdown_grace",
        "on SIGTERM/SIGINT, how long open connections may go on",
        **duration,
    )
    _flag(
        parser,
        "--tcp-fin-timeout",
        "tcp_fin_timeout",
        "how long a half-closed TCP connection may live",
        **duration,
    )
    _flag(
        parser,
        "--tcp-idle-timeout",
        "tcp_idle_timeout",
        "close TCP connections idle this long (default: never)",
        **duration,
    )
    _flag(
        parser,
        "--max-connections",
        "max_connections",
        "concurrent proxied connections (default: half the open-files limit, max 100000)",
        type=int,
        metavar="N",
    )
    _flag(
        parser,
        "--udp-idle-timeout",
        "udp_idle_timeout",
        "end UDP sessions idle this long",
        **duration,
    )
    _flag(
        parser,
        "--udp-max-sessions",
        "udp_max_sessions",
        "UDP sessions (and their descriptors) at most; the least recently used is evicted "
        "(default: a quarter of the open-files limit, max 10000)",
        type=int,
        metavar="N",
    )
    _flag(
        parser,
        "--udp-session-rate",
        "udp_session_rate",
        "datagrams per second one UDP client may send before the excess is dropped "
        "(fairness; 0: unlimited)",
        type=float,
        metavar="N",
    )
    _flag(
        parser,
        "--service-proxy-name",
        "service_proxy_name",
        "serve only objects labelled service.kubernetes.io/service-proxy-name=NAME",
        metavar="NAME",
    )
    _flag(
        parser,
        "--healthz-bind-address",
        "healthz_bind_address",
        "IP:PORT of the health server, /healthz and /livez ('' or port 0: off)",
        metavar="IP:PORT",
    )
    _flag(
        parser,
        "--metrics-bind-address",
        "metrics_bind_address",
        "IP:PORT of the metrics server: /metrics, /healthz, /proxyMode, /configz "
        "('' or port 0: off)",
        metavar="IP:PORT",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="a KubeProxyConfiguration (and optionally a UserProxyConfiguration) YAML file; "
        "flags override it",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="userproxy",
        description="A userspace TCP and UDP service proxy that does the job of kube-proxy.",
    )
    parser.add_argument("--version", action="version", version=f"userproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run", help="proxy the Services from manifest files or from the Kubernetes API"
    )
    _flag(
        run,
        "--manifests",
        "manifests",
        "a manifest file or a directory of *.yaml, *.yml, *.json (repeatable); "
        "instead of the Kubernetes API",
        action="append",
        type=Path,
        metavar="PATH",
    )
    _flag(
        run,
        "--kubeconfig",
        "kubeconfig",
        "kubeconfig of the API server to watch (in a pod: the in-cluster configuration)",
        type=Path,
        metavar="PATH",
    )
    _flag(
        run,
        "--config-sync-period",
        "config_sync_period",
        "how often to re-list Services and EndpointSlices from the API (0: never)",
        type=_duration,
        metavar="DURATION",
    )
    _flag(
        run,
        "--nodeport-addresses",
        "nodeport_addresses",
        "comma-separated CIDRs (or 'primary') of the node addresses NodePorts listen on",
        type=_comma_list,
        metavar="CIDRS",
    )
    _flag(
        run,
        "--manage-addresses",
        "manage_addresses",
        "add the service IPs served (ClusterIPs, externalIPs, LB IPs) to a device of our "
        "own over netlink so the kernel delivers them here (Linux, needs CAP_NET_ADMIN)",
        action="store_true",
    )
    _flag(
        run,
        "--address-device",
        "address_device",
        "the device --manage-addresses owns",
        metavar="NAME",
    )
    _flag(
        run,
        "--cluster-cidr",
        "cluster_cidr",
        "the pods' CIDR range(s), comma-separated",
        metavar="CIDRS",
    )
    _add_common(run)
    demo = commands.add_parser("demo", help="run three demo backends and proxy them")
    demo.add_argument(
        "--manifests",
        type=Path,
        default=None,
        metavar="DIR",
        dest="demo_manifests",
        help="demo manifests (default: examples/demo if present, else a packaged copy)",
    )
    _add_common(demo)
    add_check_parser(commands)  # its logic lives in userproxy/check.py
    return parser


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def settings_from(args: argparse.Namespace, **fixed: Any) -> tuple[Settings, str | None]:
    """Defaults, then the ``--config`` file, then flags (then ``fixed``).

    Returns the settings and a description of the config file's applied and ignored
    fields to log once logging is set up.
    """
    values: dict[str, Any] = {}
    described = None
    fields = Settings.__dataclass_fields__
    flags = {key: value for key, value in vars(args).items() if key in fields}
    if args.config is not None:
        file_config = load_config_file(args.config)
        values.update(file_config.values)
        if {"manifests", "kubeconfig"} & (flags.keys() | fixed.keys()):
            # A source chosen on the command line replaces the file's, whichever it is.
            values.pop("manifests", None)
            values.pop("kubeconfig", None)
        described = f"{args.config}: {describe(file_config)}"
        overridden = sorted(
            (file_config.values.keys() & (flags.keys() | fixed.keys()))
            | ({"kubeconfig", "manifests"} & file_config.values.keys() - values.keys())
        )
        if overridden:
            described += f"; overridden by the command line: {', '.join(overridden)}"
    values.update(flags)
    values.update(fixed)
    if isinstance(values.get("manifests"), list | tuple):
        values["manifests"] = tuple(Path(p) for p in values["manifests"])
    if not values.get("manifests") and values.get("kubeconfig") is None:
        # kube-proxy's rule: no kubeconfig means the in-cluster configuration.
        values["in_cluster"] = "KUBERNETES_SERVICE_HOST" in os.environ
    return Settings(**values), described


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop to run on: uvloop when asked for (or for auto, when importable)."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("--loop uvloop: uvloop is not installed") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def install_stop_signals(stop: Callable[[], None]) -> None:
    """SIGTERM and SIGINT begin a graceful shutdown (call from inside the running loop)."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)


async def serve(settings: Settings) -> None:
    proxy = Proxy(settings)
    install_stop_signals(proxy.stop)
    await proxy.run()


def run_on_loop(main: Coroutine[Any, Any, None], loop_choice: str) -> None:
    with asyncio.Runner(loop_factory=loop_factory(loop_choice)) as runner:
        runner.run(main)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "check":  # validates and prints; serves and binds nothing
        return check_command(args)
    try:
        if args.command == "demo":
            from userproxy.demo import DEMO_NODE, demo_manifests, run_demo

            settings, described = settings_from(
                args,
                manifests=(demo_manifests(args.demo_manifests),),
                hostname=getattr(args, "hostname", DEMO_NODE),
                # The demo is for one machine: its health server stays on loopback.
                healthz_bind_address=getattr(args, "healthz_bind_address", "127.0.0.1:10256"),
            )
            main_coroutine = run_demo(settings, install_stop_signals)
        else:
            settings, described = settings_from(args)
            main_coroutine = serve(settings)
        setup_logging(settings.log_level, settings.log_format)
        if described:
            log.info("config file %s", described)
        run_on_loop(main_coroutine, settings.loop)
    except ConfigError as exc:
        print(f"userproxy: {exc}", file=sys.stderr)
        return 2
    except ManifestError as exc:
        print(f"userproxy: invalid manifests:\n{exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
