"""The pod port-forward endpoint of the fake API server, over WebSocket, as the kubelet
serves it (upstream: pkg/kubelet/cri/streaming/portforward/websocket.go, reached through
the API server's ``/api/v1/namespaces/NS/pods/NAME/portforward``).

The protocol, ``v4.channel.k8s.io`` (binary; also chosen when the client names no
subprotocol, as upstream does):

* the ports come as the query parameter ``ports``, repeated or comma-separated; a missing,
  empty, unparsable or zero port is a 400 before the upgrade;
* the i-th port gets two channels: data ``2i`` (both ways) and error ``2i+1`` (server to
  client); every WebSocket message is one channel byte followed by the payload;
* the first message on each of the two channels is the port as an unsigned 16-bit
  little-endian integer;
* the pod side is a TCP connection to the pod's address and that port; when it cannot be
  opened, or when it fails, the error channel carries
  ``error forwarding port P to pod NAME, uid UID: REASON`` and that port is done;
* when the pod side of every port has ended, the server closes the WebSocket (v4 has no
  per-channel close: a port's end is the end of the connection, as with one port per
  request, which is how clients use it); when the client closes it, the pod connections
  are closed.

Pods are what a test registers: ``pods[(namespace, name)] = address`` (a local IP the
pod's ports listen on); an unknown pod is a 404 Status, as the API server answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass

from aiohttp import WSMsgType, web

__all__ = ["PROTOCOL", "portforward_handler"]

PROTOCOL = "v4.channel.k8s.io"

PodKey = tuple[str, str]


def _status(code: int, reason: str, message: str) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}  # fmt: skip
    return web.Response(status=code, text=json.dumps(body), content_type="application/json")


def _ports(request: web.Request) -> list[int] | str:
    """The requested ports, or what is wrong with the query (upstream's messages)."""
    values = request.query.getall("ports", [])
    if not values:
        return 'query parameter "ports" is required'
    ports = []
    for value in values:
        if not value:
            return 'query parameter "ports" cannot be empty'
        for text in value.split(","):
            try:
                port = int(text)
            except ValueError:
                return f'unable to parse "{value}" as a port'
            if not 0 < port < 65536:
                return f'port "{value}" must be > 0'
            ports.append(port)
    return ports


def portforward_handler(
    pods: MutableMapping[PodKey, str],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The aiohttp handler of the port-forward route, for the pods in ``pods``."""

    async def handle(request: web.Request) -> web.StreamResponse:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        ports = _ports(request)
        if isinstance(ports, str):
            return _status(400, "BadRequest", ports)
        address = pods.get((namespace, name))
        if address is None:
            return _status(404, "NotFound", f'pods "{name}" not found')
        ws = web.WebSocketResponse(protocols=(PROTOCOL,), max_msg_size=0)
        await ws.prepare(request)
        uid = f"uid-{namespace}-{name}"
        writers: dict[int, asyncio.StreamWriter] = {}
        pumps = []
        for i, port in enumerate(ports):
            forwarded = _Port(i, port, name, uid)
            prefix = struct.pack("<H", port)
            await ws.send_bytes(bytes([2 * i]) + prefix)
            await ws.send_bytes(bytes([2 * i + 1]) + prefix)
            try:
                reader, writer = await asyncio.open_connection(address, port)
            except OSError as exc:
                await forwarded.error(ws, exc)
                continue
            writers[2 * i] = writer
            pumps.append(asyncio.create_task(forwarded.pump(ws, reader)))
        receiving = asyncio.create_task(_receive(ws, writers))
        try:
            if pumps:
                await asyncio.wait(pumps)  # every pod side ended
        finally:
            receiving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiving
            for task in pumps:
                task.cancel()
            for writer in writers.values():
                writer.close()
            await ws.close()
        return ws

    return handle


@dataclass(frozen=True, slots=True)
class _Port:
    """The i-th forwarded port of one request: its channels are ``2i`` and ``2i+1``."""

    i: int
    port: int
    pod: str
    uid: str

    async def error(self, ws: web.WebSocketResponse, exc: BaseException) -> None:
        message = f"error forwarding port {self.port} to pod {self.pod}, uid {self.uid}: {exc}"
        with contextlib.suppress(ConnectionError):
            await ws.send_bytes(bytes([2 * self.i + 1]) + message.encode())

    async def pump(self, ws: web.WebSocketResponse, reader: asyncio.StreamReader) -> None:
        """Pod -> client on the data channel until the pod side ends."""
        try:
            while data := await reader.read(65536):
                await ws.send_bytes(bytes([2 * self.i]) + data)
        except (ConnectionError, OSError) as exc:
            await self.error(ws, exc)


async def _receive(ws: web.WebSocketResponse, writers: dict[int, asyncio.StreamWriter]) -> None:
    """Client -> pod: each data message to its port's connection; the client's close
    closes them all."""
    async for msg in ws:
        if msg.type is not WSMsgType.BINARY or not msg.data:
            continue
        writer = writers.get(msg.data[0])
        if writer is None:
            continue  # an error channel, or a port that failed: dropped, as upstream
        writer.write(msg.data[1:])
        await writer.drain()
    for writer in writers.values():
        writer.close()
