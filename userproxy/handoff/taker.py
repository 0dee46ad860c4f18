"""The new process's side of a handoff: receive the listening sockets before serving, and
tell the old process once this one serves.

``connect`` is called after every check that can end the process with exit 2 (the
configuration, the first manifest load), so a process that cannot run never touches the
old one.  Its outcomes:

- nobody listens at the path (no file, or a stale one): None, start as usual;
- the old process is draining: None, start as usual (its listeners are closing anyway);
- anything else it cannot go on from (another user's process, a version of the exchange
  neither reads, another handoff under way): ``HandoffRefused``, a one-line reason; the
  caller exits 1 and the old process serves on as if nothing happened;
- otherwise a ``Takeover`` holding the sockets, which ``listening_socket`` hands out to
  this process's listeners as they open (hostnet/listen.py).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from userproxy import __version__
from userproxy.handoff.wire import (
    EXCHANGE,
    VERSION,
    ExchangeError,
    Message,
    peer_credentials,
    receive,
    send,
)
from userproxy.hostnet.listen import SocketKey, socket_key

log = logging.getLogger(__name__)

__all__ = ["HandoffRefused", "Takeover", "connect"]

#: connect() errors meaning "nobody listens here": start as usual.
_NOBODY = (errno.ENOENT, errno.ECONNREFUSED)


class HandoffRefused(Exception):
    """The handoff cannot happen and this process must not start on its own either."""


@dataclass
class Takeover:
    """A handoff under way: the sockets received, the connection to the old process."""

    conn: socket.socket
    giver_pid: int
    sockets: list[tuple[SocketKey, socket.socket, str]]

    async def finish(self, taken: set[SocketKey], addresses_device: str | None) -> bool:
        """Tell the old process this one serves ``taken``; True once it stopped accepting
        (False: it went away first, which changes nothing here)."""
        try:
            await send(
                self.conn,
                {
                    "serving": True,
                    "taken": [list(key) for key in sorted(taken)],
                    "addresses_device": addresses_device,
                },
            )
            reply, stray = await receive(self.conn)
            for sock in stray:
                sock.close()
        except ExchangeError as exc:
            log.warning("handoff: pid %d did not confirm: %s", self.giver_pid, exc)
            return False
        finally:
            self.conn.close()
        return reply.get("done") is True

    def abandon(self) -> None:
        """Close the connection and every socket received (the old process keeps its own)."""
        self.conn.close()
        for _key, sock, _serves in self.sockets:
            sock.close()


async def connect(path: Path, addresses_device: str | None = None) -> Takeover | None:
    """Ask the process at ``path`` for its listening sockets (see the module docstring);
    ``addresses_device``: the device whose service addresses this process will manage
    (the old process keeps them from the moment it hands its sockets over)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.setblocking(False)
    try:
        try:
            conn.connect(str(path))
        except OSError as exc:
            if exc.errno in _NOBODY:
                why = "no file" if exc.errno == errno.ENOENT else "a stale file, nobody listens"
                log.info("handoff: nobody to take over from at %s (%s); starting", path, why)
                conn.close()
                return None
            raise HandoffRefused(f"cannot connect to {path}: {exc.strerror or exc}") from exc
        pid, uid, _gid = peer_credentials(conn)
        if uid not in (0, os.getuid()):
            raise HandoffRefused(
                f"{path} is served by pid {pid} of uid {uid}, not this user or root; "
                "not taking sockets from it"
            )
        hello = {
            "exchange": EXCHANGE,
            "versions": [VERSION],
            "userproxy": __version__,
            "addresses_device": addresses_device,
        }
        await send(conn, hello)
        sockets: list[tuple[SocketKey, socket.socket, str]] = []
        try:
            while True:
                message, received = await receive(conn)
                if "error" in message:
                    for sock in received:
                        sock.close()
                    if message.get("reason") == "draining":
                        log.info("handoff: pid %d is draining; starting on its own", pid)
                        conn.close()
                        return None
                    raise HandoffRefused(f"pid {pid} refused the handoff: {message['error']}")
                more = _add(message, received, sockets)
                if not more:
                    break
        except BaseException:
            for _key, sock, _serves in sockets:
                sock.close()
            raise
    except ExchangeError as exc:
        conn.close()
        raise HandoffRefused(f"handoff with the process at {path} failed: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    log.info("handoff: received %d listening sockets from pid %d", len(sockets), pid)
    return Takeover(conn, pid, sockets)


def _add(
    message: Message,
    received: list[socket.socket],
    into: list[tuple[SocketKey, socket.socket, str]],
) -> bool:
    """Pair one message's entries with its sockets (into ``into``); whether more follow."""
    entries = message.get("sockets")
    if not isinstance(entries, list) or len(entries) != len(received):
        for sock in received:
            sock.close()
        raise ExchangeError(
            f"{len(received)} sockets came with an unreadable list "
            f"(userproxy {message.get('userproxy', '?')})"
        )
    for entry, sock in zip(entries, received, strict=True):
        # The key comes from the socket itself, not from what the message says of it.
        try:
            ip, port = sock.getsockname()[:2]
            key = socket_key(sock.type, ip, port)
        except (OSError, ValueError):
            sock.close()
            log.warning("handoff: skipped a socket that is not an IP socket (%r)", entry)
            continue
        serves = entry.get("serves", "") if isinstance(entry, dict) else ""
        into.append((key, sock, str(serves)))
    return message.get("more") is True
