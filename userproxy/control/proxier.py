"""The proxier: each sync folds the pending changes in and hands the data plane what changed.

One way through a sync, as kube-proxy's ``runner.go`` drives ``Provider.Sync()``: the sync
runner calls :meth:`Proxier.sync_in_slices` (``sync()`` is the same without yielding, for
``userproxy check`` and table tests), and every effect goes through the :class:`SyncEffects`
the proxier was given.  A sync

1. takes the recorder's pending changes and the node's NodePort addresses (``_begin``);
2. folds the changes into the :class:`AppliedState`, which names the Services to plan
   again (control/trackers.py);
3. plans each of them (control/plan.py, a pure function) and hands the listeners of each
   changed plan to ``set_listeners``;
4. hands the health checks and the Service IPs on when they changed
   (``sync_health_checks``, ``sync_service_addresses``), and ends with ``synced``.

Only Services whose plan differs from the last sync reach the data plane, so a change that
does not alter the result causes no churn at all.

A Service whose plan could not be applied (``set_listeners`` raised: out of descriptors, an
address taken, any exception) does not stop the others.  Its plan is recorded all the same
(the desired state: the change trackers have already let go of the change) and the Service
is remembered as failed: every later sync re-plans it and hands the plan on again, even if
unchanged, until it applies.  ``sync()`` returns False while any Service, health check or
the node's addresses failed, and the sync runner retries (kube-proxy's proxiers call
``RetryAfter`` for the same reason).  The failures of one sync are logged in one line, when
they differ from the last line logged or at most once a minute otherwise.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from userproxy.balancers.registry import BalancerRegistry
from userproxy.control.endpoint_counts import EndpointCountLog
from userproxy.control.plan import NodeView, ServicePlan, plan_service
from userproxy.control.trackers import AppliedState, ChangeRecorder, PendingChanges
from userproxy.logs import RateLimitedLog
from userproxy.model import ListenerSpec, ServiceKey
from userproxy.slices import Slicer

log = logging.getLogger(__name__)

#: Unchanged failures are logged again (one line) at most this often.
FAILURE_LOG_INTERVAL = 60.0
#: Failed Services named in that line; the rest are counted.
FAILURES_NAMED = 3
#: A sync re-planning at least this many Services is bulk work (see userproxy.slices).
BULK_SERVICES = 1000


class SyncEffects(Protocol):
    """Everything a sync changes outside the control plane: the one interface the proxier
    is given (kube-proxy's proxiers are likewise handed their iptables interface, their
    health-check server and their event recorder).  ``userproxy.effects`` implements it
    over the listener set, the health-check servers and the address manager.

    Each call is synchronous and quick: nothing here may hold the event loop for long.
    """

    def set_listeners(self, service: ServiceKey, specs: Sequence[ListenerSpec]) -> None:
        """Make the listeners of ``service`` exactly ``specs``; raise if some are not
        (after applying all it could): the proxier retries the Service."""

    def sync_health_checks(
        self, ports: Mapping[ServiceKey, int], local: Mapping[ServiceKey, int]
    ) -> bool:
        """Serve a health check on exactly ``ports`` (healthCheckNodePort by Service),
        answering with ``local`` (node-local ready endpoints by Service, absent: 0);
        False while some port could not be opened (called again at the next sync)."""

    def sync_service_addresses(self, addresses: frozenset[str]) -> bool:
        """Make exactly ``addresses`` local (``--manage-addresses``; else nothing to do);
        hands the work on without waiting for it; False while the last attempt failed."""

    def synced(self, status: SyncStatus) -> None:
        """A sync has ended (metrics, waiters)."""


class NoEffects:
    """``SyncEffects`` that change nothing: planning only (``userproxy check``; tests
    subclass it to record what a sync hands on)."""

    def set_listeners(self, service: ServiceKey, specs: Sequence[ListenerSpec]) -> None:
        pass

    def sync_health_checks(
        self, ports: Mapping[ServiceKey, int], local: Mapping[ServiceKey, int]
    ) -> bool:
        return True

    def sync_service_addresses(self, addresses: frozenset[str]) -> bool:
        return True

    def synced(self, status: SyncStatus) -> None:
        pass


@dataclass(slots=True)
class SyncStatus:
    """What the last syncs did; read by health checks, metrics and the status page."""

    syncs: int = 0
    last_sync_at: float | None = None  # monotonic
    last_duration: float = 0.0
    last_queued_at: float | None = None  # monotonic time the applied changes were queued
    services_changed: int = 0
    slices_changed: int = 0
    #: Services the last sync planned again (changed, moved by a zone or node-address
    #: change, or retried).
    services_planned: int = 0
    #: Wall-clock delays from a slice's last-change-trigger-time to it being applied.
    programming_delays: list[float] = field(default_factory=list)
    #: kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=internal|external}
    no_local_internal: int = 0
    no_local_external: int = 0
    #: Services whose plan the last sync could not apply (retried by the next syncs).
    failed_services: int = 0
    #: Syncs in a row that left some Service failed.
    failed_syncs: int = 0


@dataclass(slots=True)
class _SyncRun:
    """One sync in progress: when it began, what it took, what it re-plans, what failed."""

    started: float
    changes: PendingChanges
    addresses: tuple[str, ...]
    #: The Services the folded changes touch.
    affected: set[ServiceKey] = field(default_factory=set)
    #: The Services that had failed before this sync (forced to re-apply).
    retry: set[ServiceKey] = field(default_factory=set)
    errors: dict[ServiceKey, Exception] = field(default_factory=dict)
    planned: int = 0


class Proxier:
    """Turns the applied state into the data plane's state, one sync at a time.

    Invariants: ``plans`` holds the last plan of every Service that wants something (the
    desired state, applied or failed); ``health_ports``, ``local_endpoints`` and the Service
    IPs are kept up to date from the plans as they change, never recomputed over every
    Service (a sync that re-plans one Service of 10 000 does one Service's work).
    """

    def __init__(
        self,
        recorder: ChangeRecorder,
        effects: SyncEffects,
        registry: BalancerRegistry,
        *,
        node_addresses: Callable[[], Sequence[str]] = tuple,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.recorder = recorder
        self.effects = effects
        self.registry = registry
        self.node_name = recorder.node_name
        self.state = AppliedState()
        self._node_addresses_of = node_addresses
        #: The NodePort addresses the last sync planned with.
        self.node_addresses: tuple[str, ...] = ()
        self._clock = clock
        self._wall_clock = wall_clock
        self.plans: dict[ServiceKey, ServicePlan] = {}
        #: Services whose last apply failed, with why: re-applied at every sync until done.
        self.failed: dict[ServiceKey, str] = {}
        #: Why the node's addresses could not be read at the last sync (None: they were).
        self.addresses_error: str | None = None
        #: healthCheckNodePort and node-local ready endpoints by Service (from the plans).
        self.health_ports: dict[ServiceKey, int] = {}
        self.local_endpoints: dict[ServiceKey, int] = {}
        #: How many plans claim each Service IP (``--manage-addresses``).
        self._service_ips: Counter[str] = Counter()
        #: True when the health checks / Service IPs must be handed on at the sync's end
        #: (they changed, or the last hand-over reported a failure).
        self._health_pending = True
        self._addresses_pending = True
        #: The failures line: again only when it changes, or after FAILURE_LOG_INTERVAL.
        self._failures_log = RateLimitedLog(log, FAILURE_LOG_INTERVAL, clock)
        self.status = SyncStatus()
        #: "ns/name:port/TCP: 3 -> 2 ready endpoints" lines (off unless the proxy serves).
        self.endpoint_log = EndpointCountLog()
        # Trigger times older than the proxy describe changes some earlier process applied
        # (kube-proxy ignores those too); they would report hours of "latency" per restart.
        self._started_wall = wall_clock()

    # -- a sync -------------------------------------------------------------------------------
    def sync(self) -> bool:
        """Apply everything pending (and retry what failed before).  Does nothing until
        both initial listings are in.  False when something could not be applied."""
        run = self._begin()
        if run is None:
            return True
        for _ in self.state.fold(run.changes, run.affected):
            pass
        by_name = {str(key): key for key in self._keys(run)}
        for key in _in_order(by_name):
            self._apply_one(run, key)
        return self._finish(run)

    async def sync_in_slices(self) -> bool:
        """``sync()`` in slices of a few milliseconds (``userproxy.slices``), so a sync
        that re-plans thousands of Services never holds the data plane up for long.

        Safe because nothing else touches the proxier's state meanwhile: the sources only
        record changes (the next sync folds them), and the runner starts no second sync
        until this one returns.  Services applied early in a sync serve their new plan
        while later ones still serve their old one, exactly as if the changes had arrived
        in two syncs.
        """
        run = self._begin()
        if run is None:
            return True
        changes = run.changes
        slicer = Slicer(bulk=len(changes.services) + len(changes.slices) >= BULK_SERVICES)
        for _ in self.state.fold(changes, run.affected):
            await slicer.tick()
        pending = self._keys(run)
        slicer = Slicer(bulk=len(pending) >= BULK_SERVICES)
        # The names to sort by, in slices too: a str() per Service is 10 ms for 10 000.
        by_name: dict[str, ServiceKey] = {}
        for key in pending:
            by_name[str(key)] = key
            await slicer.tick()
        keys = _in_order(by_name)
        slicer = Slicer(every=4, bulk=len(keys) >= BULK_SERVICES)
        for key in keys:
            self._apply_one(run, key)
            await slicer.tick()
        return self._finish(run)

    def _begin(self) -> _SyncRun | None:
        """Take the pending changes (None until both initial listings are in)."""
        if not self.recorder.initialized:
            return None
        started = self._clock()
        try:
            addresses = tuple(self._node_addresses_of())
            self.addresses_error = None
        except Exception as exc:
            # Keep the last addresses (read again at the retry): the pending changes must
            # be applied all the same.
            addresses = self.node_addresses
            self.addresses_error = _describe(exc)
        run = _SyncRun(started, self.recorder.take(), addresses)
        if self.status.syncs == 0:
            run.affected.update(self.state.services)  # nothing is planned yet
        return run

    def _keys(self, run: _SyncRun) -> set[ServiceKey]:
        """The Services this sync re-plans: those the folded changes touched, those with
        NodePorts if the node's addresses changed, those that failed before (put in
        order by ``_in_order``)."""
        affected = run.affected
        if run.addresses != self.node_addresses:
            self.node_addresses = run.addresses
            services = self.state.services
            affected.update(key for key, svc in services.items() if svc.externally_accessible)
        run.retry = set(self.failed)
        keys = affected.union(run.retry)
        run.planned = len(keys)
        return keys

    def plan(self, key: ServiceKey) -> ServicePlan:
        """What Service ``key`` wants now (an empty plan when it is gone or not proxied)."""
        service = self.state.services.get(key)
        if service is None:
            return ServicePlan()
        node = NodeView(self.node_name, self.state.zone, self.node_addresses)
        balancer = self.registry.resolve(service.balancer, str(key))
        return plan_service(service, self.state.slices_of(key), node, balancer)

    def _apply_one(self, run: _SyncRun, key: ServiceKey) -> None:
        try:
            self._apply(key, self.plan(key), force=key in run.retry)
        except Exception as exc:
            self.failed[key] = _describe(exc)
            run.errors[key] = exc
        else:
            self.failed.pop(key, None)

    def _apply(self, key: ServiceKey, plan: ServicePlan, *, force: bool = False) -> None:
        """Record ``key``'s new plan and hand its listeners on if they changed (or with
        ``force``: the last attempt failed, so what was applied is unknown).  The plan is
        recorded first, as the desired state, even when applying it raises."""
        old = self.plans.get(key, ServicePlan())
        # Kept up to date per Service rather than summed over every plan at each sync.
        self.status.no_local_internal += plan.no_local_internal - old.no_local_internal
        self.status.no_local_external += plan.no_local_external - old.no_local_external
        if plan == ServicePlan():
            self.plans.pop(key, None)
        else:
            self.plans[key] = plan
        self._note_health(key, plan)
        if plan.endpoint_counts != old.endpoint_counts:
            self.endpoint_log.note(old.endpoint_counts, plan.endpoint_counts)
        if plan.addresses != old.addresses:
            self._service_ips.subtract(old.addresses)
            self._service_ips.update(plan.addresses)
            self._addresses_pending = True
        if force or plan.listeners != old.listeners:
            self.effects.set_listeners(key, plan.listeners)

    def _note_health(self, key: ServiceKey, plan: ServicePlan) -> None:
        for table, value in (
            (self.health_ports, plan.health_check_port),
            (self.local_endpoints, plan.local_endpoints),
        ):
            if table.get(key) != (value or None):
                if value:
                    table[key] = value
                else:
                    table.pop(key, None)
                self._health_pending = True

    def _finish(self, run: _SyncRun) -> bool:
        effects = self.effects
        if self._health_pending:
            self._health_pending = not effects.sync_health_checks(
                self.health_ports, self.local_endpoints
            )
        if self._addresses_pending:
            self._addresses_pending = not effects.sync_service_addresses(self.service_addresses())
        changes = run.changes
        status = self.status
        status.syncs += 1
        status.last_sync_at = self._clock()
        status.last_duration = status.last_sync_at - run.started
        status.last_queued_at = changes.queued_at
        status.services_changed = len(changes.services)
        status.slices_changed = len(changes.slices)
        status.services_planned = run.planned
        now = self._wall_clock()
        status.programming_delays = [
            max(0.0, now - t) for t in changes.trigger_times if t > self._started_wall
        ]
        if run.affected:
            log.debug(
                "sync %d: %d services, %d slices changed, %d services re-planned in %.1f ms",
                status.syncs,
                status.services_changed,
                status.slices_changed,
                len(run.affected),
                status.last_duration * 1000,
            )
        self.endpoint_log.flush(status.syncs)
        self._report_failures(status, run.errors)
        effects.synced(status)
        return not (
            self.failed
            or self.addresses_error is not None
            or self._health_pending
            or self._addresses_pending
        )

    # -- what the plans add up to --------------------------------------------------------------
    @property
    def specs(self) -> dict[ServiceKey, tuple[ListenerSpec, ...]]:
        """The listeners each Service has now (Services with none are left out)."""
        return {key: plan.listeners for key, plan in self.plans.items() if plan.listeners}

    def service_addresses(self) -> frozenset[str]:
        """Every IP a served Service owns (cluster, external, LB VIPs): what
        ``--manage-addresses`` makes local."""
        return frozenset(ip for ip, claims in self._service_ips.items() if claims > 0)

    def _report_failures(self, status: SyncStatus, errors: dict[ServiceKey, Exception]) -> None:
        failed = self.failed
        status.failed_services = len(failed)
        if not failed and self.addresses_error is None:
            if status.failed_syncs:
                log.info(
                    "sync %d: every Service applied again (after %d incomplete syncs)",
                    status.syncs,
                    status.failed_syncs,
                )
            status.failed_syncs = 0
            self._failures_log.reset()
            return
        status.failed_syncs += 1
        keys = sorted(failed, key=str)
        parts = [f"{key}: {failed[key]}" for key in keys[:FAILURES_NAMED]]
        if len(keys) > FAILURES_NAMED:
            parts.append(f"and {len(keys) - FAILURES_NAMED} more")
        if self.addresses_error is not None:
            parts.insert(0, f"reading the node's addresses: {self.addresses_error}")
        self._failures_log.log(
            logging.WARNING,
            "sync %d incomplete, %d Service%s not fully applied, will retry: %s",
            status.syncs,
            len(keys),
            "" if len(keys) == 1 else "s",
            "; ".join(parts),
            key=tuple(parts),
        )
        for key in keys[:FAILURES_NAMED]:
            exc = errors.get(key)
            if exc is not None and not isinstance(exc, OSError):
                log.debug("applying %s failed", key, exc_info=exc)


def _in_order(by_name: dict[str, ServiceKey]) -> list[ServiceKey]:
    """The Services by name ("namespace/name"): a fixed order, so which of two Services
    claiming one address wins is the same every time.  The one step of a sync not sliced:
    sorting plain strings is C-level comparisons, about 2 ms for 10 000 (sorting the keys
    with ``key=str`` called ``str()`` in the same step, 10-20 ms)."""
    return [by_name[name] for name in sorted(by_name)]


def _describe(exc: BaseException) -> str:
    """One line for the log: an OSError's strerror, else the exception and its words."""
    if isinstance(exc, OSError) and exc.strerror and not exc.filename:
        return exc.strerror
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
