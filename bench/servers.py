"""Small helper processes: ``python -m bench.servers hold|name|clients ...``.

- ``hold HOST PORT``: accepts connections, writes one byte to each and holds it open (the
  backend of the idle-connection memory test).
- ``name HOST PORT NAME``: writes NAME to each connection and closes it (the backends of the
  change-to-traffic test tell which one a connection reached).
- ``clients HOST PORT COUNT``: opens COUNT connections, waits for each one's first byte
  (so the proxy has dialled the backend), prints ``ready N`` and holds them until stdin closes.
"""

from __future__ import annotations

import asyncio
import selectors
import socket
import sys
import time

from bench.procs import raise_nofile


class _Hold(asyncio.Protocol):
    held: set[asyncio.BaseTransport] = set()  # noqa: RUF012

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(b"h")
        self.held.add(transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.held.discard(self.transport)


class _Name(asyncio.Protocol):
    def __init__(self, name: bytes) -> None:
        self.name = name

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self.name)
        transport.close()


async def _serve(host: str, port: int, factory: type[asyncio.Protocol] | None, name: str) -> None:
    loop = asyncio.get_running_loop()
    if factory is None:
        server = await loop.create_server(lambda: _Name(name.encode()), host, port, backlog=4096)
    else:
        server = await loop.create_server(factory, host, port, backlog=4096)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


def _clients(host: str, port: int, count: int, batch: int = 200, timeout: float = 30.0) -> None:
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    socks_by_fd: dict[int, socket.socket] = {}
    deadline = time.monotonic() + timeout
    for start in range(0, count, batch):
        waiting: set[socket.socket] = set()
        for _ in range(min(batch, count - start)):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex((host, port))
            socks.append(s)
            socks_by_fd[s.fileno()] = s
            waiting.add(s)
            sel.register(s, selectors.EVENT_READ)
        while waiting:
            if time.monotonic() > deadline:
                print(f"timeout {len(socks) - len(waiting)}", flush=True)
                sys.exit(1)
            for key, _ in sel.select(1.0):
                s = socks_by_fd[key.fd]
                try:
                    data = s.recv(1)
                except OSError:
                    data = b""
                if not data:
                    print(f"failed {len(socks) - len(waiting)}", flush=True)
                    sys.exit(1)
                sel.unregister(s)
                waiting.discard(s)
    print(f"ready {len(socks)}", flush=True)
    sys.stdin.read()
    for s in socks:
        s.close()


def main(argv: list[str]) -> None:
    raise_nofile()
    kind, host, port = argv[0], argv[1], int(argv[2])
    if kind == "hold":
        asyncio.run(_serve(host, port, _Hold, ""))
    elif kind == "name":
        asyncio.run(_serve(host, port, None, argv[3]))
    elif kind == "clients":
        _clients(host, port, int(argv[3]))
    else:
        raise SystemExit(f"unknown helper {kind!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
