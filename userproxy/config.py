"""Typed, validated settings of one userproxy process.

``Settings`` is built once by the CLI from flags and then only read.  Validation happens
here so a bad value is reported with its flag name before anything starts.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

LOOPS = ("auto", "uvloop", "asyncio")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


class ConfigError(ValueError):
    """A setting is invalid; the message names the flag or field."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Invariants: all durations are >= 0, ``sync_period > 0``, ``max_connections`` is None
    (derive from RLIMIT_NOFILE) or >= 1, ``manifests`` is not empty."""

    manifests: tuple[Path, ...]
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

    def __post_init__(self) -> None:
        if not self.manifests:
            raise ConfigError("--manifests: at least one file or directory is required")
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
        if self.manifest_poll_interval <= 0:
            raise ConfigError("manifest poll interval must be > 0")
