"""Running an aiohttp app on one address, retrying while the address cannot be bound.

kube-proxy keeps retrying its health and metrics servers rather than exiting when the
port is taken (another kube-proxy still shutting down, say); so does this.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from userproxy.admin.http_log import http_logger
from userproxy.hostnet.listen import listening_socket

log = logging.getLogger(__name__)

RETRY_INTERVAL = 5.0
#: aiohttp's TCPSite default.
BACKLOG = 128


async def serve_app(
    app: web.Application, address: tuple[str, int] | str, name: str, ready: asyncio.Event
) -> None:
    """Serve ``app`` on ``address`` (a str: a Unix socket, a ``--workers`` process's private
    admin socket), setting ``ready`` once listening, until cancelled."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, logger=http_logger(name))
    await runner.setup()
    try:
        while True:
            try:
                if isinstance(address, str):
                    await web.UnixSite(runner, address).start()
                else:
                    # Made (or taken over in a handoff) where every listening socket is.
                    sock = listening_socket(address[0], address[1], freebind=False, backlog=BACKLOG)
                    await web.SockSite(runner, sock).start()
                break
            except OSError as exc:
                log.error(
                    "%s server cannot listen on %s: %s; retrying in %.0fs",
                    name,
                    _where(address),
                    exc.strerror or exc,
                    RETRY_INTERVAL,
                )
                await asyncio.sleep(RETRY_INTERVAL)
        log.info("%s server listening on %s", name, _where(address))
        ready.set()
        await asyncio.Event().wait()  # until cancelled
    finally:
        await runner.cleanup()


def _where(address: tuple[str, int] | str) -> str:
    return address if isinstance(address, str) else f"{address[0]}:{address[1]}"
