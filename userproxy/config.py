"""Typed, validated settings of one userproxy process, and the one rule for each setting.

``Settings`` is built once by the CLI (defaults, then the ``--config`` file, then flags) and
then only read.  Every setting has exactly one rule (``RULES``, from ``config_rules``).  The
flag parser and the config file loader call the same rule, so a value means the same, or
fails with the same problem, whichever way it came; ``Settings`` applies every rule again,
so a ``Settings`` built directly holds the same invariants.  The fixed choices are
``Literal`` types, checked by their rule (as uvicorn's config.py types its loop).
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal, TypedDict, cast, get_args

from userproxy import config_rules as rules
from userproxy.balancers.ipvs import default_balancer, scheduler_rule
from userproxy.balancers.registry import DEFAULT_BALANCER
from userproxy.config_rules import Rule, format_duration
from userproxy.dataplane.access_log import ACCESS_LOG_FORMATS, AccessLogFormat

Loop = Literal["auto", "uvloop", "asyncio"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
LOOPS: Final[tuple[Loop, ...]] = get_args(Loop)
LOG_LEVELS: Final[tuple[LogLevel, ...]] = get_args(LogLevel)
LOG_FORMATS: Final[tuple[LogFormat, ...]] = get_args(LogFormat)


class ConfigError(ValueError):
    """A setting is invalid; the message names the flag or field.

    ``setting`` is the ``Settings`` field at fault when one is, and ``problem`` the message
    without the flag name, so that the CLI can name the config file's field instead when
    the value came from the file."""

    def __init__(self, message: str, *, setting: str | None = None, problem: str = "") -> None:
        super().__init__(message)
        self.setting = setting
        self.problem = problem or message

    @classmethod
    def of(cls, setting: str, problem: str, where: str | None = None) -> ConfigError:
        """``problem`` with ``setting``, named as ``where`` (default: its flag)."""
        return cls(f"{where or flag_name(setting)}: {problem}", setting=setting, problem=problem)


def flag_name(setting: str) -> str:
    """The command-line flag of a ``Settings`` field."""
    return RULES[setting][0]


_DURATION, _POSITIVE_DURATION = rules.duration(), rules.duration(positive=True)

#: ``Settings`` field -> (its flag, its rule).  A value of None means "unset" (the field's
#: optional default) and is not checked.
RULES: Final[Mapping[str, tuple[str, Rule]]] = {
    "manifests": ("--manifests", rules.paths),
    "kubeconfig": ("--kubeconfig", rules.path),
    "hostname": ("--hostname-override", rules.hostname),
    "service_proxy_name": ("--service-proxy-name", rules.label_value),
    "loop": ("--loop", rules.choice(LOOPS)),
    "log_level": ("--log-level", rules.choice(LOG_LEVELS)),
    "log_format": ("--log-format", rules.choice(LOG_FORMATS)),
    "access_log": ("--access-log", rules.access_log_path),
    "access_log_format": ("--access-log-format", rules.choice(ACCESS_LOG_FORMATS)),
    "min_sync_period": ("--min-sync-period", _DURATION),
    "sync_period": ("--sync-period", _POSITIVE_DURATION),
    "shutdown_grace": ("--shutdown-grace", _DURATION),
    "tcp_fin_timeout": ("--tcp-fin-timeout", _DURATION),
    "tcp_idle_timeout": ("--tcp-idle-timeout", _POSITIVE_DURATION),
    "max_connections": ("--max-connections", rules.count(1)),
    "service_connection_share": ("--service-connection-share", rules.percent),
    "client_connection_share": ("--client-connection-share", rules.percent),
    "manifest_poll_interval": ("manifest poll interval", _POSITIVE_DURATION),
    "config_sync_period": ("--config-sync-period", _DURATION),
    # kube-proxy appends its default port to a healthz/metrics address given without one.
    "healthz_bind_address": ("--healthz-bind-address", rules.bind_address(10256)),
    "metrics_bind_address": ("--metrics-bind-address", rules.bind_address(10249)),
    "nodeport_addresses": ("--nodeport-addresses", rules.nodeport_addresses),
    "cluster_cidr": ("--cluster-cidr", rules.cluster_cidr),
    "udp_idle_timeout": ("--udp-idle-timeout", _POSITIVE_DURATION),
    "udp_max_sessions": ("--udp-max-sessions", rules.count(1)),
    "udp_session_rate": ("--udp-session-rate", rules.count(0)),
    "manage_addresses": ("--manage-addresses", rules.boolean),
    "address_device": ("--address-device", rules.device_name),
    "balancer": ("--balancer", rules.balancer_name),
    "ipvs_scheduler": ("--ipvs-scheduler", scheduler_rule),
    "outlier_consecutive_failures": ("--outlier-consecutive-failures", rules.count(0)),
    "outlier_base_ejection": ("--outlier-base-ejection", _POSITIVE_DURATION),
    "outlier_max_ejection": ("--outlier-max-ejection", _POSITIVE_DURATION),
    "outlier_max_ejected_percent": ("--outlier-max-ejected-percent", rules.percent),
    "workers": ("--workers", rules.count(1)),
    "handoff_socket": ("--handoff-socket", rules.path),
    "endpoint_drain": ("--endpoint-drain", _POSITIVE_DURATION),
}

#: The settings that are durations in seconds (shown as Go durations in --help).
DURATIONS: Final = frozenset(
    name for name, (_, rule) in RULES.items() if rule in (_DURATION, _POSITIVE_DURATION)
)


def check_setting(setting: str, value: object, where: str | None = None) -> object:
    """``value`` normalised by the setting's rule, or ``ConfigError.of`` the rule's problem."""
    try:
        return RULES[setting][1](value)
    except ValueError as exc:
        raise ConfigError.of(setting, str(exc), where) from None


@dataclass(frozen=True, slots=True)
class Settings:
    """Invariants: every field holds what its rule in ``RULES`` returns (durations finite
    and >= 0, ``sync_period > 0``, ``min_sync_period <= sync_period``, ``hostname`` trimmed,
    lowercased and not empty, CIDRs normalised, bind addresses ``IP:PORT`` or "" for off);
    ``max_connections``/``udp_max_sessions`` None means derived from RLIMIT_NOFILE;
    exactly one source: ``manifests`` not empty, or a Kubernetes API (``kubeconfig`` or
    ``in_cluster``); ``ipvs_scheduler`` a scheduler userproxy has a balancer for
    (``balancers.ipvs``), ``balancer`` (None: the scheduler's, else round-robin) a name,
    checked against the registered balancers when the proxy starts.  A ``ConfigError``
    raised here carries the field in ``setting``."""

    manifests: tuple[Path, ...] = ()
    kubeconfig: Path | None = None
    in_cluster: bool = False
    hostname: str = field(default_factory=socket.gethostname)
    service_proxy_name: str | None = None
    loop: Loop = "auto"
    log_level: LogLevel = "info"
    log_format: LogFormat = "text"
    #: Where the access log goes ("-": stderr); None: no access log (the default).
    access_log: str | None = None
    access_log_format: AccessLogFormat = "text"
    min_sync_period: float = 1.0
    sync_period: float = 30.0
    shutdown_grace: float = 10.0
    tcp_fin_timeout: float = 120.0
    tcp_idle_timeout: float | None = None
    max_connections: int | None = None
    #: Percent of ``max_connections`` one Service, and one client IP, may hold.
    service_connection_share: int = 50
    client_connection_share: int = 25
    manifest_poll_interval: float = 0.2
    config_sync_period: float = 900.0
    healthz_bind_address: str = "0.0.0.0:10256"
    metrics_bind_address: str = "127.0.0.1:10249"
    nodeport_addresses: tuple[str, ...] = ()
    cluster_cidr: str | None = None
    udp_idle_timeout: float = 30.0
    udp_max_sessions: int | None = None
    udp_session_rate: int = 0
    manage_addresses: bool = False
    address_device: str = "userproxy0"
    #: The default balancer (Services without the ``userproxy.io/balancer`` annotation);
    #: None: what ``ipvs_scheduler`` selects, else round-robin (``balancers.ipvs``).
    balancer: str | None = None
    ipvs_scheduler: str | None = None
    #: Outlier ejection (Envoy's consecutive failures, base/max ejection time, max ejection
    #: percent); 0 failures: off.
    outlier_consecutive_failures: int = 5
    outlier_base_ejection: float = 30.0
    outlier_max_ejection: float = 300.0
    outlier_max_ejected_percent: int = 50
    #: Data-plane processes sharing every listening address (SO_REUSEPORT), fed by one
    #: control plane; 1: today's single process (docs/workers.md).
    workers: int = 1
    #: The Unix socket a running proxy hands its listening sockets over on, and a new one
    #: takes them from (userproxy/handoff/); None: off.
    handoff_socket: Path | None = None
    #: Reset TCP connections whose endpoint left its pool this long ago (None: never, as
    #: kube-proxy; dataplane/endpoint_drain.py).
    endpoint_drain: float | None = None

    # (ip, port), or None when off; the rule has checked the text.
    @property
    def healthz_address(self) -> tuple[str, int] | None:
        return rules.host_port(self.healthz_bind_address) if self.healthz_bind_address else None

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        return rules.host_port(self.metrics_bind_address) if self.metrics_bind_address else None

    @property
    def source_description(self) -> str:
        """Where the Services come from, as the start line says it."""
        if self.manifests:
            return "manifests " + ", ".join(map(str, self.manifests))
        if self.kubeconfig is not None:
            return f"the API server of {self.kubeconfig}"
        return "the API server (in-cluster configuration)"

    @property
    def default_balancer(self) -> str:
        """The balancer of Services without the annotation: ``balancer``, else what
        ``ipvs_scheduler`` selects, else round-robin (whether it exists: the registry's)."""
        return default_balancer(self.balancer, self.ipvs_scheduler, DEFAULT_BALANCER)[0]

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if value is not None and name in RULES:
                # Frozen: the normalised value replaces the given one before anyone reads it.
                object.__setattr__(self, name, check_setting(name, value))
        sources = bool(self.manifests) + (self.kubeconfig is not None or self.in_cluster)
        if sources != 1:
            raise ConfigError(
                "give exactly one source: --manifests PATH, or --kubeconfig PATH "
                "(or run in a pod for the in-cluster configuration)"
            )
        if self.kubeconfig is not None and not self.kubeconfig.is_file():
            raise ConfigError.of("kubeconfig", f"{self.kubeconfig} is not a file")
        for path in self.manifests:
            if not path.exists():
                raise ConfigError.of("manifests", f"{path} does not exist")
        if self.min_sync_period > self.sync_period:
            # kube-proxy's validation: minSyncPeriod must be <= syncPeriod.
            raise ConfigError.of(
                "min_sync_period",
                f"{format_duration(self.min_sync_period)} is greater than the sync period "
                f"({format_duration(self.sync_period)})",
            )
        if self.handoff_socket is not None and self.workers > 1:
            raise ConfigError.of(
                "handoff_socket",
                "cannot be combined with --workers (a handoff moves one process's sockets; "
                "the workers' parent holds none)",
            )
        if self.outlier_base_ejection > self.outlier_max_ejection:
            raise ConfigError.of(
                "outlier_base_ejection",
                f"{format_duration(self.outlier_base_ejection)} is greater than the maximum "
                f"ejection time ({format_duration(self.outlier_max_ejection)})",
            )


#: Settings a running proxy takes on at reload (``Proxy.reload``, SIGHUP): read afresh by
#: the sync runner, the sweeper, the UDP session table and the shutdown sequence.  A change
#: to any other setting (addresses bound, the loop, the source, the node's name, the limits
#: sized at start, the UDP rate each listener takes when it opens, --manage-addresses ...)
#: needs a restart; reload names it and keeps the old value.
RELOADABLE = frozenset(
    {
        "log_level",
        "log_format",
        "min_sync_period",
        "sync_period",
        "shutdown_grace",
        "tcp_fin_timeout",
        "tcp_idle_timeout",
        "udp_idle_timeout",
        "endpoint_drain",
    }
)


class SettingsValues(TypedDict, total=False):
    """Keyword arguments of ``Settings``, any of them: a layer of the CLI's precedence
    (the demo's defaults, the config file's values, the flags given).  Each value is what
    the setting's rule returns; ``Settings`` checks them again."""

    manifests: tuple[Path, ...]
    kubeconfig: Path | None
    in_cluster: bool
    hostname: str
    service_proxy_name: str | None
    loop: Loop
    log_level: LogLevel
    log_format: LogFormat
    access_log: str | None
    access_log_format: AccessLogFormat
    min_sync_period: float
    sync_period: float
    shutdown_grace: float
    tcp_fin_timeout: float
    tcp_idle_timeout: float | None
    max_connections: int | None
    service_connection_share: int
    client_connection_share: int
    manifest_poll_interval: float
    config_sync_period: float
    healthz_bind_address: str
    metrics_bind_address: str
    nodeport_addresses: tuple[str, ...]
    cluster_cidr: str | None
    udp_idle_timeout: float
    udp_max_sessions: int | None
    udp_session_rate: int
    manage_addresses: bool
    address_device: str
    balancer: str | None
    ipvs_scheduler: str | None
    outlier_consecutive_failures: int
    outlier_base_ejection: float
    outlier_max_ejection: float
    outlier_max_ejected_percent: int
    workers: int
    handoff_socket: Path | None
    endpoint_drain: float | None


def settings_values(values: Mapping[str, object]) -> SettingsValues:
    """``values`` (names chosen at run time) as typed ``Settings`` keywords: ``Settings``
    checks their types with the rules; a name that is no field is a bug."""
    unknown = values.keys() - Settings.__dataclass_fields__.keys()
    assert not unknown, f"not settings: {sorted(unknown)}"
    return cast("SettingsValues", dict(values))


def configz(settings: Settings) -> dict[str, object]:
    """The effective configuration for ``/configz``: kube-proxy's view, then userproxy's."""
    own: dict[str, object] = {}
    for name in settings.__dataclass_fields__:
        value = getattr(settings, name)
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = [str(item) for item in value]
        own[name] = value
    own["default_balancer"] = settings.default_balancer
    return {
        "kubeproxy.config.k8s.io": {
            "hostnameOverride": settings.hostname,
            "healthzBindAddress": settings.healthz_bind_address,
            "metricsBindAddress": settings.metrics_bind_address,
            "clientConnection": {
                "kubeconfig": str(settings.kubeconfig) if settings.kubeconfig else ""
            },
            "syncPeriod": f"{settings.sync_period:g}s",
            "minSyncPeriod": f"{settings.min_sync_period:g}s",
            "configSyncPeriod": f"{settings.config_sync_period:g}s",
            "nodePortAddresses": list(settings.nodeport_addresses),
            "clusterCIDR": settings.cluster_cidr or "",
            "mode": "userspace",
            "ipvs": {"scheduler": settings.ipvs_scheduler or ""},
        },
        "userproxy.io": own,
    }


def reloaded(old: Settings, new: Settings) -> tuple[Settings, list[str], list[str]]:
    """``old`` with ``new``'s values of the ``RELOADABLE`` settings; the names of the
    changed settings taken on, and of the changed ones that need a restart (kept as they
    were).  ConfigError if the combination is invalid."""
    changed = [
        name
        for name in old.__dataclass_fields__
        if getattr(old, name) != getattr(new, name) and name != "in_cluster"
    ]
    applied = [name for name in changed if name in RELOADABLE]
    restart = [name for name in changed if name not in RELOADABLE]
    effective = dataclasses.replace(old, **{name: getattr(new, name) for name in applied})
    return effective, applied, restart
