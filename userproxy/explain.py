"""``userproxy explain``: why a connection from one client to one Service goes where it goes.

The decisions are not re-derived here: the manifests are loaded and planned exactly as
``userproxy check`` does (``check.plan_manifests``' path: ``ChangeRecorder`` + ``Proxier``
+ ``NoEffects``), with the node's real addresses (or ``--node-address``), so the listeners
and pools explained are the ones ``run`` would serve.  The client is then classified as a
listener classifies it (``dataplane.classify.NodeLocal``, kube-proxy's LocalTrafficDetector)
and its pool chosen as ``Listener._pool_for`` chooses it (source ranges first, then the
node pool for a client on the node).  Only the *reasons* are computed on the side, with the
same functions the plan used (``control.selection``: ``topology_mode``, ``is_ready``,
``is_serving_terminating``, ``available_for_topology``), and each endpoint's verdict is
checked against the planned pool, so explain cannot list a candidate ``run`` would not use.

Invariants: nothing is bound or served; ``candidates`` is exactly the planned pool's
endpoints for that client and address (empty when the client is refused).  From manifests
there is no live state: no ClientIP affinity pin, no ejected endpoint, no load.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

from userproxy.balancers.maglev import Maglev
from userproxy.config import Settings
from userproxy.control.endpoints import build_endpoints
from userproxy.control.proxier import NoEffects, Proxier
from userproxy.control.selection import (
    TopologyMode,
    available_for_topology,
    is_ready,
    is_serving_terminating,
    topology_mode,
)
from userproxy.control.trackers import ChangeRecorder
from userproxy.dataplane.classify import NodeLocal, in_networks, parse_networks
from userproxy.model import (
    AddressKind,
    Endpoint,
    IPFamily,
    ListenerSpec,
    Service,
    ServiceKey,
    ServicePort,
    ServiceType,
    TrafficPolicy,
)
from userproxy.sources.manifest_files import ManifestState
from userproxy.sources.manifests import deliver_all

__all__ = ["ExplainError", "Explanation", "Step", "Verdict", "explain", "hostport"]


#: Services listed in the error for an unknown one; the rest are counted.
MAX_LISTED = 50


class ExplainError(Exception):
    """The Service, port or address asked for does not exist; the message lists what does."""


@dataclass(frozen=True, slots=True)
class Step:
    """One decision: the rule applied (e.g. "externalTrafficPolicy: Local") and what it
    looked at and concluded."""

    rule: str
    detail: str


@dataclass(frozen=True, slots=True)
class Verdict:
    """One endpoint of the Service port: whether the client's pool has it, and why."""

    address: str
    in_pool: bool
    reason: str
    ready: bool
    serving: bool
    terminating: bool
    local: bool


@dataclass(frozen=True, slots=True)
class Explanation:
    """The chain of decisions for one (client, Service port, address)."""

    service: str
    port: str
    client: str
    client_class: str  # "node" (this node or --cluster-cidr) or "external"
    node: str
    address: str | None  # "ip:port" of the listener explained; None: none reachable
    listeners: tuple[dict[str, object], ...]
    steps: tuple[Step, ...]
    endpoints: tuple[Verdict, ...]
    candidates: tuple[str, ...]
    balancer: str | None
    affinity_timeout: int | None
    pick: str | None = None
    notes: tuple[str, ...] = field(default=())

    def as_json(self) -> dict[str, object]:
        """The ``-o json`` form: every field, steps and endpoints as objects."""
        return dataclasses.asdict(self)


def hostport(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def explain(
    state: ManifestState,
    settings: Settings,
    target: str,
    client: str,
    *,
    local: NodeLocal,
    nodeport_addresses: Sequence[str],
    to: str | None = None,
) -> Explanation:
    """Explain a connection from ``client`` to ``target`` ("NAMESPACE/NAME[:PORT]"), to
    the address ``to`` ("IP" or "IP:PORT"; default: the ClusterIP for a client on the node,
    else the first external address).  Raises :class:`ExplainError` for a bad target."""
    service, port = _find(state, target)
    recorder = ChangeRecorder(settings.hostname, lambda: None)
    deliver_all(state, recorder, settings.hostname)
    # Imported here: proxy.py imports the whole data plane; its resolution is run's own.
    from userproxy.proxy import _balancer_registry

    registry = _balancer_registry(settings)
    proxier = Proxier(
        recorder, NoEffects(), registry, node_addresses=lambda: tuple(nodeport_addresses)
    )
    proxier.sync()
    zone = proxier.state.zone
    spn = service.port_name(port)
    specs = [s for s in proxier.specs.get(service.key, ()) if s.spn == spn]
    on_node = local.is_local(client)
    steps: list[Step] = [_listeners_step(service, port, specs, nodeport_addresses)]
    steps.append(_class_step(client, on_node, settings))
    spec = _choose(specs, client, on_node, to)
    listeners = tuple(_listener_json(s, client, on_node) for s in specs)
    base = functools.partial(
        Explanation,
        service=str(service.key),
        port=port.name or str(port.port),
        client=client,
        client_class="node" if on_node else "external",
        node=settings.hostname,
        listeners=listeners,
        affinity_timeout=service.affinity_timeout,
    )
    if spec is None:
        why = (
            "no address of this Service port is served"
            if not specs
            else "an outside client reaches only NodePorts, external and load-balancer IPs; "
            "this port has only ClusterIPs (pass --to to pick an address)"
        )
        steps.append(Step("address", why))
        return base(address=None, steps=tuple(steps), endpoints=(), candidates=(), balancer=None)
    steps.append(Step("address", f"{hostport(spec.ip, spec.port)} ({spec.kind})"))
    if spec.source_ranges and not in_networks(client, parse_networks(spec.source_ranges)):
        steps.append(
            Step(
                "loadBalancerSourceRanges",
                f"{client} is not in {','.join(spec.source_ranges)}: refused",
            )
        )
        return base(
            address=hostport(spec.ip, spec.port),
            steps=tuple(steps),
            endpoints=(),
            candidates=(),
            balancer=spec.pool.balancer,
        )
    if spec.source_ranges:
        steps.append(
            Step(
                "loadBalancerSourceRanges",
                f"{client} is in {','.join(spec.source_ranges)}: allowed",
            )
        )
    pool = spec.node_pool if spec.node_pool is not None and on_node else spec.pool
    family = IPFamily.of(spec.ip)
    endpoints = build_endpoints(service, state.slices.values(), settings.hostname).get(
        (spn, family), ()
    )
    policy_step, uses_local = _policy(service, spec, on_node)
    steps.append(policy_step)
    mode = topology_mode(endpoints, settings.hostname, zone)
    if not uses_local:
        steps.append(_topology_step(endpoints, mode, settings.hostname, zone))
    else:  # upstream filters only the cluster set by hints, never the local one
        steps.append(Step("topology hints: not applied", "the Local policy's set ignores hints"))
    verdicts = tuple(
        _verdict(
            e, pool.endpoints, uses_local=uses_local, mode=mode, node=settings.hostname, zone=zone
        )
        for e in endpoints
    )
    steps.append(_fallback_step(endpoints, pool.endpoints, uses_local))
    candidates = tuple(hostport(e.ip, e.port) for e in pool.endpoints)
    if not candidates:
        steps.append(
            Step(
                "no endpoints", "the pool is empty: the connection is refused (kube-proxy's REJECT)"
            )
        )
    affinity = (
        f"sessionAffinity ClientIP, timeout {service.affinity_timeout}s: the first pick is kept "
        "for this client; from manifests there is no live pin to show"
        if service.affinity_timeout is not None
        else "sessionAffinity None: every connection is picked anew"
    )
    steps.append(Step("sessionAffinity", affinity))
    pick = None
    balancer_text = f"{pool.balancer} over the {len(candidates)} candidates"
    if pool.balancer == "maglev" and pool.endpoints:
        chosen = Maglev(pool.endpoints).pick(client)
        if chosen is not None:
            pick = hostport(chosen.ip, chosen.port)
            balancer_text += f"; maglev hashes {client} to {pick}"
    elif pool.endpoints:
        balancer_text += "; its pick depends on live state (not deterministic from manifests)"
    steps.append(Step("balancer", balancer_text))
    return base(
        address=hostport(spec.ip, spec.port),
        steps=tuple(steps),
        endpoints=verdicts,
        candidates=candidates,
        balancer=pool.balancer,
        pick=pick,
    )


def _find(state: ManifestState, target: str) -> tuple[Service, ServicePort]:
    name, _, port_text = target.partition(":")
    namespace, slash, short = name.partition("/")
    if not slash:
        namespace, short = "default", name
    service = state.services.get(ServiceKey(namespace, short))
    if service is None:
        ordered = sorted(state.services.items(), key=lambda item: str(item[0]))
        known = [f"{key}:{_ports(s)}" for key, s in ordered[:MAX_LISTED]]
        if len(ordered) > MAX_LISTED:
            known.append(f"and {len(ordered) - MAX_LISTED} more")
        raise ExplainError(
            f"no Service {namespace}/{short} in the manifests; they define: "
            + (", ".join(known) or "none")
        )
    if not service.is_proxied:
        raise ExplainError(f"Service {service.key} is not proxied (headless or ExternalName)")
    matches = [p for p in service.ports if not port_text or port_text in (p.name, str(p.port))]
    if len(matches) != 1:
        what = f"no port {port_text!r}" if not matches else "several ports; name one"
        raise ExplainError(f"Service {service.key} has {what}; its ports: {_ports(service)}")
    return service, matches[0]


def _ports(service: Service) -> str:
    return ",".join(f"{p.name or p.port}" for p in service.ports) or "(none)"


def _listeners_step(
    service: Service, port: ServicePort, specs: Sequence[ListenerSpec], nodeport: Sequence[str]
) -> Step:
    parts = [f"type {service.type}"]
    if port.node_port is not None and service.type in (
        ServiceType.NODE_PORT,
        ServiceType.LOAD_BALANCER,
    ):
        parts.append(
            f"nodePort {port.node_port} on the node addresses {','.join(nodeport) or '(none)'} "
            "(nodePortAddresses applied)"
        )
    for ingress in service.load_balancer_ingress:
        served = ingress.ip_mode in (None, "VIP")
        parts.append(
            f"load-balancer ingress {ingress.ip} ipMode {ingress.ip_mode or 'unset'}: "
            + (
                "served here (VIP)"
                if served
                else "not served here (Proxy: the LB sends to the node)"
            )
        )
    if service.external_ips:
        parts.append(f"externalIPs {','.join(service.external_ips)}")
    closed = ", not opened: no endpoints"
    shown = [
        f"{hostport(s.ip, s.port)} ({s.kind}{'' if s.serves_anyone else closed})" for s in specs
    ]
    return Step("listeners", "; ".join(parts) + " -> " + (", ".join(shown) or "none"))


def _class_step(client: str, on_node: bool, settings: Settings) -> Step:
    if on_node:
        why = (
            "loopback"
            if ipaddress.ip_address(client).is_loopback
            else "a node address or in --cluster-cidr"
        )
        return Step("traffic class", f"{client} is on the node ({why}): node-local traffic")
    cidr = f"in --cluster-cidr {settings.cluster_cidr}" if settings.cluster_cidr else "loopback"
    return Step("traffic class", f"{client} is neither a node address nor {cidr}: external traffic")


def _choose(
    specs: Sequence[ListenerSpec], client: str, on_node: bool, to: str | None
) -> ListenerSpec | None:
    if to is not None:
        for spec in specs:
            if to in (spec.ip, hostport(spec.ip, spec.port)):
                return spec
        listed = ", ".join(hostport(s.ip, s.port) for s in specs) or "none"
        raise ExplainError(
            f"--to {to}: not an address of this Service port; its addresses: {listed}"
        )
    family = IPFamily.of(client)
    ordered = sorted(specs, key=lambda s: IPFamily.of(s.ip) != family)
    for spec in ordered:
        if (spec.kind is AddressKind.CLUSTER_IP) == on_node:
            return spec
    return ordered[0] if ordered and on_node else None


def _listener_json(spec: ListenerSpec, client: str, on_node: bool) -> dict[str, object]:
    refused = bool(spec.source_ranges) and not in_networks(
        client, parse_networks(spec.source_ranges)
    )
    pool = spec.node_pool if spec.node_pool is not None and on_node else spec.pool
    return {
        "address": hostport(spec.ip, spec.port),
        "kind": str(spec.kind),
        "open": spec.serves_anyone,
        "source_ranges": list(spec.source_ranges),
        "candidates": [] if refused else [hostport(e.ip, e.port) for e in pool.endpoints],
    }


def _policy(service: Service, spec: ListenerSpec, on_node: bool) -> tuple[Step, bool]:
    """The traffic policy step and whether the local set (not the cluster set) is used."""
    if spec.kind is AddressKind.CLUSTER_IP:
        policy = service.internal_traffic_policy
        local = policy is TrafficPolicy.LOCAL
        what = "only this node's endpoints" if local else "the cluster-wide set"
        return Step(f"internalTrafficPolicy: {policy}", f"ClusterIP traffic uses {what}"), local
    policy = service.external_traffic_policy
    if on_node:
        return Step(
            f"externalTrafficPolicy: {policy}",
            "a client on the node gets the cluster-wide set at every address "
            "(kube-proxy: node-local traffic is never dropped by a Local policy)",
        ), False
    local = policy is TrafficPolicy.LOCAL and service.externally_accessible
    what = (
        "only this node's endpoints (the client's source IP is kept)"
        if local
        else "the cluster-wide set"
    )
    return Step(f"externalTrafficPolicy: {policy}", f"external traffic uses {what}"), local


def _topology_step(
    endpoints: Sequence[Endpoint], mode: TopologyMode, node: str, zone: str | None
) -> Step:
    ready = [e for e in endpoints if is_ready(e)]
    if mode is TopologyMode.PREFER_SAME_NODE:
        return Step(
            "topology hints: used", f"every ready endpoint has node hints and some name {node}"
        )
    if mode is TopologyMode.PREFER_SAME_ZONE:
        return Step(
            "topology hints: used", f"every ready endpoint has zone hints and some name zone {zone}"
        )
    if not any(e.zone_hints or e.node_hints for e in endpoints):
        return Step("topology hints: none", "no endpoint carries hints")
    if not ready:
        why = "no endpoint is ready"
    elif not all(e.zone_hints for e in ready):
        why = "not every ready endpoint has zone hints"
    elif zone is None:
        why = (
            f"the zone of node {node} is unknown (no Node or no topology.kubernetes.io/zone label)"
        )
    else:
        why = f"no ready endpoint is hinted for zone {zone}"
    return Step("topology hints: ignored", why)


def _fallback_step(
    endpoints: Sequence[Endpoint], pool: Sequence[Endpoint], uses_local: bool
) -> Step:
    if pool and all(not is_ready(e) for e in pool):
        return Step(
            "terminating fallback: used",
            "no ready endpoint in the set, so the serving and terminating ones are used (KEP-1669)",
        )
    if any(is_serving_terminating(e) and not is_ready(e) for e in endpoints):
        return Step("terminating fallback: not used", "the set has ready endpoints")
    return Step("endpoint conditions", "ready endpoints are used; not-ready ones never")


def _verdict(
    e: Endpoint,
    pool: Sequence[Endpoint],
    *,
    uses_local: bool,
    mode: TopologyMode,
    node: str,
    zone: str | None,
) -> Verdict:
    in_pool = e in pool
    if in_pool:
        reason = "ready" if is_ready(e) else "serving and terminating (fallback: no ready endpoint)"
    elif uses_local and not e.is_local:
        reason = f"not on this node ({node}) and the traffic policy is Local"
    elif not is_ready(e) and not is_serving_terminating(e):
        reason = "not ready" + ("" if e.serving else " and not serving")
    elif not is_ready(e):
        reason = "terminating: the fallback is not used (ready endpoints exist)"
    elif not uses_local and not available_for_topology(e, mode, node, zone):
        by_node = mode is TopologyMode.PREFER_SAME_NODE
        hinted = ",".join(sorted(e.node_hints if by_node else e.zone_hints)) or "nothing"
        reason = f"topology hints ({mode}): hinted for {hinted}, not {node if by_node else zone}"
    else:
        reason = "not in the pool"
    return Verdict(
        hostport(e.ip, e.port), in_pool, reason, e.ready, e.serving, e.terminating, e.is_local
    )
