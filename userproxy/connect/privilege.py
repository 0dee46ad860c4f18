"""Whether this process may listen on the low ports.

Linux: a port below ``net.ipv4.ip_unprivileged_port_start`` (per network namespace, 1024
by default) needs CAP_NET_BIND_SERVICE in the user namespace that owns the network
namespace.  Reading the process's capabilities is not enough (in a rootless container or
``unshare --user`` they are all set, for a user namespace that owns no network), so the
kernel is asked: one bind to the highest privileged port, which is refused with EACCES
before any check of whether the port is in use.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

__all__ = ["unprivileged_port_start"]

_PORT_START = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")


def _may_bind(port: int, address: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((address, port))
        except OSError as exc:
            return exc.errno != errno.EACCES  # EADDRINUSE: allowed, and taken
    return True


def unprivileged_port_start(address: str = "127.0.0.1") -> int:
    """The lowest port this process may bind on ``address`` without privilege: 0 when it
    has the privilege (or no port is privileged), else the sysctl's value (1024 where it
    cannot be read, the traditional limit)."""
    try:
        start = int(_PORT_START.read_text())
    except (OSError, ValueError):
        start = 1024
    if start <= 0 or _may_bind(start - 1, address):
        return 0
    return start
