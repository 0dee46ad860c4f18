"""Dialing a pod through the API server's port-forward, for the ordinary data path.

A TCP listener dials an endpoint and gets a connected socket back (dataplane/dial.py's
``Dialer``); here that socket is one end of a loopback TCP connection whose other end is
relayed to a port-forward (``ForwardedConnection``).  So everything the data path does
for ``userproxy run`` (balancers, the dial ladder, connection limits, outlier ejection,
endpoint drain, the access log, the status page and metrics) works unchanged for
``userproxy connect``, at the price of one loopback hop per connection.

Why a TCP pair and not ``socketpair()``: a Unix socket has no reset.  When the
port-forward fails, the bridge's end is closed with SO_LINGER 0, the relay sees a RST
and passes it on to the client (tcp_relay.py), so a cut response never looks complete.

Invariants: a dial returns only once the port-forward has announced its port (a refusal
raises ``PortForwardError``, a ``ConnectionError``: the listener counts a failed dial and
tries the next endpoint); a dial cancelled or failed at any point leaves no WebSocket,
socket or relay behind; the bridge's listening socket hands an accepted connection only
to the dial that made it (matched by address), and resets any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Awaitable, Callable

import aiohttp

from userproxy.connect.portforward import ApiEndpoint, PortForward, PortForwardError, open_forward
from userproxy.connect.relay import ForwardedConnection
from userproxy.dataplane.tcp_relay import set_linger_zero
from userproxy.model import Endpoint, ListenerSpec

log = logging.getLogger(__name__)

__all__ = ["FORWARD_TIMEOUT", "PortForwardDialer"]

#: The shortest time an attempt may take to open a port-forward: the listener's dial
#: ladder (250 ms first) suits a connect to a nearby pod, not TLS to an API server and a
#: hop to the kubelet.
FORWARD_TIMEOUT = 10.0
#: How long the two ends of a loopback pair may take to meet (they meet at once).
PAIR_TIMEOUT = 5.0

_Address = tuple[str, int]


class _Bridge:
    """A listening socket on 127.0.0.1 that makes connected loopback pairs."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            self.sock.bind(("127.0.0.1", 0))
            self.sock.listen(1024)
        except BaseException:
            self.sock.close()
            raise
        self.address: _Address = self.sock.getsockname()
        self._waiting: dict[_Address, asyncio.Future[socket.socket]] = {}
        loop.add_reader(self.sock.fileno(), self._accept)

    async def pair(self) -> tuple[socket.socket, socket.socket]:
        """(near, far): two connected non-blocking sockets, the two ends of one connection."""
        near = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        found: asyncio.Future[socket.socket] = self.loop.create_future()
        try:
            err = near.connect_ex(self.address)
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, f"the loopback bridge: {errno.errorcode.get(err, err)}")
            key: _Address = near.getsockname()
            self._waiting[key] = found
            try:
                async with asyncio.timeout(PAIR_TIMEOUT):
                    far = await asyncio.shield(found)
            finally:
                del self._waiting[key]
        except BaseException:
            near.close()
            if found.done() and not found.cancelled():
                found.result().close()  # accepted just as the dial was cancelled
            else:
                found.cancel()
            raise
        return near, far

    def _accept(self) -> None:
        for _ in range(64):
            try:
                far, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: the waiting dial times out
                log.debug("connect: the loopback bridge cannot accept: %s", exc)
                return
            found = self._waiting.get(peer[:2])
            if found is None or found.done():
                set_linger_zero(far)  # not ours: another local process knocked
                far.close()
                continue
            far.setblocking(False)
            found.set_result(far)

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


async def _opened(forward: PortForward) -> PortForward:
    return forward


class PortForwardDialer:
    """The ``Dialer`` of ``userproxy connect``: an endpoint is its pod (``Endpoint.pod``,
    in the Service's namespace) reached through ``api``'s port-forward.

    ``eof_wait`` is ``ForwardedConnection``'s; ``on_error(why)`` is told when a forwarded
    connection is reset because its port-forward failed.  Call :meth:`close` at the end
    (after the listeners' connections are gone)."""

    def __init__(
        self,
        api: ApiEndpoint,
        *,
        timeout: float = FORWARD_TIMEOUT,
        eof_wait: float = 5.0,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.api = api
        self.timeout = timeout
        self.eof_wait = eof_wait
        self._on_error = on_error
        self._session: aiohttp.ClientSession | None = None
        self._bridge: _Bridge | None = None

    async def __call__(
        self,
        loop: asyncio.AbstractEventLoop,
        spec: ListenerSpec,
        endpoint: Endpoint,
        within: float,
    ) -> socket.socket:
        if endpoint.pod is None:  # connect leaves such endpoints out (local_services.py)
            raise OSError(errno.EHOSTUNREACH, f"{endpoint}: no pod to forward to")
        if self._session is None:
            self._session = aiohttp.ClientSession()
        if self._bridge is None:
            self._bridge = _Bridge(loop)
        namespace = spec.spn.namespace
        forward = await _within(
            open_forward(self._session, self.api, namespace, endpoint.pod, endpoint.port),
            max(within, self.timeout),
            f"{namespace}/{endpoint.pod}:{endpoint.port}",
        )
        try:
            near, far = await self._bridge.pair()
        except BaseException:
            await _close_quietly(forward)
            raise
        relay = ForwardedConnection(
            lambda: _opened(forward), eof_wait=self.eof_wait, on_error=self._on_error
        )
        try:
            await loop.connect_accepted_socket(lambda: relay, far)
        except BaseException:
            far.close()
            near.close()
            await _close_quietly(forward)
            raise
        return near

    async def close(self) -> None:
        if self._bridge is not None:
            self._bridge.close()
            self._bridge = None
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _within(opening: Awaitable[PortForward], seconds: float, what: str) -> PortForward:
    """The port-forward ``opening`` gives within ``seconds``.  A deadline that
    cancels an await can lose a result that arrived meanwhile (the dial race of
    dataplane/dial.py): so the opening runs as a task of its own, and a WebSocket it
    opened after all is closed rather than dropped."""
    task = asyncio.ensure_future(opening)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:
        await _abandon(task)
        raise
    if not done:
        await _abandon(task)
        raise PortForwardError(f"{what}: the port-forward did not open within {seconds:g}s")
    return task.result()


async def _abandon(task: asyncio.Future[PortForward]) -> None:
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled() and task.exception() is None:
        await _close_quietly(task.result())


async def _close_quietly(forward: PortForward) -> None:
    with contextlib.suppress(Exception):
        await forward.close()
