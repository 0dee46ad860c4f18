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

A listening-socket handoff (``--handoff-socket``, userproxy/handoff/) goes through here too,
both ways: ``open_sockets()`` lists every listening socket this process made and still
holds (what an old process hands over), and ``inherit()`` stores the sockets a new process
received, which ``listening_socket`` then returns for their address instead of binding a
new one: the same socket, so the kernel never refuses a client in between.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import weakref
from collections.abc import Iterable, Iterator

__all__ = [
    "IPV6_FREEBIND",
    "IP_FREEBIND",
    "SocketKey",
    "inherit",
    "inherited_left",
    "listening_socket",
    "open_sockets",
    "socket_key",
]

# Linux socket options Python does not name (linux/in.h, linux/in6.h).
IP_FREEBIND = 15
IPV6_FREEBIND = 78

#: Set once by a ``--workers`` data-plane process (userproxy/workers/child.py): every
#: listening socket then also gets ``SO_REUSEPORT``, so the N workers share each address
#: and the kernel spreads connections and UDP flows over them.
REUSE_PORT = False

#: A listening socket's address: ("tcp" | "udp", the IP in its compressed form, the port).
SocketKey = tuple[str, str, int]

#: Every socket ``listening_socket`` returned; weak, so a socket its owner dropped leaves.
_made: weakref.WeakSet[socket.socket] = weakref.WeakSet()
#: Sockets received in a handoff and not yet taken by ``listening_socket``.
_inherited: dict[SocketKey, socket.socket] = {}


def socket_key(kind: socket.SocketKind, ip: str, port: int) -> SocketKey:
    """The key of a socket of ``kind`` on ``ip:port`` (``::0`` and ``::`` are one key)."""
    proto = "udp" if kind == socket.SOCK_DGRAM else "tcp"
    return (proto, ipaddress.ip_address(ip.split("%", 1)[0]).compressed, port)


def open_sockets() -> Iterator[tuple[SocketKey, socket.socket]]:
    """Every listening socket this process made (or inherited and took) and has not
    closed, with its key; a socket whose address cannot be read is left out."""
    for sock in list(_made):
        if sock.fileno() < 0:
            continue
        try:
            ip, port = sock.getsockname()[:2]
        except OSError:
            continue
        yield socket_key(sock.type, ip, port), sock


def inherit(sockets: Iterable[tuple[SocketKey, socket.socket]]) -> None:
    """Offer handed-over sockets to the next ``listening_socket`` call for their key."""
    for key, sock in sockets:
        old = _inherited.pop(key, None)
        if old is not None:
            old.close()
        _inherited[key] = sock


def inherited_left() -> list[tuple[SocketKey, socket.socket]]:
    """Remove and return the inherited sockets nothing took (the caller closes them)."""
    left = list(_inherited.items())
    _inherited.clear()
    return left


def _take(kind: socket.SocketKind, ip: str, port: int) -> socket.socket | None:
    try:
        key = socket_key(kind, ip, port)
    except ValueError:  # not an IP literal: nothing was handed over for it
        return None
    sock = _inherited.pop(key, None)
    if sock is not None:
        sock.setblocking(False)  # already so (a flag of the shared file), now Python knows
        _made.add(sock)
    return sock


def listening_socket(
    ip: str,
    port: int,
    kind: socket.SocketKind = socket.SOCK_STREAM,
    *,
    freebind: bool = True,
    backlog: int | None = None,
) -> socket.socket:
    """A socket of ``kind`` bound to ``ip:port``; with ``backlog``, also listening (TCP).
    A socket inherited in a handoff for that address is returned as it is (already bound,
    and listening if it was)."""
    if _inherited and (inherited := _take(kind, ip, port)) is not None:
        return inherited
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
    _made.add(sock)
    return sock
