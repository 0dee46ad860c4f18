"""/status (JSON) and / (HTML) of a running proxy: the schema of docs/status.md, the
endpoints with their conditions, node, zone, hints and connections, listeners open or
closed and why, the timeline of a sync, search and paging, and a 2 000-Service answer.

Addresses: Services on 127.214.1.x, backends on 127.214.1.1x (no other test uses 127.214).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support.backends import Backend, echo
from tests.support.manifests import service, write
from tests.support.proxyrun import eventually, free_port, running_proxy, wait_for_sync
from userproxy.admin.events import EventLog
from userproxy.control.endpoint_counts import EndpointCount
from userproxy.model import (
    Protocol,
    ServicePortName,
)

pytestmark = pytest.mark.both_loops

WEB = ("127.214.1.1", 8080)
DB = ("127.214.1.2", 5432)

HEADER = {
    "version", "node", "generated_at", "sync", "services_total", "services_matched",
    "query", "page", "pages", "page_size", "events", "services",
}  # fmt: skip
SERVICE = {
    "namespace", "name", "type", "cluster_ips", "internal_traffic_policy",
    "external_traffic_policy", "balancer", "affinity", "error", "ports",
}  # fmt: skip
PORT = {"name", "protocol", "port", "node_port", "counts", "listeners", "pools", "totals",
        "endpoints"}  # fmt: skip
COUNTS = {"endpoints", "ready", "serving", "terminating", "not_ready", "ejected"}
TOTALS = {"active", "accepted", "dial_failures", "bytes_up", "bytes_down"}
LISTENER = {"address", "kind", "protocol", "open", "reason", "source_ranges", "proxy_protocol"}
ENDPOINT = {
    "address", "ready", "serving", "terminating", "node", "zone", "zone_hints",
    "node_hints", "local", "ejected", "active_connections", "connections_total",
    "bytes_up", "bytes_down", "dial_failures",
}  # fmt: skip


def check_schema(data: dict[str, Any]) -> None:
    """Every object has exactly the documented fields, of the documented types."""
    assert set(data) == HEADER
    assert isinstance(data["sync"]["syncs"], int)
    for event in data["events"]:
        assert set(event) == {"time", "kind", "message"}
        assert isinstance(event["message"], str)
    for svc in data["services"]:
        assert set(svc) == SERVICE, svc.keys()
        for port in svc["ports"]:
            assert set(port) == PORT
            assert set(port["counts"]) == COUNTS
            assert set(port["totals"]) == TOTALS
            assert set(port["pools"]) <= {"internal", "external", "cluster"}
            for listener in port["listeners"]:
                assert set(listener) == LISTENER
                assert isinstance(listener["open"], bool)
            for e in port["endpoints"]:
                assert set(e) == ENDPOINT
                host, _, number = e["address"].rpartition(":")
                assert host
                assert number.isdigit()
                for name in ("ready", "serving", "terminating", "local", "ejected"):
                    assert isinstance(e[name], bool), name


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        with error:  # closed here, not by the collector later (a ResourceWarning)
            return error.code, error.read().decode()


def web_slice(port: int, *, b2_ready: bool = True) -> dict[str, Any]:
    """web's slice: b1 (ready, this node, zone hint), b2, one not ready, one terminating."""

    def entry(ip: str, node: str, **conditions: bool) -> dict[str, Any]:
        return {"addresses": [ip], "nodeName": node, "zone": "zone-a", "conditions": conditions}

    b1 = entry("127.214.1.11", "test-node", ready=True)
    b1["hints"] = {"forZones": [{"name": "zone-a"}]}
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "web-1",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": "web"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": port}],
        "endpoints": [
            b1,
            entry("127.214.1.12", "node-b", ready=b2_ready),
            entry("127.214.1.13", "node-b", ready=False, serving=False),
            entry("127.214.1.14", "node-b", ready=False, serving=True, terminating=True),
        ],
    }


async def test_status_json_and_page(tmp_path: Path) -> None:
    b1 = Backend("127.214.1.11", echo)
    b2 = Backend("127.214.1.12", echo, port=b1.port)
    manifest = tmp_path / "s.json"
    web = service("web", WEB[0], {"http": WEB[1]})
    db = service("db", DB[0], DB[1], affinity_timeout=30)
    write(manifest, web, web_slice(b1.port), db)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    try:
        async with running_proxy(tmp_path, metrics_bind_address=f"127.0.0.1:{port}") as proxy:
            # One connection held open: counted on its endpoint and in the port's totals.
            conn = await asyncio.to_thread(socket.create_connection, WEB, 5)
            try:
                await asyncio.to_thread(conn.sendall, b"hi\n")
                assert await asyncio.to_thread(conn.recv, 16) == b"hi\n"
                code, body = await asyncio.to_thread(fetch, f"{base}/status")
            finally:
                conn.close()
            assert code == 200
            data = json.loads(body)
            check_schema(data)
            assert data["node"] == "test-node"
            assert data["services_total"] == 2
            assert [s["name"] for s in data["services"]] == ["db", "web"]
            db_json, web_json = data["services"]
            assert db_json["affinity"] == {"type": "ClientIP", "timeout_seconds": 30}
            (db_port,) = db_json["ports"]
            assert db_port["counts"]["endpoints"] == 0
            assert [(x["open"], x["reason"]) for x in db_port["listeners"]] == [
                (False, "no endpoints")
            ]
            assert web_json["balancer"] == "round-robin"
            (http,) = web_json["ports"]
            assert http["name"] == "http"
            assert http["port"] == WEB[1]
            assert http["counts"] == {
                "endpoints": 4, "ready": 2, "serving": 3, "terminating": 1,
                "not_ready": 2, "ejected": 0,
            }  # fmt: skip
            (listener,) = http["listeners"]
            assert listener == {
                "address": f"{WEB[0]}:{WEB[1]}", "kind": "ClusterIP", "protocol": "TCP",
                "open": True, "reason": None, "source_ranges": [], "proxy_protocol": None,
            }  # fmt: skip
            assert http["pools"] == {
                "internal": [f"127.214.1.11:{b1.port}", f"127.214.1.12:{b1.port}"]
            }
            by_ip = {e["address"].split(":")[0]: e for e in http["endpoints"]}
            first = by_ip["127.214.1.11"]
            assert first["node"] == "test-node"
            assert first["zone"] == "zone-a"
            assert first["zone_hints"] == ["zone-a"]
            assert first["local"] is True
            assert by_ip["127.214.1.12"]["local"] is False
            assert by_ip["127.214.1.13"]["serving"] is False
            assert by_ip["127.214.1.14"]["terminating"] is True
            assert sum(e["active_connections"] for e in http["endpoints"]) == 1
            assert http["totals"]["accepted"] == 1
            assert http["totals"]["active"] == 1
            assert any(
                e["message"] == "default/web:http 0 -> 2 ready endpoints" for e in data["events"]
            )

            # The page: the Services and endpoints; a search; a bad parameter.
            code, page = await asyncio.to_thread(fetch, f"{base}/")
            assert code == 200
            assert "default/web" in page
            assert "default/db" in page
            assert f"127.214.1.14:{b1.port}" in page
            assert "no endpoints" in page
            code, page = await asyncio.to_thread(fetch, f"{base}/?q=DB")
            assert "<h2 id='default/db'>" in page
            assert "<h2 id='default/web'>" not in page
            code, body = await asyncio.to_thread(fetch, f"{base}/status?q=web")
            assert [s["name"] for s in json.loads(body)["services"]] == ["web"]
            code, body = await asyncio.to_thread(fetch, f"{base}/status?page=x")
            assert code == 400
            assert "page" in body

            # A sync: b2 not ready, db deleted; the timeline says what changed.
            syncs = proxy.proxier.status.syncs
            write(manifest, web, web_slice(b1.port, b2_ready=False))
            await wait_for_sync(proxy, syncs)
            await eventually(lambda: len(proxy.proxier.state.services) == 1)
            code, body = await asyncio.to_thread(fetch, f"{base}/status")
            data = json.loads(body)
            check_schema(data)
            assert [s["name"] for s in data["services"]] == ["web"]
            messages = [e["message"] for e in data["events"]]
            assert "default/web:http 2 -> 1 ready endpoints" in messages
            assert data["services"][0]["ports"][0]["counts"]["ready"] == 1
    finally:
        b1.stop()
        b2.stop()


async def test_status_of_many_services_pages_and_answers(tmp_path: Path) -> None:
    """2 000 Services (no endpoints: no sockets): every one in /status, paged and searched
    right; the loop keeps running while /status is built (the figure is printed; the
    benchmark bench/status.py measures 10 000)."""
    count = 2000
    objects = [
        service(f"svc-{i:05d}", f"10.214.{i // 250}.{i % 250 + 1}", 80, namespace="many")
        for i in range(count)
    ]
    write(tmp_path / "many.json", *objects)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    async with running_proxy(tmp_path, metrics_bind_address=f"127.0.0.1:{port}") as proxy:
        await eventually(lambda: len(proxy.proxier.state.services) == count, within=10)
        lag = 0.0
        done = False

        async def ticker() -> None:
            nonlocal lag
            while not done:
                before = time.perf_counter()
                await asyncio.sleep(0.001)
                lag = max(lag, time.perf_counter() - before - 0.001)

        task = asyncio.create_task(ticker())
        started = time.perf_counter()
        try:
            code, body = await asyncio.to_thread(fetch, f"{base}/status")
        finally:
            done = True
            await task
        took = time.perf_counter() - started
        print(f"\n/status with {count} Services: {took * 1000:.0f} ms, max loop lag "
              f"{lag * 1000:.1f} ms, {len(body)} bytes")  # fmt: skip
        assert code == 200
        data = json.loads(body)
        check_schema(data)
        names = [s["name"] for s in data["services"]]
        assert names == [f"svc-{i:05d}" for i in range(count)]
        assert took < 30  # a generous bound only: this machine is shared

        code, body = await asyncio.to_thread(fetch, f"{base}/status?page=3&page_size=100")
        data = json.loads(body)
        assert data["pages"] == 20
        assert [s["name"] for s in data["services"]] == [f"svc-{i:05d}" for i in range(200, 300)]
        code, body = await asyncio.to_thread(fetch, f"{base}/status?q=svc-0199")
        assert [s["name"] for s in json.loads(body)["services"]] == [
            f"svc-0199{i}" for i in range(10)
        ]
        code, page = await asyncio.to_thread(fetch, f"{base}/?page=2")
        assert "many/svc-00100" in page
        assert "many/svc-00199" in page
        assert "many/svc-00200" not in page
        assert "page 2 of 20" in page


def test_event_log_is_bounded_and_names_each_port() -> None:
    events = EventLog(size=5, clock=lambda: 1.0)
    spn = ServicePortName("default", "web", "http", Protocol.TCP)

    from userproxy.control.proxier import SyncStatus

    events.note_counts(None, EndpointCount(spn, ready=2, not_ready=1))
    events.synced(SyncStatus(syncs=1, services_changed=1))
    events.note_counts(EndpointCount(spn, 2, 0, 1), EndpointCount(spn, 2))  # same ready: no event
    events.note_counts(EndpointCount(spn, 2), None)
    events.synced(SyncStatus(syncs=2, services_changed=1))
    messages = [e.message for e in events.events]
    assert "default/web:http 0 -> 2 ready endpoints" in messages
    assert "default/web:http 2 -> 0 ready endpoints (port removed)" in messages
    assert len(messages) == 4
    for i in range(10):
        events.add("sync", f"event {i}")
    assert [e.message for e in events.events] == [f"event {i}" for i in range(5, 10)]
