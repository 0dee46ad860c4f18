"""Table-driven tests for decoding raw API objects into model objects."""

from __future__ import annotations

import copy
from datetime import UTC, datetime

import pytest

from userproxy.model import (
    DEFAULT_AFFINITY_TIMEOUT,
    EndpointPort,
    EndpointSlice,
    IPFamily,
    LoadBalancerIngress,
    Node,
    Protocol,
    Service,
    ServicePort,
    ServiceType,
    SliceEndpoint,
    TrafficPolicy,
)
from userproxy.sources.decode import (
    DecodeError,
    decode_endpoint_slice,
    decode_labels,
    decode_node,
    decode_service,
    is_selected,
)

DELETE = object()
Segment = str | int


def with_value(
    obj: dict[str, object], path: tuple[Segment, ...], value: object
) -> dict[str, object]:
    """A deep copy of ``obj`` with the value at ``path`` replaced (or removed by DELETE)."""
    result = copy.deepcopy(obj)
    node: object = result
    for segment in path[:-1]:
        if isinstance(segment, int):
            assert isinstance(node, list)
            node = node[segment]
        else:
            assert isinstance(node, dict)
            node = node.setdefault(segment, {})
    last = path[-1]
    if isinstance(last, int):
        assert isinstance(node, list)
        node[last] = value
    else:
        assert isinstance(node, dict)
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    return result


# --------------------------------------------------------------------------- Service


def full_service() -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "web",
            "namespace": "shop",
            "labels": {"app": "web"},
            "annotations": {"userproxy.io/balancer": "least-conn"},
        },
        "spec": {
            "type": "LoadBalancer",
            "clusterIP": "10.96.0.10",
            "clusterIPs": ["10.96.0.10", "FD00::000A"],
            "ports": [
                {"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080},
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "dns"},
                {"name": "assoc", "port": 9000, "protocol": "SCTP"},
            ],
            "externalIPs": ["192.0.2.1"],
            "loadBalancerSourceRanges": ["203.0.113.0/24", "10.0.0.1/8"],
            "internalTrafficPolicy": "Local",
            "externalTrafficPolicy": "Local",
            "healthCheckNodePort": 32000,
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}},
        },
        "status": {
            "loadBalancer": {
                "ingress": [
                    {"ip": "198.51.100.7"},
                    {"ip": "198.51.100.8", "ipMode": "Proxy"},
                    {"hostname": "lb.example.com"},
                ]
            }
        },
    }


def minimal_service() -> dict[str, object]:
    return {
        "metadata": {"name": "api"},
        "spec": {"clusterIP": "10.0.0.1", "ports": [{"port": 443}]},
    }


def test_full_service() -> None:
    assert decode_service(full_service()) == Service(
        namespace="shop",
        name="web",
        type=ServiceType.LOAD_BALANCER,
        cluster_ips=("10.96.0.10", "fd00::a"),
        ports=(
            ServicePort("http", Protocol.TCP, 80, node_port=30080, target_port=8080),
            ServicePort("dns", Protocol.UDP, 53, target_port="dns"),
            ServicePort("assoc", Protocol.SCTP, 9000),
        ),
        external_ips=("192.0.2.1",),
        load_balancer_ingress=(
            LoadBalancerIngress("198.51.100.7"),
            LoadBalancerIngress("198.51.100.8", ip_mode="Proxy"),
        ),
        load_balancer_source_ranges=("203.0.113.0/24", "10.0.0.0/8"),
        internal_traffic_policy=TrafficPolicy.LOCAL,
        external_traffic_policy=TrafficPolicy.LOCAL,
        health_check_node_port=32000,
        affinity_timeout=600,
        balancer="least-conn",
    )


def test_minimal_service_gets_defaults() -> None:
    service = decode_service(minimal_service())
    assert service == Service(
        namespace="default",
        name="api",
        cluster_ips=("10.0.0.1",),
        ports=(ServicePort("", Protocol.TCP, 443),),
    )
    assert service.type is ServiceType.CLUSTER_IP
    assert service.affinity_timeout is None
    assert service.balancer is None
    assert service.is_proxied


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"clusterIP": "None"}, ()),
        ({"clusterIP": ""}, ()),
        ({}, ()),
        ({"clusterIP": None, "clusterIPs": None}, ()),
        ({"clusterIPs": ["None"]}, ()),
        ({"clusterIP": "None", "clusterIPs": ["None"]}, ()),
        ({"clusterIP": "10.0.0.1", "clusterIPs": ["10.0.0.1", "fd00::1"]}, ("10.0.0.1", "fd00::1")),
        ({"clusterIPs": ["fd00::1", "10.0.0.1"]}, ("fd00::1", "10.0.0.1")),
        ({"clusterIP": "fd00::0:1"}, ("fd00::1",)),
    ],
    ids=[
        "None",
        "empty",
        "absent",
        "null",
        "clusterIPs-None",
        "both-None",
        "dual-stack",
        "ipv6-primary",
        "ipv6-canonical",
    ],
)
def test_cluster_ips(spec: dict[str, object], expected: tuple[str, ...]) -> None:
    obj = {"metadata": {"name": "svc"}, "spec": {**spec, "ports": [{"port": 80}]}}
    service = decode_service(obj)
    assert service.cluster_ips == expected
    assert service.is_proxied == bool(expected)


def test_external_name_service_is_not_proxied() -> None:
    obj = {"metadata": {"name": "ext"}, "spec": {"type": "ExternalName", "externalName": "x.io"}}
    service = decode_service(obj)
    assert service.type is ServiceType.EXTERNAL_NAME
    assert not service.is_proxied


@pytest.mark.parametrize(
    ("affinity", "expected"),
    [
        ({"sessionAffinity": "None"}, None),
        ({"sessionAffinity": "ClientIP"}, DEFAULT_AFFINITY_TIMEOUT),
        ({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {}}}, 10800),
        (
            {
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 1}},
            },
            1,
        ),
        (
            {
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86400}},
            },
            86400,
        ),
        (
            {
                "sessionAffinity": "None",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 5}},
            },
            None,
        ),
    ],
    ids=["none", "default", "empty-config", "min", "max", "config-without-affinity"],
)
def test_session_affinity(affinity: dict[str, object], expected: int | None) -> None:
    obj = minimal_service()
    spec = obj["spec"]
    assert isinstance(spec, dict)
    spec.update(affinity)
    assert decode_service(obj).affinity_timeout == expected


@pytest.mark.parametrize(
    ("annotations", "expected"),
    [
        ({}, None),
        ({"userproxy.io/proxy-protocol": "v1"}, "v1"),
        ({"userproxy.io/proxy-protocol": "v2"}, "v2"),
        ({"userproxy.io/proxy-protocol": " v2\n"}, "v2"),
        # Kept as written, never a DecodeError: planning warns (naming the Service and the
        # value) and sends no header; a typo must not drop the Service (tests/dataplane/
        # test_proxy_protocol.py, test_bad_annotation_value_warns_once_and_sends_none).
        ({"userproxy.io/proxy-protocol": "v3"}, "v3"),
        ({"userproxy.io/proxy-protocol": "V1"}, "V1"),
        ({"userproxy.io/proxy-protocol": ""}, ""),
        ({"userproxy.io/proxy-protocol": "true"}, "true"),
        ({"userproxy.io/proxy-protocols": "v1"}, None),
    ],
    ids=["absent", "v1", "v2", "stripped", "v3", "upper-case", "empty", "true", "other-key"],
)
def test_proxy_protocol_annotation(annotations: dict[str, str], expected: str | None) -> None:
    obj = minimal_service()
    meta = obj["metadata"]
    assert isinstance(meta, dict)
    meta["annotations"] = annotations
    assert decode_service(obj).proxy_protocol == expected


def test_proxy_protocol_annotation_must_be_a_string() -> None:
    obj = minimal_service()
    obj["metadata"] = {"name": "api", "annotations": {"userproxy.io/proxy-protocol": 2}}
    with pytest.raises(DecodeError) as caught:
        decode_service(obj)
    assert "userproxy.io/proxy-protocol" in str(caught.value)


SERVICE_ERRORS: list[tuple[str, tuple[Segment, ...], object, str, str]] = [
    ("missing-name", ("metadata", "name"), DELETE, "metadata.name", "is required"),
    ("empty-name", ("metadata", "name"), "", "metadata.name", "is required"),
    ("bad-name", ("metadata", "name"), "Web_1", "metadata.name", "'Web_1' is not a valid name"),
    (
        "name-not-string",
        ("metadata", "name"),
        7,
        "metadata.name",
        "expected a string, got integer 7",
    ),
    ("bad-namespace", ("metadata", "namespace"), "a.b", "metadata.namespace", "'a.b'"),
    ("metadata-list", ("metadata",), [], "metadata", "expected a mapping, got a list"),
    ("spec-list", ("spec",), ["x"], "spec", "expected a mapping, got a list"),
    (
        "label-not-string",
        ("metadata", "labels", "app"),
        True,
        "metadata.labels['app']",
        "expected a string, got boolean true",
    ),
    (
        "annotation-not-string",
        ("metadata", "annotations", "userproxy.io/balancer"),
        3,
        "metadata.annotations['userproxy.io/balancer']",
        "expected a string, got integer 3",
    ),
    (
        "empty-balancer",
        ("metadata", "annotations", "userproxy.io/balancer"),
        " ",
        "metadata.annotations['userproxy.io/balancer']",
        "must not be empty",
    ),
    ("unknown-type", ("spec", "type"), "Foo", "spec.type", "unknown value 'Foo'"),
    (
        "port-out-of-range",
        ("spec", "ports", 0, "port"),
        70000,
        "spec.ports[0].port",
        "70000 is out of range 1..65535",
    ),
    ("port-zero", ("spec", "ports", 0, "port"), 0, "spec.ports[0].port", "0 is out of range"),
    (
        "port-as-string",
        ("spec", "ports", 0, "port"),
        "80",
        "spec.ports[0].port",
        "expected an integer, got string '80'",
    ),
    (
        "port-as-bool",
        ("spec", "ports", 0, "port"),
        True,
        "spec.ports[0].port",
        "expected an integer, got boolean true",
    ),
    (
        "port-as-float",
        ("spec", "ports", 0, "port"),
        80.0,
        "spec.ports[0].port",
        "expected an integer, got number 80.0",
    ),
    ("port-missing", ("spec", "ports", 0, "port"), DELETE, "spec.ports[0].port", "is required"),
    (
        "unknown-protocol",
        ("spec", "ports", 1, "protocol"),
        "HTTP",
        "spec.ports[1].protocol",
        "unknown protocol 'HTTP' (expected TCP, UDP or SCTP)",
    ),
    (
        "lowercase-protocol",
        ("spec", "ports", 1, "protocol"),
        "udp",
        "spec.ports[1].protocol",
        "unknown protocol 'udp'",
    ),
    (
        "node-port-out-of-range",
        ("spec", "ports", 0, "nodePort"),
        65536,
        "spec.ports[0].nodePort",
        "65536 is out of range 1..65535",
    ),
    (
        "target-port-bool",
        ("spec", "ports", 0, "targetPort"),
        False,
        "spec.ports[0].targetPort",
        "expected an integer or a port name, got boolean false",
    ),
    (
        "target-port-out-of-range",
        ("spec", "ports", 0, "targetPort"),
        0,
        "spec.ports[0].targetPort",
        "0 is out of range",
    ),
    (
        "duplicate-port-name",
        ("spec", "ports", 1, "name"),
        "http",
        "spec.ports[1].name",
        "'http' is already used by spec.ports[0]",
    ),
    (
        "unnamed-port-among-many",
        ("spec", "ports", 0, "name"),
        DELETE,
        "spec.ports[0].name",
        "is required when a Service has more than one port",
    ),
    ("ports-not-list", ("spec", "ports"), {"port": 80}, "spec.ports", "expected a list"),
    ("port-entry-not-map", ("spec", "ports", 2), 80, "spec.ports[2]", "expected a mapping"),
    (
        "bad-cluster-ip",
        ("spec", "clusterIPs", 0),
        "10.96.0.300",
        "spec.clusterIPs[0]",
        "'10.96.0.300' is not a valid IP address",
    ),
    (
        "cluster-ip-mismatch",
        ("spec", "clusterIP"),
        "10.96.0.11",
        "spec.clusterIPs[0]",
        "differs from spec.clusterIP",
    ),
    (
        "cluster-ips-same-family",
        ("spec", "clusterIPs", 1),
        "10.96.0.11",
        "spec.clusterIPs[1]",
        "has the same family",
    ),
    (
        "bad-external-ip",
        ("spec", "externalIPs", 0),
        "example.com",
        "spec.externalIPs[0]",
        "'example.com' is not a valid IP address",
    ),
    (
        "external-ip-with-zone",
        ("spec", "externalIPs", 0),
        "fe80::1%eth0",
        "spec.externalIPs[0]",
        "not a valid IP address",
    ),
    (
        "bad-source-range",
        ("spec", "loadBalancerSourceRanges", 0),
        "300.0.0.0/8",
        "spec.loadBalancerSourceRanges[0]",
        "'300.0.0.0/8' is not a valid CIDR",
    ),
    (
        "bad-ingress-ip",
        ("status", "loadBalancer", "ingress", 0, "ip"),
        "1.2.3",
        "status.loadBalancer.ingress[0].ip",
        "not a valid IP address",
    ),
    (
        "bad-ip-mode",
        ("status", "loadBalancer", "ingress", 1, "ipMode"),
        "Direct",
        "status.loadBalancer.ingress[1].ipMode",
        "unknown value 'Direct' (expected VIP or Proxy)",
    ),
    (
        "bad-external-policy",
        ("spec", "externalTrafficPolicy"),
        "Global",
        "spec.externalTrafficPolicy",
        "unknown value 'Global' (expected one of Cluster, Local)",
    ),
    (
        "bad-internal-policy",
        ("spec", "internalTrafficPolicy"),
        "local",
        "spec.internalTrafficPolicy",
        "unknown value 'local'",
    ),
    (
        "health-check-port-range",
        ("spec", "healthCheckNodePort"),
        -1,
        "spec.healthCheckNodePort",
        "-1 is out of range",
    ),
    (
        "health-check-port-without-local",
        ("spec", "externalTrafficPolicy"),
        "Cluster",
        "spec.healthCheckNodePort",
        "may only be set for type LoadBalancer with externalTrafficPolicy Local",
    ),
    (
        "unknown-affinity",
        ("spec", "sessionAffinity"),
        "Cookie",
        "spec.sessionAffinity",
        "unknown value 'Cookie' (expected None or ClientIP)",
    ),
    (
        "affinity-timeout-too-large",
        ("spec", "sessionAffinityConfig", "clientIP", "timeoutSeconds"),
        86401,
        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
        "86401 is out of range 1..86400",
    ),
    (
        "affinity-timeout-zero",
        ("spec", "sessionAffinityConfig", "clientIP", "timeoutSeconds"),
        0,
        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
        "0 is out of range 1..86400",
    ),
    (
        "affinity-timeout-string",
        ("spec", "sessionAffinityConfig", "clientIP", "timeoutSeconds"),
        "600",
        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
        "expected an integer, got string '600'",
    ),
]


@pytest.mark.parametrize(
    ("path", "value", "field", "message"),
    [case[1:] for case in SERVICE_ERRORS],
    ids=[case[0] for case in SERVICE_ERRORS],
)
def test_service_errors(path: tuple[Segment, ...], value: object, field: str, message: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_service(with_value(full_service(), path, value))
    assert info.value.field == field
    assert message in info.value.message
    assert str(info.value) == f"{field}: {info.value.message}"


@pytest.mark.parametrize(
    ("service_type", "allowed"),
    [("ClusterIP", False), ("NodePort", True), ("LoadBalancer", True), ("ExternalName", False)],
)
def test_node_port_only_for_node_port_types(service_type: str, allowed: bool) -> None:
    obj = {
        "metadata": {"name": "np"},
        "spec": {
            "type": service_type,
            "clusterIP": "10.0.0.2",
            "ports": [{"port": 80, "nodePort": 30001}],
        },
    }
    if allowed:
        assert decode_service(obj).ports[0].node_port == 30001
    else:
        with pytest.raises(DecodeError, match=r"spec\.ports\[0\]\.nodePort: may not be set"):
            decode_service(obj)


# --------------------------------------------------------------------------- EndpointSlice

TRIGGER = "endpoints.kubernetes.io/last-change-trigger-time"


def full_slice() -> dict[str, object]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "web-abc12",
            "namespace": "shop",
            "labels": {"kubernetes.io/service-name": "web"},
            "annotations": {TRIGGER: "2024-05-01T12:00:00Z"},
        },
        "addressType": "IPv4",
        "ports": [
            {"name": "http", "port": 8080, "protocol": "TCP"},
            {"name": "dns", "port": 5353, "protocol": "UDP"},
            {"name": "noport"},
            {"port": 9000, "protocol": "SCTP", "name": None},
        ],
        "endpoints": [
            {
                "addresses": ["10.1.0.5", "10.1.0.6"],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "nodeName": "node-a",
                "zone": "zone-1",
                "hints": {"forZones": [{"name": "zone-1"}], "forNodes": [{"name": "node-a"}]},
            },
            {
                "addresses": ["10.1.0.7"],
                "conditions": {"ready": False, "serving": True, "terminating": True},
                "nodeName": "node-b",
            },
            {"addresses": [], "conditions": {"ready": True}},
            {"addresses": ["10.1.0.8"]},
        ],
    }


def test_full_slice() -> None:
    assert decode_endpoint_slice(full_slice()) == EndpointSlice(
        namespace="shop",
        name="web-abc12",
        service_name="web",
        address_type=IPFamily.IPv4,
        ports=(
            EndpointPort("http", Protocol.TCP, 8080),
            EndpointPort("dns", Protocol.UDP, 5353),
            EndpointPort("noport", Protocol.TCP, None),
            EndpointPort("", Protocol.SCTP, 9000),
        ),
        endpoints=(
            SliceEndpoint(
                "10.1.0.5",
                ready=True,
                serving=True,
                terminating=False,
                node_name="node-a",
                zone="zone-1",
                zone_hints=frozenset({"zone-1"}),
                node_hints=frozenset({"node-a"}),
            ),
            SliceEndpoint(
                "10.1.0.7", ready=False, serving=True, terminating=True, node_name="node-b"
            ),
            SliceEndpoint("10.1.0.8"),
        ),
        trigger_time=datetime(2024, 5, 1, 12, tzinfo=UTC).timestamp(),
    )


def test_minimal_slice() -> None:
    obj = {
        "metadata": {"name": "s", "labels": {"kubernetes.io/service-name": "svc"}},
        "addressType": "IPv6",
        "endpoints": None,
        "ports": None,
    }
    assert decode_endpoint_slice(obj) == EndpointSlice("default", "s", "svc", IPFamily.IPv6)


def test_fqdn_slice_is_none() -> None:
    obj = with_value(full_slice(), ("addressType",), "FQDN")
    obj = with_value(obj, ("endpoints", 0, "addresses"), ["web.example.com"])
    assert decode_endpoint_slice(obj) is None


def test_ipv6_slice_addresses_are_canonical() -> None:
    obj = with_value(full_slice(), ("addressType",), "IPv6")
    obj = with_value(obj, ("endpoints",), [{"addresses": ["FD00:0::0005"]}])
    decoded = decode_endpoint_slice(obj)
    assert decoded is not None
    assert decoded.endpoints == (SliceEndpoint("fd00::5"),)


@pytest.mark.parametrize(
    ("conditions", "ready", "serving", "terminating"),
    [
        (None, True, True, False),
        ({}, True, True, False),
        ({"ready": None, "serving": None, "terminating": None}, True, True, False),
        # Upstream resolves serving on its own: unset is true even when ready is false.
        ({"ready": False}, False, True, False),
        ({"serving": False}, True, False, False),
        ({"terminating": True}, True, True, True),
        ({"ready": False, "serving": True, "terminating": True}, False, True, True),
        ({"ready": False, "serving": False, "terminating": True}, False, False, True),
    ],
    ids=[
        "null",
        "empty",
        "all-null",
        "not-ready",
        "not-serving",
        "terminating",
        "terminating-serving",
        "terminating-not-serving",
    ],
)
def test_endpoint_conditions(
    conditions: dict[str, object] | None, ready: bool, serving: bool, terminating: bool
) -> None:
    obj = with_value(full_slice(), ("endpoints",), [{"addresses": ["10.0.0.9"]}])
    obj = with_value(obj, ("endpoints", 0, "conditions"), conditions)
    decoded = decode_endpoint_slice(obj)
    assert decoded is not None
    (endpoint,) = decoded.endpoints
    assert (endpoint.ready, endpoint.serving, endpoint.terminating) == (ready, serving, terminating)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-05-01T12:00:00Z", 1714564800.0),
        ("2024-05-01T14:00:00+02:00", 1714564800.0),
        ("2024-05-01T12:00:00.5Z", 1714564800.5),
        ("2024-05-01T12:00:00.123456789Z", 1714564800.123456),
        ("2024-05-01T12:00:00", None),
        ("yesterday", None),
        ("", None),
        (DELETE, None),
    ],
    ids=["utc", "offset", "fraction", "nanoseconds", "no-offset", "garbage", "empty", "absent"],
)
def test_trigger_time(value: object, expected: float | None) -> None:
    decoded = decode_endpoint_slice(
        with_value(full_slice(), ("metadata", "annotations", TRIGGER), value)
    )
    assert decoded is not None
    if expected is None:
        assert decoded.trigger_time is None
    else:
        assert decoded.trigger_time == pytest.approx(expected)


SLICE_ERRORS: list[tuple[str, tuple[Segment, ...], object, str, str]] = [
    ("missing-name", ("metadata", "name"), DELETE, "metadata.name", "is required"),
    (
        "missing-service-label",
        ("metadata", "labels", "kubernetes.io/service-name"),
        DELETE,
        "metadata.labels['kubernetes.io/service-name']",
        "is required",
    ),
    (
        "empty-service-label",
        ("metadata", "labels", "kubernetes.io/service-name"),
        "",
        "metadata.labels['kubernetes.io/service-name']",
        "is required",
    ),
    ("missing-address-type", ("addressType",), DELETE, "addressType", "is required"),
    (
        "unknown-address-type",
        ("addressType",),
        "IPv5",
        "addressType",
        "unknown value 'IPv5' (expected IPv4, IPv6 or FQDN)",
    ),
    (
        "port-as-string",
        ("ports", 0, "port"),
        "8080",
        "ports[0].port",
        "expected an integer, got string '8080'",
    ),
    (
        "port-out-of-range",
        ("ports", 1, "port"),
        70000,
        "ports[1].port",
        "70000 is out of range 1..65535",
    ),
    ("port-zero", ("ports", 1, "port"), 0, "ports[1].port", "0 is out of range 1..65535"),
    (
        "unknown-protocol",
        ("ports", 0, "protocol"),
        "ICMP",
        "ports[0].protocol",
        "unknown protocol 'ICMP' (expected TCP, UDP or SCTP)",
    ),
    ("port-name-not-string", ("ports", 0, "name"), 1, "ports[0].name", "expected a string"),
    (
        "ready-as-string",
        ("endpoints", 0, "conditions", "ready"),
        "true",
        "endpoints[0].conditions.ready",
        "expected a boolean, got string 'true'",
    ),
    (
        "serving-as-int",
        ("endpoints", 1, "conditions", "serving"),
        1,
        "endpoints[1].conditions.serving",
        "expected a boolean, got integer 1",
    ),
    (
        "terminating-as-string",
        ("endpoints", 1, "conditions", "terminating"),
        "no",
        "endpoints[1].conditions.terminating",
        "expected a boolean, got string 'no'",
    ),
    (
        "bad-address",
        ("endpoints", 0, "addresses", 1),
        "10.1.0.999",
        "endpoints[0].addresses[1]",
        "'10.1.0.999' is not a valid IP address",
    ),
    (
        "wrong-family",
        ("endpoints", 3, "addresses", 0),
        "fd00::8",
        "endpoints[3].addresses[0]",
        "'fd00::8' is not an IPv4 address",
    ),
    (
        "addresses-not-list",
        ("endpoints", 3, "addresses"),
        "10.1.0.8",
        "endpoints[3].addresses",
        "expected a list, got string '10.1.0.8'",
    ),
    ("endpoints-not-list", ("endpoints",), {}, "endpoints", "expected a list, got a mapping"),
    (
        "node-name-int",
        ("endpoints", 0, "nodeName"),
        5,
        "endpoints[0].nodeName",
        "expected a string",
    ),
    (
        "zone-hint-without-name",
        ("endpoints", 0, "hints", "forZones", 0),
        {},
        "endpoints[0].hints.forZones[0].name",
        "is required",
    ),
    (
        "node-hints-not-list",
        ("endpoints", 0, "hints", "forNodes"),
        "node-a",
        "endpoints[0].hints.forNodes",
        "expected a list",
    ),
    (
        "trigger-time-not-string",
        ("metadata", "annotations", TRIGGER),
        12,
        f"metadata.annotations[{TRIGGER!r}]",
        "expected a string, got integer 12",
    ),
]


@pytest.mark.parametrize(
    ("path", "value", "field", "message"),
    [case[1:] for case in SLICE_ERRORS],
    ids=[case[0] for case in SLICE_ERRORS],
)
def test_slice_errors(path: tuple[Segment, ...], value: object, field: str, message: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_endpoint_slice(with_value(full_slice(), path, value))
    assert info.value.field == field
    assert message in info.value.message


# --------------------------------------------------------------------------- Node


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"metadata": {"name": "node-a"}}, Node("node-a")),
        (
            {
                "metadata": {
                    "name": "node-a.example",
                    "labels": {"topology.kubernetes.io/zone": "zone-1"},
                    "deletionTimestamp": "2024-05-01T12:00:00Z",
                },
                "spec": {
                    "taints": [
                        {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"},
                        {"key": "ToBeDeletedByClusterAutoscaler", "value": "1714564800"},
                    ]
                },
            },
            Node("node-a.example", zone="zone-1", deleting=True, to_be_deleted_taint=True),
        ),
        (
            {
                "metadata": {"name": "n", "deletionTimestamp": None},
                "spec": {"taints": [{"key": "other", "effect": "NoExecute"}]},
            },
            Node("n"),
        ),
    ],
    ids=["minimal", "full", "not-deleting"],
)
def test_node(obj: dict[str, object], expected: Node) -> None:
    assert decode_node(obj) == expected


@pytest.mark.parametrize(
    ("obj", "field", "message"),
    [
        ({"metadata": {}}, "metadata.name", "is required"),
        ({"metadata": {"name": "Node_A"}}, "metadata.name", "not a valid name"),
        (
            {"metadata": {"name": "n", "labels": {"topology.kubernetes.io/zone": 1}}},
            "metadata.labels['topology.kubernetes.io/zone']",
            "expected a string",
        ),
        ({"metadata": {"name": "n"}, "spec": {"taints": {}}}, "spec.taints", "expected a list"),
        (
            {"metadata": {"name": "n"}, "spec": {"taints": [{"effect": "NoSchedule"}]}},
            "spec.taints[0].key",
            "is required",
        ),
    ],
    ids=["missing-name", "bad-name", "zone-not-string", "taints-not-list", "taint-without-key"],
)
def test_node_errors(obj: dict[str, object], field: str, message: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_node(obj)
    assert info.value.field == field
    assert message in info.value.message


# --------------------------------------------------------------------------- selection

HEADLESS = "service.kubernetes.io/headless"
PROXY_NAME = "service.kubernetes.io/service-proxy-name"


@pytest.mark.parametrize(
    ("labels", "proxy_name", "selected"),
    [
        ({}, None, True),
        ({"app": "web"}, None, True),
        ({HEADLESS: ""}, None, False),
        ({PROXY_NAME: "other"}, None, False),
        ({PROXY_NAME: ""}, None, False),
        ({}, "mine", False),
        ({PROXY_NAME: "mine"}, "mine", True),
        ({PROXY_NAME: "other"}, "mine", False),
        ({PROXY_NAME: "mine", HEADLESS: ""}, "mine", False),
    ],
    ids=[
        "no-labels",
        "unrelated-label",
        "headless",
        "other-proxy",
        "empty-proxy-name",
        "named-proxy-unlabelled",
        "named-proxy-match",
        "named-proxy-other",
        "named-proxy-headless",
    ],
)
def test_is_selected(labels: dict[str, str], proxy_name: str | None, selected: bool) -> None:
    assert is_selected(labels, proxy_name) is selected


def test_decode_labels() -> None:
    assert decode_labels({"metadata": {"labels": {"a": "b"}}}) == {"a": "b"}
    assert decode_labels({}) == {}
    with pytest.raises(DecodeError, match=r"metadata\.labels: key 1 is not a string"):
        decode_labels({"metadata": {"labels": {1: "b"}}})


def test_decode_error_attributes() -> None:
    error = DecodeError("spec.ports[1].port", "70000 is out of range 1..65535")
    assert isinstance(error, ValueError)
    assert error.field == "spec.ports[1].port"
    assert error.message == "70000 is out of range 1..65535"
    assert str(error) == "spec.ports[1].port: 70000 is out of range 1..65535"
    assert str(DecodeError("", "bad object")) == "bad object"
