"""Command line: argument parsing, logging, signals and the event-loop choice.

This is the only module that reads ``sys.argv``, installs signal handlers or picks the loop.
Exit status: 0 after a clean shutdown, 2 for invalid flags or manifests at start.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from userproxy import __version__
from userproxy.config import LOG_FORMATS, LOG_LEVELS, LOOPS, ConfigError, Settings
from userproxy.logs import setup_logging
from userproxy.proxy import Proxy
from userproxy.sources.manifests import ManifestError

log = logging.getLogger(__name__)


def _duration(text: str) -> float:
    """Seconds, as a number or with a unit suffix (ms, s, m, h): ``1s``, ``250ms``, ``2m``."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for suffix in ("ms", "s", "m", "h"):
        if text.endswith(suffix):
            number, factor = text[: -len(suffix)], units[suffix]
            break
    else:
        number, factor = text, 1.0
    try:
        value = float(number) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 1s, 250ms)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hostname-override", metavar="NAME", help="this node's name")
    parser.add_argument("--loop", choices=LOOPS, default="auto", help="event loop (auto: uvloop)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text")
    parser.add_argument(
        "--min-sync-period", type=_duration, default=1.0, metavar="DURATION",
        help="at most one sync per this period on average, burst 2 (0: sync on every change)",
    )  # fmt: skip
    parser.add_argument(
        "--sync-period", type=_duration, default=30.0, metavar="DURATION",
        help="at least one sync per this period",
    )  # fmt: skip
    parser.add_argument(
        "--shutdown-grace", type=_duration, default=10.0, metavar="DURATION",
        help="on SIGTERM/SIGINT, how long open connections may go on before they are closed",
    )  # fmt: skip
    parser.add_argument(
        "--tcp-fin-timeout", type=_duration, default=120.0, metavar="DURATION",
        help="how long a half-closed TCP connection may live",
    )  # fmt: skip
    parser.add_argument(
        "--tcp-idle-timeout", type=_duration, default=None, metavar="DURATION",
        help="close TCP connections idle this long (default: never)",
    )  # fmt: skip
    parser.add_argument(
        "--max-connections", type=int, default=None, metavar="N",
        help="concurrent proxied connections (default: half the open-files limit, max 100000)",
    )  # fmt: skip
    parser.add_argument(
        "--service-proxy-name", metavar="NAME",
        help="serve only objects labelled service.kubernetes.io/service-proxy-name=NAME",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="userproxy",
        description="A userspace TCP service proxy that does the job of kube-proxy.",
    )
    parser.add_argument("--version", action="version", version=f"userproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="proxy the Services described by manifest files")
    run.add_argument(
        "--manifests", action="append", type=Path, required=True, metavar="PATH",
        help="a manifest file or a directory of *.yaml, *.yml, *.json (repeatable)",
    )  # fmt: skip
    _add_common(run)
    demo = commands.add_parser("demo", help="run three demo backends and proxy them")
    demo.add_argument(
        "--manifests", type=Path, default=None, metavar="DIR",
        help="demo manifests (default: examples/demo if present, else a packaged copy)",
    )  # fmt: skip
    _add_common(demo)
    return parser


def settings_from(args: argparse.Namespace, manifests: Sequence[Path]) -> Settings:
    extra: dict[str, Any] = {}
    if args.hostname_override:
        extra["hostname"] = args.hostname_override
    return Settings(
        manifests=tuple(manifests),
        service_proxy_name=args.service_proxy_name,
        loop=args.loop,
        log_level=args.log_level,
        log_format=args.log_format,
        min_sync_period=args.min_sync_period,
        sync_period=args.sync_period,
        shutdown_grace=args.shutdown_grace,
        tcp_fin_timeout=args.tcp_fin_timeout,
        tcp_idle_timeout=args.tcp_idle_timeout,
        max_connections=args.max_connections,
        **extra,
    )


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
    try:
        if args.command == "demo":
            from userproxy.demo import DEMO_NODE, demo_manifests, run_demo

            args.hostname_override = args.hostname_override or DEMO_NODE
            settings = settings_from(args, [demo_manifests(args.manifests)])
            setup_logging(settings.log_level, settings.log_format)
            run_on_loop(run_demo(settings, install_stop_signals), settings.loop)
        else:
            settings = settings_from(args, args.manifests)
            setup_logging(settings.log_level, settings.log_format)
            run_on_loop(serve(settings), settings.loop)
    except ConfigError as exc:
        print(f"userproxy: {exc}", file=sys.stderr)
        return 2
    except ManifestError as exc:
        print(f"userproxy: invalid manifests:\n{exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
