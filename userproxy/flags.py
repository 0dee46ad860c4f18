"""The command line's flags: one table of the flags that set ``Settings``, and the parser.

A flag row names its ``Settings`` field (the flag's name is the setting's, ``config.
flag_name``); its parsed text goes through the setting's one rule, as the config file's
value does, so a bad value fails while parsing, as argparse does, with the rule's words.
An absent flag sets nothing (``argparse.SUPPRESS``): the file's or the default value stays.
Modelled on kube-proxy's cmd/kube-proxy/app/options.go (one place binds every flag).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from socket import gethostname
from typing import Any, Final, Literal, NoReturn

from userproxy import __version__
from userproxy.check import add_check_parser
from userproxy.cleanup import add_cleanup_parser
from userproxy.config import (
    DURATIONS,
    LOG_FORMATS,
    LOG_LEVELS,
    LOOPS,
    ConfigError,
    Settings,
    check_setting,
    flag_name,
)
from userproxy.config_rules import format_duration, parse_go_duration, show
from userproxy.connect.command import CONNECT_DEFAULTS, add_connect_arguments
from userproxy.dataplane.access_log import ACCESS_LOG_FORMATS
from userproxy.demo import DEMO_DEFAULTS
from userproxy.explain_cli import add_explain_parser
from userproxy.status_cli import add_status_parser


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


def _one_of(choices: Sequence[str]) -> str:
    return "{" + ",".join(choices) + "}"


def _shown_default(setting: str, defaults: Mapping[str, object]) -> str:
    """`` (default: X)`` with X as the flag would be written; "" when the help says it."""
    if setting == "hostname" and setting not in defaults:
        return f" (default: this host's name, here {check_setting(setting, gethostname())})"
    default = Settings.__dataclass_fields__[setting].default
    value = defaults.get(setting, None if default is dataclasses.MISSING else default)
    if value in (None, "", ()) or isinstance(value, bool):
        return ""
    if setting in DURATIONS and isinstance(value, int | float):
        return f" (default: {format_duration(value)})"
    return f" (default: {value})"


@dataclass(frozen=True, slots=True)
class Flag:
    """A flag that sets ``Settings.<setting>``.

    ``store``: ``parse`` the text (a duration setting's: a number of seconds or a Go
    duration, shown as ``DURATION``), then the setting's rule; ``''`` gives ``empty``.
    ``append`` (``--manifests``, repeatable): each item parsed, the list checked by
    ``Settings``.  ``store_true``: a switch, no value."""

    setting: str
    help: str
    metavar: str | None = None
    parse: Callable[[str], object] | None = None
    empty: object = DEFAULT
    action: Literal["store", "append", "store_true"] = "store"

    def _parse(self, text: str) -> object:
        if self.parse is not None:
            return self.parse(text)
        return _seconds(text) if self.setting in DURATIONS else text

    def convert(self, text: str) -> object:
        """The argparse ``type`` of a ``store`` flag."""
        if text == "":
            return self.empty
        try:
            return check_setting(self.setting, self._parse(text))
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(exc.problem) from None
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    def add_to(self, parser: argparse.ArgumentParser, defaults: Mapping[str, object]) -> None:
        """Add the flag; ``defaults`` are the command's own, shown in its ``--help``."""
        valued: dict[str, Any] = {  # a switch takes neither
            "type": self.convert if self.action == "store" else self._parse,
            "metavar": self.metavar or ("DURATION" if self.setting in DURATIONS else None),
        }
        parser.add_argument(
            flag_name(self.setting),
            dest=self.setting,
            default=argparse.SUPPRESS,
            help=self.help + _shown_default(self.setting, defaults),
            action=self.action,
            **({} if self.action == "store_true" else valued),
        )


#: The source flags of ``run`` (the demo serves its own manifests).
RUN_FLAGS: Final = (
    Flag(
        "manifests",
        "a manifest file or a directory of *.yaml, *.yml, *.json (repeatable); "
        "instead of the Kubernetes API",
        "PATH",
        _manifest_path,
        action="append",
    ),
    Flag(
        "kubeconfig",
        "kubeconfig of the API server to watch (in a pod: the in-cluster configuration)",
        "PATH",
        Path,
    ),
    Flag(
        "config_sync_period",
        "how often to re-list Services and EndpointSlices from the API (0: never)",
    ),
    Flag(
        "workers",
        "data-plane processes sharing every listening address (SO_REUSEPORT), fed by one "
        "watch of the API or the manifests (docs/workers.md)",
        "N",
        _integer,
    ),
    Flag(
        "handoff_socket",
        "hand the listening sockets to a new userproxy started with the same PATH (and take "
        "them from a running one): upgrades and restarts refuse no connection "
        "(docs/deploy.md)",
        "PATH",
        Path,
        empty=None,
    ),
)

#: The flags of ``run`` and ``demo``, in the order of their ``--help``.
COMMON_FLAGS: Final = (
    Flag("hostname", "this node's name", "NAME"),
    Flag("loop", "event loop (auto: uvloop when installed)", _one_of(LOOPS)),
    Flag("log_level", "log level", _one_of(LOG_LEVELS)),
    Flag("log_format", "log format", _one_of(LOG_FORMATS)),
    Flag(
        "access_log",
        "write one line per finished TCP connection and ended UDP session to PATH "
        "('-': stderr; '': off, the default)",
        "PATH",
        empty=None,
    ),
    Flag("access_log_format", "access log format", _one_of(ACCESS_LOG_FORMATS)),
    Flag(
        "min_sync_period", "at most one sync per this period on average, burst 2 (0: every change)"
    ),
    Flag("sync_period", "at least one sync per this period"),
    Flag("shutdown_grace", "on SIGTERM/SIGINT, how long open connections may go on"),
    Flag("tcp_fin_timeout", "how long a half-closed TCP connection may live"),
    Flag("tcp_idle_timeout", "close TCP connections idle this long (default: never)"),
    Flag(
        "endpoint_drain",
        "reset TCP connections to an endpoint that left its Service's pool this long ago "
        "(default: never, as kube-proxy)",
    ),
    Flag(
        "max_connections",
        "concurrent proxied connections, two open files each (default: half the open-files "
        "limit, max 100000)",
        "N",
        _integer,
    ),
    Flag(
        "service_connection_share",
        "percent of --max-connections one Service may hold; then its new clients wait in "
        "the backlog while other Services accept (100: no bound of its own)",
        "PERCENT",
        _integer,
    ),
    Flag(
        "client_connection_share",
        "percent of --max-connections one client IP may hold; its further connections are "
        "reset (100: no bound of its own)",
        "PERCENT",
        _integer,
    ),
    Flag("udp_idle_timeout", "end UDP sessions idle this long"),
    Flag(
        "udp_max_sessions",
        "UDP sessions (and their descriptors) at most; the least recently used is evicted "
        "(default: a quarter of the open-files limit, max 10000)",
        "N",
        _integer,
    ),
    Flag(
        "udp_session_rate",
        "datagrams per second one UDP client may send before the excess is dropped and "
        "logged (0: unlimited)",
        "N",
        _integer,
    ),
    Flag(
        "service_proxy_name",
        "serve only objects labelled service.kubernetes.io/service-proxy-name=NAME",
        "NAME",
    ),
    # '' turns a server off (kube-proxy's flags: "set empty to disable"); an address without
    # a port gets the default port, as in the file.
    Flag(
        "healthz_bind_address",
        "IP:PORT of the health server, /healthz and /livez ('' or port 0: off)",
        "IP:PORT",
        empty="",
    ),
    Flag(
        "metrics_bind_address",
        "IP:PORT of the metrics server: /metrics, /healthz, /proxyMode, /configz "
        "('' or port 0: off)",
        "IP:PORT",
        empty="",
    ),
    Flag(
        "nodeport_addresses",
        "comma-separated CIDRs (or 'primary') of the node addresses NodePorts listen on "
        "(default: all local addresses)",
        "CIDRS",
        _comma_list,
    ),
    Flag(
        "manage_addresses",
        "add the service IPs served (ClusterIPs, externalIPs, LB IPs) to a device of our "
        "own over netlink so the kernel delivers them here (Linux, needs CAP_NET_ADMIN)",
        action="store_true",
    ),
    Flag("address_device", "the device --manage-addresses owns", "NAME"),
    Flag("cluster_cidr", "the pods' CIDR range(s), comma-separated", "CIDRS"),
    Flag(
        "balancer",
        "the balancer of every Service without the userproxy.io/balancer annotation: "
        "round-robin, random, least-connections, power-of-two, maglev or a plug-in's name "
        "(default: what --ipvs-scheduler selects, else round-robin)",
        "NAME",
    ),
    Flag(
        "ipvs_scheduler",
        "kube-proxy's IPVS scheduler (rr, lc, wlc, sh, mh, sed, nq, twos; wrr, lblc, "
        "lblcr, dh approximated): selects the closest balancer as the default; "
        "--balancer wins over it",
        "NAME",
    ),
    Flag(
        "outlier_consecutive_failures",
        "eject an endpoint of a Service port after this many failed dials in a row "
        "(0: no outlier ejection)",
        "N",
        _integer,
    ),
    Flag(
        "outlier_base_ejection",
        "an ejection lasts this long times the ejections in a row of the endpoint",
    ),
    Flag("outlier_max_ejection", "an ejection lasts at most this long"),
    Flag(
        "outlier_max_ejected_percent",
        "percent of a Service port's endpoints that may be ejected at once (at least "
        "one, never the last)",
        "PERCENT",
        _integer,
    ),
)


#: Settings that mean nothing on a developer's machine (no node, no node addresses, no
#: UDP: the API's port-forward is TCP only).
_NOT_FOR_CONNECT: Final = frozenset({
    "hostname", "manage_addresses", "address_device", "nodeport_addresses", "cluster_cidr",
    "service_proxy_name", "ipvs_scheduler", "udp_idle_timeout", "udp_max_sessions",
    "udp_session_rate",
})  # fmt: skip
CONNECT_FLAGS: Final = tuple(f for f in COMMON_FLAGS if f.setting not in _NOT_FOR_CONNECT)


def _add_flags(
    parser: argparse.ArgumentParser, flags: Sequence[Flag], defaults: Mapping[str, object]
) -> None:
    """``flags``, then ``--config`` (read by ``cli.settings_from``, below the flags)."""
    for flag in flags:
        flag.add_to(parser, defaults)
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="a KubeProxyConfiguration (and optionally a UserProxyConfiguration) YAML file; "
        "flags override it",
    )


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
    _add_flags(run, RUN_FLAGS + COMMON_FLAGS, {})
    demo = commands.add_parser("demo", help="run three demo backends and proxy them")
    demo.add_argument(
        "--manifests",
        type=_manifest_path,
        default=None,
        metavar="DIR",
        dest="demo_manifests",
        help="demo manifests (default: examples/demo if present, else a packaged copy)",
    )
    _add_flags(demo, COMMON_FLAGS, DEMO_DEFAULTS)
    connect = commands.add_parser(
        "connect",
        help="serve a cluster's Services on this machine, by name, through the API server",
        description="Serve the Services of a cluster on loopback addresses of this machine, "
        "balanced over their ready pods, reached through the API server's port-forward "
        "(docs/connect.md).",
    )
    add_connect_arguments(connect)  # userproxy/connect/command.py
    for flag in CONNECT_FLAGS:
        flag.add_to(connect, CONNECT_DEFAULTS)
    connect.set_defaults(config=None)
    add_check_parser(commands)  # its logic lives in userproxy/check.py
    add_explain_parser(commands)  # userproxy/explain.py
    add_cleanup_parser(commands)  # and this one's in userproxy/cleanup.py
    add_status_parser(commands)  # reads a running proxy: userproxy/status_cli.py
    return parser
