"""The fast endpoint decoder agrees with the general one on every input it accepts, and
leaves every other input (invalid ones included) to the general one."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from userproxy.model import IPFamily
from userproxy.sources.decode import DecodeError, general_endpoint
from userproxy.sources.decode_fast import plain_endpoint

_ANY = st.none() | st.booleans() | st.integers(-2, 70000) | st.text(max_size=8)
_ADDRESS = st.sampled_from(["10.1.0.1", " 10.1.0.2", "fd00::1", "010.1.0.1", "x", "", "1.2.3.4"])
_CONDITIONS = (
    st.fixed_dictionaries({}, optional=dict.fromkeys(("ready", "serving", "terminating"), _ANY))
    | _ANY
)
_ENTRY = st.fixed_dictionaries(
    {},
    optional={
        "addresses": st.lists(_ADDRESS | _ANY, max_size=3) | _ANY,
        "conditions": _CONDITIONS,
        "nodeName": _ANY,
        "zone": _ANY,
        "hints": st.just({}) | st.just({"forZones": [{"name": "a"}]}) | _ANY,
        "targetRef": st.just({"kind": "Pod"}),
    },
) | st.dictionaries(st.integers(0, 3), _ANY, max_size=2)


@settings(max_examples=400)
@given(_ENTRY, st.sampled_from([IPFamily.IPv4, IPFamily.IPv6]))
def test_the_fast_path_agrees_with_the_general_one(entry: object, family: IPFamily) -> None:
    fast = plain_endpoint(entry, family)
    if fast is None:
        return  # left to the general path
    assert isinstance(entry, dict)
    try:
        general = general_endpoint(entry, "endpoints[0]", family)
    except DecodeError as exc:  # the fast path must never accept what this rejects
        raise AssertionError(f"fast path accepted {entry!r}, general rejects: {exc}") from None
    assert general == fast


def test_a_plain_endpoint_takes_the_fast_path() -> None:
    entry = {"addresses": ["10.1.0.1"], "conditions": {"ready": True}, "nodeName": "n1"}
    fast = plain_endpoint(entry, IPFamily.IPv4)
    assert fast is not None
    assert fast == general_endpoint(entry, "endpoints[0]", IPFamily.IPv4)
    assert plain_endpoint({"addresses": ["fd00::1"]}, IPFamily.IPv4) is None  # wrong family
    assert plain_endpoint({**entry, "hints": {"forZones": [{"name": "a"}]}}, IPFamily.IPv4) is None
