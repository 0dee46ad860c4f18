"""Change trackers and the recorder (kube-proxy rules: "Sync loop", "Which objects count")."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.support.clock import FakeClock
from userproxy.control.trackers import Change, ChangeRecorder, ChangeTracker
from userproxy.model import (
    EndpointSlice,
    IPFamily,
    Node,
    Service,
    ServiceKey,
    SliceEndpoint,
)

NODE = "node-1"

# -- ChangeTracker ------------------------------------------------------------------------

Record = tuple[str | None, str | None]


@dataclass(frozen=True)
class TrackerCase:
    id: str
    records: list[Record]
    pending: Change[str] | None
    returns: list[bool]


TRACKER_CASES = [
    TrackerCase("add", [(None, "a")], Change(None, "a"), [True]),
    TrackerCase("update", [("a", "b")], Change("a", "b"), [True]),
    TrackerCase("delete", [("a", None)], Change("a", None), [True]),
    TrackerCase("no-op-update", [("a", "a")], None, [False]),
    TrackerCase("add-then-delete", [(None, "a"), ("a", None)], None, [True, False]),
    TrackerCase("update-back-to-original", [("a", "b"), ("b", "a")], None, [True, False]),
    TrackerCase(
        "update-away-and-back-twice",
        [("a", "b"), ("b", "c"), ("c", "a")],
        None,
        [True, True, False],
    ),
    TrackerCase("add-then-update-merges", [(None, "a"), ("a", "b")], Change(None, "b"), [True] * 2),
    TrackerCase(
        "add-update-update", [(None, "a"), ("a", "b"), ("b", "c")], Change(None, "c"), [True] * 3
    ),
    TrackerCase(
        "delete-of-pending-add-after-update",
        [(None, "a"), ("a", "b"), ("b", None)],
        None,
        [True, True, False],
    ),
    TrackerCase("update-then-delete", [("a", "b"), ("b", None)], Change("a", None), [True] * 2),
    TrackerCase("delete-then-re-add-same", [("a", None), (None, "a")], None, [True, False]),
    TrackerCase(
        "delete-then-add-different", [("a", None), (None, "b")], Change("a", "b"), [True] * 2
    ),
    TrackerCase(
        "cancelled-then-changed-again",
        [(None, "a"), ("a", None), (None, "b")],
        Change(None, "b"),
        [True, False, True],
    ),
]


@pytest.mark.parametrize("case", TRACKER_CASES, ids=[c.id for c in TRACKER_CASES])
def test_change_tracker(case: TrackerCase) -> None:
    tracker: ChangeTracker[str, str] = ChangeTracker()
    returns = [tracker.record("k", previous, current) for previous, current in case.records]
    assert returns == case.returns
    assert tracker.total == len(case.records), "total counts every record, even cancelled"
    expected = {} if case.pending is None else {"k": case.pending}
    assert len(tracker) == len(expected)
    assert tracker.take() == expected


def test_change_tracker_keys_are_independent() -> None:
    tracker: ChangeTracker[str, str] = ChangeTracker()
    tracker.record("x", None, "a")
    tracker.record("y", "b", "c")
    tracker.record("x", "a", None)
    assert tracker.take() == {"y": Change("b", "c")}
    assert tracker.total == 3


def test_change_tracker_take_starts_afresh() -> None:
    tracker: ChangeTracker[str, str] = ChangeTracker()
    tracker.record("k", None, "a")
    assert tracker.take() == {"k": Change(None, "a")}
    assert len(tracker) == 0
    assert tracker.take() == {}
    # After take the applied state is "a": a later delete is measured against it.
    assert tracker.record("k", "a", None)
    assert tracker.take() == {"k": Change("a", None)}
    assert tracker.total == 2


# -- ChangeRecorder -----------------------------------------------------------------------


class Syncs:
    """Counts the recorder's sync requests (the runner's ``request``)."""

    def __init__(self) -> None:
        self.count = 0

    def request(self) -> None:
        self.count += 1


def svc(name: str = "web", ip: str = "10.96.0.1") -> Service:
    return Service("default", name, cluster_ips=(ip,))


def eps(
    name: str = "web-abc", service: str = "web", trigger: float | None = None, ip: str = "10.1.0.1"
) -> EndpointSlice:
    return EndpointSlice(
        "default",
        name,
        service,
        IPFamily.IPv4,
        endpoints=(SliceEndpoint(ip),),
        trigger_time=trigger,
    )


def is_initialized(recorder: ChangeRecorder) -> bool:
    """Read through a call so mypy does not narrow the property between steps."""
    return recorder.initialized


def queued_at(recorder: ChangeRecorder) -> float | None:
    return recorder.queued_at


def make_recorder(
    initialized: bool = True, time: FakeClock | None = None
) -> tuple[ChangeRecorder, Syncs]:
    syncs = Syncs()
    recorder = ChangeRecorder(NODE, syncs.request, clock=(time or FakeClock(100.0)).now)
    if initialized:
        recorder.on_services_synced()
        recorder.on_endpointslices_synced()
        syncs.count = 0
    return recorder, syncs


@pytest.mark.parametrize("services_first", [True, False], ids=["services-first", "slices-first"])
def test_no_sync_request_before_both_listings(services_first: bool) -> None:
    recorder, syncs = make_recorder(initialized=False)
    recorder.on_service_add(svc())
    recorder.on_endpointslice_add(eps())
    assert syncs.count == 0
    assert not is_initialized(recorder)
    first, second = (
        (recorder.on_services_synced, recorder.on_endpointslices_synced)
        if services_first
        else (recorder.on_endpointslices_synced, recorder.on_services_synced)
    )
    first()
    assert not is_initialized(recorder)
    recorder.on_service_update(svc(), svc(ip="10.96.0.2"))
    assert syncs.count == 0, "half a view must never be proxied"
    second()
    assert is_initialized(recorder)
    assert syncs.count == 1
    pending = recorder.take()
    assert pending.services == {ServiceKey("default", "web"): Change(None, svc(ip="10.96.0.2"))}
    assert list(pending.slices) == [("default", "web-abc")]


def test_sync_requested_after_each_pending_change() -> None:
    recorder, syncs = make_recorder()
    recorder.on_service_add(svc())
    assert syncs.count == 1
    recorder.on_service_update(svc(), svc(ip="10.96.0.2"))
    assert syncs.count == 2
    recorder.on_endpointslice_add(eps())
    assert syncs.count == 3
    recorder.on_endpointslice_update(eps(), eps(ip="10.1.0.2"))
    assert syncs.count == 4
    recorder.on_endpointslice_delete(eps(ip="10.1.0.2"))
    assert syncs.count == 4, "add then delete of a slice cancels out: nothing to sync"
    recorder.on_service_delete(svc(ip="10.96.0.2"))
    assert syncs.count == 4
    pending = recorder.take()
    assert pending.services == {}
    assert pending.slices == {}
    assert recorder.services.total == 3
    assert recorder.slices.total == 3


def test_queued_at_is_the_oldest_pending_change() -> None:
    time = FakeClock(100.0)
    recorder, _ = make_recorder(time=time)
    assert queued_at(recorder) is None
    recorder.on_service_add(svc())
    time.set(105.0)
    recorder.on_endpointslice_add(eps())
    time.set(107.0)
    recorder.on_service_update(svc(), svc(ip="10.96.0.9"))
    assert queued_at(recorder) == 100.0
    pending = recorder.take()
    assert pending.queued_at == 100.0
    assert queued_at(recorder) is None, "take() resets the queue time"
    time.set(120.0)
    recorder.on_service_delete(svc(ip="10.96.0.9"))
    assert queued_at(recorder) == 120.0
    assert recorder.take().queued_at == 120.0


def test_queued_at_not_set_by_a_no_op() -> None:
    time = FakeClock(50.0)
    recorder, syncs = make_recorder(time=time)
    recorder.on_service_update(svc(), svc())
    assert queued_at(recorder) is None
    assert syncs.count == 0


def test_take_resets_everything() -> None:
    recorder, _ = make_recorder()
    recorder.on_service_add(svc())
    recorder.on_endpointslice_add(eps(trigger=1000.0))
    recorder.on_node_add(Node(NODE, zone="a"))
    pending = recorder.take()
    assert pending.services
    assert pending.slices
    assert pending.node is not None
    assert pending.trigger_times == [1000.0]
    again = recorder.take()
    assert again.services == {}
    assert again.slices == {}
    assert again.node is None
    assert again.queued_at is None
    assert again.trigger_times == []
    assert pending.trigger_times == [1000.0], "the taken list is not cleared under the caller"


def test_trigger_times_collected() -> None:
    recorder, _ = make_recorder()
    recorder.on_endpointslice_add(eps("a", trigger=1000.0))
    recorder.on_endpointslice_add(eps("b"))
    recorder.on_endpointslice_update(
        eps("a", trigger=1000.0), eps("a", trigger=1001.5, ip="10.1.0.7")
    )
    recorder.on_endpointslice_delete(eps("c", trigger=999.0))  # deletions carry no trigger
    assert recorder.take().trigger_times == [1000.0, 1001.5]


@dataclass(frozen=True)
class TriggerCase:
    id: str
    applied: EndpointSlice | None
    events: list[tuple[EndpointSlice | None, EndpointSlice | None]]
    expected: list[float]


S1000 = eps("s", trigger=1000.0)
S1001 = eps("s", trigger=1001.0, ip="10.1.0.2")

TRIGGER_CASES = [
    TriggerCase("add", None, [(None, S1000)], [1000.0]),
    TriggerCase("update", S1000, [(S1000, S1001)], [1001.0]),
    TriggerCase("delete", S1000, [(S1000, None)], []),
    # A re-list after a watch reconnect redelivers unchanged slices: nothing is applied, so
    # nothing must be measured (upstream records trigger times only when changeNeeded).
    TriggerCase("unchanged-resync", S1000, [(S1000, S1000)], []),
    # Upstream drops a Service's trigger times when a slice is removed before the sync.
    TriggerCase("add-then-delete", None, [(None, S1000), (S1000, None)], []),
]


@pytest.mark.parametrize("case", TRIGGER_CASES, ids=[c.id for c in TRIGGER_CASES])
def test_trigger_times_only_for_pending_changes(case: TriggerCase) -> None:
    recorder, _ = make_recorder()
    if case.applied is not None:
        recorder.on_endpointslice_add(case.applied)
        recorder.take()
    for old, new in case.events:
        if old is None:
            assert new is not None
            recorder.on_endpointslice_add(new)
        elif new is None:
            recorder.on_endpointslice_delete(old)
        else:
            recorder.on_endpointslice_update(old, new)
    assert recorder.take().trigger_times == case.expected


@dataclass(frozen=True)
class NodeCase:
    id: str
    events: list[tuple[str, Node | None, Node]]
    node: Change[Node] | None
    syncs: int


OWN_A = Node(NODE, zone="a")
OWN_B = Node(NODE, zone="b")
OTHER = Node("node-2", zone="x")
OTHER_Y = Node("node-2", zone="y")

NODE_CASES = [
    NodeCase("own-add", [("add", None, OWN_A)], Change(None, OWN_A), 1),
    NodeCase("other-add-ignored", [("add", None, OTHER)], None, 0),
    NodeCase("other-update-ignored", [("update", OTHER, OTHER_Y)], None, 0),
    NodeCase("other-delete-ignored", [("delete", None, OTHER)], None, 0),
    NodeCase(
        "own-then-other",
        [("add", None, OWN_A), ("add", None, OTHER), ("update", OTHER, OTHER_Y)],
        Change(None, OWN_A),
        1,
    ),
    NodeCase(
        "own-zone-change", [("add", None, OWN_A), ("update", OWN_A, OWN_B)], Change(None, OWN_B), 2
    ),
    NodeCase("own-add-then-delete", [("add", None, OWN_A), ("delete", None, OWN_A)], None, 1),
    NodeCase(
        "own-update-back",
        [("add", None, OWN_A), ("update", OWN_A, OWN_B), ("update", OWN_B, OWN_A)],
        Change(None, OWN_A),
        3,
    ),
]


@pytest.mark.parametrize("case", NODE_CASES, ids=[c.id for c in NODE_CASES])
def test_node_changes(case: NodeCase) -> None:
    recorder, syncs = make_recorder()
    for kind, old, new in case.events:
        if kind == "add":
            recorder.on_node_add(new)
        elif kind == "update":
            assert old is not None
            recorder.on_node_update(old, new)
        else:
            recorder.on_node_delete(new)
    assert syncs.count == case.syncs
    assert recorder.take().node == case.node


def test_node_change_measured_against_the_applied_node() -> None:
    recorder, syncs = make_recorder()
    recorder.on_node_add(OWN_A)
    assert recorder.take().node == Change(None, OWN_A)
    recorder.on_node_update(OWN_A, OWN_B)
    recorder.on_node_update(OWN_B, OWN_A)
    assert recorder.take().node is None, "back to the applied node: nothing pending"
    recorder.on_node_delete(OWN_A)
    assert recorder.take().node == Change(OWN_A, None)
    assert syncs.count == 3
