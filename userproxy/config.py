"""Typed, validated settings of one userproxy process.

``Settings`` is built once by the CLI from flags and then only read.  Validation happens
here so a bad value is reported with its flag name before anything starts.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path

LOOPS = ("auto", "uvloop", "asyncio")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


class ConfigError(ValueError):
    """A setting is invalid; the message names the flag or field."""


def parse_host_port(text: str, what: str) -> tuple[str, int] | None:
    """``ip:port`` or ``[ip6]:port`` (port 0 or empty text: disabled -> None)."""
    if not text:
        return None
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ConfigError(f"{what}: {text!r} is not IP:PORT (e.g. 0.0.0.0:10256)")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{what}: {host!r} in {text!r} is not an IP address") from None
    port = int(port_text)
    if port > 65535:
        raise ConfigError(f"{what}: port {port} is out of range 0..65535")
    return None if port == 0 else (host, port)


@dataclass(frozen=True, slots=True)
class Settings:
    """Invariants: all durations are >= 0, ``sync_period > 0``, ``max_connections`` is None
    (derive from RLIMIT_NOFILE) or >= 1; exactly one source: ``manifests`` not empty, or a
    Kubernetes API (``kubeconfig`` or ``in_cluster``); bind addresses parse with
    ``parse_host_port`` ("" disables a server)."""

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
    manifest_poll_interval: float = 0.2
    config_sync_period: float = 900.0
    healthz_bind_address: str = "0.0.0.0:10256"
    metrics_bind_address: str = "127.0.0.1:10249"
    nodeport_addresses: tuple[str, ...] = ()
    cluster_cidr: str | None = None
    udp_idle_timeout: float = 30.0
    udp_max_sessions: int | None = None
    udp_session_rate: float = 20_000.0
    manage_addresses: bool = False
    address_device: str = "userproxy0"

    @property
    def healthz_address(self) -> tuple[str, int] | None:
        return parse_host_port(self.healthz_bind_address, "--healthz-bind-address")

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        return parse_host_port(self.metrics_bind_address, "--metrics-bind-address")

    def __post_init__(self) -> None:
        sources = bool(self.manifests) + (self.kubeconfig is not None or self.in_cluster)
        if sources != 1:
            raise ConfigError(
                "give exactly one source: --manifests PATH, or --kubeconfig PATH "
                "(or run in a pod for the in-cluster configuration)"
            )
        if self.kubeconfig is not None and not self.kubeconfig.is_file():
            raise ConfigError(f"--kubeconfig: {self.kubeconfig} is not a file")
        for path in self.manifests:
            if not path.exists():
                raise ConfigError(f"--manifests: {path} does not exist")
        if self.loop not in LOOPS:
            raise ConfigError(f"--loop: {self.loop!r} is not one of {', '.join(LOOPS)}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"--log-level: {self.log_level!r} is not one of {LOG_LEVELS}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"--log-format: {self.log_format!r} is not one of {LOG_FORMATS}")
        if not self.hostname:
            raise ConfigError("--hostname-override: must not be empty")
        for name in ("min_sync_period", "shutdown_grace", "tcp_fin_timeout"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')}: must be >= 0")
        if self.sync_period <= 0:
            raise ConfigError("--sync-period: must be > 0")
        if self.tcp_idle_timeout is not None and self.tcp_idle_timeout <= 0:
            raise ConfigError("--tcp-idle-timeout: must be > 0 (omit it to disable)")
        if self.max_connections is not None and self.max_connections < 1:
            raise ConfigError("--max-connections: must be >= 1")
        if self.udp_idle_timeout <= 0:
            raise ConfigError("--udp-idle-timeout: must be > 0")
        if self.udp_max_sessions is not None and self.udp_max_sessions < 1:
            raise ConfigError("--udp-max-sessions: must be >= 1")
        if self.udp_session_rate < 0:
            raise ConfigError("--udp-session-rate: must be >= 0 (0: unlimited)")
        if self.manifest_poll_interval <= 0:
            raise ConfigError("manifest poll interval must be > 0")
        if self.config_sync_period < 0:
            raise ConfigError("--config-sync-period: must be >= 0 (0 disables resyncs)")
        _ = self.healthz_address, self.metrics_address  # validate both
        for cidr in self.nodeport_addresses:
            if cidr != "primary":
                try:
                    ipaddress.ip_network(cidr, strict=False)
                except ValueError:
                    raise ConfigError(
                        f"--nodeport-addresses: {cidr!r} is not a CIDR or 'primary'"
                    ) from None
        if self.cluster_cidr is not None:
            for cidr in self.cluster_cidr.split(","):
                try:
                    ipaddress.ip_network(cidr.strip(), strict=False)
                except ValueError:
                    raise ConfigError(f"--cluster-cidr: {cidr!r} is not a CIDR") from None


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
