"""Connecting to an endpoint: a non-blocking ``connect()`` with a deadline that a busy loop
cannot turn into a false timeout (docs/architecture.md, "The dial and a stalled loop").

``asyncio.timeout()`` around ``loop.create_connection(ip, port)`` cancels a transport the
protocol already holds when the timer fires between ``connection_made`` and the task's
resumption, as it does for every dial pending across a loop stall (uvloop runs expired
timers before it polls for I/O); on uvloop silently, so the relay wrote into a dead handle
and joined a *second* upstream to the client.  So the dial here only connects a socket,
and its deadline asks the kernel (a zero-timeout ``poll()``) before giving up: the timeout
measures how long the endpoint took, not how long the loop was away.  The connected socket
is then wrapped (``create_connection(sock=...)``) with no deadline at all, so nothing ever
cancels a transport that a protocol already holds, except the client going away.
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
import socket
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from userproxy.model import Endpoint, ListenerSpec

__all__ = ["Dialer", "dial"]

_IN_PROGRESS = frozenset({errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY})


def _connect_state(fd: int) -> int:
    """The poll events of ``fd``'s connect: 0 while in progress; POLLOUT alone once
    established; with POLLERR or POLLHUP once failed."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    ready = poller.poll(0)
    return ready[0][1] if ready else 0


async def dial(loop: asyncio.AbstractEventLoop, ip: str, port: int, within: float) -> socket.socket:
    """Return a non-blocking socket connected to ``ip:port``.

    Raises ``TimeoutError`` when the kernel has not finished the connect ``within``
    seconds after it was started, and ``OSError`` when it failed.  On any exception,
    cancellation included, the socket is closed: the caller owns a socket only once this
    returns.
    """
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        err = sock.connect_ex((ip, port))
        if err and err not in _IN_PROGRESS:
            raise OSError(err, os.strerror(err))
        # A nearby endpoint (loopback, the same host) has usually answered before
        # connect() returned: then no watcher, timer or future is needed at all.
        if err and _connect_state(sock.fileno()) != select.POLLOUT:
            await _wait_connected(loop, sock, within)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
    except BaseException:
        sock.close()
        raise
    return sock


async def _wait_connected(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, within: float
) -> None:
    fd = sock.fileno()
    done: asyncio.Future[None] = loop.create_future()

    def finished() -> None:
        if not done.done():
            done.set_result(None)

    def deadline() -> None:
        if done.done():
            return
        if _connect_state(fd):
            # The connect completed while the loop was busy elsewhere: not a timeout.
            done.set_result(None)
        else:
            done.set_exception(TimeoutError())

    loop.add_writer(fd, finished)
    timer = loop.call_later(within, deadline)
    try:
        await done
    finally:
        timer.cancel()
        loop.remove_writer(fd)


class Dialer(Protocol):
    """Another way to reach an endpoint than a TCP connect to its address (``userproxy
    connect`` goes through the API server's port-forward, connect/dialer.py).

    The contract is :func:`dial`'s: return a connected non-blocking TCP socket, raise
    ``OSError`` (or ``TimeoutError``) when ``endpoint`` cannot be reached, so the listener
    counts a failed dial and tries the next endpoint, and own nothing once cancelled.
    ``within`` is the listener's timeout for this attempt, which a slower path may extend.
    """

    async def __call__(
        self,
        loop: asyncio.AbstractEventLoop,
        spec: ListenerSpec,
        endpoint: Endpoint,
        within: float,
    ) -> socket.socket: ...
