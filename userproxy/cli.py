"""Command line: argument parsing, logging, signals and the event-loop choice.

This is the only module that reads ``sys.argv``, installs signal handlers or picks the loop.
Signals of ``run``: SIGTERM/SIGINT shut down gracefully, a second one forces it; SIGHUP
reloads the settings and the manifests (``reload_settings``), never ending the process.
Exit status: 0 after a clean shutdown, 128 + the signal's number (130 SIGINT, 143 SIGTERM)
after a forced one, 2 for invalid flags or manifests at start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import enum
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from socket import gethostname
from typing import Any, Final, NoReturn, TypeVar

from userproxy import __version__
from userproxy.check import add_check_parser, check_command
from userproxy.cleanup import add_cleanup_parser, cleanup_command
from userproxy.config import (
    DURATIONS,
    LOG_FORMATS,
    LOG_LEVELS,
    LOOPS,
    ConfigError,
    Settings,
    check_setting,
    format_duration,
    show,
)
from userproxy.configfile import describe, load_config_file, parse_go_duration
from userproxy.demo import DEMO_DEFAULTS
from userproxy.logs import setup_logging
from userproxy.proxy import Proxy
from userproxy.sources.manifests import ManifestError

log = logging.getLogger(__name__)

T = TypeVar("T")


class _Default(enum.Enum):
    """What a flag given as ``''`` stands for: the setting's default, as ``""`` means unset
    in the config file (``--kubeconfig=`` is the in-cluster configuration, as in kube-proxy)."""

    DEFAULT = "default"


DEFAULT: Final = _Default.DEFAULT


def _seconds(text: str) -> float:
    """A plain number of seconds, or a Go duration as kube-proxy takes (``1s``, ``250ms``,
    ``1m0s``).  The range (finite, not negative) is the setting's rule."""
    try:
        return float(text)
    except ValueError:
        try:
            return parse_go_duration(text)
        except ValueError:
            raise ValueError(f"{show(text)} is not a duration (e.g. 1s, 250ms, 1m0s)") from None


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{show(text)} is not an integer") from None


def _comma_list(text: str) -> tuple[str, ...]:
    """Comma-separated items; an empty item stays (and fails the rule), as in kube-proxy."""
    return tuple(item.strip() for item in text.split(","))


def _manifest_path(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path")  # as an empty item in the file
    return Path(text)


def _flag_type(field: str, parse: Callable[[str], object], *, empty: object) -> Any:
    """The argparse type of a flag: ``parse`` the text, then the setting's one rule (the
    same the config file's value goes through); ``''`` gives ``empty``."""

    def convert(text: str) -> object:
        if text == "":
            return empty
        try:
            return check_setting(field, parse(text))
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(exc.problem) from None
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _shown_default(field: str, defaults: Mapping[str, object]) -> str:
    """`` (default: X)`` with X as the flag would be written; "" when the help says it."""
    if field in defaults:
        value = defaults[field]
    else:
        default = Settings.__dataclass_fields__[field].default
        if field == "hostname":
            return f" (default: this host's name, here {check_setting(field, gethostname())})"
        value = None if default is dataclasses.MISSING else default
    if value in (None, "", ()) or isinstance(value, bool):
        return ""
    if field in DURATIONS and isinstance(value, int | float):
        return f" (default: {format_duration(value)})"
    return f" (default: {value})"


def _flag(
    parser: argparse.ArgumentParser,
    name: str,
    field: str,
    help: str,
    *,
    parse: Callable[[str], object] | None = str,
    defaults: Mapping[str, object],
    empty: object = DEFAULT,
    **kwargs: Any,
) -> None:
    """A flag that sets Settings.``field``; absent flags leave the file's or default value."""
    if parse is not None:
        kwargs["type"] = _flag_type(field, parse, empty=empty)
    help += _shown_default(field, defaults)
    parser.add_argument(name, dest=field, default=argparse.SUPPRESS, help=help, **kwargs)


def _add_common(parser: argparse.ArgumentParser, defaults: Mapping[str, object]) -> None:
    """The flags of ``run`` and ``demo``; ``defaults`` are the command's own (``--help``)."""

    def flag(name: str, field: str, help: str, **kwargs: Any) -> None:
        _flag(parser, name, field, help, defaults=defaults, **kwargs)

    duration: dict[str, Any] = {"parse": _seconds, "metavar": "DURATION"}
    flag("--hostname-override", "hostname", "this node's name", metavar="NAME")
    flag("--loop", "loop", "event loop (auto: uvloop when installed)", metavar=_one_of(LOOPS))
    flag("--log-level", "log_level", "log level", metavar=_one_of(LOG_LEVELS))
    flag("--log-format", "log_format", "log format", metavar=_one_of(LOG_FORMATS))
    flag(
        "--min-sync-period",
        "min_sync_period",
        "at most one sync per this period on average, burst 2 (0: every change)",
        **duration,
    )
    flag("--sync-period", "sync_period", "at least one sync per this period", **duration)
    flag(
        "--shutdown-grace",
        "shutdown_grace",
        "on SIGTERM/SIGINT, how long open connections may go on",
        **duration,
    )
    flag(
        "--tcp-fin-timeout",
        "tcp_fin_timeout",
        "how long a half-closed TCP connection may live",
        **duration,
    )
    flag(
        "--tcp-idle-timeout",
        "tcp_idle_timeout",
        "close TCP connections idle this long (default: never)",
        **duration,
    )
    flag(
        "--max-connections",
        "max_connections",
        "concurrent proxied connections, two open files each (default: half the open-files "
        "limit, max 100000)",
        parse=_integer,
        metavar="N",
    )
    flag(
        "--service-connection-share",
        "service_connection_share",
        "percent of --max-connections one Service may hold; then its new clients wait in "
        "the backlog while other Services accept (100: no bound of its own)",
        parse=_integer,
        metavar="PERCENT",
    )
    flag(
        "--client-connection-share",
        "client_connection_share",
        "percent of --max-connections one client IP may hold; its further connections are "
        "reset (100: no bound of its own)",
        parse=_integer,
        metavar="PERCENT",
    )
    flag("--udp-idle-timeout", "udp_idle_timeout", "end UDP sessions idle this long", **duration)
    flag(
        "--udp-max-sessions",
        "udp_max_sessions",
        "UDP sessions (and their descriptors) at most; the least recently used is evicted "
        "(default: a quarter of the open-files limit, max 10000)",
        parse=_integer,
        metavar="N",
    )
    flag(
        "--udp-session-rate",
        "udp_session_rate",
        "datagrams per second one UDP client may send before the excess is dropped and "
        "logged (0: unlimited)",
        parse=_integer,
        metavar="N",
    )
    flag(
        "--service-proxy-name",
        "service_proxy_name",
        "serve only objects labelled service.kubernetes.io/service-proxy-name=NAME",
        metavar="NAME",
    )
    # '' turns a server off (kube-proxy's flags: "set empty to disable"); an address without
    # a port gets the default port, as in the file.
    flag(
        "--healthz-bind-address",
        "healthz_bind_address",
        "IP:PORT of the health server, /healthz and /livez ('' or port 0: off)",
        metavar="IP:PORT",
        empty="",
    )
    flag(
        "--metrics-bind-address",
        "metrics_bind_address",
        "IP:PORT of the metrics server: /metrics, /healthz, /proxyMode, /configz "
        "('' or port 0: off)",
        metavar="IP:PORT",
        empty="",
    )
    flag(
        "--nodeport-addresses",
        "nodeport_addresses",
        "comma-separated CIDRs (or 'primary') of the node addresses NodePorts listen on "
        "(default: all local addresses)",
        parse=_comma_list,
        metavar="CIDRS",
    )
    flag(
        "--manage-addresses",
        "manage_addresses",
        "add the service IPs served (ClusterIPs, externalIPs, LB IPs) to a device of our "
        "own over netlink so the kernel delivers them here (Linux, needs CAP_NET_ADMIN)",
        parse=None,
        action="store_true",
    )
    flag("--address-device", "address_device", "the device --manage-addresses owns", metavar="NAME")
    flag(
        "--cluster-cidr",
        "cluster_cidr",
        "the pods' CIDR range(s), comma-separated",
        metavar="CIDRS",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="a KubeProxyConfiguration (and optionally a UserProxyConfiguration) YAML file; "
        "flags override it",
    )


def _one_of(choices: Sequence[str]) -> str:
    return "{" + ",".join(choices) + "}"


class _Parser(argparse.ArgumentParser):
    """argparse with a short error: the cause on one line, then where the flags are listed
    (the full usage of ``run`` is 17 lines that bury the one that matters)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\nusage: see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
        parse=None,
        defaults={},
        action="append",
        type=_manifest_path,
        metavar="PATH",
    )
    _flag(
        run,
        "--kubeconfig",
        "kubeconfig",
        "kubeconfig of the API server to watch (in a pod: the in-cluster configuration)",
        parse=Path,
        defaults={},
        metavar="PATH",
    )
    _flag(
        run,
        "--config-sync-period",
        "config_sync_period",
        "how often to re-list Services and EndpointSlices from the API (0: never)",
        parse=_seconds,
        defaults={},
        metavar="DURATION",
    )
    _add_common(run, {})
    demo = commands.add_parser("demo", help="run three demo backends and proxy them")
    demo.add_argument(
        "--manifests",
        type=_manifest_path,
        default=None,
        metavar="DIR",
        dest="demo_manifests",
        help="demo manifests (default: examples/demo if present, else a packaged copy)",
    )
    _add_common(demo, DEMO_DEFAULTS)
    add_check_parser(commands)  # its logic lives in userproxy/check.py
    add_cleanup_parser(commands)  # and this one's in userproxy/cleanup.py
    return parser


def settings_from(
    args: argparse.Namespace,
    *,
    defaults: Mapping[str, object] | None = None,
    fixed: Mapping[str, object] | None = None,
) -> tuple[Settings, str | None, dict[str, str]]:
    """``Settings``' defaults, then ``defaults`` (the command's own), then the ``--config``
    file, then flags, then ``fixed``.

    Returns the settings, a description of the config file's applied and ignored fields to
    log once logging is set up, and for each setting that came from the file where it did
    (``FILE: Kind.field``: a later error about it names that, not a flag the user never
    typed).
    """
    values: dict[str, object] = dict(defaults or {})
    fixed = fixed or {}
    described = None
    origins: dict[str, str] = {}
    fields = Settings.__dataclass_fields__
    flags = {key: value for key, value in vars(args).items() if key in fields}
    if args.config is not None:
        file_config = load_config_file(args.config)
        file_values = dict(file_config.values)
        if {"manifests", "kubeconfig"} & (flags.keys() | fixed.keys()):
            # A source chosen on the command line replaces the file's, whichever it is.
            file_values.pop("manifests", None)
            file_values.pop("kubeconfig", None)
        values.update(file_values)
        origins = {
            setting: f"{args.config}: {origin}"
            for setting, origin in file_config.origins.items()
            if setting in file_values and setting not in flags and setting not in fixed
        }
        described = f"{args.config}: {describe(file_config)}"
        overridden = sorted(
            (file_config.values.keys() & (flags.keys() | fixed.keys()))
            | ({"kubeconfig", "manifests"} & file_config.values.keys() - file_values.keys())
        )
        if overridden:
            described += f"; overridden by the command line: {', '.join(overridden)}"
    for key, value in flags.items():
        if value is DEFAULT:  # '' on the command line: back to the default
            values.pop(key, None)
            if defaults and key in defaults:
                values[key] = defaults[key]
        else:
            values[key] = value
    values.update(fixed)
    if not values.get("manifests") and values.get("kubeconfig") is None:
        # kube-proxy's rule: no kubeconfig means the in-cluster configuration.
        values["in_cluster"] = "KUBERNETES_SERVICE_HOST" in os.environ
    make: Callable[..., Settings] = Settings
    try:
        return make(**values), described, origins
    except ConfigError as exc:
        raise located(exc, origins) from None


def located(exc: ConfigError, origins: Mapping[str, str]) -> ConfigError:
    """``exc`` naming the config file's field instead of the flag when the value at fault
    came from the file."""
    if exc.setting is None or exc.setting not in origins:
        return exc
    return ConfigError(
        f"{origins[exc.setting]}: {exc.problem}", setting=exc.setting, problem=exc.problem
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


class StopSignals:
    """SIGTERM and SIGINT: the first begins a graceful shutdown (``stop``), the next one
    forces it (``force``: open connections are reset now instead of at the end of the
    grace period), as uvicorn's "press CTRL+C again to force quit".

    ``exit_status`` is 0, or 128 + the number of the signal that forced the shutdown (130
    for SIGINT, 143 for SIGTERM: what a shell reports for a process that signal ended),
    so that a supervisor can tell connections were cut short on demand."""

    def __init__(self, stop: Callable[[], None], force: Callable[[], None] | None) -> None:
        self._stop = stop
        self._force = force
        self.received: list[int] = []

    def __call__(self, signum: int) -> None:
        self.received.append(signum)
        name = signal.Signals(signum).name
        if len(self.received) == 1:
            again = " (SIGTERM or SIGINT again: close open connections now)" if self._force else ""
            log.info("%s: shutting down%s", name, again)
            self._stop()
        elif self._force is not None:
            log.warning("%s again: closing open connections now", name)
            self._force()

    @property
    def exit_status(self) -> int:
        if self._force is None or len(self.received) < 2:
            return 0
        return 128 + self.received[1]


def _handle_stop_signals(handler: StopSignals) -> StopSignals:
    """``handler`` takes SIGTERM and SIGINT (call from inside the running loop)."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, handler, signum)
    return handler


def install_demo_signals(proxy: Proxy) -> None:
    """The demo's signals, as ``run``'s: SIGTERM/SIGINT stop and a second one forces; SIGHUP
    re-reads the manifests (the demo has no config file to re-read)."""
    _handle_stop_signals(StopSignals(proxy.stop, proxy.force_stop))
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, proxy.reload, proxy.settings)


def reload_settings(proxy: Proxy, args: argparse.Namespace) -> None:
    """SIGHUP: the settings again as at start (defaults, ``--config`` file, flags), handed
    to ``proxy.reload`` (which also re-reads the manifests).  Never raises: the process
    must outlive a bad edit, so an invalid file is logged and the last good settings stay."""
    log.info("SIGHUP: reloading%s", f" {args.config}" if args.config else "")
    try:
        settings, described, _ = settings_from(args)
    except ConfigError as exc:  # already names the file's field when it came from there
        log.error("SIGHUP: %s; keeping the last good settings", exc)
        return
    except Exception:  # a bug in reading must not end the node's proxy either
        log.exception("SIGHUP: cannot reload the settings; keeping the last good ones")
        return
    if described:
        log.info("config file %s", described)
    proxy.reload(settings)


async def serve(settings: Settings, args: argparse.Namespace | None = None) -> int:
    """Run a proxy until stopped; its exit status (see StopSignals).  With ``args``, SIGHUP
    reloads the settings from them; without, SIGHUP keeps its default (exit)."""
    proxy = Proxy(settings)
    stopping = _handle_stop_signals(StopSignals(proxy.stop, proxy.force_stop))
    if args is not None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, reload_settings, proxy, args)
    await proxy.run()
    return stopping.exit_status


def run_on_loop(main: Coroutine[Any, Any, T], loop_choice: str) -> T:
    with asyncio.Runner(loop_factory=loop_factory(loop_choice)) as runner:
        return runner.run(main)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "check":  # validates and prints; serves and binds nothing
        return check_command(args)
    if args.command == "cleanup":  # removes what --manage-addresses left; serves nothing
        return cleanup_command(args)
    origins: dict[str, str] = {}
    try:
        with contextlib.ExitStack() as resources:
            if args.command == "demo":
                from userproxy.demo import demo_manifests, run_demo

                manifests = resources.enter_context(demo_manifests(args.demo_manifests))
                settings, described, origins = settings_from(
                    args, defaults=DEMO_DEFAULTS, fixed={"manifests": (manifests,)}
                )
                main_coroutine: Coroutine[Any, Any, int | None] = run_demo(
                    settings, install_demo_signals
                )
            else:
                settings, described, origins = settings_from(args)
                main_coroutine = serve(settings, args)
            setup_logging(settings.log_level, settings.log_format)
            if described:
                log.info("config file %s", described)
            status = run_on_loop(main_coroutine, settings.loop)
    except ConfigError as exc:
        print(f"userproxy: {located(exc, origins)}", file=sys.stderr)
        return 2
    except ManifestError as exc:
        print(f"userproxy: invalid manifests:\n{exc}", file=sys.stderr)
        return 2
    return status or 0  # None from the demo


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
