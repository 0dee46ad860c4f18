"""Table-driven tests for ``build_endpoints`` (kube-proxy rules: "Keys and ports", locality)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from userproxy.control.endpoints import EndpointsKey, build_endpoints, service_families
from userproxy.model import (
    Endpoint,
    EndpointPort,
    EndpointSlice,
    IPFamily,
    Protocol,
    Service,
    ServicePort,
    ServicePortName,
    SliceEndpoint,
)

TCP, UDP = Protocol.TCP, Protocol.UDP
V4, V6 = IPFamily.IPv4, IPFamily.IPv6
NODE = "node-1"

HTTP = ServicePort("http", TCP, 80)
DNS = ServicePort("dns", UDP, 53)
SVC = Service("ns", "web", cluster_ips=("10.96.0.10",), ports=(HTTP, DNS))
DUAL = Service("ns", "web", cluster_ips=("10.96.0.10", "fd00::10"), ports=(HTTP,))


def sl(
    name: str,
    ports: Sequence[EndpointPort],
    endpoints: Sequence[SliceEndpoint],
    family: IPFamily = V4,
    service: str = "web",
) -> EndpointSlice:
    return EndpointSlice("ns", name, service, family, tuple(ports), tuple(endpoints))


def http(port: int | None = 8080) -> EndpointPort:
    return EndpointPort("http", TCP, port)


def expected(
    service: Service, entries: Mapping[tuple[str, Protocol, IPFamily], Sequence[Endpoint]]
) -> dict[EndpointsKey, tuple[Endpoint, ...]]:
    """Every (port, family) of ``service`` mapped to () except the given entries."""
    result: dict[EndpointsKey, tuple[Endpoint, ...]] = {
        (service.port_name(p), fam): () for p in service.ports for fam in service_families(service)
    }
    for (port, proto, fam), eps in entries.items():
        key = (ServicePortName(service.namespace, service.name, port, proto), fam)
        assert key in result, key
        result[key] = tuple(eps)
    return result


CASES = [
    # -- Keys and ports -------------------------------------------------------------------
    pytest.param(
        SVC,
        [sl("a", [http()], [SliceEndpoint("10.0.0.1")])],
        {("http", TCP, V4): [Endpoint("10.0.0.1", 8080)]},
        id="port-number-from-slice-not-service",
    ),
    pytest.param(
        SVC,
        [
            sl("a", [http(8080)], [SliceEndpoint("10.0.0.1")]),
            sl("b", [http(9090)], [SliceEndpoint("10.0.0.2")]),
        ],
        {("http", TCP, V4): [Endpoint("10.0.0.1", 8080), Endpoint("10.0.0.2", 9090)]},
        id="per-slice-port-numbers-for-same-port-name",
    ),
    pytest.param(
        SVC,
        [
            sl("a", [http(8080)], [SliceEndpoint("10.0.0.1")]),
            sl("b", [http(9090)], [SliceEndpoint("10.0.0.1")]),
        ],
        {("http", TCP, V4): [Endpoint("10.0.0.1", 8080), Endpoint("10.0.0.1", 9090)]},
        id="same-ip-different-port-numbers-both-kept",
    ),
    pytest.param(
        SVC,
        [sl("a", [http(None)], [SliceEndpoint("10.0.0.1")])],
        {},
        id="port-with-no-number-skipped",
    ),
    pytest.param(
        SVC,
        [sl("a", [http(0)], [SliceEndpoint("10.0.0.1")])],
        {},
        id="port-number-zero-skipped",
    ),
    pytest.param(
        SVC,
        [sl("a", [EndpointPort("metrics", TCP, 9100)], [SliceEndpoint("10.0.0.1")])],
        {},
        id="port-name-mismatch-skipped",
    ),
    pytest.param(
        SVC,
        [sl("a", [EndpointPort("http", UDP, 8080)], [SliceEndpoint("10.0.0.1")])],
        {},
        id="port-protocol-mismatch-skipped",
    ),
    pytest.param(
        SVC,
        [
            sl(
                "a",
                [http(8080), EndpointPort("dns", UDP, 5353)],
                [SliceEndpoint("10.0.0.1")],
            )
        ],
        {
            ("http", TCP, V4): [Endpoint("10.0.0.1", 8080)],
            ("dns", UDP, V4): [Endpoint("10.0.0.1", 5353)],
        },
        id="each-service-port-keyed-separately",
    ),
    pytest.param(
        Service("ns", "web", cluster_ips=("10.96.0.10",), ports=(ServicePort("", TCP, 80),)),
        [sl("a", [EndpointPort("", TCP, 8080)], [SliceEndpoint("10.0.0.1")])],
        {("", TCP, V4): [Endpoint("10.0.0.1", 8080)]},
        id="unnamed-port",
    ),
    pytest.param(
        SVC,
        [sl("a", [http()], [])],
        {},
        id="service-port-without-endpoints-maps-to-empty-tuple",
    ),
    pytest.param(
        SVC,
        [sl("a", [http()], [SliceEndpoint("10.0.0.1")], service="other")],
        {},
        id="slice-of-other-service-ignored",
    ),
    pytest.param(
        SVC,
        [sl("a", [http()], [SliceEndpoint("10.0.0.1"), SliceEndpoint("")])],
        {("http", TCP, V4): [Endpoint("10.0.0.1", 8080)]},
        id="endpoint-without-address-skipped",
    ),
    # -- Duplicates -----------------------------------------------------------------------
    pytest.param(
        SVC,
        [
            sl("b", [http()], [SliceEndpoint("10.0.0.1", node_name="node-2")]),
            sl("a", [http()], [SliceEndpoint("10.0.0.1", ready=False)]),
        ],
        {("http", TCP, V4): [Endpoint("10.0.0.1", 8080, ready=False)]},
        id="dedupe-first-slice-by-name-wins",
    ),
    pytest.param(
        SVC,
        [
            sl("a", [http()], [SliceEndpoint("10.0.0.1", ready=False, terminating=True)]),
            sl("b", [http()], [SliceEndpoint("10.0.0.1")]),
        ],
        {("http", TCP, V4): [Endpoint("10.0.0.1", 8080)]},
        id="dedupe-prefers-later-non-terminating",
    ),
    pytest.param(
        SVC,
        [
            sl("a", [http()], [SliceEndpoint("10.0.0.1")]),
            sl("b", [http()], [SliceEndpoint("10.0.0.1", ready=False, terminating=True)]),
        ],
        {("http", TCP, V4): [Endpoint("10.0.0.1", 8080)]},
        id="dedupe-keeps-non-terminating-over-later-terminating",
    ),
    pytest.param(
        SVC,
        [
            sl(
                "a",
                [http()],
                [
                    SliceEndpoint("10.0.0.1", serving=False, terminating=True),
                    SliceEndpoint("10.0.0.1", ready=False, terminating=True),
                ],
            )
        ],
        {("http", TCP, V4): [Endpoint("10.0.0.1", 8080, serving=False, terminating=True)]},
        id="dedupe-both-terminating-first-wins",
    ),
    # -- Families -------------------------------------------------------------------------
    pytest.param(
        DUAL,
        [
            sl("v4", [http()], [SliceEndpoint("10.0.0.1")]),
            sl("v6", [http(8443)], [SliceEndpoint("fd00::1")], family=V6),
        ],
        {
            ("http", TCP, V4): [Endpoint("10.0.0.1", 8080)],
            ("http", TCP, V6): [Endpoint("fd00::1", 8443)],
        },
        id="ipv4-and-ipv6-slices-keyed-separately",
    ),
    pytest.param(
        SVC,
        [sl("v6", [http()], [SliceEndpoint("fd00::1")], family=V6)],
        {},
        id="slice-of-family-service-lacks-ignored",
    ),
    pytest.param(
        Service("ns", "web", cluster_ips=("fd00::10",), ports=(HTTP,)),
        [
            sl("v4", [http()], [SliceEndpoint("10.0.0.1")]),
            sl("v6", [http()], [SliceEndpoint("fd00::1")], family=V6),
        ],
        {("http", TCP, V6): [Endpoint("fd00::1", 8080)]},
        id="ipv6-only-service-ignores-ipv4-slice",
    ),
    pytest.param(
        DUAL,
        [sl("v4", [http()], [SliceEndpoint("10.0.0.1"), SliceEndpoint("fd00::1")])],
        {("http", TCP, V4): [Endpoint("10.0.0.1", 8080)]},
        id="address-of-wrong-family-for-slice-skipped",
    ),
    # -- Locality, conditions and hints are carried over ------------------------------------
    pytest.param(
        SVC,
        [
            sl(
                "a",
                [http()],
                [
                    SliceEndpoint("10.0.0.1", node_name=NODE),
                    SliceEndpoint("10.0.0.2", node_name="node-2"),
                    SliceEndpoint("10.0.0.3"),
                ],
            )
        ],
        {
            ("http", TCP, V4): [
                Endpoint("10.0.0.1", 8080, is_local=True),
                Endpoint("10.0.0.2", 8080),
                Endpoint("10.0.0.3", 8080),
            ]
        },
        id="is-local-from-node-name",
    ),
    pytest.param(
        SVC,
        [sl("a", [http()], [SliceEndpoint("10.0.0.1")])],
        {("http", TCP, V4): [Endpoint("10.0.0.1", 8080, True, True, False)]},
        id="unset-conditions-default-ready-serving-not-terminating",
    ),
    pytest.param(
        SVC,
        [
            sl(
                "a",
                [http()],
                [
                    SliceEndpoint(
                        "10.0.0.1",
                        ready=False,
                        serving=True,
                        terminating=True,
                        zone="z1",
                        zone_hints=frozenset({"z1"}),
                        node_hints=frozenset({NODE}),
                    )
                ],
            )
        ],
        {
            ("http", TCP, V4): [
                Endpoint(
                    "10.0.0.1",
                    8080,
                    ready=False,
                    serving=True,
                    terminating=True,
                    zone_hints=frozenset({"z1"}),
                    node_hints=frozenset({NODE}),
                )
            ]
        },
        id="conditions-and-hints-copied",
    ),
    # -- Order ----------------------------------------------------------------------------
    pytest.param(
        SVC,
        [
            sl("b", [http()], [SliceEndpoint("10.0.0.10"), SliceEndpoint("10.0.0.9")]),
            sl("a", [http()], [SliceEndpoint("10.0.0.2")]),
        ],
        {
            ("http", TCP, V4): [
                Endpoint("10.0.0.2", 8080),
                Endpoint("10.0.0.9", 8080),
                Endpoint("10.0.0.10", 8080),
            ]
        },
        id="output-sorted-by-ip-then-port",
    ),
]


@pytest.mark.parametrize(("service", "slices", "entries"), CASES)
def test_build_endpoints(
    service: Service,
    slices: list[EndpointSlice],
    entries: dict[tuple[str, Protocol, IPFamily], list[Endpoint]],
) -> None:
    assert build_endpoints(service, slices, NODE) == expected(service, entries)


def test_headless_service_has_no_keys() -> None:
    headless = Service("ns", "web", ports=(HTTP,))
    assert build_endpoints(headless, [sl("a", [http()], [SliceEndpoint("10.0.0.1")])], NODE) == {}


def test_empty_node_name_is_never_local() -> None:
    result = build_endpoints(
        SVC, [sl("a", [http()], [SliceEndpoint("10.0.0.1", node_name="")])], ""
    )
    assert not result[(SVC.port_name(HTTP), V4)][0].is_local


# -- Properties ---------------------------------------------------------------------------

slice_endpoints = st.builds(
    SliceEndpoint,
    address=st.integers(1, 6).map(lambda n: f"10.0.0.{n}"),
    ready=st.booleans(),
    serving=st.booleans(),
    terminating=st.booleans(),
    node_name=st.sampled_from([None, NODE, "node-2"]),
)
slices_st = st.lists(
    st.builds(
        sl,
        name=st.sampled_from("abcdef"),
        ports=st.lists(
            st.builds(
                EndpointPort,
                name=st.sampled_from(["http", "dns", "x"]),
                protocol=st.sampled_from([TCP, UDP]),
                port=st.none() | st.integers(8080, 8082),
            ),
            max_size=3,
        ),
        endpoints=st.lists(slice_endpoints, max_size=5),
    ),
    max_size=4,
    unique_by=lambda s: s.name,
)


@given(slices=slices_st, data=st.data())
def test_result_independent_of_slice_order(
    slices: list[EndpointSlice], data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(slices))
    assert build_endpoints(SVC, shuffled, NODE) == build_endpoints(SVC, slices, NODE)


@given(slices=slices_st)
def test_endpoints_unique_sorted_and_non_terminating_preferred(
    slices: list[EndpointSlice],
) -> None:
    result = build_endpoints(SVC, slices, NODE)
    assert set(result) == {(SVC.port_name(p), V4) for p in SVC.ports}
    for (spn, _), endpoints in result.items():
        addresses = [ep.address for ep in endpoints]
        assert len(set(addresses)) == len(addresses)
        for ep in endpoints:
            # a terminating endpoint is kept only if no slice offered a non-terminating twin
            if ep.terminating:
                assert not any(
                    se.address == ep.ip and not se.terminating
                    for s in slices
                    for p in s.ports
                    if (p.name, p.protocol, p.port) == (spn.port, spn.protocol, ep.port)
                    for se in s.endpoints
                )
