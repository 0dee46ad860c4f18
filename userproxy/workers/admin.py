"""The parent's admin servers with ``--workers``: every answer covers all the workers.

Each worker serves its metrics server's routes (``admin/metrics_server.py``) on a private
Unix socket; the parent answers on ``--metrics-bind-address`` and ``--healthz-bind-address``:

* ``/metrics``: every worker's samples with a ``worker`` label, and the parent's own (its
  source's events, ``userproxy_worker_up``, ``userproxy_worker_restarts_total``) with
  ``worker="control"`` (``merge.py``);
* ``/healthz`` (both servers) and ``/livez``: 200 when some worker runs and every worker
  that runs answers its own ``/healthz`` with 200 (a dead worker holds no socket, so until
  its restart the others serve its share and the node stays healthy); the body is the
  first answering worker's, plus ``workers``;
* ``/status``: the first worker's document with the traffic counts summed over the workers,
  plus ``workers`` (number, pid, alive, restarts, admin socket) and ``control`` (the
  parent's pid, the handler calls it forwarded);
* ``/configz``, ``/proxyMode``: the parent's; anything else (the HTML page, its script and
  live events, ``/explain``): passed through to the first worker that runs.
"""

from __future__ import annotations

import asyncio
import json
import os

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import generate_latest

from userproxy.admin.metrics_server import PROXY_MODE
from userproxy.admin.server import serve_app
from userproxy.config import configz
from userproxy.workers.merge import merge_metrics, merge_status
from userproxy.workers.supervisor import Supervisor, WorkerSlot

#: How long the parent waits for one worker's answer.
WORKER_TIMEOUT = 5.0


def _session(slot: WorkerSlot) -> aiohttp.ClientSession:
    if slot.session is None or slot.session.closed:
        slot.session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=slot.admin_socket),
            timeout=aiohttp.ClientTimeout(total=WORKER_TIMEOUT),
        )
    return slot.session


async def _get(slot: WorkerSlot, path: str) -> tuple[int, bytes] | None:
    """``(status, body)`` of the worker's answer, or None: not running or not answering."""
    if not slot.alive:
        return None
    try:
        async with _session(slot).get(f"http://worker{path}") as response:
            return response.status, await response.read()
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None


async def _gather(supervisor: Supervisor, path: str) -> list[tuple[WorkerSlot, int, bytes]]:
    answers = await asyncio.gather(*(_get(slot, path) for slot in supervisor.slots))
    return [
        (slot, *answer)
        for slot, answer in zip(supervisor.slots, answers, strict=True)
        if answer is not None
    ]


def _workers(supervisor: Supervisor, answered: set[int] | None = None) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for slot in supervisor.slots:
        row: dict[str, object] = {
            "worker": slot.number,
            "pid": slot.pid,
            "alive": slot.alive,
            "restarts": slot.restarts,
            "admin_socket": slot.admin_socket,
        }
        if answered is not None:
            row["healthy"] = slot.number in answered
        rows.append(row)
    return rows


def _health_handler(supervisor: Supervisor) -> Handler:
    async def health(_: web.Request) -> web.Response:
        answers = await _gather(supervisor, "/healthz")
        healthy = {slot.number for slot, code, _ in answers if code == 200}
        body: dict[str, object] = {}
        if answers:
            parsed = json.loads(answers[0][2])
            if isinstance(parsed, dict):
                body = parsed
        body["workers"] = _workers(supervisor, healthy)
        running = {slot.number for slot in supervisor.slots if slot.alive}
        # A worker between its death and its restart holds no socket (the others serve
        # its share), so it does not fail the node; one that runs must answer 200.
        code = 200 if running and running <= healthy else 503
        return web.json_response(body, status=code)

    return health


def health_app(supervisor: Supervisor) -> web.Application:
    app = web.Application()
    handler = _health_handler(supervisor)
    app.router.add_get("/healthz", handler)
    app.router.add_get("/livez", handler)
    return app


def metrics_app(supervisor: Supervisor) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        answers = await _gather(supervisor, "/metrics")
        parent = generate_latest(supervisor.metrics.registry).decode()
        workers = [(str(slot.number), b.decode()) for slot, code, b in answers if code == 200]
        # Parsing and writing every worker's samples takes seconds of CPU with 10 000
        # Services: on a thread (it only reads these strings), so the parent's loop keeps
        # forwarding changes to the workers meanwhile.
        text = await asyncio.to_thread(merge_metrics, parent, workers)
        return web.Response(body=text, content_type="text/plain", charset="utf-8")

    async def status(request: web.Request) -> web.Response:
        answers = await _gather(supervisor, request.path_qs)
        documents = [json.loads(body) for _, code, body in answers if code == 200]
        if not documents:
            errors = [(code, body) for _, code, body in answers]
            if errors:  # a bad query: the worker's 400 as it is
                return web.Response(status=errors[0][0], body=errors[0][1])
            raise web.HTTPServiceUnavailable(text="no worker answers\n")
        document = merge_status(documents)
        if isinstance(document, dict):
            document["workers"] = _workers(supervisor)
            document["control"] = {
                "pid": os.getpid(),
                "forwarded_calls": supervisor.forwarder.calls,
            }
        return web.json_response(document)

    async def proxy_mode(_: web.Request) -> web.Response:
        return web.Response(text=PROXY_MODE)

    async def serve_configz(_: web.Request) -> web.Response:
        return web.json_response(configz(supervisor.settings))

    async def passthrough(request: web.Request) -> web.StreamResponse:
        for slot in supervisor.slots:
            if slot.alive:
                break
        else:
            raise web.HTTPServiceUnavailable(text="no worker runs\n")
        try:
            async with _session(slot).get(
                f"http://worker{request.path_qs}",
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=WORKER_TIMEOUT),
            ) as upstream:
                response = web.StreamResponse(status=upstream.status)
                for name in ("Content-Type", "Cache-Control"):
                    if name in upstream.headers:
                        response.headers[name] = upstream.headers[name]
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (aiohttp.ClientError, OSError) as exc:
            raise web.HTTPBadGateway(text=f"worker {slot.number}: {exc}\n") from None

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", _health_handler(supervisor))
    app.router.add_get("/status", status)
    app.router.add_get("/proxyMode", proxy_mode)
    app.router.add_get("/configz", serve_configz)
    app.router.add_get("/{tail:.*}", passthrough)
    return app


def admin_tasks(supervisor: Supervisor, tasks: asyncio.TaskGroup) -> list[asyncio.Task[None]]:
    """The parent's health and metrics servers, as ``Proxy`` starts its own."""
    started = []
    settings = supervisor.settings
    if settings.healthz_address is not None:
        started.append(
            tasks.create_task(
                serve_app(
                    health_app(supervisor),
                    settings.healthz_address,
                    "health",
                    supervisor.health_ready,
                )
            )
        )
    if settings.metrics_address is not None:
        started.append(
            tasks.create_task(
                serve_app(
                    metrics_app(supervisor),
                    settings.metrics_address,
                    "metrics",
                    supervisor.metrics_ready,
                )
            )
        )
    return started
