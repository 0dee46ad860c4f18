"""The handoff exchange on the wire: JSON messages over a Unix SOCK_SEQPACKET socket,
listening sockets passed alongside them with SCM_RIGHTS.

SOCK_SEQPACKET keeps message boundaries (one ``sendmsg`` is one ``recvmsg``) and ties the
descriptors to the message they came with, so there is no framing to get wrong.  A message
is a JSON object of at most ``MAX_MESSAGE`` bytes with at most ``MAX_FDS`` descriptors;
more sockets than that go in several messages (``"more": true`` on all but the last).

The exchange, taker (the new process) first:

1. taker -> giver: ``{"exchange": "userproxy-handoff", "versions": [N, ...], "userproxy",
   "addresses_device": NAME | null}`` (the versions it reads; the device whose addresses
   it will manage);
2. giver -> taker: ``{"error", "reason", "versions"}`` and the end (``reason``: exchange,
   version, draining or busy); or the sockets:
   ``{"sockets": [{"kind", "ip", "port", "serves"}, ...], "more", "pid", "userproxy"}``
   with one descriptor per entry, in order;
3. taker -> giver, once it serves: ``{"serving": true, "taken": [[kind, ip, port], ...],
   "addresses_device": NAME | null}``;
4. giver -> taker, once it no longer accepts: ``{"done": true}``.

Version skew is expected (an upgrade is the point): the taker sends the versions it reads,
a giver that speaks none of them answers with an error naming its own, and neither side
changes anything.  Invariant: every descriptor received is owned by a socket object at once,
so none leaks when a message turns out to be unreadable.
"""

from __future__ import annotations

import array
import asyncio
import json
import socket
import struct
from collections.abc import Sequence
from typing import Any

__all__ = [
    "ANSWER_TIMEOUT",
    "EXCHANGE",
    "MAX_FDS",
    "VERSION",
    "ExchangeError",
    "Message",
    "peer_credentials",
    "receive",
    "send",
]

#: What the first message says it is, so a stray client is told apart from an old version.
EXCHANGE = "userproxy-handoff"
#: The version of the exchange this build speaks; bump it when a message changes meaning.
VERSION = 1
#: Descriptors per message (the kernel's SCM_MAX_FD is 253).
MAX_FDS = 200
#: Bytes per message: 200 socket entries of JSON fit with room to spare.
MAX_MESSAGE = 64 * 1024
#: How long either side waits for an answer that needs no work from the other side (the
#: hello, the sockets, "done"); "serving" is waited for as long as the new process's
#: first sync takes.
ANSWER_TIMEOUT = 30.0

Message = dict[str, Any]


class ExchangeError(Exception):
    """The other side sent something this exchange cannot read, or went away."""


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


async def _ready(sock: socket.socket, *, write: bool) -> None:
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def wake() -> None:
        if not waiter.done():
            waiter.set_result(None)

    if write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await waiter
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def send(sock: socket.socket, message: Message, fds: Sequence[int] = ()) -> None:
    """Send one message (and ``fds``, at most ``MAX_FDS``) on the non-blocking ``sock``."""
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE or len(fds) > MAX_FDS:
        raise ValueError(f"handoff message too large ({len(data)} bytes, {len(fds)} fds)")
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    while True:
        try:
            sock.sendmsg([data], ancillary)
            return
        except (BlockingIOError, InterruptedError):
            await _ready(sock, write=True)
        except OSError as exc:
            raise ExchangeError(f"the other process went away ({exc.strerror or exc})") from exc


async def receive(
    sock: socket.socket, within: float | None = ANSWER_TIMEOUT
) -> tuple[Message, list[socket.socket]]:
    """One message and the sockets that came with it; ExchangeError at the end of the
    connection, after ``within`` seconds (None: no limit), or for anything that is not
    a JSON object."""
    try:
        async with asyncio.timeout(within):
            return await _receive(sock)
    except TimeoutError:
        raise ExchangeError(f"no answer within {within:g} s") from None


async def _receive(sock: socket.socket) -> tuple[Message, list[socket.socket]]:
    space = socket.CMSG_SPACE(MAX_FDS * struct.calcsize("i"))
    while True:
        try:
            data, ancillary, flags, _ = sock.recvmsg(MAX_MESSAGE, space)
            break
        except (BlockingIOError, InterruptedError):
            await _ready(sock, write=False)
        except OSError as exc:
            raise ExchangeError(f"the other process went away ({exc.strerror or exc})") from exc
    received: list[socket.socket] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            received.extend(socket.socket(fileno=fd) for fd in fds)
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ExchangeError("a message was too large for this version of the exchange")
        if not data:
            raise ExchangeError("the other process closed the exchange")
        try:
            message = json.loads(data)
        except ValueError as exc:
            raise ExchangeError(f"a message is not JSON ({exc})") from None
        if not isinstance(message, dict):
            raise ExchangeError("a message is not a JSON object")
    except BaseException:
        for sock_ in received:
            sock_.close()
        raise
    return message, received
