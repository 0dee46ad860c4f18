"""A pod's port through the API server's port-forward, over WebSocket (``v4.channel.k8s.io``).

kubernetes-asyncio has no port-forward helper, so this builds the WebSocket with aiohttp
from the same client configuration the watch uses (server URL, bearer token or client
certificate, CA, verification).  The protocol, as the kubelet serves it (upstream
pkg/kubelet/cri/streaming/portforward/websocket.go): one forwarded port per WebSocket
here, so data is channel 0 and errors channel 1; every message is one channel byte and
the payload; the first message on each channel is the port as a little-endian uint16.

Invariants: ``open_forward`` returns only once both channels have announced the port (a
refusal before that raises ``PortForwardError`` with the API server's or kubelet's own
message); ``PortForward.read`` returns ``b""`` exactly once the pod side ended cleanly,
and raises ``PortForwardError`` when the error channel spoke (the kubelet could not reach
the port, or the pod's connection failed).  v4 has no half-close: a client's end of
input cannot be passed on, so the relay ends a connection when either side ends it.
"""

from __future__ import annotations

import ssl
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp

if TYPE_CHECKING:
    from kubernetes_asyncio.client import Configuration

__all__ = ["PROTOCOL", "ApiEndpoint", "PortForward", "PortForwardError", "open_forward"]

PROTOCOL = "v4.channel.k8s.io"
DATA, ERROR = 0, 1
_PORT = struct.Struct("<H")


class PortForwardError(ConnectionError):
    """The port-forward was refused or failed; the message is the API server's or the
    kubelet's (e.g. ``error forwarding port 80 to pod web-1, uid ...: connection refused``).

    A ``ConnectionError``: to a listener dialing through it (connect/dialer.py), a refused
    port-forward is a failed dial like a refused connect, and the next endpoint is tried."""


@dataclass(frozen=True, slots=True)
class ApiEndpoint:
    """How to reach the API server: its URL, the headers that authenticate (a bearer
    token), and the TLS context (CA, client certificate, verification) or None for http."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    ssl: ssl.SSLContext | None = None

    @classmethod
    def from_configuration(cls, configuration: Configuration) -> ApiEndpoint:
        """From a kubernetes-asyncio client configuration, as ``load_kube_config`` or the
        in-cluster loader filled it."""
        c: Any = configuration
        headers = {}
        token = c.api_key.get("authorization") or c.api_key.get("BearerToken")
        if token:
            prefix = c.api_key_prefix.get("authorization")
            headers["Authorization"] = f"{prefix} {token}" if prefix else str(token)
        context = None
        if str(c.host).startswith("https"):
            context = ssl.create_default_context(cafile=c.ssl_ca_cert or None)
            if not c.verify_ssl:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            if c.cert_file:
                context.load_cert_chain(c.cert_file, c.key_file or None)
        return cls(str(c.host).rstrip("/"), headers, context)

    def forward_url(self, namespace: str, pod: str, port: int) -> str:
        return (
            f"{self.url}/api/v1/namespaces/{quote(namespace, safe='')}/pods/"
            f"{quote(pod, safe='')}/portforward?ports={port}"
        )


class PortForward:
    """One forwarded connection to one port of one pod (see the module docstring)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, port: int) -> None:
        self.ws = ws
        self.port = port

    async def handshake(self) -> None:
        """Read the port announcement on both channels (an early error raises)."""
        announced: set[int] = set()
        while announced != {DATA, ERROR}:
            channel, payload = await self._message()
            if channel in announced or len(payload) != _PORT.size:
                if channel == ERROR:
                    raise PortForwardError(payload.decode(errors="replace"))
                raise PortForwardError(f"unexpected message on channel {channel} before start")
            (port,) = _PORT.unpack(payload)
            if port != self.port:
                raise PortForwardError(f"the server announced port {port}, not {self.port}")
            announced.add(channel)

    async def read(self) -> bytes:
        """The next bytes from the pod; ``b""`` once the pod side ended."""
        while True:
            channel, payload = await self._message()
            if channel == DATA:
                if payload:
                    return payload
            elif channel == ERROR:
                raise PortForwardError(payload.decode(errors="replace"))
            elif channel < 0:
                return b""

    async def write(self, data: bytes) -> None:
        await self.ws.send_bytes(bytes([DATA]) + data)

    async def close(self) -> None:
        await self.ws.close()

    async def _message(self) -> tuple[int, bytes]:
        """(channel, payload); channel -1 when the WebSocket closed."""
        msg = await self.ws.receive()
        if msg.type is aiohttp.WSMsgType.BINARY:
            data: bytes = msg.data
            return (data[0], data[1:]) if data else (-2, b"")
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                        aiohttp.WSMsgType.CLOSING):  # fmt: skip
            return -1, b""
        if msg.type is aiohttp.WSMsgType.ERROR:
            raise PortForwardError(f"the WebSocket failed: {self.ws.exception()}")
        return -2, b""  # text or ping: not part of v4's binary framing


#: What a refused upgrade means (aiohttp keeps no body of a failed WebSocket handshake).
_REFUSALS = {
    401: "the kubeconfig's credentials were refused",
    403: "forbidden (the user needs the create verb on pods/portforward)",
    404: "no such pod (deleted or not yet created)",
}


async def open_forward(
    session: aiohttp.ClientSession, endpoint: ApiEndpoint, namespace: str, pod: str, port: int
) -> PortForward:
    """A port-forward to ``pod``'s ``port``, announced and ready (see the module)."""
    url = endpoint.forward_url(namespace, pod, port)
    try:
        ws = await session.ws_connect(
            url,
            protocols=(PROTOCOL,),
            headers=endpoint.headers,
            ssl=endpoint.ssl if endpoint.ssl is not None else True,
            max_msg_size=0,
            autoping=True,
        )
    except aiohttp.WSServerHandshakeError as exc:
        why = _REFUSALS.get(exc.status, exc.message)
        raise PortForwardError(
            f"{namespace}/{pod}:{port}: the API server answered {exc.status}: {why}"
        ) from None
    except (aiohttp.ClientError, OSError) as exc:
        message = f"{namespace}/{pod}:{port}: cannot reach the API server: {exc}"
        raise PortForwardError(message) from None
    forward = PortForward(ws, port)
    try:
        await forward.handshake()
    except BaseException:
        await ws.close()
        raise
    return forward
