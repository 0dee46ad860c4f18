"""The API calls behind a reflector: a paged LIST and a WATCH stream of one resource.

After client-go's tools/cache/listwatch.go (ListWatch: a resource's list call and
selectors) and tools/pager (continue tokens, starting over when a token expired).  What
the API server answers is sorted into the three errors a reflector acts on: :class:`Gone`,
:class:`ApiError` and :class:`WatchBroken`.

Bodies are read as raw JSON (``_preload_content=False``) and parsed by
:mod:`userproxy.sources.json_limits`, never through kubernetes-asyncio's typed models, which
reject a whole list or stream when one object has a field of the wrong type, nor through
its ``Watch``, which gives up after one 410.  Nothing here decodes the objects themselves.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiohttp

from userproxy.sources import json_limits
from userproxy.sources.decode_fields import DecodeError, as_mapping

logger = logging.getLogger(__name__)

#: Page size of LIST requests (the API server may ignore it, e.g. for resourceVersion=0).
LIST_PAGE_SIZE = 500
#: Upper bound on pages of one LIST; a server that keeps sending continue tokens is broken.
_MAX_PAGES = 10_000
#: Timeout of one LIST page and of connecting for a WATCH (seconds).
_LIST_TIMEOUT = 60.0
_CONNECT_TIMEOUT = 10.0
#: Extra time past the server-side watch timeout before a silent watch counts as dead.
_WATCH_READ_SLACK = 30.0
#: How much of an error body goes into an error message.
_ERROR_BODY_LIMIT = 4096


class Gone(Exception):
    """The resourceVersion to resume from is too old (410): re-list."""


class ApiError(Exception):
    """The API server answered with an error (an HTTP status, an ERROR event, a list that is
    not a list)."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(f"{status}: {message}" if status is not None else message)
        self.status = status


class WatchBroken(Exception):
    """An established watch stream broke (connection lost, read timeout, a line that is not
    a JSON object)."""


def str_mapping(value: object) -> dict[str, object] | None:
    """``value`` as a mapping with string keys, or None if it is not one."""
    try:
        return as_mapping(value, "")
    except DecodeError:
        return None


def metadata_str(obj: Mapping[str, object], key: str) -> str | None:
    """A non-empty string ``metadata.<key>`` of a raw object, else None."""
    meta = obj.get("metadata")
    value = meta.get(key) if isinstance(meta, Mapping) else None
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True, slots=True)
class ListWatch:
    """What a reflector lists and watches, and the two calls that do it.

    ``resource`` names it in logs and ``on_event`` ("services"); ``kind`` names one object
    ("Service"); ``list_func`` is the kubernetes-asyncio list call, which watches when
    given ``watch=True``.
    """

    resource: str
    kind: str
    namespaced: bool
    list_func: Callable[..., Awaitable[object]]
    label_selector: str | None = None
    field_selector: str | None = None

    async def list_items(self, page_size: int) -> tuple[str, list[object]]:
        """All items of a (paged) LIST and its resourceVersion."""
        timeout = aiohttp.ClientTimeout(total=_LIST_TIMEOUT, sock_connect=_CONNECT_TIMEOUT)
        items: list[object] = []
        token: str | None = None
        for _page in range(_MAX_PAGES):
            params: dict[str, object] = {"limit": page_size}
            if token is not None:
                params["_continue"] = token
            try:
                response = await self._get(timeout, **params)
            except Gone:
                if token is None:
                    raise
                # The continue token expired between pages: start over.
                logger.debug("%s: list continue token expired, listing again", self.resource)
                items, token = [], None
                continue
            try:
                body = await response.read()
            finally:
                response.release()
            rv, page, token = self._parse_list(body)
            items.extend(page)
            if token is None:
                return rv, items
        raise ApiError(None, f"list of {self.resource} did not end after {_MAX_PAGES} pages")

    async def watch_events(
        self, resource_version: str | None, seconds: int
    ) -> AsyncGenerator[tuple[object, dict[str, object]], None]:
        """The (type, object) events of one WATCH from ``resource_version``, ``seconds`` long.

        An ERROR event raises (Gone for 410, else ApiError); a stream that breaks raises
        WatchBroken.  Use it within ``contextlib.aclosing``: closing ends the request.
        """
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=_CONNECT_TIMEOUT,
            sock_connect=_CONNECT_TIMEOUT,
            sock_read=seconds + _WATCH_READ_SLACK,
        )
        response = await self._get(
            timeout,
            watch=True,
            resource_version=resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=seconds,
        )
        logger.debug("%s: watching from resourceVersion %s", self.resource, resource_version)
        try:
            while True:  # bounded by the server's timeoutSeconds and the read timeout
                try:
                    line = await response.content.readline()
                except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                    raise WatchBroken(str(exc)) from exc
                if not line:
                    return
                if line.strip():
                    yield _parse_event(line)
        finally:
            response.close()  # never return a half-read stream to the connection pool

    async def _get(
        self, client_timeout: aiohttp.ClientTimeout, **params: object
    ) -> aiohttp.ClientResponse:
        """One GET with the resource's selectors; raises for any status but 200."""
        if self.label_selector is not None:
            params["label_selector"] = self.label_selector
        if self.field_selector is not None:
            params["field_selector"] = self.field_selector
        response: object = await self.list_func(
            **params, _preload_content=False, _request_timeout=client_timeout
        )
        if not isinstance(response, aiohttp.ClientResponse):
            raise TypeError(f"expected an aiohttp response, got {type(response).__name__}")
        if response.status == 200:
            return response
        try:
            body = await response.content.read(_ERROR_BODY_LIMIT)
        finally:
            response.release()
        message = _status_message(body)
        if response.status == 410:
            raise Gone(message)
        raise ApiError(response.status, message)

    def _parse_list(self, body: bytes) -> tuple[str, list[object], str | None]:
        """(resourceVersion, items, continue token or None) of one LIST page."""
        try:
            document = str_mapping(json_limits.loads(body))
        except ValueError as exc:
            raise ApiError(200, f"list of {self.resource} is not JSON: {exc}") from None
        if document is None:
            raise ApiError(200, f"list of {self.resource} is not a JSON object")
        rv = metadata_str(document, "resourceVersion")
        if rv is None:
            raise ApiError(200, f"list of {self.resource} has no metadata.resourceVersion")
        items = document.get("items")
        if items is None:
            items = []
        if not isinstance(items, list):
            raise ApiError(200, f"list of {self.resource}: items is not a list")
        return rv, items, metadata_str(document, "continue")


def _parse_event(line: bytes) -> tuple[object, dict[str, object]]:
    """(type, object) of one line of a watch stream; an ERROR event raises."""
    try:
        event = str_mapping(json_limits.loads(line))
    except ValueError:
        event = None
    if event is None:
        raise WatchBroken("the watch stream carried something that is not a JSON object")
    kind = event.get("type")
    obj = str_mapping(event.get("object"))
    if kind == "ERROR":
        code = obj.get("code") if obj is not None else None
        message = obj.get("message") if obj is not None else None
        text = message if isinstance(message, str) else "no message"
        if code == 410:
            raise Gone(text)
        raise ApiError(code if isinstance(code, int) else None, f"watch error: {text}")
    if obj is None:
        raise WatchBroken(f"watch event {kind!r} without an object")
    return kind, obj


def _status_message(body: bytes) -> str:
    """The ``message`` of a v1 Status body, else the body's start."""
    text = body[:_ERROR_BODY_LIMIT].decode("utf-8", "replace")
    try:
        status = json_limits.loads(body)
    except ValueError:
        return text.strip() or "(no body)"
    if isinstance(status, dict):
        message = status.get("message") or status.get("reason")
        if isinstance(message, str) and message:
            return message
    return text.strip()
