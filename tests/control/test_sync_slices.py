"""A sliced sync lets the loop run between its slices and applies the Services in the same
order as an unsliced one, however many it re-plans; a zone change re-plans every Service,
a label change none."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.model import eps, key, sep, svc
from tests.support.recorders import RecordingEffects
from userproxy.balancers.registry import BalancerRegistry
from userproxy.control.plan import ServicePlan
from userproxy.control.proxier import Proxier
from userproxy.control.trackers import ChangeRecorder
from userproxy.model import Node, ServiceKey

NODE = "node-1"
SERVICES = 2000

pytestmark = pytest.mark.both_loops  # the slices and reloads yield to whichever loop runs


def _world(monkeypatch: pytest.MonkeyPatch) -> tuple[ChangeRecorder, Proxier, list[ServiceKey]]:
    recorder = ChangeRecorder(NODE, lambda: None)
    proxier = Proxier(recorder, RecordingEffects(), BalancerRegistry())
    planned: list[ServiceKey] = []
    plan = proxier.plan

    def recording_plan(service: ServiceKey) -> ServicePlan:
        planned.append(service)
        return plan(service)

    monkeypatch.setattr(proxier, "plan", recording_plan)
    # Names whose str() order differs from the insertion order and from numeric order.
    for i in range(SERVICES):
        name = f"s{(i * 7919) % SERVICES}"
        recorder.on_service_add(svc(name, ips=(f"10.96.{i // 250}.{i % 250 + 1}",)))
        recorder.on_endpointslice_add(eps(f"{name}-1", name, sep(f"10.1.{i // 250}.{i % 250}")))
    recorder.on_node_add(Node(NODE, zone="a"))
    recorder.on_services_synced()
    recorder.on_endpointslices_synced()
    recorder.on_node_synced()
    return recorder, proxier, planned


async def test_a_large_sync_yields_to_the_loop_and_keeps_the_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _recorder, proxier, planned = _world(monkeypatch)
    turns = 0
    done = False

    async def count_turns() -> None:
        nonlocal turns
        while not done:
            turns += 1
            await asyncio.sleep(0)

    counter = asyncio.create_task(count_turns())
    await asyncio.sleep(0)
    before = turns
    assert await proxier.sync_in_slices()
    done = True
    await counter
    # 2 000 Services take far more than one 5 ms slice on any machine.
    assert turns - before >= 2
    assert len(planned) == SERVICES
    assert planned == sorted(planned, key=str)  # the unsliced sync's order


async def test_a_zone_change_replans_all_a_label_change_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder, proxier, planned = _world(monkeypatch)
    assert await proxier.sync_in_slices()
    planned.clear()
    recorder.on_node_update(Node(NODE, zone="a"), Node(NODE, zone="a", deleting=True))
    assert await proxier.sync_in_slices()
    assert planned == []
    recorder.on_node_update(Node(NODE, zone="a", deleting=True), Node(NODE, zone="b"))
    assert await proxier.sync_in_slices()
    assert len(planned) == SERVICES
    assert planned == sorted(planned, key=str)
    assert key("s0") in planned
