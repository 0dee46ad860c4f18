"""Fuzzing the manifest reader and the API-object decoders with Hypothesis.

The property: whatever the bytes or values, reading raises only ManifestError and decoding
only DecodeError (and their messages stay bounded).  Inputs start from valid objects and
are mutated (bytes of their YAML/JSON text; values at paths inside them), so most examples
get past the first checks and reach deep into the code.  Examples are few and have no
deadline: the whole file runs in a few seconds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from userproxy.sources.decode import (
    MAX_FIELD_CHARS,
    MAX_MESSAGE_CHARS,
    DecodeError,
    decode_endpoint_slice,
    decode_node,
    decode_service,
)
from userproxy.sources.manifest_files import FileContents
from userproxy.sources.manifest_read import MAX_PROBLEM_CHARS, ManifestError, parse_documents

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --------------------------------------------------------------------------- valid objects

SERVICE: dict[str, object] = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {
        "name": "web",
        "namespace": "shop",
        "labels": {"app": "web"},
        "annotations": {"userproxy.io/balancer": "round-robin"},
    },
    "spec": {
        "type": "LoadBalancer",
        "clusterIP": "10.96.0.10",
        "clusterIPs": ["10.96.0.10", "fd00::10"],
        "ports": [
            {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080, "nodePort": 30080},
            {"name": "dns", "protocol": "UDP", "port": 53, "targetPort": "dns"},
        ],
        "externalIPs": ["192.0.2.1"],
        "loadBalancerSourceRanges": ["10.0.0.0/8"],
        "externalTrafficPolicy": "Local",
        "internalTrafficPolicy": "Cluster",
        "healthCheckNodePort": 32000,
        "sessionAffinity": "ClientIP",
        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}},
    },
    "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.5", "ipMode": "VIP"}]}},
}

SLICE: dict[str, object] = {
    "apiVersion": "discovery.k8s.io/v1",
    "kind": "EndpointSlice",
    "metadata": {
        "name": "web-abc",
        "namespace": "shop",
        "labels": {"kubernetes.io/service-name": "web"},
        "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2024-01-01T00:00:00Z"},
    },
    "addressType": "IPv4",
    "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
    "endpoints": [
        {
            "addresses": ["10.1.0.1"],
            "conditions": {"ready": True, "serving": True, "terminating": False},
            "nodeName": "node-a",
            "zone": "z1",
            "hints": {"forZones": [{"name": "z1"}], "forNodes": [{"name": "node-a"}]},
        }
    ],
}

NODE: dict[str, object] = {
    "apiVersion": "v1",
    "kind": "Node",
    "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "z1"}},
    "spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]},
}

OBJECTS = [SERVICE, SLICE, NODE]
DECODERS: list[Callable[[dict[str, object]], object]] = [
    decode_service,
    decode_endpoint_slice,
    decode_node,
]

# --------------------------------------------------------------------------- odd values

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**80), max_value=10**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["", "None", "80", "TCP", "ClientIP", "Local", "::1", "10.0.0.1/33", "é"]),
    st.binary(max_size=8),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(
            st.one_of(st.text(max_size=10), st.integers(), st.none()), inner, max_size=4
        ),
    ),
    max_leaves=12,
)


def _paths(obj: object, prefix: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Every path to a value inside ``obj`` (keys and list indexes)."""
    found = [prefix]
    if isinstance(obj, dict):
        for key, value in obj.items():
            found.extend(_paths(value, (*prefix, key)))
    elif isinstance(obj, list):
        for index, value in enumerate(obj):
            found.extend(_paths(value, (*prefix, index)))
    return found


def _replace(obj: object, path: tuple[object, ...], value: object) -> object:
    """A copy of ``obj`` with the value at ``path`` replaced (deep-copied along the path)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(obj, dict):
        copy: dict[object, object] = dict(obj)
        copy[head] = _replace(obj[head], rest, value)
        return copy
    assert isinstance(obj, list)
    assert isinstance(head, int)
    items = list(obj)
    items[head] = _replace(obj[head], rest, value)
    return items


@st.composite
def mutated_objects(draw: st.DrawFn) -> object:
    """A valid object with one to three values replaced by odd ones."""
    obj: object = draw(st.sampled_from(OBJECTS))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        path = draw(st.sampled_from(_paths(obj)))
        obj = _replace(obj, path, draw(_values))
    return obj


def _check_decode_error(exc: DecodeError) -> None:
    assert len(exc.field) <= MAX_FIELD_CHARS
    assert len(exc.message) <= MAX_MESSAGE_CHARS


@FUZZ
@given(mutated_objects())
def test_decoders_raise_only_decode_error(obj: object) -> None:
    for decode in DECODERS:
        try:
            decode(obj)  # type: ignore[arg-type]  # anything may come in at the boundary
        except DecodeError as exc:
            _check_decode_error(exc)


@FUZZ
@given(st.dictionaries(st.text(max_size=12), _values, max_size=6))
def test_decoders_on_arbitrary_mappings(obj: dict[str, object]) -> None:
    for decode in DECODERS:
        try:
            decode(obj)
        except DecodeError as exc:
            _check_decode_error(exc)


# --------------------------------------------------------------------------- the reader


def read(name: str, data: bytes) -> None:
    """Parse and validate ``data`` as file ``name``: only ManifestError may escape."""
    path = Path("/fuzz") / name
    contents = FileContents(proxy_name=None)
    try:
        documents = parse_documents(path, data)
    except ManifestError as exc:
        problems = exc.problems
    else:
        contents.add_documents(path, documents)
        problems = tuple(contents.problems)
    assert all(p.startswith(str(path)) for p in problems)
    assert all(len(p) <= MAX_PROBLEM_CHARS for p in problems)
    if problems:
        assert len(str(ManifestError(problems))) < 30 * MAX_PROBLEM_CHARS


def _yaml_text(objects: list[object]) -> bytes:
    return yaml.safe_dump_all(objects, sort_keys=False).encode()


def _flow_yaml_text(objects: list[object]) -> bytes:
    return yaml.safe_dump_all(objects, default_flow_style=True).encode()


def _json_text(objects: list[object]) -> bytes:
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}).encode()


_FORMATS = {"web.yaml": _yaml_text, "flow.yaml": _flow_yaml_text, "web.json": _json_text}

#: Bytes that matter to the grammars, and to numbers.
_INTERESTING = b"[]{}:,-?&*!|>'\"#%@` \n\t\\0123456789._xob+eE<~\xff\xc3"


@st.composite
def mutated_files(draw: st.DrawFn) -> tuple[str, bytes]:
    """A valid manifest's text (YAML, flow YAML or JSON) with a few byte mutations."""
    name = draw(st.sampled_from(sorted(_FORMATS)))
    objects = draw(st.lists(st.sampled_from(OBJECTS), min_size=1, max_size=3))
    data = bytearray(_FORMATS[name](list(objects)))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        at = draw(st.integers(min_value=0, max_value=len(data)))
        op = draw(st.sampled_from(["replace", "insert", "delete", "repeat"]))
        if op == "replace" and at < len(data):
            data[at] = draw(st.sampled_from(_INTERESTING))
        elif op == "insert":
            data[at:at] = draw(st.binary(max_size=6)) + bytes([draw(st.sampled_from(_INTERESTING))])
        elif op == "delete":
            del data[at : at + draw(st.integers(min_value=1, max_value=20))]
        else:  # repeat a stretch: deeper nesting, longer numbers
            end = min(len(data), at + draw(st.integers(min_value=1, max_value=4)))
            data[at:end] = data[at:end] * draw(st.integers(min_value=2, max_value=400))
    return name, bytes(data)


@FUZZ
@given(mutated_files())
def test_reader_on_mutated_files_raises_only_manifest_error(file: tuple[str, bytes]) -> None:
    read(*file)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(["web.yaml", "web.json"]),
    st.integers(min_value=150, max_value=20_000),
    st.text(alphabet="[{", min_size=1, max_size=3),
)
def test_reader_on_deep_nesting(name: str, depth: int, kinds: str) -> None:
    opening = (kinds * depth)[:depth]
    if name.endswith(".json"):
        closing = "".join("]" if c == "[" else "}" for c in reversed(opening))
        text = "".join(c if c == "[" else '{"k": ' for c in opening) + "1" + closing
    else:
        closing = "".join("]" if c == "[" else "}" for c in reversed(opening))
        text = "a: " + "".join(c if c == "[" else "{k: " for c in opening) + "1" + closing
    read(name, text.encode())


_INT_FORMS = ["{digits}", "-{digits}", "0x{hex}", "0o{octal}", "0b{binary}", "1_{digits}",
              "{digits}:30", "+{digits}", "0{octal}", "{digits}.5", "{digits}e5"]  # fmt: skip


@settings(max_examples=80, deadline=None)
@given(
    st.sampled_from(["web.yaml", "web.json"]),
    st.integers(min_value=1, max_value=6000),
    st.sampled_from(_INT_FORMS),
    st.sampled_from(["port", "nodePort", "timeoutSeconds", "metadata"]),
)
def test_reader_on_huge_numbers(name: str, length: int, form: str, where: str) -> None:
    number = form.format(
        digits="9" * length, hex="f" * length, octal="7" * length, binary="1" * length
    )
    if name.endswith(".json"):
        if not number.lstrip("-").replace(".", "").replace("e", "").isdigit():
            number = "9" * length
        text = (
            '{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, '
            f'"spec": {{"ports": [{{"{where}": {number}, "port": 1}}]}}}}'
        )
    else:
        text = (
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n"
            f"spec: {{ports: [{{{where}: {number}, port: 1}}]}}\n"
        )
    read(name, text.encode())


@FUZZ
@given(st.lists(mutated_objects(), min_size=1, max_size=3), st.sampled_from(sorted(_FORMATS)))
def test_reader_on_odd_values(objects: list[object], name: str) -> None:
    def plain(value: object) -> object:
        # What YAML and JSON can spell: no tuples, bytes, non-finite floats in JSON.
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k) if name.endswith(".json") else k: plain(v) for k, v in value.items()}
        if isinstance(value, bytes):
            return value.decode("latin-1")
        if isinstance(value, float) and not math.isfinite(value) and name.endswith(".json"):
            return str(value)
        return value

    read(name, _FORMATS[name]([plain(obj) for obj in objects]))
