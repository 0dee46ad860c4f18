"""``userproxy explain --kubeconfig``: one LIST of the API, as ``run`` makes its first.

The objects are listed and decoded by the very code ``run --kubeconfig`` uses: a
:class:`~userproxy.sources.kubernetes.KubernetesSource` (the same selectors: not headless,
this ``--service-proxy-name``; the own Node by field selector) whose three reflectors
each make their first list (paged LIST through ``sources/list_watch.py``, the reflector's
decoding, invalid objects skipped with a warning) and deliver it to the handlers given,
then call ``*_synced``.  Nothing is watched.

Invariants: at most ``seconds`` in all; the API client is closed on every path;
every failure is one :class:`ApiListError` line naming the server and what failed (or,
for an unusable kubeconfig, the ``ConfigError`` ``run`` reports).
"""

from __future__ import annotations

import asyncio
import os

import aiohttp

from userproxy.config import Settings
from userproxy.control.handlers import Handlers
from userproxy.sources.kubernetes import KubernetesSource, make_api_client
from userproxy.sources.list_watch import ApiError

__all__ = ["ApiListError", "list_once"]

#: Default bound on the whole listing (seconds).
LIST_TIMEOUT = 30.0


class ApiListError(Exception):
    """The API server could not be listed (unreachable, refused, an error status)."""


async def list_once(settings: Settings, handlers: Handlers, seconds: float = LIST_TIMEOUT) -> None:
    """List Services, EndpointSlices and this node's Node once into ``handlers``.

    Raises ``ConfigError`` for an unusable kubeconfig (as ``run`` does), else
    :class:`ApiListError`."""
    api = await make_api_client(settings.kubeconfig)
    server = str(getattr(api.configuration, "host", "") or "the API server")
    try:
        source = KubernetesSource(
            api,
            handlers,
            node_name=settings.hostname,
            proxy_name=settings.service_proxy_name,
        )
        async with asyncio.timeout(seconds):
            for reflector in (source.services, source.endpoint_slices, source.nodes):
                try:
                    # The reflector's own first list (LIST, decode, deliver, synced), so there
                    # is no second decoder; no watch, no retry.
                    await reflector.list_once()
                except ApiError as exc:
                    status = "HTTP " if exc.status not in (None, 200) else ""
                    raise ApiListError(
                        f"{server}: listing {reflector.name} failed: {status}{exc}"
                    ) from None
                except (aiohttp.ClientError, OSError) as exc:
                    raise ApiListError(
                        f"cannot reach the API server {server}: {_describe(exc)}"
                    ) from None
    except TimeoutError:
        raise ApiListError(
            f"the API server {server} did not answer the lists within {seconds:g}s"
        ) from None
    finally:
        await api.close()  # what KubernetesSource.close does


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        # The loop words a refused connect "Connect call failed (...)"; the errno says it.
        error = exc.os_error
        if error.errno:
            return os.strerror(error.errno)
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text or type(exc).__name__
