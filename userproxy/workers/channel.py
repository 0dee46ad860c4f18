"""The parent -> worker channel: length-prefixed pickled messages over a Unix socket pair.

Only the parent writes and only its own worker reads, so pickle carries nothing a third
party chose.  Messages, in order: ``Hello`` once, then any number of ``Call`` (one handler
call of ``control/handlers.py``, with the model objects the parent's source decoded) and
``Reload`` (SIGHUP's new settings).  Invariant: the stream a worker reads is a replay of the
parent's current objects followed by every later change, in the order the source made them.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct
from dataclasses import dataclass

from userproxy.config import Settings

_HEADER = struct.Struct("!I")

#: The handler methods a ``Call`` may name (``control/handlers.py``'s ``Handlers``).
HANDLER_METHODS = frozenset(
    {
        "on_service_add",
        "on_service_update",
        "on_service_delete",
        "on_services_synced",
        "on_endpointslice_add",
        "on_endpointslice_update",
        "on_endpointslice_delete",
        "on_endpointslices_synced",
        "on_node_add",
        "on_node_update",
        "on_node_delete",
        "on_node_synced",
    }
)


@dataclass(frozen=True, slots=True)
class Hello:
    """The first message: who the worker is and the settings it runs with."""

    worker: int
    workers: int
    settings: Settings
    admin_socket: str


@dataclass(frozen=True, slots=True)
class Call:
    """One handler call; ``method`` is one of ``HANDLER_METHODS``."""

    method: str
    args: tuple[object, ...]


@dataclass(frozen=True, slots=True)
class Reload:
    """SIGHUP in the parent: the settings as read again."""

    settings: Settings


Message = Hello | Call | Reload


def encode(message: Message) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


async def read_message(reader: asyncio.StreamReader) -> Message:
    """The next message; ``asyncio.IncompleteReadError`` at the end of the stream."""
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    message = pickle.loads(await reader.readexactly(size))  # only our parent writes it
    if not isinstance(message, Hello | Call | Reload):
        raise TypeError(f"unexpected message {type(message).__name__}")
    return message


def read_hello(sock: socket.socket) -> Hello:
    """The first message, read blocking before any loop runs (``child.py``)."""
    (size,) = _HEADER.unpack(_recv_exactly(sock, _HEADER.size))
    message = pickle.loads(_recv_exactly(sock, size))  # only our parent writes it
    if not isinstance(message, Hello):
        raise TypeError(f"expected Hello, not {type(message).__name__}")
    return message


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("the parent closed the channel")
        data += chunk
    return bytes(data)
