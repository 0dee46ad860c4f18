"""Which endpoints of a ServicePort new connections may use, per traffic class.

Mirrors upstream kube-proxy ``pkg/proxy/topology.go`` (``CategorizeEndpoints``,
``topologyModeFromHints``, ``availableForTopology``): endpoint conditions (ready, else
serving and terminating), traffic policies and topology hints.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from userproxy.model import Endpoint, Service, TrafficPolicy


def is_ready(endpoint: Endpoint) -> bool:
    """Ready endpoints are the usable ones (unset ``ready`` was decoded as True)."""
    return endpoint.ready


def is_serving_terminating(endpoint: Endpoint) -> bool:
    """The KEP-1669 fallback: still serving while terminating (used only with no ready one)."""
    return endpoint.serving and endpoint.terminating


def is_usable(endpoint: Endpoint) -> bool:
    """Ready, or serving and terminating: could carry traffic in some set."""
    return is_ready(endpoint) or is_serving_terminating(endpoint)


class TopologyMode(enum.StrEnum):
    """Upstream's topology modes (the values of ``trafficDistribution`` it maps hints to)."""

    NONE = ""
    PREFER_SAME_NODE = "PreferSameNode"
    PREFER_SAME_ZONE = "PreferSameZone"


def topology_mode(
    endpoints: Sequence[Endpoint], node_name: str, node_zone: str | None
) -> TopologyMode:
    """Decide whether hints filter the cluster set (upstream ``topologyModeFromHints``).

    Only ready endpoints are looked at; with none, there is no topology. Same-node hints win
    if every ready endpoint has node hints and at least one is hinted for ``node_name``.
    Otherwise same-zone hints apply if every ready endpoint has zone hints, the node's zone
    is known and at least one endpoint is hinted for it. Otherwise hints are ignored.
    """
    ready = [ep for ep in endpoints if is_ready(ep)]
    if not ready:
        return TopologyMode.NONE
    if all(ep.node_hints for ep in ready) and any(node_name in ep.node_hints for ep in ready):
        return TopologyMode.PREFER_SAME_NODE
    if (
        node_zone
        and all(ep.zone_hints for ep in ready)
        and any(node_zone in ep.zone_hints for ep in ready)
    ):
        return TopologyMode.PREFER_SAME_ZONE
    return TopologyMode.NONE


def available_for_topology(
    endpoint: Endpoint, mode: TopologyMode, node_name: str, node_zone: str | None
) -> bool:
    """Whether ``endpoint`` passes the topology filter (upstream ``availableForTopology``)."""
    if mode is TopologyMode.PREFER_SAME_NODE:
        return node_name in endpoint.node_hints
    if mode is TopologyMode.PREFER_SAME_ZONE:
        return node_zone is not None and node_zone in endpoint.zone_hints
    return True


@dataclass(frozen=True, slots=True)
class EndpointSets:
    """The endpoints of one ServicePort (and family) each kind of traffic may use.

    ``cluster``: the cluster-wide set (topology applied), also used for external-address
    traffic that originates on this node. ``local``: usable endpoints on this node.
    ``internal``: ClusterIP traffic. ``external``: NodePort / external IP / load-balancer
    traffic from outside the node. ``has_any``: some endpoint anywhere is usable, even if
    every set here is empty (e.g. iTP Local with only remote endpoints).
    """

    cluster: tuple[Endpoint, ...]
    local: tuple[Endpoint, ...]
    internal: tuple[Endpoint, ...]
    external: tuple[Endpoint, ...]
    has_any: bool


def categorize(
    endpoints: Sequence[Endpoint], service: Service, node_name: str, node_zone: str | None
) -> EndpointSets:
    """Split ``endpoints`` into :class:`EndpointSets` (upstream ``CategorizeEndpoints``).

    * cluster: the ready endpoints that pass the topology filter (see :func:`topology_mode`);
      if there are none, the serving-and-terminating ones. No topology filter is needed on
      that fallback: a topology mode is only chosen when some ready endpoint passes it, so
      the fallback only happens without one (upstream does the same).
    * local: the local ready endpoints, else the local serving-and-terminating ones; never
      topology-filtered. The fallback is decided separately from the cluster set's.
    * internal: ``cluster`` for ``internalTrafficPolicy: Cluster``, else ``local`` (no
      fallback to remote endpoints: empty means drop).
    * external: ``cluster`` unless ``externalTrafficPolicy: Local`` on an externally
      accessible Service (upstream ``ExternalPolicyLocal``), then ``local``.
    * has_any: some endpoint is ready, or serving and terminating.

    Order within each set follows ``endpoints``.
    """
    mode = topology_mode(endpoints, node_name, node_zone)
    cluster = _with_fallback(
        endpoints, lambda ep: available_for_topology(ep, mode, node_name, node_zone)
    )
    local = _with_fallback(endpoints, lambda ep: ep.is_local)
    external_local = (
        service.external_traffic_policy is TrafficPolicy.LOCAL and service.externally_accessible
    )
    return EndpointSets(
        cluster=cluster,
        local=local,
        internal=local if service.internal_traffic_policy is TrafficPolicy.LOCAL else cluster,
        external=local if external_local else cluster,
        has_any=any(is_usable(ep) for ep in endpoints),
    )


def _with_fallback(
    endpoints: Sequence[Endpoint], keep: Callable[[Endpoint], bool]
) -> tuple[Endpoint, ...]:
    """The ready endpoints ``keep`` accepts, else the serving-and-terminating ones it accepts.

    For the cluster set ``keep`` is the topology filter, which accepts everything whenever
    the fallback can be reached, so this matches upstream's unfiltered fallback.
    """
    ready = tuple(ep for ep in endpoints if is_ready(ep) and keep(ep))
    if ready:
        return ready
    return tuple(ep for ep in endpoints if is_serving_terminating(ep) and keep(ep))
