"""Merging what N workers report into one answer: Prometheus text and the /status JSON.

Metrics: every sample of a worker gets a ``worker`` label (its number), so nothing is lost
and ``sum without (worker) (...)`` gives the node's total; the parent's own samples get
``worker="control"``.  Families the parent alone knows (``PARENT_ONLY``: the API source's
events, manifest reload errors) are taken from the parent only, as the workers' copies are
always zero; ``process_*`` and ``python_*`` come from every process.

Status: the first worker's document, with the numbers that count traffic (``SUMMED``)
summed over the workers wherever their documents have the same shape (they plan the same
objects; a worker still catching up after a restart is left out of a sum it does not fit).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

#: Metric families (as the parser names them) only the parent's samples are kept of.
PARENT_ONLY = frozenset(
    {
        "userproxy_watch_restarts",
        "userproxy_relists",
        "userproxy_invalid_objects",
        "userproxy_api_errors",
        "userproxy_manifest_reload_errors",
        "userproxy_workers",
        "userproxy_worker_up",
        "userproxy_worker_restarts",
    }
)
_FROM_EVERY_PROCESS = ("process_", "python_")

#: Keys of /status whose integer values count traffic, summed over the workers.
SUMMED = frozenset(
    {
        # a port's totals
        "active",
        "accepted",
        "dial_failures",
        "bytes_up",
        "bytes_down",
        # an endpoint's (bytes and dial failures as above)
        "active_connections",
        "connections_total",
    }
)

Json = object


def _labelled(family: Metric, worker: str) -> list[Sample]:
    """The samples with a ``worker`` label (one they have, the parent's per-worker gauges,
    is kept)."""
    return [
        Sample(s.name, {"worker": worker, **s.labels}, s.value, s.timestamp, s.exemplar)
        for s in family.samples
    ]


class _Merged(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def merge_metrics(parent: str, workers: Sequence[tuple[str, str]]) -> bytes:
    """Prometheus text of the parent's exposition ``parent`` and each ``(worker, text)``."""
    merged: dict[str, Metric] = {}

    def add(text: str, worker: str, *, parent_side: bool) -> None:
        for family in text_string_to_metric_families(text):
            name = family.name
            if name.removesuffix("_created") in PARENT_ONLY:
                keep = parent_side
            elif name.startswith(_FROM_EVERY_PROCESS):
                keep = True
            else:
                keep = not parent_side
            if not keep:
                continue
            target = merged.get(name)
            if target is None:
                target = merged[name] = Metric(name, family.documentation, family.type)
            target.samples.extend(_labelled(family, worker))

    add(parent, "control", parent_side=True)
    for worker, text in workers:
        add(text, worker, parent_side=False)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(list(merged.values())))
    return generate_latest(registry)


def merge_status(documents: Sequence[Json]) -> Json:
    """The first document with the ``SUMMED`` numbers added up over all of them."""
    first = documents[0]
    for other in documents[1:]:
        if _same_shape(first, other):
            first = _add(first, other)
    return first


def _same_shape(a: Json, b: Json) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_shape(a[k], b[k]) for k in a if k != "events")
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_shape(x, y) for x, y in zip(a, b, strict=True))
    return True


def _add(a: Json, b: Json, key: str | None = None) -> Json:
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: a[k] if k == "events" else _add(a[k], b[k], k) for k in a}
    if isinstance(a, list) and isinstance(b, list):
        return [_add(x, y, key) for x, y in zip(a, b, strict=True)]
    if key in SUMMED and type(a) is int and type(b) is int:  # never a bool
        return a + b
    return a
