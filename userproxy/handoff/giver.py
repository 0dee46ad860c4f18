"""The old process's side of a handoff: serve the handoff socket, hand the listening sockets
to one successor, and stop accepting once it serves.

Invariants:
- nothing is sent before the peer passed the credentials check (SO_PEERCRED: this user or
  root) and spoke a version of the exchange this build reads; a refused peer is logged and
  counted, and the proxy carries on untouched;
- one handoff at a time; a process that is draining (stopping, or handed off already)
  refuses with ``reason: draining``, so its would-be successor starts on its own;
- the proxy stops accepting (``Host.hand_off``) only after the successor said it serves,
  and before ``done`` is sent; if the successor goes away before that, nothing changed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from userproxy import __version__
from userproxy.handoff.path import BoundPath
from userproxy.handoff.wire import (
    EXCHANGE,
    MAX_FDS,
    VERSION,
    ExchangeError,
    Message,
    peer_credentials,
    receive,
    send,
)
from userproxy.hostnet.listen import SocketKey

log = logging.getLogger(__name__)

__all__ = ["Giver", "Host", "Offered"]


@dataclass(frozen=True, slots=True)
class Offered:
    """One listening socket offered to a successor, and what it serves (for its log)."""

    key: SocketKey
    sock: socket.socket
    serves: str


class Host(Protocol):
    """What the giver needs of the proxy it belongs to."""

    @property
    def draining(self) -> bool: ...

    def offer(self) -> Iterable[Offered]:
        """Every listening socket the proxy holds now."""
        ...

    def expect_successor(self, addresses_device: str | None) -> None:
        """A successor holds the sockets now and will manage the service addresses on
        ``addresses_device`` (None: none, or the exchange was abandoned)."""
        ...

    def hand_off(self, taken: set[SocketKey], addresses_device: str | None) -> None:
        """Stop accepting (the successor serves ``taken``), keep what is open, drain."""
        ...


@dataclass
class Giver:
    """Serves one bound handoff socket for ``host`` until cancelled or ``close``."""

    bound: BoundPath
    host: Host
    on_given: Callable[[], None] = lambda: None
    on_refused: Callable[[str], None] = lambda _reason: None
    _busy: bool = field(default=False, init=False)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                conn, _ = await loop.sock_accept(self.bound.sock)
                conn.setblocking(False)
                task = asyncio.create_task(self._exchange(conn), name="handoff-exchange")
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            for task in tasks:
                task.cancel()

    def close(self) -> None:
        self.bound.remove()

    async def _exchange(self, conn: socket.socket) -> None:
        with conn:
            try:
                await self._give(conn)
            except ExchangeError as exc:
                log.warning("handoff: abandoned, this process goes on serving: %s", exc)

    async def _refuse(self, conn: socket.socket, reason: str, error: str) -> None:
        log.warning("handoff: refused: %s", error)
        self.on_refused(reason)
        await send(conn, {"error": error, "reason": reason, "versions": [VERSION]})

    async def _give(self, conn: socket.socket) -> None:
        pid, uid, _gid = peer_credentials(conn)
        if uid not in (0, os.getuid()):
            # Not even a reply: this peer learns nothing from the exchange.
            log.warning(
                "handoff: refused a peer (pid %d, uid %d): only this user (uid %d) or root "
                "may take the listening sockets",
                pid,
                uid,
                os.getuid(),
            )
            self.on_refused("credentials")
            return
        hello, stray = await receive(conn)
        for sock in stray:
            sock.close()
        if hello.get("exchange") != EXCHANGE:
            await self._refuse(conn, "exchange", "the peer does not speak the handoff exchange")
            return
        versions = hello.get("versions")
        if not isinstance(versions, list) or VERSION not in versions:
            await self._refuse(
                conn,
                "version",
                f"the new process (userproxy {hello.get('userproxy', '?')}, pid {pid}) reads "
                f"handoff exchange versions {versions}; this one (userproxy {__version__}) "
                f"speaks version {VERSION}",
            )
            return
        if self.host.draining:
            await self._refuse(conn, "draining", f"pid {pid}: this process is draining")
            return
        if self._busy:
            await self._refuse(conn, "busy", f"pid {pid}: another handoff is under way")
            return
        self._busy = True
        device = hello.get("addresses_device")
        # From the first socket sent: should this process stop before the successor says
        # it serves (SIGTERM), the successor still holds the sockets and needs the addresses.
        self.host.expect_successor(device if isinstance(device, str) else None)
        try:
            await self._offer(conn, pid)
        except ExchangeError:
            self.host.expect_successor(None)  # it went away: nothing changed here
            raise
        finally:
            self._busy = False

    async def _offer(self, conn: socket.socket, pid: int) -> None:
        offered = list(self.host.offer())
        log.info("handoff: offering %d listening sockets to pid %d", len(offered), pid)
        for start in range(0, max(len(offered), 1), MAX_FDS):
            chunk = offered[start : start + MAX_FDS]
            entries = [
                {"kind": o.key[0], "ip": o.key[1], "port": o.key[2], "serves": o.serves}
                for o in chunk
            ]
            message: Message = {
                "sockets": entries,
                "more": start + MAX_FDS < len(offered),
                "pid": os.getpid(),
                "userproxy": __version__,
            }
            await send(conn, message, [o.sock.fileno() for o in chunk])
        reply, stray = await receive(conn, within=None)  # as long as its first sync takes
        for sock in stray:
            sock.close()
        if reply.get("serving") is not True:
            raise ExchangeError(f"unexpected reply {sorted(reply)}")
        taken = {_key(item) for item in reply.get("taken", [])}
        device = reply.get("addresses_device")
        self.host.hand_off(taken, device if isinstance(device, str) else None)
        self.on_given()
        log.info(
            "handoff: pid %d serves now (%d of %d sockets taken); this process drains",
            pid,
            len(taken),
            len(offered),
        )
        await send(conn, {"done": True})


def _key(item: object) -> SocketKey:
    if (
        isinstance(item, list)
        and len(item) == 3
        and isinstance(item[0], str)
        and isinstance(item[1], str)
        and isinstance(item[2], int)
    ):
        return (item[0], item[1], item[2])
    raise ExchangeError(f"unreadable socket key {item!r}")
