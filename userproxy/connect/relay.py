"""One local client connection relayed to a pod through a port-forward (``portforward``).

The local side is an asyncio Protocol (the project's data path uses Protocols, not
streams); the pod side is the port-forward's WebSocket.  Flow control both ways: the
client's reading pauses while more than ``HIGH`` bytes wait for the WebSocket, and the
pod's bytes wait while the client's transport says its buffer is full
(``pause_writing``).

How a connection ends (v4 has no half-close, see portforward.py):
- the pod side ends cleanly: what it sent is written, then the client gets a FIN;
- the port-forward fails (the kubelet's error channel, a broken WebSocket, or it could
  not be opened): the client is reset, never given a clean end that would make a cut
  response look complete;
- the client sends its FIN: the pod side cannot be told; the relay waits for the pod to
  end (up to ``eof_wait`` seconds of silence), then closes both;
- the client resets or goes away: the WebSocket is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import cast

from userproxy.connect.portforward import PortForward, PortForwardError
from userproxy.dataplane.tcp_relay import reset
from userproxy.logs import RateLimitedLog

log = logging.getLogger(__name__)
#: A pod that refuses every connection would log a line per connection otherwise.
_reset_log = RateLimitedLog(log)

__all__ = ["ForwardedConnection"]

#: Bytes from the client waiting for the WebSocket before the client's reading pauses.
HIGH = 1 << 20


class ForwardedConnection(asyncio.Protocol):
    """Relays one accepted connection through ``open_forward()`` (called once it is
    accepted); ``on_error`` is told why a connection was reset."""

    def __init__(
        self,
        open_forward: Callable[[], Awaitable[PortForward]],
        *,
        eof_wait: float = 5.0,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self._open = open_forward
        self.eof_wait = eof_wait
        self._on_error = on_error
        self._transport: asyncio.Transport | None = None
        self._pending = bytearray()
        self._more = asyncio.Event()  # data, the client's EOF, or its loss
        self._writable = asyncio.Event()
        self._writable.set()
        self._client_eof = False
        self._lost = False
        self._task: asyncio.Task[None] | None = None

    # -- the client's side (protocol callbacks) ----------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses: no isinstance check)
        self._transport = cast("asyncio.Transport", transport)
        transport = self._transport
        transport.pause_reading()  # until the forward is open
        self._task = asyncio.get_running_loop().create_task(self._run())

    def data_received(self, data: bytes) -> None:
        self._pending += data
        self._more.set()
        if len(self._pending) > HIGH and self._transport is not None:
            self._transport.pause_reading()

    def eof_received(self) -> bool:
        self._client_eof = True
        self._more.set()
        return True  # keep our side open: the pod may still answer

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._more.set()
        self._writable.set()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- the relay ---------------------------------------------------------------------
    async def _run(self) -> None:
        transport = self._transport
        assert transport is not None
        try:
            forward = await self._open()
        except PortForwardError as exc:
            self._reset(str(exc))
            return
        try:
            transport.resume_reading()
            up = asyncio.create_task(self._up(forward))
            try:
                clean = await self._down(forward)
            finally:
                up.cancel()
                with contextlib.suppress(asyncio.CancelledError, PortForwardError, OSError):
                    await up
            if clean:
                transport.close()  # written first, then the FIN
        except PortForwardError as exc:
            self._reset(str(exc))
        except (TimeoutError, ConnectionError, OSError) as exc:
            self._reset(f"the port-forward failed: {exc}")
        finally:
            with contextlib.suppress(Exception):
                await forward.close()

    async def _up(self, forward: PortForward) -> None:
        """Client -> pod."""
        transport = self._transport
        assert transport is not None
        while not self._lost:
            await self._more.wait()
            self._more.clear()
            if self._pending:
                data, self._pending = bytes(self._pending), bytearray()
                transport.resume_reading()
                await forward.write(data)
            if self._client_eof and not self._pending:
                return

    async def _down(self, forward: PortForward) -> bool:
        """Pod -> client until the pod side ends (True), or the client's EOF was followed
        by ``eof_wait`` seconds without a byte from the pod (True), or the client left."""
        transport = self._transport
        assert transport is not None
        while not self._lost:
            wait = self.eof_wait if self._client_eof else None
            try:
                async with asyncio.timeout(wait):
                    data = await forward.read()
            except TimeoutError:
                return True
            if not data:
                return True
            await self._writable.wait()
            if transport.is_closing():  # the client left meanwhile
                return False
            transport.write(data)
        return False

    def _reset(self, why: str) -> None:
        _reset_log.log(logging.WARNING, "connect: %s; the client was reset", why, key=why)
        if self._on_error is not None:
            self._on_error(why)
        if self._transport is not None and not self._lost:
            reset(self._transport)  # a RST: a plain abort() sends a FIN
