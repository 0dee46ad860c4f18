"""The rules ``userproxy explain`` names, one function per step (see ``explain.py``).

Each function looks at what the plan looked at, with the functions the plan used
(``control.selection``), and says what it concluded; none of them decides a candidate:
the candidates are always the planned pool's (``explain.explain_planned`` checks that),
narrowed only by a running proxy's live state (``live_steps``: the ejected endpoints are
left out unless that leaves none, as the listener's dial ladder does; a usable ClientIP
pin leaves only its endpoint, as ``ClientIPAffinity.pick`` does).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from userproxy.balancers.maglev import Maglev
from userproxy.control.selection import (
    TopologyMode,
    available_for_topology,
    is_ready,
    is_serving_terminating,
)
from userproxy.dataplane.classify import in_networks, parse_networks
from userproxy.model import (
    AddressKind,
    Endpoint,
    IPFamily,
    ListenerSpec,
    PoolSpec,
    Service,
    ServicePort,
    ServiceType,
    TrafficPolicy,
)

__all__ = [
    "ExplainError",
    "LiveFacts",
    "Pin",
    "Step",
    "Verdict",
    "choose",
    "class_step",
    "fallback_step",
    "hostport",
    "listener_json",
    "listeners_step",
    "live_steps",
    "live_verdict",
    "maglev_pick",
    "policy",
    "static_steps",
    "topology_step",
    "verdict",
]


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
    """One endpoint of the Service port: whether the client's pool has it, and why.

    ``ejected`` (a running proxy only): the outlier detector has it out now, for
    ``ejected_for`` more seconds; the listener avoids it unless every endpoint of the
    pool is out."""

    address: str
    in_pool: bool
    reason: str
    ready: bool
    serving: bool
    terminating: bool
    local: bool
    ejected: bool = False
    ejected_for: float | None = None


@dataclass(frozen=True, slots=True)
class Pin:
    """A live ClientIP affinity pin: the endpoint and when it expires (it is renewed by
    every new connection of the client)."""

    endpoint: str
    expires_in: float  # seconds from now
    expires_at: float  # Unix time


@dataclass(frozen=True, slots=True)
class LiveFacts:
    """What a running proxy knows of one pool beyond its plan (see :class:`LiveView`).

    ``ejected``: "ip:port" -> seconds until it returns; ``pin``: the client's pin, if any
    (to whatever endpoint: the explanation checks it is usable); ``next_pick``: the
    balancer's next pick for this client where it is deterministic, else None, and
    ``pick_note`` says which (or why not)."""

    ejected: Mapping[str, float] = field(default_factory=dict)
    pin: Pin | None = None
    next_pick: str | None = None
    pick_note: str = ""


def hostport(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def listeners_step(
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


def class_step(client: str, on_node: bool, cluster_cidr: str | None) -> Step:
    if on_node:
        why = (
            "loopback"
            if ipaddress.ip_address(client).is_loopback
            else "a node address or in --cluster-cidr"
        )
        return Step("traffic class", f"{client} is on the node ({why}): node-local traffic")
    cidr = f"in --cluster-cidr {cluster_cidr}" if cluster_cidr else "loopback"
    return Step("traffic class", f"{client} is neither a node address nor {cidr}: external traffic")


def choose(
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


def listener_json(spec: ListenerSpec, client: str, on_node: bool) -> dict[str, object]:
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


def policy(service: Service, spec: ListenerSpec, on_node: bool) -> tuple[Step, bool]:
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


def topology_step(
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


def fallback_step(
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


def verdict(
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


def static_steps(service: Service, client: str, pool: PoolSpec, source: str) -> list[Step]:
    """Affinity and balancer without live state (``source``: "manifests", "api")."""
    where = "from manifests" if source == "manifests" else "from the API"
    affinity = (
        f"sessionAffinity ClientIP, timeout {service.affinity_timeout}s: the first pick is kept "
        f"for this client; {where} there is no live pin to show"
        if service.affinity_timeout is not None
        else "sessionAffinity None: every connection is picked anew"
    )
    text = f"{pool.balancer} over the {len(pool.endpoints)} candidates"
    pick = maglev_pick(client, pool)
    if pick is not None:
        text += f"; maglev hashes {client} to {pick}"
    elif pool.endpoints:
        text += f"; its pick depends on live state (not deterministic {where})"
    return [Step("sessionAffinity", affinity), Step("balancer", text)]


def maglev_pick(client: str, pool: PoolSpec) -> str | None:
    if pool.balancer != "maglev" or not pool.endpoints:
        return None
    chosen = Maglev(pool.endpoints).pick(client)
    return None if chosen is None else hostport(chosen.ip, chosen.port)


def live_steps(
    service: Service, client: str, pool: tuple[str, ...], facts: LiveFacts
) -> tuple[tuple[str, ...], Pin | None, list[Step]]:
    """(candidates, the pin used, the steps) with a running proxy's live state."""
    steps = []
    out = [a for a in pool if a in facts.ejected]
    usable = tuple(a for a in pool if a not in facts.ejected) or pool
    if not out:
        steps.append(Step("outlier ejection: none", "no endpoint of the pool is ejected"))
    else:
        listed = ", ".join(f"{a} ({facts.ejected[a]:.0f}s more)" for a in out)
        if usable == pool:
            detail = f"every endpoint is ejected ({listed}): the balancer falls back to all"
        else:
            detail = f"{listed}: avoided while others remain"
        steps.append(Step("outlier ejection", detail))
    pin = facts.pin
    if service.affinity_timeout is None:
        steps.append(
            Step("sessionAffinity", "sessionAffinity None: every connection is picked anew")
        )
        pin = None
    elif pin is None:
        steps.append(
            Step(
                "sessionAffinity",
                f"ClientIP, timeout {service.affinity_timeout}s: {client} is not pinned "
                "(no connection within the timeout); the next pick pins it",
            )
        )
    elif pin.endpoint not in usable or pin.endpoint in facts.ejected:
        why = "ejected" if pin.endpoint in facts.ejected else "not in this pool"
        steps.append(
            Step(
                "sessionAffinity",
                f"ClientIP: {client} is pinned to {pin.endpoint}, which is {why}: the next "
                "connection is picked anew and pinned to that pick",
            )
        )
        pin = None
    else:
        until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(pin.expires_at))
        steps.append(
            Step(
                "sessionAffinity",
                f"ClientIP: {client} is pinned to {pin.endpoint} until {until} "
                f"({pin.expires_in:.0f}s; every new connection restarts the timer)",
            )
        )
        usable = (pin.endpoint,)
    text = facts.pick_note
    if pin is not None:
        text = f"not asked for {client}: the pin decides" + (
            f"; for other clients, {text}" if text else ""
        )
    steps.append(Step("balancer", text))
    return usable, pin, steps


def live_verdict(v: Verdict, facts: LiveFacts | None) -> Verdict:
    if facts is None or v.address not in facts.ejected:
        return v
    seconds = round(facts.ejected[v.address], 3)
    reason = f"{v.reason}; ejected (dials failed) for {seconds:.0f}s more"
    return dataclasses.replace(v, reason=reason, ejected=True, ejected_for=seconds)
