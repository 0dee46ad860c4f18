"""Typed, validated settings of one userproxy process, and the one rule for each setting.

``Settings`` is built once by the CLI (defaults, then the ``--config`` file, then flags) and
then only read.  Every setting has exactly one rule (``RULES``: a function that checks a
value and returns it normalised, e.g. a host name trimmed and lowercased, a CIDR with its
host bits cleared).  The flag parser and the config file loader call the same rule, so a
value means the same, or fails with the same problem, whichever way it came; ``Settings``
applies every rule again (they are idempotent), so a ``Settings`` built directly holds the
same invariants.  Range checks live only in the rules.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

LOOPS = ("auto", "uvloop", "asyncio")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
# kube-proxy appends these to a healthz/metrics address given without a port.
DEFAULT_HEALTHZ_PORT: Final = 10256
DEFAULT_METRICS_PORT: Final = 10249
#: Linux's IFNAMSIZ (16) less the terminating NUL: the longest network device name.
MAX_DEVICE_NAME: Final = 15
#: Go's time.Duration ends at 2**63-1 ns (about 292 years); kube-proxy cannot take more.
MAX_DURATION: Final = (2**63 - 1) / 1e9


class ConfigError(ValueError):
    """A setting is invalid; the message names the flag or field.

    ``setting`` is the ``Settings`` field at fault when one is, and ``problem`` the message
    without the flag name, so that the CLI can name the config file's field instead when
    the value came from the file."""

    def __init__(self, message: str, *, setting: str | None = None, problem: str = "") -> None:
        super().__init__(message)
        self.setting = setting
        self.problem = problem or message


def show(value: object) -> str:
    """A value as it would be written in a file or on the command line, for messages."""
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except ValueError:  # a self-referencing YAML alias
        return repr(value)


def format_duration(seconds: float) -> str:
    """Seconds as a Go duration (``30s``, ``15m0s``, ``250ms``), as kube-proxy prints them."""
    if seconds < 1 and seconds != 0:
        return f"{seconds * 1000:g}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours:.0f}h{minutes:.0f}m{secs:g}s"
    if minutes:
        return f"{minutes:.0f}m{secs:g}s"
    return f"{secs:g}s"


def _host_port(text: str) -> tuple[str, int] | None:
    """``ip:port`` or ``[ip6]:port`` (port 0: disabled -> None); ValueError names the problem."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"{text!r} is not IP:PORT (e.g. 0.0.0.0:10256)")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} in {text!r} is not an IP address") from None
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port {port} is out of range 0..65535")
    return None if port == 0 else (host, port)


def parse_host_port(text: str, what: str) -> tuple[str, int] | None:
    """``ip:port`` or ``[ip6]:port`` (port 0 or empty text: disabled -> None)."""
    if not text:
        return None
    try:
        return _host_port(text)
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}", problem=str(exc)) from None


# --- the rules: value -> normalised value, or ValueError(problem) ---------------------------

Rule = Callable[[object], object]


def _duration(*, positive: bool = False) -> Rule:
    """Seconds: finite (NaN would make /configz invalid JSON), not negative, within Go's
    range; with ``positive`` also not 0."""

    def rule(value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{show(value)} is not a duration (like 30s or 1m0s)")
        seconds = float(value)
        if math.isnan(seconds):
            raise ValueError("NaN is not a duration (like 30s or 1m0s)")
        if seconds < 0:
            shown = format_duration(-seconds) if math.isfinite(seconds) else "infinity"
            raise ValueError(f"-{shown} is negative")
        if seconds > MAX_DURATION:
            raise ValueError(f"{seconds:g}s is out of range (at most about 292 years)")
        if positive and seconds == 0:
            raise ValueError("must be greater than 0 (omit it for the default)")
        return seconds

    return rule


def _count(minimum: int) -> Rule:
    def rule(value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{show(value)} is not an integer")
        if value < minimum:
            raise ValueError(f"{value} must be at least {minimum}")
        return value

    return rule


def _percent(value: object) -> object:
    """A whole percentage, 1 to 100 (100: no bound of its own)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{show(value)} is not a whole percentage (1 to 100)")
    if not 1 <= value <= 100:
        raise ValueError(f"{value} is not a percentage from 1 to 100")
    return value


def _choice(choices: tuple[str, ...]) -> Rule:
    def rule(value: object) -> object:
        if value not in choices:
            raise ValueError(f"{show(value)} is not one of {', '.join(choices)}")
        return value

    return rule


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{show(value)} is not a string")
    return value


def _hostname(value: object) -> object:
    """kube-proxy's GetHostname: trimmed and lowercased, and then not empty (a Node name and
    an EndpointSlice's nodeName are lowercase, so "Node-1" would match nothing)."""
    name = _string(value).strip().lower()
    if not name:
        raise ValueError(f"{show(value)} is blank")
    return name


def _bind_address(default_port: int) -> Rule:
    """``IP:PORT``; an address without a port gets ``default_port`` (kube-proxy's rule);
    ``""`` stays ``""``: the server is off."""

    def rule(value: object) -> object:
        text = _string(value).strip()
        if not text:
            return ""
        bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
        try:
            address = ipaddress.ip_address(bare)
        except ValueError:
            pass
        else:
            host = f"[{address}]" if address.version == 6 else str(address)
            text = f"{host}:{default_port}"
        _host_port(text)
        return text

    return rule


_NODEPORT_KEYWORDS: Final[Mapping[str, tuple[str, ...]]] = {
    "localhost": ("127.0.0.0/8", "::1/128"),
    "all": ("0.0.0.0/0", "::/0"),
}


def _network(text: str) -> str:
    """A CIDR with a prefix length (a bare IP is not one, as in kube-proxy), host bits
    cleared as Go's net.ParseCIDR does (``10.1.2.3/8`` is ``10.0.0.0/8``)."""
    if "/" not in text:
        raise ValueError(text)
    return str(ipaddress.ip_network(text, strict=False))


def _nodeport_addresses(value: object) -> object:
    """CIDRs and ``primary``; ``localhost`` and ``all`` expanded; duplicates dropped."""
    if not isinstance(value, tuple | list):
        raise ValueError(f"{show(value)} is not a list of CIDRs")
    result: list[str] = []
    for item in value:
        entry = _string(item).strip()
        if entry == "primary":
            expanded: tuple[str, ...] = (entry,)
        elif entry in _NODEPORT_KEYWORDS:
            expanded = _NODEPORT_KEYWORDS[entry]
        else:
            try:
                expanded = (_network(entry),)
            except ValueError:
                raise ValueError(
                    f"{show(item)} is not a CIDR or one of primary, localhost, all"
                ) from None
        result.extend(cidr for cidr in expanded if cidr not in result)
    return tuple(result)


def _cluster_cidr(value: object) -> object:
    """One CIDR, or an IPv4 and an IPv6 one, comma-separated (kube-proxy's rule)."""
    text = _string(value)
    cidrs = [cidr.strip() for cidr in text.split(",")]
    if len(cidrs) > 2:
        raise ValueError(f"{show(text)} has more than two (a dual-stack pair) CIDRs")
    networks = []
    for cidr in cidrs:
        try:
            networks.append(_network(cidr))
        except ValueError:
            raise ValueError(f"{show(cidr)} in {show(text)} is not a CIDR") from None
    if len(networks) == 2 and (":" in networks[0]) == (":" in networks[1]):
        family = "IPv6" if ":" in networks[0] else "IPv4"
        raise ValueError(
            f"{show(text)} has two {family} CIDRs: a pair must be one IPv4 and one IPv6"
        )
    return ",".join(networks)


def _device_name(value: object) -> object:
    """A name the kernel takes for a device (net/core/dev.c dev_valid_name)."""
    name = _string(value)
    length = len(name.encode())
    if length > MAX_DEVICE_NAME:
        raise ValueError(
            f"{show(name)} is {length} characters long; a Linux device name has at most "
            f"{MAX_DEVICE_NAME} (IFNAMSIZ)"
        )
    if not name or name in (".", "..") or any(c in "/:" or c.isspace() for c in name):
        raise ValueError(f"{show(name)} is not a device name (no '/', ':' or spaces)")
    return name


_LABEL_VALUE: Final = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")


def _label_value(value: object) -> object:
    """A Kubernetes label value, as the label selector of the watches needs one."""
    text = _string(value)
    if not _LABEL_VALUE.fullmatch(text):
        raise ValueError(
            f"{show(text)} is not a label value (at most 63 letters, digits, '-', '_' or '.', "
            "beginning and ending with a letter or digit)"
        )
    return text


def _paths(value: object) -> object:
    if not isinstance(value, tuple | list):
        raise ValueError(f"{show(value)} is not a list of paths")
    if any(isinstance(item, str) and not item.strip() for item in value):
        raise ValueError("an empty path")  # Path("") would be the working directory
    paths = tuple(Path(item) if isinstance(item, str) else item for item in value)
    if not all(isinstance(path, Path) for path in paths):
        raise ValueError(f"{show(value)} is not a list of paths")
    return paths


def _path(value: object) -> object:
    if isinstance(value, str):
        value = Path(value)
    if not isinstance(value, Path):
        raise ValueError(f"{show(value)} is not a path")
    return value


def _boolean(value: object) -> object:
    if not isinstance(value, bool):
        raise ValueError(f"{show(value)} is not true or false")
    return value


def flag_name(setting: str) -> str:
    """The command-line flag of a ``Settings`` field."""
    return RULES[setting][0]


#: ``Settings`` field -> (its flag, its rule).  A value of None means "unset" (the field's
#: optional default) and is not checked.
RULES: Final[Mapping[str, tuple[str, Rule]]] = {
    "manifests": ("--manifests", _paths),
    "kubeconfig": ("--kubeconfig", _path),
    "hostname": ("--hostname-override", _hostname),
    "service_proxy_name": ("--service-proxy-name", _label_value),
    "loop": ("--loop", _choice(LOOPS)),
    "log_level": ("--log-level", _choice(LOG_LEVELS)),
    "log_format": ("--log-format", _choice(LOG_FORMATS)),
    "min_sync_period": ("--min-sync-period", _duration()),
    "sync_period": ("--sync-period", _duration(positive=True)),
    "shutdown_grace": ("--shutdown-grace", _duration()),
    "tcp_fin_timeout": ("--tcp-fin-timeout", _duration()),
    "tcp_idle_timeout": ("--tcp-idle-timeout", _duration(positive=True)),
    "max_connections": ("--max-connections", _count(1)),
    "service_connection_share": ("--service-connection-share", _percent),
    "client_connection_share": ("--client-connection-share", _percent),
    "manifest_poll_interval": ("manifest poll interval", _duration(positive=True)),
    "config_sync_period": ("--config-sync-period", _duration()),
    "healthz_bind_address": ("--healthz-bind-address", _bind_address(DEFAULT_HEALTHZ_PORT)),
    "metrics_bind_address": ("--metrics-bind-address", _bind_address(DEFAULT_METRICS_PORT)),
    "nodeport_addresses": ("--nodeport-addresses", _nodeport_addresses),
    "cluster_cidr": ("--cluster-cidr", _cluster_cidr),
    "udp_idle_timeout": ("--udp-idle-timeout", _duration(positive=True)),
    "udp_max_sessions": ("--udp-max-sessions", _count(1)),
    "udp_session_rate": ("--udp-session-rate", _count(0)),
    "manage_addresses": ("--manage-addresses", _boolean),
    "address_device": ("--address-device", _device_name),
}

#: The settings that are durations in seconds (shown as Go durations in --help).
DURATIONS: Final = frozenset(
    {
        "min_sync_period",
        "sync_period",
        "shutdown_grace",
        "tcp_fin_timeout",
        "tcp_idle_timeout",
        "manifest_poll_interval",
        "config_sync_period",
        "udp_idle_timeout",
    }
)


def check_setting(setting: str, value: object, where: str | None = None) -> object:
    """``value`` normalised by the setting's rule; ``ConfigError`` naming ``where`` (default:
    the flag) and the setting otherwise."""
    flag, rule = RULES[setting]
    try:
        return rule(value)
    except ValueError as exc:
        raise ConfigError(f"{where or flag}: {exc}", setting=setting, problem=str(exc)) from None


@dataclass(frozen=True, slots=True)
class Settings:
    """Invariants: every field holds what its rule in ``RULES`` returns (durations finite
    and >= 0, ``sync_period > 0``, ``min_sync_period <= sync_period``, ``hostname`` trimmed,
    lowercased and not empty, CIDRs normalised, bind addresses ``IP:PORT`` or "" for off);
    ``max_connections``/``udp_max_sessions`` None means derived from RLIMIT_NOFILE;
    exactly one source: ``manifests`` not empty, or a Kubernetes API (``kubeconfig`` or
    ``in_cluster``).  A ``ConfigError`` raised here carries the field in ``setting``."""

    manifests: tuple[Path, ...] = ()
    kubeconfig: Path | None = None
    in_cluster: bool = False
    hostname: str = field(default_factory=socket.gethostname)
    service_proxy_name: str | None = None
    loop: str = "auto"
    log_level: str = "info"
    log_format: str = "text"
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

    @property
    def healthz_address(self) -> tuple[str, int] | None:
        return parse_host_port(self.healthz_bind_address, "--healthz-bind-address")

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        return parse_host_port(self.metrics_bind_address, "--metrics-bind-address")

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
            problem = f"{self.kubeconfig} is not a file"
            raise ConfigError(f"--kubeconfig: {problem}", setting="kubeconfig", problem=problem)
        for path in self.manifests:
            if not path.exists():
                problem = f"{path} does not exist"
                raise ConfigError(f"--manifests: {problem}", setting="manifests", problem=problem)
        if self.min_sync_period > self.sync_period:
            # kube-proxy's validation: minSyncPeriod must be <= syncPeriod.
            problem = (
                f"{format_duration(self.min_sync_period)} is greater than the sync period "
                f"({format_duration(self.sync_period)})"
            )
            raise ConfigError(
                f"--min-sync-period: {problem}", setting="min_sync_period", problem=problem
            )


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
        },
        "userproxy.io": own,
    }
