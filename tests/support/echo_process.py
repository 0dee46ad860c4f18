"""An echo server in its own process (stock asyncio), for load tests whose client threads
should not share a GIL with the backend.  Prints its port on stdout once listening.
A chunk starting with ``close`` is echoed and then the server closes the connection.

Usage: python -m tests.support.echo_process IP
"""

from __future__ import annotations

import asyncio
import sys


class Echo(asyncio.Protocol):
    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)
        if data.startswith(b"close"):
            # Server-initiated close, as an HTTP server answering "Connection: close".
            self.transport.close()

    def eof_received(self) -> bool:
        return False  # asyncio closes after flushing: echoes the FIN


async def main(ip: str) -> None:
    server = await asyncio.get_running_loop().create_server(Echo, ip, 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
