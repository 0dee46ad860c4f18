"""Table-driven tests for ``categorize`` (kube-proxy rules: "Endpoint conditions", "Traffic policies
and topology"; upstream ``pkg/proxy/topology_test.go`` covers the same ground)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

import pytest
from hypothesis import given
from hypothesis import strategies as st

from userproxy.control.selection import (
    EndpointSets,
    TopologyMode,
    categorize,
    is_ready,
    topology_mode,
)
from userproxy.model import Endpoint, Service, ServiceType, TrafficPolicy

NODE = "node-1"
CLUSTER, LOCAL = TrafficPolicy.CLUSTER, TrafficPolicy.LOCAL


class Conditions(TypedDict, total=False):
    ready: bool
    serving: bool
    terminating: bool


NOT_READY: Conditions = {"ready": False}
SERVING_TERMINATING: Conditions = {"ready": False, "serving": True, "terminating": True}
NOT_SERVING_TERMINATING: Conditions = {"ready": False, "serving": False, "terminating": True}


def ep(
    n: int,
    *,
    local: bool = False,
    ready: bool = True,
    serving: bool = True,
    terminating: bool = False,
    zones: Sequence[str] = (),
    nodes: Sequence[str] = (),
) -> Endpoint:
    """Endpoint number ``n`` (10.1.0.n:80); expectations below name endpoints by ``n``."""
    return Endpoint(
        f"10.1.0.{n}",
        80,
        ready=ready,
        serving=serving,
        terminating=terminating,
        is_local=local,
        zone_hints=frozenset(zones),
        node_hints=frozenset(nodes),
    )


def svc(
    itp: TrafficPolicy = CLUSTER,
    etp: TrafficPolicy = CLUSTER,
    type_: ServiceType = ServiceType.NODE_PORT,
) -> Service:
    return Service(
        "ns",
        "web",
        type=type_,
        cluster_ips=("10.96.0.10",),
        internal_traffic_policy=itp,
        external_traffic_policy=etp,
    )


@dataclass(frozen=True)
class Want:
    """Expected sets as endpoint numbers; internal/external default to cluster."""

    cluster: tuple[int, ...]
    local: tuple[int, ...] = ()
    internal: tuple[int, ...] | None = None
    external: tuple[int, ...] | None = None
    has_any: bool = True


def numbers(endpoints: Sequence[Endpoint]) -> tuple[int, ...]:
    return tuple(int(e.ip.rsplit(".", 1)[1]) for e in endpoints)


CASES = [
    # -- Endpoint conditions --------------------------------------------------------------
    pytest.param(
        [Endpoint("10.1.0.1", 80), Endpoint("10.1.0.2", 80, is_local=True)],
        svc(),
        None,
        Want(cluster=(1, 2), local=(2,)),
        id="unset-conditions-defaults-are-ready",
    ),
    pytest.param(
        [ep(1), ep(2, **SERVING_TERMINATING)],
        svc(),
        None,
        Want(cluster=(1,)),
        id="ready-preferred-over-serving-terminating",
    ),
    pytest.param(
        [ep(1, **SERVING_TERMINATING), ep(2, **NOT_READY), ep(3, **SERVING_TERMINATING)],
        svc(),
        None,
        Want(cluster=(1, 3)),
        id="fallback-to-serving-terminating-when-none-ready",
    ),
    pytest.param(
        [ep(1, **NOT_SERVING_TERMINATING, local=True)],
        svc(),
        None,
        Want(cluster=(), has_any=False),
        id="not-serving-terminating-excluded",
    ),
    pytest.param(
        [ep(1, **NOT_READY, local=True), ep(2, ready=False, serving=False)],
        svc(),
        None,
        Want(cluster=(), has_any=False),
        id="not-ready-not-terminating-excluded",
    ),
    pytest.param(
        [ep(1, ready=True, terminating=True), ep(2, **SERVING_TERMINATING)],
        svc(),
        None,
        Want(cluster=(1,)),
        id="ready-and-terminating-counts-as-ready",
    ),
    pytest.param(
        [ep(1), ep(2, local=True, **SERVING_TERMINATING)],
        svc(),
        None,
        Want(cluster=(1,), local=(2,)),
        id="fallback-separate-local-falls-back-cluster-does-not",
    ),
    pytest.param(
        [ep(1, **SERVING_TERMINATING), ep(2, local=True)],
        svc(),
        None,
        Want(cluster=(2,), local=(2,)),
        id="fallback-separate-local-ready-cluster-ready",
    ),
    pytest.param(
        [ep(1, local=True), ep(2, local=True, **SERVING_TERMINATING), ep(3)],
        svc(),
        None,
        Want(cluster=(1, 3), local=(1,)),
        id="local-ready-preferred-over-local-serving-terminating",
    ),
    pytest.param(
        [],
        svc(),
        None,
        Want(cluster=(), has_any=False),
        id="no-endpoints",
    ),
    # -- internalTrafficPolicy ------------------------------------------------------------
    pytest.param(
        [ep(1), ep(2)],
        svc(itp=LOCAL),
        None,
        Want(cluster=(1, 2), internal=()),
        id="itp-local-no-local-endpoints-empty-internal-no-fallback",
    ),
    pytest.param(
        [ep(1), ep(2, local=True)],
        svc(itp=LOCAL),
        None,
        Want(cluster=(1, 2), local=(2,), internal=(2,)),
        id="itp-local-uses-local-endpoints-only",
    ),
    pytest.param(
        [ep(1), ep(2, local=True, **SERVING_TERMINATING)],
        svc(itp=LOCAL),
        None,
        Want(cluster=(1,), local=(2,), internal=(2,)),
        id="itp-local-local-terminating-fallback-not-remote-ready",
    ),
    pytest.param(
        [ep(1), ep(2, local=True)],
        svc(itp=CLUSTER),
        None,
        Want(cluster=(1, 2), local=(2,)),
        id="itp-cluster-internal-is-cluster",
    ),
    # -- externalTrafficPolicy ------------------------------------------------------------
    pytest.param(
        [ep(1), ep(2, local=True)],
        svc(etp=LOCAL),
        None,
        Want(cluster=(1, 2), local=(2,), external=(2,)),
        id="etp-local-external-local-only-cluster-still-full",
    ),
    pytest.param(
        [ep(1), ep(2)],
        svc(etp=LOCAL),
        None,
        Want(cluster=(1, 2), external=()),
        id="etp-local-no-local-endpoints-empty-external",
    ),
    pytest.param(
        [ep(1), ep(2, local=True)],
        svc(etp=LOCAL, type_=ServiceType.CLUSTER_IP),
        None,
        Want(cluster=(1, 2), local=(2,)),
        id="etp-local-ignored-when-not-externally-accessible",
    ),
    pytest.param(
        [ep(1), ep(2, local=True)],
        svc(etp=CLUSTER),
        None,
        Want(cluster=(1, 2), local=(2,)),
        id="etp-cluster-external-is-cluster",
    ),
    # -- Topology hints -------------------------------------------------------------------
    pytest.param(
        [ep(1, zones=["a"]), ep(2, zones=["b"], local=True), ep(3, zones=["a", "b"])],
        svc(),
        "a",
        Want(cluster=(1, 3), local=(2,)),
        id="zone-hints-all-ready-hinted-and-match-filtered-local-unfiltered",
    ),
    pytest.param(
        [ep(1, zones=["a"]), ep(2, zones=["b"], local=True)],
        svc(itp=LOCAL, etp=LOCAL),
        "a",
        Want(cluster=(1,), local=(2,), internal=(2,), external=(2,)),
        id="zone-hints-not-applied-to-local-policies",
    ),
    pytest.param(
        [ep(1, zones=["a"]), ep(2, zones=["b"]), ep(3)],
        svc(),
        "a",
        Want(cluster=(1, 2, 3)),
        id="zone-hints-one-ready-lacks-hints-ignored",
    ),
    pytest.param(
        [ep(1, zones=["b"]), ep(2, zones=["c"])],
        svc(),
        "a",
        Want(cluster=(1, 2)),
        id="zone-hints-none-for-our-zone-ignored",
    ),
    pytest.param(
        [ep(1, zones=["a"]), ep(2, zones=["b"])],
        svc(),
        None,
        Want(cluster=(1, 2)),
        id="zone-hints-node-zone-unknown-ignored",
    ),
    pytest.param(
        [ep(1, zones=["a"]), ep(2, zones=["b"]), ep(3, **NOT_READY), ep(4, **SERVING_TERMINATING)],
        svc(),
        "a",
        Want(cluster=(1,)),
        id="zone-hints-non-ready-without-hints-do-not-disable",
    ),
    pytest.param(
        [ep(1, zones=["b"], **SERVING_TERMINATING), ep(2, zones=["b"], **SERVING_TERMINATING)],
        svc(),
        "a",
        Want(cluster=(1, 2)),
        id="zone-hints-ignored-without-ready-endpoints-fallback-unfiltered",
    ),
    pytest.param(
        [
            ep(1, zones=["a"], nodes=["node-2"]),
            ep(2, zones=["b"], nodes=[NODE]),
            ep(3, zones=["a"], nodes=["node-3"]),
        ],
        svc(),
        "a",
        Want(cluster=(2,)),
        id="node-hints-take-precedence-over-zone-hints",
    ),
    pytest.param(
        [ep(1, nodes=[NODE, "node-2"]), ep(2, nodes=["node-2"])],
        svc(),
        None,
        Want(cluster=(1,)),
        id="node-hints-all-ready-hinted-and-match-filtered",
    ),
    pytest.param(
        [
            ep(1, zones=["a"], nodes=["node-2"]),
            ep(2, zones=["b"], nodes=["node-3"]),
        ],
        svc(),
        "a",
        Want(cluster=(1,)),
        id="node-hints-none-for-this-node-fall-to-zone-hints",
    ),
    pytest.param(
        [ep(1, zones=["a"], nodes=[NODE]), ep(2, zones=["a"]), ep(3, zones=["b"], nodes=[NODE])],
        svc(),
        "a",
        Want(cluster=(1, 2)),
        id="node-hints-one-ready-lacks-hints-fall-to-zone-hints",
    ),
    pytest.param(
        [ep(1, nodes=["node-2"]), ep(2, nodes=["node-3"])],
        svc(),
        "a",
        Want(cluster=(1, 2)),
        id="node-hints-none-for-this-node-no-zone-hints-ignored",
    ),
    pytest.param(
        [ep(1, nodes=[NODE]), ep(2, nodes=["node-2"]), ep(3, **NOT_READY)],
        svc(),
        None,
        Want(cluster=(1,)),
        id="node-hints-non-ready-without-hints-do-not-disable",
    ),
]


@pytest.mark.parametrize(("endpoints", "service", "zone", "want"), CASES)
def test_categorize(
    endpoints: list[Endpoint], service: Service, zone: str | None, want: Want
) -> None:
    got = categorize(endpoints, service, NODE, zone)
    assert numbers(got.cluster) == want.cluster
    assert numbers(got.local) == want.local
    assert numbers(got.internal) == (want.cluster if want.internal is None else want.internal)
    assert numbers(got.external) == (want.cluster if want.external is None else want.external)
    assert got.has_any is want.has_any


@pytest.mark.parametrize(
    ("endpoints", "zone", "mode"),
    [
        pytest.param([], "a", TopologyMode.NONE, id="no-endpoints"),
        pytest.param([ep(1, zones=["a"], **NOT_READY)], "a", TopologyMode.NONE, id="no-ready"),
        pytest.param([ep(1, zones=["a"])], "a", TopologyMode.PREFER_SAME_ZONE, id="zone"),
        pytest.param([ep(1, nodes=[NODE])], "a", TopologyMode.PREFER_SAME_NODE, id="node"),
        pytest.param(
            [ep(1, zones=["a"], nodes=[NODE])], "a", TopologyMode.PREFER_SAME_NODE, id="both"
        ),
        pytest.param([ep(1)], "a", TopologyMode.NONE, id="no-hints"),
    ],
)
def test_topology_mode(endpoints: list[Endpoint], zone: str | None, mode: TopologyMode) -> None:
    assert topology_mode(endpoints, NODE, zone) is mode


# -- Properties ---------------------------------------------------------------------------

endpoint_lists = st.lists(
    st.builds(
        ep,
        st.integers(1, 250),
        local=st.booleans(),
        ready=st.booleans(),
        serving=st.booleans(),
        terminating=st.booleans(),
        zones=st.lists(st.sampled_from("ab"), max_size=2),
        nodes=st.lists(st.sampled_from([NODE, "node-2"]), max_size=2),
    ),
    max_size=8,
    unique_by=lambda e: e.ip,
)
services = st.builds(
    svc,
    itp=st.sampled_from(TrafficPolicy),
    etp=st.sampled_from(TrafficPolicy),
    type_=st.sampled_from([ServiceType.CLUSTER_IP, ServiceType.NODE_PORT]),
)
zones = st.none() | st.sampled_from("ab")


@given(endpoints=endpoint_lists, service=services, zone=zones)
def test_sets_are_subsets_of_input(
    endpoints: list[Endpoint], service: Service, zone: str | None
) -> None:
    got = categorize(endpoints, service, NODE, zone)
    for subset in (got.cluster, got.local, got.internal, got.external):
        assert set(subset) <= set(endpoints)
    assert all(e.is_local for e in got.local)
    assert got.internal in (got.cluster, got.local)
    assert got.external in (got.cluster, got.local)


@given(endpoints=endpoint_lists, service=services, zone=zones)
def test_has_any_iff_cluster_non_empty(
    endpoints: list[Endpoint], service: Service, zone: str | None
) -> None:
    got = categorize(endpoints, service, NODE, zone)
    # upstream: with any usable endpoint anywhere, the cluster set is never empty
    assert got.has_any == bool(got.cluster)
    if not got.has_any:
        assert got == EndpointSets((), (), (), (), has_any=False)


@given(endpoints=endpoint_lists, service=services, zone=zones)
def test_sets_never_mix_ready_and_fallback(
    endpoints: list[Endpoint], service: Service, zone: str | None
) -> None:
    got = categorize(endpoints, service, NODE, zone)
    for subset, pool in (
        (got.cluster, endpoints),
        (got.local, [e for e in endpoints if e.is_local]),
    ):
        if any(not is_ready(e) for e in subset):
            assert not any(is_ready(e) for e in pool)
            assert all(e.serving and e.terminating for e in subset)
