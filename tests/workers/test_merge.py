"""What the parent makes of its workers' answers (``workers/merge.py``) and what a new
worker is told (``workers/forwarder.py``): pure logic, no processes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.model import eps, sep, svc
from userproxy.config import Settings
from userproxy.model import Node
from userproxy.workers.channel import Call, Hello, encode, read_message
from userproxy.workers.forwarder import Forwarder
from userproxy.workers.merge import merge_metrics, merge_status


def _exposition(accepted: float, relists: float) -> str:
    registry = CollectorRegistry()
    Counter("userproxy_connections_accepted", "a", ["service_port"], registry=registry).labels(
        "default/web:http"
    ).inc(accepted)
    Counter("userproxy_relists", "r", ["resource"], registry=registry).labels("services").inc(
        relists
    )
    Gauge("process_open_fds", "fds", registry=registry).set(7)
    return generate_latest(registry).decode()


def _values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_metrics_get_a_worker_label_and_the_parent_keeps_its_own_families() -> None:
    parent = CollectorRegistry()
    Gauge("userproxy_worker_up", "up", ["worker"], registry=parent).labels("0").set(1)
    Counter("userproxy_relists", "r", ["resource"], registry=parent).labels("services").inc(3)
    Gauge("process_open_fds", "fds", registry=parent).set(5)
    merged = _values(
        merge_metrics(
            generate_latest(parent).decode(),
            [("0", _exposition(10, 0)), ("1", _exposition(4, 0))],
        ).decode()
    )
    port = ("service_port", "default/web:http")
    assert merged[("userproxy_connections_accepted_total", (port, ("worker", "0")))] == 10
    assert merged[("userproxy_connections_accepted_total", (port, ("worker", "1")))] == 4
    # The source's events are the parent's alone (the workers' are always 0).
    relists = {k: v for k, v in merged.items() if k[0] == "userproxy_relists_total"}
    assert relists == {
        ("userproxy_relists_total", (("resource", "services"), ("worker", "control"))): 3
    }
    # The parent's per-worker gauge keeps its own worker label.
    assert merged[("userproxy_worker_up", (("worker", "0"),))] == 1
    # process_* from every process.
    fds = {k[1]: v for k, v in merged.items() if k[0] == "process_open_fds"}
    assert fds == {(("worker", "control"),): 5, (("worker", "0"),): 7, (("worker", "1"),): 7}


def test_status_sums_the_traffic_counts_where_the_shapes_agree() -> None:
    def document(accepted: int, active: int, syncs: int) -> dict[str, object]:
        return {
            "node": "n1",
            "sync": {"syncs": syncs},
            "events": [{"at": syncs}],
            "services": [
                {"name": "web", "ports": [{"port": 80, "totals": {"accepted": accepted,
                 "active": active, "bytes_up": 1, "bytes_down": 2, "dial_failures": 0}}]}
            ],
        }  # fmt: skip

    merged = merge_status([document(10, 1, 3), document(5, 2, 4)])
    assert merged == {
        "node": "n1",
        "sync": {"syncs": 3},  # not a traffic count: the first worker's
        "events": [{"at": 3}],
        "services": [
            {"name": "web", "ports": [{"port": 80, "totals": {"accepted": 15, "active": 3,
             "bytes_up": 2, "bytes_down": 4, "dial_failures": 0}}]}
        ],
    }  # fmt: skip
    # A worker that has not caught up (another shape) is left out of the sums.
    behind = {**document(7, 7, 1), "services": []}
    assert merge_status([document(10, 1, 3), behind]) == document(10, 1, 3)


def test_a_new_worker_is_told_the_current_view_then_the_changes() -> None:
    sent: list[Call] = []
    forwarder = Forwarder(sent.append)
    web, api = svc("web"), svc("api")
    forwarder.on_service_add(web)
    forwarder.on_service_add(api)
    forwarder.on_service_delete(api)
    forwarder.on_services_synced()
    web_slice = eps("web-1", "web", sep("10.1.0.1"))
    forwarder.on_endpointslice_add(web_slice)
    forwarder.on_node_add(Node("n1", zone="z1"))
    forwarder.on_node_update(Node("n1", zone="z1"), Node("n1", zone="z2"))
    assert [c.method for c in sent] == [
        "on_service_add",
        "on_service_add",
        "on_service_delete",
        "on_services_synced",
        "on_endpointslice_add",
        "on_node_add",
        "on_node_update",
    ]
    assert list(forwarder.replay()) == [
        Call("on_service_add", (web,)),
        Call("on_services_synced", ()),
        Call("on_endpointslice_add", (web_slice,)),
        Call("on_node_add", (Node("n1", zone="z2"),)),
    ]
    forwarder.on_endpointslices_synced()
    forwarder.on_node_synced()
    assert [c.method for c in forwarder.replay()][-3:] == [
        "on_endpointslices_synced",
        "on_node_add",
        "on_node_synced",
    ]


async def test_messages_survive_the_channel(tmp_path: Path) -> None:
    call = Call("on_service_add", (svc("web"),))
    hello = Hello(1, 2, Settings(manifests=(tmp_path,), hostname="n1"), str(tmp_path / "s"))
    reader = asyncio.StreamReader()
    reader.feed_data(encode(hello) + encode(call))
    reader.feed_eof()
    assert await read_message(reader) == hello
    assert await read_message(reader) == call
    with pytest.raises(asyncio.IncompleteReadError):
        await read_message(reader)
