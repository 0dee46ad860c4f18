"""A minimal uvloop TCP and UDP relay: the bench's "what Python does without effort" line.

    python -m bench.relay --tcp 127.0.90.4:8080=127.0.91.1:8080 [--tcp ...] [--udp L=T ...]

No features: each listening address relays to one fixed backend.  TCP: accept, dial the
backend, relay both ways (a full write buffer pauses reading on the other side); when
either end closes, the other is closed (a reset is passed on as a reset; no half-close).
UDP: one connected upstream socket per client address, kept until the relay stops.
SIGTERM or SIGINT closes everything and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import signal
from collections.abc import Coroutine, Sequence
from typing import Any, cast

Address = tuple[str, int]
Pairs = Sequence[tuple[Address, Address]]


class _End(asyncio.Protocol):
    """One side of a relayed connection; ``other`` is the other side once it exists."""

    transport: asyncio.Transport | None = None
    other: _End | None = None
    closed = False

    def __init__(self, relay: Relay, to: Address | None = None) -> None:
        self.relay, self.to, self.early = relay, to, bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast("asyncio.Transport", transport)  # uvloop's: no subclass
        if self.to is not None:  # accepted: hold the client until the backend answers
            transport.pause_reading()
            self.relay.conns.add(self)
            self.relay.spawn(self._dial(self.to))
        elif self.other is not None and not self.other.closed:  # dialled
            self.other.other = self
            transport.write(self.other.early)
            self.resume_writing()  # reading the client again
        else:
            transport.close()

    async def _dial(self, to: Address) -> None:
        up = _End(self.relay)
        up.other = self
        try:
            await asyncio.get_running_loop().create_connection(lambda: up, *to)
        except OSError:
            if self.transport is not None:
                self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.write(data)
        else:  # uvloop may deliver the first bytes despite pause_reading()
            self.early += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.relay.conns.discard(self)
        if self.other is not None and self.other.transport is not None:
            (self.other.transport.close if exc is None else self.other.transport.abort)()

    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()


class _Udp(asyncio.DatagramProtocol):
    """A listening socket (``client`` None) or one client's upstream socket."""

    transport: asyncio.DatagramTransport | None = None

    def __init__(self, relay: Relay, to: Address, client: Address | None = None) -> None:
        self.relay, self.to, self.client = relay, to, client
        self.sessions: dict[Address, _Udp] = {}
        self.pending: list[bytes] = []
        self.listener = self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast("asyncio.DatagramTransport", transport)
        for data in self.pending:
            transport.sendto(data)
        self.pending.clear()

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if self.client is not None:  # a reply from the backend
            assert self.listener.transport is not None
            self.listener.transport.sendto(data, self.client)
            return
        session = self.sessions.get(addr)
        if session is None:
            session = self.sessions[addr] = _Udp(self.relay, self.to, addr)
            session.listener = self
            self.relay.spawn(self._open(session, addr))
        if session.transport is not None:
            session.transport.sendto(data)
        elif len(session.pending) < 64:
            session.pending.append(data)

    async def _open(self, session: _Udp, client: Address) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_datagram_endpoint(lambda: session, remote_addr=self.to)
        except OSError:
            self.sessions.pop(client, None)

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error (the backend's port closed): that datagram is lost


class Relay:
    """The listeners and everything open through them; :meth:`close` ends it all."""

    def __init__(self) -> None:
        self.servers: list[asyncio.Server] = []
        self.udp: list[_Udp] = []
        self.conns: set[_End] = set()  # accepted connections, each with its ``other``
        self.tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for end in [e for c in self.conns for e in (c, c.other) if e is not None]:
            if end.transport is not None:
                end.transport.abort()
        for udp in [s for u in self.udp for s in (*u.sessions.values(), u)]:
            if udp.transport is not None:
                udp.transport.abort()
        for server in self.servers:
            await server.wait_closed()
        await asyncio.sleep(0)  # the transports' connection_lost callbacks run


async def start(tcp: Pairs, udp: Pairs) -> Relay:
    """Listen on every ``(listen, to)`` pair; the caller owns the result and closes it."""
    loop = asyncio.get_running_loop()
    relay = Relay()
    try:
        for (host, port), to in tcp:
            factory = functools.partial(_End, relay, to)
            server = await loop.create_server(factory, host, port, backlog=4096)
            relay.servers.append(server)
        for listen, to in udp:
            udp_factory = functools.partial(_Udp, relay, to)
            _, listener = await loop.create_datagram_endpoint(udp_factory, local_addr=listen)
            relay.udp.append(listener)
    except BaseException:
        await relay.close()
        raise
    return relay


def _pair(text: str) -> tuple[Address, Address]:
    (lh, lp), (th, tp) = (side.rsplit(":", 1) for side in text.split("="))
    return (lh, int(lp)), (th, int(tp))


async def _serve(tcp: Pairs, udp: Pairs) -> None:
    relay = await start(tcp, udp)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print("listening", flush=True)
    try:
        await stop.wait()
    finally:
        await relay.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__)
    for proto in ("--tcp", "--udp"):
        parser.add_argument(proto, type=_pair, action="append", default=[], metavar="IP:P=IP:P")
    args = parser.parse_args(argv)
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(args.tcp, args.udp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
