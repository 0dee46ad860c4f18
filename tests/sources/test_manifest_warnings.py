"""Nothing in the manifests is dropped without a word (issue 10, acceptance item 3).

Each valid object that would otherwise be ignored quietly gives one WARNING naming the
file, the document (from 1) and the object; the warnings are bounded (aggregated per
category) and logged once per distinct problem, not at every reload.  Two Services on one
address also show in ``userproxy_listener_conflicts``.

Addresses: the listener-conflict test binds 127.x.y.1:8080 from ``fresh_net`` (unique).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tests.support.manifest_cases import documents, node_yaml, service_yaml, slice_yaml
from tests.support.manifests import fresh_net
from userproxy.balancers.registry import BalancerRegistry
from userproxy.control.trackers import ChangeRecorder
from userproxy.dataplane.deadlines import TcpTimeouts
from userproxy.dataplane.limits import ConnectionLimit
from userproxy.dataplane.listener_set import ListenerSet
from userproxy.metrics import Metrics
from userproxy.model import (
    AddressKind,
    Endpoint,
    ListenerSpec,
    PoolSpec,
    Protocol,
    ServiceKey,
    ServicePortName,
)
from userproxy.sources.manifest_warnings import LOGGED_PER_CATEGORY, Category, type_warning
from userproxy.sources.manifests import ManifestSource, load_manifests

NODE = node_yaml("n1")
WEB = service_yaml("web", "10.96.0.10")
NO_CLUSTER_IP = service_yaml("api", None)
SAME_ADDRESS = service_yaml("web2", "10.96.0.10")
ENDPOINTS = """\
apiVersion: v1
kind: Endpoints
metadata: {name: web, namespace: shop}
subsets: [{addresses: [{ip: 10.1.0.5}], ports: [{name: http, port: 8080}]}]
"""


def slice_of(
    service: str,
    port_name: str,
    *,
    kind: str = "EndpointSlice",
    api_version: str = "discovery.k8s.io/v1",
) -> str:
    return slice_yaml(
        "web-a", service, port_name=port_name, port=8080, kind=kind, api_version=api_version
    )


#: id -> (file content, category, where (document N), object, what the message says)
DROPS: dict[str, tuple[str, Category, str, str, list[str]]] = {
    "misspelt-kind": (
        documents(NODE, WEB, slice_of("web", "http", kind="EndpointSlise")),
        Category.UNREAD_TYPE,
        "document 3",
        "EndpointSlise shop/web-a",
        ["not read", "did you mean", "kind EndpointSlice"],
    ),
    "old-api-version": (
        documents(NODE, WEB, slice_of("web", "http", api_version="discovery.k8s.io/v1beta1")),
        Category.UNREAD_TYPE,
        "document 3",
        "EndpointSlice shop/web-a",
        ["apiVersion discovery.k8s.io/v1beta1 is not read", "did you mean", "discovery.k8s.io/v1?"],
    ),
    "endpoints": (
        documents(WEB, ENDPOINTS),
        Category.ENDPOINTS,
        "document 2",
        "Endpoints shop/web",
        ["EndpointSlices only"],
    ),
    "service-without-cluster-ip": (
        documents(NO_CLUSTER_IP),
        Category.NO_CLUSTER_IP,
        "document 1",
        "Service shop/api",
        ["no spec.clusterIP", "not headless", "not proxied"],
    ),
    "slice-port-name-matches-no-service-port": (
        documents(WEB, slice_of("web", "htp")),
        Category.UNMATCHED_PORT,
        "document 2",
        "EndpointSlice shop/web-a",
        ["ports[0] htp/TCP matches no port of Service shop/web (http/TCP)", "serve nothing"],
    ),
    "two-services-on-one-address": (
        documents(WEB, SAME_ADDRESS),
        Category.ADDRESS_CONFLICT,
        "document 2",
        "Service shop/web2",
        ["TCP 10.96.0.10:80 (ClusterIP) is also an address of Service shop/web", "document 1"],
    ),
    "slice-without-its-service": (
        documents(WEB, slice_of("webb", "http")),
        Category.NO_SERVICE,
        "document 2",
        "EndpointSlice shop/web-a",
        ["its Service shop/webb", "serve nothing"],
    ),
}


@pytest.mark.parametrize("case", list(DROPS))
def test_each_silent_drop_gives_one_warning_naming_file_document_and_object(
    tmp_path: Path, case: str
) -> None:
    content, category, document, subject, words = DROPS[case]
    path = tmp_path / "m.yaml"
    path.write_text(content)
    state = load_manifests([path])
    assert [w.category for w in state.warnings] == [category]
    text = str(state.warnings[0])
    assert text.startswith(f"{path}: {document}: {subject}: "), text
    for word in words:
        assert word in text, (word, text)


@pytest.mark.parametrize("case", list(DROPS))
async def test_the_source_logs_each_as_a_warning(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    content, _, document, subject, _ = DROPS[case]
    path = tmp_path / "m.yaml"
    path.write_text(content)
    caplog.set_level(logging.WARNING, logger="userproxy.sources.manifests")
    ManifestSource([path], ChangeRecorder("n1", lambda: None), node_name="n1").initial_load()
    records = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert f"{path}: {document}: {subject}: " in records[0].getMessage()


QUIET = {
    "other-kinds": "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n---\n"
    "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: sa}\n---\n"
    "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n",
    "another-groups-service": "apiVersion: serving.knative.dev/v1\nkind: Service\n"
    "metadata: {name: k}\n",
    "another-groups-close-kind": "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n"
    "metadata: {name: e}\n",
    "headless": "apiVersion: v1\nkind: Service\nmetadata: {name: h}\n"
    "spec: {clusterIP: None, ports: [{name: a, port: 80}]}\n",
    "headless-clusterips": "apiVersion: v1\nkind: Service\nmetadata: {name: h}\n"
    "spec: {clusterIPs: [None], ports: [{name: a, port: 80}]}\n",
    "external-name": "apiVersion: v1\nkind: Service\nmetadata: {name: x}\n"
    "spec: {type: ExternalName, externalName: example.com}\n",
    "matching-slice": documents(WEB, slice_of("web", "http")),
}


@pytest.mark.parametrize("case", list(QUIET))
def test_what_is_meant_to_be_ignored_gives_no_warning(tmp_path: Path, case: str) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(QUIET[case])
    assert load_manifests([path]).warnings == ()


@pytest.mark.parametrize(
    ("api_version", "kind", "meant"),
    [
        ("v1", "Serivce", "kind Service"),
        ("v1", "service", "kind Service"),
        ("v1", "Nodes", "kind Node"),
        ("discovery.k8s.io/v1", "Endpointslice", "kind EndpointSlice"),
        ("v1", "EndpointSlice", "apiVersion discovery.k8s.io/v1?"),
        ("discovery/v1", "EndpointSlice", "apiVersion discovery.k8s.io/v1?"),
        ("discovery.k8s.io/v1", "Service", "apiVersion v1?"),
    ],
)
def test_close_types_name_the_one_probably_meant(api_version: str, kind: str, meant: str) -> None:
    found = type_warning(api_version, kind)
    assert found is not None
    assert found[0] is Category.UNREAD_TYPE
    assert meant in found[1]


async def test_warnings_are_bounded_and_logged_once_per_distinct_problem(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    count = 50_000
    items = [
        {"metadata": {"name": f"e{i}", "namespace": "shop"}, "subsets": []} for i in range(count)
    ]
    bulk = tmp_path / "endpoints.json"
    bulk.write_text(json.dumps({"apiVersion": "v1", "kind": "EndpointsList", "items": items}))
    other = tmp_path / "web.yaml"
    other.write_text(WEB)
    caplog.set_level(logging.WARNING, logger="userproxy.sources.manifests")
    source = ManifestSource([tmp_path], ChangeRecorder("n1", lambda: None), node_name="n1")
    state = source.initial_load()
    assert len(state.warnings) == count

    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == LOGGED_PER_CATEGORY + 1, lines[:3]
    assert f"{bulk}: document 1, items[0]: Endpoints shop/e0: " in lines[0]
    assert lines[-1].endswith(f"... and {count - LOGGED_PER_CATEGORY} more {Category.ENDPOINTS}")

    # A reload (another file changed) logs nothing it logged before, only what is new.
    caplog.clear()
    other.write_text(documents(WEB, NO_CLUSTER_IP))
    await source.poll()
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1, lines
    assert f"{other}: document 2: Service shop/api: " in lines[0]
    caplog.clear()
    other.write_text(documents(NO_CLUSTER_IP, WEB))  # the same problem, now document 1
    await source.poll()
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1, lines
    assert f"{other}: document 1: Service shop/api: " in lines[0]
    caplog.clear()
    other.write_text(documents(NO_CLUSTER_IP, WEB) + "\n")  # changed, same problems
    await source.poll()
    assert [r for r in caplog.records if r.levelno == logging.WARNING] == []


async def test_cross_checks_of_a_large_reload_run_in_the_worker_path(tmp_path: Path) -> None:
    """A reload big enough for the child process still carries every kind of warning."""
    path = tmp_path / "m.yaml"
    path.write_text(WEB)
    source = ManifestSource([path], ChangeRecorder("n1", lambda: None), node_name="n1")
    source.initial_load()
    filler = "".join(
        f"---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c{i}}}\n" for i in range(2000)
    )
    path.write_text(documents(WEB, ENDPOINTS, SAME_ADDRESS, slice_of("web", "htp")) + filler)
    await source.poll()
    assert source.worker_reads == 1
    assert source.state is not None
    assert sorted(w.category for w in source.state.warnings) == sorted(
        [Category.ENDPOINTS, Category.ADDRESS_CONFLICT, Category.UNMATCHED_PORT]
    )


def _spec(service: str, ip: str) -> ListenerSpec:
    spn = ServicePortName("shop", service, "http", Protocol.TCP)
    pool = PoolSpec((Endpoint("127.0.0.1", 9),), "round-robin")
    return ListenerSpec(spn, AddressKind.CLUSTER_IP, ip, 8080, pool)


async def test_two_services_on_one_address_are_counted_in_a_metric() -> None:
    net = fresh_net()
    ip = f"127.{net // 200 + 100}.{net % 200}.1"
    listeners = ListenerSet(BalancerRegistry(), ConnectionLimit(10), TcpTimeouts())
    metrics = Metrics()
    metrics.watch(ChangeRecorder("n1", lambda: None), listeners)
    web, web2 = ServiceKey("shop", "web"), ServiceKey("shop", "web2")
    try:
        assert metrics.registry.get_sample_value("userproxy_listener_conflicts") == 0
        listeners.set_listeners(web, [_spec("web", ip)])
        listeners.set_listeners(web2, [_spec("web2", ip)])
        assert metrics.registry.get_sample_value("userproxy_listener_conflicts") == 1
        listeners.set_listeners(web2, [])  # no longer asks for it
        assert metrics.registry.get_sample_value("userproxy_listener_conflicts") == 0
    finally:
        listeners.stop_accepting()
        await listeners.drain(0.1)
