"""Listening sockets: one way to bind a TCP or UDP socket for the data plane and the admin ports.

Every listening socket userproxy opens (the Service listeners, the health-check ports) is
made here, as every socket uvicorn serves on goes through its ``Config.bind_socket``.  So
they are all non-blocking and get:

* ``SO_REUSEADDR``, so a port held by connections in TIME_WAIT can be bound again at once;
* ``IPV6_V6ONLY`` on IPv6 sockets, so ``::`` and ``0.0.0.0`` on one port are two sockets
  that never take each other's traffic;
* with ``freebind``, ``IP_FREEBIND``/``IPV6_FREEBIND``: an address that is not (yet) on any
  interface binds all the same and is served as soon as it is local (docs/addressing.md).
  Best effort: without it a non-local address fails at ``bind()`` with EADDRNOTAVAIL,
  which the caller reports like any other bind error.

Invariant: the caller owns a socket only once ``listening_socket`` returns; on any error
(EMFILE from ``socket()``, EADDRINUSE from ``bind()``...) the socket is already closed.
"""

from __future__ import annotations

import contextlib
import socket

__all__ = ["IPV6_FREEBIND", "IP_FREEBIND", "listening_socket"]

# Linux socket options Python does not name (linux/in.h, linux/in6.h).
IP_FREEBIND = 15
IPV6_FREEBIND = 78

#: Set once by a ``--workers`` data-plane process (userproxy/workers/child.py): every
#: listening socket then also gets ``SO_REUSEPORT``, so the N workers share each address
#: and the kernel spreads connections and UDP flows over them.
REUSE_PORT = False


def listening_socket(
    ip: str,
    port: int,
    kind: socket.SocketKind = socket.SOCK_STREAM,
    *,
    freebind: bool = True,
    backlog: int | None = None,
) -> socket.socket:
    """A socket of ``kind`` bound to ``ip:port``; with ``backlog``, also listening (TCP)."""
    v6 = ":" in ip
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if REUSE_PORT:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if freebind:
            with contextlib.suppress(OSError):
                if v6:
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
                else:
                    sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        sock.setblocking(False)
        sock.bind((ip, port))
        if backlog is not None:
            sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock
